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

Whole groups are then dealt to test, validation and train in a random order per seed (the best
label balance of a few such draws kept; `grouped_split`), so the fractions are near, not equal to,
those asked for (metrics.json records the sizes). scikit-learn's StratifiedGroupKFold was not used:
it orders groups by their label mix before its shuffle counts, so with a handful of groups (donors)
every seed drew the same split.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from biomask.errors import InputError

# A, C, G, T (either case) to 0-3; anything else 4, which breaks a stretch (N never links records)
_CODES = np.full(256, 4, dtype=np.uint8)
for _i, _base in enumerate(b"ACGT"):
    _CODES[_base] = _CODES[_base + 32] = _i


def shared_sequence_groups(sequences: list[str], min_shared: int) -> np.ndarray:
    """A group id per record: the connected components of "shares a stretch of `min_shared` bases
    (either strand)". Each stretch is hashed (a polynomial rolling hash mod 2**64 with a fixed random
    base, of its canonical strand: a false link needs a 64-bit collision), in time and memory linear in
    the record's length whatever `min_shared` is; records are joined through the stretches they hold.
    Memory at its peak: about 80 bytes per base of the whole set (50,000 records of 1 kb: 4 GB)."""
    k = min_shared
    longest = max((len(s) for s in sequences), default=0)
    # B**m and B**-m mod 2**64 (B odd, so invertible): a window's hash from two prefix sums
    base = np.uint64(0x9E3779B97F4A7C15)
    inverse = np.uint64(pow(int(base), -1, 2**64))
    with np.errstate(over="ignore"):
        powers = np.concatenate([[np.uint64(1)], np.cumprod(np.full(longest, base, dtype=np.uint64))])
        inverse_powers = np.concatenate(
            [[np.uint64(1)], np.cumprod(np.full(longest, inverse, dtype=np.uint64))]
        )

    def window_hashes(codes: np.ndarray) -> np.ndarray:
        """hash(window i) = sum_j codes[i+j] * B**(k-1-j) = B**(i+k-1) * (C[i+k] - C[i]),
        C the prefix sums of codes[m] * B**-m."""
        with np.errstate(over="ignore"):
            prefix = np.concatenate(
                [[np.uint64(0)], np.cumsum(codes.astype(np.uint64) * inverse_powers[: codes.size])]
            )
            return powers[k - 1 : codes.size] * (prefix[k:] - prefix[: codes.size - k + 1])

    owners, hashes = [], []
    for i, sequence in enumerate(sequences):
        codes = _CODES[np.frombuffer(sequence.encode("ascii", "replace"), dtype=np.uint8)]
        if codes.size < k:
            continue
        broken = np.concatenate([[0], np.cumsum(codes == 4)])
        whole = broken[k:] == broken[: codes.size - k + 1]  # windows without an N (or another letter)
        if not whole.any():
            continue
        clean = np.where(codes == 4, 0, codes)
        forward = window_hashes(clean)
        reverse = window_hashes((3 - clean)[::-1])[::-1]  # the other strand's hash of the same window
        found = np.unique(np.minimum(forward, reverse)[whole])
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


# Random group assignments drawn per seed, of which the one with the best label balance is kept: a
# few are enough to avoid a lopsided draw, and few enough that seeds still draw different splits when
# there are only a handful of groups (a balance optimised to the end gives every seed the same one).
CANDIDATES = 4


def grouped_split(
    labels: np.ndarray, groups: np.ndarray, val: float, test: float, seed: int, where: str, advice: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) record indices with no group on two sides, a different draw per seed.

    Groups are taken in a random order; each goes to test if it fits test's share (overshooting it
    by at most half of the group, or of the share), else to val likewise, else to train — so a group
    much larger than a share lands in train and the other splits keep their sizes. Of CANDIDATES such orders the
    one whose splits' label fractions are nearest the whole set's is kept. `advice` says what to
    change when the groups cannot be split."""
    n = labels.size
    sizes = np.bincount(groups)
    if sizes.size < 3:
        raise InputError(
            f"{where}: {sizes.size} group(s) of records, and a grouped split needs at least 3 (train, val and "
            f"test each get whole groups); {advice}"
        )
    largest = int(sizes.max())
    if largest > (1.0 - val - test) * n:
        raise InputError(
            f"{where}: one group holds {largest:,} of {n:,} records, more than the training split can take "
            f"whole (splits.val={val}, splits.test={test}); {advice}"
        )
    by_group = np.zeros((sizes.size, int(labels.max()) + 1))
    np.add.at(by_group, (groups, labels), 1.0)
    overall = by_group.sum(axis=0) / n
    shares = {2: test * n, 1: val * n}  # side codes: 0 train, 1 val, 2 test
    rng = np.random.default_rng(seed)
    best, best_score = None, np.inf
    counts_of = sizes.tolist()
    for _ in range(CANDIDATES):
        side = np.zeros(sizes.size, dtype=np.int8)
        filled = {2: 0.0, 1: 0.0}
        for g in rng.permutation(sizes.size).tolist():
            for code in (2, 1):
                # fits when it overshoots the share by at most half of itself, or of the share
                if filled[code] + counts_of[g] - shares[code] <= 0.5 * min(counts_of[g], shares[code]):
                    side[g], filled[code] = code, filled[code] + counts_of[g]
                    break
        counts = np.stack([by_group[side == code].sum(axis=0) for code in (0, 1, 2)])
        totals = counts.sum(axis=1)
        if not totals.all():
            continue
        score = float(np.abs(counts / totals[:, None] - overall).sum())
        if score < best_score:
            best, best_score = side, score
    if best is None:
        raise InputError(
            f"{where}: the {sizes.size:,} groups (each {np.median(sizes) / n:.0%} of the {n:,} records at the "
            f"median, the largest {largest / n:.0%}) leave the validation or test split empty at "
            f"splits.val={val}, splits.test={test}: each needs room for a whole group; {advice}"
        )
    record_side = best[groups]
    return tuple(np.flatnonzero(record_side == code) for code in (0, 1, 2))  # type: ignore[return-value]


def describe_groups(groups: np.ndarray) -> dict[str, int]:
    """What metrics.json records of a grouping: how many groups, the largest, the records not alone."""
    sizes = np.bincount(groups)
    return {
        "groups": int(sizes.size),
        "largest": int(sizes.max()),
        "records_grouped": int(sizes[sizes > 1].sum()),
    }
