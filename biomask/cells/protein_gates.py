"""Cell types from surface proteins (CITE-seq antibody counts), gated as flow cytometry gates PBMCs.

A prep input with `task: protein-gates` is labelled this way: a labelled cell set whose labels never
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


def positive(adt: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Each marker's positive cells (one run's cells x proteins counts; columns named as MARKERS)."""
    from sklearn.mixture import GaussianMixture

    logged = np.log1p(adt[list(MARKERS)].to_numpy(dtype=np.float64))
    clr = logged - logged.mean(axis=0)
    calls = {}
    for j, marker in enumerate(MARKERS):
        x = clr[:, j : j + 1]
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


def protein_counts(path: Path, where: str) -> pd.DataFrame:
    """An h5ad's antibody counts (cells x proteins, columns by protein name without a "_TotalSeqB"
    style suffix): obsm["protein_expression"] as a DataFrame, or an array named by uns["protein_names"]."""
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
    adt.columns = [str(c).split("_")[0] for c in adt.columns]
    missing = [m for m in MARKERS if m not in adt.columns]
    if missing:
        raise InputError(
            f"{where}: task protein-gates needs the markers {', '.join(MARKERS)}; the proteins lack "
            f"{', '.join(missing)} (they have: {', '.join(adt.columns)})"
        )
    return adt


def protein_labels(path: Path, where: str, n_cells: int) -> np.ndarray:
    """Each cell's gated type (object array; None where no gate applies)."""
    adt = protein_counts(path, where)
    if len(adt) != n_cells:
        raise InputError(f"{where}: obsm[{OBSM_KEY!r}] has {len(adt)} rows for {n_cells} cells")
    return np.array([t or None for t in gate(positive(adt))], dtype=object)
