#!/usr/bin/env python
"""Cell-type labels for pbmc3k, derived as scanpy's PBMC tutorial derives them: the second labelled
cell set of docs/cell-models.md ("A second set: pbmc3k with derived labels").

    python data_prep/pbmc3k_labels.py runs/data/pbmc3k_labelled.h5ad

Writes an .h5ad of raw counts (the tutorial's QC: 2,638 cells) with `obs["cell_type"]` (8 types) and
`obs["leiden"]`. The labels come from Leiden clusters of a PCA graph annotated by marker genes, so
they favour PCA on clustering; say so wherever they are used. Then, as any labelled cells:
`biomask prep cells` with `labels.column: cell_type`, pretrain, evaluate.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import _h5ad_output

# Marker genes of each type (the tutorial's): a cluster takes the type whose markers score highest.
MARKERS = {
    "CD4 T": ["IL7R", "CD3D", "LDHB"],
    "CD8 T": ["CD8A", "CD8B", "CD3D"],
    "NK": ["GNLY", "NKG7", "GZMB"],
    "B": ["MS4A1", "CD79A", "CD79B"],
    "CD14 Mono": ["CD14", "LYZ", "S100A8"],
    "FCGR3A Mono": ["FCGR3A", "MS4A7"],
    "DC": ["FCER1A", "CST3"],
    "Megakaryocyte": ["PPBP", "PF4"],
}
RESOLUTION = 1.2  # chosen on the markers (one cluster per type or finer), never on biomask output


def derive(output: Path) -> None:
    import anndata as ad
    import scanpy as sc

    from biomask.datasets import fetch

    adata = ad.read_h5ad(fetch("pbmc3k"))
    adata.var_names_make_unique()
    sc.pp.filter_cells(adata, min_genes=200)
    sc.pp.filter_genes(adata, min_cells=3)
    adata.var["mt"] = adata.var_names.str.startswith("MT-")
    sc.pp.calculate_qc_metrics(adata, qc_vars=["mt"], percent_top=None, log1p=False, inplace=True)
    adata = adata[(adata.obs.n_genes_by_counts < 2500) & (adata.obs.pct_counts_mt < 5)].copy()
    counts = adata.X.copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    adata.raw = adata
    sc.pp.highly_variable_genes(adata, min_mean=0.0125, max_mean=3, min_disp=0.5)
    hvg = adata[:, adata.var.highly_variable].copy()
    sc.pp.scale(hvg, max_value=10)
    sc.tl.pca(hvg, n_comps=50, svd_solver="arpack", random_state=0)
    sc.pp.neighbors(hvg, n_neighbors=10, n_pcs=40, random_state=0)
    sc.tl.leiden(hvg, resolution=RESOLUTION, flavor="igraph", n_iterations=2, directed=False, random_state=0)
    for cell_type, genes in MARKERS.items():
        sc.tl.score_genes(adata, genes, score_name=f"s_{cell_type}", use_raw=True, random_state=0)
    adata.obs["leiden"] = hvg.obs["leiden"].values
    scores = adata.obs.groupby("leiden", observed=True)[[f"s_{t}" for t in MARKERS]].mean()
    scores.columns = list(MARKERS)
    annotation = ((scores - scores.mean()) / scores.std()).idxmax(axis=1)  # each cluster's most specific type
    adata.obs["cell_type"] = adata.obs["leiden"].map(annotation).astype(str)
    out = ad.AnnData(
        X=counts, obs=adata.obs[["leiden", "cell_type"]].copy(), var=adata.var[["gene_ids"]].copy()
    )
    out.obs["leiden"] = out.obs["leiden"].astype(str)
    _h5ad_output.write(out, output, "pbmc3k_labels.py")
    print(out.obs["cell_type"].value_counts().to_string())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _h5ad_output.output_argument(parser)
    output = parser.parse_args().output
    _h5ad_output.check(output, "pbmc3k_labels.py")
    derive(output)
