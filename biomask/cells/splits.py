"""Deterministic train/val/test assignment of cells: stratified by a label, or read from a column.

Stratified draw (the same rule as the DNA stage's labelled sets): groups are visited in sorted order
and each gets a seeded permutation; its first round(n * test) cells go to test, the next
round(n * val) to val, the rest to train. Without a stratifying column all cells form one group.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from biomask.errors import InputError

SPLITS = ("train", "val", "test")
TRAIN, VAL, TEST = range(3)
_ALIASES = {
    "train": TRAIN,
    "training": TRAIN,
    "val": VAL,
    "valid": VAL,
    "validation": VAL,
    "dev": VAL,
    "test": TEST,
    "testing": TEST,
}


def stratified_split(groups: np.ndarray | None, n: int, val: float, test: float, seed: int) -> np.ndarray:
    """Split code (0 train, 1 val, 2 test) per cell; `groups` holds each cell's stratum (or None)."""
    rng = np.random.default_rng(seed)
    codes = np.full(n, TRAIN, dtype=np.uint8)
    if groups is None:
        groups = np.zeros(n, dtype=np.int64)
    uniques, inverse = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(uniques.size + 1))
    for g in range(uniques.size):
        members = order[bounds[g] : bounds[g + 1]]
        members = members[rng.permutation(members.size)]
        n_test, n_val = round(members.size * test), round(members.size * val)
        codes[members[:n_test]] = TEST
        codes[members[n_test : n_test + n_val]] = VAL
    return codes


def split_from_column(values: pd.Series, where: str, column: str) -> np.ndarray:
    """Split codes from a column of train/val/test values (common aliases accepted)."""
    lowered = values.astype(str).str.strip().str.lower()
    codes = lowered.map(_ALIASES)
    if codes.isna().any():
        bad = values[codes.isna()]
        raise InputError(
            f"{where}: obs column {column!r} has {bad.iloc[0]!r} for cell {bad.index[0]!r}; "
            "split values must be train, val or test"
        )
    return codes.to_numpy(dtype=np.uint8)
