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
    if groups is None:  # one stratum
        uniques, inverse = np.array(["0"]), np.zeros(n, dtype=np.intp)
    else:
        uniques, inverse = _sorted_groups(groups)
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(uniques.size + 1))
    for g in range(uniques.size):
        members = order[bounds[g] : bounds[g + 1]]
        members = members[rng.permutation(members.size)]
        n_test, n_val = round(members.size * test), round(members.size * val)
        codes[members[:n_test]] = TEST
        codes[members[n_test : n_test + n_val]] = VAL
    return codes


def _sorted_groups(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`np.unique(groups.astype(str), return_inverse=True)`, without the fixed-width string copy of
    every cell's group (and np.unique's sorted copy of it): ~470 bytes a cell, a million cells' prep
    out of memory under a cap its settings could not lower. Factorised first, the few distinct
    values sorted as strings: the same groups in the same order, so the same split."""
    # str objects (a pointer a cell; a str stays itself), so that 1 and "1" are one group and None
    # and NaN two, as astype(str) made them; factorize would merge missing values
    strings = pd.Series(np.asarray(groups), copy=False).astype(str).to_numpy()
    codes, found = pd.factorize(strings)
    uniques, order = np.unique(np.asarray(found, dtype=str), return_inverse=True)
    return uniques, order.reshape(-1)[codes]


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
