"""What scanpy users read off an embedding: a kNN classifier and Leiden clusters against the labels.

- `knn_predict`: a k-nearest-neighbour vote (Euclidean, k = 15, fitted on the training cells only) —
  the `knn` protocol's test predictions, so it sits in the same table as the probes.
- `cluster_scores`: `sc.pp.neighbors(use_rep=...)` + `sc.tl.leiden` (igraph, resolution 1) on every
  labelled record, scored against the labels with the adjusted Rand index and normalised mutual
  information — exactly what a user does with `X_biomask` (README: "The embeddings in scanpy"). The
  labels never enter the clustering; the seed only sets Leiden's and the neighbour search's RNG.
  Also at the resolution that suits the representation (`cluster_*_best`): scIB's protocol (Luecken et
  al. 2022), Leiden over a grid of resolutions on the same graph, the one with the highest NMI kept.
  One fixed resolution favours representations whose graph happens to split into about as many
  clusters as there are labels; the grid lets each be judged at its own scale (the labels choose the
  resolution, for every representation alike, PCA's included).

Both run on the representation as it is (no standardisation), the way scanpy uses `obsm` keys; the
expression baselines use what scanpy users compute: PCA coordinates (`X_pca`) or the log-normalised
genes themselves.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.neighbors import KNeighborsClassifier

N_NEIGHBORS = 15
RESOLUTION = 1.0
RESOLUTIONS = (0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0)  # scIB's range, every other step
# per-seed row fields, summarised like the classification metrics
METRICS = ("cluster_ari", "cluster_nmi", "cluster_ari_best", "cluster_nmi_best")


def knn_predict(
    x: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray, k: int = N_NEIGHBORS
) -> np.ndarray:
    """Test predictions of a k-nearest-neighbour vote among the training records."""
    model = KNeighborsClassifier(n_neighbors=min(k, len(train)))
    return model.fit(x[train], labels[train]).predict(x[test])


def cluster_scores(x: np.ndarray, labels: np.ndarray, seed: int) -> dict[str, float]:
    """Leiden clusters of the kNN graph of `x` (all records) against `labels`: ARI, NMI and cluster
    count at resolution 1, and ARI / NMI at the grid resolution with the best NMI (`*_best`)."""
    import anndata as ad
    import scanpy as sc

    adata = ad.AnnData(X=np.zeros((len(x), 0), dtype=np.float32))
    adata.obsm["X_rep"] = np.asarray(x, dtype=np.float32)
    n_neighbors = max(2, min(N_NEIGHBORS, len(x) - 1))
    found: dict[float, tuple[float, float, int]] = {}
    with warnings.catch_warnings():  # scanpy's notes on defaults that will change; not the user's concern
        warnings.simplefilter("ignore")
        sc.pp.neighbors(adata, n_neighbors=n_neighbors, use_rep="X_rep", random_state=seed)
        for resolution in sorted({RESOLUTION, *RESOLUTIONS}):
            sc.tl.leiden(
                adata,
                resolution=resolution,
                flavor="igraph",
                n_iterations=2,
                directed=False,
                random_state=seed,
            )
            clusters = adata.obs["leiden"].to_numpy()
            found[resolution] = (
                float(adjusted_rand_score(labels, clusters)),
                float(normalized_mutual_info_score(labels, clusters)),
                len(set(clusters)),
            )
    best = max(RESOLUTIONS, key=lambda r: (found[r][1], -abs(r - RESOLUTION)))  # ties: nearest to 1
    ari, nmi, n_clusters = found[RESOLUTION]
    return {
        "cluster_ari": ari,
        "cluster_nmi": nmi,
        "n_clusters": n_clusters,
        "cluster_ari_best": found[best][0],
        "cluster_nmi_best": found[best][1],
        "best_resolution": best,
    }
