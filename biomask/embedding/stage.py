"""`biomask embed`: a portable checkpoint's embeddings of cells (h5ad) or DNA sequences, as AnnData.

1. inputs     the checkpoint (modality, tokenizer, how its corpus was tokenized), the input file and
              its kind, the output; every check (modality, vocabulary coverage, counts, obs column,
              output == input) before anything is written
2. reuse      an output with the same fingerprint (config + checkpoint weights + input checksum) is
              reused; another one is refused unless --overwrite
3. embed      one path per input: cells (embedding/cells.py) streamed in chunks — read, tokenized
              like the corpus, embedded, written into `obsm[key]` of a copy of the input (the rest of
              the file untouched); DNA FASTA windows or table rows (embedding/dna.py) and token-store
              records of either modality (embedding/records.py) into a new AnnData (obs = id, label)
4. provenance `uns[key]` (beside `obsm[key]`): checkpoint and its hashes, layer, pooling, masking scheme,
              tokenization, gene coverage, code version, fingerprint; a UMAP PNG when asked
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from biomask.embedding.anndata_io import DIGEST_KEY, changed_embedding, embedding_digest, provenance
from biomask.embedding.config import EMBED_POOLINGS, EmbedConfig
from biomask.embedding.inference import check_layer, check_pooling, pick_device, vector_width
from biomask.embedding.reuse import CELL_FORMATS, OUTPUT_NAME, checked
from biomask.errors import InputError, OutputExistsError, StaleOutputError
from biomask.outputs import atomic_file, stale_temporaries
from biomask.stage import CONFIG_SHA256, StageOutput

if TYPE_CHECKING:
    from biomask.embedding.records import Chunk

log = logging.getLogger(__name__)

UMAP_NAME = "umap.png"


# 1. inputs and 2. reuse: biomask.embedding.reuse, where a rerun decides without this module's imports


# ------------------------------------------------------------------------------------------- 3. cells


class CellsJob:
    """An h5ad opened and checked against the checkpoint (biomask.embedding.cells), written into a
    copy of itself chunk by chunk."""

    def __init__(self, cfg: EmbedConfig, path: Path, model: Any) -> None:
        from biomask.cells.readers import open_matrix
        from biomask.embedding.cells import CellsEmbedding

        self.cfg, self.path, self.model = cfg, path, model
        self.source = open_matrix(path, "h5ad", cfg.matrix)
        try:
            colour = cfg.umap.color
            if colour is not None and colour not in self.source.obs.columns:
                raise InputError(
                    f"{path}: obs has no column {colour!r} to colour the UMAP by (umap.color); obs columns: "
                    f"{', '.join(map(str, self.source.obs.columns)) or 'none'}"
                )
            self.job = CellsEmbedding(
                model,
                self.source,
                counts=cfg.counts,
                gene_column=True if cfg.genes.column == "auto" else cfg.genes.column,
                strip_version=cfg.genes.strip_version,
                duplicates=cfg.genes.duplicates,
                min_coverage=cfg.genes.min_coverage,
                chunk_size=cfg.chunk_size,
                standardise=cfg.standardise,
            )
        except BaseException:
            self.source.close()
            raise

    def write(self, h5ad: Path, png: Path | None, fingerprint: str) -> dict[str, Any]:
        from biomask.embedding.anndata_io import EmbeddingWriter

        cfg, n_obs = self.cfg, self.source.n_obs
        done = 0

        def progress(n: int) -> None:
            nonlocal done
            done += n
            log.info("embedded %d / %d cells", done, n_obs)

        try:
            width = vector_width(self.model, cfg.layer, cfg.pooling)
            with EmbeddingWriter(self.path, h5ad, n_obs, width, key=cfg.key) as writer:
                cells = self.job.run(
                    writer.write,
                    pooling=cfg.pooling,
                    layer=cfg.layer,
                    batch_size=cfg.batch_size,
                    on_chunk=progress,
                )
                uns = provenance(
                    self.model,
                    pooling=cfg.pooling,
                    layer=cfg.layer,
                    key=cfg.key,
                    max_length=self.job.max_length,
                    extra={
                        "input": str(Path(self.path).resolve()),  # absolute, as the checkpoint is
                        "matrix": cfg.matrix,
                        **cells,
                        **as_written(cfg),
                        "fingerprint": fingerprint,
                    },
                )
                writer.finish(uns)
        finally:
            self.source.close()
        if png is not None:
            _umap(h5ad, cfg, png, self.source.obs[cfg.umap.color], self.model)
        return uns


def vector_title(model: Any, pooling: str, layer: int) -> str:
    """What a vector is, in a plot title: the profile autoencoder pools nothing (its latent, or a
    hidden layer), the panel transformer gives its cell token whatever pooling was asked."""
    kind = model.config.kind
    if kind == "mlp":
        return "latent" if layer == -1 else f"hidden layer {layer}"
    return f"{getattr(model, 'pooling_used', lambda asked: asked)(pooling)} pooling · layer {layer}"


def _umap(h5ad: Path, cfg: EmbedConfig, png: Path, colour: pd.Series, model: Any) -> None:
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
    title = f"{Path(cfg.checkpoint).parent.name or cfg.checkpoint} · {vector_title(model, cfg.pooling, cfg.layer)}"
    if chosen.size < n:
        title += f" · {chosen.size:,} of {n:,} cells"
    umap_png(
        vectors,
        colour.iloc[chosen].reset_index(drop=True),
        png,
        title=title,
        max_cells=cfg.umap.max_cells,
        seed=cfg.umap.seed,
    )


# ------------------------------------------------------------------------- 3. DNA and token stores


def retokenized(chunks: Iterator[Chunk], theirs: Any, store: Path, model: Any) -> Iterator[Chunk]:
    """A DNA store's chunks with each record decoded to its bases (by `theirs`, the store's tokenizer)
    and tokenized as `model`'s corpus was."""
    from biomask.embedding.dna import sequence_encoder

    encode = sequence_encoder(model)
    for frame, records in chunks:
        ids = frame["id"].tolist()
        yield (
            frame,
            [
                encode(theirs.decode(r["tokens"]), f"store {store}, record {i!r}")
                for i, r in zip(ids, records)
            ],
        )


def embed_tokens(cfg: EmbedConfig, path: Path, kind: str, model: Any, fingerprint: str):
    """An AnnData of the embeddings of DNA sequences (FASTA, table) or of a token store's records
    (obs: id, label, coordinates or split), not yet written."""
    from biomask.embedding.dna import sequence_chunks
    from biomask.embedding.records import embed_chunks, read_store
    from biomask.models import check_tokenizer

    if kind == "store":
        chunks = read_store(path, cfg.chunk_size)
        extra: dict[str, Any] = {}
        try:
            check_tokenizer(model, path)
        except InputError as refused:
            if model.config.modality != "dna":
                raise  # a gene vocabulary is a panel and its statistics: no re-tokenizing a cell
            from biomask.dna.tokenizers import load_tokenizer

            try:
                theirs = load_tokenizer(path)
            except InputError:
                raise refused from None  # no tokenizer to decode its records with: the first message
            # as `biomask evaluate` does: the store's records are sequences, read in the model's tokens
            log.info("%s: another tokenizer than the checkpoint's; its sequences are re-tokenized", path)
            chunks = retokenized(chunks, theirs, path, model)
            extra = {"retokenized": True}
    else:
        chunks = sequence_chunks(model, path, kind, cfg.dna, cfg.chunk_size)
        extra = {
            "window": cfg.dna.window,
            "stride": cfg.dna.stride or cfg.dna.window,
            "strands": cfg.dna.strands,
        }
    return embed_chunks(
        model,
        chunks,
        where=path,
        pooling=cfg.pooling,
        layer=cfg.layer,
        batch_size=cfg.batch_size,
        key=cfg.key,
        umap_color=cfg.umap.color,
        long_records=cfg.dna.long_records if model.config.modality == "dna" else "first",
        extra={"input_format": kind, **extra, **as_written(cfg), "fingerprint": fingerprint},
    )


# ------------------------------------------------------------------------------------------- the stage


def as_written(cfg: EmbedConfig) -> dict[str, str]:
    """The config as the user wrote it and where from, for uns[key]: an .h5ad output holds no
    config.yaml, and a rerun spelling a path otherwise is compared with these
    (`StageOutput.compared_config`)."""
    return {"config": json.dumps(cfg.model_dump(mode="json")), "cwd": os.getcwd()}


def _written_config(path: Path, key: str) -> dict[str, Any] | None:
    """The config an .h5ad output's embedding recorded (None: written before it was recorded)."""
    try:
        written = json.loads(_recorded(path, key, "config") or "null")
    except ValueError:
        return None
    return written if isinstance(written, dict) else None


def _file_is_current(path: Path, stage: StageOutput, overwrite: bool, key: str) -> bool:
    """A .h5ad output: reuse it (same fingerprint in uns), replace it with --overwrite when biomask
    embed wrote it, and never replace a file it did not write."""
    if not path.exists():
        return False
    found = _embed_fingerprints(path)
    # a path spelled otherwise than the embedding's own run wrote it, naming the same file, is the same
    recorded, written = {"cwd": _recorded(path, key, "cwd")}, _written_config(path, key)
    same = found.get(key) in stage.fingerprints(recorded=recorded, written=written) or (
        # written before the checkpoint's config.json entered the fingerprint: its record names it
        found.get(key) in stage.fingerprints(with_config=False)
        and _recorded(path, key, "checkpoint_config_sha256") == stage.inputs[0].get(CONFIG_SHA256)
    )
    if same and not overwrite and _vectors_unchanged(path, key):
        log.info("embed: %s is up to date (same config, checkpoint and input); reusing it", path)
        return True
    if not found:
        raise OutputExistsError(
            f"output {path} exists and was not written by biomask embed (no embedding provenance in its "
            "uns); --overwrite only replaces biomask's own outputs. Choose another output (to add the "
            "embedding to that file itself, give it as the input with overwrite_input: true)"
        )
    if overwrite:
        return False
    raise StaleOutputError(
        f"output {path} exists and holds other results{_what_differs(written, stage)}; pass --overwrite to "
        "replace it, or choose another output"
    )


def _vectors_unchanged(h5ad: Path, key: str) -> bool:
    """An output about to be reused holds the vectors biomask embed wrote (their digest in uns[key]): a
    large output's file is past the run record's digest budget, and an .h5ad output has no run record,
    so an edited obsm was reused as this config's result. Refused (exit 2); --overwrite recomputes."""
    if not changed_embedding(h5ad, key):
        return True
    raise StaleOutputError(
        f"{h5ad}: obsm[{key!r}] changed since biomask embed wrote it (its sha256 is recorded in "
        f"uns[{key!r}][{DIGEST_KEY!r}]); pass --overwrite to compute the embedding again"
    )


def _what_differs(written: dict[str, Any] | None, stage: StageOutput) -> str:
    """The settings that differ from those the output recorded (none named where it recorded none,
    or only result-free ones differ), with the way to keep an output written before
    `dna.long_records` existed (an upgrade met its refusal naming nothing)."""
    if written is None:
        return ""
    from biomask.config import config_diff

    # the stage's own result-free keys (dna.long_records among them for cells, and at `first`)
    changes = config_diff(written, stage.config.model_dump(mode="json"), ignore=stage.non_semantic)
    if not changes:
        return " (the same settings: the checkpoint or the input differs)"
    hint = (
        "; `dna.long_records=first` reuses it (it cut long records, as embed did before the setting existed)"
        if len(changes) == 1 and changes[0].startswith("dna.long_records: '(absent)'")
        else ""
    )
    return "; changed settings: " + ", ".join(changes[:8]) + hint


def _png_beside(h5ad: Path) -> Path:
    return h5ad.with_name(h5ad.name[: -len(".h5ad")] + ".umap.png")


def _warn_leftovers(*paths: Path) -> None:
    """A killed embed leaves its `.NAME.tmp-XXXXXXXX` beside an .h5ad output: a copy of the input, as
    large as it, hidden, that no later run removes -- a file holds no lock that would tell a dead
    writer's from a live one's (an output folder's temporary does, and goes by itself). Named, so
    the space can be had back."""
    left = [item for path in paths for item in stale_temporaries(path) if item.is_file()]
    if left:
        size = sum(item.stat().st_size for item in left)
        log.warning(
            "embed: %s (%s MB) beside %s %s left by an embed that was killed; delete %s unless an embed "
            "of this output is running now",
            ", ".join(item.name for item in left),
            f"{size / 1e6:,.0f}",
            paths[0],
            "was" if len(left) == 1 else "were",
            "it" if len(left) == 1 else "them",
        )


def _recorded(path: Path, key: str, name: str) -> str | None:
    """A string biomask embed recorded in an .h5ad's uns[key] (None: not there)."""
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            node = handle.get(f"uns/{key}/{name}")
            value = node[()] if isinstance(node, h5py.Dataset) else None
    except OSError:
        return None
    return value.decode() if isinstance(value, bytes) else None if value is None else str(value)


def _embed_fingerprints(path: Path) -> dict[str, str]:
    """uns key -> fingerprint of every embedding biomask embed wrote into an .h5ad (empty: none, or
    not an HDF5 file)."""
    import h5py

    found: dict[str, str] = {}
    try:
        with h5py.File(path, "r") as handle:
            uns = handle.get("uns")
            for name in uns.keys() if uns is not None else ():
                node = uns[name]
                if isinstance(node, h5py.Group) and "fingerprint" in node and "checkpoint" in node:
                    value = node["fingerprint"][()]
                    found[name] = value.decode() if isinstance(value, bytes) else str(value)
    except OSError:
        pass
    return found


def run_embed(cfg: EmbedConfig, *, overwrite: bool = False) -> Path:
    """Run (or reuse) an embedding; returns the written .h5ad (inside the output directory, if one)."""
    from biomask.models import load_pretrained

    path, kind, modality, h5ad, directory, stage = checked(cfg)
    if directory:
        # is_current is False with --overwrite, which recomputes whatever the file holds
        if stage.is_current(overwrite=overwrite) and _vectors_unchanged(h5ad, cfg.key):
            return h5ad
    elif h5ad != path and _file_is_current(h5ad, stage, overwrite, cfg.key):
        return h5ad
    if not directory and cfg.umap.color is not None:  # the PNG beside an .h5ad: only ever our own
        png = _png_beside(h5ad)
        if png.exists() and not (h5ad.exists() and _embed_fingerprints(h5ad)):
            raise OutputExistsError(
                f"{png} exists and was not written beside an embedding of {h5ad.name}; the UMAP would "
                "replace it. Move it away, or choose another output name"
            )

    model = load_pretrained(cfg.checkpoint, device=pick_device(cfg.device))
    check_layer(model, cfg.layer)
    check_pooling(model, cfg.pooling, str(cfg.checkpoint), cfg.layer, among=EMBED_POOLINGS)
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
        job, adata = None, embed_tokens(cfg, path, kind, model, stage.fingerprint)

    def produce(target: Path, png: Path | None) -> None:
        if job is not None:
            job.write(target, png, stage.fingerprint)
        else:
            adata.uns[cfg.key][DIGEST_KEY] = embedding_digest(adata.obsm[cfg.key])
            adata.write_h5ad(target)
            if png is not None:
                _umap(target, cfg, png, adata.obs[cfg.umap.color], model)

    wants_png = cfg.umap.color is not None
    if directory:
        with stage.writing(seeds={"umap": cfg.umap.seed}) as tmp:
            produce(tmp / OUTPUT_NAME, tmp / UMAP_NAME if wants_png else None)
    else:
        png = _png_beside(h5ad)
        _warn_leftovers(h5ad, png)
        # the PNG goes into place before the h5ad, whose fingerprint marks the output as finished
        with atomic_file(h5ad) as tmp_h5ad, atomic_file(png) as tmp_png:
            produce(tmp_h5ad, tmp_png if wants_png else None)
    log.info("embed: wrote obsm[%r] of %s", cfg.key, h5ad)
    return h5ad
