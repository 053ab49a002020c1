"""Training metrics on rank 0: one JSON object per line in `metrics.jsonl`, the same scalars in
TensorBoard (`tensorboard/`), and a tqdm progress bar.

Each line has `step` and `kind` ("train" or "eval"). On resume, lines past the checkpoint's step
(written by the interrupted run after its last checkpoint) are dropped, so the file reads as one run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from biomask.outputs import atomic_write_text
from biomask.training.finite import DivergedError


class MetricsLogger:
    def __init__(
        self, directory: Path, *, total_steps: int, start_step: int, enabled: bool, progress: bool
    ) -> None:
        self.enabled = enabled
        self.path = directory / "metrics.jsonl"
        self.bar = None
        self.tb = None
        if not enabled:
            return
        self._truncate(start_step, total_steps)
        self.file = self.path.open("a", buffering=1)
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(
            str(directory / "tensorboard"), purge_step=start_step + 1 if start_step else None
        )
        if progress:
            self.bar = tqdm(
                total=total_steps, initial=start_step, desc="pretrain", unit="step", dynamic_ncols=True
            )

    def _truncate(self, step: int, total_steps: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
                final_eval = record.get("kind") == "eval" and record.get("step", 0) >= total_steps
                if record.get("step", 0) <= step and not final_eval:  # the final eval is redone
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
        self.file.write(line + "\n")
        assert self.tb is not None
        for key, value in values.items():
            if isinstance(value, (int, float)):
                self.tb.add_scalar(f"{kind}/{key}", value, step)
            elif isinstance(value, list) and value:
                self.tb.add_histogram(f"{kind}/{key}", torch.tensor(value), step)
            elif isinstance(value, dict):
                for sub, v in value.items():
                    if isinstance(v, (int, float)):
                        self.tb.add_scalar(f"{kind}/{key}/{sub}", v, step)
        if self.bar is not None and kind == "train":
            self.bar.set_postfix(
                loss=f"{values['loss']:.4f}",
                ratio=f"{values['ratio']:.2f}",
                tok_s=f"{values['tokens_per_s']:.0f}",
            )

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()
