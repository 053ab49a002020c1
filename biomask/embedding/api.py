"""The Python API for scanpy users: embed an AnnData with a portable checkpoint, scanpy-style.

    import biomask, scanpy as sc
    biomask.embed(adata, "runs/pretrain/cells-tiny/model")     # in place: obsm["X_biomask"], uns["X_biomask"]
    sc.pp.neighbors(adata, use_rep="X_biomask")
    sc.tl.umap(adata)
    sc.tl.leiden(adata, flavor="igraph", n_iterations=2, directed=False)

    other = biomask.embed(adata, model, key="X_b", copy=True)  # a new AnnData; adata untouched

As scanpy's functions do: `copy=False` (default) writes into `adata` and returns None; `copy=True`
returns a new AnnData holding the embedding. The provenance goes to `uns[key]`, beside `obsm[key]`, so
two embeddings of one AnnData keep one record each. `checkpoint` is a `model/` directory or a model
already loaded with `biomask.models.load_pretrained` (embedding many files loads it once). A backed
AnnData (`sc.read_h5ad(path, backed="r")`) is streamed from its file in chunks, as `biomask embed`
does; a view of one (`backed[mask]`) takes `copy=True` (its cells are loaded and embedded). A progress bar shows on a terminal for long inputs (`progress=` forces it on or off).

The cells are tokenized exactly as the checkpoint's pretraining corpus was (see biomask.cells.encode),
in chunks, and embedded on the GPU when there is one (CPU otherwise), without DeepSpeed.
"""

from __future__ import annotations

import contextlib
import logging
import numbers
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from biomask.cells.config import CountsConfig
from biomask.errors import InputError

if TYPE_CHECKING:
    from anndata import AnnData

    from biomask.models.model import MaskedEncoder

PROGRESS_MIN_CELLS = 5000  # a bar for inputs at least this long (on a terminal or in a notebook)
DUPLICATES = ("sum", "first", "error")  # genes.duplicates of prep and embed configs


def python_names(message: str) -> str:
    """A message of the prep or embed stage with the settings named as `embed`'s arguments (its callers
    have no genes.* keys)."""
    message = message.replace("genes.strip_version", "strip_version=True")
    return message.replace("genes.column", "gene_column=").replace("genes.duplicates", "duplicates=")


class _Rename(logging.Filter):
    def __init__(self, rename: Callable[[str], str]) -> None:
        super().__init__()
        self.rename = rename

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        renamed = self.rename(text)
        if renamed != text:
            record.msg, record.args = renamed, ()
        return True


@contextlib.contextmanager
def renamed_in_logs(rename: Callable[[str], str]) -> Iterator[None]:
    """biomask's log records inside the block, rewritten by `rename` as the caller's exceptions are: a
    warning that names a config key the caller cannot set, or the file a call made for itself, is no
    help. A logger's filter sees only its own records (not its children's), so every biomask logger
    that exists on entry gets it: import the modules that log before entering."""
    loggers = [
        logger
        for name, logger in logging.Logger.manager.loggerDict.items()
        if name.split(".")[0] == "biomask" and isinstance(logger, logging.Logger)
    ]
    rename_filter = _Rename(rename)
    for logger in loggers:
        logger.addFilter(rename_filter)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(rename_filter)


def _model(checkpoint: Any, device: str) -> tuple[Any, str]:
    """(the model, how provenance names it): a loaded model is used where it is."""
    import torch

    from biomask.embedding.inference import pick_device
    from biomask.models import load_pretrained

    if isinstance(checkpoint, torch.nn.Module):
        if getattr(checkpoint, "checkpoint_info", None) is None:
            raise InputError(
                "biomask.embed needs a model from biomask.models.load_pretrained (it carries the checkpoint's "
                "config and tokenizer), or the checkpoint's directory"
            )
        wanted = pick_device(device)  # checked as for a path: device="nonsense" passed in silence
        where = next(checkpoint.parameters()).device
        if device != "auto" and (wanted.type, wanted.index or 0) != (where.type, where.index or 0):
            raise InputError(
                f"device={device!r}, but the model given is on {where}: a loaded model is used where it is. "
                f"Load it there (biomask.models.load_pretrained(path, device={device!r})), or leave device out"
            )
        return checkpoint, str(checkpoint.checkpoint_dir)
    return load_pretrained(checkpoint, device=pick_device(device)), str(checkpoint)


def _source(adata: Any, matrix: str) -> tuple[Any, bool]:
    """The matrix to read: a backed AnnData streams from its file (obs/var are the file's), an
    in-memory one is read where it is. (source, whether we opened it)."""
    from biomask.cells.readers import from_anndata, open_matrix

    if getattr(adata, "isbacked", False):
        return open_matrix(adata.filename, "h5ad", matrix), True
    return from_anndata(adata, matrix, name="AnnData"), False


def _check_arguments(*, batch_size: Any, chunk_size: Any, min_coverage: Any, standardise: Any) -> None:
    """The bounds `biomask embed`'s config sets, for the Python call (a negative batch_size embedded
    nothing and returned uninitialised memory as the embedding)."""
    for name, value in (("batch_size", batch_size), ("chunk_size", chunk_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a whole number of at least 1, not {value!r}")
    if (
        isinstance(min_coverage, bool)
        or not isinstance(min_coverage, (int, float))
        or not 0 <= min_coverage <= 1
    ):
        raise InputError(
            f"min_coverage is a share of the vocabulary's genes, from 0 to 1, not {min_coverage!r}"
        )
    if standardise not in ("checkpoint", "data"):
        raise InputError(f"standardise must be 'checkpoint' or 'data', not {standardise!r}")


def _counts(counts: Any) -> CountsConfig:
    """The counts policy, its errors as `InputError` naming the argument (not pydantic's)."""
    if isinstance(counts, CountsConfig):
        return counts
    if counts is not None and not isinstance(counts, dict):
        raise InputError(f"counts is a dict of the counts policy (e.g. {{'mode': 'log1p'}}), not {counts!r}")
    from biomask.config import validate_config

    return validate_config(CountsConfig, dict(counts or {}), "biomask.embed(counts=...)")


def embed(
    adata: AnnData,
    checkpoint: str | os.PathLike[str] | MaskedEncoder,
    *,
    pooling: Literal["cls", "mean"] = "mean",
    layer: int = -1,
    key: str = "X_biomask",
    matrix: str = "X",
    counts: CountsConfig | dict[str, Any] | None = None,
    gene_column: str | None = "auto",
    strip_version: bool = False,
    duplicates: Literal["sum", "first", "error"] = "sum",
    min_coverage: float = 0.5,
    standardise: Literal["checkpoint", "data"] = "checkpoint",
    batch_size: int = 64,
    chunk_size: int = 8192,
    device: str = "auto",
    copy: bool = False,
    progress: bool | None = None,
) -> AnnData | None:
    """Put the cells' embedding in `obsm[key]` (cells × d_model, float32) and its provenance in
    `uns[key]`: of `adata` itself (`copy=False`, returns None) or of a new AnnData (`copy=True`,
    returned; `adata` is left as it was). `checkpoint`: a portable checkpoint directory, or a model
    from `biomask.models.load_pretrained`. `matrix`: where the counts are (X, raw, layers/NAME);
    `counts`: the counts policy of `biomask prep cells` (e.g. `{"mode": "from_log1p",
    "total_counts_column": "n_counts"}`); `gene_column`: a var column with the gene identifiers, None
    for the var index, "auto" for the vocabulary's own identifier column when present;
    `duplicates`: columns of one gene name are summed ("sum"), reduced to the first ("first"), or
    refused ("error"); `min_coverage`: warn when less of the vocabulary is found in the data;
    `standardise`: each gene scaled by the mean and sd of the model's pretraining cells
    ("checkpoint") or of these cells ("data": for cells of another experiment than the corpus; profile
    models only, at least 20 cells). Bad input raises `biomask.errors.InputError`."""
    from tqdm.auto import tqdm

    import biomask.cells.encode  # noqa: F401  (its loggers exist before renamed_in_logs)
    from biomask.embedding.anndata_io import check_key, h5_safe, provenance
    from biomask.embedding.cells import CellsEmbedding
    from biomask.embedding.inference import check_layer, vector_width
    from biomask.progress import bar_disabled

    if isinstance(adata, (str, os.PathLike)):
        raise InputError(
            f"biomask.embed takes an AnnData, not a path ({adata}): read it first (anndata.read_h5ad, or "
            "biomask.read_cells for a 10x folder or .h5 and a .loom), or run `biomask embed --input` on the file"
        )
    if pooling not in ("cls", "mean"):
        raise InputError(f"pooling must be 'cls' or 'mean', not {pooling!r}")
    if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
        # scanpy's and scvi-tools' `layer=` names an AnnData layer; here it is the model's
        where = (
            f": for the AnnData layer {layer!r} write matrix='layers/{layer}'"
            if isinstance(layer, str)
            else ""
        )
        raise InputError(
            f"layer is the model's layer whose states are pooled (an int, -1: the last), not {layer!r}{where}"
        )
    _check_arguments(
        batch_size=batch_size, chunk_size=chunk_size, min_coverage=min_coverage, standardise=standardise
    )
    if duplicates not in DUPLICATES:
        raise InputError(f"duplicates must be one of {', '.join(map(repr, DUPLICATES))}, not {duplicates!r}")
    if getattr(adata, "isbacked", False) and getattr(adata, "is_view", False):
        # its file holds every cell, the view some; anndata writes nothing into a backed view
        if not copy:
            raise InputError(
                "biomask.embed: a view of a backed AnnData (adata[...] of read_h5ad(..., backed='r')) cannot "
                "take obsm in place. Pass copy=True (the view's cells are loaded, embedded and returned), or "
                "embed the backed AnnData whole and take the rows you want"
            )
        adata = adata.to_memory()  # the view's cells only: already the new AnnData copy=True returns
        loaded = True
    else:
        loaded = False
    check_key(key, adata.obsm.keys(), adata.uns, "the AnnData")
    model, where = _model(checkpoint, device)
    check_layer(model, layer)
    if model.config.modality != "cells":
        raise InputError(
            f"checkpoint {where} is a {model.config.modality} model; an AnnData of cells needs a cells checkpoint"
        )
    counts_cfg = _counts(counts)
    source, opened_here = _source(adata, matrix)
    try:
        with renamed_in_logs(python_names):
            if source.n_obs != adata.n_obs:
                raise InputError(
                    f"{source.where}: {source.n_obs} cells in the matrix, {adata.n_obs} in the AnnData"
                )
            job = CellsEmbedding(
                model,
                source,
                counts=counts_cfg,
                gene_column=True if gene_column == "auto" else gene_column,
                strip_version=strip_version,
                duplicates=duplicates,
                min_coverage=min_coverage,
                chunk_size=chunk_size,
                standardise=standardise,
            )
            # NaN until written: a row no chunk reached is found below, never left as stale memory
            vectors = np.full((adata.n_obs, vector_width(model, layer)), np.nan, dtype=np.float32)
            written = np.zeros(adata.n_obs, dtype=bool)

            def write(start: int, chunk: np.ndarray) -> None:
                vectors[start : start + len(chunk)] = chunk
                written[start : start + len(chunk)] = True

            show = (
                progress
                if progress is not None
                else (not bar_disabled() and adata.n_obs >= PROGRESS_MIN_CELLS)
            )
            with tqdm(
                total=adata.n_obs, desc="embed", unit="cell", disable=not show, dynamic_ncols=True
            ) as bar:
                cells = job.run(
                    write, pooling=pooling, layer=layer, batch_size=batch_size, on_chunk=bar.update
                )
    except InputError as exc:  # the settings by this function's argument names (its callers have no genes.*)
        exc.args = (python_names(str(exc)),)
        raise
    finally:
        if opened_here:
            source.close()
    if not written.all():  # an internal error, not the user's input: never an embedding with holes
        raise RuntimeError(f"biomask.embed: {int((~written).sum())} of {adata.n_obs} cells were not embedded")
    record = h5_safe(
        provenance(
            model,
            pooling=pooling,
            layer=layer,
            key=key,
            max_length=job.max_length,
            extra={
                "input": f"backed AnnData {Path(adata.filename).resolve()}"
                if opened_here
                else "in-memory AnnData",
                "matrix": matrix,
                **cells,
            },
        )
    )
    target = (
        (adata.to_memory() if getattr(adata, "isbacked", False) else adata.copy())
        if copy and not loaded
        else adata
    )
    target.obsm[key] = vectors
    target.uns[key] = record
    return target if copy else None


def read_cells(path: str | os.PathLike[str], *, matrix: str = "X") -> AnnData:
    """An AnnData of a 10x folder (matrix.mtx[.gz], features/genes, barcodes), a 10x .h5, a .loom or
    an .h5ad, read by the readers `biomask prep cells` uses (no loompy needed): X as CSR float32,
    obs and var as the file has them (for 10x, only gene-expression features). `matrix`: X, raw or
    layers/NAME of an .h5ad, or a loom layer. For files larger than memory, `biomask prep cells`
    streams them instead."""
    import anndata
    import scipy.sparse as sp

    from biomask.cells.readers import open_matrix

    source = open_matrix(path, matrix=matrix)
    try:
        blocks = [sp.csr_matrix(block, dtype=np.float32) for _, block in source.blocks(8192)]
        x = sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, source.n_vars), dtype=np.float32)
        return anndata.AnnData(x, obs=source.obs.copy(), var=source.var.copy())
    finally:
        source.close()
