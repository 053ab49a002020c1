"""What scanpy users read off an embedding: a kNN classifier and Leiden clusters against the labels.

- `knn_predict`: a k-nearest-neighbour vote (Euclidean, k = 15, fitted on the training cells only) —
  the `knn` protocol's test predictions, so it sits in the same table as the probes.
- `cluster_scores`: `sc.pp.neighbors(use_rep=...)` + `sc.tl.leiden` (igraph, resolution 1) on every
  labelled record, scored against the labels with the adjusted Rand index and normalised mutual
  information — exactly what a user does with `X_biomask` (README: "The embeddings in scanpy"). The
  labels never enter the clustering; the seed only sets Leiden's and the neighbour search's RNG.
  Also at the resolution that suits the representation (`cluster_*_best`): scIB's protocol (Luecken et
  al. 2022), Leiden at resolutions 0.1, 0.2, ..., 2.0 on the same graph, the one with the highest NMI
  kept (the lowest of equals, as scIB keeps it).
  One fixed resolution favours representations whose graph happens to split into about as many
  clusters as there are labels; the grid lets each be judged at its own scale (the labels choose the
  resolution, for every representation alike, PCA's included).

With a store prepared with a `batch_column` (several samples), `batch_scores` adds how well the
representation mixes them (`batch_mixing`: the other batches' share of each cell's 15 nearest
neighbours, among the cells of labels several batches have, divided by that share if the batches
were mixed at random within each label — 1 is mixed, 0 apart) and whether a cell's label can be read
off the other batches' cells (`cross_batch_accuracy`: a 15-nearest-neighbour vote among them alone).
Mixing rewards removing what tells batches apart; the accuracy (and ARI) checks that cell types were
not removed with it.

Both run on the representation as it is (no standardisation), the way scanpy uses `obsm` keys; the
expression baselines use what scanpy users compute: PCA coordinates (`X_pca`) or the log-normalised
genes themselves.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.neighbors import KNeighborsClassifier

from biomask.neighbors import neighbors

log = logging.getLogger(__name__)

N_NEIGHBORS = 15
SAY_FROM = 20_000  # records from which the graph and each Leiden are said (minutes each at 100,000)
RESOLUTION = 1.0
# scIB's grid (scib.metrics.cluster_optimal_resolution's default, get_resolutions(n=20): 0.1 to 2.0
# by 0.1), the first maximum kept as scIB keeps it. Until late on 2026-12-07 every other step, the
# one nearest 1 kept: models whose clusters match the labels best at 0.1 were judged at 0.2 (README)
RESOLUTIONS = tuple(round(0.1 * step, 1) for step in range(1, 21))
BEST_BY = "NMI against the labels, the lowest resolution of the highest NMI (scIB)"
LEIDEN_FLAVOR, LEIDEN_ITERATIONS = "igraph", 2  # the flavour and iterations scanpy recommends
# per-seed row fields, summarised like the classification metrics
METRICS = ("cluster_ari", "cluster_nmi", "cluster_ari_best", "cluster_nmi_best")
BATCH_METRICS = ("batch_mixing", "cross_batch_accuracy")  # with a store's batches


def knn_predict(
    x: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray, k: int = N_NEIGHBORS
) -> np.ndarray:
    """Test predictions of a k-nearest-neighbour vote among the training records."""
    model = KNeighborsClassifier(n_neighbors=min(k, len(train)))
    return model.fit(x[train], labels[train]).predict(x[test])


def batch_scores(x: np.ndarray, labels: np.ndarray, batches: np.ndarray) -> dict[str, float]:
    """`batch_mixing` and `cross_batch_accuracy` (module docstring) over the records whose label
    occurs in at least two batches; {} when no label does."""
    from sklearn.neighbors import NearestNeighbors

    x = np.asarray(x, dtype=np.float32)
    shared = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        rows = labels == label
        shared |= rows & (np.unique(batches[rows]).size >= 2)
    if not shared.any():
        return {}
    k = max(1, min(N_NEIGHBORS, len(x) - 1))
    neighbours = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x, return_distance=False)[:, 1:]
    other = (batches[neighbours] != batches[:, None]).mean(axis=1)
    # each record's share of its label's records in other batches: counted once per (label, batch),
    # not by a scan of every record per record (quadratic: 18 s at 80,000 records, ~45 min at 1 M)
    _, label_code = np.unique(labels, return_inverse=True)
    _, batch_code = np.unique(batches, return_inverse=True)
    pair = label_code * (int(batch_code.max()) + 1) + batch_code
    expected = 1.0 - np.bincount(pair)[pair] / np.bincount(label_code)[label_code]
    correct = []
    for batch in np.unique(batches):
        query = np.flatnonzero(shared & (batches == batch))
        reference = np.flatnonzero(batches != batch)
        if query.size and reference.size:
            vote = KNeighborsClassifier(n_neighbors=min(N_NEIGHBORS, reference.size))
            correct.append(vote.fit(x[reference], labels[reference]).predict(x[query]) == labels[query])
    return {
        "batch_mixing": float(other[shared].mean() / max(expected[shared].mean(), 1e-12)),
        "cross_batch_accuracy": float(np.concatenate(correct).mean()),
    }


def cluster_scores(
    x: np.ndarray, labels: np.ndarray, seed: int, batches: np.ndarray | None = None
) -> dict[str, float]:
    """Leiden clusters of the kNN graph of `x` (all records) against `labels`: ARI, NMI and cluster
    count at resolution 1, and ARI / NMI at the grid resolution with the best NMI (`*_best`); with
    `batches` (several), `batch_scores` too."""
    import anndata as ad
    import scanpy as sc

    adata = ad.AnnData(X=np.zeros((len(x), 0), dtype=np.float32))
    adata.obsm["X_rep"] = np.asarray(x, dtype=np.float32)
    n_neighbors = max(2, min(N_NEIGHBORS, len(x) - 1))
    found: dict[float, tuple[float, float, int]] = {}
    resolutions = sorted({RESOLUTION, *RESOLUTIONS})
    # an atlas's graph and Leidens take minutes (100,000 cells: ~4 min a representation), silent before
    say = log.info if len(x) >= SAY_FROM else log.debug
    say(
        "kNN graph of %s records (%d dimensions), then Leiden at %d resolutions",
        f"{len(x):,}",
        adata.obsm["X_rep"].shape[1],
        len(resolutions),
    )
    with warnings.catch_warnings():  # scanpy's notes on defaults that will change; not the user's concern
        warnings.simplefilter("ignore")
        neighbors(adata, n_neighbors=n_neighbors, use_rep="X_rep", random_state=seed)
        for i, resolution in enumerate(resolutions):
            if i:
                say("Leiden at resolution %g (%d of %d)", resolution, i + 1, len(resolutions))
            sc.tl.leiden(
                adata,
                resolution=resolution,
                flavor=LEIDEN_FLAVOR,
                n_iterations=LEIDEN_ITERATIONS,
                directed=False,
                random_state=seed,
            )
            clusters = adata.obs["leiden"].to_numpy()
            found[resolution] = (
                float(adjusted_rand_score(labels, clusters)),
                float(normalized_mutual_info_score(labels, clusters)),
                len(set(clusters)),
            )
    best = max(RESOLUTIONS, key=lambda r: found[r][1])  # the first of equal NMIs: the lowest resolution
    ari, nmi, n_clusters = found[RESOLUTION]
    mixing = batch_scores(x, labels, batches) if batches is not None and np.unique(batches).size > 1 else {}
    return {
        "cluster_ari": ari,
        "cluster_nmi": nmi,
        "n_clusters": n_clusters,
        "cluster_ari_best": found[best][0],
        "cluster_nmi_best": found[best][1],
        "best_resolution": best,
        **mixing,
    }
