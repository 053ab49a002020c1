"""Fine-tuning an encoder with a classification head through the DeepSpeed engine, read top to bottom.

1. model    the encoder (pretrained weights, or a seeded random initialisation) and a linear head on its
            pooled features; the masked-prediction head and MAE decoder are frozen (not used here)
2. engine   torch AdamW with two parameter groups — encoder at `lr`, head at `head_lr` — handed to
            `deepspeed.initialize` with the ZeRO preset `zero_stage` (fp32 on CPU, bf16 on GPU); one
            process, so several engines (one per seed and method) run one after another in one process
3. loop     seeded batches of the training records; every `eval_every` steps the validation MCC; the
            test predictions of the best validation step so far are kept (so the reported test score
            is that of the best-on-validation weights, under every ZeRO stage, without copying
            partitioned weights); stop after `patience` evaluations without improvement, or `max_steps`

Step 0 is evaluated too: the untrained head is the baseline the fine-tuning must beat on validation.
Records longer than the model's input are cut as for embeddings (`biomask.embedding.inference.fit_record`).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import matthews_corrcoef
from torch import nn

from biomask.embedding.inference import fit_record, order_free
from biomask.models import MaskedEncoder
from biomask.training.data import TOKEN_FIELDS, collate

log = logging.getLogger(__name__)


@dataclass
class FinetuneSettings:
    """What `biomask evaluate`'s `finetune:` section sets (see biomask.evaluation.config.FinetuneSpec)."""

    max_steps: int = 300
    batch_size: int = 32
    lr: float = 1e-4
    head_lr: float = 1e-3
    weight_decay: float = 0.01
    eval_every: int = 25
    patience: int = 4
    zero_stage: int = 0


@dataclass
class FinetuneResult:
    test_predictions: np.ndarray
    best_step: int
    best_val_mcc: float
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)  # {"step", "val_mcc", "train_loss"}


class Classifier(nn.Module):
    """Encoder features (pooled) -> linear head -> logits."""

    def __init__(
        self,
        encoder: MaskedEncoder,
        n_classes: int,
        *,
        pooling: str,
        layer: int = -1,
        feature_dim: int | None = None,  # concat pooling: length * d_model
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling, self.layer = pooling, layer
        # The pretraining head and decoder take no part in classification: frozen, so the optimizer
        # and ZeRO leave them alone.
        for module in (encoder.head, encoder.decoder):
            if module is not None:
                module.requires_grad_(False)
        self.head = nn.Linear(feature_dim or encoder.config.d_model, n_classes)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.encoder.features(batch, self.pooling, self.layer))


def _model_input(record: Mapping[str, Any]) -> dict[str, Any]:
    return {k: record[k] for k in ("tokens", *TOKEN_FIELDS) if k in record}


class Batches:
    """Records cut to the model's input once; batches collated on demand (eval: once, sorted by length)."""

    def __init__(
        self, records: Sequence[Mapping[str, Any]], *, modality: str, limit: int, free: bool
    ) -> None:
        self.modality = modality
        self.records = [_model_input(fit_record(r, limit, order_free=free)) for r in records]

    def collate(self, index: np.ndarray) -> dict[str, torch.Tensor]:
        return collate([self.records[i] for i in index], modality=self.modality)


@torch.no_grad()
def _predict(
    engine: Any, batches: list[tuple[np.ndarray, dict[str, torch.Tensor]]], n: int, device
) -> np.ndarray:
    engine.eval()
    out = np.empty(n, dtype=np.int64)
    for index, batch in batches:
        logits = engine({k: v.to(device) for k, v in batch.items()})
        out[index] = logits.argmax(-1).cpu().numpy()
    engine.train()
    return out


def _engine_environment() -> None:
    """One process: rank variables for torch.distributed, the process group (gloo on CPU) once."""
    from biomask.training.distributed import init_process_group, setup_env

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    dist_env = setup_env()
    if dist_env.world_size != 1:
        from biomask.errors import InputError

        raise InputError(
            f"fine-tuning in `biomask evaluate` runs as one process, but {dist_env.launcher} started "
            f"{dist_env.world_size}; run evaluate without torchrun/srun tasks"
        )
    init_process_group(dist_env)


def finetune(
    encoder: MaskedEncoder,
    records: Sequence[Mapping[str, Any]],
    labels: np.ndarray,
    split: tuple[np.ndarray, np.ndarray, np.ndarray],
    *,
    n_classes: int,
    settings: FinetuneSettings,
    seed: int,
    max_length: int,
    pooling: str = "mean",
    layer: int = -1,
) -> FinetuneResult:
    """Fine-tune `encoder` (modified in place: pass a copy) on records[train]; see the module docstring."""
    import deepspeed

    from biomask.training.ds_config import preset_config

    train, val, test = split
    _engine_environment()
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    precision = "bf16" if device.type == "cuda" else "fp32"

    # 1. The model: the encoder and a head initialised from the seed.
    encoder = encoder.float()
    modality = encoder.config.modality
    limit = max_length - (2 if modality == "dna" else 1)
    batches = Batches(records, modality=modality, limit=limit, free=order_free(encoder))
    feature_dim = None
    if pooling == "concat":  # the head's width follows the records' length
        with torch.no_grad():
            feature_dim = encoder.eval().features(batches.collate(train[:1]), pooling, layer).shape[1]
    torch.manual_seed(seed)
    model = Classifier(encoder, n_classes, pooling=pooling, layer=layer, feature_dim=feature_dim)

    # 2. The engine: AdamW with separate encoder / head learning rates, the ZeRO preset.
    def group(params: list[nn.Parameter], lr: float) -> list[dict[str, Any]]:
        trainable = [p for p in params if p.requires_grad]
        return [
            {
                "params": [p for p in trainable if p.dim() >= 2],
                "lr": lr,
                "weight_decay": settings.weight_decay,
            },
            {"params": [p for p in trainable if p.dim() < 2], "lr": lr, "weight_decay": 0.0},
        ]

    groups = group(list(model.encoder.parameters()), settings.lr) + group(
        list(model.head.parameters()), settings.head_lr
    )
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], betas=(0.9, 0.98), eps=1e-8)
    ds_config = preset_config(settings.zero_stage, micro_batch_size=settings.batch_size, precision=precision)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    val_batches = list(_subset(batches, val, max(settings.batch_size, 64)))
    test_batches = list(_subset(batches, test, max(settings.batch_size, 64)))
    y = torch.as_tensor(labels, dtype=torch.int64)

    # 3. The loop: seeded batches, validation every eval_every steps, best-on-val test predictions.
    rng = np.random.default_rng([seed, 7])
    order, position = rng.permutation(train), 0
    history: list[dict[str, float]] = []

    def evaluate(step: int, loss: float) -> float:
        predicted = _predict(engine, val_batches, len(val), device)
        mcc = float(matthews_corrcoef(labels[val], predicted)) if len(val) else 0.0
        history.append({"step": step, "val_mcc": mcc, "train_loss": loss})
        return mcc

    best_mcc = evaluate(0, float("nan"))
    best_step, best_test = 0, _predict(engine, test_batches, len(test), device)
    waited, step, window = 0, 0, []
    engine.train()
    while step < settings.max_steps:
        if position + settings.batch_size > len(order):  # a new epoch: a new permutation
            order, position = rng.permutation(train), 0
        index = order[position : position + min(settings.batch_size, len(order))]
        position += len(index)
        batch = {k: v.to(device) for k, v in batches.collate(index).items()}
        logits = engine(batch)
        loss = F.cross_entropy(logits.float(), y[index].to(device))
        engine.backward(loss)
        engine.step()
        step += 1
        window.append(loss.item())
        if step % settings.eval_every == 0 or step == settings.max_steps:
            mcc = evaluate(step, float(np.mean(window)))
            window = []
            if mcc > best_mcc:
                best_mcc, best_step, waited = mcc, step, 0
                best_test = _predict(engine, test_batches, len(test), device)
            else:
                waited += 1
                if waited >= settings.patience:
                    break
    log.info(
        "fine-tune (seed %d, ZeRO-%d): best val MCC %.3f at step %d of %d (untrained head: %.3f)",
        seed,
        settings.zero_stage,
        best_mcc,
        best_step,
        step,
        history[0]["val_mcc"],
    )
    with contextlib.suppress(Exception):  # release the engine's buffers before the next one
        engine.destroy()
    return FinetuneResult(best_test, best_step, best_mcc, step, history)


def _subset(batches: Batches, index: np.ndarray, batch_size: int):
    """Fixed, length-sorted batches of some records: (positions within `index`, batch)."""
    lengths = np.array([len(batches.records[i]["tokens"]) for i in index])
    order = np.argsort(-lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        yield chosen, batches.collate(index[chosen])
