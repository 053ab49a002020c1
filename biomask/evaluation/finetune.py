"""Linear-probe-then-fine-tune (LP-FT) through the DeepSpeed engine, read top to bottom.

1. model    the encoder (pretrained weights, or a seeded random initialisation) and a linear head on its
            pooled features. With a fitted linear probe (`ProbeHead`: logistic regression on the frozen,
            standardised features) the head *is* the probe — its standardisation as fixed buffers, its
            coefficients as the head's weights, its L2 penalty (the tuned C) in the loss — so step 0
            predicts what the probe predicts, the head starts at the optimum of its own objective,
            and fine-tuning starts where the probe ends (and cannot distort the features with a random
            head's gradients); without one the head starts random (the plain protocol). The
            masked-prediction head and MAE decoder are frozen (not used here). `dropout` on the
            head's input is off by default: on a probe head it is a second, much stronger
            regulariser than the probe's C — a probe whose weights cancel between correlated
            features (mean pooling) gets a training loss of 8 nats at step 0 (E. coli gene starts)
2. engine   torch AdamW — the encoder at `lr` (optionally decayed layer by layer: `layer_decay`), the
            head at `head_lr` (default: `lr`) — with a linear warm-up, then constant, over the budget
            (`epochs`, capped by `max_steps`), handed to `deepspeed.initialize` with the ZeRO preset
            `zero_stage` (fp32 on CPU, bf16 on GPU); one process, so several engines (one per seed,
            method and learning rate) run one after another in one process
3. loop     seeded batches of the training records; every `eval_every` steps (default: every epoch) the
            validation score — `select`: the mean log-loss (default; a proper score, smooth where MCC
            moves by whole records) or MCC; the weights of the best validation step so far are kept
            and predict test once, if that step is chosen (so the reported test score is that of
            the best-on-validation weights; under ZeRO-3, whose weights are partitioned, each new
            best predicts test at once instead). The bar to beat is the start: the
            probe's validation score (or the untrained head's). Early stopping after `patience`
            passes without a new best, counted only once `min_epochs` are done — a model is never
            stopped before it has trained. A fresh-head run's patience follows its own passes, not
            the probe's bar: it starts far below the probe and may still be closing in (a random
            CNN's fresh head on a coding task, validation log-loss 0.79 → 0.69 in two epochs, the
            probe at 0.62, was stopped there)
4. mix      with a probe, the class probabilities of the best-on-validation weights are mixed with the
            probe's (the step-0 model's): (1 - α) probe + α fine-tuned, α from `mix` chosen on
            validation (output-space WiSE-FT, Wortsman et al. 2022). α = 0 is the probe, α = 1 the
            fine-tuned model alone
5. keep     with a probe and `select: log_loss`, the mixture replaces the probe only when its gain is
            larger than the validation noise: its mean log-loss below the probe's by more than
            `min_gain_se` standard errors of the per-record difference (the one-standard-error rule:
            prefer the simpler model unless the other is clearly better) and its validation MCC not
            below the probe's. Otherwise the probe's predictions are the result (splice, 300
            validation records: a fine-tuned model ahead of its probe by 0.011 validation MCC lost
            0.010 on test)
6. grid     `finetune_grid` runs 1-5 once per learning rate, each from the same weights, and keeps the run
            with the best validation score; when no run beats the probe on validation, the result is
            the probe's own predictions (`source == "probe"`), so LP-FT never ends below its probe on
            validation. With `screen_epochs` (successive halving) every lr's run pauses after that
            many epochs (`FinetuneRun.train(until)`) and only the best carries on. `fresh_head_lr`
            adds runs whose head starts fresh (random, on the raw pooled features) beside the
            probe-started ones: the probe stays the bar, the fallback and the mix partner, but
            training does not start from it. Why: a probe that leans on features which barely vary
            between records (mean_layers pooling: sd 2e-4 in some dimensions) makes the start
            ill-conditioned — every encoder step moves those features by a large share of their
            spread, and training loss rose from the first epoch at every lr down to 1e-6 on a
            3-class coding task, where a fresh head at lr 1e-3 trained a random CNN from MCC 0.67
            to 0.83 (docs/dna-models.md)

Records longer than the model's input follow `long_records` (`biomask.embedding.inference`): windows of
the model's length pooled like the probe's features (mean of the window vectors, or their
concatenation for concat pooling), the centre, or the first tokens; cells keep their top genes.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import matthews_corrcoef
from torch import nn

from biomask.batch import collate, model_input
from biomask.embedding.inference import order_free, record_pieces, record_policy, vector_width
from biomask.evaluation.config import FinetuneSpec

log = logging.getLogger(__name__)


@dataclass
class ProbeHead:
    """A linear probe fitted on frozen features: logits = weight @ ((x - mean) / scale) + bias."""

    mean: np.ndarray  # (D,)
    scale: np.ndarray  # (D,)
    weight: np.ndarray  # (n_classes, D)
    bias: np.ndarray  # (n_classes,)
    val_mcc: float
    test_predictions: np.ndarray
    # λ: mean cross-entropy + λ ||weight||² is the objective the probe minimised on its training split
    # (sklearn's ½||w||² + C Σ loss, divided by C n), so fine-tuning keeps the probe's regularisation
    l2: float = 0.0
    c: float = 0.0  # the C chosen on validation (recorded per seed in metrics.json)

    @classmethod
    def from_sklearn(
        cls,
        scaler: Any,
        model: Any,
        n_classes: int,
        val_mcc: float,
        test_predictions: np.ndarray,
        n_train: int = 0,
    ) -> ProbeHead:
        """From a fitted StandardScaler and LogisticRegression (binary or multinomial; classes the
        training split lacks get a bias that never wins) fitted on `n_train` records."""
        coef = np.asarray(model.coef_, dtype=np.float64)
        intercept = np.asarray(model.intercept_, dtype=np.float64)
        classes = np.asarray(model.classes_)
        binary = len(classes) == 2 and coef.shape[0] == 1
        if binary:  # sigmoid(z) == softmax([-z/2, z/2]); the two rows' ||.||² is half of ||w||²
            coef = np.concatenate([-coef / 2, coef / 2])
            intercept = np.concatenate([-intercept / 2, intercept / 2])
        c = float(getattr(model, "C", 0.0) or 0.0)
        l2 = (1.0 if binary else 0.5) / (c * n_train) if c > 0 and n_train > 0 else 0.0
        weight = np.zeros((n_classes, coef.shape[1]))
        bias = np.full(n_classes, intercept.min() - 30.0 if len(intercept) else 0.0)
        weight[classes], bias[classes] = coef, intercept
        return cls(
            np.asarray(scaler.mean_, dtype=np.float32),
            np.asarray(scaler.scale_, dtype=np.float32),
            weight.astype(np.float32),
            bias.astype(np.float32),
            float(val_mcc),
            np.asarray(test_predictions),
            l2,
            c,
        )


@dataclass
class FinetuneResult:
    test_predictions: np.ndarray
    best_step: int
    best_val_mcc: float
    steps: int
    # {"step", "val_mcc", "val_loss", "train_loss"}
    history: list[dict[str, float]] = field(default_factory=list)
    lr: float = 0.0
    start_val_mcc: float = 0.0  # the bar: the probe's (or the untrained head's) validation MCC
    source: str = "finetune"  # "probe": no run beat the probe on validation; its predictions are kept
    steps_per_epoch: int = 1
    grid: list[dict[str, float]] = field(default_factory=list)  # finetune_grid: one entry per lr
    alpha: float = 1.0  # the fine-tuned model's weight in the mix with the probe (0: the probe)
    val_mcc: float = 0.0  # the result's validation MCC (after the mix)
    val_loss: float = 0.0  # the result's validation log-loss (after the mix)
    start_val_loss: float = 0.0  # the probe's (or the untrained head's) validation log-loss
    select: str = "log_loss"  # the validation measure that chose the step, α and lr
    fresh_head: bool = False  # the run's head started fresh (fresh_head_lr), not from the probe

    @property
    def score(self) -> float:
        """What `finetune_grid` compares (higher is better)."""
        return self.val_mcc if self.select == "mcc" else -self.val_loss

    @property
    def best_epoch(self) -> float:
        return self.best_step / self.steps_per_epoch


class Head(nn.Linear):
    """The linear head; while training it records its L2 penalty, `l2` × ||weight||² (ZeRO-3 holds the
    whole weight only inside the module's own forward)."""

    def __init__(self, dim: int, n_classes: int, l2: float = 0.0) -> None:
        super().__init__(dim, n_classes)
        self.l2 = l2
        self.penalty: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.penalty = self.l2 * self.weight.float().pow(2).sum() if self.training and self.l2 else None
        return super().forward(x)


class Classifier(nn.Module):
    """Encoder features (pooled, windows pooled per record) -> fixed standardisation -> linear head."""

    def __init__(
        self,
        encoder: nn.Module,
        n_classes: int,
        *,
        pooling: str,
        layer: int = -1,
        feature_dim: int | None = None,  # concat pooling: length * d_model (× windows)
        probe: ProbeHead | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling, self.layer = pooling, layer
        # The pretraining head and decoder take no part in classification: frozen, so the optimizer
        # and ZeRO leave them alone (a model kind may have neither).
        for name in ("head", "decoder"):
            module = getattr(encoder, name, None)
            if isinstance(module, nn.Module):
                module.requires_grad_(False)
        dim = feature_dim or vector_width(encoder, layer, pooling)
        self.head = Head(dim, n_classes, probe.l2 if probe is not None else 0.0)
        self.dropout = nn.Dropout(dropout)  # why: FinetuneSpec.dropout
        if probe is None:
            nn.init.normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
            shift, inv_scale = torch.zeros(dim), torch.ones(dim)
        else:
            if probe.weight.shape != (n_classes, dim):
                raise ValueError(
                    f"probe of shape {probe.weight.shape} for {n_classes} classes × {dim} features"
                )
            with torch.no_grad():
                self.head.weight.copy_(torch.from_numpy(probe.weight))
                self.head.bias.copy_(torch.from_numpy(probe.bias))
            shift = torch.from_numpy(probe.mean)
            inv_scale = 1.0 / torch.from_numpy(probe.scale).clamp(min=1e-12)
        # the probe's standardisation, fixed: the head's weights keep the probe's scale under Adam
        self.register_buffer("shift", shift.float().clone())
        self.register_buffer("inv_scale", inv_scale.float().clone())

    def fresh_head(self) -> None:
        """A random head on the raw pooled features, as without a probe (the plain protocol)."""
        with torch.no_grad():
            nn.init.normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
            self.shift.zero_()
            self.inv_scale.fill_(1.0)
        self.head.l2 = 0.0

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        owners = batch.get("owners")  # windowed records: piece -> row of the batch (in order)
        inputs = {k: v for k, v in batch.items() if k != "owners"}
        h = self.encoder.features(inputs, self.pooling, self.layer)
        if owners is not None:
            h = _pool_pieces(h, owners, self.pooling)
        return self.head(self.dropout((h - self.shift) * self.inv_scale))


def _pool_pieces(h: torch.Tensor, owners: torch.Tensor, pooling: str) -> torch.Tensor:
    """Piece vectors -> record vectors: the mean (or max) over a record's windows (mean_layers: the mean
    of each block's part, which is the mean of the whole vector), or (concat) their
    concatenation in order, as `biomask.embedding.inference.pool_pieces` does for the probe's features."""
    n = int(owners.max()) + 1
    if pooling == "concat":
        return h.reshape(n, -1)  # pieces are collated record by record, as many per record
    if pooling == "max":
        index = owners[:, None].expand_as(h)
        start = torch.full((n, h.shape[1]), float("-inf"), dtype=h.dtype, device=h.device)
        return start.scatter_reduce(0, index, h, reduce="amax", include_self=True)
    counts = torch.bincount(owners, minlength=n).clamp(min=1).to(h.dtype)
    return (
        torch.zeros(n, h.shape[1], dtype=h.dtype, device=h.device).index_add(0, owners, h) / counts[:, None]
    )


class Batches:
    """Records turned into model inputs once (pieces: one, or a long DNA record's windows); batches
    collated on demand (eval: once, sorted by length)."""

    def __init__(
        self,
        records: Sequence[Mapping[str, Any]],
        *,
        modality: str,
        limit: int,
        free: bool,
        policy: str = "first",
    ) -> None:
        self.modality = modality
        self.pieces = [
            [model_input(p) for p in record_pieces(r, limit, policy=policy, order_free=free)] for r in records
        ]
        self.windowed = any(len(p) > 1 for p in self.pieces)

    def length(self, i: int) -> int:
        return sum(len(p["tokens"]) for p in self.pieces[i])

    def collate(self, index: np.ndarray) -> dict[str, torch.Tensor]:
        flat = [p for i in index for p in self.pieces[i]]
        batch = collate(flat, modality=self.modality)
        if self.windowed:
            owners = [row for row, i in enumerate(index) for _ in self.pieces[i]]
            batch["owners"] = torch.as_tensor(owners, dtype=torch.int64)
        return batch


@torch.no_grad()
def _probabilities(
    engine: Any, batches: list[tuple[np.ndarray, dict[str, torch.Tensor]]], n: int, n_classes: int, device
) -> np.ndarray:
    """Class probabilities (n, n_classes) of some records, in the records' order."""
    engine.eval()
    out = np.zeros((n, n_classes), dtype=np.float32)
    for index, batch in batches:
        logits = engine({k: v.to(device) for k, v in batch.items()})
        out[index] = torch.softmax(logits.float(), -1).cpu().numpy()
    engine.train()
    return out


def log_losses(labels: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Each record's negative log-probability of its true class (clipped at 1e-7)."""
    p = probabilities[np.arange(len(labels)), labels]
    return -np.log(np.clip(p, 1e-7, 1.0))


def val_score(select: str, labels: np.ndarray, probabilities: np.ndarray) -> float:
    """The validation measure `select` names, higher is better: MCC, or minus the mean log-loss."""
    if not len(labels):
        return 0.0
    if select == "mcc":
        return float(matthews_corrcoef(labels, probabilities.argmax(1)))
    return -float(log_losses(labels, probabilities).mean())


def choose_mix(
    labels: np.ndarray,
    start: np.ndarray,
    tuned: np.ndarray,
    alphas: Sequence[float],
    start_score: float,
    select: str = "mcc",
) -> tuple[float, float, dict[float, float]]:
    """The weight α of the fine-tuned model's probabilities (`tuned`) against the start's (`start`, the
    probe) with the best validation score (`val_score`): (α, its score, every α's score). α = 0 scores
    `start_score` (the probe's own). Ties go to the α nearest 0.5 (an even mixture), then the larger."""
    scores: dict[float, float] = {}
    for alpha in alphas:
        if alpha == 0.0:
            scores[alpha] = start_score
        else:
            scores[alpha] = val_score(select, labels, (1 - alpha) * start + alpha * tuned)
    best = max(scores, key=lambda a: (scores[a], -abs(a - 0.5), a))
    return best, scores[best], scores


def clear_gain(
    labels: np.ndarray, start: np.ndarray, chosen: np.ndarray, start_mcc: float, min_gain_se: float
) -> bool:
    """Whether `chosen` beats `start` on validation by more than the noise: a mean log-loss lower by
    more than `min_gain_se` standard errors of the per-record difference, and an MCC no lower."""
    if len(labels) < 2:
        return False
    gain = log_losses(labels, start) - log_losses(labels, chosen)
    se = float(gain.std(ddof=1)) / math.sqrt(len(gain))
    mcc = float(matthews_corrcoef(labels, chosen.argmax(1)))
    return float(gain.mean()) > max(min_gain_se * se, 0.0) and mcc >= start_mcc


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


def _param_group(params: Sequence[nn.Parameter], lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices, none on biases, norms and vectors; frozen parameters left out."""
    trainable = [p for p in params if p.requires_grad]
    return [
        {"params": [p for p in trainable if p.dim() >= 2], "lr": lr, "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.dim() < 2], "lr": lr, "weight_decay": 0.0},
    ]


def encoder_param_groups(
    encoder: nn.Module, lr: float, weight_decay: float, layer_decay: float | None
) -> list[dict[str, Any]]:
    """The encoder's parameter groups: one lr, or with `layer_decay` block i of n at lr * decay^(n - i)
    and the embeddings at lr * decay^n. A model without transformer blocks (`encoder.encoder.blocks`)
    gets one lr."""
    blocks = getattr(getattr(encoder, "encoder", None), "blocks", None)
    if layer_decay is None or layer_decay == 1.0:
        return _param_group(list(encoder.parameters()), lr, weight_decay)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        log.info(
            "layer_decay %.2f ignored: %s has no transformer blocks", layer_decay, type(encoder).__name__
        )
        return _param_group(list(encoder.parameters()), lr, weight_decay)
    n = len(blocks)
    depth: dict[int, int] = {}
    embedder = getattr(encoder, "embedder", None)
    if isinstance(embedder, nn.Module):
        depth.update({id(p): n for p in embedder.parameters()})
    for i, block in enumerate(blocks, start=1):
        depth.update({id(p): n - i for p in block.parameters()})
    by_depth: dict[int, list[nn.Parameter]] = {}
    for p in encoder.parameters():
        by_depth.setdefault(depth.get(id(p), 0), []).append(p)  # the final norm etc.: the top's lr
    groups: list[dict[str, Any]] = []
    for d, params in sorted(by_depth.items()):
        groups += _param_group(params, lr * layer_decay**d, weight_decay)
    return groups


def _schedule(warmup: int) -> Callable[[int], float]:
    """Linear warm-up over `warmup` steps (Adam's first updates are full-size whatever the gradient: a
    warm-up keeps them from knocking the probe's features about), then constant — the best validation
    pass, not a decay, decides where training ends."""

    def factor(step: int) -> float:
        return (step + 1) / warmup if step < warmup else 1.0

    return factor


class FinetuneRun:
    """One learning rate's fine-tuning (steps 1-5 of the module docstring) that can pause:
    `train(until)` runs the loop up to a step, `result()` mixes with the probe, applies the keep rule
    and releases the engine. Successive halving (`finetune_grid`) screens every lr this way and lets
    only the best one carry on — from where it stopped, on the whole budget's schedule, so its
    screening epochs are not trained twice."""

    def __init__(
        self,
        encoder: nn.Module,
        records: Sequence[Mapping[str, Any]],
        labels: np.ndarray,
        split: tuple[np.ndarray, np.ndarray, np.ndarray],
        *,
        n_classes: int,
        settings: FinetuneSpec,
        seed: int,
        max_length: int,
        pooling: str = "mean",
        layer: int = -1,
        long_records: str = "first",
        probe: ProbeHead | None = None,
        fresh_head: bool = False,
    ) -> None:
        from biomask.training.accelerator import resolve_precision, training_device
        from biomask.training.distributed import import_deepspeed
        from biomask.training.ds_config import preset_config

        if isinstance(settings.lr, list):
            raise ValueError("finetune runs one learning rate (settings.lr); finetune_grid runs a list")
        self.lr = float(settings.lr)
        self.settings, self.seed, self.probe, self.n_classes = settings, seed, probe, n_classes
        self.fresh_head = fresh_head = fresh_head and probe is not None
        self.labels = labels
        self.train_index, self.val, self.test = split
        _engine_environment()
        self.device = device = training_device()  # the device DeepSpeed was set up for (setup_env)
        precision = resolve_precision("auto", device)

        # 1. The model: the encoder and a head (the probe, or initialised from the seed).
        encoder = encoder.float()
        modality = encoder.config.modality
        limit = max_length - (2 if modality == "dna" else 1)
        batches = Batches(
            records,
            modality=modality,
            limit=limit,
            free=order_free(encoder),
            policy=record_policy(encoder, long_records),
        )
        self.batches = batches
        feature_dim = None
        if pooling == "concat":  # the head's width follows the records' length
            with torch.no_grad():  # one record's pieces, concatenated
                on = next(encoder.parameters()).device  # evaluate may have embedded on the GPU
                one = {k: v.to(on) for k, v in batches.collate(self.train_index[:1]).items() if k != "owners"}
                feature_dim = encoder.eval().features(one, pooling, layer).numel()
        torch.manual_seed(seed)
        self.model = model = Classifier(
            encoder,
            n_classes,
            pooling=pooling,
            layer=layer,
            feature_dim=feature_dim,
            probe=probe,
            dropout=settings.dropout,
        )
        self.val_batches = list(_subset(batches, self.val, max(settings.batch_size, 64)))
        self.test_batches = list(_subset(batches, self.test, max(settings.batch_size, 64)))
        start: tuple[np.ndarray, np.ndarray] | None = None
        if fresh_head:  # the probe's start (the bar and the mix partner), measured before the head resets
            model.to(device)
            start = (
                self._probabilities(model, self.val_batches),
                self._probabilities(model, self.test_batches),
            )
            model.fresh_head()

        # 2. The engine: AdamW (encoder lr, layer-wise decayed or not; head lr), warm-up then constant.
        # an epoch sees every training record once: the last batch is short rather than dropped, so
        # 60 records in batches of 32 are 2 steps, not 1 step of a fresh random 32 each time
        self.steps_per_epoch = steps_per_epoch = max(
            math.ceil(len(self.train_index) / settings.batch_size), 1
        )
        epochs = settings.epochs if settings.epochs is not None or settings.max_steps is not None else 3.0
        total = max(math.ceil(epochs * steps_per_epoch), 1) if epochs is not None else settings.max_steps
        if settings.min_budget_steps is not None:  # a small training split: more epochs
            total = max(total, settings.min_budget_steps)
        if settings.max_steps is not None:
            total = min(total, settings.max_steps)
        self.total = total
        self.min_steps = math.ceil(settings.min_epochs * steps_per_epoch)
        self.eval_every = settings.eval_every or steps_per_epoch
        groups = encoder_param_groups(model.encoder, self.lr, settings.weight_decay, settings.layer_decay)
        # a probe head keeps the probe's own L2 penalty (in the loss) instead of AdamW's decay towards 0
        head_decay = 0.0 if probe is not None and not fresh_head else settings.weight_decay
        groups += _param_group(list(model.head.parameters()), settings.head_lr or self.lr, head_decay)
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], betas=(0.9, 0.98), eps=1e-8)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(math.ceil(settings.warmup * total)))
        ds_config = preset_config(
            settings.zero_stage, micro_batch_size=settings.batch_size, precision=precision
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            self.engine, _, _, _ = import_deepspeed().initialize(
                model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config
            )
        self.y = torch.as_tensor(labels, dtype=torch.int64)

        # 3. The start of the loop: the bar to beat is the probe (its validation MCC and test
        # predictions are the start, and the fallback) or the untrained head.
        self.rng = np.random.default_rng([seed, 7])
        self.order, self.position = self.rng.permutation(self.train_index), 0
        self.history: list[dict[str, float]] = []
        if start is None:
            self.start_val = self._validate(0, float("nan"))
            self.start_test = self._test_probabilities()
        else:
            self.start_val, self.start_test = start
            self._record(0, float("nan"), self.start_val)
        self.start_mcc = probe.val_mcc if probe is not None else self.history[0]["val_mcc"]
        self.start_loss = self.history[0]["val_loss"]
        self.best_score = self.start_mcc if settings.select == "mcc" else -self.start_loss
        self.best_step, self.best_val, self.best_test = 0, self.start_val, self.start_test
        self._best_state: dict[str, torch.Tensor] | None = None  # the best step's weights, for its test pass
        # what patience watches: the run's own best pass (a fresh head has none before it trains)
        self.own_best = -math.inf if fresh_head else self.best_score
        self.step, self.waited, self.stopped = 0, 0, False
        self._window: list[float] = []

    @property
    def done(self) -> bool:
        """The budget is spent or early stopping ended the run."""
        return self.stopped or self.step >= self.total

    def _probabilities(
        self, model: Any, batches: list[tuple[np.ndarray, dict[str, torch.Tensor]]]
    ) -> np.ndarray:
        """Class probabilities of the records in `batches` (val or test) from the engine, or from the
        model before the engine exists (a fresh-head run's probe start)."""
        n = sum(len(index) for index, _ in batches)
        return _probabilities(model, batches, n, self.n_classes, self.device)

    def _validate(self, step: int, loss: float) -> np.ndarray:
        return self._record(step, loss, self._probabilities(self.engine, self.val_batches))

    def _record(self, step: int, loss: float, p: np.ndarray) -> np.ndarray:
        self.history.append(
            {
                "step": step,
                "val_mcc": val_score("mcc", self.labels[self.val], p),
                "val_loss": -val_score("log_loss", self.labels[self.val], p),
                "train_loss": loss,
            }
        )
        return p

    def _test_probabilities(self) -> np.ndarray:
        return self._probabilities(self.engine, self.test_batches)

    def _keep_best(self) -> None:
        """A new best step: its weights are copied, and its test pass waits until the step is chosen
        (often never: the probe is kept, or a later step wins)."""
        if self.settings.zero_stage < 3:
            self.best_test, self._best_state = None, None  # the previous best's copy freed first
            self._best_state = {
                k: v.detach().to("cpu", copy=True) for k, v in self.engine.module.state_dict().items()
            }
        else:  # ZeRO-3 partitions the weights across ranks: no cheap copy, so test is predicted now
            self.best_test = self._test_probabilities()

    def _best_test(self) -> np.ndarray:
        """The best step's test probabilities: its weights back in the model (training is over, so the
        encoder ends at the best step's weights, not the last step's), then one test pass: the same
        predictions as a pass at that step, without one per new best."""
        if self.best_test is None:
            assert self._best_state is not None
            self.engine.module.load_state_dict(self._best_state)
            self.best_test = self._test_probabilities()
        return self.best_test

    def train(self, until: int | None = None) -> FinetuneRun:
        """3. The loop, up to step `until` (None: the budget): seeded batches, validation every
        `eval_every` steps and where it pauses, the weights of the best validation pass kept,
        early stopping after `patience` passes without a new best once `min_epochs` are done."""
        settings, engine = self.settings, self.engine
        until = self.total if until is None else min(until, self.total)
        engine.train()
        while self.step < until and not self.stopped:
            if self.position >= len(self.order):  # a new epoch: a new permutation
                self.order, self.position = self.rng.permutation(self.train_index), 0
            index = self.order[self.position : self.position + settings.batch_size]
            self.position += len(index)
            batch = {k: v.to(self.device) for k, v in self.batches.collate(index).items()}
            logits = engine(batch)
            loss = F.cross_entropy(logits.float(), self.y[index].to(self.device))
            self._window.append(loss.item())
            if self.model.head.penalty is not None:  # the probe's own regularisation of the head
                loss = loss + self.model.head.penalty
            engine.backward(loss)
            engine.step()
            self.step += 1
            if self.step % self.eval_every == 0 or self.step in (until, self.total):
                self._pass()
        return self

    def _pass(self) -> None:
        """A validation pass: a new best keeps its predictions and weights, otherwise patience runs down."""
        val_p = self._validate(self.step, float(np.mean(self._window)))
        self._window = []
        score = val_score(self.settings.select, self.labels[self.val], val_p)
        improved, self.own_best = score > self.own_best, max(score, self.own_best)
        if score > self.best_score:
            self.best_score, self.best_step, self.waited = score, self.step, 0
            self.best_val = val_p
            self._keep_best()
        elif improved:  # below the bar still, but closing in
            self.waited = 0
        elif self.step >= self.min_steps:  # early stopping counts only once the minimum training is done
            self.waited += 1
            if self.waited >= self.settings.patience:
                self.stopped = True

    def close(self) -> None:
        self._best_state = None
        with contextlib.suppress(Exception):  # release the engine's buffers before the next one
            self.engine.destroy()

    def result(self) -> FinetuneResult:
        """4. The mix with the probe, α chosen on validation (only once fine-tuning has beaten the
        probe); 5. kept only when it beats the probe by more than the validation noise (select:
        log_loss). Releases the engine."""
        settings, probe, select, labels = self.settings, self.probe, self.settings.select, self.labels
        start_val, start_mcc, start_loss = self.start_val, self.start_mcc, self.start_loss
        best_step = self.best_step
        best_mcc = (
            next(h["val_mcc"] for h in self.history if h["step"] == best_step) if best_step else start_mcc
        )
        alpha = 1.0 if best_step > 0 else 0.0
        within_noise = False
        if probe is not None and best_step > 0:
            alpha, _, _ = choose_mix(
                labels[self.val],
                start_val,
                self.best_val,
                settings.mix,
                start_mcc if select == "mcc" else -start_loss,
                select,
            )
            mixed = (1 - alpha) * start_val + alpha * self.best_val
            if (
                alpha > 0
                and select == "log_loss"
                and not clear_gain(labels[self.val], start_val, mixed, start_mcc, settings.min_gain_se)
            ):  # said once, in the run's summary line below ("by less than its noise")
                alpha, within_noise = 0.0, True
        chosen_val = (1 - alpha) * start_val + alpha * self.best_val
        chosen_test = (1 - alpha) * self.start_test + alpha * (self._best_test() if alpha > 0 else 0.0)
        if alpha == 0.0:
            best_test = probe.test_predictions if probe is not None else self.start_test.argmax(1)
            val_mcc, val_loss = start_mcc, start_loss
        else:
            best_test = chosen_test.argmax(1)
            val_mcc = val_score("mcc", labels[self.val], chosen_val)
            val_loss = -val_score("log_loss", labels[self.val], chosen_val)
        outcome = (
            (
                f"the probe kept (step {best_step} was better on val, by less than its noise)"
                if within_noise
                else "the probe kept (no fine-tuned step beat it on val)"
            )
            if alpha == 0.0
            else f"best at step {best_step}"
            + (f", mixed with the probe at α {alpha:.2f}" if alpha < 1.0 else "")
        )
        log.info(
            "fine-tune (seed %d, lr %.1e%s, ZeRO-%d): %d steps run (%d per epoch), chosen by val %s: %s; "
            "val MCC %.3f -> %.3f, log-loss %.3f -> %.3f",
            self.seed,
            self.lr,
            ", fresh head" if self.fresh_head else "",
            settings.zero_stage,
            self.step,
            self.steps_per_epoch,
            "log-loss" if select == "log_loss" else "MCC",
            outcome,
            start_mcc,
            val_mcc,
            start_loss,
            val_loss,
        )
        if alpha == 0.0:
            source = "probe" if probe is not None else "untrained"
        else:
            source = "finetune" if alpha == 1.0 else "mix"
        self.close()
        return FinetuneResult(
            best_test,
            best_step,
            best_mcc,
            self.step,
            self.history,
            lr=self.lr,
            start_val_mcc=start_mcc,
            source=source,
            steps_per_epoch=self.steps_per_epoch,
            alpha=alpha,
            val_mcc=val_mcc,
            val_loss=val_loss,
            start_val_loss=start_loss,
            select=select,
            fresh_head=self.fresh_head,
        )


def finetune(
    encoder: nn.Module,
    records: Sequence[Mapping[str, Any]],
    labels: np.ndarray,
    split: tuple[np.ndarray, np.ndarray, np.ndarray],
    **kwargs: Any,
) -> FinetuneResult:
    """Fine-tune `encoder` (modified in place: pass a copy) on records[train] for the whole budget; see
    the module docstring and `FinetuneRun` (its keyword arguments). With `probe`, the head starts as
    the probe and the probe's validation score is the bar to beat (its test predictions are the result
    until a validation pass beats it)."""
    return FinetuneRun(encoder, records, labels, split, **kwargs).train().result()


def finetune_grid(
    encoder: nn.Module,
    records: Sequence[Mapping[str, Any]],
    labels: np.ndarray,
    split: tuple[np.ndarray, np.ndarray, np.ndarray],
    *,
    settings: FinetuneSpec,
    **kwargs: Any,
) -> FinetuneResult:
    """`finetune` once per learning rate of `settings.lr` (and, with a probe, of
    `settings.fresh_head_lr` with a fresh head; `lr: []`: those alone), each from a copy of
    `encoder`; the run with the best validation score (`settings.select`, after its mix with the
    probe) wins (ties: the earlier one).
    With a probe, a grid where no run beats it returns the probe. With `settings.screen_epochs` (one
    rung of successive halving), every run first trains that long on the whole budget's schedule;
    only the best one carries on, from where it stopped, the others are dropped."""

    def floats(value: float | list[float] | None) -> list[float]:
        return [] if value is None else [float(v) for v in (value if isinstance(value, list) else [value])]

    fresh = floats(settings.fresh_head_lr) if kwargs.get("probe") is not None else []
    candidates = [(lr, False) for lr in floats(settings.lr)] + [(lr, True) for lr in fresh]
    if not candidates:  # lr: [] is fresh-head runs only, and those need a probe to stand beside
        raise ValueError("finetune: no learning rate to run (lr: [] needs fresh_head_lr and a probe)")
    grid: list[dict[str, Any]] = []

    def start(candidate: tuple[float, bool]) -> FinetuneRun:
        lr, fresh_head = candidate
        one = settings.model_copy(update={"lr": lr})
        return FinetuneRun(
            copy.deepcopy(encoder), records, labels, split, settings=one, fresh_head=fresh_head, **kwargs
        )

    def record(run: FinetuneRun, result: FinetuneResult | None) -> None:
        best_mcc = next(h["val_mcc"] for h in run.history if h["step"] == run.best_step)
        grid.append(
            {
                "lr": run.lr,
                "fresh_head": run.fresh_head,
                "screen": result is None,  # a screening rung (screen_epochs), not the whole budget
                "best_val_mcc": result.best_val_mcc
                if result
                else (best_mcc if run.best_step else run.start_mcc),
                "best_step": run.best_step,
                "steps": run.step,
                "alpha": result.alpha if result else None,
                "val_mcc": result.val_mcc if result else None,
                "val_loss": result.val_loss if result else None,
                # every validation pass, so a user sees whether and when fine-tuning moved
                "history": [
                    {k: round(v, 4) if math.isfinite(v) else None for k, v in h.items()} for h in run.history
                ],
            }
        )

    budget = (
        settings.epochs if settings.epochs is not None else 3.0 if settings.max_steps is None else math.inf
    )
    finalists: list[FinetuneRun] = []
    if settings.screen_epochs is not None and len(candidates) > 1 and settings.screen_epochs < budget:
        leader, leader_score = None, -math.inf
        for candidate in candidates:  # at most two engines alive: the leader and the run being screened
            run = start(candidate)
            run.train(until=math.ceil(settings.screen_epochs * run.steps_per_epoch))
            record(run, None)
            score = screen_score(run.history, settings.select)
            if leader is None or score > leader_score:  # ties: the earlier lr
                if leader is not None:
                    leader.close()
                leader, leader_score = run, score
            else:
                run.close()
        assert leader is not None
        log.info(
            "fine-tune: lr %.1e%s chosen on validation after %g epoch(s); it carries on",
            leader.lr,
            " (fresh head)" if leader.fresh_head else "",
            settings.screen_epochs,
        )
        finalists = [leader]
    best: FinetuneResult | None = None
    for run in finalists or (start(candidate) for candidate in candidates):
        result = run.train().result()
        record(run, result)
        if best is None or result.score > best.score:
            best = result
    assert best is not None
    best.grid = grid
    return best


def screen_score(history: Sequence[Mapping[str, float]], select: str) -> float:
    """How well a screening run trained: its best validation pass after the start (the probe's own
    start is the same for every lr, and the rule that keeps the probe would tie runs that moved)."""
    key = "val_mcc" if select == "mcc" else "val_loss"
    sign = 1.0 if select == "mcc" else -1.0
    values = [
        sign * h[key] for h in history if h["step"] > 0 and h[key] is not None and math.isfinite(h[key])
    ]
    return max(values, default=-math.inf)


def _subset(batches: Batches, index: np.ndarray, batch_size: int):
    """Fixed, length-sorted batches of some records: (positions within `index`, batch)."""
    lengths = np.array([batches.length(i) for i in index])
    order = np.argsort(-lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        yield chosen, batches.collate(index[chosen])
