"""Records that must stay on one side of every split (`splits.group`).

A random split of labelled records assumes they are independent. Two kinds are not:
- DNA records that share sequence — duplicates, overlapping windows of one locus, paralogues, the
  same site on the other strand. A model can then score a test record by having seen its twin in
  training; so can a k-mer baseline, but not equally (docs/dna-models.md measures how many share).
  `shared_sequence` links every two records that share a stretch of `min_shared` bases on either
  strand, and keeps each linked group together.
- Cells of one batch (a donor, a run): a cell type's test cells from a donor seen in training are
  easier than a new donor's. `batch` keeps each batch of the store's `batch_column` together, so the
  test cells come from batches no method trained on.

The groups are then split with scikit-learn's StratifiedGroupKFold (labels balanced as far as whole
groups allow): the test split is one fold of round(1 / test) folds, and validation one fold of the
rest, so the fractions are near, not equal to, those asked for (metrics.json records the sizes).
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
from numpy.lib.stride_tricks import sliding_window_view
from scipy.sparse.csgraph import connected_components

from biomask.errors import InputError

# A, C, G, T (either case) to 0-3; anything else 4, which breaks a stretch (N never links records)
_CODES = np.full(256, 4, dtype=np.uint8)
for _i, _base in enumerate(b"ACGT"):
    _CODES[_base] = _CODES[_base + 32] = _i


def shared_sequence_groups(sequences: list[str], min_shared: int) -> np.ndarray:
    """A group id per record: the connected components of "shares a stretch of `min_shared` bases
    (either strand)". Each stretch is hashed (a fixed random linear hash mod 2**64 of its canonical
    strand: a false link needs a 64-bit collision); records are joined through the stretches they hold.
    Memory: about 16 bytes per base of the whole set."""
    k = min_shared
    weights = np.random.default_rng(20261207).integers(1, 2**63, size=k, dtype=np.uint64) | np.uint64(1)
    owners, hashes = [], []
    for i, sequence in enumerate(sequences):
        codes = _CODES[np.frombuffer(sequence.encode("ascii", "replace"), dtype=np.uint8)]
        if codes.size < k:
            continue
        windows = sliding_window_view(codes, k)
        windows = windows[(windows < 4).all(axis=1)].astype(np.uint64)
        if not len(windows):
            continue
        with np.errstate(over="ignore"):  # the hash wraps modulo 2**64 on purpose
            forward = (windows * weights).sum(axis=1, dtype=np.uint64)
            reverse = ((np.uint64(3) - windows)[:, ::-1] * weights).sum(axis=1, dtype=np.uint64)
        found = np.unique(np.minimum(forward, reverse))
        hashes.append(found)
        owners.append(np.full(found.size, i, dtype=np.int64))
    n = len(sequences)
    if not hashes:
        return np.arange(n)
    owner = np.concatenate(owners)
    _, stretch = np.unique(np.concatenate(hashes), return_inverse=True)
    size = n + int(stretch.max()) + 1
    graph = sp.coo_matrix((np.ones(owner.size, dtype=np.int8), (owner, n + stretch)), shape=(size, size))
    _, component = connected_components(graph, directed=False)
    return np.unique(component[:n], return_inverse=True)[1]


def grouped_split(
    labels: np.ndarray, groups: np.ndarray, val: float, test: float, seed: int, where: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) record indices with no group on two sides, stratified by label as far as
    whole groups allow; a different draw per seed."""
    from sklearn.model_selection import StratifiedGroupKFold

    everything = np.arange(labels.size)
    n_groups = np.unique(groups).size
    largest = int(np.bincount(groups).max())
    if n_groups < 3:
        raise InputError(
            f"{where}: {n_groups} group(s) of records, and a grouped split needs at least 3 (train, val and "
            "test each get whole groups); use splits.group=none, or a set with more batches"
        )
    if largest > (1.0 - val - test) * labels.size:
        raise InputError(
            f"{where}: one group holds {largest:,} of {labels.size:,} records, more than the training split "
            f"can take whole (splits.val={val}, splits.test={test}); with shared_sequence a repeat may be "
            "linking unrelated records: raise splits.min_shared, or use splits.group=none"
        )

    def one_fold(pool: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
        """The fold nearest `fraction` of `pool` in size (so a large group's fold stays in training)."""
        folds = max(2, min(round(1.0 / fraction), np.unique(groups[pool]).size))
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        with warnings.catch_warnings():  # "the least populated class has only N members": a small class
            warnings.simplefilter("ignore", UserWarning)
            kept, held = min(
                splitter.split(pool, labels[pool], groups[pool]),
                key=lambda fold: abs(len(fold[1]) - fraction * pool.size),
            )
        return pool[kept], pool[held]

    rest, test_part = one_fold(everything, test)
    train, val_part = one_fold(rest, val / (1.0 - test))
    return np.sort(train), np.sort(val_part), np.sort(test_part)


def describe_groups(groups: np.ndarray) -> dict[str, int]:
    """What metrics.json records of a grouping: how many groups, the largest, the records not alone."""
    sizes = np.bincount(groups)
    return {
        "groups": int(sizes.size),
        "largest": int(sizes.max()),
        "records_grouped": int(sizes[sizes > 1].sum()),
    }
