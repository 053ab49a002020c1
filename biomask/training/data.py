"""From token-store records to model batches: training crops, and the step-indexed, rank-sharded,
seeded order of the training data. The collator (`collate`, re-exported here) lives in
`biomask.batch`, shared with evaluation and embedding.

The training order is a pure function of (seed, epoch, step): epoch e visits a permutation of the
split seeded by (seed, e); optimizer step s takes the next `global_batch` records of it, split into
micro-batches and ranks. So the data position is just the step, and a resumed run reads exactly
what the interrupted one would have read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from biomask.batch import TOKEN_FIELDS, collate, is_order_free, n_specials, take
from biomask.cells.tokenize import Scheme, scheme_class
from biomask.errors import InputError
from biomask.store import TokenSplit, TokenStore

__all__ = ["TOKEN_FIELDS", "DataSpec", "TrainingData", "collate", "crop", "eval_batches"]


@dataclass(frozen=True)
class DataSpec:
    """What the model and collator need to know about a token store."""

    modality: str  # dna | cells
    scheme: str | None  # cells: binned | rank | panel
    vocab_size: int
    n_bins: int
    tokenizer_sha256: str | None

    @property
    def n_specials(self) -> int:
        """Specials the collator adds around a record: [CLS] [SEP] for DNA, [CLS] for cells."""
        return n_specials(self.modality)

    @property
    def order_free(self) -> bool:
        """Gene order carries no meaning (the cell scheme's `order_free`): no positions, crops by subset."""
        return is_order_free(self.modality, self.scheme)

    @property
    def cell_scheme(self) -> type[Scheme] | None:
        """The cells scheme's class (what its records imply, see biomask.cells.tokenize); None for DNA."""
        return scheme_class(self.scheme) if self.modality == "cells" else None

    @property
    def random_crop(self) -> bool:
        """Training crops long records at random: DNA windows, cells unless the scheme keeps its first
        tokens (rank: the order is the information)."""
        return self.cell_scheme is None or self.cell_scheme.random_crop

    @property
    def has_bins(self) -> bool:
        """Records carry value bins (binned cells)."""
        return self.cell_scheme is not None and self.cell_scheme.writes_bins()

    @property
    def complete_profile(self) -> bool:
        """Records list every gene the input measures, zeros included (panel)."""
        return self.cell_scheme is not None and self.cell_scheme.complete_profile

    @classmethod
    def from_store(cls, store: TokenStore) -> DataSpec:
        m = store.manifest
        tok = m.get("tokenizer") or {}
        modality = m.get("modality")
        if modality not in ("dna", "cells"):
            raise InputError(
                f"{store.root}/manifest.json: modality {modality!r} is neither 'dna' nor 'cells'"
            )
        if "vocab_size" not in tok:
            raise InputError(
                f"{store.root}/manifest.json: tokenizer.vocab_size is missing; re-run the prep stage"
            )
        scheme = m.get("scheme") if modality == "cells" else None
        if modality == "cells":
            fields = set(m.get("token_fields", {}))
            needed = {"tokens", *scheme_class(scheme, f"{store.root}/manifest.json").fields}
            if not needed <= fields:
                raise InputError(
                    f"{store.root}: a {scheme} cells store needs token fields {sorted(needed)}, has {sorted(fields)}"
                )
        return cls(
            modality=modality,
            scheme=scheme,
            vocab_size=int(tok["vocab_size"]),
            n_bins=int(m.get("n_bins") or 0),
            tokenizer_sha256=tok.get("sha256"),
        )


def crop(
    record: Mapping[str, Any], limit: int, rng: np.random.Generator, *, order_free: bool
) -> dict[str, Any]:
    """At most `limit` tokens of a record: a random window, or a random subset of genes (order-free
    cells, kept in their stored order)."""
    n = len(record["tokens"])
    if n <= limit:
        return dict(record)
    if order_free:
        keep = np.sort(rng.choice(n, size=limit, replace=False))
    else:
        start = int(rng.integers(0, n - limit + 1))
        keep = slice(start, start + limit)
    return take(record, keep)


class TrainingData:
    """The training split read in a seeded, rank-sharded order that depends only on the step."""

    def __init__(
        self,
        split: TokenSplit,
        spec: DataSpec,
        *,
        max_length: int,
        crop: str,
        seed: int,
        micro_batch_size: int,
        grad_accum: int,
        world_size: int,
        rank: int,
        where: str = "train split",
    ) -> None:
        self.split, self.spec = split, spec
        self.max_length, self.crop_mode, self.seed = max_length, crop, seed
        self.micro_batch_size, self.grad_accum = micro_batch_size, grad_accum
        self.world_size, self.rank = world_size, rank
        self.global_batch = micro_batch_size * grad_accum * world_size
        self.steps_per_epoch = len(split) // self.global_batch
        if self.steps_per_epoch == 0:
            raise InputError(
                f"{where} has {len(split)} records, fewer than one global batch "
                f"({micro_batch_size} x {grad_accum} accumulation x {world_size} ranks = {self.global_batch}); "
                "lower train.micro_batch_size or train.grad_accum"
            )
        self._epoch, self._perm = -1, np.zeros(0, dtype=np.int64)

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.split))
            self._epoch = epoch
        return self._perm

    def indices(self, step: int, micro: int) -> np.ndarray:
        """Record indices of this rank's micro-batch `micro` of optimizer step `step`."""
        epoch, position = divmod(step, self.steps_per_epoch)
        start = position * self.global_batch + (micro * self.world_size + self.rank) * self.micro_batch_size
        return self.permutation(epoch)[start : start + self.micro_batch_size]

    def batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        epoch = self.epoch_of(step)
        limit = self.max_length - self.spec.n_specials
        records = []
        for index in self.indices(step, micro).tolist():
            record = self.split[index]
            if len(record["tokens"]) > limit and self.crop_mode == "random" and self.spec.random_crop:
                rng = np.random.default_rng([self.seed, epoch, index])
                record = crop(record, limit, rng, order_free=self.spec.order_free)
            records.append(record)
        return collate(records, modality=self.spec.modality, max_length=self.max_length)


def eval_batches(
    split: TokenSplit,
    spec: DataSpec,
    *,
    max_length: int,
    batch_size: int,
    n_batches: int,
    world_size: int,
    rank: int,
    where: str = "the evaluation split",
) -> list[dict[str, torch.Tensor]]:
    """A fixed held-out set: the split's first records (first tokens of each), sharded over ranks.

    Every rank gets the same number of equal-sized batches (ZeRO-3 forwards are collective)."""
    rounds = min(n_batches, len(split) // (world_size * batch_size))
    if rounds == 0:  # a small split: one round of smaller batches
        batch_size, rounds = len(split) // world_size, 1
    if batch_size == 0:
        raise InputError(
            f"{where} has {len(split)} records, fewer than the {world_size} process(es); "
            "choose another data.eval_split (e.g. test) or prepare the store with a validation split"
        )
    batches = []
    for b in range(rounds):
        start = (b * world_size + rank) * batch_size
        records = [split[i] for i in range(start, start + batch_size)]
        batches.append(collate(records, modality=spec.modality, max_length=max_length))
    return batches
