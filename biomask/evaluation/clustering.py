"""What scanpy users read off an embedding: a kNN classifier and Leiden clusters against the labels.

- `knn_predict`: a k-nearest-neighbour vote (Euclidean, k = 15, fitted on the training cells only) —
  the `knn` protocol's test predictions, so it sits in the same table as the probes.
- `cluster_scores`: `sc.pp.neighbors(use_rep=...)` + `sc.tl.leiden` (igraph, resolution 1) on every
  labelled record, scored against the labels with the adjusted Rand index and normalised mutual
  information — exactly what a user does with `X_biomask` (README: "The embeddings in scanpy"). The
  labels never enter the clustering; the seed only sets Leiden's and the neighbour search's RNG.

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
METRICS = ("cluster_ari", "cluster_nmi")  # per-seed row fields, summarised like the classification metrics


def knn_predict(
    x: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray, k: int = N_NEIGHBORS
) -> np.ndarray:
    """Test predictions of a k-nearest-neighbour vote among the training records."""
    model = KNeighborsClassifier(n_neighbors=min(k, len(train)))
    return model.fit(x[train], labels[train]).predict(x[test])


def cluster_scores(x: np.ndarray, labels: np.ndarray, seed: int) -> dict[str, float]:
    """Leiden clusters of the kNN graph of `x` (all records) against `labels`: ARI, NMI, cluster count."""
    import anndata as ad
    import scanpy as sc

    adata = ad.AnnData(X=np.zeros((len(x), 0), dtype=np.float32))
    adata.obsm["X_rep"] = np.asarray(x, dtype=np.float32)
    n_neighbors = max(2, min(N_NEIGHBORS, len(x) - 1))
    with warnings.catch_warnings():  # scanpy's notes on defaults that will change; not the user's concern
        warnings.simplefilter("ignore")
        sc.pp.neighbors(adata, n_neighbors=n_neighbors, use_rep="X_rep", random_state=seed)
        sc.tl.leiden(
            adata, resolution=RESOLUTION, flavor="igraph", n_iterations=2, directed=False, random_state=seed
        )
    clusters = adata.obs["leiden"].to_numpy()
    return {
        "cluster_ari": float(adjusted_rand_score(labels, clusters)),
        "cluster_nmi": float(normalized_mutual_info_score(labels, clusters)),
        "n_clusters": len(set(clusters)),
    }
