"""`biomask pipeline run` stopped by SIGTERM (`kill PID`, `timeout`, a workflow manager) or Ctrl-C:
SIGTERM reaches the runner alone, so the runner passes it on to the stage running and waits for it (a
training stage checkpoints and exits 75), starts nothing more, and records the run, so that `pipeline
status` shows this run rather than the one before it."""

from __future__ import annotations

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
