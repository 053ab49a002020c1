"""Render one readable sbatch script per stage. A swept stage becomes a job array: one `case` line per task.

Training stages (see commands.py) differ in three ways:
- the command runs under `srun`, one task per GPU (per CPU slot on CPU-only nodes); biomask maps the
  rank variables from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID / SLURM_JOB_NODELIST itself;
- `--signal=B:USR1@<margin>` and `--requeue`: SLURM signals the *batch script* before the time limit;
  its trap forwards USR1 to the srun step (srun passes it on to every task), the trainer checkpoints
  and exits with 75, and the script runs `scontrol requeue $SLURM_JOB_ID`. The requeued job resumes
  from the latest checkpoint in its output directory; `afterok` dependents wait for its final end.
- a preemption (SIGTERM to every process) reaches the trainer directly; with PreemptMode=REQUEUE
  SLURM requeues the job itself.

The plain templates in pipelines/slurm/ are rendered by this module too (templates.py); a test keeps
them in sync.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

from biomask.errors import REQUEUE_EXIT_CODE, ConfigError
from biomask.pipelines.schema import SlurmSpec


@dataclass
class JobScript:
    """Everything one job script holds. Paths are strings so templates can use relative ones."""

    pipeline: str
    stage: str
    summary: str  # what the stage runs, for the header comment
    workdir: str  # shell word: an absolute path, or "$SLURM_SUBMIT_DIR" in templates
    python: str  # shell word for the interpreter
    program: str  # shell words run for each task, before the task's arguments
    log_dir: str
    slurm: SlurmSpec
    training: bool = False
    config: str | None = None  # exported as $CONFIG for `program`
    tasks: list[list[str]] = field(default_factory=lambda: [[]])  # arguments of each task (array index order)
    needs: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)
    header: list[str] = field(default_factory=list)  # extra comment lines (how it was rendered)
    # `pipeline submit --overwrite`: an output of other settings is replaced, as `pipeline run` does
    replace_stale: bool = False

    @property
    def is_array(self) -> bool:
        return len(self.tasks) > 1

    @property
    def job_name(self) -> str:
        return f"{self.pipeline}.{self.stage}"


def _q(word: str) -> str:
    return shlex.quote(word)


def _sbatch_output(folder: str, name: str) -> str:
    """`--output=`'s value: NAME (a pattern, %j and the like) in FOLDER, written as sbatch reads an
    #SBATCH line (measured on Debian's slurm-wlm)."""
    if "\\" in folder:
        # a backslash in an output pattern turns off sbatch's %j / %A_%a, and no quoting brings them
        # back: the log went nowhere
        raise ConfigError(f"{folder}: sbatch cannot write a job log under a path with a backslash; rename it")
    # %x, %u, ... in a folder's name were expanded by sbatch (the log written to a folder that does
    # not exist, lost); %% is a literal %
    path = folder.replace("%", "%%") + "/" + name
    if re.search(r"[\s'\"#]", path):
        # sbatch splits an #SBATCH line at white space ("Invalid directive", the job not submitted),
        # refuses an unmatched quote and ends the line at a # (`run#2/`: every stage's log went to one
        # file named after the folder before it); inside double quotes it reads \" as " and # as #
        path = '"' + path.replace('"', '\\"') + '"'
    return path


def sbatch_options(job: JobScript) -> list[str]:
    """The #SBATCH options, one per line, in a fixed order."""
    s = job.slurm
    log = _sbatch_output(job.log_dir, f"{job.stage}-" + ("%A_%a.out" if job.is_array else "%j.out"))
    opts = [f"--job-name={job.job_name}", f"--output={log}", f"--nodes={s.nodes}"]
    opts.append(f"--ntasks-per-node={s.tasks if job.training else 1}")
    if s.gpus_per_node:
        opts.append(f"--gpus-per-node={s.gpus_per_node}")
    opts.append(f"--cpus-per-task={s.cpus_per_task}")
    if s.mem:
        opts.append(f"--mem={s.mem}")
    opts.append(f"--time={s.time}")
    opts += [f"--{key}={value}" for key in ("partition", "account", "qos") if (value := getattr(s, key))]
    if job.is_array:
        throttle = f"%{s.array_parallelism}" if s.array_parallelism else ""
        opts.append(f"--array=0-{len(job.tasks) - 1}{throttle}")
    if job.training:
        # append: a requeued job keeps the log of its earlier runs
        opts += [f"--signal=B:USR1@{s.signal_margin}", "--requeue", "--open-mode=append"]
    opts.append(
        "--kill-on-invalid-dep=yes"
    )  # a failed upstream stage cancels this job instead of leaving it pending
    return opts + list(s.extra)


def _common_prefix(lists: list[list[str]]) -> list[str]:
    prefix: list[str] = []
    for items in zip(*lists):
        if len(set(items)) != 1:
            break
        prefix.append(items[0])
    return prefix


def render(job: JobScript) -> str:
    """The script's text."""
    lines = ["#!/bin/bash"]
    count = f"{len(job.tasks)} tasks (a job array)" if job.is_array else "one task"
    lines.append(f"# biomask pipeline {job.pipeline!r}, stage {job.stage!r}: {job.summary}; {count}.")
    lines += [f"# {line}" for line in job.header]
    if job.needs:
        ids = ":".join(f"<{n} job id>" for n in job.needs)
        lines.append(
            f"# Runs after {', '.join(job.needs)}; by hand: sbatch --dependency=afterok:{ids} THIS_SCRIPT"
        )
    lines += [f"#SBATCH {opt}" for opt in sbatch_options(job)]
    # comments and #SBATCH lines carry paths unquoted: a line break in one (a config file's or the
    # run folder's name) began a shell line of the job script, run as the job
    broken = next((line for line in lines if "\n" in line or "\r" in line), None)
    if broken is not None:
        raise ConfigError(
            f"stage {job.stage}: a path or value of its job script holds a line break ({broken!r}); "
            "rename the file or folder"
        )
    lines += ["set -euo pipefail", ""]
    lines.append(f"cd {job.workdir}")
    lines += [f"export {key}={_q(value)}" for key, value in job.env.items()]
    if "OMP_NUM_THREADS" not in job.env:
        # the allocation's cores, not the submitting shell's setting (sbatch passes its environment on)
        lines.append('export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"')
    lines += job.setup
    lines.append(f"PYTHON={job.python}")
    if job.config is not None:
        lines.append(f"CONFIG={_q(job.config)}")

    common = _common_prefix(job.tasks) if job.is_array else job.tasks[0]
    lines.append("ARGS=(" + " ".join(_q(a) for a in common) + ")")
    if job.is_array:
        lines.append("# One line per array task: its sweep point and its output directory.")
        lines.append('case "$SLURM_ARRAY_TASK_ID" in')
        for index, task in enumerate(job.tasks):
            lines.append(f"  {index}) ARGS+=(" + " ".join(_q(a) for a in task[len(common) :]) + ") ;;")
        lines.append('  *) echo "biomask: no task $SLURM_ARRAY_TASK_ID in this array" >&2; exit 2 ;;')
        lines.append("esac")
    lines.append("")
    lines.append(
        'echo "biomask: job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on $(hostname): '
        f'{job.stage} ${{ARGS[*]}}"'
    )
    if job.training:
        lines += _training_body(job)
    elif job.replace_stale:
        lines += _replace_stale(job, 'status=0\n{program} "${{ARGS[@]}}" || status=$?')
        lines.append('exit "$status"')
    else:
        lines.append(f'exec {job.program} "${{ARGS[@]}}"')
    return "\n".join(lines) + "\n"


def _replace_stale(job: JobScript, run: str) -> list[str]:
    """Run the stage (`run`: shell lines with a {program} slot, setting $status). Submitted with
    --overwrite, the stage is not given --overwrite itself: that would discard a requeued training
    run's checkpoints and start it again at every requeue. As `pipeline run` does, it runs as usual
    first (a current output is reused, an interrupted run resumed), and only when it refuses an
    output of other settings (StaleOutputError, through BIOMASK_ERROR_FILE) runs again replacing it."""
    if not job.replace_stale:
        return run.format(program=job.program).splitlines()
    error_file = f'{_q(job.log_dir)}/".{job.stage}-${{SLURM_JOB_ID}}.error.json"'
    return [
        "# Submitted with --overwrite: an output written with other settings is replaced. The stage runs",
        "# as usual first (a current output is reused, an interrupted run resumed, also after a requeue);",
        "# only when it refuses an output of other settings does it run again with --overwrite.",
        f"export BIOMASK_ERROR_FILE={error_file}",
        'rm -f "$BIOMASK_ERROR_FILE"',
        *run.format(program=job.program).splitlines(),
        'if [ "$status" -eq 2 ] && grep -qs \'"StaleOutputError"\' "$BIOMASK_ERROR_FILE"; then',
        '  echo "biomask: its output holds results of other settings; running it again with --overwrite" >&2',
        *("  " + line for line in run.format(program=f"{job.program} --overwrite").splitlines()),
        "fi",
        'rm -f "$BIOMASK_ERROR_FILE"',
    ]


def _training_body(job: JobScript) -> list[str]:
    s = job.slurm
    return [
        "",
        "# One srun task per GPU (per CPU slot without GPUs). biomask maps SLURM_PROCID, SLURM_NTASKS,",
        "# SLURM_LOCALID and the first host of SLURM_JOB_NODELIST to RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR.",
        "# The step takes the allocation's shape from the #SBATCH lines above, as edited (srun does not",
        "# inherit --cpus-per-task in SLURM 22.05+, so it is passed on; --ntasks alone needs nothing more).",
        'STEP=(srun --nodes="$SLURM_JOB_NUM_NODES" --kill-on-bad-exit=1)',
        'if [ -n "${SLURM_NTASKS_PER_NODE:-}" ]; then STEP+=(--ntasks-per-node="$SLURM_NTASKS_PER_NODE"); fi',
        'if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then STEP+=(--cpus-per-task="$SLURM_CPUS_PER_TASK"); fi',
        "",
        f"# Checkpoint and requeue: SLURM sends USR1 to this script {s.signal_margin} s before the time limit",
        f"# (--signal=B:USR1@{s.signal_margin}). The trap passes it to the step (srun forwards it to every task);",
        f"# the trainer checkpoints and exits with {REQUEUE_EXIT_CODE}; then this script requeues the job, which resumes",
        "# from the latest checkpoint in its output directory.",
        'step=""',
        "usr1=0",
        "on_usr1() {",
        "  usr1=1",
        '  echo "biomask: USR1: asking the training step to checkpoint" >&2',
        '  if [ -n "$step" ]; then kill -USR1 "$step" 2>/dev/null || true; fi',
        "}",
        "trap on_usr1 USR1",
        "",
        '# Run the training step (its arguments: "$@"); its exit status in $status.',
        "run_step() {",
        '  "${STEP[@]}" "$@" &',
        "  step=$!",
        "  # A USR1 that came before the step started is passed on now.",
        '  if [ "$usr1" = 1 ]; then kill -USR1 "$step" 2>/dev/null || true; fi',
        "  # A trapped signal cuts `wait` short: wait until the step has ended, then read its exit status.",
        '  while kill -0 "$step" 2>/dev/null; do wait "$step" || true; done',
        "  status=0",
        '  wait "$step" || status=$?',
        '  step=""',
        "}",
        *_replace_stale(job, 'run_step {program} "${{ARGS[@]}}"'),
        "",
        f'if [ "$status" -eq {REQUEUE_EXIT_CODE} ]; then',
        f'  echo "biomask: the step checkpointed (exit {REQUEUE_EXIT_CODE}); requeueing job $SLURM_JOB_ID" >&2',
        f'  scontrol requeue "$SLURM_JOB_ID" || exit {REQUEUE_EXIT_CODE}',
        "  exit 0",
        "fi",
        'exit "$status"',
    ]
