"""The UMAP PNG of an embedding, coloured by an obs column (scanpy's neighbors + umap on a sample)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)


def umap_png(
    vectors: np.ndarray, colour: pd.Series, path: Path, *, title: str, max_cells: int = 50_000, seed: int = 0
) -> dict[str, int]:
    """Write a UMAP of `vectors` coloured by `colour` to `path`; a seeded sample above `max_cells`."""
    import anndata
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc

    n = vectors.shape[0]
    chosen = np.arange(n)
    if n > max_cells:
        chosen = np.sort(np.random.default_rng(seed).choice(n, size=max_cells, replace=False))
    obs = pd.DataFrame({colour.name: colour.iloc[chosen].to_numpy()}, index=[str(i) for i in chosen])
    if not pd.api.types.is_numeric_dtype(obs[colour.name]):
        obs[colour.name] = obs[colour.name].astype(str).astype("category")
    adata = anndata.AnnData(obs=obs, obsm={"X_emb": np.asarray(vectors[chosen], dtype=np.float32)})
    sc.pp.neighbors(adata, use_rep="X_emb", n_neighbors=min(15, max(2, len(chosen) - 1)), random_state=seed)
    sc.tl.umap(adata, random_state=seed)
    fig, ax = plt.subplots(figsize=(6, 5), dpi=120)
    sc.pl.umap(adata, color=colour.name, ax=ax, show=False, title=title)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return {"cells_plotted": len(chosen), "cells": n}
