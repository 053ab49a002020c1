"""`biomask embed`: a portable checkpoint's embeddings of cells (h5ad) or DNA sequences, as AnnData.

1. inputs     the checkpoint (modality, tokenizer, how its corpus was tokenized), the input file and
              its kind, the output; every check (modality, vocabulary coverage, counts, obs column,
              output == input) before anything is written
2. reuse      an output with the same fingerprint (config + checkpoint weights + input checksum) is
              reused; another one is refused unless --overwrite
3. embed      cells: streamed in chunks — read, tokenized like the corpus, embedded, written into
              `obsm[key]` of a copy of the input (the rest of the file untouched); DNA: FASTA windows,
              table rows or token-store records into a new AnnData (obs = sequence id, label)
4. provenance `uns[key]` (beside `obsm[key]`): checkpoint and its hashes, layer, pooling, masking scheme,
              tokenization, gene coverage, code version, fingerprint; a UMAP PNG when asked
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from biomask.embedding.config import NON_SEMANTIC, EmbedConfig
from biomask.embedding.inference import check_layer, embed_records, inference_max_length, pick_device
from biomask.errors import InputError, OutputExistsError
from biomask.provenance import code_version, sha256_file
from biomask.stage import StageOutput

log = logging.getLogger(__name__)

OUTPUT_NAME = "embeddings.h5ad"  # inside a directory output
UMAP_NAME = "umap.png"
CELL_FORMATS = ("h5ad",)


# ------------------------------------------------------------------------------------------- 1. inputs


def input_kind(path: Path, fmt: str) -> str:
    """h5ad | fasta | table | store."""
    from biomask.embedding.dna import guess_dna_format

    if fmt != "auto":
        return fmt
    if path.name.lower().endswith(".h5ad"):
        return "h5ad"
    guessed = guess_dna_format(path)
    if guessed is None:
        raise InputError(
            f"cannot tell what {path} holds from its name: give an .h5ad (cells), a FASTA (.fa/.fasta[.gz]), "
            "a CSV/TSV table, or a DNA token store — or set `format:`"
        )
    return guessed


def input_modality(path: Path, kind: str) -> str:
    if kind in CELL_FORMATS:
        return "cells"
    if kind == "store":
        from biomask.store import TokenStore

        return TokenStore(path).modality
    return "dna"


def check_modality(checkpoint: str, modality: str, path: Path, kind: str) -> None:
    """A DNA checkpoint given an h5ad, or a cells checkpoint given sequences: a clear error."""
    theirs = input_modality(path, kind)
    if modality == theirs:
        return
    what = {"h5ad": "an expression matrix (h5ad)", "store": f"a {theirs} token store"}.get(
        kind, f"DNA sequences ({kind})"
    )
    wanted = (
        "an .h5ad of cells"
        if modality == "cells"
        else "DNA sequences (FASTA, CSV/TSV table, DNA token store)"
    )
    raise InputError(
        f"checkpoint {checkpoint} is a {modality} model, but {path} is {what}; give it {wanted}, "
        f"or use a {theirs} checkpoint"
    )


def checkpoint_inputs(cfg: EmbedConfig, path: Path) -> list[dict[str, Any]]:
    from biomask.cells.readers import input_checksum

    weights = Path(cfg.checkpoint) / "model.safetensors"
    digest = sha256_file(weights) if weights.is_file() else None
    if path.is_dir():  # a token store: its manifest holds every shard's checksum
        source = {"name": "input", "path": str(path), "sha256": sha256_file(path / "manifest.json")}
    else:
        source = {"name": "input", "path": str(path), "sha256": input_checksum(path)}
    return [{"name": "checkpoint", "path": str(cfg.checkpoint), "sha256": digest}, source]


def provenance(
    model: Any, *, pooling: str, layer: int, key: str, max_length: int, extra: dict[str, Any]
) -> dict[str, Any]:
    """What `uns[key]` records about an embedding."""
    info = model.checkpoint_info
    directory = Path(model.checkpoint_dir)
    masking = info.get("masking") or {}
    return {
        "checkpoint": str(directory),
        "checkpoint_weights_sha256": info.get("weights_sha256"),
        "checkpoint_config_sha256": sha256_file(directory / "config.json"),
        "tokenizer_sha256": (info.get("tokenizer") or {}).get("sha256"),
        "modality": info.get("modality"),
        "layer": layer,
        "pooling": pooling,
        "key": key,
        "max_length": max_length,
        "masking_scheme": masking.get("scheme"),
        "masking": json.dumps(masking, sort_keys=True),
        "training_steps": (info.get("training") or {}).get("steps"),
        "code": code_version(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


# ------------------------------------------------------------------------------------------- 3. cells


class CellsJob:
    """An h5ad opened, checked against the checkpoint, ready to stream."""

    def __init__(self, cfg: EmbedConfig, path: Path, model: Any) -> None:
        from biomask.cells.encode import CellEncoder, checkpoint_prep
        from biomask.cells.readers import open_matrix

        self.cfg, self.path, self.model = cfg, path, model
        self.source = open_matrix(path, "h5ad", cfg.matrix)
        try:
            colour = cfg.umap.color
            if colour is not None and colour not in self.source.obs.columns:
                raise InputError(
                    f"{path}: obs has no column {colour!r} to colour the UMAP by (umap.color); obs columns: "
                    f"{', '.join(map(str, self.source.obs.columns)) or 'none'}"
                )
            self.prep = checkpoint_prep(model.checkpoint_dir, model.checkpoint_info)
            column: str | bool | None = True if cfg.genes.column == "auto" else cfg.genes.column
            self.encoder = CellEncoder(
                self.prep,
                counts=cfg.counts,
                gene_column=column,
                strip_version=cfg.genes.strip_version,
                duplicates=cfg.genes.duplicates,
                min_coverage=cfg.genes.min_coverage,
            )
            self.opened = self.encoder.open(self.source, min(cfg.chunk_size, 8192))
        except BaseException:
            self.source.close()
            raise

    def write(self, h5ad: Path, png: Path | None, fingerprint: str) -> dict[str, Any]:
        from biomask.embedding.anndata_io import EmbeddingWriter

        cfg, model = self.cfg, self.model
        max_length = inference_max_length(model)
        totals = {"counts_total": 0.0, "counts_in_vocab": 0.0, "cells_without_vocabulary_genes": 0}
        try:
            with EmbeddingWriter(
                self.path, h5ad, self.source.n_obs, model.config.d_model, key=cfg.key
            ) as writer:
                for start, records, stats in self.encoder.blocks(self.opened, cfg.chunk_size):
                    vectors = embed_records(
                        model,
                        records,
                        pooling=cfg.pooling,
                        layer=cfg.layer,
                        batch_size=cfg.batch_size,
                        max_length=max_length,
                    )
                    writer.write(start, vectors)
                    for name, value in stats.items():
                        totals[name] += value
                    log.info("embedded %d / %d cells", start + len(records), self.source.n_obs)
                coverage = dict(self.opened.coverage)
                coverage["fraction_of_counts"] = (
                    totals["counts_in_vocab"] / totals["counts_total"] if totals["counts_total"] else 0.0
                )
                empty = int(totals["cells_without_vocabulary_genes"])
                if empty:
                    log.warning(
                        "%s: %d cells express no vocabulary gene; their embedding is the model's [CLS]-only vector",
                        self.source.where,
                        empty,
                    )
                uns = provenance(
                    model,
                    pooling=cfg.pooling,
                    layer=cfg.layer,
                    key=cfg.key,
                    max_length=max_length,
                    extra={
                        "input": str(self.path),
                        "matrix": cfg.matrix,
                        "counts_found": self.opened.summary.describe(),
                        "gene_id_column": self.opened.gene_column or "var index",
                        "gene_coverage": coverage,
                        "cells": self.source.n_obs,
                        "cells_without_vocabulary_genes": empty,
                        "tokenization": self.prep.describe(),
                        "fingerprint": fingerprint,
                    },
                )
                writer.finish(uns)
        finally:
            self.source.close()
        if png is not None:
            _umap(h5ad, cfg, png, self.source.obs[cfg.umap.color])
        return uns


def _umap(h5ad: Path, cfg: EmbedConfig, png: Path, colour: pd.Series) -> None:
    """The UMAP PNG from the written embeddings (a sample of rows is read back, not the whole matrix)."""
    import h5py

    from biomask.embedding.plots import umap_png

    with h5py.File(h5ad, "r") as handle:
        dataset = handle["obsm"][cfg.key]
        n = dataset.shape[0]
        chosen = np.arange(n)
        if n > cfg.umap.max_cells:
            chosen = np.sort(
                np.random.default_rng(cfg.umap.seed).choice(n, cfg.umap.max_cells, replace=False)
            )
        vectors = dataset[chosen] if chosen.size < n else dataset[:]
    title = (
        f"{Path(cfg.checkpoint).parent.name or cfg.checkpoint} · {cfg.pooling} pooling · layer {cfg.layer}"
    )
    umap_png(vectors, colour.iloc[chosen].reset_index(drop=True), png, title=title, seed=cfg.umap.seed)


# ------------------------------------------------------------------------------------------- 3. DNA


def _dna_chunks(cfg: EmbedConfig, path: Path, kind: str, model: Any) -> Iterator[tuple[pd.DataFrame, list]]:
    from biomask.dna.cleaning import Cleaner
    from biomask.dna.tokenizers import load_tokenizer
    from biomask.embedding import dna
    from biomask.models import check_tokenizer

    if kind == "store":
        check_tokenizer(model, path)
        return dna.read_store(path, cfg.chunk_size)
    tokenizer = load_tokenizer(Path(model.checkpoint_dir) / "tokenizer")
    cleaning = (model.checkpoint_info.get("prep") or {}).get("cleaning") or {}
    # N and IUPAC codes become the N token, as in the corpus; soft-masked bases as the corpus treated them
    cleaner = Cleaner(lowercase=cleaning.get("lowercase", "upper"), ambiguous="n_token")
    if kind == "fasta":
        return dna.read_fasta(
            path, tokenizer, cleaner, window=cfg.dna.window, stride=cfg.dna.stride, chunk_size=cfg.chunk_size
        )
    return dna.read_sequence_table(
        path,
        tokenizer,
        cleaner,
        sequence_column=cfg.dna.sequence_column,
        label_column=cfg.dna.label_column,
        id_column=cfg.dna.id_column,
        chunk_size=cfg.chunk_size,
    )


def embed_dna(cfg: EmbedConfig, path: Path, kind: str, model: Any, fingerprint: str):
    """An AnnData of sequence embeddings (obs: id, label, coordinates or split), not yet written."""
    import anndata
    from anndata.utils import make_index_unique

    from biomask.embedding.anndata_io import h5_safe

    max_length = inference_max_length(model)
    room = max_length - (2 if model.config.modality == "dna" else 1)  # minus [CLS] (and [SEP])
    frames, parts, cropped = [], [], 0
    for frame, records in _dna_chunks(cfg, path, kind, model):
        cropped += sum(len(r["tokens"]) > room for r in records)
        parts.append(
            embed_records(
                model,
                records,
                pooling=cfg.pooling,
                layer=cfg.layer,
                batch_size=cfg.batch_size,
                max_length=max_length,
            )
        )
        frames.append(frame)
    if not frames:
        raise InputError(f"{path} holds no sequences")
    obs = pd.concat(frames, ignore_index=True)
    if cropped:
        log.warning(
            "%d records are longer than the model's %d tokens: they are cut as for evaluation "
            "(DNA: the first tokens; set dna.window to embed windows instead)",
            cropped,
            room,
        )
    if cfg.umap.color is not None and cfg.umap.color not in obs.columns:
        raise InputError(
            f"{path}: no column {cfg.umap.color!r} to colour the UMAP by (umap.color); columns: "
            f"{', '.join(obs.columns)}"
        )
    obs.index = make_index_unique(pd.Index(obs["id"].astype(str)))
    for column in obs.columns:
        if obs[column].dtype == object:
            obs[column] = obs[column].astype(str)
    vectors = np.concatenate(parts)
    uns = provenance(
        model,
        pooling=cfg.pooling,
        layer=cfg.layer,
        key=cfg.key,
        max_length=max_length,
        extra={
            "input": str(path),
            "input_format": kind,
            "sequences": len(obs),
            "records_cut": int(cropped),
            "window": cfg.dna.window,
            "stride": cfg.dna.stride or cfg.dna.window,
            "fingerprint": fingerprint,
        },
    )
    return anndata.AnnData(obs=obs, obsm={cfg.key: vectors}, uns={cfg.key: h5_safe(uns)})


# ------------------------------------------------------------------------------------------- the stage


def _targets(cfg: EmbedConfig) -> tuple[Path, bool]:
    """(the output path, whether it is a directory output)."""
    output = Path(cfg.output).expanduser()
    return output, not output.name.lower().endswith(".h5ad")


def _file_is_current(path: Path, fingerprint: str, overwrite: bool, key: str) -> bool:
    """A .h5ad output: reuse it (same fingerprint in uns), or refuse to replace it without --overwrite."""
    if not path.exists() or overwrite:
        return False
    import h5py

    found = None
    try:
        with h5py.File(path, "r") as handle:
            node = handle.get(f"uns/{key}/fingerprint")
            if node is not None:
                found = node[()].decode() if isinstance(node[()], bytes) else str(node[()])
    except OSError:
        pass
    if found == fingerprint:
        log.info("embed: %s is up to date (same config, checkpoint and input); reusing it", path)
        return True
    raise OutputExistsError(
        f"output {path} exists and holds other results; pass --overwrite to replace it, or choose another output"
    )


def resolve_input(value: str) -> Path:
    """A file or directory, or the name of a registered dataset (fetched and verified)."""
    path = Path(value).expanduser()
    if path.exists():
        return path
    from biomask import datasets

    if value in datasets.registry():
        return datasets.fetch(value)
    raise InputError(
        f"input {path} does not exist, and it is not a registered dataset name (see `biomask datasets list`)"
    )


def run_embed(cfg: EmbedConfig, *, overwrite: bool = False) -> Path:
    """Run (or reuse) an embedding; returns the written .h5ad (inside the output directory, if one)."""
    from biomask.models import load_pretrained, read_checkpoint_config

    path = resolve_input(cfg.input)
    info = read_checkpoint_config(cfg.checkpoint)
    kind = input_kind(path, cfg.format)
    modality = info.get("modality") or (info.get("architecture") or {}).get("modality")
    check_modality(cfg.checkpoint, str(modality), path, kind)
    output, directory = _targets(cfg)
    h5ad = output / OUTPUT_NAME if directory else output
    if h5ad.resolve() == path.resolve() and not cfg.overwrite_input:
        raise InputError(
            f"output {h5ad} is the input file; choose another output, or set overwrite_input: true to add the "
            "embedding to the input itself"
        )
    stage = StageOutput("embed", cfg, output, inputs=checkpoint_inputs(cfg, path), non_semantic=NON_SEMANTIC)
    if directory:
        if stage.is_current(overwrite=overwrite):
            return h5ad
    elif h5ad != path and _file_is_current(h5ad, stage.fingerprint, overwrite, cfg.key):
        return h5ad

    model = load_pretrained(cfg.checkpoint, device=pick_device(cfg.device))
    check_layer(model, cfg.layer)
    log.info(
        "embed: %s (%s, %d layers, d %d) on %s, %s pooling, layer %d",
        cfg.checkpoint,
        modality,
        model.config.n_layers,
        model.config.d_model,
        next(model.parameters()).device,
        cfg.pooling,
        cfg.layer,
    )
    # Every check on the input happens here, before anything is written.
    if kind in CELL_FORMATS:
        job: CellsJob | None = CellsJob(cfg, path, model)
        adata = None
    else:
        job, adata = None, embed_dna(cfg, path, kind, model, stage.fingerprint)

    def produce(target: Path, png: Path | None) -> None:
        if job is not None:
            job.write(target, png, stage.fingerprint)
        else:
            adata.write_h5ad(target)
            if png is not None:
                _umap(target, cfg, png, adata.obs[cfg.umap.color])

    wants_png = cfg.umap.color is not None
    if directory:
        with stage.writing(seeds={"umap": cfg.umap.seed}) as tmp:
            produce(tmp / OUTPUT_NAME, tmp / UMAP_NAME if wants_png else None)
    else:
        token = uuid.uuid4().hex[:8]
        tmp_h5ad = h5ad.with_name(f".{h5ad.name}.tmp-{token}")
        png = h5ad.with_name(h5ad.name[: -len(".h5ad")] + ".umap.png")
        tmp_png = png.with_name(f".{png.name}.tmp-{token}")
        h5ad.parent.mkdir(parents=True, exist_ok=True)
        try:
            produce(tmp_h5ad, tmp_png if wants_png else None)
            if wants_png:
                os.replace(tmp_png, png)
            os.replace(tmp_h5ad, h5ad)
        finally:
            tmp_h5ad.unlink(missing_ok=True)
            tmp_png.unlink(missing_ok=True)
    log.info("embed: wrote obsm[%r] of %s", cfg.key, h5ad)
    return h5ad
