"""`biomask pipeline run` stopped by SIGTERM (`kill PID`, `timeout`, a workflow manager) or Ctrl-C:
SIGTERM reaches the runner alone, so the runner passes it on to the stage running and waits for it (a
training stage checkpoints and exits 75), starts nothing more, and records the run, so that `pipeline
status` shows this run rather than the one before it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from biomask.pipelines import local
from biomask.pipelines.plan import build_plan

# A stage that runs until SIGTERM, then "checkpoints" (a file) and exits 75, as the trainer does.
STAGE = """
import pathlib, signal, sys, time
out = pathlib.Path(sys.argv[1])
def stop(signum, frame):
    (out / "checkpointed").write_text("yes")
    sys.exit(75)
signal.signal(signal.SIGTERM, stop)
out.mkdir(parents=True, exist_ok=True)
(out / "started").write_text("yes")
time.sleep(60)
"""


@pytest.mark.parametrize(
    ("signum", "why"),
    [
        (signal.SIGTERM, "stopped by SIGTERM"),
        (signal.SIGINT, "interrupted (Ctrl-C)"),
        (signal.SIGHUP, "stopped by SIGHUP"),  # the terminal closed
        # LSF's -wa, SGE's -notify: their default ended the runner, its stages dying into its pipe
        (signal.SIGUSR1, "stopped by SIGUSR1"),
        (signal.SIGUSR2, "stopped by SIGUSR2"),
        (signal.SIGXCPU, "stopped by SIGXCPU"),  # a CPU-time limit
    ],
)
def test_a_signal_is_passed_on_to_the_running_stage_and_nothing_more_starts(
    tmp_path, monkeypatch, signum, why
):
    data = {
        "name": "t",
        "run_dir": str(tmp_path / "run"),
        "stages": {
            "train": {"command": "pretrain", "config": "unused.yaml"},
            "after": {"command": "evaluate", "config": "unused.yaml", "needs": ["train"]},
            "beside": {"command": "prep cells", "config": "unused.yaml"},
        },
    }
    plan = build_plan(data, "t.yaml", tmp_path / "t.yaml", check_commands=False, workdir=tmp_path)
    monkeypatch.setattr(
        local,
        "stage_argv",
        lambda stage, task, overwrite=False: [sys.executable, "-c", STAGE, str(task.output)],
    )
    started = plan.stages["train"].tasks[0].output / "started"

    def kill_runner() -> None:
        deadline = time.monotonic() + 30
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signum)

    # as at a terminal: a suite started by nohup or in a script's background inherits SIGHUP / Ctrl-C
    # ignored, which the runner rightly keeps; a no-op here, so a runner without its handler fails
    inherited = signal.signal(signum, lambda *_: None)
    before = signal.getsignal(signum)
    threading.Thread(target=kill_runner, daemon=True).start()
    try:
        with pytest.raises(local.Stopped) as stopped:
            local.run_pipeline(plan, echo=False, jobs=1)
    finally:
        restored = signal.signal(signum, inherited)
    assert stopped.value.exit_code == 128 + signum and str(stopped.value).startswith(why)
    # the stage got the signal and ended (checkpointed) before the runner returned
    assert (plan.stages["train"].tasks[0].output / "checkpointed").exists()
    status = {r.task: (r.status, r.exit_code) for r in stopped.value.results}
    # checkpointed, not failed; what needs it is not run because it stopped
    assert status == {"train": ("stopped", 75), "after": ("not run", None), "beside": ("not run", None)}
    assert stopped.value.results[1].detail == "train stopped"
    assert stopped.value.results[2].detail == why
    assert local.exit_code(stopped.value.results) == 75
    assert not Path(plan.stages["beside"].tasks[0].output).exists()
    # recorded, so `pipeline status` shows this run; the runner's own handler is gone again
    recorded = json.loads((plan.run_dir / "local-run.json").read_text())
    assert [r["status"] for r in recorded["results"]] == ["stopped", "not run", "not run"]
    assert restored is before


def test_a_stage_killed_by_a_signal_is_named_and_exits_as_a_shell_would(tmp_path, monkeypatch):
    """The OOM killer's SIGKILL used to show as exit -9 with no message, and `pipeline run` exited 247."""
    data = {"name": "t", "run_dir": str(tmp_path / "run"),
            "stages": {"train": {"command": "pretrain", "config": "unused.yaml"}}}  # fmt: skip
    plan = build_plan(data, "t.yaml", tmp_path / "t.yaml", check_commands=False, workdir=tmp_path)
    killed = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    monkeypatch.setattr(
        local, "stage_argv", lambda stage, task, overwrite=False: [sys.executable, "-c", killed]
    )
    (result,) = local.run_pipeline(plan, echo=False, jobs=1)
    assert (result.status, result.exit_code) == ("failed", 137)
    assert result.detail.startswith("killed by SIGKILL (out of memory?")
    assert local.exit_code([result]) == 137


# `pipeline run` at a terminal, its stage as above (run from a file, so the runner is the real CLI).
RUNNER = """
import signal, sys
from pathlib import Path
signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as at an interactive shell (the suite may run under nohup)
from biomask.cli import main
from biomask.pipelines import local, plan
stage, tmp = sys.argv[1], Path(sys.argv[2])
data = {"name": "t", "run_dir": str(tmp / "run"), "stages": {
    "train": {"command": "pretrain", "config": "unused.yaml"},
    "after": {"command": "evaluate", "config": "unused.yaml", "needs": ["train"]}}}
plan.load_plan = lambda *_: plan.build_plan(data, "t.yaml", tmp / "t.yaml", check_commands=False, workdir=tmp)
local.stage_argv = lambda stage_, task, overwrite=False: [sys.executable, "-c", stage, str(task.output)]
sys.exit(main(["pipeline", "run", "t.yaml"]))
"""


@pytest.mark.timeout(120)
def test_sighup_from_a_closed_terminal_stops_the_stages_and_records_the_run(tmp_path):
    """ssh dropped: the terminal is gone, so every write to it fails (EIO), and SIGHUP arrives. The
    runner's handler failed on its message before passing the signal on, and the echo of a stage's
    next line stopped the runner reading that stage: the runner hung while the stage ran on, then
    ended in a traceback without recording the run."""
    import pty
    import subprocess

    # the stage says something as it checkpoints: a line to echo once the terminal is gone
    stage = STAGE.replace(
        '(out / "checkpointed")', 'print("checkpointing", flush=True); (out / "checkpointed")'
    )
    stage = stage.replace(
        '(out / "started")', '(out / "pid").write_text(str(os.getpid())); (out / "started")'
    )
    stage = stage.replace("import pathlib,", "import os, pathlib,")
    master, terminal = pty.openpty()
    runner = subprocess.Popen(
        [sys.executable, "-c", RUNNER, stage, str(tmp_path)],
        stdin=terminal, stdout=terminal, stderr=terminal, cwd=Path(__file__).parents[1],
    )  # fmt: skip
    os.close(terminal)
    out = tmp_path / "run" / "train"
    try:
        while not (out / "started").exists() and runner.poll() is None:
            time.sleep(0.05)
        time.sleep(0.2)
        os.read(master, 65536)  # what it echoed so far
        os.close(master)  # the terminal closes
        runner.send_signal(signal.SIGHUP)
        code = runner.wait(timeout=30)  # before: still waiting for the stage's 60 s to pass
    finally:
        if runner.poll() is None:
            runner.kill()
        if (out / "pid").exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int((out / "pid").read_text()), signal.SIGKILL)
    assert code == 128 + signal.SIGHUP
    assert (out / "checkpointed").exists() and "checkpointing" in (
        tmp_path / "run" / "logs" / "train.log"
    ).read_text()
    recorded = json.loads((tmp_path / "run" / "local-run.json").read_text())
    assert [r["status"] for r in recorded["results"]] == ["stopped", "not run"]


def test_one_sigint_delivered_twice_is_one_interruption_and_a_later_one_stops_now(monkeypatch):
    """`timeout -s INT` signals the runner, then its whole process group (the runner in it): the
    second delivery was taken for a second Ctrl-C, so the runner gave up waiting and recorded no
    run for `pipeline status`. A second SIGINT close behind the first is the same one; a later one
    is the user's "stop now"."""
    import signal

    from biomask.pipelines import local

    clock = iter([100.0, 100.01, 105.0])
    monkeypatch.setattr(local.time, "monotonic", lambda: next(clock))
    stages = local._Stages()
    stages.stop(signal.SIGINT, None)  # first: wait for the running stages
    stages.stop(signal.SIGINT, None)  # 10 ms later: the same interruption, ignored
    assert stages.signal == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
        stages.stop(signal.SIGINT, None)  # seconds later: the user's second Ctrl-C
    # after a SIGTERM (kill, a scheduler) a Ctrl-C stops now too: it said "Ctrl-C again to stop
    # now" each time and went on waiting
    clock = iter([200.0, 200.01])
    stages = local._Stages()
    stages.stop(signal.SIGTERM, None)
    with pytest.raises(KeyboardInterrupt):
        stages.stop(signal.SIGINT, None)


@pytest.mark.timeout(120)
def test_a_second_ctrl_c_stops_now_even_with_a_stage_deaf_to_signals(tmp_path):
    """The runner said "Ctrl-C again to stop now", then went on waiting for a stage stuck where no
    signal reaches it (a long call in C) until it ended by itself; a third Ctrl-C left the stage
    running on without its log. A second Ctrl-C kills what still runs, names it, and ends."""
    import subprocess

    deaf = """
import os, pathlib, signal, sys, time
out = pathlib.Path(sys.argv[1])
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
out.mkdir(parents=True, exist_ok=True)
(out / "pid").write_text(str(os.getpid()))
(out / "started").write_text("yes")
time.sleep(60)
"""
    runner = subprocess.Popen(
        [sys.executable, "-c", RUNNER, deaf, str(tmp_path)],
        stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1],
    )  # fmt: skip
    out = tmp_path / "run" / "train"
    try:
        while not (out / "started").exists() and runner.poll() is None:
            time.sleep(0.05)
        runner.send_signal(signal.SIGINT)
        time.sleep(1.0)  # a second Ctrl-C of the user's, not the same one delivered twice
        runner.send_signal(signal.SIGINT)
        _, err = runner.communicate(timeout=20)  # before: until the stage's 60 s had passed
    finally:
        if runner.poll() is None:
            runner.kill()
        pid = int((out / "pid").read_text()) if (out / "pid").exists() else None
    assert runner.returncode == 130, err
    assert "Ctrl-C again: stopping now: killed train" in err, err
    assert pid is not None
    with pytest.raises(ProcessLookupError):  # the stage is gone, not left running without its log
        for _ in range(50):
            os.kill(pid, 0)
            time.sleep(0.1)
    # recorded as far as it went, so `pipeline status` shows this run, not the one before
    recorded = json.loads((tmp_path / "run" / "local-run.json").read_text())
    assert [(r["status"], r["detail"]) for r in recorded["results"]] == [
        ("failed", "killed: Ctrl-C twice"),
        ("not run", "stopped now (Ctrl-C twice)"),
    ]
