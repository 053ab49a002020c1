"""Embedding records that are token ids already, one obs row each, into a new AnnData.

Two inputs take this path: DNA sequences (FASTA windows, table rows: tokenized by
biomask.embedding.dna) and token stores of either modality (`read_store`, here: their records are
the model's input as they are). Cells in an h5ad or AnnData take biomask.embedding.cells instead.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from biomask.batch import n_specials
from biomask.embedding.anndata_io import h5_safe, provenance
from biomask.embedding.inference import embed_records, inference_max_length
from biomask.errors import InputError

log = logging.getLogger(__name__)

Chunk = tuple[pd.DataFrame, list[dict[str, Any]]]


def read_store(root: Path, chunk_size: int) -> Iterator[Chunk]:
    """Every record of a token store, split by split, with its id, label, split and metadata."""
    from biomask.store import TokenStore

    store = TokenStore(root)
    store.verify()  # every shard's sha256 (and the tokenizer's), as pretrain and evaluate check
    names = store.label_names or []
    for split_name in store.splits:
        split = store.split(split_name)
        if len(split) == 0:
            continue
        meta = split.meta()
        labels = split.record_field("labels") if "labels" in store.manifest.get("record_fields", {}) else None
        for start in range(0, len(split), chunk_size):
            stop = min(start + chunk_size, len(split))
            frame = pd.DataFrame(
                {
                    "id": meta["id"].astype(str).to_numpy()[start:stop]
                    if "id" in meta
                    else [f"{split_name}:{i}" for i in range(start, stop)],
                    "split": split_name,
                }
            )
            if labels is not None:
                frame["label"] = [names[int(v)] for v in labels[start:stop]]
            # the rest of the store's metadata (a window's source file, record and coordinates; a
            # cell's source and obs columns): ids alone repeat across the files of a corpus
            for column in meta.columns:
                if column not in frame.columns:
                    frame[column] = meta[column].to_numpy()[start:stop]
            # every token field travels (cells stores: values and bins); labels are obs, not model input
            records = [{k: v for k, v in split[i].items() if k != "labels"} for i in range(start, stop)]
            yield frame, records


def embed_chunks(
    model: Any,
    chunks: Iterable[Chunk],
    *,
    where: Path,
    pooling: str,
    layer: int,
    batch_size: int,
    key: str,
    umap_color: str | None,
    extra: dict[str, Any],
    long_records: str = "first",
):
    """An AnnData of the records' embeddings (obs: the chunks' rows), not yet written; `extra` joins
    the provenance in `uns[key]`."""
    import anndata
    from anndata.utils import make_index_unique

    max_length = inference_max_length(model)
    room = max_length - n_specials(model.config.modality)
    frames, parts, cropped, examples, done = [], [], 0, [], 0
    for frame, records in chunks:
        long = [i for i, r in enumerate(records) if len(r["tokens"]) > room]
        if long and long_records == "refuse":
            ids = ", ".join(repr(str(frame["id"].iloc[i])) for i in long[:3])
            raise InputError(
                f"{where}: record{'s' if len(long) > 1 else ''} {ids}{' and others' if len(long) > 3 else ''} "
                f"{'are' if len(long) > 1 else 'is'} longer than the model's "
                f"input of {room} tokens (dna.long_records=refuse); set dna.long_records=window (embed "
                "windows and pool them) or centre (the middle tokens)"
            )
        cropped += len(long)
        examples += [str(frame["id"].iloc[i]) for i in long[: 3 - len(examples)]]
        strands = [records]
        if records and "reverse" in records[0]:  # dna.strands=both: the mean of the two strands' vectors
            strands = [[{"tokens": r["tokens"]} for r in records], [r["reverse"] for r in records]]
        vectors = [
            embed_records(
                model,
                strand,
                pooling=pooling,
                layer=layer,
                batch_size=batch_size,
                max_length=max_length,
                long_records=long_records,
            )
            for strand in strands
        ]
        parts.append(vectors[0] if len(vectors) == 1 else (vectors[0] + vectors[1]) / 2)
        frames.append(frame)
        done += len(frame)
        log.info("embedded %s records", f"{done:,}")  # a FASTA's count is known only at its end
    if not frames:
        raise InputError(f"{where} holds no sequences")
    obs = pd.concat(frames, ignore_index=True)
    if cropped:
        what = {
            "window": "each is embedded whole, in windows of the model's length whose vectors are pooled",
            "centre": "each is cut to its middle tokens",
            "first": "each is cut to its first tokens (cells: its highest-valued genes)",
        }[long_records]
        log.warning(
            "%d record%s longer than the model's %d tokens (%s%s): %s (dna.long_records=%s)",
            cropped,
            " is" if cropped == 1 else "s are",
            room,
            ", ".join(examples),
            ", ..." if cropped > len(examples) else "",
            what,
            long_records,
        )
    if umap_color is not None and umap_color not in obs.columns:
        raise InputError(
            f"{where}: no column {umap_color!r} to colour the UMAP by (umap.color); columns: "
            f"{', '.join(obs.columns)}"
        )
    ids = pd.Index(obs["id"].astype(str).to_numpy())  # unnamed: an index named "id" beside the column
    if ids.has_duplicates:
        repeated = ids[ids.duplicated()].unique()
        log.warning(
            "%s: %d sequence(s) share a name with an earlier one (%s); their rows are named as scanpy's "
            "make_unique does (NAME-1, NAME-2, ...), obs['id'] keeps the name as given",
            where,
            int(ids.duplicated().sum()),
            ", ".join(repr(r) for r in repeated[:5]) + (", ..." if len(repeated) > 5 else ""),
        )
    obs.index = make_index_unique(ids)
    for column in obs.columns:
        if obs[column].dtype == object:
            obs[column] = obs[column].astype(str)
    uns = provenance(
        model,
        pooling=pooling,
        layer=layer,
        key=key,
        max_length=max_length,
        extra={
            "input": str(where),
            "sequences": len(obs),
            "records_longer_than_model": int(cropped),
            "long_records": long_records,
            **extra,
        },
    )
    return anndata.AnnData(obs=obs, obsm={key: np.concatenate(parts)}, uns={key: h5_safe(uns)})
