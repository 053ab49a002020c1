"""The DeepSpeed config of a run: a ZeRO preset (configs/deepspeed/zero<stage>.json) or the user's JSON,
with its "auto" values filled from the pretrain config, optimizer offload, and `deepspeed.overrides`.

Batch sizes always come from the pretrain config (`train.micro_batch_size`, `train.grad_accum`): the
data loader is driven by them, so a JSON that sets them differently is an error, not a silent mismatch.
The optimizer (torch AdamW, nothing JIT-compiled) and the warm-up + cosine schedule are built in
Python by the trainer and handed to `deepspeed.initialize`.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from biomask.errors import ConfigError
from biomask.resources import configs_dir
from biomask.training.config import PretrainConfig

PRESETS_DIR = configs_dir() / "deepspeed"


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def read_ds_json(cfg: PretrainConfig, world_size: int = 1) -> tuple[dict[str, Any], Path]:
    path = (
        Path(cfg.deepspeed.config)
        if cfg.deepspeed.config
        else PRESETS_DIR / f"zero{cfg.deepspeed.resolved_stage(world_size)}.json"
    )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"deepspeed config {path} does not exist (key deepspeed.config / deepspeed.stage)"
        ) from None
    except ValueError as exc:
        raise ConfigError(f"deepspeed config {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"deepspeed config {path} must be a JSON object")
    return data, path


def build_ds_config(cfg: PretrainConfig, *, precision: str, world_size: int = 1) -> dict[str, Any]:
    data, path = read_ds_json(cfg, world_size)
    data = _merge(data, cfg.deepspeed.overrides)
    ours = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
    }
    for key, value in ours.items():
        given = data.get(key, "auto")
        if given != "auto" and given != value:
            raise ConfigError(
                f"deepspeed config {path}: {key} is {given}, but the pretrain config says {value}; "
                f'set it to "auto" there (batch sizes come from train.micro_batch_size and train.grad_accum)'
            )
        data[key] = value
    data.pop("train_batch_size", None)  # derived by DeepSpeed from the two above and the world size
    if data.get("gradient_clipping", "auto") == "auto":
        data["gradient_clipping"] = cfg.optim.grad_clip
    apply_precision(data, precision, where=f"deepspeed config {path}")
    if data.get("fp16", {}).get("enabled"):
        raise ConfigError(f"deepspeed config {path}: fp16 is not supported by biomask (use bf16 or fp32)")
    zero = data.setdefault("zero_optimization", {"stage": 0})
    stage = int(zero.get("stage", 0))
    if cfg.deepspeed.config is None and stage != cfg.deepspeed.resolved_stage(world_size):
        raise ConfigError(
            f"deepspeed.overrides set zero_optimization.stage={stage}; use deepspeed.stage instead"
        )
    if cfg.deepspeed.offload_optimizer:
        if stage == 0:
            raise ConfigError("deepspeed.offload_optimizer needs ZeRO stage 1, 2 or 3 (deepspeed.stage)")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    # A client torch optimizer: DeepSpeed must not insist on its own (JIT-compiled) CPU Adam.
    data.setdefault("zero_force_ds_cpu_optimizer", False)
    data.setdefault("zero_allow_untested_optimizer", True)
    for key in ("optimizer", "scheduler"):
        if key in data:
            raise ConfigError(
                f"deepspeed config {path} defines '{key}'; biomask builds AdamW and the warm-up + cosine "
                "schedule from the optim section of the pretrain config — remove it there"
            )
    return data


def apply_precision(data: dict[str, Any], precision: str, *, where: str) -> None:
    """Set DeepSpeed's two bf16 modes from train.precision ("auto" values filled, contradictions refused).

    - `bf16`: DeepSpeed's `torch_autocast` -- fp32 weights, gradients and optimizer state; matmuls and
      attention in bf16 (what HF's Trainer and torch AMP do). The GPU default: on an H100 it trained the
      `base` preset 1.3-1.8x faster than DeepSpeed's own bf16 mode at ZeRO-0 and 1.2x at ZeRO-2
      (benchmarks/bench_pretrain.py, README), whose per-parameter bookkeeping leaves the GPU waiting
      on the host at this model size.
    - `bf16-weights`: DeepSpeed's `bf16` section -- bf16 weights and gradients, an fp32 master copy in
      the optimizer: less GPU memory (weights and their gradients at half size), for the largest presets.
    - `fp32`: neither.
    """
    wanted = {"bf16": precision == "bf16-weights", "torch_autocast": precision == "bf16"}
    for key, on in wanted.items():
        section = data.setdefault(key, {})
        if not isinstance(section, dict):
            raise ConfigError(f'{where}: {key} must be an object, e.g. {{"enabled": "auto"}}')
        given = section.get("enabled", "auto")
        if given == "auto":
            section["enabled"] = on
        elif bool(given) != on:
            raise ConfigError(
                f"{where}: {key}.enabled is {given}, but train.precision is {precision} "
                f'(bf16 is torch_autocast, bf16-weights is DeepSpeed\'s bf16); set it to "auto" there'
            )
    autocast = data["torch_autocast"]
    if autocast["enabled"]:
        autocast.setdefault("dtype", "bfloat16")
    else:
        autocast.pop("dtype", None)


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def preset_config(
    stage: int, *, micro_batch_size: int, grad_accum: int = 1, grad_clip: float = 1.0, precision: str = "fp32"
) -> dict[str, Any]:
    """A ZeRO preset (configs/deepspeed/zero<stage>.json) with its "auto" values filled, for engines
    built outside `biomask pretrain` (fine-tuning in `biomask evaluate`)."""
    path = PRESETS_DIR / f"zero{stage}.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"no DeepSpeed preset for ZeRO stage {stage} ({path})") from None
    data["train_micro_batch_size_per_gpu"] = micro_batch_size
    data["gradient_accumulation_steps"] = grad_accum
    data.pop("train_batch_size", None)
    if data.get("gradient_clipping", "auto") == "auto":
        data["gradient_clipping"] = grad_clip
    apply_precision(data, precision, where=f"DeepSpeed preset {path}")
    return data
