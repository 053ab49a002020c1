"""Experiment tracking (issue 19): `train.report_to` like the HF Trainer's. TensorBoard by default,
nothing but metrics.jsonl with [], and W&B / MLflow only when installed: asked for without the
package, pretrain stops before writing anything, naming the key and the pip command."""

from __future__ import annotations

import importlib.util

import pytest

from biomask.training.metrics import MetricsLogger

VALUES = {"loss": 2.5, "ratio": 0.3, "tokens_per_s": 100.0, "accuracy": 0.25}


@pytest.mark.parametrize("report_to", [None, []])
def test_tensorboard_by_default_and_only_when_asked(tmp_path, report_to):
    kwargs = {} if report_to is None else {"report_to": report_to}
    metrics = MetricsLogger(tmp_path, total_steps=10, start_step=0, enabled=True, progress=False, **kwargs)
    metrics.log(5, "train", VALUES)
    metrics.log(10, "eval", {"loss": {"0.15": 2.0}, "mean_loss": 2.1})
    metrics.close()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (len(events) == 1) == (report_to is None)


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_a_tracker_that_is_not_installed_stops_pretrain_before_anything_is_written(tracker, tmp_path, cli):
    if importlib.util.find_spec(tracker) is not None:
        pytest.skip(f"{tracker} is installed here")
    out = tmp_path / "run"
    code, _, err = cli("pretrain", "-c", "configs/pretrain/dna-tiny.yaml", f"data.store={tmp_path / 'store'}",
                       f"output={out}", f"train.report_to=[tensorboard,{tracker}]")  # fmt: skip
    assert code == 2
    assert "train.report_to" in err and f"pip install {tracker}" in err
    assert not out.exists()


def test_an_unknown_tracker_is_a_config_error(tmp_path, cli):
    code, _, err = cli("pretrain", "-c", "configs/pretrain/dna-tiny.yaml", f"output={tmp_path / 'run'}",
                       "train.report_to=[neptune]")  # fmt: skip
    assert code == 2 and "train.report_to" in err


def test_wandb_records_every_scalar_when_installed(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")  # written to the run directory, nothing sent
    monkeypatch.setenv("WANDB_SILENT", "true")
    metrics = MetricsLogger(tmp_path, total_steps=10, start_step=0, enabled=True, progress=False,
                            report_to=["wandb"], config={"train": {"steps": 10}})  # fmt: skip
    metrics.log(5, "train", VALUES)
    metrics.log(10, "eval", {"loss": {"0.15": 2.0}, "mean_loss": 2.1})
    metrics.close()
    (run,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    data = run.read_bytes()
    for key in ("train/loss", "train/accuracy", "eval/loss/0.15", "eval/mean_loss", "steps"):  # + the config
        assert key.encode() in data, key
    assert not (tmp_path / "tensorboard").exists()


def test_mlflow_records_every_scalar_and_a_resumed_run_continues_it(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    # a local store in the test's folder (a user points MLFLOW_TRACKING_URI at their server)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "biomask-test")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = {"train": {"steps": 10, "seed": 3}, "masking": {"scheme": "r2mae"}}
    first = MetricsLogger(run_dir, total_steps=10, start_step=0, enabled=True, progress=False,
                          report_to=["mlflow"], config=config)  # fmt: skip
    first.log(5, "train", VALUES)
    first.close()
    # the job is requeued: a new logger on the same directory, from step 5
    second = MetricsLogger(run_dir, total_steps=10, start_step=5, enabled=True, progress=False,
                           report_to=["mlflow"], config=config)  # fmt: skip
    second.log(10, "eval", {"loss": {"0.15": 2.0}, "mean_loss": 2.1})
    second.close()

    client = mlflow.tracking.MlflowClient()
    experiment = client.get_experiment_by_name("biomask-test")
    (run,) = client.search_runs([experiment.experiment_id])  # one run, not one per start
    assert run.data.params["train.seed"] == "3" and run.data.params["masking.scheme"] == "r2mae"
    assert run.data.metrics["train/loss"] == VALUES["loss"]
    assert run.data.metrics["eval/loss/0.15"] == 2.0 and run.data.metrics["eval/mean_loss"] == 2.1
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/accuracy")] == [5]
    assert not (run_dir / "tensorboard").exists()


def test_deepspeed_is_imported_without_mlflow_and_mlflow_still_reports_after_it(tmp_path):
    """A training process imports DeepSpeed without the mlflow import its autotuner makes (seconds
    in every process of a pipeline); a run that reports to MLflow still imports and uses it after."""
    import os
    import subprocess
    import sys

    pytest.importorskip("mlflow")
    script = (
        "import sys\n"
        "from biomask.training.distributed import import_deepspeed\n"
        "deepspeed = import_deepspeed()\n"
        "assert hasattr(deepspeed, 'initialize') and 'mlflow' not in sys.modules\n"
        "from pathlib import Path\n"
        "from biomask.training.metrics import MetricsLogger\n"
        f"logger = MetricsLogger(Path({str(tmp_path)!r}), total_steps=2, start_step=0, enabled=True,\n"
        "                       progress=False, report_to=['mlflow'], config={})\n"
        "logger.log(1, 'train', {'loss': 1.5})\n"
        "logger.close()\n"
        "assert 'mlflow' in sys.modules\n"
    )
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri(),
        "MLFLOW_ALLOW_FILE_STORE": "true",
    }
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert any((tmp_path / "mlruns").rglob("loss"))  # the metric reached the MLflow store


def test_a_notebook_kernel_sees_a_progress_bar_and_a_log_sees_none(tmp_path, monkeypatch, capsys):
    """A Jupyter kernel's stderr is no terminal, so training showed a line per 100 steps and embed
    and prep nothing at all, for minutes. The kernel's output now gets a bar; a log (no terminal, no
    kernel) still gets lines and no bar, and TQDM_DISABLE (the command line's --quiet) still wins."""
    import sys
    import types

    from biomask.progress import bar_disabled

    def train(directory):
        directory.mkdir()
        metrics = MetricsLogger(
            directory, total_steps=10, start_step=0, enabled=True, progress=True, report_to=[]
        )
        metrics.advance(4)
        metrics.log(4, "train", VALUES)
        metrics.close()
        return capsys.readouterr().err

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    logged = train(tmp_path / "log")  # stderr is captured: a pipe, as in a log file
    assert "pretrain step 4/10" in logged and "4/10 [" not in logged
    assert bar_disabled()
    # what an IPython kernel is to biomask: ipykernel loaded, and the shell has a kernel
    shell = types.SimpleNamespace(kernel=object())
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: shell))
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    shown = train(tmp_path / "kernel")
    assert "pretrain:" in shown and "4/10 [" in shown and "pretrain step 4/10" not in shown
    assert not bar_disabled()  # embed's and prep's bars
    with (tmp_path / "given.log").open("w") as given:  # a file the caller gave: no bar in it
        assert bar_disabled(given)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert bar_disabled()
    shell.kernel = None  # a terminal IPython: its stderr decides (here: no terminal)
    monkeypatch.delenv("TQDM_DISABLE")
    assert bar_disabled()


def test_deepspeed_imported_inside_a_redirect_still_logs_where_output_goes_now(tmp_path):
    """DeepSpeed binds its logger to the sys.stdout of the moment it is imported: first imported inside
    contextlib.redirect_stdout (a notebook cell's capture, a test's), every later DeepSpeed warning
    printed a "--- Logging error ---" traceback about a closed file instead (found as a test that
    failed or passed with the order tests ran in)."""
    import subprocess
    import sys

    script = (
        "import contextlib, sys\n"
        f"buffer = open({str(tmp_path / 'redirected.txt')!r}, 'w')  # a file: flushing it once closed fails\n"
        "with contextlib.redirect_stdout(buffer):\n"
        "    from biomask.training.distributed import import_deepspeed\n"
        "    import_deepspeed()\n"
        "buffer.close()\n"
        "deepspeed = import_deepspeed()  # as the next training run in the process does\n"
        "deepspeed = import_deepspeed()  # and the one after\n"
        "deepspeed.utils.logger.warning('OVERFLOW! a warning after the redirect')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "a warning after the redirect" in proc.stdout
    assert "Logging error" not in proc.stderr and "closed file" not in proc.stderr, proc.stderr[-2000:]
