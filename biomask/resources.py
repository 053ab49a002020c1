"""The configs the library itself reads: the ZeRO presets, the main job's pipeline, the templates' pipeline.

In a source checkout (and an editable install) they are the repository's `configs/`, the files users edit
and the README names. A built wheel carries the same tree as package data, `biomask/configs/` (setup.py),
so `pip install .` works from any directory; a `configs/...` path that does not exist where the user
runs biomask then means the copy shipped with the package.
"""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
PACKAGED = _PACKAGE / "configs"  # a wheel
CHECKOUT = _PACKAGE.parent / "configs"  # a source checkout or an editable install


def configs_dir() -> Path:
    return PACKAGED if PACKAGED.is_dir() else CHECKOUT


def config_root() -> Path:
    """The directory that `configs/...` paths are relative to."""
    return configs_dir().parent


def shipped_config(path: str | os.PathLike) -> Path | None:
    """The shipped copy of a relative `configs/...` path, or None when it names no shipped file."""
    parts = Path(path).parts
    if not parts or parts[0] != "configs":
        return None
    candidate = configs_dir().joinpath(*parts[1:])
    return candidate if candidate.is_file() else None


def usable_cores() -> int:
    """The CPU cores this process may use (its affinity mask where the OS has one)."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def resolve_threads(setting: int | str = "auto") -> int:
    """`num_workers`: a number of threads, or auto — $OMP_NUM_THREADS when set (a pipeline running
    stages side by side gives each its share), else the usable cores."""
    if setting != "auto":
        return int(setting)
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return usable_cores()


def honour_omp_threads() -> None:
    """Give torch the $OMP_NUM_THREADS it was asked for, again. numba's OpenMP layer (which scanpy's
    normalize_total, log1p and highly_variable_genes start) sets the shared OpenMP runtime to every
    core, so torch ran 2 threads under OMP_NUM_THREADS=1 after them in one process (fit_cells: prep,
    then pretraining) — 3x slower per step on a busy 2-core machine. Without the variable, torch's
    own default stands."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        import torch

        if torch.get_num_threads() != int(env):
            torch.set_num_threads(int(env))
