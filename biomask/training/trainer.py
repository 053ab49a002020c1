"""`biomask pretrain`: masked pretraining with the DeepSpeed engine, read top to bottom.

1. inputs       the token store, what it holds, the model it implies (training/architecture.py),
                data order, DeepSpeed config
2. output dir   done (reuse), fresh or resume (an interrupted run of the same config); the store's
                checksums verified before anything is written
3. engine       model, AdamW, warm-up + cosine schedule, `deepspeed.initialize` (ZeRO 0-3)
4. data         seeded, rank-sharded, step-indexed order; the masker on the training device
5. resume       model, optimizer, schedule, step (= data position) and every RNG from a checkpoint
6. the loop     train_step (mask -> forward -> backward -> step); metrics; held_out_loss on a ratio
                grid; checkpoints; a scheduler's signal -> checkpoint and exit 75 (requeue)
7. the end      final held-out loss and checkpoint, the portable checkpoint (model/), run.json last

Collectives and the stop signal: training/distributed.py; checkpoints and the portable export:
training/checkpoint.py.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import math
import os
import random
import shutil
import signal
import sys
import sysconfig
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from biomask.config import dump_config
from biomask.errors import BiomaskError, ConfigError, InputError, Interrupted, Requeue, first_line
from biomask.masking import Masker, MaskingConfig
from biomask.masking.config import masking_text
from biomask.masking.masker import maskable_positions
from biomask.models import EncoderConfig, build_model
from biomask.models.kinds import PROFILE_KINDS, float32_default, rebuilt_on_continuing
from biomask.models.profile import ProfileModel
from biomask.outputs import (
    FILE_TREE_KEY,
    OUTPUT_DIGESTS_KEY,
    OutputLock,
    atomic_write_text,
    check_inputs_outside,
    hold_output,
)
from biomask.provenance import Began, code_version, read_run_info, write_run_info
from biomask.resources import honour_omp_threads
from biomask.stage import StageOutput, warn_other_code
from biomask.store import TokenStore, check_store_tokenizer
from biomask.training import checkpoint, finite, rundir
from biomask.training.accelerator import describe, resolve_precision, training_device
from biomask.training.architecture import build_architecture, init_checkpoint
from biomask.training.config import NON_SEMANTIC, PretrainConfig
from biomask.training.data import DataSpec, TrainingData, eval_batches
from biomask.training.distributed import (
    DistEnv,
    StopSignal,
    all_sum,
    import_deepspeed,
    init_process_group,
    on_rank0,
    release_own_group,
    setup_env,
    torch_linear_kept,
)
from biomask.training.ds_config import build_ds_config, zero_stage
from biomask.training.metrics import MetricsLogger, check_trackers
from biomask.training.references import ContextCounts, reference_counts

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- 1. inputs


def prep_settings(store: TokenStore) -> dict[str, Any]:
    """How the store's data was turned into tokens (the prep config's normalisation, tokenizer, gene
    and cleaning sections), so `biomask embed` can tokenize new data the same way without the store."""
    config = store.manifest.get("config") or {}
    return {k: config[k] for k in ("normalise", "tokenizer", "genes", "cleaning") if k in config}


# ------------------------------------------------------------------------------------------- 3. engine


def warmup_cosine(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine decay to `min_ratio`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices (linear and embedding weights); none on biases, norms, vectors."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw_kernel(fused: str | bool, device: torch.device) -> dict[str, bool]:
    """optim.fused as torch.optim.AdamW's keyword: auto is the fused kernel on a GPU only (on CPU it
    gains little, and the CPU default keeps earlier runs' results)."""
    if fused is True or (fused == "auto" and device.type == "cuda"):
        return {"fused": True}
    return {}


def check_compile(cfg: PretrainConfig, device: torch.device) -> None:
    """train.compile on a CPU: torch inductor builds C++ against Python.h at the first step. Without
    them the run would stop there with a compiler traceback; say so before anything is written."""
    if not cfg.train.compile or device.type != "cpu":
        return
    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        missing = "a C++ compiler (g++)"
    elif not (Path(sysconfig.get_path("include")) / "Python.h").exists():
        missing = f"the Python headers ({sysconfig.get_path('include')}/Python.h)"
    else:
        return
    raise ConfigError(
        f"train.compile: torch.compile on the CPU needs {missing}, which this machine lacks; install it "
        "(Debian: apt-get install g++ python3-dev) or set train.compile=false"
    )


# ------------------------------------------------------------------------------------------- helpers


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def model_inputs(masked: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors the model reads (DeepSpeed gets tensors only)."""
    keys = (
        "input_ids",
        "attention_mask",
        "values",
        "bins",
        "value_hidden",
        "masked",
        "target_ids",
        "target_values",
        "library_size",
        "batch",  # each cell's batch: a batch-conditioned decoder reads it
    )
    return {k: masked[k] for k in keys if k in masked}


# The logging window's sums, in this order, kept on the training device between log steps: reading
# a number back (`.item()`, `float()`) makes the host wait for the GPU, and three such waits per
# micro-step left the GPU idle while the next step's kernels were launched.
WINDOW_SUMS = ("loss", "masked", "correct", "ratio", "tokens")
# a ratio drawn per record: each record's realised ratio counted in bins of this width over [0, 1]
RECORD_RATIO_BINS = 40


def count_record_ratios(counts: torch.Tensor, masked: dict[str, Any]) -> None:
    """Adds the batch's records (those with something to mask) to `counts`, by realised ratio; on the
    device, no wait. Binned from the whole counts: 7 of 10 as a float32 ratio (0.6999999) fell a bin low."""
    n = masked["n_maskable"]
    where = (masked["masked"].sum(1) * RECORD_RATIO_BINS) // n.clamp(min=1)
    counts.index_add_(0, where.clamp(0, RECORD_RATIO_BINS - 1), (n > 0).to(torch.float64))


def train_step(
    engine: Any,
    masker: Masker,
    train_data: TrainingData,
    step: int,
    grad_accum: int,
    device: torch.device,
    sums: torch.Tensor,
    record_counts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimizer step: `grad_accum` micro-batches of mask -> forward -> backward; DeepSpeed steps
    the optimizer and the schedule on the last one. Adds to `sums` (float64, WINDOW_SUMS order, on the
    device: nothing is read back here); returns the step's realised mask ratio (a device scalar) and,
    where DeepSpeed computes none (ZeRO-0), the global gradient norm before clipping (else None).
    `record_counts` (ratios drawn per record): each record counted by its realised ratio."""
    step_ratio = torch.zeros((), dtype=torch.float64, device=device)
    norm = None
    for micro in range(grad_accum):
        batch = to_device(train_data.batch(step, micro), device)
        masked = masker(batch, step)
        out = engine(model_inputs(masked))
        # what is minimised; `loss` (the masked tokens' loss) is what is logged and held out
        engine.backward(out.get("objective", out["loss"]))
        if micro == grad_accum - 1 and engine.zero_optimization_stage() == 0:
            # the gradients are averaged over ranks by now and not yet clipped: ZeRO-0 reports no
            # norm, so a non-finite gradient would otherwise go unnoticed until the weights
            grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads) if grads else None  # one fused pass
        engine.step()  # DeepSpeed steps the optimizer and the schedule every grad_accum calls
        n = out["n_masked"].to(torch.float64)
        ratio = masked["realised_ratio"].to(torch.float64)
        sums += torch.stack(
            [
                out["loss"].detach().to(torch.float64) * n,
                n,
                out["n_correct"].to(torch.float64),
                ratio,
                batch["attention_mask"].sum().to(torch.float64),
            ]
        )
        step_ratio += ratio / grad_accum
        if record_counts is not None:
            count_record_ratios(record_counts, masked)
    return step_ratio, norm


def eval_masking(cfg: MaskingConfig) -> MaskingConfig:
    """One protocol for every scheme, so grid losses compare across runs: uniform positions, every
    masked token shown as the mask (MAE models keep their MAE path)."""
    return cfg.model_copy(
        update={
            "positions": cfg.positions.model_copy(update={"kind": "uniform"}),
            "corruption": cfg.corruption.model_copy(update={"mask_token": 1.0, "random_token": 0.0}),
        }
    )


@torch.no_grad()
def held_out_loss(
    engine: Any,
    batches: list[dict[str, torch.Tensor]],
    cfg: PretrainConfig,
    arch: EncoderConfig,
    dist_env: DistEnv,
    device: torch.device,
    counts: ContextCounts | None = None,
) -> dict[str, Any]:
    """Held-out masked loss and accuracy at every ratio of `train.eval_ratios`, and the mean loss
    (pretraining's own measure; downstream evaluation is `biomask evaluate`).

    Each ratio has its own fixed seed, so every evaluation masks the same tokens; the training RNGs
    are untouched (no dropout in eval mode; the masker here has its own generators). On the same
    masked tokens: the reference predictors' losses (`counts`: token or bin frequencies and, for DNA,
    the ±k context model, see training/references.py; the profile model's gene mean), under
    `references`: {name: {"loss": {ratio: nats}, "mean_loss": ...}}.
    """
    engine.eval()
    masking = eval_masking(cfg.masking)
    losses, accuracies, references = {}, {}, {}
    frequency, context = {}, {}
    for i, ratio in enumerate(cfg.train.eval_ratios):
        masker = Masker(
            masking,
            target=arch.target,
            vocab_size=arch.vocab_size,
            n_bins=arch.n_bins,
            seed=cfg.train.seed + 1_000 + i,
            rank=dist_env.rank,
            device=device,
        )
        loss_sum = n_masked = n_correct = reference_sum = frequency_sum = context_sum = 0.0
        for batch in batches:
            batch = to_device(batch, device)
            ratios = torch.full((batch["input_ids"].shape[0],), ratio, device=device)
            masked = masker.apply(batch, ratios)
            out = engine(model_inputs(masked))
            n = float(out["n_masked"])
            loss_sum += out["loss"].item() * n
            n_masked += n
            n_correct += float(out["n_correct"])
            if "reference_loss" in out:  # a model that knows its trivial predictor's loss reports it
                reference_sum += out["reference_loss"].item() * n
            if counts is not None:
                symbols = batch["input_ids"] if counts.field == "tokens" else batch["bins"]
                f, c = counts.nll(symbols, masked["masked"], maskable_positions(batch))
                frequency_sum, context_sum = frequency_sum + f, context_sum + c
        loss_sum, n_masked, n_correct, reference_sum, frequency_sum, context_sum = all_sum(
            [loss_sum, n_masked, n_correct, reference_sum, frequency_sum, context_sum],
            dist_env.world_size,
            device,
        )
        key = f"{ratio:g}"
        losses[key] = loss_sum / max(n_masked, 1.0)
        accuracies[key] = n_correct / max(n_masked, 1.0)
        references[key] = reference_sum / max(n_masked, 1.0)
        frequency[key] = frequency_sum / max(n_masked, 1.0)
        context[key] = context_sum / max(n_masked, 1.0)
    engine.train()
    result: dict[str, Any] = {"loss": losses, "mean_loss": sum(losses.values()) / len(losses)}
    mean = lambda d: sum(d.values()) / len(d)  # noqa: E731
    if arch.kind in PROFILE_KINDS:  # the same masked genes predicted by each gene's training mean
        result["reference_loss"] = references
        result["mean_reference_loss"] = mean(references)
        result["references"] = {"gene mean": {"loss": references, "mean_loss": mean(references)}}
    if counts is not None:
        result["references"] = {"frequency": {"loss": frequency, "mean_loss": mean(frequency)}}
        if counts.k > 0:
            result["references"]["context"] = {"loss": context, "mean_loss": mean(context)}
        result["reference_tables"] = counts.describe()
    if arch.target != "values":
        result["accuracy"] = accuracies
        result["mean_accuracy"] = sum(accuracies.values()) / len(accuracies)
    return result


def prepare_output(cfg: PretrainConfig, stage: StageOutput, world_size: int, decision: str) -> None:
    """Mark a fresh output directory as an unfinished run, or record a resumed run's config."""
    out = Path(cfg.output)
    if decision == "fresh":
        rundir.start_fresh(out, stage.fingerprint, world_size, dump_config(cfg), stage.inputs)
    else:  # resume: the non-semantic keys (logging, checkpoint cadence) may have changed
        atomic_write_text(out / "config.yaml", dump_config(cfg))
        # and the paths, when its run folder moved: config.yaml now records this place, so the
        # fingerprint a later resume compares with is this config's
        rundir.record_fingerprint(out, stage.fingerprint)


def _quiet_libraries() -> None:
    import_deepspeed().utils.logger.setLevel(logging.WARNING)
    # torch 2.13 deprecation warnings from c10d on every ZeRO-3 step
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"deepspeed.*")


# ------------------------------------------------------------------------------------------- the stage


def pretrain(
    cfg: PretrainConfig,
    *,
    overwrite: bool = False,
    local_rank: int | None = None,
    release_group: bool = False,
) -> Path:
    """Run (or resume, or reuse) a pretraining run; returns the output directory.

    Raises `Requeue` (exit code 75) after checkpointing on a scheduler's signal (and on Ctrl-C at the
    command line); in a Python caller Ctrl-C raises `Interrupted`, a KeyboardInterrupt, after the
    same checkpoint. Runs in threads of one process take turns. `release_group`: the one-process
    torch process group this run started is destroyed when it ends (a library call, so the caller's
    other torch code does not see a distributed run); else it stays for the next run.
    """
    if not _ONE_RUN_AT_A_TIME.acquire(blocking=False):
        log.info(
            "pretrain: another run of this process is training (another thread); this one waits for it "
            "(runs in one process share torch's global generators and the output descriptors)"
        )
        _ONE_RUN_AT_A_TIME.acquire()
    threads = torch.get_num_threads()  # the run sets $OMP_NUM_THREADS's count; a caller's own comes back
    # the rank variables (RANK, MASTER_PORT, ...) and device settings the run exports for
    # torch.distributed stay out of a library caller's session, as its process group does. Within the
    # turn: restored by fit_cells around it, a thread's restore deleted LOCAL_RANK from under the next
    # thread's run (DeepSpeed's AssertionError), or put a finished run's back for good
    environment = dict(os.environ) if release_group else None
    try:
        with torch_linear_kept(), _torch_defaults():
            out = _pretrain(cfg, overwrite=overwrite, local_rank=local_rank, began=Began.now())
    except (Requeue, Interrupted) as exc:
        # its traceback holds the loop's frames, and a notebook keeps the last exception: the engine
        # would stay alive with it (the traceback of a checkpointed stop tells nothing anyway)
        exc.with_traceback(None)
        _free_engine()
        raise
    finally:
        try:
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
            if release_group:  # inside the turn: a waiting thread's run starts its own group after it
                _free_engine()  # the engine's handles on the group go first
                release_own_group()
        finally:
            if environment is not None:
                for name in set(os.environ) - set(environment):
                    del os.environ[name]
                os.environ.update(environment)
            _ONE_RUN_AT_A_TIME.release()
    _free_engine()
    return out


@contextlib.contextmanager
def _torch_defaults() -> Iterator[None]:
    """A caller's float64 default dtype (`float32_default`) or a `torch.no_grad()` / `inference_mode()`
    block around the call failed the run after prep with DeepSpeed's bare assertion ("unsupported
    grad type", "loss must be a scalar tensor"): the run trains as the command line does, and the
    caller's settings are theirs again after it."""
    with float32_default(), torch.inference_mode(False), torch.enable_grad():
        yield


# Two runs in threads of one process (a notebook's seed sweep) drew from one set of global generators
# in turns (each seed's weights a mix of both) and swapped fds 1 and 2 over each other (the process's
# output went to /dev/null for good): they take turns.
_ONE_RUN_AT_A_TIME = threading.RLock()


def _free_engine() -> None:
    """The run's engine (model, optimizer state, gradients) sits in reference cycles (DeepSpeed's, the
    loop's closures): freed now, not at some later garbage collection, so that a Python caller's next
    run (fit_cells again in a notebook, on a GPU) does not find the last one's memory still held."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _release(engine: Any) -> None:
    """Let DeepSpeed drop what keeps a ZeRO 1-3 engine alive after the run: the hooks its optimizers put
    on every parameter's gradient accumulator (held by autograd's C++ nodes, where the garbage
    collector cannot see them) and ZeRO-3's module stack. They kept the engine, its model and optimizer
    state for the life of the process, so a notebook's next run on a GPU found every earlier run's
    memory still held."""
    try:
        engine.destroy()
        # ZeRO-3 also pushes the model onto a module-level stack (DeepSpeed 0.19: parameter_offload.
        # FWD_MODULE_STACK) that destroy() leaves as it is; only this engine's entry goes
        offload = sys.modules.get("deepspeed.runtime.zero.parameter_offload")
        stack = getattr(offload, "FWD_MODULE_STACK", None)
        if isinstance(stack, list):
            stack[:] = [module for module in stack if module is not engine.module]
        # and memoises which parameters each sub-module releases in an lru_cache on the class, keyed
        # by the coordinator and the sub-modules: emptied (a memo only: recomputed when next needed)
        coordinator = sys.modules.get("deepspeed.runtime.zero.partitioned_param_coordinator")
        cls = getattr(coordinator, "PartitionedParameterCoordinator", None)
        _clear_memo(getattr(cls, "_PartitionedParameterCoordinator__params_to_release", None))
    except Exception as exc:  # the run's outcome (or its own error) is what the caller must get
        log.warning(
            "pretrain: DeepSpeed could not release the engine (%s: %s); its memory stays held "
            "until the process ends",
            type(exc).__name__,
            exc,
        )


def _clear_memo(function: Any, depth: int = 3) -> None:
    """Empty the functools cache inside `function` (under decorators that keep it in a closure)."""
    if hasattr(function, "cache_clear"):
        function.cache_clear()
    elif depth and callable(function):
        for cell in getattr(function, "__closure__", None) or ():
            _clear_memo(cell.cell_contents, depth - 1)


def _inert_settings(arch: Any, cfg: PretrainConfig) -> list[tuple[tuple[str, ...], str]]:
    """Settings given (not at their defaults) that the model that trains never reads: each as (its
    dotted keys, what to say of it)."""
    defaults = type(cfg.masking.corruption)()
    corruption = cfg.masking.corruption
    inert = []
    if cfg.model.loss != "mse" and arch.kind not in PROFILE_KINDS:
        inert.append(
            (
                ("model.loss",),
                f"model.loss={cfg.model.loss} (the expression models' likelihood; it predicts tokens)",
            )
        )
    if not cfg.model.mask_indicator and arch.kind != "mlp":
        inert.append((("model.mask_indicator",), "model.mask_indicator=false (the mlp's input)"))
    if arch.kind in PROFILE_KINDS:
        if cfg.data.max_length is not None:
            inert.append(
                (
                    ("data.max_length",),
                    f"data.max_length={cfg.data.max_length} (it reads every gene of its panel)",
                )
            )
        if cfg.data.crop != type(cfg.data).model_fields["crop"].default:
            inert.append(
                (
                    ("data.crop",),
                    f"data.crop={cfg.data.crop} (it reads every gene of its panel, never a crop)",
                )
            )
    if cfg.model.decoder_layers != type(cfg.model).model_fields["decoder_layers"].default and not (
        arch.kind == "transformer" and corruption.kind == "mae"
    ):
        inert.append(
            (
                ("model.decoder_layers",),
                f"model.decoder_layers={cfg.model.decoder_layers} (the depth of the transformer's MAE decoder: "
                "masking.corruption.kind=mae)",
            )
        )
    if (corruption.mask_token, corruption.random_token) != (defaults.mask_token, defaults.random_token) and (
        arch.target == "values" or corruption.kind == "mae"
    ):
        why = "expression values are hidden, never replaced" if arch.target == "values" else "MAE drops them"
        inert.append(
            (
                ("masking.corruption.mask_token", "masking.corruption.random_token"),
                f"masking.corruption.mask_token / random_token ({corruption.mask_token} / "
                f"{corruption.random_token}; what replaces masked tokens: {why})",
            )
        )
    return inert


def _recorded_with(out: Path, cfg: PretrainConfig, keys: list[str]) -> bool:
    """Whether the run `out` holds (finished or interrupted) was started with these keys at this run's
    values: an earlier biomask accepted them, and its run resumes or is reused as it was."""
    from yaml import YAMLError

    from biomask.config import flatten, load_recorded_yaml

    if rundir.recorded(out) is None:
        return False
    try:
        written = flatten(
            load_recorded_yaml((out / "config.yaml").read_text(encoding="utf-8"), str(out)) or {}
        )
    except (OSError, ValueError, TypeError, AttributeError, YAMLError):
        return False
    ours = flatten(cfg.model_dump(mode="json"))
    return all(key in written and written[key] == ours.get(key) for key in keys)


def _check_settings_for(arch: Any, cfg: PretrainConfig, precision: str, *, overwrite: bool = False) -> None:
    """Settings the model that trains cannot use (its kind is known only now: model.init_from's is the
    checkpoint's, which the config's checks never saw), refused before anything is written; a warm-up
    the run never finishes, said."""
    if cfg.optim.warmup_steps >= cfg.train.steps:  # a quick run of a config made for a long one
        log.warning(
            "pretrain: optim.warmup_steps (%d) >= train.steps (%d): the learning rate reaches %.0f%% of "
            "optim.lr at most and never decays; lower optim.warmup_steps for a run this short",
            cfg.optim.warmup_steps,
            cfg.train.steps,
            100 * cfg.train.steps / max(cfg.optim.warmup_steps, 1),
        )
    if arch.activation_checkpointing and arch.kind in ("mlp", "cnn"):  # ran, changing nothing
        raise ConfigError(
            f"model.activation_checkpointing recomputes transformer blocks; the model that trains "
            f"(model.init_from's) is a {arch.kind}, which has none: set model.activation_checkpointing=false"
        )
    inert = _inert_settings(arch, cfg)
    said = "; ".join(text for _, text in inert)
    who = (
        f"the model that trains (a {arch.kind}" + (", model.init_from's" if cfg.model.init_from else "") + ")"
    )
    keys = [key for names, _ in inert for key in names]
    if inert and not overwrite and _recorded_with(Path(cfg.output), cfg, keys):
        # a run an earlier biomask started with them: refused, it could neither resume nor be reused
        log.warning(
            "pretrain: %s does not use %s; %s was started with them and goes on", who, said, cfg.output
        )
    elif inert:  # each ran and changed nothing (the resolved config recorded it as if it had)
        raise ConfigError(
            f"{who} does not use {said}: leave " + ("it" if len(inert) == 1 else "them") + " out"
        )
    if precision == "bf16-weights" and arch.kind in PROFILE_KINDS:  # crashed at the first step
        raise ConfigError(
            f"train.precision=bf16-weights (DeepSpeed's bf16 weights) is for the token models (transformer, "
            f"cnn); model.kind {arch.kind} reads float32 expression values into its first layer: use "
            "train.precision=bf16 (autocast over fp32 weights) or fp32"
        )


def _pretrain(cfg: PretrainConfig, *, overwrite: bool, local_rank: int | None, began: Began) -> Path:
    dist_env = setup_env(local_rank)
    if not dist_env.is_main:
        logging.getLogger("biomask").setLevel(logging.WARNING)
    out = Path(cfg.output)
    # The run's first line: where it trains and in what precision (torch and DeepSpeed agree on it).
    device = training_device(dist_env.local_rank)
    precision = resolve_precision(cfg.train.precision, device)
    honour_omp_threads()
    log.info("pretrain: %s, precision %s (DS_ACCELERATOR=%s)", describe(device), precision, device.type)

    # 1. Inputs: the token store, the model it implies, the data order and the DeepSpeed config —
    #    every input error surfaces before anything is written.
    check_trackers(cfg.train.report_to)
    store = TokenStore(cfg.data.store)
    spec = DataSpec.from_store(store)
    arch = build_architecture(cfg, spec, store)
    train_split, eval_split = store.split(cfg.data.train_split), store.split(cfg.data.eval_split)
    inputs = rundir.run_inputs(cfg, store.root)
    if cfg.model.init_from:
        arch, init_input, init_weights = init_checkpoint(cfg, spec, arch)
        inputs.append(init_input)
        if arch.loss != "mse":  # the checkpoint's count likelihood, whatever this run's config says
            from biomask.cells.counts import require_counts

            require_counts(
                store.manifest,
                str(store.root),
                f"model.loss={arch.loss} (model.init_from's)",
                instead="Continue a checkpoint trained with model.loss=mse",
            )
    _check_settings_for(arch, cfg, precision, overwrite=overwrite)
    max_length = arch.max_len if arch.kind in PROFILE_KINDS else cfg.data.max_length or cfg.model.max_len
    stage = StageOutput("pretrain", cfg, out, inputs=inputs, non_semantic=NON_SEMANTIC)
    # A finished run of this config and data is reused before DeepSpeed is imported and the process
    # group set up: those take seconds, and a pipeline rerun reuses dozens of runs.
    # an output an earlier biomask wrote of this same run holds the fingerprint it gave it
    held = stage.fingerprint if overwrite else stage.held_fingerprint(rundir.recorded(out))
    recorded_as = (rundir.recorded(out) or {}).get("fingerprint")
    spelled = (
        None
        if overwrite or recorded_as in (None, held)
        else _stage_spelled_otherwise(cfg, dist_env.world_size)
    )
    if spelled is not None:
        # deepspeed.stage auto and the stage it resolves to here train alike: either spelling resumes
        # or reuses a run of the other (it was refused as a changed key)
        other = StageOutput("pretrain", spelled, out, inputs=inputs, non_semantic=NON_SEMANTIC)
        if other.held_fingerprint(rundir.recorded(out)) == recorded_as:
            held = recorded_as
    if not overwrite and rundir.is_done(out, held, dist_env.world_size):
        if dist_env.is_main:  # said once, not by every process of a launch
            log.info("pretrain: %s is up to date (same config and data); reusing it", out)
            warn_other_code("pretrain", out, read_run_info(out))
        return out
    # Data in a seeded, rank-sharded order indexed by step, and a fixed held-out set.
    train_data = TrainingData(
        train_split,
        spec,
        max_length=max_length,
        crop=cfg.data.crop,
        seed=cfg.train.seed,
        micro_batch_size=cfg.train.micro_batch_size,
        grad_accum=cfg.train.grad_accum,
        world_size=dist_env.world_size,
        rank=dist_env.rank,
        where=f"{store.root}: split {cfg.data.train_split!r}",
    )
    held_out = eval_batches(
        eval_split,
        spec,
        max_length=max_length,
        batch_size=cfg.train.micro_batch_size,
        n_batches=cfg.train.eval_batches,
        world_size=dist_env.world_size,
        rank=dist_env.rank,
        where=f"{store.root}: split {cfg.data.eval_split!r} (data.eval_split)",
    )
    # config errors before anything is written; an output that holds the store or the checkpoint it
    # starts from would be cleared before they are read
    check_inputs_outside(out, [p for p in (cfg.data.store, cfg.model.init_from) if p])
    ds_config = build_ds_config(cfg, precision=precision, world_size=dist_env.world_size)
    finite.check_optim(cfg)
    check_compile(cfg, device)

    # From here a scheduler's signal (or Ctrl-C) is a checkpoint and exit 75 even during
    # start-up: its default action would end the job with no requeue (the batch script requeues on 75).
    stop = StopSignal()
    stop.install()
    # the run seeds the global random streams (below, and a resume restores them); a Python caller's
    # own (a notebook's numpy, random and torch draws) are given back when the call returns or raises.
    # The command line exits after the run: nothing to give back, and CUDA is left to set_device first
    callers_rng = None if Requeue.ends_process else checkpoint.rng_state({})
    metrics: MetricsLogger | None = None
    # rank 0's alone: the lock is its open file, which must not travel to the other ranks (they get
    # rank 0's refusal through on_rank0, so none waits in a collective)
    locks: list[OutputLock | None] = []
    engine: Any = None
    started = False  # the output holds this run (fresh or resumed)
    try:
        # 2. The output directory: fresh, resume, or already done — held by this run alone until it
        #    returns (a second launch, kernel or script into it is refused, whatever its command line)
        _quiet_libraries()
        _start_process_group(dist_env, cfg.deepspeed.timeout_minutes)
        on_rank0(lambda: locks.append(hold_output(out, "pretrain")), dist_env)
        moved = None if overwrite else stage.moved()
        # a refusal lists what changed, not paths moved with the run folder or spelled otherwise
        config = stage.compared_config(moved, rundir.recorded(out))
        decision = on_rank0(
            lambda: rundir.decide(
                out, held, dist_env.world_size, config, overwrite=overwrite, inputs=stage.inputs
            ),
            dist_env,
        )
        if decision == "done":
            if dist_env.is_main:
                log.info("pretrain: %s is up to date (same config and data); reusing it", out)
                warn_other_code("pretrain", out, read_run_info(out))
            return out
        # every shard's sha256 against the manifest; a corrupt one: exit 2, nothing written
        if cfg.data.verify:
            on_rank0(store.verify, dist_env)
        else:  # the tokenizer goes into the checkpoint with its hashes: checked always (a few KB)
            on_rank0(lambda: check_store_tokenizer(store.tokenizer_dir), dist_env)
        on_rank0(lambda: prepare_output(cfg, stage, dist_env.world_size, decision), dist_env)
        started = True
        # the held-out loss's reference predictors: count tables from a bounded training sample, once
        counts = reference_counts(
            train_split,
            modality=spec.modality,
            target=arch.target,
            vocab_size=arch.vocab_size,
            n_bins=arch.n_bins or 0,
        )
        if counts is not None:
            on_rank0(lambda: counts.save(out), dist_env)

        # 3. Model, optimizer, schedule and the DeepSpeed engine (same initial weights on every rank).
        import deepspeed

        torch.manual_seed(cfg.train.seed)
        # biomask draws from its own seeded generators; the global ones are seeded too, so that a library
        # drawing from them cannot make two runs of one seed differ (checkpoints save and restore them)
        random.seed(cfg.train.seed)
        np.random.seed(cfg.train.seed)
        model = build_model(arch)
        # new: an MAE decoder after an MLM checkpoint, a profile model's swap detector
        if cfg.model.init_from:
            new_part = rebuilt_on_continuing(arch.kind)
            fresh = {k for k in model.state_dict() if k.startswith(new_part)}
            missing, unexpected = model.load_state_dict(init_weights, strict=False)
            if unexpected or set(missing) - fresh:
                raise InputError(
                    f"model.init_from: the checkpoint's weights do not fit: {missing or unexpected}"
                )
        elif isinstance(model, ProfileModel):  # standardisation (and count references) of the training split
            model.init_from_data(train_split)
        optimizer = torch.optim.AdamW(
            param_groups(model, cfg.optim.weight_decay),
            lr=cfg.optim.lr,
            betas=tuple(cfg.optim.betas),
            eps=cfg.optim.eps,
            **adamw_kernel(cfg.optim.fused, device),
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            functools.partial(
                warmup_cosine,
                warmup=cfg.optim.warmup_steps,
                total=cfg.train.steps,
                min_ratio=cfg.optim.min_lr_ratio,
            ),
        )
        n_params = model.num_parameters()  # before ZeRO-3 partitions the parameters away
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config
        )
        stage_n = zero_stage(ds_config)
        if cfg.train.compile:
            engine.compile()
        log.info(
            "pretrain: %s %s, %.2f M parameters, ZeRO-%d, %s%s, %d process(es) (%s), masking %s",
            # a continued checkpoint's sizes are its own, whatever model.preset says
            f"{arch.n_layers}-layer, {arch.d_model}-wide" if cfg.model.init_from else cfg.model.preset,
            {"mlp": "profile autoencoder", "panel_transformer": "panel transformer"}.get(
                arch.kind, "encoder"
            ),
            n_params / 1e6,
            stage_n,
            precision,
            ", compiled" if cfg.train.compile else "",
            dist_env.world_size,
            dist_env.launcher,
            masking_text(cfg.masking),
        )

        # 4. Masking on the training device (its generators are checkpointed).
        masker = Masker(
            cfg.masking,
            target=arch.target,
            vocab_size=arch.vocab_size,
            n_bins=arch.n_bins,
            total_steps=cfg.train.steps,
            seed=cfg.train.seed,
            rank=dist_env.rank,
            device=device,
        )

        # 5. Resume: model, optimizer, schedule, step (the data position) and every RNG.
        ckpt_root = out / "checkpoints"
        step = 0
        window = {"loss": 0.0, "masked": 0.0, "correct": 0.0, "ratio": 0.0, "micro": 0.0, "tokens": 0.0}
        step_ratios: list[float] = []  # the realised ratio of every step of the window (rank 0's batches)
        per_record = cfg.masking.ratio.granularity == "sample" and cfg.masking.ratio.kind != "linear"
        record_window = [0] * RECORD_RATIO_BINS  # per record (ratios drawn per record; rank 0's batches)
        # the newest checkpoint whose files match their sha256 (a corrupt one: warning, the previous one)
        latest = (
            on_rank0(lambda: checkpoint.resume_point(ckpt_root), dist_env) if decision == "resume" else None
        )
        if latest is not None:
            rng = checkpoint.load(engine, latest, rank=dist_env.rank)
            try:
                masker.load_state_dict(checkpoint.restore_rng_state(rng))
                window.update(rng.get("metrics_window", {}))  # the logging window the checkpoint cut through
                step_ratios = list(rng.get("metrics_step_ratios", []))
                record_window = [int(n) for n in rng.get("metrics_record_ratios", record_window)]
                step = int(checkpoint.read_meta(latest)["step"])
            except (ValueError, KeyError, TypeError, AttributeError) as exc:  # altered, digests rewritten
                raise checkpoint.CheckpointError(
                    f"checkpoint {latest}: its RNG, masking or step state is corrupt ({type(exc).__name__}: "
                    f"{exc}); restore it or pass --overwrite to start the run again"
                ) from None
            log.info("pretrain: resumed from %s (step %d of %d)", latest, step, cfg.train.steps)
            if dist_env.is_main:
                rundir.note_resume(out, step)
        else:
            torch.manual_seed(cfg.train.seed + 1 + dist_env.rank)  # dropout: its own stream per rank
        if dist_env.is_main:
            rundir.note_precision(out, step, precision, device.type, cfg.train.precision)
        if dist_env.is_main and ckpt_root.exists():
            checkpoint.prune(ckpt_root, cfg.train.keep_last)  # leftovers of a save cut short by a kill

        sums = torch.zeros(len(WINDOW_SUMS), dtype=torch.float64, device=device)
        # the first step whose loss was not finite (0: none), kept on the device: found at every step
        # without waiting for the device, read (and named) at the next read_window
        first_bad = torch.zeros((), dtype=torch.long, device=device)
        pending_ratios: list[torch.Tensor] = []  # each step's realised ratio since the last read
        record_counts = (
            torch.zeros(RECORD_RATIO_BINS, dtype=torch.float64, device=device) if per_record else None
        )
        computed_norm: torch.Tensor | None = None  # ZeRO-0: the gradient norm train_step took (see grad_norm)

        def read_window() -> None:
            """The device sums into `window` (one wait for the device), then the finiteness check: the
            loss (and the gradient norm, where DeepSpeed computes it) since the last read. Runs before every
            log line, held-out evaluation and checkpoint, so NaN never reaches metrics.jsonl or a save."""
            for key, value in zip(WINDOW_SUMS, sums.tolist()):
                window[key] += value
            window["micro"] += len(pending_ratios) * cfg.train.grad_accum
            if pending_ratios:
                step_ratios.extend(torch.stack(pending_ratios).tolist())
            if record_counts is not None:
                for i, n in enumerate(record_counts.tolist()):
                    record_window[i] += int(n)
                record_counts.zero_()
            sums.zero_()
            pending_ratios.clear()
            finite.check_step(
                int(first_bad) or step, cfg, window["loss"], grad_norm(), dist_env.world_size, device
            )

        def grad_norm() -> float | None:
            """The last step's global gradient norm: DeepSpeed's, or at ZeRO-0 the one train_step took."""
            norm = engine.get_global_grad_norm()
            return norm if norm is not None or computed_norm is None else float(computed_norm)

        def save_checkpoint() -> Path:
            read_window()
            finite.check_weights(engine, step, cfg, dist_env.world_size, device)  # never save NaN weights
            meta = {
                "data_position": {"step": step, "epoch": train_data.epoch_of(step)},
                "world_size": dist_env.world_size,
            }
            rng = {
                **checkpoint.rng_state(masker.state_dict()),
                "metrics_window": dict(window),
                "metrics_step_ratios": list(step_ratios),
                **({"metrics_record_ratios": list(record_window)} if per_record else {}),
            }
            path = checkpoint.save(engine, ckpt_root, step, rank=dist_env.rank, rng=rng, meta=meta)
            if dist_env.is_main:
                checkpoint.prune(ckpt_root, cfg.train.keep_last)
            return path

        # 6. The loop. Its batches read the training split in no order: no readahead around each
        #    record (the passes over the whole split before it, e.g. the profile model's gene
        #    statistics, keep theirs)
        train_split.read_randomly()
        metrics = MetricsLogger(
            out,
            total_steps=cfg.train.steps,
            start_step=step,
            enabled=dist_env.is_main,
            progress=cfg.train.progress,
            report_to=cfg.train.report_to,
            config=cfg.model_dump(mode="json"),
        )
        window_start = time.perf_counter()
        while step < cfg.train.steps:
            skipped = engine.skipped_steps
            # the step's own rate: after it, the scheduler holds the next step's
            step_lr = schedule.get_last_lr()[0]
            step_ratio, computed_norm = train_step(
                engine, masker, train_data, step, cfg.train.grad_accum, device, sums, record_counts
            )
            pending_ratios.append(step_ratio)
            step += 1
            metrics.advance()
            first_bad = torch.where((first_bad == 0) & ~torch.isfinite(sums[0]), step, first_bad)
            if engine.skipped_steps != skipped:
                # ZeRO found a non-finite gradient and skipped the step (fp16's loss scaling, which
                # skips on purpose, is not offered): abort, never skip
                raise finite.diverged("the gradient (DeepSpeed skipped the step on an overflow)", step, cfg)

            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                # a NaN / infinite loss or gradient norm stops the run (exit 2) before anything saves it
                read_window()
                keys = list(window)
                totals = dict(zip(keys, all_sum([window[k] for k in keys], dist_env.world_size, device)))
                elapsed = time.perf_counter() - window_start
                record = {
                    "loss": totals["loss"] / max(totals["masked"], 1.0),
                    "ratio": totals["ratio"] / max(totals["micro"], 1.0),  # realised: masked / maskable
                    "step_ratios": [round(r, 5) for r in step_ratios],  # each step's, for histograms
                    # ratios drawn per record: the window's records by realised ratio, in bins of 1/40
                    **({"record_ratio_counts": list(record_window)} if per_record else {}),
                    "lr": step_lr,  # the window's last step's
                    "tokens_per_s": totals["tokens"] / max(elapsed, 1e-9),
                    "tokens": totals["tokens"],
                    "epoch": train_data.epoch_of(step - 1),
                }
                if arch.target != "values":
                    record["accuracy"] = totals["correct"] / max(totals["masked"], 1.0)
                norm = grad_norm()
                if norm is not None:
                    record["grad_norm"] = float(norm)
                metrics.log(step, "train", record)
                window = dict.fromkeys(window, 0.0)
                step_ratios = []
                record_window = [0] * RECORD_RATIO_BINS
                window_start = time.perf_counter()

            # held-out evaluation and checkpoints are not training: left out of the next window's tok/s.
            # Timed after read_window and stop.agreed, which wait for the step's queued GPU work (that
            # wait is training's)
            paused = 0.0
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.steps:
                read_window()
                began_eval = time.perf_counter()
                result = finite.check_eval(
                    held_out_loss(engine, held_out, cfg, arch, dist_env, device, counts), step, cfg
                )
                metrics.log(step, "eval", result)
                paused += time.perf_counter() - began_eval

            stopping = stop.agreed(dist_env.world_size, device)
            if stopping or (step % cfg.train.checkpoint_every == 0 and step < cfg.train.steps):
                began_save = time.perf_counter()
                path = save_checkpoint()
                paused += time.perf_counter() - began_save
                if stopping:
                    if Requeue.ends_process:
                        stop.ignore_from_now()
                    # what to do, said for a Python caller too (fit_cells in a notebook): no process
                    # exits there; the command line adds its exit code (cli.requeue_message)
                    # Ctrl-C in a Python caller stops it as Ctrl-C does (KeyboardInterrupt); a SIGTERM
                    # there, and every stop at the command line, asks to be requeued
                    stopped = (
                        Interrupted
                        if stop.received == signal.SIGINT and not Requeue.ends_process
                        else Requeue
                    )
                    raise stopped(
                        (
                            f"received {stop.name}"
                            if stop.received is not None
                            else "another process was signalled"
                        )
                        + f": checkpointed step {step} of {cfg.train.steps} to {path}; "
                        + (
                            # --overwrite again would start over: what resumes is the command without it
                            "run the command again without --overwrite (overwrite=False) to resume from it"
                            if overwrite
                            else "run the same command (or Python call) again to resume from it"
                        )
                    )
            window_start += paused

        # 7. The end: final held-out evaluation, checkpoint, portable checkpoint, run.json.
        read_window()
        final_eval = finite.check_eval(
            held_out_loss(engine, held_out, cfg, arch, dist_env, device, counts), step, cfg
        )
        metrics.log(step, "eval", final_eval)
        final = save_checkpoint()
        if dist_env.is_main:
            state = checkpoint.consolidated_state_dict(engine, final, stage_n)
            info = {
                "modality": spec.modality,
                "scheme": spec.scheme,
                "n_bins": spec.n_bins,
                "masking": cfg.masking.model_dump(mode="json"),
                "tokenizer": {k: v for k, v in (store.manifest.get("tokenizer") or {}).items() if k != "dir"},
                "training": {
                    "steps": step,
                    "seed": cfg.train.seed,
                    "zero_stage": stage_n,
                    "precision": precision,
                    "world_size": dist_env.world_size,
                    "global_batch": train_data.global_batch,
                    "max_length": max_length,
                },
                "data": {
                    "store": str(store.root),
                    "manifest_sha256": inputs[0]["sha256"],
                    # the data's own digest: the same store prepared elsewhere is still this one
                    "content_sha256": inputs[0].get("content_sha256"),
                    "train_split": cfg.data.train_split,
                    # the files the store was prepared from: evaluate notes a task store made from them
                    "sources": [
                        {"name": s.get("name"), "sha256": s.get("sha256")}
                        for s in store.manifest.get("sources") or []
                    ],
                },
                "prep": prep_settings(store),
                "eval": final_eval,
                "code": code_version(),
                # continued pretraining: where the weights started (their steps: `training.steps` more)
                "init_from": {k: v for k, v in init_input.items() if k != "name"}
                if cfg.model.init_from
                else None,
            }
            checkpoint.export_portable(out, state, arch, tokenizer_dir=store.tokenizer_dir, info=info)
            rundir.drop_replaced(out)  # this run has its model: the run --overwrite replaced goes
            # run.json last: from now on the directory is a finished output.
            tree, digests = rundir.finished_files(out)
            run_tmp = Path(tempfile.mkdtemp(prefix=".run.tmp-", dir=out))
            write_run_info(
                run_tmp,
                stage="pretrain",
                fingerprint=stage.fingerprint,
                inputs=inputs,
                seeds={"train": cfg.train.seed},
                started=began,  # this process's: a resumed run's time since it resumed
                extra={
                    "world_size": dist_env.world_size,
                    "launcher": dist_env.launcher,
                    "precision": precision,
                    "deepspeed": ds_config,
                    # what the config's optim keys drive (DeepSpeed's JSON holds no optimizer: biomask's own)
                    "optimizer": {
                        "class": "torch.optim.AdamW",
                        "schedule": "linear warm-up over optim.warmup_steps, then cosine decay to "
                        "optim.lr * optim.min_lr_ratio at train.steps (warmup_cosine)",
                    },
                    "architecture": arch.to_dict(),
                    "parameters": n_params,
                    "final_eval": final_eval,
                    "resumed_from_steps": rundir.resumes(out),  # [] for a run that never stopped
                    # steps trained by other code (resumed after an upgrade); absent when one code did
                    **({"trained_by": mixed} if (mixed := rundir.trained_by(out)) else {}),
                    **({"trained_in": parts} if (parts := rundir.trained_in(out)) else {}),
                    # every file of the run, so --overwrite can tell a file added later apart; the
                    # sha256 of its smaller ones (its log and config among them: a report checks them)
                    FILE_TREE_KEY: tree,
                    OUTPUT_DIGESTS_KEY: digests,
                },
            )
            (run_tmp / "run.json").rename(out / "run.json")
            run_tmp.rmdir()
            rundir.finish(out)
            reference = final_eval.get("mean_reference_loss")
            log.info(
                "pretrain: done — portable checkpoint %s (held-out %s loss, mean over the ratio grid: %.4f%s)",
                out / "model",
                f"masked-gene {arch.loss}" if arch.kind in PROFILE_KINDS else "masked-token",
                final_eval["mean_loss"],
                f"; the reference predictor's: {reference:.4f}" if reference is not None else "",
            )
            if arch.kind in PROFILE_KINDS and reference is not None and final_eval["mean_loss"] > reference:
                # the reference is a constant guess (each masked gene's training mean): doing worse than it on
                # unseen cells is worth a warning, not an info line (a user's trial: 3 of 4 real sets of
                # 100-559 cells at fit_cells' 1,500 steps, with nothing in the log to tell)
                batch = cfg.train.micro_batch_size * cfg.train.grad_accum * dist_env.world_size
                passes = cfg.train.steps * batch / max(len(train_split), 1)
                # which ratios it loses at tells overfitting (all of them) from ratios it never trained at (a
                # few held-out cells make either noise: 100 cells keep 5, where a seed moves it by 0.03)
                worse = [r for r, v in final_eval["loss"].items() if v > final_eval["reference_loss"][r]]
                log.warning(
                    "pretrain: the held-out masked-gene loss (%.4f) is above the reference predictor's (%.4f, "
                    "each gene's training mean) on %s held-out cells, at ratios %s of the grid: the model "
                    "predicts expression in cells it did not train on no better than the gene means (%s "
                    "training cells, ~%s passes over them). Its embedding may still group cells; check "
                    "clusters against known markers before reading them",
                    final_eval["mean_loss"],
                    reference,
                    f"{len(eval_split):,}",
                    ", ".join(worse),
                    f"{len(train_split):,}",
                    f"{passes:,.0f}" if passes >= 1 else f"{passes:.2g}",  # not "~0" of a short run
                )
        if dist_env.world_size > 1:
            dist.barrier()
    except Exception as exc:
        # a replacement (--overwrite) that failed before its first checkpoint gives the run it replaced
        # back: a diverged run never costs the good one. Not on a stop (Requeue): it resumes
        lost = dist_env.world_size > 1 and _lost_peer(exc)
        steps = (
            checkpoint.complete_steps(out / "checkpoints") if lost else []
        )  # this run's, before a put-back replaces them
        restored = (
            started and dist_env.is_main and not isinstance(exc, Requeue) and rundir.restore_replaced(out)
        )
        back = f"\nThe run it was to replace is back in {out}, as it was." if restored else ""
        if lost:
            # a raw gloo / NCCL traceback named no rank, step or way on
            raise BiomaskError(
                _lost_peer_message(
                    exc, dist_env, out, cfg.deepspeed.timeout_minutes, overwrite, steps, restored
                )
            ) from None
        if restored:
            exc.args = (f"{exc.args[0] if exc.args else exc}{back}", *exc.args[1:])
        raise
    finally:
        if engine is not None:
            _release(engine)
        stop.restore()
        if callers_rng is not None:
            checkpoint.restore_rng_state(callers_rng)
        if metrics is not None:
            metrics.close()
        for lock in locks:
            if lock is not None:
                lock.release()
    return out


def _lost_peer(exc: BaseException) -> bool:
    """Whether a collective failed because another process went away or stopped answering."""
    import torch.distributed as dist

    backend_error = getattr(dist, "DistBackendError", None)
    if backend_error is not None and isinstance(exc, backend_error):
        return True
    # gloo raises a plain RuntimeError; its messages carry the source file they come from (a tracker's
    # network error, "Connection reset by peer" too, is no lost process)
    return isinstance(exc, RuntimeError) and any(
        sign in str(exc) for sign in ("gloo/transport", "/gloo/", "c10d")
    )


def _lost_peer_message(
    exc: BaseException,
    dist_env: DistEnv,
    out: Path,
    timeout_minutes: float,
    overwrite: bool,
    steps: list[int],
    restored: bool = False,
) -> str:
    """What a process that lost the others says: which it is, why, what is kept and what to run.
    `steps`: this run's checkpoints, read before a put-back of the run it replaced (`restored`)."""
    first = first_line(exc, type(exc).__name__)
    if restored:
        then = (
            f"this run wrote no checkpoint, and the run it was to replace is back in {out}, as it was: run "
            "the same command to start the replacement again"
        )
    elif not steps:
        then = (
            "no checkpoint was written yet: once every process has ended, run the command again to start it"
        )
    else:
        # as the requeue message: --overwrite again would start over
        how = "the command again without --overwrite" if overwrite else "the same command"
        then = (
            f"the last complete checkpoint is step {steps[-1]} in {out / 'checkpoints'}: once every process "
            f"has ended, run {how} to resume from it"
        )
    return (
        f"pretrain (process {dist_env.rank} of {dist_env.world_size}): lost the other processes ({first[:300]}). "
        "One of them ended (killed, out of memory, its node gone) or stopped answering for "
        f"deepspeed.timeout_minutes ({timeout_minutes:g}); {then}"
    )


def _start_process_group(dist_env: DistEnv, timeout_minutes: float) -> None:
    """The process group, with what a wait for processes that never come means said before it and
    after it: RANK and WORLD_SIZE left from another launch made a plain run wait in silence, then end
    in a DistStoreError traceback."""
    import torch.distributed as dist

    by_hand = dist_env.world_size > 1 and dist_env.launcher == "env"
    if by_hand and dist_env.rank == 0:
        log.warning(
            "pretrain: WORLD_SIZE=%d and RANK=%d are set in the environment, with no launcher (torchrun, the "
            "deepspeed launcher, srun): waiting up to %g minutes (deepspeed.timeout_minutes) for the other "
            "processes at %s:%d. If they are left from another launch, stop this and unset WORLD_SIZE, RANK, "
            "LOCAL_RANK, MASTER_ADDR and MASTER_PORT",
            dist_env.world_size, dist_env.rank, timeout_minutes, dist_env.master_addr, dist_env.master_port,
        )  # fmt: skip
    # waiting for the other processes blocks in C++, where no Python handler runs: the stop training
    # asks for (a flag) was never read, and SIGTERM or Ctrl-C left the wait to run its 30 minutes.
    # Until the group stands, they end the process as they would any command that has written nothing
    waiting = dist_env.world_size > 1 and threading.current_thread() is threading.main_thread()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)} if waiting else {}
    for sig, handler in handlers.items():
        if handler not in (signal.SIG_IGN, None):
            signal.signal(sig, signal.SIG_DFL)
    # a launched process whose peers never come (an srun step that failed on one node, a torchrun
    # of another host not started) waited its 30 minutes in silence: said once the wait is long
    still = threading.Timer(
        WAIT_SAID_AFTER_S,
        lambda: log.warning(
            "pretrain (process %d of %d): still waiting after %g s for the other processes at %s:%d; one "
            "that never started (a failed srun step, a node down, a torchrun not run on another host) "
            "ends this after %g minutes (deepspeed.timeout_minutes), or stop it now (Ctrl-C, scancel)",
            dist_env.rank,
            dist_env.world_size,
            WAIT_SAID_AFTER_S,
            dist_env.master_addr,
            dist_env.master_port,
            timeout_minutes,
        ),
    )
    still.daemon = True
    if dist_env.world_size > 1:
        still.start()
    try:
        init_process_group(dist_env, timeout_minutes)
    except (dist.DistStoreError, dist.DistNetworkError) as exc:  # rank 0's store; another rank's client
        first = first_line(exc)
        if "EADDRINUSE" in str(exc) or "failed to listen" in str(exc):  # at once, not after a wait
            raise InputError(
                f"pretrain (process {dist_env.rank} of {dist_env.world_size}): MASTER_PORT {dist_env.master_port} "
                f"on {dist_env.master_addr} is taken (another run on this host?): choose another "
                f"(torchrun --master_port, or MASTER_PORT). {first[:200]}. Nothing was written"
            ) from None
        raise InputError(
            f"pretrain (process {dist_env.rank} of {dist_env.world_size}"
            f"{', RANK and WORLD_SIZE set by hand' if by_hand else ''}): the other processes did not join within {timeout_minutes:g} minutes "
            f"(deepspeed.timeout_minutes; {first}). Start every process (torchrun --nproc_per_node "
            f"{dist_env.world_size} ...), or for one process unset WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR "
            "and MASTER_PORT if they are left from another launch. Nothing was written"
        ) from None
    finally:
        still.cancel()
        for sig, handler in handlers.items():
            if handler is not None:
                signal.signal(sig, handler)


WAIT_SAID_AFTER_S = 60  # processes of one launch join within seconds


def _stage_spelled_otherwise(cfg: PretrainConfig, world_size: int) -> PretrainConfig | None:
    """This config with `deepspeed.stage` spelled the other way for this many processes (auto as the
    stage it resolves to, or that stage as auto), or None where there is no other spelling."""
    auto = cfg.deepspeed.model_copy(update={"stage": "auto"}).resolved_stage(world_size)
    if cfg.deepspeed.stage == "auto":
        other: Any = auto
    elif cfg.deepspeed.stage == auto:
        other = "auto"
    else:
        return None
    return cfg.model_copy(update={"deepspeed": cfg.deepspeed.model_copy(update={"stage": other})})
