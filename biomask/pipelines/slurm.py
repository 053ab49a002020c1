"""`biomask pipeline submit` and `biomask pipeline status`: a pipeline as chained SLURM jobs.

submit: validate the pipeline and find `sbatch` (nothing is written or submitted otherwise), render one
script per stage under a temporary name in run_dir/slurm/, submit them in dependency order with
`--dependency=afterok:<upstream ids>` (the scripts carry --kill-on-invalid-dep=yes, so a failed stage
cancels its dependents), then rename the scripts into place and record the job ids in run_dir/jobs.json.
If sbatch refuses a script, the jobs already submitted by this call are cancelled and the run directory
is left as it was (an earlier submission's scripts, pipeline.yaml and jobs.json included).

status: each recorded job's state from `scontrol show job -o` (one line per array task); once SLURM has
forgotten a job (MinJobAge), from `sacct` (accounting storage or, failing that, the jobcomp file).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from biomask.cells.kernels import environment_for_jobs
from biomask.errors import BiomaskError, InputError
from biomask.outputs import atomic_file, atomic_write_text, protected_mode
from biomask.pipelines.plan import Plan, PlannedStage
from biomask.pipelines.runs import check_run_dir, check_upstream_outputs, resolved_text
from biomask.pipelines.sbatch import JobScript, render
from biomask.pipelines.schema import slurm_seconds
from biomask.provenance import read_run_info
from biomask.relocation import RUN_DIR_ENV

log = logging.getLogger(__name__)

_FIELD = re.compile(r"(\S+?)=(\S*)")


def _template_python() -> str:
    """A template's python where BIOMASK_PYTHON is unset: the checkout's `.venv` (`make venv`), or for
    an installed biomask the interpreter it is installed in (a `.venv/bin/python` in the submit
    folder would not exist there)."""
    from biomask.resources import source_checkout

    return ".venv/bin/python" if source_checkout() is not None else shlex.quote(sys.executable)


def job_script(
    plan: Plan, stage: PlannedStage, *, overwrite: bool = False, portable: bool = False
) -> JobScript:
    """The job script of one stage. `portable`: paths relative to the submit directory (templates)."""

    def path(p: Path) -> str:
        if portable:
            try:
                return str(p.relative_to(plan.workdir))
            except ValueError:
                return str(p)
        return str(p)

    tasks = [[_relative_overrides(o, plan) if portable else o for o in t.overrides] for t in stage.tasks]
    program = f'"$PYTHON" -m biomask {stage.command.name} --config "$CONFIG"'
    return JobScript(
        pipeline=plan.pipeline.name,
        stage=stage.name,
        summary=f"biomask {stage.command.name} --config {path(stage.config)}",
        workdir='"$SLURM_SUBMIT_DIR"' if portable else shlex.quote(str(plan.workdir)),
        python=f"${{BIOMASK_PYTHON:-{_template_python()}}}" if portable else shlex.quote(sys.executable),
        program=program,
        log_dir=path(plan.run_dir / "logs"),
        slurm=stage.slurm,
        training=stage.command.training,
        config=path(stage.config),
        tasks=tasks,
        needs=stage.needs,
        replace_stale=overwrite,
        # each stage compares paths inside its run folder relative to it (a moved run is reused)
        env={**plan.pipeline.env, RUN_DIR_ENV: path(plan.run_dir)},
        setup=plan.pipeline.setup,
        header=[
            f"Rendered from {path(plan.source)} by `biomask pipeline submit` (run directory: {path(plan.run_dir)})."
        ],
    )


def _relative_overrides(item: str, plan: Plan) -> str:
    return item.replace(str(plan.workdir) + "/", "")


def write_scripts(plan: Plan, scripts: dict[str, JobScript], into: Path | None = None) -> dict[str, Path]:
    """Write every script under a temporary name first, then rename them all: never a partial set.
    `into`: a folder other than the run directory (a dry run's), which then gets no logs/."""
    with _staged(plan, scripts, into) as staged:
        pass
    return {name: final for name, (_, final) in staged.items()}


@contextlib.contextmanager
def _staged(
    plan: Plan, scripts: dict[str, JobScript], into: Path | None = None
) -> Iterator[dict[str, tuple[Path, Path]]]:
    """Each script written under a temporary name ({name: (temporary, final)}), and the resolved
    pipeline.yaml: renamed into place, all of them, when the block succeeds; removed, with the folders
    this call made, when it fails, so the files of an earlier submission stay as they were."""
    root = into if into is not None else plan.run_dir
    directory = root / "slurm"
    folders = (root, directory) if into is not None else (root, directory, root / "logs")
    made = [d for d in folders if not d.exists()]
    for folder in folders:  # logs/: SLURM writes the jobs' logs there, so it must exist
        folder.mkdir(parents=True, exist_ok=True)
    try:
        with contextlib.ExitStack() as stack:  # atomic_file renames on exit, removes on an error
            staged = {}
            for name, job in scripts.items():
                final = directory / f"{name}.sbatch"
                tmp = stack.enter_context(atomic_file(final))
                tmp.write_text(render(job), encoding="utf-8")
                tmp.chmod(0o755)
                staged[name] = (tmp, final)
            # with the scripts: slurm/ and logs/ without it would be refused as someone else's folders
            stack.enter_context(atomic_file(root / "pipeline.yaml")).write_text(
                resolved_text(plan), encoding="utf-8"
            )
            yield staged
    except BaseException:
        # logs/ or slurm/ left without a pipeline.yaml would be refused as someone else's next time
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty: a job cancelled after it started left its log
        raise


def require_sbatch() -> str:
    found = shutil.which("sbatch")
    if found is None:
        raise InputError(
            "`sbatch` is not on PATH: `biomask pipeline submit` needs a SLURM client on this machine "
            "(use `biomask pipeline run` to run the pipeline here instead)"
        )
    return found


def render_scripts(
    plan: Plan,
    *,
    only: Sequence[str] = (),
    start: str | None = None,
    overwrite: bool = False,
    into: Path | None = None,
) -> dict[str, Path]:
    """Write the resolved pipeline and the selected stages' scripts into the run directory, or
    `into` another folder (a dry run: the run directory, perhaps a live submission's, is left alone)."""
    selected = plan.select(only, start)
    check_run_dir(plan)
    scripts = {n: job_script(plan, plan.stages[n], overwrite=overwrite) for n in selected}
    return write_scripts(plan, scripts, into)


def submit(
    plan: Plan,
    *,
    only: Sequence[str] = (),
    start: str | None = None,
    overwrite: bool = False,
    before: Callable[[list[str]], None] | None = None,
) -> dict[str, Any]:
    """Render and submit the selected stages; return (and write to run_dir/jobs.json) what was submitted.
    `before(selected)` runs once the checks here have passed and before anything is written (the CLI
    says there what each job will do, and refuses a submission whose jobs would refuse their outputs)."""
    sbatch = require_sbatch()
    selected = plan.select(only, start)
    check_no_active_jobs(plan.run_dir, related_stages(plan, selected))
    check_time_limits(plan, selected)
    check_upstream_outputs(plan, selected)
    check_run_dir(plan)
    for record_file in (plan.run_dir / "jobs.json", plan.run_dir / "pipeline.yaml"):
        # refused now, not once every job was accepted and had to be cancelled again
        protected_mode(record_file)
    if before is not None:
        before(selected)
    jobs = {n: job_script(plan, plan.stages[n], overwrite=overwrite) for n in selected}
    submitted: dict[str, dict[str, Any]] = {}
    # sbatch copies a script when it submits it, so the jobs are submitted from the temporary names;
    # the scripts (and pipeline.yaml, jobs.json) of an earlier submission are replaced only once every
    # job of this one was accepted
    # the guard spans the record too: jobs accepted but written nowhere ran unseen (a full disk)
    sending: dict[str, str] = {}  # the job sbatch is submitting now: it may be accepted if stopped
    with _cancelled_unless_recorded(submitted, sending):
        with _staged(plan, jobs) as staged:
            for name in selected:
                stage = plan.stages[name]
                tmp, final = staged[name]
                upstream = [submitted[n]["job_id"] for n in stage.needs if n in submitted]
                argv = [sbatch, "--parsable"]
                if upstream:
                    argv.append("--dependency=afterok:" + ":".join(upstream))
                sending["job"] = jobs[name].job_name
                try:
                    result = subprocess.run(
                        [*argv, str(tmp)],
                        capture_output=True,
                        text=True,
                        cwd=plan.workdir,
                        env=environment_for_jobs(),
                        timeout=SBATCH_TIMEOUT,
                    )
                except subprocess.TimeoutExpired:
                    raise InputError(
                        f"sbatch gave no answer in {SBATCH_TIMEOUT:.0f} s for stage {name} of {plan.source} "
                        "(the SLURM controller is down or overloaded); "
                        f"it may have accepted this one: look for a job named {jobs[name].job_name} "
                        "(`squeue --me`) and scancel it, then submit again"
                    ) from None
                if result.returncode != 0:
                    kept = (
                        "the earlier submission's scripts are kept as they were; " if final.exists() else ""
                    )
                    raise InputError(
                        f"sbatch refused stage {name} of {plan.source}: "
                        f"{result.stderr.strip() or result.stdout.strip()}\n"
                        f"nothing in {plan.run_dir} was written or replaced; {kept}correct the stage's "
                        "slurm settings (partition, account, qos, time, mem, extra) and submit again"
                    )
                submitted[name] = {
                    "job_id": result.stdout.strip().split(";")[0],
                    "script": str(final),
                    "array": len(stage.tasks) > 1,
                    "tasks": [
                        {"index": t.index, "name": t.name, "output": str(t.output)} for t in stage.tasks
                    ],
                    "after": upstream,
                    "sbatch": [*argv, str(final)],  # as submitted by hand, from the script kept
                }
                sending.clear()
        # --only / --from: the stages left out keep their earlier jobs in the record (and in status)
        earlier = _earlier_stages(plan.run_dir, plan, set(submitted))
        record = {
            "pipeline": plan.pipeline.name,
            "source": str(plan.source),
            "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "stages": {**earlier, **submitted},
        }
        atomic_write_text(plan.run_dir / "jobs.json", json.dumps(record, indent=2) + "\n")
    return record


def check_time_limits(plan: Plan, selected: Sequence[str]) -> None:
    """Refuse a stage whose time limit is above its partition's MaxTime: sbatch accepts one (unless the
    cluster sets EnforcePartLimits) and the job then pends for ever, reason PartitionTimeLimit. Where
    SLURM cannot be asked, sbatch decides."""
    try:
        result = _query(["scontrol", "show", "partition", "-o"]) if shutil.which("scontrol") else None
    except SlurmUnreachable:
        return
    if result is None or result.returncode != 0:
        return
    max_time: dict[str, str] = {}
    default = None
    for line in result.stdout.splitlines():
        fields = dict(_FIELD.findall(line))
        if "PartitionName" in fields:
            max_time[fields["PartitionName"]] = fields.get("MaxTime", "UNLIMITED")
            if fields.get("Default") == "YES":
                default = fields["PartitionName"]
    for name in selected:
        spec = plan.stages[name].slurm
        partition = spec.partition or default
        limit = max_time.get(partition or "", "UNLIMITED")  # an unknown partition: sbatch names it
        try:
            seconds = slurm_seconds(limit)
        except ValueError:  # UNLIMITED, INFINITE
            continue
        if spec.time_seconds > seconds:
            raise InputError(
                f"{plan.source}: stage {name}'s slurm.time {spec.time} is above partition {partition}'s "
                f"MaxTime {limit}; SLURM would keep the job pending for ever (reason PartitionTimeLimit). "
                f"Set slurm.time to at most {limit}, or another slurm.partition; nothing was submitted"
            )


# Job states in which a job may still run (scontrol's names); anything else has ended.
ACTIVE_STATES = frozenset(
    [
        "PENDING",
        "RUNNING",
        "REQUEUED",
        "REQUEUE_HOLD",
        "REQUEUE_FED",
        "CONFIGURING",
        "COMPLETING",
        "SUSPENDED",
        "RESIZING",
        "SIGNALING",
        "STAGE_OUT",
        "STOPPED",
        "SPECIAL_EXIT",
    ]
)


def related_stages(plan: Plan, selected: Sequence[str]) -> set[str]:
    """The selected stages, every stage they need (transitively) and every stage that needs them."""

    def upstream(name: str) -> set[str]:
        return {name}.union(*(upstream(n) for n in plan.stages[name].needs))

    chosen = set(selected)
    before = set().union(*(upstream(n) for n in chosen)) if chosen else set()
    after = {n for n in plan.stages if upstream(n) & chosen}
    return before | after


def check_no_active_jobs(run_dir: Path, stages: set[str] | None = None, *, unknown_ok: bool = False) -> None:
    """Refuse a second submission (or a local run) while jobs of the one jobs.json records may still
    run (of `stages`, when given: those the new jobs read, write or feed): both would run the same
    stages into the same outputs, and a new jobs.json would hide the old jobs from status.
    `unknown_ok`: when SLURM cannot be asked, warn instead of refusing (a dry run, a local run)."""
    if not (run_dir / "jobs.json").is_file():
        return
    try:
        record = read_jobs(run_dir)
    except InputError:  # not a record of ours: nothing of it can still run
        return
    try:
        active = [
            state
            for stage, job in record["stages"].items()
            if stages is None or stage in stages
            for state in _scontrol(stage, str(job.get("job_id", "")))
            if state.state in ACTIVE_STATES
        ]
    except SlurmUnreachable as exc:  # not known to have ended: refused, as jobs that may still run
        if unknown_ok:  # a dry run needs no SLURM: it says what it could not check
            log.warning(
                "%s: could not ask SLURM whether the jobs jobs.json records still run (%s): not checked",
                run_dir,
                exc,
            )
            return
        raise InputError(
            f"run_dir {run_dir}: cannot ask SLURM whether the jobs of an earlier submission (jobs.json) still "
            f"run ({exc}); a second submission beside them would run the same stages into the same "
            "outputs. Try again once `scontrol show job` answers"
        ) from None
    if active:
        shown = ", ".join(f"{s.stage} {s.job_id} {s.state}" for s in active[:8])
        ids = " ".join(dict.fromkeys(s.job_id.split("_")[0] for s in active))
        raise InputError(
            f"run_dir {run_dir}: jobs of an earlier submission may still run ({shown}"
            f"{f' and {len(active) - 8} more' if len(active) > 8 else ''}); a second submission or a local "
            f"run would run the same stages into the same outputs beside them. Wait for them (biomask pipeline status "
            f"{run_dir}) or cancel them (scancel {ids}), then submit again"
        )


def _earlier_stages(run_dir: Path, plan: Plan, resubmitted: set[str]) -> dict[str, Any]:
    """The earlier record's stages of this pipeline that this submission leaves out, in plan order."""
    try:
        stages = read_jobs(run_dir)["stages"]
    except InputError:  # none yet, or not a record of ours
        return {}
    return {n: stages[n] for n in plan.stages if n in stages and n not in resubmitted}


# sbatch waits for the controller's reply (its own retries included); a minute or two on a busy
# cluster, never the many minutes of silence a controller that does not answer gave
SBATCH_TIMEOUT = 120.0


@contextlib.contextmanager
def _cancelled_unless_recorded(
    submitted: dict[str, dict[str, Any]], sending: dict[str, str]
) -> Iterator[None]:
    """The jobs a submission got accepted are cancelled when it does not finish (sbatch refused or
    did not answer, Ctrl-C, SIGTERM, a record that could not be written): no jobs.json records them,
    so they ran unseen by `pipeline status`, and the next submission queued the same stages again
    beside them. A job sbatch was sending when it stopped may have been accepted: it is named."""
    try:
        yield
    except BaseException as exc:
        ids = [job["job_id"] for job in submitted.values()]
        said = []
        if ids:
            said.append(
                f"the jobs this submission had got accepted were cancelled ({', '.join(ids)})"
                if _cancel(ids)
                else f"scancel could not cancel the jobs this submission had got accepted: scancel {' '.join(ids)}"
            )
        if sending and not isinstance(exc, InputError):  # an InputError of sbatch's says it already
            said.append(
                f"sbatch was submitting {sending['job']} when it stopped and may have had it accepted: look "
                "for it (`squeue --me`) and scancel it"
            )
        if not said:
            raise
        if isinstance(exc, BiomaskError):  # its message is the one the user reads: the outcome goes in it
            exc.args = (f"{exc}\n{'; '.join(said)}", *exc.args[1:])
            raise
        log.warning("the submission did not finish: %s", "; ".join(said))
        raise


def _cancel(job_ids: list[str]) -> bool:
    """scancel the jobs; whether it did."""
    if not (job_ids and shutil.which("scancel")):
        return not job_ids
    try:
        return (
            subprocess.run(
                ["scancel", *job_ids], capture_output=True, text=True, timeout=SLURM_QUERY_TIMEOUT
            ).returncode
            == 0
        )
    except subprocess.TimeoutExpired:
        return False


# ----------------------------------------------------------------------------------------- status


@dataclass
class JobState:
    stage: str
    task: str  # array index, or "" for a single job
    job_id: str
    state: str  # PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, ... or UNKNOWN
    reason: str = ""
    exit_code: str = ""
    restarts: int = 0
    start: str = ""
    end: str = ""
    source: str = ""  # scontrol | sacct | output

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_jobs(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "jobs.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{run_dir}: no jobs.json (nothing was submitted from this run directory)") from None
    except ValueError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(record, dict) or not isinstance(record.get("stages"), dict):
        raise InputError(
            f"{path} is not biomask's record of submitted jobs (no stages); submit the pipeline again"
        )
    return record


# seconds a query of SLURM may take: a controller that is down or unreachable makes scontrol retry
# for a minute or more, per job
SLURM_QUERY_TIMEOUT = 20.0


class SlurmUnreachable(Exception):
    """scontrol could not ask the controller (down, unreachable, no permission, no client here)."""


def _query(argv: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=SLURM_QUERY_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise SlurmUnreachable(
            f"`{' '.join(argv[:3])}` gave no answer in {SLURM_QUERY_TIMEOUT:.0f} s"
        ) from None


def job_states(run_dir: Path) -> list[JobState]:
    """The state of every submitted stage (one row per array task), in submission order. Rows SLURM
    could not give (it forgot the job, or could not be asked) say so: their `source` is "output",
    and a warning names why."""
    record = read_jobs(run_dir)
    rows: list[JobState] = []
    unreachable: str | None = None
    silent: set[str] = set()  # queries that gave no answer in time: not asked again for later jobs
    for stage, job in record["stages"].items():
        found = []
        if unreachable is None:
            try:
                found = _scontrol(stage, job["job_id"])
            except SlurmUnreachable as exc:
                unreachable = str(exc)
                if len(record["stages"]) > 1:  # said now: what follows would be minutes of silence
                    log.warning("%s: %s; the other jobs are read from sacct or their outputs", run_dir, exc)
        if not found:
            found = _per_task(stage, job, sacct_states(stage, job["job_id"], silent))
        rows += sorted(found, key=lambda r: int(r.task) if r.task.isdigit() else -1)
    guessed = sorted({r.stage for r in rows if r.source == "output"})
    if guessed:
        log.warning(
            "%s: no state from SLURM for %s (%s); shown from the outputs: COMPLETED where the task's output "
            "was written, UNKNOWN where not (a failed or cancelled task among them)",
            run_dir,
            ", ".join(guessed),
            unreachable or "finished longer ago than it keeps jobs, and not in sacct",
        )
    return rows


def _per_task(stage: str, job: dict[str, Any], accounted: list[JobState]) -> list[JobState]:
    """sacct's rows, one per array task: a task sacct does not list (the jobcomp file keeps an array
    under one task's id) is told from its output, never taken for the array's one row."""
    if not job.get("array"):
        return accounted or [_from_output(stage, job, task) for task in job["tasks"]]
    by_task = {r.task: r for r in accounted if r.task}
    return [by_task.get(str(task["index"])) or _from_output(stage, job, task) for task in job["tasks"]]


def _scontrol(stage: str, job_id: str) -> list[JobState]:
    if not shutil.which("scontrol"):
        raise SlurmUnreachable("`scontrol` is not on PATH")
    result = _query(["scontrol", "show", "job", "-o", job_id])
    if result.returncode != 0:
        if "Invalid job id" not in result.stderr:
            raise SlurmUnreachable(
                (result.stderr.strip() or f"scontrol exit {result.returncode}").splitlines()[-1]
            )
        return []  # unknown to slurmctld: finished longer ago than MinJobAge
    rows = []
    for line in result.stdout.splitlines():
        fields = dict(_FIELD.findall(line))
        if "JobState" not in fields:
            continue
        rows.append(
            JobState(
                stage=stage,
                task=fields.get("ArrayTaskId", ""),
                # an array task as SLURM shows it in squeue: <array job id>_<index>
                job_id=f"{fields['ArrayJobId']}_{fields['ArrayTaskId']}"
                if "ArrayJobId" in fields
                else fields.get("JobId", job_id),
                state=fields["JobState"],
                reason="" if fields.get("Reason") in (None, "None") else fields["Reason"],
                exit_code=fields.get("ExitCode", ""),
                restarts=int(fields.get("Restarts", "0") or 0),
                start=_time(fields.get("StartTime")),
                end=_time(fields.get("EndTime")),
                source="scontrol",
            )
        )
    return rows


def sacct_states(stage: str, job_id: str, silent: set[str] | None = None) -> list[JobState]:
    """From accounting storage, or else the jobcomp file (`sacct -c`, one line per run of the job).
    `silent` collects the queries that gave no answer in time, which are then not asked again."""
    if not shutil.which("sacct"):
        return []
    silent = set() if silent is None else silent
    fmt = ["--noheader", "--parsable2", "--format=JobID,State,ExitCode,Start,End"]
    for extra in ([], ["-c"]):
        argv = ["sacct", *extra, "-X", "-j", job_id, *fmt]
        if " ".join(argv[:2]) in silent:
            continue
        try:
            result = _query(argv)
        except SlurmUnreachable:
            silent.add(" ".join(argv[:2]))
            continue
        lines = [line.split("|") for line in result.stdout.splitlines() if line.count("|") == 4]
        if result.returncode == 0 and lines:
            latest: dict[str, list[str]] = {}
            for parts in lines:  # later lines are later runs (requeues)
                latest[parts[0]] = parts
            return [
                JobState(
                    stage,
                    jid.partition("_")[2],
                    jid,
                    state.split()[0],
                    "",
                    code,
                    0,
                    _time(s),
                    _time(e),
                    "sacct",
                )
                for jid, (_, state, code, s, e) in latest.items()
            ]
    return []


def _from_output(stage: str, job: dict[str, Any], task: dict[str, Any]) -> JobState:
    """No scheduler knows the job any more: say whether its output was written."""
    done = read_run_info(task["output"]) is not None
    index = str(task["index"]) if job.get("array") else ""
    return JobState(
        stage, index, job["job_id"], "COMPLETED" if done else "UNKNOWN", "", "", 0, "", "", "output"
    )


def _time(value: str | None) -> str:
    return "" if value in (None, "Unknown", "None", "N/A") else str(value)


def wait(run_dir: Path, *, timeout: float, poll: float = 1.0) -> list[JobState]:
    """Poll until no job of the run is pending, running or being requeued; return the final states."""
    deadline = time.monotonic() + timeout
    while True:
        states = job_states(run_dir)
        if all(s.state in FINAL_STATES for s in states) or time.monotonic() > deadline:
            return states
        time.sleep(poll)


# Ended without finishing its work: `pipeline status` exits 1 when a task is in one of these.
UNSUCCESSFUL_STATES = frozenset(
    {"FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}
)
FINAL_STATES = UNSUCCESSFUL_STATES | {"COMPLETED"}
