"""The baselines every foundation-model number is reported next to — and they must be strong ones.

- DNA, any length: bag of k-mer counts (frequencies) + logistic regression, for each k of a grid
  (`baseline.kmer_k`, default 3-6); each seed keeps the k with the best validation MCC.
- DNA, fixed length: position-aware one-hot + logistic regression. On the splice set this reaches
  MCC ≈ 0.92 where the bag of k-mers gets ≈ 0.45: a pretrained model is judged against the stronger.
- Cells: PCA (fitted on the training cells only) of log-normalised expression + logistic regression.

The regularisation strength of each logistic regression is chosen on the validation split, so the
baselines get the same model selection as the pretrained models' probes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from sklearn.decomposition import PCA
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import matthews_corrcoef
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from biomask.resources import resolve_threads

C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)
# How many of the C grid's fits run side by side: `evaluate`'s num_workers (fit_threads), else auto
_FIT_THREADS: ContextVar[int | str] = ContextVar("fit_threads", default="auto")


@contextlib.contextmanager
def fit_threads(n: int | str) -> Iterator[None]:
    """The logistic regressions fitted inside run at most `n` at a time (auto: resolve_threads)."""
    token = _FIT_THREADS.set(n)
    try:
        yield
    finally:
        _FIT_THREADS.reset(token)


@dataclass
class Split:
    """Features and labels of train, val and test for one seed."""

    x_train: np.ndarray | sp.spmatrix
    y_train: np.ndarray
    x_val: np.ndarray | sp.spmatrix
    y_val: np.ndarray
    x_test: np.ndarray | sp.spmatrix
    y_test: np.ndarray


def tuned_logistic(data: Split, seed: int, c_grid: Sequence[float] = C_GRID) -> np.ndarray:
    """Fit a logistic regression per C on train, keep the best on val (MCC), predict test."""
    return fit_tuned_logistic(data, seed, c_grid)[0].predict(data.x_test)


def fit_tuned_logistic(
    data: Split, seed: int, c_grid: Sequence[float] = C_GRID, *, patience: int | None = None
) -> tuple[LogisticRegression, float]:
    """The logistic regression with the best validation MCC over `c_grid`, and that MCC. `patience`:
    walk the (ascending) grid only until that many C in a row score below the best (wide dense
    features, where the weakly regularised fits are the slow ones and rarely win); None: every C."""
    # These fits are small: OpenBLAS's spinning worker threads make them up to 100x slower when the
    # cores are busy (seen on a loaded 2-core machine), so BLAS runs single-threaded here.
    with threadpool_limits(limits=1, user_api="blas"):
        return _tuned_logistic(data, seed, c_grid, patience)


def _tuned_logistic(
    data: Split, seed: int, c_grid: Sequence[float], patience: int | None = None
) -> tuple[LogisticRegression, float]:
    def fit(c: float) -> tuple[float, LogisticRegression]:
        model = LogisticRegression(C=c, max_iter=3000, random_state=seed)
        model.fit(data.x_train, data.y_train)
        return (matthews_corrcoef(data.y_val, model.predict(data.x_val)) if len(data.y_val) else 0.0), model

    if patience is None:
        # Every C is fitted, each on one BLAS thread: they run side by side on the cores this process
        # may use (fit_threads, else resolve_threads: a pipeline's share), the weakest regularisation
        # (the slowest fit) first; lbfgs's loss and gradient release the GIL. The same fits as one
        # after another, so the same choice (a failing fit raises once the others end).
        with ThreadPoolExecutor(
            max_workers=max(1, min(len(c_grid), resolve_threads(_FIT_THREADS.get())))
        ) as pool:
            runs = list(pool.map(fit, c_grid[::-1]))[::-1]
    else:
        runs = []
    best: tuple[float, LogisticRegression] | None = None
    worse = 0
    for i, c in enumerate(c_grid):
        score, model = runs[i] if runs else fit(c)
        if best is None or score > best[0]:
            best, worse = (score, model), 0
        else:
            worse += score < best[0]
            if patience is not None and worse >= patience:
                break
    assert best is not None
    return best[1], float(best[0])


def kmer_frequencies(train: list[str], others: list[list[str]], k: int) -> list[sp.csr_matrix]:
    """Bag-of-k-mer frequencies on the scale of counts (counts / length × mean training length, so
    raw counts for fixed-length sets and the regularisation grid fits); vocabulary fitted on train only."""
    vectorizer = CountVectorizer(analyzer="char", ngram_range=(k, k), lowercase=False, dtype=np.float32)
    out = [vectorizer.fit_transform(train)]
    out += [vectorizer.transform(seqs) for seqs in others]
    windows = lambda seqs: np.array([max(len(s) - k + 1, 1) for s in seqs], dtype=np.float32)  # noqa: E731
    typical = float(windows(train).mean())
    return [sp.diags(typical / windows(seqs)) @ matrix for matrix, seqs in zip(out, [train, *others])]


def kmer_lr(
    train: list[str],
    val: list[str],
    test: list[str],
    y: tuple[np.ndarray, np.ndarray, np.ndarray],
    ks: Sequence[int],
    seed: int,
) -> tuple[np.ndarray, int]:
    """k-mer frequencies + tuned logistic regression for each k of `ks`; the k (and C) with the best
    validation MCC predicts test (ties: the smaller k). Returns the test predictions and that k."""
    best: tuple[float, int, np.ndarray] | None = None
    for k in sorted(ks):
        x_train, x_val, x_test = kmer_frequencies(train, [val, test], k)
        model, score = fit_tuned_logistic(Split(x_train, y[0], x_val, y[1], x_test, y[2]), seed)
        if best is None or score > best[0]:
            best = (score, k, model.predict(x_test))
    assert best is not None
    return best[2], best[1]


_ONE_HOT = np.zeros((256, 4), dtype=np.float32)
for _i, _b in enumerate("ACGT"):
    _ONE_HOT[ord(_b), _i] = 1.0  # N and anything else: all zeros


def one_hot(seqs: list[str]) -> np.ndarray:
    """Position-aware one-hot (length × 4, flattened) of equal-length sequences."""
    lengths = {len(s) for s in seqs}
    if len(lengths) != 1:
        raise ValueError("position-aware one-hot needs sequences of one length")
    codes = np.frombuffer("".join(seqs).encode("ascii"), dtype=np.uint8).reshape(len(seqs), -1)
    return _ONE_HOT[codes].reshape(len(seqs), -1)


def pca_features(
    train: sp.spmatrix | np.ndarray, others: list[sp.spmatrix | np.ndarray], n_components: int, seed: int
) -> list[np.ndarray]:
    """PCA of log-normalised expression fitted on the training cells, then standardised components."""
    n_components = min(n_components, train.shape[0] - 1, train.shape[1] - 1)
    # sparse input stays sparse: arpack centres implicitly, so large matrices are never densified
    solver = "arpack" if sp.issparse(train) else "auto"
    pca = PCA(n_components=n_components, svd_solver=solver, random_state=seed).fit(train)
    scaler = StandardScaler().fit(pca.transform(train))
    return [scaler.transform(pca.transform(m)) for m in (train, *others)]
