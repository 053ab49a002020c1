"""Tokenization schemes for expression: one interface, vectorised over CSR blocks of cells.

Every scheme takes a block of counts whose columns are token ids (`GeneVocabulary` order, canonical
CSR: each row's columns sorted and unique) and each cell's scale factor `target_sum / library_size`,
and returns flat token-aligned arrays plus one length per cell (`Encoded`). No Python loop runs per
cell: orderings within cells (ranks, sampled truncation) come from one sort of 64-bit keys packing
(cell, value, position); binning needs no sort at all (below).

| scheme   | a cell's tokens                                    | `values` (float32)                  | order      |
|----------|----------------------------------------------------|-------------------------------------|------------|
| `binned` | its expressed genes, at most `max_length`          | log1p(count * scale)                | gene id    |
|          | (beyond: the top-expressed, or a seeded sample)    | + `bins` (uint8): 1..n_bins         |            |
| `rank`   | its expressed genes ranked by count * scale /      | that median-normalised value        | rank       |
|          | corpus median, the top `max_length`                |                                     |            |
| `panel`  | every vocabulary gene, expressed or not            | log1p(count * scale), 0 if absent   | gene id    |

Binning (scGPT-style, per cell): with m expressed genes and F(v) the fraction of them whose value is
<= v, a gene's bin is ceil(n_bins * F(v)): equal-frequency bins, ties share a bin and the highest
value always gets n_bins. Bins are computed over all of the cell's expressed genes, before
truncation. Ties in ranks and in top-expressed truncation go to the lower token id.

Why the binned scheme is fast: within a cell, values order like counts, and counts are small
integers. So F comes from a per-cell histogram of counts below `SMALL_COUNT` (one bincount for the
whole block), and both bins and values are looked up in (cells x SMALL_COUNT) tables; only the rare
larger counts are sorted.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import scipy.sparse as sp

from biomask.vocab import NUM_SPECIAL

_U16 = 1 << 16
SMALL_COUNT = 64  # counts below this are binned through per-cell tables (larger ones are sorted)
_COUNT_GRID = np.arange(SMALL_COUNT, dtype=np.float32)


@dataclass
class Encoded:
    """Records of one block, flattened: field arrays split by `lengths` (one per cell)."""

    lengths: np.ndarray  # int64
    tokens: np.ndarray  # token ids (any integer dtype; the store writes its own)
    values: np.ndarray  # float32
    bins: np.ndarray | None = None  # uint8 (binned scheme only)

    def fields(self) -> dict[str, np.ndarray]:
        out = {"tokens": self.tokens, "values": self.values}
        if self.bins is not None:
            out["bins"] = self.bins
        return out

    def rows(self, lo: int, hi: int) -> Encoded:
        """The records of cells lo..hi-1: views when they are most of the block, else copies -- a small
        view kept in a writer's buffer would keep the whole block's arrays alive."""
        first = int(self.lengths[:lo].sum())
        last = first + int(self.lengths[lo:hi].sum())
        copy = 2 * (last - first) < self.tokens.size

        def part(array: np.ndarray) -> np.ndarray:
            return array[first:last].copy() if copy else array[first:last]

        return Encoded(
            self.lengths[lo:hi],
            part(self.tokens),
            part(self.values),
            None if self.bins is None else part(self.bins),
        )


# --------------------------------------------------------------------------------------------- helpers


def row_ids(indptr: np.ndarray) -> np.ndarray:
    """The row of every stored element of a CSR matrix."""
    return np.repeat(np.arange(indptr.size - 1, dtype=np.int64), np.diff(indptr))


def order_within_rows(indptr: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Permutation of a CSR block's elements sorting them by (row, key, position); `keys` is uint32.

    Fast path: one in-place sort of uint64 words packing row (16 bits), key (32) and position in the
    row (16), decoded back into flat indices -- several times faster than lexsort or argsort."""
    rows = row_ids(indptr)
    starts = indptr[:-1].astype(np.int64)
    n_rows = indptr.size - 1
    longest = int(np.diff(indptr).max()) if n_rows else 0
    if n_rows > _U16 or longest > _U16:
        return np.lexsort((np.arange(rows.size), keys, rows))
    position = np.arange(rows.size, dtype=np.int64) - starts[rows]
    packed = rows.astype(np.uint64) << np.uint64(48)
    packed |= keys.astype(np.uint64) << np.uint64(16)
    packed |= position.astype(np.uint64)
    packed.sort()
    sorted_rows = (packed >> np.uint64(48)).astype(np.int64)
    return starts[sorted_rows] + (packed & np.uint64(0xFFFF)).astype(np.int64)


def ascending_keys(values: np.ndarray) -> np.ndarray:
    """uint32 keys that sort like the (non-negative float32) values."""
    return np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)


def descending_keys(values: np.ndarray) -> np.ndarray:
    return ~ascending_keys(values)


def rank_in_row(indptr: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Each element's 0-based position within its row, given `order` from `order_within_rows`."""
    rank = np.empty(order.size, dtype=np.int64)
    rank[order] = np.arange(order.size, dtype=np.int64) - np.repeat(indptr[:-1], np.diff(indptr))
    return rank


def mix_hash(seed: int, cells: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """A uint32 pseudo-random key per (seed, cell, token) -- splitmix64's finaliser, vectorised.

    Keys depend on nothing else, so a sample is the same whatever the block boundaries."""
    with np.errstate(over="ignore"):
        x = (
            np.uint64(seed + 1) * np.uint64(0x9E3779B97F4A7C15)
            ^ cells.astype(np.uint64) * np.uint64(0xBF58476D1CE4E5B9)
            ^ tokens.astype(np.uint64) * np.uint64(0x94D049BB133111EB)
        )
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(32)).astype(np.uint32)


def _normalised(block: sp.csr_matrix, scale: np.ndarray) -> np.ndarray:
    """count * (target_sum / library size) for every stored element, float32."""
    return block.data.astype(np.float32, copy=False) * np.repeat(
        scale.astype(np.float32), np.diff(block.indptr)
    )


# --------------------------------------------------------------------------------------------- schemes


class Scheme(ABC):
    """Turns a block of counts in token space into records."""

    name: ClassVar[str]

    @abstractmethod
    def encode(self, block: sp.csr_matrix, scale: np.ndarray, cells: np.ndarray) -> Encoded:
        """`block`: counts, columns = token ids, canonical CSR. `scale`: target_sum / library size per row.
        `cells`: each row's global cell index (seeds sampling, so blocks do not change results)."""

    def token_fields(self, token_dtype: np.dtype) -> dict[str, np.dtype]:
        return {"tokens": token_dtype, "values": np.dtype(np.float32)}


class BinnedScheme(Scheme):
    name = "binned"

    def __init__(self, n_bins: int, max_length: int, truncate: str = "top", seed: int = 0) -> None:
        self.n_bins, self.max_length, self.truncate, self.seed = n_bins, max_length, truncate, seed

    def token_fields(self, token_dtype: np.dtype) -> dict[str, np.dtype]:
        return {**super().token_fields(token_dtype), "bins": np.dtype(np.uint8)}

    def encode(self, block: sp.csr_matrix, scale: np.ndarray, cells: np.ndarray) -> Encoded:
        indptr = block.indptr.astype(np.int64, copy=False)
        n, lengths = block.shape[0], np.diff(indptr)
        counts = block.data.astype(np.int32)  # integral counts; int32 keeps the passes over them cheap
        small = counts < SMALL_COUNT
        all_small = bool(small.all())
        # key = cell * SMALL_COUNT + count: the element's cell in the (cells x SMALL_COUNT) tables
        key = np.repeat(np.arange(0, n * SMALL_COUNT, SMALL_COUNT, dtype=np.int32), lengths)
        key += counts if all_small else np.minimum(counts, SMALL_COUNT - 1)
        # at_most[cell, c]: how many of the cell's counts are <= c (counts >= SMALL_COUNT excluded: they
        # were clipped into the last column, and are taken out of it again)
        hist = np.bincount(key, minlength=n * SMALL_COUNT).reshape(n, SMALL_COUNT)
        large = None if all_small else np.flatnonzero(~small)
        if large is not None:
            large_rows = np.searchsorted(indptr, large, side="right") - 1
            hist[:, -1] -= np.bincount(large_rows, minlength=n)
        at_most = np.cumsum(hist, axis=1)
        m = np.maximum(lengths, 1)[:, None]
        bin_table = ((self.n_bins * at_most + m - 1) // m).astype(np.uint8)  # exact integer ceil
        value_table = np.log1p(_COUNT_GRID[None, :] * scale.astype(np.float32)[:, None])
        bins = bin_table.reshape(-1)[key]
        values = value_table.reshape(-1)[key]
        if large is not None:
            self._large_counts(indptr, large, large_rows, counts, scale, at_most[:, -1], bins, values)
        tokens = block.indices
        if lengths.size and lengths.max() > self.max_length:
            # the table knows every count below SMALL_COUNT; larger ones are all above the threshold
            # unless a cell has more than max_length of them (then sort)
            if self.truncate == "top" and (lengths - at_most[:, -1]).max() <= self.max_length:
                keep = self._top_by_table(indptr, counts, at_most)
            else:
                keep = self._truncate(indptr, values, tokens, cells)
            tokens, values, bins = tokens[keep], values[keep], bins[keep]
            lengths = np.minimum(lengths, self.max_length)
        return Encoded(lengths, tokens, values, bins)

    def _top_by_table(self, indptr: np.ndarray, counts: np.ndarray, at_most: np.ndarray) -> np.ndarray:
        """Top-expressed truncation without sorting: in each long cell, find the count t such that at most
        max_length genes have more; keep those, then the genes with count t in token order. (Values order
        like counts within a cell, so this is the top by value.)"""
        limit = self.max_length
        lengths = np.diff(indptr)
        long = np.flatnonzero(lengths > limit)
        above = lengths[long, None] - at_most[long]  # genes with a count > c, for every c
        threshold = np.argmax(above <= limit, axis=1)  # the first c leaving at most `limit` above it
        ties_kept = limit - above[np.arange(long.size), threshold]
        # the long cells' elements: consecutive ranges of the CSR arrays
        sizes = lengths[long]
        cell = np.repeat(np.arange(long.size), sizes)
        elements = np.arange(cell.size) + np.repeat(indptr[long] - np.cumsum(sizes) + sizes, sizes)
        c = counts[elements]
        t = threshold[cell]
        tie = c == t
        # position of each tie among its cell's ties, in token order (CSR rows are sorted by token)
        tie_rank = np.cumsum(tie) - 1
        first_tie = np.concatenate([[0], np.cumsum(np.bincount(cell[tie], minlength=long.size))[:-1]])
        keep = np.ones(counts.size, dtype=bool)
        keep[elements] = (c > t) | (tie & (tie_rank - first_tie[cell] < ties_kept[cell]))
        return keep

    def _large_counts(
        self,
        indptr: np.ndarray,
        where: np.ndarray,
        sub_rows: np.ndarray,
        counts: np.ndarray,
        scale: np.ndarray,
        n_small: np.ndarray,
        bins: np.ndarray,
        values: np.ndarray,
    ) -> None:
        """Bins and values of counts >= SMALL_COUNT (at `where`, in cells `sub_rows`): above every small
        count of their cell, ranked among themselves by sorting."""
        sub_counts = counts[where]
        values[where] = np.log1p(sub_counts.astype(np.float32) * scale.astype(np.float32)[sub_rows])
        order = np.lexsort((sub_counts, sub_rows))
        r, c = sub_rows[order], sub_counts[order]
        last = np.ones(order.size, dtype=bool)  # last element of each run of equal (cell, count)
        last[:-1] = (r[1:] != r[:-1]) | (c[1:] != c[:-1])
        run_end = np.minimum.accumulate(np.where(last, np.arange(order.size), order.size)[::-1])[::-1]
        first_of_row = np.searchsorted(r, r, side="left")
        at_most = n_small[r] + run_end - first_of_row + 1
        m = np.diff(indptr)[r]
        bins[where[order]] = (self.n_bins * at_most + m - 1) // m

    def _truncate(
        self, indptr: np.ndarray, values: np.ndarray, tokens: np.ndarray, cells: np.ndarray
    ) -> np.ndarray:
        """Keep max_length genes of the cells that have more (the general path: by sorting keys)."""
        lengths = np.diff(indptr)
        long = lengths > self.max_length
        where = np.flatnonzero(np.repeat(long, lengths))  # elements of long cells
        sub_indptr = np.zeros(int(long.sum()) + 1, dtype=np.int64)
        np.cumsum(lengths[long], out=sub_indptr[1:])
        if self.truncate == "top":
            keys = descending_keys(values[where])
        else:
            keys = mix_hash(self.seed, np.repeat(cells[long], lengths[long]), tokens[where])
        rank = rank_in_row(sub_indptr, order_within_rows(sub_indptr, keys))
        keep = np.ones(values.size, dtype=bool)
        keep[where] = rank < self.max_length
        return keep


class RankScheme(Scheme):
    name = "rank"

    def __init__(self, token_medians: np.ndarray, max_length: int) -> None:
        self.token_medians = token_medians.astype(np.float32)
        self.max_length = max_length

    def encode(self, block: sp.csr_matrix, scale: np.ndarray, cells: np.ndarray) -> Encoded:
        indptr = block.indptr.astype(np.int64)
        values = _normalised(block, scale) / self.token_medians[block.indices]
        order = order_within_rows(indptr, descending_keys(values))
        lengths = np.minimum(np.diff(indptr), self.max_length)
        rank = np.arange(order.size, dtype=np.int64) - np.repeat(indptr[:-1], np.diff(indptr))
        chosen = order[rank < self.max_length]
        return Encoded(lengths, block.indices[chosen].astype(np.int64), values[chosen])


class PanelScheme(Scheme):
    name = "panel"

    def __init__(self, vocab_size: int) -> None:
        self.panel = np.arange(NUM_SPECIAL, vocab_size, dtype=np.int64)

    def encode(self, block: sp.csr_matrix, scale: np.ndarray, cells: np.ndarray) -> Encoded:
        n = block.shape[0]
        dense = np.zeros((n, self.panel.size), dtype=np.float32)
        dense[row_ids(block.indptr), block.indices - NUM_SPECIAL] = np.log1p(_normalised(block, scale))
        lengths = np.full(n, self.panel.size, dtype=np.int64)
        return Encoded(lengths, np.tile(self.panel, n), dense.reshape(-1))
