"""Labelled DNA sets (tables, KEEL files, annotation tasks) read in one pass and written in a second.

Deduplication, conflicting labels and a stratified split need every row before the first record
can be written, and holding the rows themselves cost ~1.5 kB per 200-base row. So the first pass
(`LabelledRows.read`) cleans each row once and keeps a few numbers for it in typed arrays: where it
came from (input and line), its label and split value as small integers, and a 16-byte digest of
its cleaned bases; the bases and the id go to a spill file in the output's temporary directory.
Duplicates and the split are decided from the arrays (`deduplicate`, `stratified_split`), and
the writer reads each chosen record back from the spill (`texts`), split by split in row order.

Everything a row-by-row reading of the inputs would report is reported the same way: a reader's
error (a damaged row, a missing column) wins over a letter the cleaning policy refuses earlier in
the file, as when every row was read before any was cleaned.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
from array import array
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO

import numpy as np

from biomask.dna.cleaning import Cleaner
from biomask.dna.config import CleaningConfig
from biomask.dna.readers import LabelledSequence
from biomask.dna.windows import SPLITS
from biomask.errors import InputError

log = logging.getLogger(__name__)

DIGEST_BYTES = 16  # blake2b-128, as for genome windows: a collision is out of reach at any corpus size
_SPLIT_ALIASES = {
    "train": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
}


class Interned:
    """Distinct values numbered in order of first appearance: a row holds a number, not a string
    (labels, split values and sources are few; a row's own copy of each was most of its cost)."""

    def __init__(self) -> None:
        self.values: list = []
        self._codes: dict = {}

    def code(self, value: object) -> int:
        found = self._codes.get(value)
        if found is None:
            found = self._codes[value] = len(self.values)
            self.values.append(value)
        return found


class LabelledRows:
    """Every row read, as a few numbers each; cleaned bases and ids in a spill file (see module doc).

    Rows are numbered in reading order across inputs. A row the cleaning dropped (or read after a
    cleaning error) has length -1 and no bases in the spill, but keeps its id: duplicate ids are
    counted over every row read.
    """

    def __init__(self, spill: Path, cleaner: Cleaner, policy: CleaningConfig, digest_ids: bool) -> None:
        self.cleaner, self.policy = cleaner, policy
        self.sources, self.labels, self.splits = Interned(), Interned(), Interned()
        self.source, self.label, self.split = array("i"), array("i"), array("i")
        self.line = array("q")
        self.end = array("q")  # where the row's record ends in the spill (it starts where the last ended)
        self.length = array("i")  # cleaned bases at the start of the record; the id follows them
        self.digest = bytearray()  # DIGEST_BYTES per row, zeros for a dropped row
        self.id_digest = bytearray() if digest_ids else None
        self.dropped: collections.Counter = collections.Counter()  # in the order the reasons first occur
        self.error: InputError | None = None  # the first letter the policy refuses, raised after reading
        self._path, self._written = spill, 0
        self._out: IO[bytes] | None = open(spill, "wb", buffering=1 << 20)
        self._fd: int | None = None

    def __len__(self) -> int:
        return len(self.line)

    def read(self, rows: Iterable[LabelledSequence]) -> None:
        for row in rows:
            ident = row.id.encode("utf-8", "surrogatepass")
            if self.id_digest is not None:
                self.id_digest += hashlib.blake2b(ident, digest_size=DIGEST_BYTES).digest()
            self.source.append(self.sources.code(row.source))
            self.line.append(row.line)
            self.label.append(self.labels.code(row.label))
            self.split.append(self.splits.code(row.split))
            bases = self._clean(row)
            if bases is None:
                self.length.append(-1)
                self.digest += bytes(DIGEST_BYTES)
            else:
                self.length.append(len(bases))
                self.digest += hashlib.blake2b(bases, digest_size=DIGEST_BYTES).digest()
            record = (bases or b"") + ident  # bases first: the writer reads them from the record's start
            assert self._out is not None
            self._out.write(record)
            self._written += len(record)
            self.end.append(self._written)

    def _clean(self, row: LabelledSequence) -> bytes | None:
        """The row's cleaned bases, or None when the policy drops it (counted) or refuses a letter."""
        if self.error is not None:  # the run fails; reading goes on only for a reader's own errors
            return None
        try:
            chars, ambiguous = self.cleaner.clean(row.sequence, where=f"{row.source}, line {row.line}")
        except InputError as exc:
            self.error = exc
            return None
        policy = self.policy
        if (
            policy.ambiguous == "drop" and ambiguous.any()
        ) or ambiguous.mean() > policy.max_ambiguous_fraction:
            self.dropped["dropped_ambiguous"] += 1
        elif chars.size < policy.min_length:
            self.dropped["dropped_below_min_length"] += 1
        else:
            return chars.tobytes()
        return None

    def finish_reading(self) -> None:
        """Close the spill for writing and open it for reading records back."""
        if self._out is not None:
            self._out.close()
            self._out = None
        self._fd = os.open(self._path, os.O_RDONLY)

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._path.unlink(missing_ok=True)

    # ----------------------------------------------------------------------------------- reading back

    def _record(self, row: int) -> bytes:
        assert self._fd is not None
        start = self.end[row - 1] if row else 0
        return os.pread(self._fd, self.end[row] - start, start)

    def texts(self, rows: Iterable[int]) -> Iterator[str]:
        """The cleaned bases of `rows` as text (what the tokenizers take)."""
        for r in rows:
            yield self._record(r)[: self.length[r]].decode("ascii")

    def texts_and_ids(self, rows: Sequence[int]) -> tuple[list[str], list[str]]:
        records = [self._record(r) for r in rows]
        lengths = [self.length[r] for r in rows]
        return (
            [rec[:n].decode("ascii") for rec, n in zip(records, lengths)],
            [rec[n:].decode("utf-8", "surrogatepass") for rec, n in zip(records, lengths)],
        )

    def ids(self, rows: Iterable[int]) -> list[str]:
        return [self._record(r)[max(self.length[r], 0) :].decode("utf-8", "surrogatepass") for r in rows]

    def where(self, row: int) -> str:
        return f"{self.sources.values[self.source[row]]}:{self.line[row]}"

    def clean_rows(self) -> np.ndarray:
        """The rows the cleaning kept, in reading order."""
        return np.flatnonzero(np.frombuffer(self.length, dtype=np.int32) >= 0)

    def label_codes(self, rows: np.ndarray) -> np.ndarray:
        return np.frombuffer(self.label, dtype=np.int32)[rows]

    # ----------------------------------------------------------------------------------- decisions

    def repeated_ids(self, shown: int = 5) -> tuple[list[str], int]:
        """The first `shown` ids that occur more than once ("'id' (3x)", in order of first occurrence)
        and how many such ids there are."""
        assert self.id_digest is not None
        groups = _groups(_digests(self.id_digest), np.arange(len(self)))
        repeated = groups.sizes > 1
        order = np.argsort(groups.first[repeated], kind="stable")
        firsts, sizes = groups.first[repeated][order], groups.sizes[repeated][order]
        names = [
            f"'{name}' ({n}x)" for name, n in zip(self.ids(firsts[:shown].tolist()), sizes[:shown].tolist())
        ]
        return names, int(repeated.sum())

    def deduplicate(self, rows: np.ndarray, counts: collections.Counter) -> np.ndarray:
        """`rows` less exact duplicates (the first of each is kept) and, by `conflicting_labels`,
        every copy of a sequence seen with different labels; the counts and the per-class log say so."""
        if not len(rows):
            return rows
        digests = _digests(self.digest)[rows]
        groups = _groups(digests, rows)
        labels = self.label_codes(groups.members)
        mismatch = labels != labels[groups.starts][groups.group_of]
        conflict = np.logical_or.reduceat(mismatch, groups.starts)
        by_first = np.argsort(groups.first, kind="stable")  # groups in order of first occurrence
        if conflict.any() and self.policy.conflicting_labels == "error":
            g = by_first[conflict[by_first]][0]
            members = groups.members[groups.starts[g] : groups.starts[g] + groups.sizes[g]]
            names = sorted({self.labels.values[c] for c in self.label_codes(members).tolist()})
            where = ", ".join(self.where(int(m)) for m in members)
            raise InputError(f"identical sequences with different labels ({', '.join(names)}) at {where}")
        # the counts' keys are in the order a group of each kind first occurs (the manifest lists them so)
        found = {
            "dropped_conflicting_labels": int(groups.sizes[conflict].sum()) if conflict.any() else None,
            "dropped_duplicate": int((groups.sizes[~conflict] - 1).sum()) if (~conflict).any() else None,
        }
        keys = list(found) if conflict[by_first[0]] else list(reversed(found))
        for key in keys:
            if found[key] is not None:
                counts[key] += found[key]
        self._log_duplicates_per_class(groups, conflict)
        return np.sort(groups.first[~conflict])

    def _log_duplicates_per_class(self, groups: _Groups, conflict: np.ndarray) -> None:
        """A class that loses most of its records to duplicates is worth knowing about."""
        repeated = ~conflict & (groups.sizes > 1)
        if not repeated.any():
            return
        firsts = groups.first[repeated]
        order = np.argsort(firsts, kind="stable")
        labels = self.label_codes(firsts[order])
        extra = (groups.sizes[repeated] - 1)[order]
        _, first_seen = np.unique(labels, return_index=True)
        by_class: collections.Counter = collections.Counter()
        for code in labels[np.sort(first_seen)].tolist():  # classes in order of their first duplicate
            by_class[self.labels.values[code]] = int(extra[labels == code].sum())
        log.info(
            "exact duplicates removed, per class: %s",
            ", ".join(f"{label} {n:,}" for label, n in by_class.most_common()),
        )

    def given_splits(self, rows: np.ndarray) -> np.ndarray | None:
        """Each row's split (an index into SPLITS) from the split column; None when no row has
        one. A value that is not a split name is an error naming the first row that has it."""
        codes = np.frombuffer(self.split, dtype=np.int32)[rows]
        values = self.splits.values
        if all(values[c] is None for c in np.unique(codes).tolist()):
            return None
        table = np.array(
            [SPLITS.index(_SPLIT_ALIASES[v.lower()]) if _known_split(v) else -1 for v in values],
            dtype=np.int8,
        )
        splits = table[codes]
        bad = np.flatnonzero(splits < 0)
        if len(bad):
            row = int(rows[bad[0]])
            raise InputError(
                f"{self.sources.values[self.source[row]]}, line {self.line[row]}: split value "
                f"{values[self.split[row]]!r} is not one of train, val, test"
            )
        return splits


def _known_split(value: str | None) -> bool:
    return (value or "").lower() in _SPLIT_ALIASES


def stratified_split(
    labels: np.ndarray, names: Sequence[str], val: float, test: float, seed: int
) -> np.ndarray:
    """Per label (in the order of its name), a seeded permutation of its rows: the first
    round(n*test) go to test, the next round(n*val) to val, the rest to train. `labels` are codes
    into `names`; the result indexes SPLITS."""
    rng = np.random.default_rng(seed)
    assignment = np.zeros(len(labels), dtype=np.int8)
    order = np.argsort(labels, kind="stable")  # each label's rows, in row order
    codes, starts, sizes = np.unique(labels[order], return_index=True, return_counts=True)
    for i in sorted(range(len(codes)), key=lambda i: names[codes[i]]):
        members = order[starts[i] : starts[i] + sizes[i]][rng.permutation(sizes[i])]
        n_test, n_val = round(len(members) * test), round(len(members) * val)
        assignment[members[:n_test]] = SPLITS.index("test")
        assignment[members[n_test : n_test + n_val]] = SPLITS.index("val")
    return assignment


def _digests(buffer: bytearray) -> np.ndarray:
    """Digests as rows of two uint64 (compared and sorted as numbers, not 16-byte strings)."""
    return np.frombuffer(buffer, dtype=np.uint64).reshape(-1, DIGEST_BYTES // 8)


class _Groups:
    """Rows grouped by equal digest: `members` (row numbers) sorted by group, each group's rows in
    row order; `starts`/`sizes` of each group in `members`, its `first` row, and `group_of` each member."""

    def __init__(self, members: np.ndarray, starts: np.ndarray, group_of: np.ndarray) -> None:
        self.members, self.starts, self.group_of = members, starts, group_of
        self.sizes = np.diff(np.append(starts, len(members)))
        self.first = members[starts]


def _groups(digests: np.ndarray, rows: np.ndarray) -> _Groups:
    # row order breaks ties, so a group's first member is its first occurrence
    order = np.lexsort((np.arange(len(rows)), digests[:, 1], digests[:, 0]))
    ordered = digests[order]
    new = np.ones(len(order), dtype=bool)
    new[1:] = (ordered[1:] != ordered[:-1]).any(axis=1)
    return _Groups(rows[order], np.flatnonzero(new), np.cumsum(new) - 1)
