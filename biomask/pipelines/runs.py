"""Pipeline runs on disk: the resolved pipeline file, the outputs a partial run needs, finding a run
directory (see plan.py for its layout; a pretraining run's own directory is biomask.training.rundir)."""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import glob
import json
import logging
import os
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path

import yaml

from biomask.config import load_config, load_recorded_yaml
from biomask.errors import ConfigError, InputError
from biomask.outputs import atomic_write_text, open_own
from biomask.pipelines.plan import Plan, load_plan
from biomask.provenance import read_run_info

log = logging.getLogger(__name__)

_RESOLVED_HEADER = "# Resolved from "
# The records a run directory holds, each with the keys biomask writes: a file of that name without
# them is the user's (run_dir may be a folder of theirs), and a run must not replace it.
_RECORDS = {
    "local-run.json": ("pipeline", "finished", "results"),
    "jobs.json": ("pipeline", "submitted", "stages"),
}


def _is_resolved_pipeline(path: Path) -> bool:
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            return f.readline().startswith(_RESOLVED_HEADER)
    except OSError:
        return False


def _is_record(path: Path, keys: tuple[str, ...]) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and all(k in data for k in keys)


def check_run_dir(plan: Plan) -> None:
    """Refuse a run_dir whose pipeline.yaml, local-run.json, jobs.json, logs/ or slurm/ biomask did
    not write: a run writes those names and would replace them. Checked before any stage runs."""
    run_dir = plan.run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(
            f"run_dir {run_dir} is a file; set run_dir to a folder (run_dir=... on the command line)"
        )
    foreign = []
    resolved = run_dir / "pipeline.yaml"
    ours = resolved.is_file() and _is_resolved_pipeline(resolved)
    if resolved.exists() and not ours:
        foreign.append("pipeline.yaml")
    foreign += [
        n for n, keys in _RECORDS.items() if (run_dir / n).exists() and not _is_record(run_dir / n, keys)
    ]
    if not ours:  # logs/ and slurm/ are a run's only with its resolved pipeline beside them
        foreign += [f"{n}/" for n in ("logs", "slurm") if (run_dir / n).exists()]
    if foreign:
        raise InputError(
            f"run_dir {run_dir} holds {', '.join(foreign)}, which a pipeline run writes, and biomask did "
            "not write them; set run_dir to another folder (in the pipeline file or run_dir=... on the "
            "command line)"
        )
    if ours:
        _check_same_pipeline(plan, resolved)


def _check_same_pipeline(plan: Plan, resolved: Path) -> None:
    """A run_dir belongs to one pipeline: another's stages of the same names would count as changed
    and replace its outputs (the runner overwrites stale outputs in its run_dir), and its records."""
    try:
        earlier = load_recorded_yaml(resolved.read_text(encoding="utf-8"), str(resolved))
    except (OSError, yaml.YAMLError):
        return
    if not isinstance(earlier, dict):
        return
    name, source = earlier.get("name"), earlier.get("source")
    if name in (None, plan.pipeline.name) or source == str(plan.source):
        return  # the same pipeline (renamed in its own file, too)
    raise InputError(
        f"run_dir {plan.run_dir} holds the run of pipeline {name!r} ({source}), not of "
        f"{plan.pipeline.name!r} ({plan.source}): its stages' outputs would be replaced; set run_dir to "
        "another folder (in the pipeline file or run_dir=... on the command line), or remove that run "
        "directory to start over"
    )


LOCK_NAME = ".pipeline-run.lock"


@contextlib.contextmanager
def run_lock(plan: Plan) -> Iterator[None]:
    """One `pipeline run` at a time in a run_dir: a second would resume the same training runs
    beside the first and cut each other's logs. The lock (flock) goes with the process, even a
    killed one, so a stale lock file never blocks."""
    check_run_dir(plan)
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    path = plan.run_dir / LOCK_NAME
    try:
        fd, writable = open_own(path, os.O_RDWR | os.O_CREAT), True
    except PermissionError:
        if not path.is_file():
            raise
        # another user's lock file (a run folder shared in a group): flock needs no write access,
        # only the note of who holds it does
        fd, writable = open_own(path, os.O_RDONLY), False
    with os.fdopen(fd, "r+" if writable else "r", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            handle.seek(0)
            raise _in_use(plan.run_dir, handle.read().strip() or "another process") from None
        except OSError as exc:  # a file system without flock (some NFS and SMB mounts, WSL's drvfs)
            locked = False
            log.warning(
                "cannot lock %s (%s): a second `biomask pipeline run` into %s would not be refused while "
                "this one runs. Keep to one run per run_dir",
                path,
                exc.strerror or exc,
                plan.run_dir,
            )
        if writable:
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            handle.flush()
        try:
            yield
        finally:
            if writable:
                handle.seek(0)
                handle.truncate()
            if locked:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _in_use(run_dir: Path, holder: str) -> InputError:
    return InputError(
        f"run_dir {run_dir} is in use by another `biomask pipeline run` ({holder}); wait for it to "
        "finish (biomask pipeline status shows it when it is done) or stop it first"
    )


def check_not_in_use(run_dir: Path) -> None:
    """Refuse early (before other checks, whose messages the running pipeline would explain) when a
    `pipeline run` holds `run_dir`; `run_lock` still decides, this only names the reason first."""
    holder = run_in_progress(run_dir)
    if holder is not None:
        raise _in_use(run_dir, holder)


def run_in_progress(run_dir: Path) -> str | None:
    """Who holds `run_lock` on `run_dir` (None: no `pipeline run` is running there)."""
    path = run_dir / LOCK_NAME
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return handle.read().strip() or "another process"
        except OSError:  # no flock on this file system: no run can be told apart (run_lock warns)
            return None
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


def write_resolved(plan: Plan) -> Path:
    """Write the resolved pipeline to run_dir/pipeline.yaml (atomically)."""
    check_run_dir(plan)
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    path = plan.run_dir / "pipeline.yaml"
    atomic_write_text(path, resolved_text(plan))
    return path


def resolved_text(plan: Plan) -> str:
    """run_dir/pipeline.yaml's text (see write_resolved)."""
    header = f"{_RESOLVED_HEADER}{plan.source}: every default, reference and sweep task spelled out.\n"
    return header + yaml.safe_dump(plan.resolved(), sort_keys=False)


def check_upstream_outputs(plan: Plan, selected: Sequence[str]) -> None:
    """With --only / --from, stages left out must already have their outputs; say which do not."""
    missing = []
    for name in selected:
        for need in plan.stages[name].needs:
            if need in selected:
                continue
            tasks = plan.stages[need].tasks
            absent = [task.output for task in tasks if read_run_info(task.output) is None]
            if len(tasks) == 1 and absent:
                missing.append(f"{name} needs {need}, whose output {absent[0]} does not exist")
            elif absent:  # a sweep's outputs in one line, not one line per task (a study: dozens)
                shown = ", ".join(path.name for path in absent[:3]) + (", ..." if len(absent) > 3 else "")
                missing.append(
                    f"{name} needs {need}, whose outputs of {len(absent)} of its {len(tasks)} tasks do not "
                    f"exist ({plan.stages[need].directory}/: {shown})"
                )
    if missing:
        raise InputError(
            "cannot run the selected stages:\n  - "
            + "\n  - ".join(dict.fromkeys(missing))
            + "\nrun the pipeline without --only/--from first (or include those stages)"
        )


def check_input_files(plan: Plan, selected: Sequence[str]) -> None:
    """The selected prep stages' own input files (`inputs[].path`) must be there: a misspelt path
    used to be found only when its stage ran, after every stage before it (hours, on a long
    pipeline). Not for `submit`: a job may see file systems the submitting node does not."""
    missing = []
    for name in selected:
        stage = plan.stages[name]
        schema = stage.command.config_class()
        if schema is None:
            continue
        for task in stage.tasks:
            try:
                config = load_config(schema, stage.config, task.overrides)
            except ConfigError:
                continue  # a plan made without checking its stages: the stage reports it when it runs
            for i, spec in enumerate(getattr(config, "inputs", None) or []):
                path = getattr(spec, "path", None)
                if not isinstance(path, str):
                    continue
                full = plan.workdir / Path(path).expanduser()
                if glob.has_magic(path) and next(glob.iglob(str(full), recursive=True), None):
                    continue  # a pattern that matches: the stage reads every match
                if not full.exists() and not full.is_relative_to(plan.run_dir):  # run_dir: a stage's
                    missing.append((f"stage {name}: inputs[{i}].path: {path} does not exist", path))
    if missing:
        relative = any(not Path(path).expanduser().is_absolute() for _, path in missing)
        raise InputError(
            f"{plan.source}: input files not found (nothing has run):\n  - "
            + "\n  - ".join(dict.fromkeys(message for message, _ in missing))
            + (f"\nrelative paths are read from the working directory, {plan.workdir}" if relative else "")
        )


# each runner's record and the time it writes in it
_RUN_RECORDS = (("local-run.json", "finished"), ("jobs.json", "submitted"))


def _last_ran(folder: Path) -> float:
    """When a run folder's pipeline last ran: now, where a `pipeline run` runs there; else by its own
    records' times (the record file's mtime where one holds none; the resolved pipeline.yaml's, which
    every run writes first, for a run that never finished). Not by the newest file in the folder: a
    folder copied from a host whose clock ran ahead (`rsync -a`) was taken for the latest run, and one
    dangling link there (an output a scratch purge took) made `pipeline status` fail on a folder
    nobody asked about."""
    with contextlib.suppress(OSError):
        if run_in_progress(folder):
            return float("inf")
    times = []
    for name, key in _RUN_RECORDS:
        record = folder / name
        try:
            data = json.loads(record.read_text(encoding="utf-8"))
            times.append(_dt.datetime.strptime(str(data[key]), "%Y-%m-%dT%H:%M:%S%z").timestamp())
        except FileNotFoundError:
            continue
        except (OSError, ValueError, KeyError, TypeError):
            with contextlib.suppress(OSError):
                times.append(record.stat().st_mtime)
    if not times:
        with contextlib.suppress(OSError):
            times.append((folder / "pipeline.yaml").stat().st_mtime)
    return max(times, default=0.0)


def find_run_dir(target: str | os.PathLike | None) -> Path:
    """A run directory from a path to one, or to a pipeline file (its run_dir), or the latest under runs/."""
    if target is None:
        # runs/pipelines/<name> is the default run_dir; the shipped pipelines set runs/<name> (runs/main)
        candidates = list(
            dict.fromkeys(
                p.parent
                for name in ("jobs.json", "local-run.json", "pipeline.yaml")
                for pattern in (f"runs/pipelines/*/{name}", f"runs/*/{name}")
                for p in Path().glob(pattern)
            )
        )
        if not candidates:
            raise InputError(
                "no run directory found under runs/ or runs/pipelines/; name one (or the pipeline file)"
            )
        return max(candidates, key=_last_ran).resolve()
    path = Path(target)
    if path.is_dir():
        return path.resolve()
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        return load_plan(path, check_commands=False).run_dir
    if not path.exists():
        raise InputError(
            f"{path} does not exist; give a pipeline's run directory (its run_dir) or its pipeline file"
        )
    raise InputError(f"{path} is neither a run directory nor a pipeline file (.yaml)")
