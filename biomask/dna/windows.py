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


def block_split(record: str, block: int, val: float, test: float, seed: int) -> str:
    """The split of one block of a record: a seeded hash of (seed, record, block) compared with the
    split fractions — deterministic, and decidable while streaming (no need to know the record length)."""
    digest = hashlib.blake2b(f"{seed}\0{record}\0{block}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "little") / 2**64
    return "val" if u < val else "test" if u < val + test else "train"


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of the runs of True in a boolean array."""
    padded = np.concatenate([[False], mask, [False]])
    edges = np.flatnonzero(np.diff(padded.astype(np.int8)))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))


def block_windows(
    record: str,
    offset: int,
    chars: np.ndarray,
    ambiguous: np.ndarray,
    *,
    split: str,
    length: int,
    stride: int,
    keep_tail: bool,
    min_length: int,
    policy: str,
    max_ambiguous_fraction: float,
    counts: dict[str, int],
) -> Iterator[WindowBatch]:
    """Windows of one cleaned block that starts at `offset` in its record. `counts` collects why
    windows were dropped."""
    cumulative = np.concatenate([[0], np.cumsum(ambiguous, dtype=np.int64)])
    segments = _runs(~ambiguous) if policy == "split" else [(0, chars.size)]
    for seg_start, seg_end in segments:
        seg_len = seg_end - seg_start
        if seg_len < max(min_length, 1):
            counts["segments_below_min_length"] += 1
            continue
        widths_and_starts = []
        if seg_len >= length:
            widths_and_starts.append((length, seg_start + np.arange(0, seg_len - length + 1, stride)))
        last_end = int(widths_and_starts[0][1][-1]) + length if widths_and_starts else seg_start
        if keep_tail and seg_end - last_end >= min_length and seg_end > last_end:
            widths_and_starts.append((seg_end - last_end, np.array([last_end])))
        for width, starts in widths_and_starts:
            n_amb = cumulative[starts + width] - cumulative[starts]
            keep = n_amb == 0 if policy == "drop" else n_amb <= max_ambiguous_fraction * width
            counts["windows_dropped_ambiguous"] += int((~keep).sum())
            starts = starts[keep]
            if starts.size:
                windows = chars[starts[:, None] + np.arange(width)]
                yield WindowBatch(split, record, windows, starts + offset)
