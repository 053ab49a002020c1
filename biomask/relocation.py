"""Run folders that can be moved: an output written in one run folder and found in another.

A stage's recorded config holds absolute paths (its output, the stores and checkpoints of the stages
before it), so a run folder moved (`mv runs/main /scratch/proj/main`, or the whole checkout) used to
count as a changed config everywhere. A pipeline tells its stages their run folder
(`BIOMASK_RUN_DIR`); an output's own recorded `output` then says where that folder was when it was
written. Paths of the new config inside the run folder are compared as the same relative path inside
the old one:

    recorded output  /work/runs/main/evaluate      run folder then  /work/runs/main
    output now       /scratch/proj/main/evaluate   run folder now   /scratch/proj/main
    new config       /scratch/proj/main/pretrain/model  compares as  /work/runs/main/pretrain/model

Paths outside the run folder (a user's data files) are compared as written. What a path holds is
still checked as before: inputs enter a fingerprint by their checksums (a store's manifest, a
checkpoint's weights and config.json, an upstream output's fingerprint), so a moved folder whose
contents changed is not reused.
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
    later stage reads of an output (an evaluation's checkpoints) is found in the moved folder."""
    moved = of_output(output)
    return moved.to_new(recorded) if moved else recorded


def run_dir_from_env() -> Path | None:
    value = os.environ.get(RUN_DIR_ENV)
    return Path(os.path.abspath(value)) if value else None


def recorded_output(output: Path) -> str | None:
    """Where `output` was written, by the `output` of its recorded config.yaml (None: not recorded)."""
    try:
        recorded = yaml.safe_load((output / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    value = recorded.get("output") if isinstance(recorded, dict) else None
    return value if isinstance(value, str) else None


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
