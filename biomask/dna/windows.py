"""Cutting genome records into training windows, with splits by region so neighbours cannot leak.

Each record is divided into blocks of `block_size` bases; each block goes wholly to train, val or
test (a seeded, per-record draw), and windows never cross a block boundary or a record boundary.
So a test window's overlapping neighbours are in the test split too, never in train.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

SPLITS = ("train", "val", "test")


@dataclass
class WindowBatch:
    """Equal-length windows cut from one block of one record."""

    split: str
    record: str
    windows: np.ndarray  # (n, width) ASCII A/C/G/T/N
    starts: np.ndarray  # 0-based start of each window in the record
    strand: str = "+"


def assign_blocks(record: str, num_blocks: int, val: float, test: float, seed: int) -> list[str]:
    """The split of every block of a record: a seeded permutation, with stochastic rounding of counts
    so that small records still contribute their expected share."""
    key = int.from_bytes(hashlib.blake2b(record.encode(), digest_size=8).digest(), "little")
    rng = np.random.default_rng([seed, key])
    counts = []
    for fraction in (val, test):
        expected = fraction * num_blocks
        counts.append(int(np.floor(expected + rng.random())))
    n_val, n_test = counts
    n_test = min(n_test, num_blocks - n_val)
    order = rng.permutation(num_blocks)
    splits = ["train"] * num_blocks
    for i in order[:n_val]:
        splits[i] = "val"
    for i in order[n_val : n_val + n_test]:
        splits[i] = "test"
    return splits


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of the runs of True in a boolean array."""
    padded = np.concatenate([[False], mask, [False]])
    edges = np.flatnonzero(np.diff(padded.astype(np.int8)))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))


def record_windows(
    record: str,
    chars: np.ndarray,
    ambiguous: np.ndarray,
    *,
    length: int,
    stride: int,
    keep_tail: bool,
    min_length: int,
    policy: str,
    max_ambiguous_fraction: float,
    block_size: int,
    val: float,
    test: float,
    seed: int,
    counts: dict[str, int],
) -> Iterator[WindowBatch]:
    """Windows of one cleaned record, block by block. `counts` collects why windows were dropped."""
    size = chars.size
    num_blocks = max(1, -(-size // block_size))
    block_split = assign_blocks(record, num_blocks, val, test, seed)
    cumulative = np.concatenate([[0], np.cumsum(ambiguous, dtype=np.int64)])
    for block, split in enumerate(block_split):
        lo, hi = block * block_size, min(size, (block + 1) * block_size)
        if policy == "split":
            segments = [(lo + s, lo + e) for s, e in _runs(~ambiguous[lo:hi])]
        else:
            segments = [(lo, hi)]
        for seg_start, seg_end in segments:
            seg_len = seg_end - seg_start
            if seg_len < max(min_length, 1):
                counts["segments_below_min_length"] += 1
                continue
            widths_and_starts = []
            if seg_len >= length:
                widths_and_starts.append((length, seg_start + np.arange(0, seg_len - length + 1, stride)))
            last_end = widths_and_starts[0][1][-1] + length if widths_and_starts else seg_start
            tail = seg_end - last_end
            if keep_tail and tail > 0:
                tail_start = last_end if widths_and_starts else seg_start
                if seg_end - tail_start >= min_length:
                    widths_and_starts.append((seg_end - tail_start, np.array([tail_start])))
            for width, starts in widths_and_starts:
                n_amb = cumulative[starts + width] - cumulative[starts]
                if policy == "drop":
                    keep = n_amb == 0
                else:
                    keep = n_amb <= max_ambiguous_fraction * width
                counts["windows_dropped_ambiguous"] += int((~keep).sum())
                starts = starts[keep]
                if starts.size == 0:
                    continue
                windows = chars[starts[:, None] + np.arange(width)]
                yield WindowBatch(split, record, windows, starts)
