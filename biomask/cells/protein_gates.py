"""Cell types from surface proteins (CITE-seq antibody counts), gated as flow cytometry gates PBMCs.

A prep input with `task: protein-gates` is labelled this way (an h5ad with the counts in
obsm["protein_expression"], or Cell Ranger's folder or .h5 with its "Antibody Capture" features): a labelled cell set whose labels never
looked at the RNA the models read. Labels made from the RNA itself (Leiden clusters of a PCA graph,
annotated by marker genes: data_prep/pbmc3k_labels.py) favour the representation they were made
with; a protein call is made per cell, from counts no expression model sees.

Per input (one run: antibody titrations differ between runs), each marker's log1p counts are
centred across cells (a CLR over cells) and split by a two-component Gaussian mixture; the upper
component is "positive". The gates: one lineage marker of CD3 / CD19 / CD14, then CD3+ → CD4 T or
CD8 T by CD4 / CD8a (not both); CD19+ → B; CD14+ → CD14 Mono; none of the three → NK (CD56+) or
FCGR3A Mono (CD16+, CD56−). Cells no gate takes (two lineages: doublets; double-negative T cells;
none of the markers) get no label. Measured on the registry's two 10x PBMC CITE-seq subsets: every
marker bimodal in both runs, and each type's RNA marker highest in its own type
(tests/test_cite_labels.py; docs/cell-models.md, "A third set").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from biomask.errors import InputError

MARKERS = ("CD3", "CD4", "CD8a", "CD14", "CD16", "CD19", "CD56")
OBSM_KEY = "protein_expression"  # scvi-tools' and totalVI's convention
NAMES_KEY = "protein_names"  # uns: the columns' protein names, when obsm holds an array


MIN_CELLS = 20  # a two-component mixture of fewer cells' counts is no gate


def positive(adt: pd.DataFrame, seed: int = 0, where: str = "the input") -> pd.DataFrame:
    """Each marker's positive cells (one run's cells x proteins counts; columns named as MARKERS)."""
    from sklearn.mixture import GaussianMixture

    if len(adt) < MIN_CELLS:
        raise InputError(
            f"{where}: {len(adt)} cells are too few to gate their proteins (task protein-gates needs {MIN_CELLS})"
        )
    logged = np.log1p(adt[list(MARKERS)].to_numpy(dtype=np.float64))
    clr = logged - logged.mean(axis=0)
    calls = {}
    for j, marker in enumerate(MARKERS):
        x = clr[:, j : j + 1]
        if np.unique(x).size < 2:  # an antibody that stained nothing (or everything) splits no one
            raise InputError(
                f"{where}: {marker} has the same count in every cell, so task protein-gates cannot split its "
                "positive cells from the negative ones; is it the right protein column?"
            )
        mixture = GaussianMixture(2, random_state=seed).fit(x)
        calls[marker] = mixture.predict(x) == int(np.argmax(mixture.means_.ravel()))
    return pd.DataFrame(calls, index=adt.index)


def gate(calls: pd.DataFrame) -> list[str]:
    """The module docstring's gates on per-marker calls; "" where none applies."""
    types = []
    for _, c in calls.iterrows():
        lineage = int(c["CD3"]) + int(c["CD19"]) + int(c["CD14"])
        if lineage > 1:
            t = ""
        elif c["CD3"]:
            t = "CD8 T" if c["CD8a"] and not c["CD4"] else "CD4 T" if c["CD4"] and not c["CD8a"] else ""
        elif c["CD19"]:
            t = "B"
        elif c["CD14"]:
            t = "CD14 Mono"
        elif c["CD56"]:
            t = "NK"
        elif c["CD16"]:
            t = "FCGR3A Mono"
        else:
            t = ""
        types.append(t)
    return types


def protein_counts(path: Path, where: str, fmt: str = "h5ad") -> pd.DataFrame:
    """An input's antibody counts (cells x proteins, columns by protein name without a "_TotalSeqB"
    style suffix, rows in the input's cell order). h5ad: obsm["protein_expression"] as a DataFrame, or
    an array named by uns["protein_names"]; Cell Ranger's folder or .h5 (10x_mtx, 10x_h5): its
    "Antibody Capture" features."""
    if fmt in ("10x_mtx", "10x_h5"):
        adt = _tenx_mtx_proteins(path, where) if fmt == "10x_mtx" else _tenx_h5_proteins(path, where)
        return _named(adt, where)
    if fmt != "h5ad":
        raise InputError(
            f"{where}: task protein-gates reads an h5ad's obsm or a 10x input's antibodies; this input is {fmt}"
        )
    import warnings

    import anndata as ad

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata's notes about converting an old layout
        adata = ad.read_h5ad(path, backed="r")  # obsm and uns in memory, the expression left on disk
    try:
        if OBSM_KEY not in adata.obsm:
            raise InputError(
                f"{where}: task protein-gates needs surface-protein counts in obsm[{OBSM_KEY!r}] (CITE-seq "
                f"antibody counts); this file has obsm keys: {', '.join(adata.obsm.keys()) or 'none'}"
            )
        stored = adata.obsm[OBSM_KEY]
        names = adata.uns.get(NAMES_KEY)
    finally:
        adata.file.close()
    if isinstance(stored, pd.DataFrame):
        adt = stored
    elif names is not None and len(names) == np.shape(stored)[1]:
        adt = pd.DataFrame(np.asarray(stored), columns=[str(n) for n in names])
    else:
        raise InputError(
            f"{where}: obsm[{OBSM_KEY!r}] is an array and uns[{NAMES_KEY!r}] does not name its "
            f"{np.shape(stored)[1]} columns: store the proteins as a DataFrame or their names in uns"
        )
    return _named(adt, where)


# Antibody panels spell markers their own way ("CD8a_TotalSeqB", "CD8A", "CD8"): matched without case
# or suffix, and CD8 (the antibody targets CD8α) as CD8a
ALIASES = {"cd8": "CD8a"}


def _named(adt: pd.DataFrame, where: str) -> pd.DataFrame:
    canonical = {m.lower(): m for m in MARKERS} | ALIASES
    stems = [str(c).split("_")[0] for c in adt.columns]
    adt.columns = [canonical.get(stem.lower(), stem) for stem in stems]
    adt = adt.loc[:, ~adt.columns.duplicated()]  # the first of a marker measured twice
    missing = [m for m in MARKERS if m not in adt.columns]
    if missing:
        raise InputError(
            f"{where}: task protein-gates needs the markers {', '.join(MARKERS)}; the proteins lack "
            f"{', '.join(missing)} (they have: {', '.join(adt.columns) or 'none'})"
        )
    return adt


ANTIBODY = "Antibody Capture"  # Cell Ranger's feature type of antibody-derived tags


def _antibodies(types: np.ndarray, where: str) -> np.ndarray:
    rows = np.flatnonzero(types == ANTIBODY)
    if rows.size == 0:
        raise InputError(
            f"{where}: task protein-gates needs antibody counts, and this 10x input has no {ANTIBODY!r} "
            f"features (its feature types: {', '.join(sorted(set(types.tolist()))) or 'none'})"
        )
    return rows


def _tenx_mtx_proteins(path: Path, where: str) -> pd.DataFrame:
    """The antibody rows of a Cell Ranger folder's matrix.mtx, read in blocks (the file is as large as
    the expression it holds)."""
    from biomask.cells.formats import mtx_files
    from biomask.cells.mtx import MtxReader

    values, features, barcodes = mtx_files(path)
    table = pd.read_csv(features, sep="\t", header=None, dtype=str, keep_default_na=False)
    if table.shape[1] < 3:
        raise InputError(
            f"{where}: {features.name} has no feature-type column, so no antibodies (Cell Ranger 2)"
        )
    rows = _antibodies(table[2].to_numpy(), where)
    n_cells = len(pd.read_csv(barcodes, sep="\t", header=None, dtype=str))
    column = np.full(len(table), -1, dtype=np.int64)
    column[rows] = np.arange(rows.size)
    counts = np.zeros((n_cells, rows.size))
    with MtxReader(values) as mtx:
        for features_at, cells, data in mtx.entries():
            j = column[features_at]
            hit = j >= 0
            np.add.at(counts, (cells[hit], j[hit]), data[hit])
    return pd.DataFrame(counts, columns=table[1].to_numpy()[rows])


def _tenx_h5_proteins(path: Path, where: str, block: int = 8192) -> pd.DataFrame:
    """The antibody rows of a Cell Ranger (>= 3) .h5, read barcode block by barcode block."""
    import h5py

    from biomask.cells.readers import _strings

    with h5py.File(path, "r") as handle:
        if "matrix" not in handle:
            raise InputError(f"{where}: a Cell Ranger 2 .h5 holds no feature types, so no antibodies")
        group = handle["matrix"]
        types, names = _strings(group["features/feature_type"][:]), _strings(group["features/name"][:])
        rows = _antibodies(types, where)
        column = np.full(types.size, -1, dtype=np.int64)
        column[rows] = np.arange(rows.size)
        indptr = group["indptr"][:]
        n_cells = indptr.size - 1
        counts = np.zeros((n_cells, rows.size))
        for start in range(0, n_cells, block):
            stop = min(start + block, n_cells)
            lo, hi = int(indptr[start]), int(indptr[stop])
            j = column[group["indices"][lo:hi]]
            cells = np.repeat(np.arange(start, stop), np.diff(indptr[start : stop + 1]))
            hit = j >= 0
            np.add.at(counts, (cells[hit], j[hit]), group["data"][lo:hi][hit])
    return pd.DataFrame(counts, columns=names[rows])


def protein_labels(path: Path, where: str, n_cells: int, fmt: str = "h5ad") -> np.ndarray:
    """Each cell's gated type (object array; None where no gate applies)."""
    adt = protein_counts(path, where, fmt)
    if len(adt) != n_cells:
        raise InputError(f"{where}: the protein counts have {len(adt)} rows for {n_cells} cells")
    return np.array([t or None for t in gate(positive(adt, where=where))], dtype=object)
