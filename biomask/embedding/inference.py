"""Records in, one vector per record out: batched, padding-masked, independent of the batch.

What a record becomes before it reaches the model is decided per record, never per batch:

- records longer than the model's input (`inference_max_length`: what it was trained on) are cut
  deterministically — DNA and rank-encoded cells keep their first tokens (the start of the sequence,
  the top-ranked genes); binned and panel cells, whose genes are order-free, keep their
  highest-valued genes (ties: the lower token id), in stored order;
- records are sorted by length and batched, so padding is small (faster), and padding is masked in
  attention and pooling, so a record's vector does not depend on its batch-mates (equal up to
  float rounding, ~1e-6, whatever the batch size).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from biomask.models import MaskedEncoder
from biomask.training.data import TOKEN_FIELDS, collate

log = logging.getLogger(__name__)


def pick_device(device: str = "auto") -> torch.device:
    """`auto`: the GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def inference_max_length(model: MaskedEncoder, default: int | None = None) -> int:
    """The longest input (specials included) the model was trained on; `default` for models without
    a checkpoint (a randomly initialised copy), else the architecture's bound."""
    info = getattr(model, "checkpoint_info", None) or {}
    trained = (info.get("training") or {}).get("max_length")
    if trained:
        return int(trained)
    if default is not None:
        return int(default)
    return int(model.config.max_len)


def check_layer(model: MaskedEncoder, layer: int) -> None:
    """A layer the model has (as a Python list index over [embeddings, block 1, ..., block n])."""
    from biomask.errors import InputError

    n = model.config.n_layers + 1
    if not -n <= layer < n:
        raise InputError(
            f"layer {layer} does not exist: the model has {model.config.n_layers} blocks, so layer is "
            f"-{n}..{n - 1} (-1: the last block, 0: the embeddings)"
        )


def order_free(model: MaskedEncoder) -> bool:
    """Binned and panel cells: gene order carries no meaning."""
    return model.config.modality == "cells" and model.config.scheme in ("binned", "panel")


def fit_record(record: Mapping[str, Any], limit: int, *, order_free: bool) -> Mapping[str, Any]:
    """At most `limit` content tokens of a record, chosen from the record alone (see the module)."""
    n = len(record["tokens"])
    if n <= limit:
        return record
    if order_free and "values" in record:
        values = np.asarray(record["values"], dtype=np.float32)
        top = np.argsort(-values, kind="stable")[:limit]  # stable: ties go to the earlier (lower id) gene
        keep: np.ndarray | slice = np.sort(top)
    else:
        keep = slice(0, limit)
    out = dict(record)
    for name in ("tokens", *TOKEN_FIELDS):
        if name in record:
            out[name] = np.asarray(record[name])[keep]
    return out


@torch.no_grad()
def embed_records(
    model: MaskedEncoder,
    records: Sequence[Mapping[str, Any]],
    *,
    pooling: str = "mean",
    layer: int = -1,
    batch_size: int = 64,
    max_length: int | None = None,
) -> np.ndarray:
    """(len(records), dim) float32: each record's vector, in the order given (dim is d_model, or
    length * d_model with concat pooling)."""
    limit_total = max_length or inference_max_length(model)
    modality = model.config.modality
    specials = 2 if modality == "dna" else 1
    free = order_free(model)
    fitted = [fit_record(r, limit_total - specials, order_free=free) for r in records]
    lengths = np.fromiter((len(r["tokens"]) for r in fitted), dtype=np.int64, count=len(fitted))
    order = np.argsort(-lengths, kind="stable")  # longest first: similar lengths share a batch
    device = next(model.parameters()).device
    out: np.ndarray | None = None
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            batch = collate([_strip(fitted[i]) for i in index], modality=modality)
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "labels"}
            vectors = model.embed(batch, pooling=pooling, layer=layer).float().cpu().numpy()
            if out is None:
                out = np.empty((len(fitted), vectors.shape[1]), dtype=np.float32)
            elif vectors.shape[1] != out.shape[1]:
                raise ValueError(
                    f"{pooling} pooling needs records of one length: vectors of {out.shape[1]} and {vectors.shape[1]} values"
                )
            out[index] = vectors
    finally:
        model.train(was_training)
    if out is None:  # no records
        out = np.empty((0, model.config.d_model), dtype=np.float32)
    return out


def _strip(record: Mapping[str, Any]) -> dict[str, Any]:
    """The fields the collator reads (labels are not the model's business here)."""
    return {k: record[k] for k in ("tokens", *TOKEN_FIELDS) if k in record}
