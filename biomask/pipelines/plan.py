"""From a pipeline file to a checked plan: stages in dependency order, each expanded into its tasks with
resolved overrides and an output directory under the run directory.

Everything a user can get wrong is found here, before anything runs or is submitted: unknown keys, an
unknown or cyclic dependency, a missing stage config, an unknown command (or one this version of biomask
does not have yet), a stage config that does not match its schema, a bad `${...}` reference.

Layout of a run directory (`run_dir`, default runs/pipelines/<name>):

    pipeline.yaml              the resolved pipeline (every default, reference and task spelled out)
    <stage>/                   a stage's output (config.yaml + run.json inside, written by the stage)
    <stage>/<key=value,...>/   one output per task of a swept stage
    logs/  slurm/  jobs.json   logs, rendered sbatch scripts, submitted job ids (SLURM)
    local-run.json             the last local run's results
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from biomask.config import apply_overrides, flatten, load_config, parse_yaml, read_yaml, validate_config
from biomask.errors import ConfigError
from biomask.pipelines.commands import COMMANDS, StageCommand, is_available, lookup
from biomask.pipelines.schema import Pipeline, SlurmSpec, StageSpec
from biomask.resources import shipped_config

_REFERENCE = re.compile(r"\$\{([^}]*)\}")
# `$stages.NAME.output` without braces: no reference, so the stage would get the text as a path
_BARE_REFERENCE = re.compile(r"\$(stages\.[A-Za-z0-9_.-]*|run_dir)")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")


@dataclass
class Task:
    """One run of a stage's command: the stage itself, or one point of its sweep."""

    stage: str
    index: int  # the SLURM array index for swept stages
    point: dict[str, Any]  # sweep key -> value ({} when the stage is not swept)
    output: Path
    overrides: list[str]  # key=value, ready for the command line (output= last)

    @property
    def name(self) -> str:
        return f"{self.stage}/{self.output.name}" if self.point else self.stage


@dataclass
class PlannedStage:
    name: str
    spec: StageSpec
    command: StageCommand
    config: Path  # absolute
    needs: list[str]  # explicit and implied by references, in pipeline order
    slurm: SlurmSpec
    directory: Path  # the output (or, for a sweep, the parent of the task outputs)
    tasks: list[Task] = field(default_factory=list)

    @property
    def swept(self) -> bool:
        return bool(self.spec.sweep)


@dataclass
class Plan:
    pipeline: Pipeline
    source: Path
    run_dir: Path
    workdir: Path  # stages run here, so relative paths in their configs mean what they meant to the user
    stages: dict[str, PlannedStage]  # in dependency order

    def descendants(self, name: str) -> list[str]:
        """`name` and every stage that depends on it, directly or not, in dependency order."""
        found = {name}
        for stage in self.stages.values():
            if found.intersection(stage.needs):
                found.add(stage.name)
        return [s for s in self.stages if s in found]

    def select(self, only: Sequence[str] = (), start: str | None = None) -> list[str]:
        """The stages `--only` / `--from` pick (all by default), in dependency order."""
        for name in [*only, *([start] if start else [])]:
            if name not in self.stages:
                raise ConfigError(
                    f"{self.source}: no stage named {name!r} (stages: {', '.join(self.stages)})"
                )
        if only:
            return [s for s in self.stages if s in only]
        if start:
            return self.descendants(start)
        return list(self.stages)

    def resolved(self) -> dict[str, Any]:
        """The plan as plain data, written to `run_dir/pipeline.yaml` for reproducibility."""
        return {
            "name": self.pipeline.name,
            "description": self.pipeline.description,
            "source": str(self.source),
            "run_dir": str(self.run_dir),
            "workdir": str(self.workdir),
            "env": self.pipeline.env,
            "setup": self.pipeline.setup,
            "stages": {
                s.name: {
                    "command": s.command.name,
                    "config": str(s.config),
                    "needs": s.needs,
                    "training": s.command.training,
                    "slurm": s.slurm.model_dump(mode="json"),
                    "tasks": [
                        {
                            "index": t.index,
                            "point": t.point,
                            "output": str(t.output),
                            "overrides": t.overrides,
                        }
                        for t in s.tasks
                    ],
                }
                for s in self.stages.values()
            },
        }


# ----------------------------------------------------------------------------------------- loading


def load_plan(
    path: str | os.PathLike,
    overrides: Sequence[str] = (),
    *,
    check_commands: bool = True,
    workdir: Path | None = None,
) -> Plan:
    """Read, validate and expand a pipeline file; raise `ConfigError` listing every problem found.

    `overrides` are `key.sub=value` items applied to the pipeline file (e.g. `run_dir=/scratch/x`).
    `check_commands=False` skips the checks that need the stage commands and their configs to exist
    (used to render the sbatch templates of stages that have not landed yet). Relative paths are taken
    from `workdir` (default: the working directory).
    """
    data = read_yaml(path)
    if isinstance(data, dict) and data and "stages" not in data:  # a stage's config given as a pipeline
        from biomask.stages import stage_whose_keys

        name = stage_whose_keys(set(data))
        if name:
            raise ConfigError(
                f"{path} is a `biomask {name}` config, not a pipeline file (which lists `stages`): "
                f"run `biomask {name} -c {path}`, or start a pipeline from configs/pipelines/"
            )
    _check_override_stages(data, overrides, path)
    overrides, swept = _apply_sweep_keys(data, overrides)
    touched = apply_overrides(data, overrides) | swept
    # the file read_yaml read: outside a checkout `configs/...` is the copy shipped in the wheel, and
    # the records (local-run.json's sha256, pipeline.yaml, the sbatch scripts) must name that one
    source = Path(path) if Path(path).exists() else shipped_config(path) or Path(path)
    return build_plan(data, str(path), source.resolve(), check_commands, workdir or Path.cwd(), touched)


def _apply_sweep_keys(
    data: dict[str, Any], overrides: Sequence[str]
) -> tuple[list[str], set[tuple[str, ...]]]:
    """`stages.S.sweep.train.seed=[0,1]` sets the sweep's key `train.seed`, and
    `stages.S.overrides.tokenizer.path=X` the stage override `tokenizer.path`, replacing the file's
    whether it writes the key dotted or nested: their keys are config keys with dots of their own,
    which the generic override would take for a section `train` holding `seed` (and a nested key
    beside the file's dotted one is the same key twice). Returns the other overrides and the paths
    these set."""
    rest, touched = [], set()
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.split(".")
        stages = data.get("stages") if isinstance(data, dict) else None
        keyed = len(parts) > 4 and parts[0] == "stages" and parts[2] in ("sweep", "overrides")
        stage = stages.get(parts[1]) if keyed and isinstance(stages, dict) else None
        if sep and isinstance(stage, dict):
            section = stage.get(parts[2])
            if section is None:
                section = stage[parts[2]] = {}
            if isinstance(section, dict):
                name = ".".join(parts[3:])
                value = parse_yaml(raw, f"command-line override {item!r}") if raw != "" else ""
                if parts[2] == "overrides":  # the file's entry for this key goes, however written
                    try:
                        flat = flatten(section, keep_empty=True)
                    except ConfigError as exc:
                        raise ConfigError(f"stage {parts[1]}: overrides: {exc}") from None
                    section = stage["overrides"] = {
                        k: v for k, v in flat.items() if k != name and not k.startswith(f"{name}.")
                    }
                section[name] = value
                touched.add(("stages", parts[1], parts[2], name))
                continue
        rest.append(item)
    return rest, touched


def _check_override_stages(data: dict[str, Any], overrides: Sequence[str], path: str | os.PathLike) -> None:
    """A key inside a stage the file does not have (a misspelt stage name) would add that stage, and
    the message would be about its missing command and config, in a file that has no such stage."""
    stages = data.get("stages") if isinstance(data, dict) else None
    if not isinstance(stages, dict):
        return  # the schema says what is wrong with the file itself
    for item in overrides:
        parts = item.partition("=")[0].split(".")
        if len(parts) > 2 and parts[0] == "stages" and parts[1] not in stages:
            raise ConfigError(
                f"command-line override {item!r}: {path} has no stage {parts[1]!r} (stages: "
                f"{', '.join(stages)}); a new stage is given whole: "
                f"'stages.{parts[1]}={{command: ..., config: ...}}'"
            )


def build_plan(
    data: dict[str, Any],
    origin: str,
    source: Path,
    check_commands: bool = True,
    workdir: Path | None = None,
    touched: set[tuple[str, ...]] | None = None,
) -> Plan:
    """`load_plan` for a pipeline given as data (`origin` names it in messages)."""
    pipeline = validate_config(Pipeline, data, origin, touched)
    workdir = (workdir or Path.cwd()).resolve()
    run_dir = (workdir / (pipeline.run_dir or f"runs/pipelines/{pipeline.name}")).resolve()

    errors: list[str] = []
    stages: dict[str, PlannedStage] = {}
    for name, spec in pipeline.stages.items():
        try:
            stages[name] = _plan_stage(name, spec, pipeline, run_dir, workdir, check_commands, source.parent)
        except ConfigError as exc:
            errors.append(f"stage {name}: {exc}")
    if not errors:
        errors += _check_needs(stages)
    if not errors:
        errors += _check_graph(stages)
    if errors:
        raise ConfigError(f"pipeline {origin} is not valid:\n  - " + "\n  - ".join(errors))

    plan = Plan(pipeline, source, run_dir, workdir, {n: stages[n] for n in _topological(stages)})
    errors = []
    failed: set[str] = set()
    for stage in plan.stages.values():
        # a stage reading one that failed would report that failure's consequences (a sweep key
        # misspelt upstream makes every reference to it "ambiguous"): one mistake, one message; its
        # own are found once the stage it reads is valid
        if any(need in failed for need in stage.needs):
            failed.add(stage.name)
            continue
        found = _expand_tasks(plan, stage, check_commands)
        if found:
            failed.add(stage.name)
            errors += found
    if errors:
        raise ConfigError(f"pipeline {origin} is not valid:\n  - " + "\n  - ".join(errors))
    return plan


def _plan_stage(
    name: str,
    spec: StageSpec,
    pipeline: Pipeline,
    run_dir: Path,
    workdir: Path,
    check_commands: bool,
    folder: Path,  # the pipeline file's
) -> PlannedStage:
    command = lookup(spec.command)
    if command is None:
        raise ConfigError(f"unknown command {spec.command!r}; stage commands are: {', '.join(COMMANDS)}")
    if check_commands and not is_available(command):
        raise ConfigError(
            f"command {command.name!r} is not available in this version of biomask yet "
            f"(`biomask {command.name} --help` fails); remove the stage or update biomask"
        )
    config = (workdir / spec.config).resolve()
    if not config.is_file():  # `configs/...` outside a checkout: the copy shipped in the wheel
        config = shipped_config(spec.config) or config
    if check_commands and not config.is_file():
        beside = (folder / spec.config).resolve()
        hint = (
            f"; relative paths are read from the working directory, not from the pipeline file's folder, "
            f"where it is: config: {beside}"
            if beside.is_file()
            else ""
        )
        raise ConfigError(f"config file {spec.config} does not exist (looked for {config}){hint}")
    slurm = validate_config(
        SlurmSpec, pipeline.slurm.model_dump() | spec.slurm, f"{pipeline.name}: stages.{name}.slurm"
    )
    if not command.training and slurm.nodes * slurm.tasks > 1:
        raise ConfigError(
            f"slurm: only training stages run as several tasks; {command.name!r} runs one "
            f"(nodes: {slurm.nodes}, tasks_per_node: {slurm.tasks})"
        )
    if command.training and slurm.signal_margin >= slurm.time_seconds:
        raise ConfigError(
            f"slurm: signal_margin ({slurm.signal_margin} s"
            + (
                ""
                if "signal_margin" in spec.slurm or "signal_margin" in pipeline.slurm.model_fields_set
                else ", the default"
            )
            + f") must be shorter than the time limit ({slurm.time}), or the checkpoint signal arrives as soon "
            "as the job starts; set a smaller slurm.signal_margin (at least 60 s) or a longer time"
        )
    overrides = flatten(spec.overrides, keep_empty=True) if spec.overrides else {}
    if "output" in overrides:
        raise ConfigError("overrides: `output` is set by the pipeline (run_dir/<stage>); remove it")
    both = sorted(set(overrides) & set(spec.sweep))
    if both:
        raise ConfigError(f"keys {both} are both overridden and swept; keep one")
    needs = list(dict.fromkeys([*spec.needs, *_referenced_stages(overrides)]))
    return PlannedStage(name, spec, command, config, needs, slurm, run_dir / name)


def _referenced_stages(overrides: dict[str, Any]) -> list[str]:
    names = []
    for value in _strings(overrides):
        for ref in _REFERENCE.findall(value):
            parts = ref.strip().split(".")
            if len(parts) == 3 and parts[0] == "stages":
                names.append(parts[1])
    return names


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _check_needs(stages: dict[str, PlannedStage]) -> list[str]:
    errors = []
    for stage in stages.values():
        for need in stage.needs:
            if need == stage.name:
                errors.append(
                    f"stage {stage.name} needs itself{_where_referenced(stage, need)}: a stage cannot read "
                    "its own output; refer to the stage that writes what it reads"
                )
            elif need not in stages:
                errors.append(
                    f"stage {stage.name} needs {need!r}{_where_referenced(stage, need)}, which is not a "
                    f"stage of this pipeline (stages: {', '.join(stages)})"
                )
    return errors


def _where_referenced(stage: PlannedStage, need: str) -> str:
    """` (overrides.KEY: ${stages.NEED...})` where an override refers to `need`; '' for `needs:`."""
    for key, value in flatten(stage.spec.overrides, keep_empty=True).items() if stage.spec.overrides else ():
        for text in _strings(value):
            for ref in _REFERENCE.findall(text):
                parts = ref.strip().split(".")
                if len(parts) == 3 and parts[:2] == ["stages", need]:
                    return f" (overrides.{key}: ${{{ref.strip()}}})"
    return ""


def _check_graph(stages: dict[str, PlannedStage]) -> list[str]:
    """A dependency cycle, reported as the path around it (each stage needs the next)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        path.append(name)
        for need in stages[name].needs:
            if state.get(need) == 1:
                return [*path[path.index(need) :], need]
            if need not in state and (cycle := visit(need)):
                return cycle
        path.pop()
        state[name] = 2
        return None

    for name in stages:
        if name not in state and (cycle := visit(name)):
            return [f"dependency cycle: {' -> '.join(cycle)} (each stage needs the next)"]
    return []


def _topological(stages: dict[str, PlannedStage]) -> list[str]:
    """Dependency order; among stages ready together, the order of the file."""
    order: list[str] = []
    done: set[str] = set()
    while len(order) < len(stages):
        for name, stage in stages.items():
            if name not in done and done.issuperset(stage.needs):
                order.append(name)
                done.add(name)
                break
    return order


# ----------------------------------------------------------------------------------------- tasks


def _expand_tasks(plan: Plan, stage: PlannedStage, check_commands: bool) -> list[str]:
    """Fill `stage.tasks`: one per point of the sweep, with references resolved. Returns errors."""
    keys = list(stage.spec.sweep)
    points = [dict(zip(keys, values)) for values in itertools.product(*stage.spec.sweep.values())]
    outputs = [stage.directory / task_dirname(p) if p else stage.directory for p in points]
    # casefold: values differing only in case (kind=A, kind=a) share a folder on macOS and Windows
    if len({str(output).casefold() for output in outputs}) != len(outputs):
        return [
            f"stage {stage.name}: sweep values give clashing directory names (characters other than "
            "letters, digits and . _ + - become '_', and case is ignored); "
            "use distinct values"
        ]
    schema = stage.command.config_class() if check_commands else None
    errors: list[str] = []
    schema_failed = False
    for index, (point, output) in enumerate(zip(points, outputs)):
        try:
            values = {
                k: _resolve(v, plan, stage, point, f"overrides.{k}")
                for k, v in flatten(stage.spec.overrides, keep_empty=True).items()
            }
            items = [f"{k}={command_line_value(v)}" for k, v in {**values, **point}.items()]
            items.append(f"output={command_line_value(str(output))}")
        except ConfigError as exc:
            errors.append(f"stage {stage.name}: {exc}")
            continue
        stage.tasks.append(Task(stage.name, index, point, output, items))
        # once a point fails, the others would repeat its message; they stay tasks, so that stages
        # referring to them are not reported as naming tasks that do not exist
        if schema is not None and not schema_failed:
            try:
                where = f"by the pipeline (stage {stage.name}'s overrides, sweep or output)"
                load_config(schema, stage.config, items, where)
            except ConfigError as exc:
                label = f"stage {stage.name}" + (f" (sweep point {point})" if point else "")
                errors.append(f"{label}: {exc}")
                schema_failed = True
    return errors


def task_dirname(point: dict[str, Any]) -> str:
    """`{"split.seed": 1, "tokenizer.kind": "kmer"}` -> `split.seed=1,tokenizer.kind=kmer`."""
    return ",".join(f"{key}={_UNSAFE.sub('_', str(value))}" for key, value in point.items())


def _resolve(value: Any, plan: Plan, stage: PlannedStage, point: dict[str, Any], where: str) -> Any:
    """Replace `${run_dir}`, `${stages.NAME.output}` and `${stages.NAME.dir}` in strings."""
    if isinstance(value, list):
        return [_resolve(v, plan, stage, point, where) for v in value]
    if isinstance(value, dict):
        return {k: _resolve(v, plan, stage, point, f"{where}.{k}") for k, v in value.items()}
    if not isinstance(value, str):
        return value
    bare = _BARE_REFERENCE.search(value)
    if bare:
        raise ConfigError(
            f"{where}: {bare.group(0)} is no reference (the braces are missing); write ${{{bare.group(1)}}}"
        )

    def substitute(match: re.Match[str]) -> str:
        ref = match.group(1).strip()
        parts = ref.split(".")
        if ref == "run_dir":
            return str(plan.run_dir)
        if len(parts) != 3 or parts[0] != "stages" or parts[2] not in ("output", "dir"):
            raise ConfigError(
                f"{where}: unknown reference ${{{ref}}}; use ${{run_dir}}, ${{stages.NAME.output}} "
                "or ${stages.NAME.dir}"
            )
        upstream = plan.stages[parts[1]]
        if parts[2] == "dir" and upstream.swept:
            _check_task_named(upstream, value[match.end() :], where)
        if parts[2] == "dir" or not upstream.swept:
            return str(upstream.directory)
        return str(_matching_task(upstream, point, stage.name, where).output)

    return _REFERENCE.sub(substitute, value)


def _check_task_named(upstream: PlannedStage, rest: str, where: str) -> None:
    """`${stages.NAME.dir}/TASK/...` of a swept stage must name one of its tasks: a path no task
    writes (train.seed=3 of seeds 0-2) would fail only after every upstream task has run."""
    task = rest.lstrip("/").split("/", 1)[0]
    if not rest.startswith("/") or not task or "${" in task:
        return  # the stage's directory itself (a sweep's runs), or a name built from another reference
    dirs = [task_dirname(t.point) for t in upstream.tasks]
    if dirs and task not in dirs:
        raise ConfigError(
            f"{where}: ${{stages.{upstream.name}.dir}}/{task} is not a task of {upstream.name}; its tasks: "
            f"{', '.join(dirs[:8])}{', ...' if len(dirs) > 8 else ''}"
        )


def _matching_task(upstream: PlannedStage, point: dict[str, Any], stage: str, where: str) -> Task:
    """The task of a swept upstream stage with the same values for its sweep keys as this task."""
    missing = [k for k in upstream.spec.sweep if k not in point]
    if missing:
        dirs = [task_dirname(t.point) for t in upstream.tasks] or [
            ",".join(f"{k}=..." for k in upstream.spec.sweep)
        ]
        raise ConfigError(
            f"{where}: ${{stages.{upstream.name}.output}} is ambiguous: {upstream.name} is swept over "
            f"{list(upstream.spec.sweep)} and {stage} is not swept over {missing}. Name the task you mean: "
            f"${{stages.{upstream.name}.dir}}/{dirs[0]}/... (its tasks: {', '.join(dirs[:6])}"
            f"{', ...' if len(dirs) > 6 else ''}; an evaluate stage lists each checkpoint so, as "
            f"configs/pipelines/study-full.yaml does), or sweep {stage} over the same keys where they are "
            f"keys of its own config (each task then reads its counterpart)"
        )
    for task in upstream.tasks:
        if all(task.point[k] == point[k] for k in upstream.spec.sweep):
            return task
    wanted = {k: point[k] for k in upstream.spec.sweep}
    raise ConfigError(f"{where}: {upstream.name} has no task with {wanted}")


def command_line_value(value: Any) -> str:
    """A value as the `key=value` text that `apply_overrides` parses back to the same value."""
    if isinstance(value, str) and "\n" not in value:
        try:
            if parse_yaml(value, "override") == value:
                return value
        except ConfigError:  # "[draft] R2", "*bold*", "@home": text YAML would read otherwise, quoted below
            pass
    text = json.dumps(value)  # JSON is YAML: quoted strings, lists, numbers, true/false/null
    if parse_yaml(text, "override") != value:
        raise ConfigError(f"value {value!r} cannot be passed on the command line")
    return text
