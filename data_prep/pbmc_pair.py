#!/usr/bin/env python
"""Two batches of PBMCs in one AnnData, and how well an embedding mixes them: the ARTIFICIAL pair of
docs/cell-models.md ("Several batches: model.batch_covariate").

    python data_prep/pbmc_pair.py build runs/data/pbmc_pair.h5ad
    python -c "import anndata, biomask, numpy; a = anndata.read_h5ad('runs/data/pbmc_pair.h5ad'); \
        biomask.fit_cells(a, 'runs/pair-batch', batch_key='batch'); numpy.save('b.npy', a.obsm['X_biomask'])"
    python data_prep/pbmc_pair.py score runs/data/pbmc_pair.h5ad b.npy [more.npy ...]

`build`: pbmc3k with its derived labels (pbmc3k_labels.py) and pbmc68k_reduced with counts rebuilt
from `.raw` (log1p of counts per 10k) and `n_counts`, `bulk_labels` mapped to pbmc3k's coarse types,
inner join on the shared genes; `obs["batch"]` names the set, `obs["cell_type"]` the type.
`score`: per embedding, JSON with mixing (other-set share of the 15 nearest neighbours over the types
both sets have, relative to random mixing within each type), label transfer (pbmc68k cells typed by
their 15 nearest pbmc3k cells) and Leiden ARI within each set and over both.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import _h5ad_output

COARSE = {
    "CD14+ Monocyte": "CD14 Mono",
    "CD19+ B": "B",
    "CD4+/CD25 T Reg": "CD4 T",
    "CD4+/CD45RA+/CD25- Naive T": "CD4 T",
    "CD4+/CD45RO+ Memory": "CD4 T",
    "CD8+ Cytotoxic T": "CD8 T",
    "CD8+/CD45RA+ Naive Cytotoxic": "CD8 T",
    "CD56+ NK": "NK",
    "Dendritic": "DC",
    "CD34+": "CD34",  # no counterpart in pbmc3k
}
SHARED = ["CD4 T", "CD8 T", "B", "NK", "CD14 Mono", "DC"]


def build(output: Path) -> None:
    import anndata as ad
    import numpy as np
    import scipy.sparse as sp

    from biomask.datasets import fetch

    sys.path.insert(0, str(Path(__file__).parent))
    from pbmc3k_labels import derive

    with tempfile.TemporaryDirectory() as tmp:
        derive(Path(tmp) / "pbmc3k.h5ad")
        a3 = ad.read_h5ad(Path(tmp) / "pbmc3k.h5ad")
    p = ad.read_h5ad(fetch("pbmc68k_reduced"))
    raw = p.raw.to_adata()
    logged = raw.X.toarray() if sp.issparse(raw.X) else np.asarray(raw.X)
    counts = np.round(np.expm1(logged) * p.obs["n_counts"].to_numpy()[:, None] / 1e4).astype(np.float32)
    a68 = ad.AnnData(sp.csr_matrix(counts), obs=p.obs[["bulk_labels"]].copy(), var=raw.var[[]].copy())
    a68.obs["cell_type"] = a68.obs["bulk_labels"].map(COARSE).astype(str)
    a3.X = sp.csr_matrix(a3.X)
    genes = a68.var_names.intersection(a3.var_names)
    pair = ad.concat(
        [a3[:, genes].copy(), a68[:, genes].copy()],
        join="inner",
        label="batch",
        keys=["pbmc3k", "pbmc68k"],
        index_unique="-",
    )
    pair.obs = pair.obs[["batch", "cell_type"]]
    _h5ad_output.write(pair, output, "pbmc_pair.py")
    print(f"{pair.n_obs} cells, {pair.n_vars} genes -> {output}")


def score(pair_path: Path, embedding) -> dict[str, float]:
    import anndata as ad
    import numpy as np
    import scanpy as sc
    from sklearn.metrics import adjusted_rand_score
    from sklearn.neighbors import NearestNeighbors

    pair = ad.read_h5ad(pair_path)
    batch = (pair.obs["batch"] == "pbmc68k").to_numpy().astype(int)
    labels = pair.obs["cell_type"].astype(str).to_numpy()
    shared = np.isin(labels, SHARED)
    neighbours = (
        NearestNeighbors(n_neighbors=16).fit(embedding).kneighbors(embedding, return_distance=False)[:, 1:]
    )
    other = (batch[neighbours] != batch[:, None]).mean(1)
    expected = np.array([np.mean(batch[labels == t] != b) for t, b in zip(labels, batch)])
    ref = NearestNeighbors(n_neighbors=15).fit(embedding[batch == 0])
    votes = labels[batch == 0][ref.kneighbors(embedding[batch == 1], return_distance=False)]
    predicted = np.array([max(set(v), key=list(v).count) for v in votes])
    query = shared[batch == 1]
    out = {
        "mixing": float(other[shared].mean() / expected[shared].mean()),
        "label_transfer": float((predicted[query] == labels[batch == 1][query]).mean()),
    }
    for name, rows in (("ari_pbmc3k", batch == 0), ("ari_pbmc68k", batch == 1), ("ari_both", batch >= 0)):
        graph = ad.AnnData(embedding[rows])
        sc.pp.neighbors(graph, use_rep="X", n_neighbors=15)
        sc.tl.leiden(graph, flavor="igraph", n_iterations=2, directed=False, random_state=0)
        out[name] = float(adjusted_rand_score(labels[rows], graph.obs["leiden"]))
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    _h5ad_output.output_argument(commands.add_parser("build", help="write the pair of sets"))
    scoring = commands.add_parser("score", help="score embeddings (.npy) of the pair")
    scoring.add_argument("pair", type=Path)
    scoring.add_argument("embeddings", nargs="+", type=Path)
    args = parser.parse_args()
    if args.command == "build":
        _h5ad_output.check(args.output, "pbmc_pair.py")
        build(args.output)
    else:
        import numpy as np

        for path in args.embeddings:
            print(json.dumps({"embedding": str(path), **score(args.pair, np.load(path))}))
