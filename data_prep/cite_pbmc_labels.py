#!/usr/bin/env python
"""The two 10x PBMC CITE-seq subsets (registry: pbmc5k-cite-200, pbmc10k-cite-200) as one labelled
AnnData, each cell typed by its surface proteins (biomask.cells.protein_gates): for scanpy, or any
tool that wants the labels in obs.

    python data_prep/cite_pbmc_labels.py runs/data/pbmc_cite_labelled.h5ad

Writes raw RNA counts over the genes both subsets hold, `obs["cell_type"]` (CD4 T, CD8 T, B, NK,
CD14 Mono), `obs["donor"]` (pbmc5k / pbmc10k: two donors, two runs) and each marker's call in
`obs["<marker>+"]`. Cells no gate takes, and types with fewer than MIN_CELLS cells, are left out —
what `biomask prep cells` does with `task: protein-gates`, `labels.missing: drop` and
`labels.min_cells: 10` (the main job's `prep_cite`), which needs no file in between.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import _h5ad_output

DONORS = {"pbmc5k": "pbmc5k-cite-200", "pbmc10k": "pbmc10k-cite-200"}
MIN_CELLS = 10  # FCGR3A Mono (5 cells) cannot sit in every split's training and test part


def derive(output: Path) -> None:
    import anndata as ad
    import pandas as pd

    from biomask.cells.protein_gates import MARKERS, gate, positive, protein_counts
    from biomask.datasets import fetch

    parts = []
    for donor, name in DONORS.items():
        path = fetch(name)
        adata = ad.read_h5ad(path)
        calls = positive(protein_counts(path, name))
        part = ad.AnnData(
            X=adata.X, obs=pd.DataFrame(index=adata.obs_names), var=pd.DataFrame(index=adata.var_names)
        )
        part.obs["cell_type"] = gate(calls)
        part.obs["donor"] = donor
        for marker in MARKERS:
            part.obs[f"{marker}+"] = calls[marker].to_numpy()
        part.obs_names = [f"{donor}:{b}" for b in part.obs_names]
        parts.append(part[part.obs["cell_type"] != ""].copy())
    out = ad.concat(parts, join="inner")  # the genes both runs hold
    sizes = out.obs["cell_type"].value_counts()
    out = out[out.obs["cell_type"].isin(sizes.index[sizes >= MIN_CELLS])].copy()
    _h5ad_output.write(out, output, "cite_pbmc_labels.py")
    print(pd.crosstab(out.obs["cell_type"], out.obs["donor"], margins=True).to_string())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _h5ad_output.output_argument(parser)
    output = parser.parse_args().output
    _h5ad_output.check(output, "cite_pbmc_labels.py")
    derive(output)
