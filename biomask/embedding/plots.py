"""The UMAP PNG of an embedding, coloured by an obs column (scanpy's neighbors + umap on a sample)."""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from biomask.agg import subplots
from biomask.neighbors import neighbors
from biomask.store import label_order, label_strings

log = logging.getLogger(__name__)

MAX_INTEGER_CLASSES = 50
MAX_LEGEND = 60  # classes named in the legend; more are coloured without one


def umap_png(
    vectors: np.ndarray, colour: pd.Series, path: Path, *, title: str, max_cells: int = 50_000, seed: int = 0
) -> dict[str, int]:
    """Write a UMAP of `vectors` coloured by `colour` to `path`; a seeded sample above `max_cells`."""
    import anndata
    import scanpy as sc

    n = vectors.shape[0]
    chosen = np.arange(n)
    if n > max_cells:
        chosen = np.sort(np.random.default_rng(seed).choice(n, size=max_cells, replace=False))
    obs = pd.DataFrame({colour.name: colour.iloc[chosen].to_numpy()}, index=[str(i) for i in chosen])
    obs[colour.name] = plot_colours(obs[colour.name])
    adata = anndata.AnnData(obs=obs, obsm={"X_emb": np.asarray(vectors[chosen], dtype=np.float32)})
    neighbors(adata, use_rep="X_emb", n_neighbors=min(15, max(2, len(chosen) - 1)), random_state=seed)
    sc.tl.umap(adata, random_state=seed)
    # the title replaces scanpy's own (the column name), so it names the column itself
    title = f"{title} · colour: {colour.name}"
    if len(chosen) < n:
        title += f" · {len(chosen):,} of {n:,} cells"
    fig, ax = subplots(figsize=(6, 5), dpi=120)  # a figure of its own, not pyplot's (biomask.agg)
    classes = adata.obs[colour.name]
    many = isinstance(classes.dtype, pd.CategoricalDtype) and len(classes.cat.categories) > MAX_LEGEND
    if (
        many
    ):  # a legend of hundreds of entries (cell barcodes) would be a picture many times the plot's height
        title += f" · {len(classes.cat.categories):,} classes, no legend"
    import warnings

    import matplotlib.pyplot as plt  # importing it switches no backend; scanpy's colour bar uses it

    open_before = set(plt.get_fignums())
    try:
        with warnings.catch_warnings():  # scanpy puts a colour scale's bar on our figure through pyplot
            warnings.filterwarnings("ignore", message="Adding colorbar to a different Figure")
            sc.pl.umap(
                adata,
                color=colour.name,
                ax=ax,
                show=False,
                title=title,
                legend_loc=None if many else "right margin",
            )
    finally:  # the empty one pyplot made (a notebook shows it); the caller's own figures stay open
        for number in set(plt.get_fignums()) - open_before:
            plt.close(number)
    fig.tight_layout()
    fit_title(ax, title)
    # "tight": the legend (outside the axes, on the right) and the title are never cut by the canvas
    fig.savefig(path, format="png", bbox_inches="tight")
    return {"cells_plotted": len(chosen), "cells": n}


def plot_colours(values: pd.Series) -> pd.Series:
    """An obs column as scanpy should colour it: labels, and integer ids with few values (clusters;
    also stored as floats because of a NaN), are classes named and ordered as `prep` names them, not
    a scale; a missing label (NaN, or a written "nan") is greyed out as "NA", not a class."""
    if pd.api.types.is_numeric_dtype(values) and not isinstance(values.dtype, pd.CategoricalDtype):
        present = values.dropna().to_numpy(dtype=float)
        ids = np.all(np.isfinite(present)) and np.all(present == np.round(present))
        if not ids or values.nunique() > MAX_INTEGER_CLASSES:
            return values  # a measurement: a colour scale
    strings, missing = label_strings(values)
    names = np.where(missing, None, strings)
    categories = label_order(set(strings[~missing]))
    return pd.Series(pd.Categorical(names, categories=categories), index=values.index, name=values.name)


def fit_title(ax: Any, title: str) -> None:
    """Wrap the axes title until it lies inside the figure: a title centred over axes that the legend
    pushed left would otherwise run off the left edge, hiding its start (e.g. a long checkpoint path)."""
    fig = ax.figure
    text = ax.set_title(title)
    renderer = fig.canvas.get_renderer()
    width = len(title)
    while width > 12:
        box = text.get_window_extent(renderer)
        if box.x0 >= 0 and box.x1 <= fig.bbox.width:
            return
        width = int(width * 0.8)
        text.set_text("\n".join(textwrap.wrap(title, width, break_on_hyphens=False)))
