"""Non-finite training stops the run: the policy is abort, never skip.

A NaN or infinite training loss, gradient norm, held-out loss or weight means the run diverged (a too
high learning rate, no clipping, an overflow). Skipping such steps would hide it and leave weights that
may already be damaged, so the run stops with `DivergedError` (exit 2) naming the step and what to
change. Every step is checked: ZeRO's overflow check (a skipped step stops the run at once) and
the loss, whose first non-finite step is kept on the device and read with the logging window (before
every log line, held-out evaluation and checkpoint: no wait for the device at each step), with the
gradient norm, agreed across ranks. The weights are checked before every checkpoint is saved, so a
checkpoint or portable model with non-finite weights is never written and `metrics.jsonl` never holds
NaN or Infinity. The last good checkpoint stays in place.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from biomask.errors import ConfigError, InputError


class DivergedError(InputError):
    """Training produced a non-finite loss, gradient norm or weight (exit code 2)."""


def check_optim(cfg: Any) -> None:
    """The optimizer's numbers must be finite (YAML reads `.inf` and `1e400` as infinity)."""
    for key in ("lr", "eps", "weight_decay", "grad_clip"):
        value = getattr(cfg.optim, key, None)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"optim.{key}={value}: must be a finite number")


def advice(cfg: Any) -> str:
    clip = getattr(cfg.optim, "grad_clip", 0.0)
    clipping = (
        "enable gradient clipping (optim.grad_clip=1.0; it is off)"
        if not clip
        else f"clip harder (optim.grad_clip, now {clip:g})"
    )
    return (
        f"lower optim.lr (now {cfg.optim.lr:g}) or {clipping}, then rerun with --overwrite (a changed "
        "config does not resume this run)"
    )


def _any_rank(bad: bool, world_size: int, device: torch.device) -> bool:
    if world_size == 1:
        return bad
    flag = torch.tensor([1 if bad else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def diverged(what: str, step: int, cfg: Any) -> DivergedError:
    return DivergedError(
        f"pretrain: {what} is not finite at step {step} of {cfg.train.steps}: training diverged. Stopped "
        f"before writing a checkpoint or model with non-finite weights (checkpoints already in "
        f"{cfg.output}/checkpoints are kept). To fix: {advice(cfg)}"
    )


def check_step(
    step: int, cfg: Any, loss: float, grad_norm: Any, world_size: int, device: torch.device
) -> None:
    """After a step: `loss` (any sum of this rank's step losses) and the global gradient norm (None
    when DeepSpeed does not compute it). Collective when world_size > 1: every rank stops together."""
    what = None
    if not math.isfinite(loss):
        what = f"the training loss ({loss})"
    elif grad_norm is not None and not math.isfinite(float(grad_norm)):
        what = f"the gradient norm ({float(grad_norm)})"
    if _any_rank(what is not None, world_size, device):
        raise diverged(what or "the training loss on another rank", step, cfg)


def check_eval(result: dict[str, Any], step: int, cfg: Any) -> dict[str, Any]:
    """A held-out evaluation (identical on every rank) before it is logged; returns it."""
    values = [*result["loss"].values(), result["mean_loss"]]
    if not all(math.isfinite(v) for v in values):
        raise diverged(f"the held-out loss ({result['loss']})", step, cfg)
    return result


def check_weights(engine: Any, step: int, cfg: Any, world_size: int, device: torch.device) -> None:
    """Before a checkpoint: every weight finite (ZeRO-3: this rank's partition; agreed across ranks)."""
    flags = []
    for param in engine.module.parameters():
        tensor = getattr(param, "ds_tensor", None)  # ZeRO-3 keeps this rank's partition here
        tensor = param.detach() if tensor is None else tensor
        if tensor.numel():
            flags.append(torch.isfinite(tensor).all())
    bad = bool(flags) and not bool(torch.stack(flags).all())
    if _any_rank(bad, world_size, device):
        raise diverged("a model weight", step, cfg)
