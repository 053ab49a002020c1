"""The Python API for scanpy users: embed an in-memory AnnData with a portable checkpoint.

    import biomask, scanpy as sc
    biomask.embed(adata, "runs/pretrain/cells-tiny/model")     # adata.obsm["X_biomask"], adata.uns["biomask"]
    sc.pp.neighbors(adata, use_rep="X_biomask")
    sc.tl.umap(adata)
    sc.tl.leiden(adata, flavor="igraph", n_iterations=2, directed=False)

The cells are tokenized exactly as the checkpoint's pretraining corpus was (see biomask.cells.encode),
in chunks, and embedded on the GPU when there is one (CPU otherwise), without DeepSpeed.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from biomask.cells.config import CountsConfig
from biomask.errors import InputError

log = logging.getLogger(__name__)


def embed(
    adata: Any,
    checkpoint: str | os.PathLike,
    *,
    pooling: str = "mean",
    layer: int = -1,
    key: str = "X_biomask",
    matrix: str = "X",
    counts: CountsConfig | dict[str, Any] | None = None,
    gene_column: str | None = "auto",
    strip_version: bool = False,
    min_coverage: float = 0.5,
    batch_size: int = 64,
    chunk_size: int = 8192,
    device: str = "auto",
) -> Any:
    """Fill `adata.obsm[key]` (cells × d_model, float32) and `adata.uns["biomask"]` in place; returns
    `adata`. `matrix`: where the counts are (X, raw, layers/NAME); `counts`: the counts policy of
    `biomask prep cells` (e.g. `{"mode": "from_log1p", "total_counts_column": "n_counts"}`);
    `gene_column`: a var column with the gene identifiers, None for the var index, "auto" for the
    vocabulary's own identifier column when present. Bad input raises `biomask.errors.InputError`."""
    from biomask.cells.encode import CellEncoder, checkpoint_prep
    from biomask.cells.readers import from_anndata
    from biomask.embedding.anndata_io import h5_safe
    from biomask.embedding.inference import check_layer, embed_records, inference_max_length, pick_device
    from biomask.embedding.stage import provenance
    from biomask.models import load_pretrained

    if pooling not in ("cls", "mean"):
        raise InputError(f"pooling must be 'cls' or 'mean', not {pooling!r}")
    model = load_pretrained(checkpoint, device=pick_device(device))
    check_layer(model, layer)
    if model.config.modality != "cells":
        raise InputError(
            f"checkpoint {checkpoint} is a {model.config.modality} model; an AnnData of cells needs a cells checkpoint"
        )
    counts_cfg = counts if isinstance(counts, CountsConfig) else CountsConfig.model_validate(counts or {})
    prep = checkpoint_prep(checkpoint, model.checkpoint_info)
    encoder = CellEncoder(
        prep,
        counts=counts_cfg,
        gene_column=True if gene_column == "auto" else gene_column,
        strip_version=strip_version,
        min_coverage=min_coverage,
    )
    source = from_anndata(adata, matrix, name="AnnData")
    opened = encoder.open(source, min(chunk_size, 8192))
    max_length = inference_max_length(model)
    vectors = np.empty((adata.n_obs, model.config.d_model), dtype=np.float32)
    empty = 0
    for start, records, stats in encoder.blocks(opened, chunk_size):
        vectors[start : start + len(records)] = embed_records(
            model, records, pooling=pooling, layer=layer, batch_size=batch_size, max_length=max_length
        )
        empty += int(stats["cells_without_vocabulary_genes"])
    adata.obsm[key] = vectors
    adata.uns["biomask"] = h5_safe(
        provenance(
            model,
            pooling=pooling,
            layer=layer,
            key=key,
            max_length=max_length,
            extra={
                "input": "in-memory AnnData",
                "matrix": matrix,
                "counts_found": opened.summary.describe(),
                "gene_id_column": opened.gene_column or "var index",
                "gene_coverage": opened.coverage,
                "cells": int(adata.n_obs),
                "cells_without_vocabulary_genes": empty,
                "tokenization": prep.describe(),
            },
        )
    )
    return adata
