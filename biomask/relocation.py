"""Recorded paths compared with new ones: run folders that can be moved, and paths spelled otherwise.

A stage's recorded config holds absolute paths (its output, the stores and checkpoints of the stages
before it), so a run folder moved (`mv runs/main /scratch/proj/main`, or the whole checkout) used to
count as a changed config everywhere. A pipeline tells its stages their run folder
(`BIOMASK_RUN_DIR`); an output's own recorded `output` then says where that folder was when it was
written. Paths of the new config inside the run folder are compared as the same relative path inside
the old one:

    recorded output  /work/runs/main/evaluate      run folder then  /work/runs/main
    output now       /scratch/proj/main/evaluate   run folder now   /scratch/proj/main
    new config       /scratch/proj/main/pretrain/model  compares as  /work/runs/main/pretrain/model

What a path holds is still checked as before: inputs enter a fingerprint by their checksums (a
store's manifest, a checkpoint's weights and config.json, an upstream output's fingerprint), so a
moved folder whose contents changed is not reused.

A stage run by hand has no run folder, and a path may be spelled many ways: `runs/prep/x`,
`./runs/prep/x`, `/home/me/proj/runs/prep/x`, the same from another working directory, or through a
symbolic link. A value of the new config that names the same file or folder as the recorded config's
value at that key is compared as the recorded spelling (`as_recorded`), so the rerun is reused; the
config.yaml keeps what each run's user wrote. The same relative spelling naming another file (run
from another folder) is compared as its absolute path: a changed key. The recorded config's relative
paths are resolved from where they were written: the working directory its `output` implies
(`runs/pretrain/y` now at /home/me/proj/runs/pretrain/y: /home/me/proj, which follows a project
folder moved as a whole), else the `cwd` its run.json records.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# Set by `biomask pipeline run` / `submit` for each stage: the run folder its output lies in.
RUN_DIR_ENV = "BIOMASK_RUN_DIR"


@dataclass(frozen=True)
class Relocation:
    """The run folder an output was written in (`old`) and the one it lies in now (`new`)."""

    old: str
    new: str

    def to_old(self, data: Any) -> Any:
        """`data` (a resolved config) with every path inside the new run folder written as the same
        path inside the old one: the config as it would have been recorded there."""
        if isinstance(data, dict):
            return {key: self.to_old(value) for key, value in data.items()}
        if isinstance(data, list):
            return [self.to_old(value) for value in data]
        if isinstance(data, str) and (data == self.new or data.startswith(self.new.rstrip("/") + "/")):
            return self.old + data[len(self.new) :]
        return data

    def to_new(self, value: str) -> str:
        """A path recorded in the old run folder, as it lies in the new one (others as they are)."""
        return Relocation(self.new, self.old).to_old(value)


def where_now(output: str | os.PathLike, recorded: str) -> str:
    """A path `output`'s config recorded, where it lies now that the run folder has moved: what a
    later stage reads of an output (an evaluation's checkpoints) is found in the moved folder. A
    relative recorded path is taken from the folder `output` was written from (`written_from`)
    where it exists there, not from the reader's working directory: an evaluation published beside
    its checkpoint (a workflow engine's publishDir, its work folder deleted) finds that checkpoint,
    not another `pretrain/model` in the reader's folder. Otherwise it is returned as recorded (a
    project moved, the reader in its new place); readers check what they take from it against the
    digests recorded (the report: a checkpoint's config.json)."""
    if not os.path.isabs(recorded):
        from biomask.provenance import read_run_info

        base = written_from(output, recorded_output(Path(output)), (read_run_info(output) or {}).get("cwd"))
        there = os.path.join(base, recorded) if base is not None else None
        return there if there is not None and os.path.exists(there) else recorded
    moved = of_output(output)
    if moved:
        return moved.to_new(recorded)
    if os.path.isabs(recorded) and not os.path.exists(recorded):
        # no run folder named (a stage run by hand, `biomask report` over a moved run): the folders
        # the output's recorded path and its place now share at their ends, the rest of each the
        # old and the new folder; used only where the recorded path is gone and its twin exists
        guess = _moved_with(output)
        if guess is not None and os.path.exists(candidate := guess.to_new(recorded)):
            return candidate
    return recorded


def _moved_with(output: str | os.PathLike) -> Relocation | None:
    """`find`, with the run folder now taken as what the output's path is, less the folders its
    recorded path ends with too."""
    recorded = recorded_output(Path(output))
    if not recorded or not os.path.isabs(recorded):
        return None
    now, then = Path(os.path.abspath(output)).parts, Path(os.path.normpath(recorded)).parts
    shared = 0
    while shared < min(len(now), len(then)) - 1 and now[-1 - shared] == then[-1 - shared]:
        shared += 1
    return find(output, recorded, Path(*now[: len(now) - shared])) if shared else None


def run_dir_from_env() -> Path | None:
    value = os.environ.get(RUN_DIR_ENV)
    return Path(os.path.abspath(value)) if value else None


def recorded_config(output: str | os.PathLike) -> dict[str, Any] | None:
    """The config.yaml `output` holds (None: none, or unreadable)."""
    from biomask.config import load_recorded_yaml  # the limits of a config file: nesting, anchors

    path = Path(output) / "config.yaml"
    try:
        recorded = load_recorded_yaml(path.read_text(encoding="utf-8"), str(path))
    except (OSError, yaml.YAMLError):
        return None
    return recorded if isinstance(recorded, dict) else None


def recorded_output(output: Path) -> str | None:
    """Where `output` was written, by the `output` of its recorded config.yaml (None: not recorded)."""
    value = (recorded_config(output) or {}).get("output")
    return value if isinstance(value, str) else None


def written_from(output: str | os.PathLike, recorded: str | None, cwd: str | None) -> Path | None:
    """The folder the relative paths of `output`'s recorded config were relative to, given the
    `output` it recorded and the working directory its run recorded (`cwd`; None: not recorded).
    A relative recorded output says it best: the output now lies at that path inside it, so a project
    folder moved as a whole (its relative paths with it) is followed. None: it cannot be told."""
    if recorded and not os.path.isabs(recorded):
        parts = Path(os.path.normpath(recorded)).parts
        now = Path(os.path.abspath(output)).parts
        if ".." not in parts and len(now) > len(parts) and now[-len(parts) :] == parts:
            return Path(*now[: -len(parts)])
    return Path(cwd) if cwd else None


def _same_place(new: str, old: str, base: Path | None) -> bool:
    """Whether `new` (relative to this working directory) and `old` (relative to `base`) name the same
    existing file or folder (a symbolic link and its target count as one)."""
    if not os.path.isabs(old):
        if base is None:
            return False
        old = os.path.join(base, old)
    try:
        return bool(new) and os.path.samefile(new, old)
    except (OSError, ValueError):  # one is not there (or not a path at all): not shown the same
        return False


def _elsewhere(value: str, base: Path | None) -> bool:
    """Whether a relative path, spelled the same in the new config as recorded, names another existing
    file here than it did from `base` (the same spelling run from another folder). Only values that
    look like paths (a `/` or a `.`): a word such as `raw` or `mean` is no file, whatever lies about."""
    if base is None or os.path.isabs(value) or not ("/" in value or "." in value):
        return False
    there = os.path.join(base, value)
    return os.path.exists(value) and os.path.exists(there) and not os.path.samefile(value, there)


def as_recorded(new: Any, recorded: Any, base: Path | None) -> Any:
    """`new` (a resolved config's data) with every value that names the same file or folder as the
    `recorded` config's value at that key written as recorded: a path spelled otherwise is the same
    input. `base`: where the recorded relative paths were relative to (`written_from`). A relative
    path spelled as recorded that names another file here is written absolute, so that a refusal
    names its key and says where it points. Values that differ otherwise stay as they are, and a
    refusal names their key."""
    if isinstance(new, dict) and isinstance(recorded, dict):
        return {key: as_recorded(value, recorded.get(key), base) for key, value in new.items()}
    if isinstance(new, list) and isinstance(recorded, list) and len(new) == len(recorded):
        return [as_recorded(a, b, base) for a, b in zip(new, recorded, strict=True)]
    if isinstance(new, str) and isinstance(recorded, str):
        if new == recorded:
            return os.path.abspath(new) if _elsewhere(new, base) else new
        return recorded if _same_place(new, recorded, base) else new
    return new


def find(output: str | os.PathLike, recorded: str | None, run_dir: Path | None) -> Relocation | None:
    """How the run folder moved since `output` was written, given the `output` path its config
    recorded and the run folder it now lies in; None when it did not move (or cannot be told: no run
    folder, an output outside it, or a recorded path that does not end as the output does inside it)."""
    if run_dir is None or not recorded or not os.path.isabs(recorded) or run_dir == Path(run_dir.anchor):
        return None
    now = Path(os.path.abspath(output))
    try:
        inside = now.relative_to(run_dir)
    except ValueError:
        return None
    then = Path(os.path.normpath(recorded))
    for part in reversed(inside.parts):
        if then.name != part:
            return None
        then = then.parent
    if then == run_dir or then == Path(then.anchor):
        # not moved; or the old run folder would be the file-system root, which holds every path
        return None
    return Relocation(str(then), str(run_dir))


def of_output(output: str | os.PathLike, run_dir: Path | None = None) -> Relocation | None:
    """`find` for an output folder as it is on disk (run folder: `run_dir`, else the pipeline's)."""
    run_dir = run_dir if run_dir is not None else run_dir_from_env()
    if run_dir is None:
        return None
    return find(output, recorded_output(Path(output)), run_dir)
