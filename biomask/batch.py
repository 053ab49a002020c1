"""Records to model batches: the collator and the per-record cuts shared by training, evaluation and
embedding (a neutral module: it imports nothing from those packages, so none of them imports another
for it).

The collator is the contract with the model:

    batch = collate([split[i] for i in idx], modality="dna", max_length=1026)
    # input_ids (B, L) int64: [CLS] tokens [SEP] for DNA, [CLS] genes for cells, [PAD]=0 after
    # attention_mask (B, L) bool; cells also values (B, L) float32 and bins (B, L) int64 (0 at
    # [CLS] and padding); labels (B,) int64 when the records carry labels; library_size (B,) float32
    # when they carry it (panel stores prepared from counts); batch (B,) int64 when they carry it
    # (stores prepared with a batch_column).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from biomask.cells.tokenize import scheme_class
from biomask.vocab import CLS_ID, PAD_ID, SEP_ID

TOKEN_FIELDS = ("values", "bins")  # token-aligned fields the collator carries besides the tokens


def n_specials(modality: str) -> int:
    """Special tokens the collator adds to a record: [CLS] ... [SEP] for DNA, [CLS] for cells."""
    return 2 if modality == "dna" else 1


def is_order_free(modality: str | None, scheme: str | None) -> bool:
    """Cells whose scheme is order-free (binned, panel): gene order carries no meaning (no positions,
    crops by subset)."""
    return modality == "cells" and scheme_class(scheme).order_free


def collate(
    records: Sequence[Mapping[str, Any]], *, modality: str = "dna", max_length: int | None = None
) -> dict[str, torch.Tensor]:
    """Pad records into a batch (see the module docstring); records longer than `max_length`
    (specials included) keep their first tokens."""
    if modality not in ("dna", "cells"):
        raise ValueError(f"modality must be 'dna' or 'cells', not {modality!r}")
    extra = n_specials(modality)
    limit = None if max_length is None else max_length - extra
    if limit is not None and limit < 1:
        raise ValueError(f"max_length {max_length} leaves no room for content")
    lengths = [len(r["tokens"]) if limit is None else min(len(r["tokens"]), limit) for r in records]
    B, L = len(records), max(lengths, default=0) + extra
    ids = np.full((B, L), PAD_ID, dtype=np.int64)
    ids[:, 0] = CLS_ID
    fields = [f for f in TOKEN_FIELDS if records and f in records[0]]
    arrays = {f: np.zeros((B, L), dtype=np.float32 if f == "values" else np.int64) for f in fields}
    for i, (record, n) in enumerate(zip(records, lengths)):
        ids[i, 1 : n + 1] = record["tokens"][:n]
        if modality == "dna":
            ids[i, n + 1] = SEP_ID
        for f in fields:
            arrays[f][i, 1 : n + 1] = record[f][:n]
    batch = {
        "input_ids": torch.from_numpy(ids),
        "attention_mask": torch.from_numpy(np.arange(L)[None, :] < (np.asarray(lengths)[:, None] + extra)),
    }
    batch.update({f: torch.from_numpy(a) for f, a in arrays.items()})
    if records and "labels" in records[0]:
        batch["labels"] = torch.tensor([int(r["labels"]) for r in records], dtype=torch.int64)
    if records and "batch" in records[0]:  # stores with a batch_column: a batch-conditioned decoder reads it
        batch["batch"] = torch.tensor([int(r["batch"]) for r in records], dtype=torch.int64)
    if records and "library_size" in records[0]:  # panel stores from counts: a count loss needs it
        batch["library_size"] = torch.tensor([float(r["library_size"]) for r in records], dtype=torch.float32)
    return batch


def model_input(record: Mapping[str, Any]) -> dict[str, Any]:
    """The fields the model reads (tokens and token-aligned fields; labels are not its business)."""
    return {k: record[k] for k in ("tokens", *TOKEN_FIELDS) if k in record}


def take(record: Mapping[str, Any], keep: np.ndarray | slice) -> dict[str, Any]:
    """The record with its tokens and token-aligned fields cut to `keep` (indices or a slice)."""
    out = dict(record)
    for name in ("tokens", *TOKEN_FIELDS):
        if name in record:
            out[name] = np.asarray(record[name])[keep]
    return out


def fit_record(record: Mapping[str, Any], limit: int, *, order_free: bool) -> Mapping[str, Any]:
    """At most `limit` content tokens of a record, chosen from the record alone: the first tokens, or
    for order-free cells the highest-valued genes (ties: the lower token id), in stored order."""
    n = len(record["tokens"])
    if n <= limit:
        return record
    if order_free and "values" in record:
        values = np.asarray(record["values"], dtype=np.float32)
        top = np.argsort(-values, kind="stable")[:limit]  # stable: ties go to the earlier (lower id) gene
        return take(record, np.sort(top))
    return take(record, slice(0, limit))
