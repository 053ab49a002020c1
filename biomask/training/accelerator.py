"""Which device a training process uses, decided once for torch and DeepSpeed.

DeepSpeed picks its accelerator from `DS_ACCELERATOR` (or its own probing) the first time it is asked,
while torch code asks `torch.cuda.is_available()`: left alone, the two can disagree (DeepSpeed on the CPU
while the model sits on a GPU). Here `DS_ACCELERATOR`, when set, is the user's choice and torch follows
it; unset, a GPU that torch can use is chosen, and the choice is exported before DeepSpeed makes its own.

A GPU in the machine that torch cannot use (a CPU build of torch, a driver older than the build's CUDA,
`CUDA_VISIBLE_DEVICES` empty) is said in a warning, instead of training quietly on the CPU.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from pathlib import Path

import torch

from biomask.errors import ConfigError

log = logging.getLogger(__name__)

ACCELERATORS = ("cpu", "cuda")


def accelerator() -> str:
    """ "cuda" or "cpu"; exports DS_ACCELERATOR so that DeepSpeed agrees."""
    chosen = os.environ.get("DS_ACCELERATOR") or ("cuda" if torch.cuda.is_available() else "cpu")
    if chosen not in ACCELERATORS:
        raise ConfigError(
            f"DS_ACCELERATOR={chosen}: biomask trains on {' or '.join(ACCELERATORS)}; "
            "unset it to use a GPU when torch sees one"
        )
    if chosen == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"DS_ACCELERATOR=cuda, but {_why_no_cuda()}; unset DS_ACCELERATOR to train on the CPU"
        )
    if chosen == "cpu":
        _warn_unused_gpu()
    os.environ["DS_ACCELERATOR"] = chosen
    return chosen


def training_device(local_rank: int = 0) -> torch.device:
    return torch.device("cuda", local_rank) if accelerator() == "cuda" else torch.device("cpu")


def resolve_precision(requested: str, device: torch.device) -> str:
    """`auto`: bf16 autocast on a GPU that supports it (Ampere and later), fp32 otherwise."""
    if requested != "auto":
        return requested
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def describe(device: torch.device) -> str:
    """The device in words, for the first log line of a run."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{device} ({props.name}, {props.total_memory / 2**30:.0f} GiB)"
    threads = torch.get_num_threads()
    return f"cpu ({threads} thread{'' if threads == 1 else 's'})"


def nvidia_gpu_present() -> str | None:
    """What shows an NVIDIA GPU in this machine (the device file or nvidia-smi), or None."""
    if Path("/dev/nvidia0").exists():
        return "/dev/nvidia0"
    return shutil.which("nvidia-smi")


def _why_no_cuda() -> str:
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build (install the CUDA build: docs/install.md)"
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return "CUDA_VISIBLE_DEVICES is empty"
    return (
        f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU (is the NVIDIA driver older "
        "than that CUDA? see docs/install.md)"
    )


@functools.cache  # once per process
def _warn_unused_gpu() -> None:
    where = nvidia_gpu_present()
    if where is None:
        return
    if torch.cuda.is_available():
        log.warning(
            "DS_ACCELERATOR=cpu: training on the CPU although torch sees %d GPU(s)", torch.cuda.device_count()
        )
    else:
        log.warning("an NVIDIA GPU is present (%s) but %s: training on the CPU", where, _why_no_cuda())
