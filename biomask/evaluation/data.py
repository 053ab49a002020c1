"""A labelled token store, seen the way evaluation needs it: every record with its label, the
original split it came from, and (for baselines) its sequence or expression vector."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from sklearn.model_selection import train_test_split

from biomask.errors import InputError
from biomask.evaluation.config import SplitSpec
from biomask.store import TokenStore, split_columns


@dataclass
class LabelledRecords:
    """All labelled records of a store, in a fixed order (split by split, then record by record)."""

    store: TokenStore
    labels: np.ndarray  # int64, one per record
    origin: np.ndarray  # the prep split each record came from ("train" / "val" / "test")
    locations: list[tuple[str, int]]  # (split, index) of each record in the store
    batches: np.ndarray | None = None  # int64 batch code per record (a store with a batch_column)
    _groups: dict = field(default_factory=dict, repr=False, compare=False)  # by (splits.group, min_shared)

    @property
    def label_names(self) -> list[str]:
        return list(self.store.label_names or [])

    @property
    def modality(self) -> str:
        return self.store.modality

    def __len__(self) -> int:
        return len(self.labels)

    @cached_property
    def _splits(self) -> dict:
        """The store's splits opened once (their shards keep their memory maps between reads)."""
        return {name: self.store.split(name) for name in self.store.splits}

    def record(self, i: int) -> dict:
        split, index = self.locations[i]
        return self._splits[split][index]

    def groups(self, spec: SplitSpec) -> np.ndarray | None:
        """Each record's group under `splits.group` (biomask/evaluation/groups.py), None for none."""
        if spec.group == "none":
            return None
        key = (spec.group, spec.min_shared if spec.group == "shared_sequence" else None)
        if key not in self._groups:
            where = f"token store {self.store.root}"
            if spec.group == "batch":
                if self.batches is None:
                    raise InputError(
                        f"{where} has no batches: splits.group=batch needs a cells store prepared with a "
                        "batch_column (biomask prep cells ... batch_column=donor)"
                    )
                self._groups[key] = np.unique(self.batches, return_inverse=True)[1]
            else:
                if self.modality != "dna":
                    raise InputError(
                        f"{where} holds {self.modality} records: splits.group=shared_sequence groups DNA "
                        "records by shared bases; for cells, splits.group=batch keeps batches together"
                    )
                from biomask.evaluation.groups import shared_sequence_groups

                self._groups[key] = shared_sequence_groups(self.sequences, spec.min_shared)
        return self._groups[key]

    @cached_property
    def sequences(self) -> list[str]:
        """DNA records decoded back to bases (for the k-mer and one-hot baselines)."""
        from biomask.dna.tokenizers import load_tokenizer

        tokenizer = load_tokenizer(self.store.root)
        return [tokenizer.decode(self.record(i)["tokens"]) for i in range(len(self))]

    @cached_property
    def expression(self) -> sp.csr_matrix:
        """Cells × genes matrix of the stored values (log-normalised expression), for the PCA baseline."""
        # built as CSR directly (int32 indices, float32 values, the columns no record uses dropped by a
        # remap): the COO route with int64 row and column arrays and a column slice's copy took ~59
        # bytes a stored value — 5.7 GB for 50,000 cells of a 2,000-gene panel
        # A panel record stores every gene, zeros included: those zeros are left out here (86 % of a
        # panel's values; stored, 200,000 cells of a 2,000-gene panel took over 12 GB), while a gene
        # any record names keeps its column, as before, whatever its values
        vocab = int(self.store.manifest["tokenizer"]["vocab_size"])
        cols, vals = [], []
        named = np.zeros(vocab, dtype=bool)
        indptr = np.zeros(len(self) + 1, dtype=np.int64)
        for i in range(len(self)):
            rec = self.record(i)
            tokens = np.asarray(rec["tokens"], dtype=np.int32)
            values = np.asarray(rec["values"], dtype=np.float32)
            named[tokens] = True
            nonzero = values != 0
            cols.append(tokens[nonzero])
            vals.append(values[nonzero])
            indptr[i + 1] = indptr[i] + cols[-1].size
        indices = np.concatenate(cols) if cols else np.zeros(0, dtype=np.int32)
        data = np.concatenate(vals) if vals else np.zeros(0, dtype=np.float32)
        del cols, vals
        used = np.flatnonzero(named)
        remap = np.full(vocab, -1, dtype=np.int32)
        remap[used] = np.arange(used.size, dtype=np.int32)
        matrix = sp.csr_matrix((data, remap[indices], indptr), shape=(len(self), used.size))
        matrix.sum_duplicates()  # canonical, as the COO route gave it
        return matrix


def load_labelled(root: str | os.PathLike) -> LabelledRecords:
    """Open a labelled token store; a store without labels is a clear error."""
    store = TokenStore(root)
    if not store.label_names or "labels" not in store.manifest.get("record_fields", {}):
        raise InputError(
            f"token store {Path(root)} has no labels: prepare a labelled set (a label column / labelled table) "
            "to evaluate on"
        )
    labels, origin, locations, batches = [], [], [], []
    with_batches = "batch" in store.manifest.get("record_fields", {})
    for name in store.splits:
        split = store.split(name)
        values = split.record_field("labels")
        labels.append(values)
        if with_batches:
            batches.append(split.record_field("batch"))
        origin += [name] * len(values)
        locations += [(name, i) for i in range(len(values))]
    if not locations:
        raise InputError(f"token store {Path(root)} holds no records")
    labels_all = np.concatenate(labels).astype(np.int64)
    present = np.unique(labels_all)
    if present.size < 2:
        names = [store.label_names[i] for i in present if 0 <= i < len(store.label_names)]
        raise InputError(
            f"token store {Path(root)} has one class only ({', '.join(map(str, names))}, "
            f"{labels_all.size} records): a classifier cannot be evaluated on it; check the label column "
            "the store was prepared with"
        )
    if present.size > labels_all.size / 2:
        # an id column given as the label: sklearn fits one class per record for minutes, and
        # says only that classes outnumber half the samples
        singletons = int((np.bincount(labels_all) == 1).sum())
        raise InputError(
            f"token store {Path(root)} has {present.size:,} classes among {labels_all.size:,} records "
            f"({singletons:,} with one record each): a classifier cannot learn classes it sees once; is "
            "the label column an identifier? Prepare the store with the column of the classes"
        )
    batch_codes = np.concatenate(batches).astype(np.int64) if with_batches else None
    return LabelledRecords(store, labels_all, np.array(origin), locations, batch_codes)


def seed_split(
    data: LabelledRecords, spec: SplitSpec, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) record indices for one seed: the store's splits, or a stratified resample."""
    if spec.mode == "store":
        parts = tuple(np.flatnonzero(data.origin == s) for s in ("train", "val", "test"))
        empty = [s for s, part in zip(("train", "val", "test"), parts) if part.size == 0]
        if empty:
            columns = split_columns(data.store.manifest.get("config") or {})
            change = (
                f"or mark some records {' / '.join(empty)} in the input's split column ({', '.join(columns)}) "
                "and prepare it again"
                if columns
                else "or prepare the store with larger split fractions"
            )
            raise InputError(
                f"token store {data.store.root}: the {' and '.join(empty)} split{'s are' if len(empty) > 1 else ' is'} "
                "empty, and splits.mode=store evaluates on the store's own splits; use splits.mode=resample "
                f"(fresh stratified splits of all records) {change}"
            )
        return parts  # type: ignore[return-value]
    groups = data.groups(spec)
    if groups is not None:
        from biomask.evaluation.groups import grouped_split

        where = f"token store {data.store.root}, splits.group={spec.group}"
        advice = (
            "raise splits.min_shared (a repeat may link unrelated records), lower splits.val / splits.test, "
            "or use splits.group=none"
            if spec.group == "shared_sequence"
            else "give splits.val and splits.test room for whole batches, use a set with more batches, or "
            "splits.group=none"
        )
        train, val, test = grouped_split(data.labels, groups, spec.val, spec.test, seed, where, advice)
    else:
        everything = np.arange(len(data))
        counts = np.bincount(data.labels)
        stratify = data.labels if counts[counts > 0].min() >= 3 else None  # classes too small to stratify
        try:
            rest, test = train_test_split(
                everything, test_size=spec.test, stratify=stratify, random_state=seed
            )
            val_fraction = spec.val / (1.0 - spec.test)
            train, val = train_test_split(
                rest,
                test_size=val_fraction,
                stratify=None if stratify is None else data.labels[rest],
                random_state=seed,
            )
        except ValueError as exc:  # too few records for the fractions
            raise InputError(
                f"token store {data.store.root}: cannot split {len(data)} records into splits.val={spec.val} "
                f"and splits.test={spec.test} ({exc})"
            ) from None
    if min(train.size, val.size, test.size) == 0 or np.unique(data.labels[train]).size < 2:
        raise InputError(
            f"token store {data.store.root}: {len(data)} records are too few for splits.val={spec.val} and "
            f"splits.test={spec.test} (train {train.size}, val {val.size}, test {test.size}, training classes "
            f"{np.unique(data.labels[train]).size}); use a larger labelled set"
        )
    return np.sort(train), np.sort(val), np.sort(test)
