"""Pipeline runs on disk: the resolved pipeline file, the outputs a partial run needs, finding a run
directory (see plan.py for its layout; a pretraining run's own directory is biomask.training.rundir)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import yaml

from biomask.errors import InputError
from biomask.outputs import atomic_write_text
from biomask.pipelines.plan import Plan, load_plan
from biomask.provenance import read_run_info


def write_resolved(plan: Plan) -> Path:
    """Write the resolved pipeline to run_dir/pipeline.yaml (atomically)."""
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    path = plan.run_dir / "pipeline.yaml"
    header = f"# Resolved from {plan.source}: every default, reference and sweep task spelled out.\n"
    atomic_write_text(path, header + yaml.safe_dump(plan.resolved(), sort_keys=False))
    return path


def check_upstream_outputs(plan: Plan, selected: Sequence[str]) -> None:
    """With --only / --from, stages left out must already have their outputs; say which do not."""
    missing = []
    for name in selected:
        for need in plan.stages[name].needs:
            if need in selected:
                continue
            for task in plan.stages[need].tasks:
                if read_run_info(task.output) is None:
                    missing.append(f"{name} needs {need}, whose output {task.output} does not exist")
    if missing:
        raise InputError(
            "cannot run the selected stages:\n  - "
            + "\n  - ".join(dict.fromkeys(missing))
            + "\nrun the pipeline without --only/--from first (or include those stages)"
        )


def find_run_dir(target: str | os.PathLike | None) -> Path:
    """A run directory from a path to one, or to a pipeline file (its run_dir), or the latest under runs/."""
    if target is None:
        candidates = [
            p.parent
            for name in ("jobs.json", "local-run.json")
            for p in Path("runs/pipelines").glob(f"*/{name}")
        ]
        if not candidates:
            raise InputError("no run directory found under runs/pipelines; name one (or the pipeline file)")
        return max(candidates, key=lambda p: max(f.stat().st_mtime for f in p.iterdir())).resolve()
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
