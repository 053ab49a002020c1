"""`biomask pipeline run`: run a pipeline's stages on this machine, in dependency order, as subprocesses.

Reuse is decided by each stage, not by the runner: a stage reuses its output when the fingerprint in
its run.json matches its config and input checksums (only the stage knows its inputs: fetched datasets,
tokenizers, checkpoints). The runner tells the outcomes apart without parsing messages:

- run.json unchanged by the run (same fingerprint and creation time) -> "reused";
- the stage refused because its output holds a different config or input (`StaleOutputError`,
  reported through BIOMASK_ERROR_FILE) -> the output belongs to this pipeline's run directory, so the
  runner runs the stage again with --overwrite -> "ran (changed)";
- otherwise "ran", or "failed" with the stage's exit code ("stopped": a training stage that checkpointed
  on a signal, exit 75); stages that need a failed or stopped one are not run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from biomask.errors import REQUEUE_EXIT_CODE, SCHEDULER_SIGNALS, BiomaskError, InputError, describe_os_error
from biomask.outputs import append_own, atomic_write_text
from biomask.pipelines.plan import Plan, PlannedStage, Task
from biomask.pipelines.runs import (
    check_input_files,
    check_not_in_use,
    check_upstream_outputs,
    run_lock,
    write_resolved,
)
from biomask.provenance import read_run_info
from biomask.relocation import RUN_DIR_ENV
from biomask.resources import usable_cores

# The rank variables torch.distributed reads (biomask.training.distributed.RANK_VARS, not imported
# here: that would load torch into the runner).
RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

ERROR_FILE_ENV = "BIOMASK_ERROR_FILE"


@dataclass
class TaskResult:
    stage: str
    task: str
    status: str  # ran | ran (changed) | reused | failed | stopped (checkpointed, exit 75) | not run
    exit_code: int | None
    seconds: float
    output: str
    log: str
    detail: str = ""
    started: float | None = None  # Unix time the task started (tasks may run at once: local.jobs)

    @property
    def ok(self) -> bool:
        return self.status in ("ran", "ran (changed)", "reused")


class Stopped(BiomaskError):
    """The runner got SIGTERM or Ctrl-C: its running stages were stopped too and have ended (recorded
    in local-run.json); no further task started. Exit code 128 + the signal (143, 130), as a process
    ended by it."""

    def __init__(self, message: str, results: list[TaskResult], signum: int) -> None:
        super().__init__(message)
        self.results = results
        self.exit_code = 128 + signum


# A second SIGINT sooner than this after the first is the same one delivered twice, not a second
# Ctrl-C: `timeout -s INT` signals the runner and then its whole process group, the runner included
SAME_INTERRUPTION_S = 0.5


class _Stages:
    """The stage processes running now. SIGTERM to the runner (`kill PID`, `timeout`, a workflow
    manager) reaches the runner alone: without passing it on, a stage ran on unseen after the runner
    had gone (its run_dir lock with it, so a rerun trained beside it) or died at its next line of
    output into the closed pipe, a training stage without its checkpoint. Passed on, a training
    stage checkpoints and exits 75, as under SLURM, and the runner waits for it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[subprocess.Popen[str], str] = {}  # each stage process and its label
        self.signal: int | None = None  # the first SIGTERM or SIGINT
        self._first_at = 0.0  # when it came (time.monotonic)
        self.terminal_gone = threading.Event()  # the runner's stderr failed: echo nothing more

    @property
    def stopped(self) -> bool:
        return self.signal is not None

    @property
    def why(self) -> str:
        if self.signal == signal.SIGINT:
            return "interrupted (Ctrl-C)"
        return f"stopped by {signal.Signals(self.signal or signal.SIGTERM).name}"

    def start(self, argv: list[str], label: str = "", **popen: Any) -> subprocess.Popen[str] | None:
        """Start a stage process, or None once the runner was stopped (no new stage after it)."""
        with self._lock:
            if self.stopped:
                return None
            proc = subprocess.Popen(argv, **popen)
            self._running[proc] = label
            return proc

    def ended(self, proc: subprocess.Popen[str]) -> None:
        with self._lock:
            self._running.pop(proc, None)

    def stop(self, signum: int, frame: Any) -> None:
        # a Ctrl-C after any stop stops now (after a SIGTERM each Ctrl-C said "Ctrl-C again to stop
        # now", and did not)
        if signum == signal.SIGINT and self.signal is not None:
            if self.signal == signal.SIGINT and time.monotonic() - self._first_at < SAME_INTERRUPTION_S:
                return  # one SIGINT sent to the runner and to its process group (`timeout -s INT`)
            # Ctrl-C twice: stop now. The stages got it twice too; one still running is deaf to it
            # (stuck in C code): killed, or the runner waited for it anyway (reading its output),
            # and a third Ctrl-C left it running on without its log
            with self._lock:
                left = [(proc, label) for proc, label in self._running.items() if proc.poll() is None]
            for proc, _ in left:
                with contextlib.suppress(OSError):
                    proc.kill()
            killed = f": killed {', '.join(label for _, label in left)} (what it was writing is removed when it runs again)"
            with contextlib.suppress(OSError):
                os.write(2, f"\nbiomask: Ctrl-C again: stopping now{killed if left else ''}\n".encode())
            raise KeyboardInterrupt
        with self._lock:  # the handler runs in the main thread; only worker threads take the lock
            if self.signal is None:
                self._first_at = time.monotonic()
            self.signal = self.signal or signum
            running = list(self._running)
        # os.write, not print: a handler may run while the stream's lock is held
        again = " (Ctrl-C again to stop now)" if signum == signal.SIGINT else ""
        with contextlib.suppress(OSError):  # SIGHUP: the terminal is gone (EIO); the stages still hear
            os.write(2, f"\nbiomask: {self.why}: waiting for the running stages to end{again}\n".encode())
        # SIGTERM on Ctrl-C too: the terminal sent a stage in its process group SIGINT already
        # (a second would stop a training stage without its checkpoint); one outside it gets this
        for proc in running:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)


def stage_argv(stage: PlannedStage, task: Task, *, overwrite: bool = False) -> list[str]:
    """The command line of one task: `python -m biomask <command> --config FILE key=value ...`."""
    argv = [
        sys.executable,
        "-m",
        "biomask",
        *stage.command.argv,
        "--config",
        str(stage.config),
        *task.overrides,
    ]
    return [*argv, "--overwrite"] if overwrite else argv


def run_pipeline(
    plan: Plan,
    *,
    only: Sequence[str] = (),
    start: str | None = None,
    echo: bool = True,
    jobs: int | str | None = None,
) -> list[TaskResult]:
    """Run the selected stages; return one result per task (failures included, nothing raised; after
    SIGTERM or Ctrl-C, `Stopped` carries them).

    A task starts once every stage its stage needs has finished; up to `jobs` (default: the
    pipeline's `local.jobs`) run at once. With one job this is the selection order, one by one.
    """
    selected = plan.select(only, start)
    check_not_in_use(plan.run_dir)  # its stages may be what --only/--from find missing
    if (plan.run_dir / "jobs.json").is_file():  # submitted here: a job that has not started holds no lock
        from biomask.pipelines.slurm import check_no_active_jobs, related_stages

        check_no_active_jobs(plan.run_dir, related_stages(plan, selected), unknown_ok=True)
    check_upstream_outputs(plan, selected)
    check_input_files(plan, selected)
    stages = _Stages()
    in_main = threading.current_thread() is threading.main_thread()  # where handlers can be set
    # Ctrl-C and SIGHUP (the terminal closed) are left ignored where they were (a script's background
    # job, nohup)
    # a scheduler's stop signals (TERM; LSF's USR1 / USR2, SGE's USR2, a CPU limit's XCPU: sent to
    # the runner, their default ended it where it stood and its stages died at their next line into
    # its pipe, a training stage without its checkpoint) are passed on as SIGTERM
    signals = [
        signal.SIGTERM,
        *(
            s
            for s in (*SCHEDULER_SIGNALS[1:], signal.SIGINT, signal.SIGHUP)
            if signal.getsignal(s) is not signal.SIG_IGN
        ),
    ]
    previous = {sig: signal.signal(sig, stages.stop) for sig in signals} if in_main else {}
    try:
        with run_lock(plan):
            results = _run_selected(plan, selected, echo=echo, jobs=jobs, stages=stages)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stages.signal is not None:
        raise Stopped(
            f"{stages.why}: the running stages were stopped too (a training stage checkpoints "
            f"first) and no further stage started; run the same command again to go on (finished "
            f"stages are reused, training resumes from its checkpoint). Logs: {plan.run_dir / 'logs'}",
            results,
            stages.signal,
        )
    return results


def _run_selected(
    plan: Plan,
    selected: Sequence[str],
    *,
    echo: bool,
    jobs: int | str | None,
    stages: _Stages | None = None,
) -> list[TaskResult]:
    stages = stages or _Stages()
    write_resolved(plan)
    (plan.run_dir / "logs").mkdir(parents=True, exist_ok=True)
    n_jobs = resolve_jobs(plan.pipeline.local.jobs if jobs is None else jobs)
    threads = thread_env(n_jobs, plan.pipeline.env)
    if n_jobs > 1:
        _say(f"running up to {n_jobs} tasks at once{_describe_threads(threads)}", echo, stages)

    order = [(name, task) for name in selected for task in plan.stages[name].tasks]
    pending = list(order)
    remaining = {name: len(plan.stages[name].tasks) for name in selected}  # tasks not finished
    failed: dict[str, str] = {}  # stage -> how it ended (failed, stopped, not run)
    results: dict[tuple[str, str], TaskResult] = {}

    def finish(name: str, result: TaskResult) -> None:
        results[(name, result.task)] = result
        remaining[name] -= 1
        if not result.ok:
            failed.setdefault(name, result.status)

    running: dict[Future[TaskResult], str] = {}
    try:
        with ThreadPoolExecutor(max_workers=n_jobs) as pool:
            while pending or running:
                for name, task in list(pending):
                    needs = plan.stages[name].needs
                    blocked = [n for n in needs if n in failed]
                    if blocked or stages.stopped:
                        pending.remove((name, task))
                        finish(
                            name,
                            TaskResult(
                                name,
                                task.name,
                                "not run",
                                None,
                                0.0,
                                str(task.output),
                                "",
                                f"{blocked[0]} {failed[blocked[0]]}" if blocked else stages.why,
                            ),
                        )
                    elif len(running) < n_jobs and not any(remaining.get(n, 0) for n in needs):
                        pending.remove((name, task))
                        stage = plan.stages[name]
                        running[
                            pool.submit(
                                _run_task, plan, stage, task, echo=echo, threads=threads, stages=stages
                            )
                        ] = name
                if running:
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in done:
                        finish(running.pop(future), future.result())
    except KeyboardInterrupt:
        # Ctrl-C twice (the stages still running were killed): recorded as far as it went, or
        # `pipeline status` showed the run before this one
        for future, name in running.items():
            if future.done() and not future.cancelled() and future.exception() is None:
                ended = future.result()
                # its SIGKILL was the runner's, not the out-of-memory killer's its exit code suggests
                finish(name, ended if ended.ok else replace(ended, detail="killed: Ctrl-C twice"))
        for name, task in order:
            if (name, task.name) not in results:
                results[(name, task.name)] = TaskResult(
                    name, task.name, "not run", None, 0.0, str(task.output), "", "stopped now (Ctrl-C twice)"
                )
        with contextlib.suppress(OSError):  # the interruption is what the user must see
            _record(plan, [results[(name, task.name)] for name, task in order])
        raise
    ordered = [results[(name, task.name)] for name, task in order]
    _record(plan, ordered)
    return ordered


def resolve_jobs(jobs: int | str) -> int:
    """`local.jobs` as a number: "auto" is the CPU cores this process may use."""
    if jobs == "auto":
        return usable_cores()
    return max(1, int(jobs))


def thread_env(jobs: int, pipeline_env: dict[str, str]) -> dict[str, str]:
    """Threads per task when tasks share the machine: cores / jobs, unless the user chose."""
    if jobs == 1 or "OMP_NUM_THREADS" in os.environ or "OMP_NUM_THREADS" in pipeline_env:
        return {}
    per_task = str(max(1, resolve_jobs("auto") // jobs))
    return {"OMP_NUM_THREADS": per_task, "MKL_NUM_THREADS": per_task}


def _describe_threads(threads: dict[str, str]) -> str:
    return f", {threads['OMP_NUM_THREADS']} thread(s) each" if threads else ""


def _run_task(
    plan: Plan,
    stage: PlannedStage,
    task: Task,
    *,
    echo: bool,
    threads: dict[str, str],
    stages: _Stages,
) -> TaskResult:
    log = plan.run_dir / "logs" / (f"{stage.name}-{task.index}.log" if task.point else f"{stage.name}.log")
    before = _identity(task.output)
    started_at = time.time()
    started = time.monotonic()
    spawn = {"echo": echo, "label": task.name, "threads": threads, "stages": stages}
    status = "ran"
    try:
        code, error = _spawn(plan, stage_argv(stage, task), log, **spawn)
        if code is not None and code != 0 and error.get("error") == "StaleOutputError":
            # Other settings since the output was written (config, inputs, or a training run's number
            # of processes): it is this pipeline's, replace it, saying which the stage found
            found = str(error.get("message") or "").split(";")[0].split("\n")[0].strip()
            message = (
                f"{task.name}: other settings than its output's ({found}); running it again"
                if found
                else f"{task.name}: config or inputs changed since {task.output} was written; running it again"
            )
            _say(message, echo, stages)
            with _StageLog(log) as sink:  # the refusal above in the log is this, not a failure
                sink.write(f"biomask pipeline: {message} with --overwrite (the refusal above is expected)\n")
            code, error = _spawn(plan, stage_argv(stage, task, overwrite=True), log, **spawn)
            status = "ran (changed)"
    except InputError as exc:  # its log cannot be written (a link at its name): this task fails, named,
        # and the run's record still holds the tasks that ran
        code, error = 2, {"message": str(exc)}
    seconds = time.monotonic() - started
    if code is None:
        return TaskResult(
            stage.name, task.name, "not run", None, seconds, str(task.output), str(log), stages.why
        )
    if code < 0:  # killed by a signal, with no message of its own: named, and the shell's 128 + N
        killed = signal.Signals(-code)
        oom = " (out of memory? the kernel's OOM killer sends it)" if killed == signal.SIGKILL else ""
        code, error = 128 + killed, {"message": f"killed by {killed.name}{oom}"}
    if code != 0:
        return TaskResult(
            stage.name,
            task.name,
            # a training stage that checkpointed on a signal (exit 75) did not fail: a rerun resumes it
            "stopped" if code == REQUEUE_EXIT_CODE else "failed",
            code,
            seconds,
            str(task.output),
            str(log),
            error.get("message", ""),
            started_at,
        )
    if status == "ran" and before is not None and before == _identity(task.output):
        status = "reused"
    return TaskResult(
        stage.name, task.name, status, code, seconds, str(task.output), str(log), started=started_at
    )


def _identity(output: Path) -> tuple[Any, Any] | None:
    """What changes whenever a stage writes its output: run.json's fingerprint and creation time."""
    info = read_run_info(output)
    return (info.get("fingerprint"), info.get("created")) if info else None


def _spawn(
    plan: Plan,
    argv: list[str],
    log: Path,
    *,
    echo: bool,
    label: str,
    threads: dict[str, str],
    stages: _Stages,
) -> tuple[int | None, dict[str, Any]]:
    """Run one stage process, its output appended to `log` (and echoed); return its exit code and error
    (None: not started, the runner was stopped)."""
    with tempfile.TemporaryDirectory(prefix="biomask-stage-") as tmp:
        error_file = Path(tmp) / "error.json"
        # Each stage is one process of its own: rank variables of the runner's process (set when it
        # ran under torchrun, or once it created a process group itself) would make a training
        # stage join that group's address instead of starting its own.
        inherited = {k: v for k, v in os.environ.items() if k not in RANK_VARS}
        env = {
            **inherited,
            **threads,
            **plan.pipeline.env,
            ERROR_FILE_ENV: str(error_file),
            # each stage compares paths inside its run folder relative to it (a moved run is reused)
            RUN_DIR_ENV: str(plan.run_dir),
            "PYTHONUNBUFFERED": "1",
        }
        with _StageLog(log) as sink:
            proc = stages.start(
                argv,
                label,
                cwd=plan.workdir,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            if proc is None:
                return None, {}
            _say(f"{label}: biomask {' '.join(argv[3:])}", echo, stages)
            sink.write(f"$ {' '.join(argv)}\n")
            assert proc.stdout is not None
            try:
                for line in proc.stdout:
                    sink.write(line)
                    if echo:
                        _echo(f"  [{label}] {line}", stages)
                code = proc.wait()
            finally:
                stages.ended(proc)
        if sink.refused is not None:
            _say(
                f"{label}: its log stops where the disk refused it ({describe_os_error(sink.refused, str(log))}); "
                "the stage ran on",
                True,
                stages,
            )
        try:
            error = json.loads(error_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            error = {}
    return code, error


class _StageLog:
    """A stage's log file, appended to line by line. A line the disk refuses (full, over quota) ends
    the log, not the run: the runner died there, the stage it had started left running unread, and no
    table or local-run.json said what had happened."""

    def __init__(self, path: Path) -> None:
        self.file = append_own(path)
        self.refused: OSError | None = None

    def write(self, text: str) -> None:
        if self.refused is None:
            try:
                self.file.write(text)
            except OSError as exc:
                self.refused = exc

    def __enter__(self) -> _StageLog:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.file.close()
        except OSError as error:
            self.refused = self.refused or error


def _say(message: str, echo: bool, stages: _Stages) -> None:
    if echo:
        _echo(f"biomask: {message}\n", stages)


def _echo(text: str, stages: _Stages) -> None:
    """Show a line on the runner's stderr. A terminal closed under the runner (ssh dropped: SIGHUP)
    fails every write (EIO): the runner then echoes nothing more, and goes on reading each stage's
    output into its log. Raised, the error stopped that reading: a stage blocked on its full pipe or
    died at its next line."""
    if stages.terminal_gone.is_set():
        return
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except (OSError, ValueError):  # ValueError: the stream was closed
        stages.terminal_gone.set()


def _record(plan: Plan, results: list[TaskResult]) -> None:
    from biomask.provenance import code_version, sha256_file

    try:
        digest: str | None = sha256_file(plan.source)
    except OSError:  # the pipeline file moved or went away while it ran (or a plan built in memory)
        digest = None
    data = {
        "pipeline": plan.pipeline.name,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        # the runner's code and the pipeline file it read (each stage's run.json has its own code)
        "code": code_version(),
        "pipeline_file": {"path": str(plan.source), "sha256": digest},
        "results": [asdict(r) for r in results],
    }
    atomic_write_text(plan.run_dir / "local-run.json", json.dumps(data, indent=2) + "\n")


def exit_code(results: list[TaskResult]) -> int:
    """0 if every task succeeded, else the first failed or stopped task's exit code (1 if it had none)."""
    for r in results:
        if r.status in ("failed", "stopped"):
            return r.exit_code or 1
    return 0
