"""`biomask pipeline run --dry-run`: what a run would do with each task, without running anything.

Each stage decides for itself, when it runs, whether its output is current: the same config and the
same inputs (files by sha256, upstream outputs by their fingerprint). A preview cannot know what a
stage that has not run yet will write, so it compares what it can — the task's resolved config with
the one recorded beside its output, ignoring the keys that change no result, then the inputs by the
stage's own reuse check in the pipeline's `env` (which hashes input files; an input this machine
cannot read, or a dataset not fetched or not intact, is left to the stage) — and says which it did:

    run          no output yet
    resume       an interrupted pretraining run of this config (from its last checkpoint)
    run again    the config changed (the keys are listed), its inputs changed, a stage it needs
                 runs first, or a training output of another number of processes (`pipeline run`
                 trains on one; a job on its stage's SLURM tasks)
    reuse        same config and inputs; an
                 output of a run folder that has moved since compares its paths inside that folder
                 as the same paths inside this one (biomask.relocation)
    refused      the output path holds something this stage will not replace (named)

`pipeline submit` shows the same before it submits anything: a job decides only when it runs, after
its wait in the queue, and a stage's own output of other settings is replaced there only with
--overwrite (`pipeline run` replaces it by itself), so submit refuses what its jobs would refuse.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from rich.table import Table

from biomask.config import config_diff, load_config, load_recorded_yaml
from biomask.errors import ConfigError, InputError
from biomask.pipelines.local import stage_argv
from biomask.pipelines.plan import Plan, PlannedStage, Task
from biomask.pipelines.runs import check_input_files, check_run_dir, check_upstream_outputs, run_in_progress
from biomask.pipelines.tables import show, styled
from biomask.provenance import read_run_info, written_by_biomask
from biomask.relocation import RUN_DIR_ENV, Relocation, as_recorded, of_output, written_from
from biomask.resources import restoring_env


@dataclass
class TaskPreview:
    task: str
    action: str  # run, resume, run again, reuse, refused
    why: str
    output: str
    argv: list[str]
    # its output holds this stage's results of a config that differs: replaced only with --overwrite
    stale: bool = False


def preview(plan: Plan, selected: Sequence[str], *, submitted: bool = False) -> list[TaskPreview]:
    """One entry per task of the selected stages, in the order `pipeline run` would start them
    (`submitted`: as `pipeline submit`'s jobs would find them, a training stage on its SLURM tasks)."""
    computing: set[str] = set()  # selected stages with a task that will write a new output
    previews = []
    for name in selected:
        stage = plan.stages[name]
        for task in stage.tasks:
            action, why, stale = _state(stage, task, plan.run_dir)
            if action in ("reuse", "resume") and stage.command.training:
                launched = stage.slurm.nodes * stage.slurm.tasks if submitted else 1
                shape = _other_launch(task.output, action, launched, locally=not submitted)
                if shape:
                    action, why, stale = "run again", shape, True
            upstream = [n for n in stage.needs if n in computing]
            if action == "reuse" and upstream:
                action, why = "run again", f"{upstream[0]} runs first: its new output is an input here"
            elif action == "reuse" and not _inputs_current(stage, task, plan.run_dir, plan.pipeline.env):
                # the job's own check would refuse it without --overwrite, after its wait in the queue
                action, why, stale = "run again", INPUTS_CHANGED, True
            if action in ("run", "resume", "run again"):
                computing.add(name)
            argv = stage_argv(stage, task)
            previews.append(TaskPreview(task.name, action, why, str(task.output), argv, stale))
    return previews


def uncached_datasets(plan: Plan, selected: Sequence[str]) -> tuple[list[str], Path]:
    """Registry datasets the selected tasks read (`inputs[].dataset`, embed's `input` by name) that are
    not in the cache the jobs will read (the pipeline's `env` BIOMASK_DATA_DIR, else this shell's): a
    job would fetch them, on a compute node often without network. Returns them and that cache."""
    from biomask import datasets

    cache = datasets.data_dir(plan.pipeline.env.get("BIOMASK_DATA_DIR"))
    names: dict[str, None] = {}
    for name in selected:
        stage = plan.stages[name]
        for task in stage.tasks:
            try:
                cfg = load_config(stage.command.config_class(), stage.config, task.overrides)
            except (ConfigError, InputError, OSError):
                continue  # the stage says what is wrong when it runs
            wanted = [getattr(item, "dataset", None) for item in getattr(cfg, "inputs", None) or []]
            wanted.append(getattr(cfg, "input", None))  # embed: a path or a registry name
            for dataset in wanted:
                if isinstance(dataset, str) and not Path(dataset).exists():
                    names[dataset] = None
    missing = []
    for dataset in names:
        try:
            if datasets.get(dataset).source.type != "local" and not datasets.is_cached(dataset, cache):
                missing.append(dataset)
        except InputError:
            continue  # not in the registry: a path, or a name the stage refuses itself
    return missing, cache


def _state(stage: PlannedStage, task: Task, run_dir: Path) -> tuple[str, str, bool]:
    """(action, why, whether the output holds results of a config that differs)."""
    from biomask.training.rundir import IN_PROGRESS  # here: that module brings torch with it

    out = task.output
    if not out.exists():
        return "run", "no output yet", False
    if not out.is_dir():
        return "refused", f"{out} is a file, not an output of biomask's", False
    info = read_run_info(out)
    own = stage.command.name.replace(" ", "-")
    if written_by_biomask(info):
        assert info is not None
        if info["stage"] != own:
            return "refused", f"{out} holds the output of another stage ({info['stage']})", False
    elif (out / IN_PROGRESS).is_file():
        moved = of_output(out, run_dir)
        changed = _changed(stage, task, moved)
        if changed is None or changed:
            return "run again", _changes_text(changed) + " (the interrupted run is discarded)", bool(changed)
        return (
            "resume",
            "an interrupted run of this config: resumes from its last checkpoint" + _moved_text(moved),
            False,
        )
    elif any(out.iterdir()):
        return "refused", f"{out} is not empty and was not written by biomask", False
    else:
        return "run", "empty output folder", False
    moved = of_output(out, run_dir)
    changed = _changed(stage, task, moved)
    if changed is None or changed:
        return "run again", _changes_text(changed), bool(changed)
    return "reuse", "same config" + _moved_text(moved), False


def _other_launch(out: Path, action: str, launched: int, *, locally: bool) -> str:
    """Why a training output of this config is not this launch's: another number of processes, so
    another global batch (the stage refuses to reuse or resume it, and `pipeline run` trains it
    again); '' where it is. The preview said "reuse" or "resume", and the run then replaced a
    cluster's model with one trained on this machine."""
    import json

    from biomask.training.rundir import IN_PROGRESS  # here: that module brings torch with it

    try:
        if action == "resume":
            recorded = json.loads((out / IN_PROGRESS).read_text(encoding="utf-8")).get("world_size")
        else:
            recorded = (read_run_info(out) or {}).get("world_size")
    except (OSError, ValueError, AttributeError):
        return ""
    if not isinstance(recorded, int) or recorded == launched:
        return ""
    what = "an interrupted run started" if action == "resume" else "a run finished"
    return (
        f"{what} with {recorded} process{'es' * (recorded != 1)}; this launch has {launched}"
        + (" (`pipeline run` trains on one)" if locally else "")
        + ", so its global batch differs: trained again from the start"
    )


INPUTS_CHANGED = (
    "the same config, but its output is not what this config makes of its inputs now (an input file or "
    "store changed since, another store named, or a file of the output edited)"
)


def _inputs_current(stage: PlannedStage, task: Task, run_dir: Path, env: dict[str, str]) -> bool:
    """Whether a task whose config is unchanged still has the inputs its output was written from, by
    the stage's own reuse check (input files and upstream outputs by checksum), in the environment the
    pipeline gives its stages (its `env`: a registry or data cache of its own). True where that cannot
    be told here: no check registered, an input this node cannot read (a job may see file systems the
    submitting node does not), a dataset not fetched or not intact (a dry run downloads nothing and
    sets nothing aside)."""
    from biomask.stages import load_ref

    with _quiet(), _as_in_the_run(run_dir, env):
        try:
            cfg = load_config(stage.command.config_class(), stage.config, task.overrides)
        except (ConfigError, InputError, OSError, TypeError):
            return True  # the stage says what is wrong when it runs
        if not _inputs_readable_here(cfg):
            return True
        if stage.command.reused:
            return load_ref(stage.command.reused)(cfg) is not None
        if stage.command.name == "pretrain":
            return _pretrain_inputs_current(cfg, task.output)
    return True


def _inputs_readable_here(cfg: object) -> bool:
    """Every input file the config names is here, and every registry dataset it reads is fetched and
    intact (its sha256 as registered): the reuse check then reads them as the stage would, and its
    "not current" means changed — never an input it could not check, or a fetch."""
    from biomask import datasets
    from biomask.inputs import pattern_matches
    from biomask.provenance import sha256_file

    items = list(getattr(cfg, "inputs", None) or [])
    named = [getattr(item, "dataset", None) for item in items]
    paths = [getattr(item, "path", None) for item in items]
    embed_input = getattr(cfg, "input", None)  # embed: a path or a registry name
    if isinstance(embed_input, str):
        (paths if Path(embed_input).expanduser().exists() else named).append(embed_input)
    for text in paths:
        if isinstance(text, str):
            matches = pattern_matches(text)
            if not (matches if matches is not None else Path(text).expanduser().exists()):
                return False
    for name in named:
        if not isinstance(name, str):
            continue
        try:
            entry, path = datasets.get(name), datasets.cached_path(name)
            if not path.is_file() or (entry.source.type != "local" and sha256_file(path) != entry.sha256):
                return False
        except (InputError, OSError):
            return False
    return True


def _pretrain_inputs_current(cfg, out: Path) -> bool:
    """The store (its manifest's sha256) and the user's DeepSpeed JSON, as recorded in run.json. A run
    continuing a checkpoint: the trainer decides (its identity is the checkpoint's)."""
    from biomask.stage import input_identity
    from biomask.training.rundir import run_inputs

    store = Path(cfg.data.store)
    recorded = (read_run_info(out) or {}).get("inputs")
    if cfg.model.init_from or not (store / "manifest.json").is_file() or not isinstance(recorded, list):
        return True
    try:
        now = run_inputs(cfg, store)
        return sorted(input_identity(i) for i in now) == sorted(
            input_identity(i) for i in recorded if isinstance(i, dict)
        )
    except (OSError, KeyError, TypeError, ValueError):
        return True


@contextlib.contextmanager
def _as_in_the_run(run_dir: Path, env: dict[str, str]) -> Iterator[None]:
    """The environment the pipeline gives its stages: its `env`, and the run folder named (a run folder
    moved since compares the paths inside it as the same, biomask.relocation, as the stage will)."""
    wanted = {**{str(k): str(v) for k, v in env.items()}, RUN_DIR_ENV: str(run_dir)}
    with restoring_env(*wanted):
        os.environ.update(wanted)
        yield


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """A stage's reuse check says "up to date; reusing it" in the log: not the preview's to say."""
    logger = logging.getLogger("biomask")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _moved_text(moved: Relocation | None) -> str:
    return f" (written in {moved.old}, moved here since)" if moved else ""


def _changed(stage: PlannedStage, task: Task, moved: Relocation | None = None) -> list[str] | None:
    """The result-changing config keys that differ from the recorded config; None: cannot be told."""
    schema = stage.command.config_class()
    recorded = task.output / "config.yaml"
    if schema is None or not recorded.is_file():
        return None
    try:
        old = load_recorded_yaml(recorded.read_text(encoding="utf-8"), str(recorded)) or {}
        new = load_config(schema, stage.config, task.overrides).model_dump(mode="json")
    except (OSError, yaml.YAMLError, ConfigError):
        return None
    if not isinstance(old, dict):
        return None
    # paths inside the run folder, where it was when the output was written; a path spelled otherwise
    # that names the same file, as recorded (as the stage itself compares them)
    new = moved.to_old(new) if moved else new
    cwd = (read_run_info(task.output) or {}).get("cwd")
    written = old.get("output")
    base = written_from(
        task.output, written if isinstance(written, str) else None, cwd if isinstance(cwd, str) else None
    )
    return config_diff(old, as_recorded(new, old, base), ignore=stage.command.non_semantic_keys())


def _changes_text(changed: list[str] | None) -> str:
    if changed is None:
        return "its recorded config cannot be compared with this one"
    shown = "; ".join(changed[:3]) + (f"; and {len(changed) - 3} more" if len(changed) > 3 else "")
    return f"config changed: {shown}"


def print_preview(
    plan: Plan, *, only: Sequence[str] = (), start: str | None = None, verbose: bool = False
) -> int:
    """Print what `pipeline run` would do with each selected task; 2 if a task would be refused."""
    selected = plan.select(only, start)
    check_run_dir(plan)  # what a run would refuse first, refused here too (exit 2)
    check_upstream_outputs(plan, selected)
    check_input_files(plan, selected)
    previews = preview(plan, selected)
    table = Table(title=f"dry run: pipeline {plan.pipeline.name} ({plan.run_dir})")
    for column in ("stage", "would", "why"):
        table.add_column(column, overflow="fold")
    for p in previews:
        table.add_row(p.task, styled(p.action), p.why)
    show(table)
    counts = Counter(p.action for p in previews)
    print(", ".join(f"{n} {action}" for action, n in counts.items()) + " -- nothing was run")
    if counts.get("reuse"):
        print("reuse: the same config and inputs (input files and stores by checksum)")
    holder = run_in_progress(plan.run_dir)
    if holder is not None:
        print(
            f"a `biomask pipeline run` is in progress in {plan.run_dir} ({holder}): a run now would be refused"
        )
    commands = [p for p in previews if p.action != "reuse"]
    if commands and verbose:
        print(f"commands (run from {plan.workdir}):")
        for p in commands:
            print("  " + shlex.join(p.argv))
    elif commands:
        print("-v lists the commands")
    return 2 if counts.get("refused") else 0


def print_submit_preview(plan: Plan, selected: Sequence[str], *, overwrite: bool) -> None:
    """Say what each selected task's job will do; refuse (exit 2, nothing submitted) when a job would
    refuse its output: one of other settings without --overwrite, or one this stage never replaces."""
    previews = preview(plan, selected, submitted=True)
    table = Table(title=f"submit: pipeline {plan.pipeline.name} ({plan.run_dir})")
    for column in ("stage", "its job will", "why"):
        table.add_column(column, overflow="fold")
    for p in previews:
        why = p.why + (" (replaced: --overwrite)" if p.stale and overwrite else "")
        table.add_row(p.task, styled(p.action), why)
    show(table)
    counts = Counter(p.action for p in previews)
    print(", ".join(f"{n} {action}" for action, n in counts.items()))
    if counts.get("reuse"):
        print("reuse: the same config and inputs; a job still checks both when it runs")
    missing, cache = uncached_datasets(plan, selected)
    if missing:
        print(
            f"not in the dataset cache the jobs read ({cache}): {', '.join(missing)}; the jobs would fetch "
            f"{'them' if len(missing) > 1 else 'it'} on the compute nodes, which often have no network. "
            f"Fetch here first: biomask datasets fetch {' '.join(missing)} --data-dir {cache}"
        )
    refused = [p for p in previews if p.action == "refused" or (p.stale and not overwrite)]
    if refused:
        lines = [f"{p.task}: {p.why}" for p in refused]
        stale = any(p.stale for p in refused)
        raise InputError(
            f"{plan.source}: nothing was submitted: the jobs of these tasks would refuse their outputs and "
            "fail (and cancel the stages after them):\n  - "
            + "\n  - ".join(lines[:8])
            + (f"\n  - and {len(lines) - 8} more" if len(lines) > 8 else "")
            + (
                "\npass --overwrite to have the jobs replace outputs written with other settings, "
                "or set run_dir to another folder"
                if stale
                else "\nmove those outputs away, or set run_dir to another folder"
            )
        )
