"""The schema of pipeline files (`configs/pipelines/*.yaml`): stages, their configs, dependencies,
sweeps and SLURM resources. See configs/pipelines/dna-prep.yaml for an annotated example.

    name: dna-prep
    slurm: {time: "00:30:00", mem: 4G}         # defaults for every stage's job
    stages:
      prep_genome:
        command: prep dna
        config: configs/dna/ce2-chrX.yaml
        overrides: {windows.max_bases: 3000000}
      prep_splice:
        command: prep dna
        config: configs/dna/splice.yaml
        overrides: {tokenizer.path: "${stages.prep_genome.output}"}   # implies needs: [prep_genome]
        sweep: {split.seed: [0, 1, 2]}                                # three tasks, a SLURM job array
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from biomask.config import Config

# Stage names become file names, SLURM job names and `${stages.NAME...}` references. At most 100
# characters: the longest file named after one (`.NAME.sbatch.tmp-XXXXXXXX`) must fit in a file
# name's 255 bytes, or a long name failed only when its job script was written.
NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_-]{0,99}$"
# run_dir/<stage> is a stage's output, beside the runner's own folders (a stage named so would write
# into them, and fail only once it ran).
RESERVED_NAMES = ("logs", "slurm")
# SLURM's time formats: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")
_MEMORY = re.compile(r"^\d+[KMGT]?$")


# sbatch options the job scripts write from their own keys (or need as written): not in `extra`
_MANAGED = {
    "time": "slurm.time",
    "partition": "slurm.partition",
    "account": "slurm.account",
    "qos": "slurm.qos",
    "mem": "slurm.mem",
    "nodes": "slurm.nodes",
    "ntasks-per-node": "slurm.tasks_per_node",
    "cpus-per-task": "slurm.cpus_per_task",
    "gpus-per-node": "slurm.gpus_per_node",
    "array": "the stage's sweep (slurm.array_parallelism)",
    "signal": "slurm.signal_margin",
    "output": "nothing: logs go to run_dir/logs, where status and the runner find them",
    "error": "nothing: logs go to run_dir/logs, where status and the runner find them",
    "job-name": "nothing: jobs are named after the pipeline and stage, as status finds them",
    "dependency": "the stage's needs",
    "requeue": "nothing: training stages requeue themselves",
    "open-mode": "nothing: training logs append across requeues",
}


class SlurmSpec(Config):
    """Resources of one stage's job. Pipeline-level `slurm:` gives defaults; a stage's `slurm:` overrides
    them key by key."""

    nodes: int = Field(1, ge=1)
    # Training stages run one srun task per GPU (per CPU slot on CPU-only nodes); other stages run one task.
    tasks_per_node: int | None = Field(None, ge=1)  # default: gpus_per_node, or 1
    gpus_per_node: int = Field(0, ge=0)
    cpus_per_task: int = Field(1, ge=1)
    mem: str | None = "4G"  # per node, SLURM units (K/M/G/T); null: the partition's default
    time: str = "01:00:00"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    array_parallelism: int | None = Field(
        None, ge=1
    )  # sweeps: at most this many tasks at once (--array=...%N)
    signal_margin: int = Field(
        300, ge=60
    )  # training: seconds before the limit when USR1 asks for a checkpoint
    extra: list[str] = []  # further sbatch options, one per item, e.g. "--constraint=a100"

    @field_validator("time", mode="before")
    @classmethod
    def _quoted_time(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            # YAML 1.1 reads an unquoted 01:00:00 as the number 3600.
            raise ValueError(
                f'put the time limit in quotes, e.g. "01:00:00" (YAML read it as the number {value})'
            )
        return value

    @field_validator("time")
    @classmethod
    def _slurm_time(cls, value: str) -> str:
        if not _TIME.match(value):
            raise ValueError("use a SLURM time limit: MM, HH:MM:SS or D-HH:MM:SS")
        return value

    @field_validator("mem")
    @classmethod
    def _slurm_memory(cls, value: str | None) -> str | None:
        if value is not None and not _MEMORY.match(value):
            raise ValueError("use a SLURM memory size such as 4000M or 16G")
        return value

    @field_validator("partition", "account", "qos")
    @classmethod
    def _one_word(cls, value: str | None) -> str | None:
        # written as `#SBATCH --partition=VALUE`: a newline there began a shell line of the job
        # script (run as the job), and an `#SBATCH` line of its own bypassed the checks `extra` has
        if value is not None and (not value.strip() or any(c.isspace() for c in value)):
            raise ValueError(f"{value!r}: one word, as sbatch takes it (no spaces or line breaks)")
        return value

    @field_validator("extra")
    @classmethod
    def _options(cls, value: list[str]) -> list[str]:
        for option in value:
            if not option.startswith("--") or "\n" in option:
                raise ValueError(f"{option!r}: give one long sbatch option per item, e.g. --constraint=a100")
            name = option[2:].partition("=")[0]
            if name in _MANAGED:
                # a later #SBATCH line wins: given here it would bypass what the key checks (a time
                # limit shorter than signal_margin requeues a training job at every start)
                raise ValueError(f"{option!r}: set {_MANAGED[name]} instead (biomask writes --{name} itself)")
        return value

    @property
    def time_seconds(self) -> int:
        return slurm_seconds(self.time)

    @property
    def tasks(self) -> int:
        """srun tasks per node: as many as GPUs when GPUs are requested."""
        return self.tasks_per_node or self.gpus_per_node or 1


def slurm_seconds(time: str) -> int:
    """A SLURM time limit in seconds ("MM", "MM:SS", "HH:MM:SS", "D-HH", "D-HH:MM", "D-HH:MM:SS");
    ValueError for anything else (UNLIMITED)."""
    if not _TIME.match(time):
        raise ValueError(f"not a SLURM time limit: {time!r}")
    days, _, clock = time.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if days:
        hours, minutes, seconds = [*parts, 0, 0][:3]
    else:
        hours, minutes, seconds = {1: [0, parts[0], 0], 2: [0, *parts], 3: parts}[len(parts)]
    return ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds


class LocalSpec(Config):
    """How `biomask pipeline run` (and `biomask main`) uses this machine."""

    # Tasks run at once: 1 (one after another), N, or "auto" (one per CPU core this process may
    # use). A task starts when every stage it needs has finished, so a sweep's runs (and stages that
    # do not depend on each other) share the machine; each gets cores / jobs threads
    # (OMP_NUM_THREADS, unless the environment or `env` sets it). Small CPU runs spend much of their
    # time single-threaded (start-up, data, the optimizer), so two at once on two cores finish in
    # about 0.6 of the time of one after the other.
    jobs: int | Literal["auto"] = Field(default=1)

    @field_validator("jobs")
    @classmethod
    def _positive(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("jobs must be at least 1 (or 'auto')")
        return value


class StageSpec(Config):
    """One stage: a biomask command run on a config file with overrides, after the stages it needs."""

    command: str  # a stage command: prep dna, prep cells, pretrain, evaluate, embed, report
    config: str  # the stage's YAML config (relative paths: from the working directory)
    # Config keys to set (`key.sub: value`, or nested mappings). Strings may refer to other stages:
    # ${stages.NAME.output} (its output directory), ${stages.NAME.dir} (a sweep's parent directory)
    # and ${run_dir}. `output` is set by the pipeline and cannot be overridden.
    overrides: dict[str, Any] = {}
    needs: list[str] = []  # stages that must finish first (references add theirs automatically)
    # Config keys to sweep: every combination becomes one task (one element of a SLURM job array).
    sweep: dict[str, list[Any]] = {}
    slurm: dict[str, Any] = {}  # per-stage resources; validated as SlurmSpec over the pipeline's defaults

    @field_validator("sweep")
    @classmethod
    def _non_empty(cls, value: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in value.items():
            if not values:
                raise ValueError(f"sweep key {key!r} has no values")
            if len({repr(v) for v in values}) != len(values):
                raise ValueError(f"sweep key {key!r} repeats a value")
        return value


class Pipeline(Config):
    """A pipeline file."""

    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    # Where stage outputs, logs, rendered scripts and the resolved pipeline go.
    # Default: runs/pipelines/<name> (relative paths: from the working directory).
    run_dir: str | None = None
    env: dict[str, str] = {}  # environment variables for every stage (local runs and SLURM jobs)
    setup: list[str] = []  # shell lines run at the start of every SLURM job (module load, source venv)
    slurm: SlurmSpec = SlurmSpec()  # defaults for every stage's job
    local: LocalSpec = LocalSpec()  # the local runner: how many tasks run at once
    stages: dict[str, StageSpec] = Field(min_length=1)

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        # `export NAME=value` in every job script: a name that is not one (`X;touch f;Y`) ran as
        # shell, and a local run's Popen failed with a traceback on `A=B`
        bad = [name for name in value if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name)]
        if bad:
            raise ValueError(
                f"{', '.join(map(repr, bad))}: an environment variable's name is letters, digits and "
                "'_', not starting with a digit"
            )
        return value

    @field_validator("run_dir")
    @classmethod
    def _one_line(cls, value: str | None) -> str | None:
        # written into the job scripts' comments and `#SBATCH --output`: a line break there began a
        # shell line of the job script
        if value is not None and ("\n" in value or "\r" in value):
            raise ValueError(f"{value!r}: a path on one line")
        if value is not None and re.search(r"\$(\w|\{)", value):
            # `run_dir: $SCRATCH/x`, as HPC paths are written: nothing expands it in a YAML file, and it
            # made a folder named `$SCRATCH` in the working directory
            raise ValueError(
                f"{value!r} holds a shell variable, which biomask does not expand: write the path out, or "
                "give it on the command line (run_dir=$SCRATCH/x), where the shell expands it"
            )
        return value

    @field_validator("env", mode="before")
    @classmethod
    def _env_text(cls, value: Any) -> Any:
        # YAML reads `OMP_NUM_THREADS: 4` as a number; a variable's value is its text
        if isinstance(value, dict):
            return {
                k: str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
                for k, v in value.items()
            }
        return value

    @model_validator(mode="after")
    def _stage_names(self) -> Pipeline:
        bad = [name for name in self.stages if not re.match(NAME_PATTERN, name)]
        if bad:
            raise ValueError(
                f"stage names {bad} must start with a letter, hold only letters, digits, '_' and '-', and be "
                "at most 100 characters long"
            )
        return self

    @field_validator("stages")
    @classmethod
    def _not_reserved(cls, stages: dict[str, StageSpec]) -> dict[str, StageSpec]:
        # casefold: on a case-insensitive file system (macOS, Windows) `Logs/` is `logs/`
        taken = [name for name in stages if name.casefold() in RESERVED_NAMES]
        if taken:
            raise ValueError(
                f"stage names {taken} are folders of the run directory that the runner writes itself "
                f"({', '.join(f'{n}/' for n in RESERVED_NAMES)}), and a stage's output is run_dir/<stage>; "
                "rename the stage"
            )
        by_folder: dict[str, list[str]] = {}
        for name in stages:
            by_folder.setdefault(name.casefold(), []).append(name)
        clashing = [names for names in by_folder.values() if len(names) > 1]
        if clashing:
            # on macOS and Windows run_dir/Train is run_dir/train: the second stage would reuse or
            # replace the first's output and share its log, wherever the pipeline file is run
            pairs = "; ".join(" and ".join(names) for names in clashing)
            raise ValueError(
                f"stage names {pairs} differ only in case, so they share one output folder "
                "(run_dir/<stage>) and log on case-insensitive file systems (macOS, Windows); "
                "rename one of them"
            )
        return stages
