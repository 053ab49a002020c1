"""Training metrics on rank 0: one JSON object per line in `metrics.jsonl`, the same scalars in
TensorBoard (`tensorboard/`), and progress on stderr: a tqdm bar on a terminal; elsewhere (an sbatch
log, a pipeline's log file) one timestamped line per logged step (`train.log_every`), local time with
its UTC offset:

    [2025-05-01 12:00:00+0200] pretrain step 300/3000 (10.0%) loss 2.3411 acc 0.312 tok/s 41,230 ETA 0:41:10 gpu 3.2 GiB

Each line has `step` and `kind` ("train" or "eval"). On resume, lines past the checkpoint's step
(written by the interrupted run after its last checkpoint) are dropped, so the file reads as one run.

Where the scalars go besides `metrics.jsonl` is `train.report_to`, like the HF Trainer's `report_to`:
`tensorboard` (the default), `wandb`, `mlflow`. Weights & Biases and MLflow are optional packages,
imported only when asked for, and configured the way their users expect (`WANDB_PROJECT`, `wandb
login`; `MLFLOW_TRACKING_URI`, `MLFLOW_EXPERIMENT_NAME`); a run requeued on SLURM continues the same
W&B run (its id is derived from the output directory).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib
import importlib.util
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from biomask.errors import ConfigError, InputError
from biomask.outputs import append_own, atomic_write_text
from biomask.progress import shows_bar
from biomask.training.finite import DivergedError

TRACKERS = ("tensorboard", "wandb", "mlflow")


def check_trackers(report_to: Sequence[str]) -> None:
    """Before a run writes anything: every tracker asked for is installed."""
    missing = [name for name in report_to if name != "tensorboard" and importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(
            f"train.report_to lists {', '.join(missing)}, which is not installed: "
            f"pip install {' '.join(missing)} (or remove it from train.report_to)"
        )


def _run_id(directory: Path) -> str:
    """A tracker's id for the run writing to `directory`: the same after a resume or a requeue."""
    return hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:16]


class WandbTracker:
    def __init__(self, directory: Path, config: dict[str, Any]) -> None:
        wandb = importlib.import_module("wandb")
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "biomask"),
            name=directory.name,
            id=_run_id(directory),
            resume="allow",
            dir=str(directory),
            config=config,
        )

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    """One MLflow run per output directory: a resumed or requeued run finds its run again by the tag
    `biomask.run_id` (derived from the directory, like the W&B id) and continues it."""

    def __init__(self, directory: Path, config: dict[str, Any]) -> None:
        self.mlflow = importlib.import_module("mlflow")
        experiment = self.mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "biomask"))
        run_id = _run_id(directory)
        earlier = self.mlflow.search_runs(
            experiment_ids=[experiment.experiment_id],
            filter_string=f"tags.`biomask.run_id` = '{run_id}'",
            output_format="list",
            max_results=1,
        )
        if earlier:
            self.mlflow.start_run(run_id=earlier[0].info.run_id)
        else:
            self.mlflow.start_run(run_name=directory.name, tags={"biomask.run_id": run_id})
            self.mlflow.log_params(_flat(config))  # parameters cannot change once logged

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(scalars, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


EXTERNAL_TRACKERS = {"wandb": WandbTracker, "mlflow": MlflowTracker}


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def scalars(kind: str, values: dict[str, Any]) -> dict[str, float]:
    """The numbers of one metrics line as `kind/key` (and `kind/key/sub` for per-ratio dicts)."""
    out: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, (int, float)):
            out[f"{kind}/{key}"] = value
        elif isinstance(value, dict):
            for sub, v in value.items():
                if isinstance(v, (int, float)):
                    out[f"{kind}/{key}/{sub}"] = v
    return out


class MetricsLogger:
    def __init__(
        self,
        directory: Path,
        *,
        total_steps: int,
        start_step: int,
        enabled: bool,
        progress: bool,
        stream: Any = None,
        report_to: Sequence[str] = ("tensorboard",),
        config: dict[str, Any] | None = None,
    ) -> None:
        """`progress`: a tqdm bar when `stream` (default: stderr) is a terminal or a notebook kernel's
        output (biomask.progress), else one line per
        logged step on it. `report_to`: the trackers besides metrics.jsonl; `config` is what they
        record as the run's parameters."""
        self.enabled = enabled
        self.failed = False
        self.path = directory / "metrics.jsonl"
        self.bar = None
        self.tb = None
        self.trackers: list[Any] = []
        self.stream = stream if stream is not None else sys.stderr
        self.lines = False
        self.total_steps, self.start_step = total_steps, start_step
        self.started = time.perf_counter()
        if not enabled:
            return
        self._truncate(start_step, total_steps)
        self.file = append_own(self.path)  # a link left at its name is refused, not written through
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            if (directory / "tensorboard").is_symlink():
                raise InputError(
                    f"{directory / 'tensorboard'} is a symbolic link; biomask writes the run's TensorBoard "
                    "events there itself, never through a link: remove it and run again"
                )

            self.tb = SummaryWriter(
                str(directory / "tensorboard"), purge_step=start_step + 1 if start_step else None
            )
        check_trackers(report_to)
        self.trackers = [
            EXTERNAL_TRACKERS[name](directory, config or {})
            for name in report_to
            if name in EXTERNAL_TRACKERS
        ]
        if progress and shows_bar(self.stream):
            self.bar = tqdm(
                total=total_steps,
                initial=start_step,
                desc="pretrain",
                unit="step",
                dynamic_ncols=True,
                file=self.stream,
            )
        elif progress:
            self.lines = True  # a log: a bar would print every refresh as a line

    def _truncate(self, step: int, total_steps: int) -> None:
        if not self.path.is_file() or self.path.is_symlink():
            return  # a link is refused as the file is opened
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    continue  # not a line biomask wrote
                at = record.get("step", 0)
                if not isinstance(at, int):
                    continue
                final_eval = record.get("kind") == "eval" and at >= total_steps
                if at <= step and not final_eval:  # the final eval is redone
                    kept.append(line)
            except ValueError:
                continue  # a line cut short by a kill
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def log(self, step: int, kind: str, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:  # strict JSON: NaN / Infinity would make the file unreadable (finite.py stops the run first)
            line = json.dumps({"step": step, "kind": kind, **values}, allow_nan=False)
        except ValueError:
            raise DivergedError(f"pretrain: a non-finite {kind} metric at step {step}: {values}") from None
        try:
            self.file.write(line + "\n")
        except OSError as exc:  # a full disk: a write's error names no file
            self.failed = True
            raise OSError(exc.errno, exc.strerror, str(self.path)) from None
        numbers = scalars(kind, values)
        if self.tb is not None:
            for key, value in numbers.items():
                self.tb.add_scalar(key, value, step)
            for key, value in values.items():
                if isinstance(value, list) and value:
                    self.tb.add_histogram(f"{kind}/{key}", torch.tensor(value), step)
        for tracker in self.trackers:
            tracker.log(numbers, step)
        if self.bar is not None and kind == "train":
            self.bar.set_postfix(
                loss=f"{values['loss']:.4f}",
                ratio=f"{values['ratio']:.2f}",
                tok_s=f"{values['tokens_per_s']:.0f}",
            )

        if self.lines:
            self._line(step, kind, values)

    def _line(self, step: int, kind: str, values: dict[str, Any]) -> None:
        """One timestamped line for a log without a terminal."""
        # local time with its offset: a bare local time ran backwards at a daylight-saving change
        # and could not be matched with run.json's UTC times or a scheduler's log
        stamp = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S%z")
        total = self.total_steps
        if kind == "eval":
            loss = values.get("mean_loss")
            shown = f" held-out loss {loss:.4f} (mean over ratios)" if isinstance(loss, (int, float)) else ""
            print(f"[{stamp}] pretrain eval at step {step}/{total}{shown}", file=self.stream, flush=True)
            return
        parts = [f"[{stamp}] pretrain step {step}/{total} ({100 * step / max(total, 1):.1f}%)"]
        if isinstance(values.get("loss"), (int, float)):
            parts.append(f"loss {values['loss']:.4f}")
        if isinstance(values.get("accuracy"), (int, float)):
            parts.append(f"acc {values['accuracy']:.3f}")
        if isinstance(values.get("tokens_per_s"), (int, float)):
            parts.append(f"tok/s {values['tokens_per_s']:,.0f}")
        done = step - self.start_step
        if done > 0 and step < total:
            remaining = (time.perf_counter() - self.started) / done * (total - step)
            parts.append(f"ETA {_dt.timedelta(seconds=round(remaining))}")
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            parts.append(f"gpu {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
        print(" ".join(parts), file=self.stream, flush=True)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        """Closed on the way out of a run, failed or not. After a write failed (its error, naming the
        file, is on its way), closing does not raise again: a second error from the same full disk
        hid the first, and named no file."""
        if not self.enabled:
            return
        errors = []
        for close, path in (
            (self.file.close, self.path),
            (self.tb and self.tb.close, self.path.parent / "tensorboard"),
        ):
            try:
                if close is not None:
                    close()
            except OSError as exc:
                errors.append(OSError(exc.errno, exc.strerror, str(path)))
        try:
            for tracker in self.trackers:  # each closed, whichever fails (a tracker's dead network)
                try:
                    tracker.close()
                except Exception as exc:
                    errors.append(exc)
        finally:
            if self.bar is not None:
                self.bar.close()
        if errors and not self.failed:
            raise errors[0]
