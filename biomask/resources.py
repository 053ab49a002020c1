"""The configs the library itself reads: the ZeRO presets, the main job's pipeline, the templates' pipeline.

In a source checkout (and an editable install) they are the repository's `configs/`, the files users edit
and the README names. A built wheel carries the same tree as package data, `biomask/configs/` (setup.py),
so `pip install .` works from any directory; a `configs/...` path that does not exist where the user
runs biomask then means the copy shipped with the package.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path

import tomllib

_PACKAGE = Path(__file__).resolve().parent
PACKAGED = _PACKAGE / "configs"  # a wheel
CHECKOUT = _PACKAGE.parent / "configs"  # a source checkout or an editable install


@functools.cache
def source_checkout() -> Path | None:
    """The folder above the package where biomask runs from its own source tree (a checkout, an
    editable install): its pyproject.toml names the project biomask. None for an installed copy — a
    wheel in site-packages, or `pip install --target` into a user's own project, whose git commit
    and folders are not biomask's to record or write into."""
    root = _PACKAGE.parent
    try:
        with open(root / "pyproject.toml", "rb") as fh:
            project = tomllib.load(fh).get("project")
    except (OSError, tomllib.TOMLDecodeError):
        return None
    return root if isinstance(project, dict) and project.get("name") == "biomask" else None


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


def shipped_configs() -> dict[str, str]:
    """Every config the package ships, by its path under configs/ (`evaluate/motif-task.yaml`) ->
    what its first comment line says (a JSON preset: '')."""
    root = configs_dir()
    found = {}
    for path in sorted(root.rglob("*")):
        if path.suffix not in (".yaml", ".json") or not path.is_file():
            continue
        first = ""
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("#") and line.lstrip("#").strip():
                    first = line.lstrip("#").strip()
                    break
        found[path.relative_to(root).as_posix()] = first
    return found


def usable_cores() -> int:
    """The CPU cores this process may use: its affinity mask where the OS has one, and no more than its
    cgroup's CPU quota allows (a container run with `--cpus 2`, a Kubernetes limit, a systemd slice
    sees every core of the host in its affinity mask: `auto` started a task per host core)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


def cgroup_cpu_quota(
    root: str | os.PathLike = "/sys/fs/cgroup", own: str | os.PathLike = "/proc/self/cgroup"
) -> float | None:
    """The CPUs' worth of time this process's cgroup (or a parent's, the least of them) may use per
    period (cgroup v2's cpu.max, v1's cpu.cfs_quota_us / cpu.cfs_period_us); None: no quota, or none
    readable here."""
    try:
        lines = Path(own).read_text(encoding="ascii", errors="replace").splitlines()
    except OSError:
        return None
    found = []
    for line in lines:
        _, controllers, where = [*line.split(":", 2), "", ""][:3]
        if controllers == "":  # v2: one hierarchy, cpu.max in each cgroup
            folders, read = [Path(root), Path(root) / "unified"], _cpu_max  # unified: a hybrid v1 + v2 host
        elif "cpu" in controllers.split(","):
            folders = [Path(root) / controllers, Path(root) / "cpu", Path(root) / "cpu,cpuacct"]
            read = _cfs_quota
        else:
            continue
        for folder in dict.fromkeys(folders):
            # the cgroup's own folder and its parents; in a container without a cgroup namespace the
            # recorded path is the host's and only the mount's root is this container's
            parts = Path(where.strip() or "/").parts[1:]
            for depth in range(len(parts), -1, -1):
                quota = read(folder.joinpath(*parts[:depth]))
                if quota is not None:
                    found.append(quota)
    return min(found) if found else None


def _cpu_max(folder: Path) -> float | None:
    try:
        quota, period = (folder / "cpu.max").read_text(encoding="ascii", errors="replace").split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None


def _cfs_quota(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text(encoding="ascii", errors="replace"))
        period = int((folder / "cpu.cfs_period_us").read_text(encoding="ascii", errors="replace"))
        return None if quota <= 0 else quota / period
    except (OSError, ValueError, ZeroDivisionError):
        return None


def resolve_threads(setting: int | str = "auto") -> int:
    """`num_workers`: a number of threads, or auto — $OMP_NUM_THREADS when set (a pipeline running
    stages side by side gives each its share), else the usable cores."""
    if setting != "auto":
        return int(setting)
    return omp_threads() or usable_cores()


def omp_threads() -> int | None:
    """$OMP_NUM_THREADS as a thread count (None: unset or not a positive number), at most the usable
    cores: a typo of 100000 segfaulted pretrain and evaluate (gloo, libgomp could not start the
    threads) where torch alone holds to its cores. Said once when cut."""
    global _said_omp_cap, _said_omp_bad
    # " 4": libgomp and torch read 4; "4,2" (nested levels): the outer level's 4
    env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if not (env.isdigit() and int(env) > 0):
        if env and not _said_omp_bad:
            # libgomp ignores it too (all cores), with a line of its own that names no remedy
            logging.getLogger("biomask").warning(
                "OMP_NUM_THREADS=%r is not a positive whole number: ignored, so every core is used "
                "(set it to a thread count, or unset it)",
                os.environ["OMP_NUM_THREADS"],
            )
            _said_omp_bad = True
        return None
    cores = usable_cores()
    if int(env) > cores:
        if not _said_omp_cap:
            logging.getLogger("biomask").warning(
                "OMP_NUM_THREADS=%s is more than the %d core(s) this process may use: using %d",
                env,
                cores,
                cores,
            )
            _said_omp_cap = True
        return cores
    return int(env)


_said_omp_cap = _said_omp_bad = False


@contextlib.contextmanager
def restoring_env(*names: str) -> Iterator[None]:
    """The caller's values of these environment variables (or their absence) again after the block:
    a setting biomask makes for its own command (threads, progress bars) must not stay in a notebook
    or a script that called it, nor in the processes they start later."""
    saved = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def honour_omp_threads() -> None:
    """Give torch the $OMP_NUM_THREADS it was asked for, again. numba's OpenMP layer (which scanpy's
    normalize_total, log1p and highly_variable_genes start) sets the shared OpenMP runtime to every
    core, so torch ran 2 threads under OMP_NUM_THREADS=1 after them in one process (fit_cells: prep,
    then pretraining) — 3x slower per step on a busy 2-core machine. Without the variable, torch's
    own default stands."""
    asked = omp_threads()
    if asked is not None:
        import torch

        if torch.get_num_threads() != asked:
            torch.set_num_threads(asked)
