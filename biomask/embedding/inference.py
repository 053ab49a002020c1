"""Records in, one vector per record out: batched, padding-masked, independent of the batch.

What a record becomes before it reaches the model is decided per record, never per batch:

- records longer than the model's input (`inference_max_length`: what it was trained on; a CNN,
  which has no position embeddings, reads up to four receptive fields whole) follow a
  policy (`long_records`, see `LONG_RECORDS`). `first` (what `biomask embed` does, with a warning):
  DNA and rank-encoded cells keep their first tokens (the start of the sequence, the top-ranked
  genes); binned and panel cells, whose genes are order-free, keep their highest-valued genes (ties:
  the lower token id), in stored order. For DNA, `biomask evaluate` also offers `window` (the whole
  record in evenly spaced windows of the model's length — the first starts at the record's start,
  the last ends at its end, neighbours overlap as little as possible — embedded one by one and pooled:
  the mean of the window vectors, or for concat pooling their concatenation in order), `centre` (the
  middle tokens) and `refuse` (an error naming the record). Cells always use `first`;
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

from biomask.batch import collate, fit_record, is_order_free, model_input, n_specials, take
from biomask.models import MaskedEncoder

log = logging.getLogger(__name__)

# What happens to a record longer than the model's input (DNA; cells always keep their top genes).
LONG_RECORDS = ("first", "window", "centre", "refuse")


def pick_device(device: str = "auto") -> torch.device:
    """`auto`: the GPU when there is one, else the CPU. A device torch cannot use is a config error
    (exit 2) here, not a CUDA traceback at the first batch."""
    from biomask.errors import ConfigError

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device={device!r}: use auto, cpu, cuda or cuda:N") from None
    if chosen.type not in ("cpu", "cuda"):  # mps, xla, meta...: parsed by torch, never tested here
        raise ConfigError(
            f"device={device!r}: biomask runs on cpu or cuda[:N] (auto picks); "
            + (
                "Apple GPUs (mps) are not supported yet: use device=cpu"
                if chosen.type == "mps"
                else "use auto or cpu"
            )
        )
    if chosen.type == "cuda" and (
        not torch.cuda.is_available() or (chosen.index or 0) >= torch.cuda.device_count()
    ):
        raise ConfigError(
            f"device={device}: torch sees {torch.cuda.device_count()} GPU(s) here; use device=auto or cpu"
        )
    return chosen


# A convolutional encoder has no input bound: it reads a record whole up to this many receptive
# fields (the tiny CNN: 1,014 tokens), beyond that in windows of that length. Why: cutting a 200-base
# record into two 128-base windows (its training crops) gave the probe worse features — E. coli gene
# starts, self-pretrained CNNs: 0.611 windowed against 0.658 whole (mean_layers, 3 pretraining
# seeds) — while windows many receptive fields long lose only their edges' context.
CNN_RECEPTIVE_FIELDS = 4


def inference_max_length(model: MaskedEncoder, default: int | None = None) -> int:
    """The longest input (specials included) the model reads in one piece: what it was trained on;
    `default` for models without a checkpoint (a randomly initialised copy), else the architecture's
    bound. A kind that says how far one output reads (`receptive_field`: the cnn, which has no
    position embeddings) reads longer: `CNN_RECEPTIVE_FIELDS` of them."""
    info = getattr(model, "checkpoint_info", None) or {}
    trained = (info.get("training") or {}).get("max_length")
    length = int(trained or default or model.config.max_len)
    receptive_field = getattr(model, "receptive_field", None)
    if receptive_field is not None:
        specials = n_specials(model.config.modality)
        length = max(length, CNN_RECEPTIVE_FIELDS * receptive_field(model.config) + specials)
    return length


def check_layer(model: MaskedEncoder, layer: int) -> None:
    """A layer the model has (as a Python list index over [embeddings, block 1, ..., block n])."""
    from biomask.errors import InputError

    n = model.config.n_layers + 1
    if not -n <= layer < n:
        raise InputError(
            f"layer {layer} does not exist: the model has {model.config.n_layers} blocks, so layer is "
            f"-{n}..{n - 1} (-1: the last block, 0: the embeddings)"
        )


def check_pooling(
    model: MaskedEncoder,
    pooling: str,
    name: str = "the checkpoint",
    layer: int = -1,
    among: tuple[str, ...] | None = None,
) -> None:
    """A pooling the model offers (`model.poolings`; a profile model has one vector per cell, a CNN
    no [CLS] summary) and the caller can use (`among`: embed has no concat, whose width follows each
    record's length); mean_layers reads every block, so it takes no `layer`."""
    from biomask.errors import InputError
    from biomask.models.model import POOLINGS

    offered = [p for p in getattr(model, "poolings", POOLINGS) if among is None or p in among]
    if pooling not in offered:
        raise InputError(
            f"pooling={pooling}: {name} ({model.config.kind} model) offers {', '.join(offered)}; "
            "set pooling to one of them"
        )
    if pooling == "mean_layers" and layer != -1:
        raise InputError(
            f"pooling=mean_layers concatenates every block of {name}; leave layer at -1 (not {layer}) "
            "or pick one layer with pooling=mean"
        )


def vector_width(model: MaskedEncoder, layer: int, pooling: str = "mean") -> int:
    """The width of one record's vector at `layer` (any pooling but concat): d_model, except where a
    model's layers differ in width (the profile MLP: input genes, hidden, latent) and say so
    through `layer_width`, and mean_layers (every block's d_model)."""
    if pooling == "mean_layers":
        return model.config.n_layers * model.config.d_model
    width = getattr(model, "layer_width", None)
    return int(width(layer)) if callable(width) else model.config.d_model


def order_free(model: MaskedEncoder) -> bool:
    """Binned and panel cells: gene order carries no meaning."""
    return is_order_free(model.config.modality, model.config.scheme)


def record_policy(model: MaskedEncoder, long_records: str) -> str:
    """The policy that applies to this model's records: cells always keep their top genes (`first`)."""
    if long_records not in LONG_RECORDS:
        raise ValueError(f"long_records must be one of {', '.join(LONG_RECORDS)}, not {long_records!r}")
    return long_records if model.config.modality == "dna" else "first"


def window_starts(n: int, limit: int) -> np.ndarray:
    """Starts of the fewest windows of `limit` tokens that cover `n` tokens, evenly spaced (the first
    at 0, the last ending at n)."""
    if n <= limit:
        return np.zeros(1, dtype=np.int64)
    count = -(-n // limit)
    return np.round(np.linspace(0, n - limit, count)).astype(np.int64)


def record_pieces(
    record: Mapping[str, Any], limit: int, *, policy: str, order_free: bool
) -> list[Mapping[str, Any]]:
    """What the model sees of one record: the record itself when it fits, else per `policy` (one piece
    for first / centre, several for window). `refuse` is the caller's check (`check_long_records`)."""
    n = len(record["tokens"])
    if n <= limit or policy == "first":
        return [fit_record(record, limit, order_free=order_free)]
    if policy == "centre":
        start = (n - limit) // 2
        return [_slice(record, start, limit)]
    if policy == "window":
        return [_slice(record, int(s), limit) for s in window_starts(n, limit)]
    raise ValueError(f"a record of {n} tokens exceeds the model's {limit} (long_records={policy!r})")


def _slice(record: Mapping[str, Any], start: int, length: int) -> dict[str, Any]:
    return take(record, slice(start, start + length))


def check_long_records(
    records: Sequence[Mapping[str, Any]], limit: int, policy: str, *, where: str = "the input"
) -> int:
    """How many records are longer than `limit` content tokens; with `refuse`, any is an InputError."""
    lengths = np.fromiter((len(r["tokens"]) for r in records), dtype=np.int64, count=len(records))
    long = int((lengths > limit).sum())
    if long and policy == "refuse":
        from biomask.errors import InputError

        first = int(np.flatnonzero(lengths > limit)[0])
        raise InputError(
            f"{where}: {long} of {len(records)} records are longer than the model's input of {limit} "
            f"tokens (record {first} has {int(lengths[first])}; long_records=refuse); set "
            "long_records=window (embed windows and pool them) or long_records=centre (the middle tokens)"
        )
    return long


def pool_pieces(vectors: np.ndarray, owners: np.ndarray, n: int, pooling: str) -> np.ndarray:
    """Piece vectors -> one vector per record: the mean over a record's pieces, their per-feature
    maximum (max: a motif anywhere in the record), or (concat) their concatenation in order (every
    record must then have as many pieces)."""
    counts = np.bincount(owners, minlength=n)
    if len(vectors) == n and bool((counts == 1).all()):
        return vectors[np.argsort(owners, kind="stable")]
    if pooling == "concat":
        if len(set(counts.tolist())) != 1:
            raise ValueError("concat pooling needs records of one length (as many windows each)")
        order = np.argsort(owners, kind="stable")  # pieces are listed in order within a record
        return vectors[order].reshape(n, -1)
    if pooling == "max":
        out = np.full((n, vectors.shape[1]), -np.inf, dtype=np.float32)
        np.maximum.at(out, owners, vectors)
        return out
    out = np.zeros((n, vectors.shape[1]), dtype=np.float64)
    np.add.at(out, owners, vectors)
    return (out / np.maximum(counts, 1)[:, None]).astype(np.float32)


def embed_records(
    model: MaskedEncoder,
    records: Sequence[Mapping[str, Any]],
    *,
    pooling: str = "mean",
    layer: int = -1,
    batch_size: int = 64,
    max_length: int | None = None,
    long_records: str = "first",
) -> np.ndarray:
    """(len(records), dim) float32: each record's vector, in the order given (dim is d_model, or
    length * d_model with concat pooling). Records longer than the model's input: see the module."""
    return embed_records_pooled(
        model,
        records,
        poolings=[pooling],
        layer=layer,
        batch_size=batch_size,
        max_length=max_length,
        long_records=long_records,
    )[pooling]


@torch.no_grad()
def embed_records_pooled(
    model: MaskedEncoder,
    records: Sequence[Mapping[str, Any]],
    *,
    poolings: Sequence[str],
    layer: int = -1,
    batch_size: int = 64,
    max_length: int | None = None,
    long_records: str = "first",
) -> dict[str, np.ndarray]:
    """`embed_records` for several poolings at once, {pooling: (len(records), dim)}: one forward pass
    per batch where the model offers `embed_pooled` (evaluate choosing a pooling on val embeds every
    candidate: three passes over 8,000 records became one)."""
    poolings = list(dict.fromkeys(poolings))
    limit_total = max_length or inference_max_length(model)
    modality = model.config.modality
    specials = n_specials(modality)
    free = order_free(model)
    policy = record_policy(model, long_records)
    check_long_records(records, limit_total - specials, policy)
    fitted: list[Mapping[str, Any]] = []
    owners_list: list[int] = []
    for i, r in enumerate(records):
        pieces = record_pieces(r, limit_total - specials, policy=policy, order_free=free)
        fitted += pieces
        owners_list += [i] * len(pieces)
    owners = np.asarray(owners_list, dtype=np.int64)
    lengths = np.fromiter((len(r["tokens"]) for r in fitted), dtype=np.int64, count=len(fitted))
    order = np.argsort(-lengths, kind="stable")  # longest first: similar lengths share a batch
    device = next(model.parameters()).device
    shared = hasattr(model, "embed_pooled") and len(poolings) > 1
    out: dict[str, np.ndarray] = {}
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            batch = collate([model_input(fitted[i]) for i in index], modality=modality)
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "labels"}
            pooled = (
                model.embed_pooled(batch, poolings, layer=layer)
                if shared
                else {p: model.embed(batch, pooling=p, layer=layer) for p in poolings}
            )
            for pooling, tensor in pooled.items():
                vectors = tensor.float().cpu().numpy()
                if pooling not in out:
                    out[pooling] = np.empty((len(fitted), vectors.shape[1]), dtype=np.float32)
                elif vectors.shape[1] != out[pooling].shape[1]:
                    raise ValueError(
                        f"{pooling} pooling needs records of one length: vectors of "
                        f"{out[pooling].shape[1]} and {vectors.shape[1]} values"
                    )
                out[pooling][index] = vectors
    finally:
        model.train(was_training)
    if not out:  # no records
        return {p: np.empty((0, vector_width(model, layer, p)), dtype=np.float32) for p in poolings}
    return {p: pool_pieces(out[p], owners, len(records), p) for p in poolings}
