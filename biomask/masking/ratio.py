"""Mask-ratio samplers: fixed, uniform (R²MAE), beta, a discrete set, and a linear schedule.

The ratios are a handful of numbers per step, so they are drawn with a numpy `Generator` whose state
is a plain dict (checkpointed with the run). The positions themselves are drawn in torch, on the
training device (see `positions.py`).

Granularity `batch` draws one ratio per optimizer step: every rank seeds this generator identically,
so the ranks of one step agree on it, and the micro-batches of a step (gradient accumulation) share
it, so a global batch has a single ratio (R²MAE's setting) however it is split. Granularity `sample`
draws each record's own, on each rank from a stream of its own.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from biomask.masking.config import RatioConfig


class RatioSampler:
    """Draws mask ratios for a step; `state_dict()` / `load_state_dict()` make it resumable."""

    def __init__(self, cfg: RatioConfig, *, total_steps: int, seed: int, rank: int = 0) -> None:
        self.cfg = cfg
        self.total_steps = max(int(total_steps), 1)
        # granularity sample: each rank its own records' ratios (one stream for all gave every rank the
        # same draws, each ratio W times in a global batch); rank 0's stream is the one-process run's
        own = [int(rank)] if rank and cfg.granularity == "sample" else []
        self.rng = np.random.Generator(np.random.PCG64([int(seed), 0x6D61736B, *own]))  # "mask"
        self._step_ratio: tuple[int, float] | None = None  # (step, its ratio), for granularity batch

    def scheduled(self, step: int) -> float:
        """The linear schedule's ratio at `step` (start at step 0, end at the last step)."""
        frac = min(max(step, 0) / max(self.total_steps - 1, 1), 1.0)
        return self.cfg.start + (self.cfg.end - self.cfg.start) * frac

    def _draw(self, n: int) -> np.ndarray:
        cfg = self.cfg
        if cfg.kind == "fixed":
            return np.full(n, cfg.value)
        if cfg.kind == "uniform":
            return self.rng.uniform(cfg.low, cfg.high, size=n)
        if cfg.kind == "beta":
            return cfg.low + (cfg.high - cfg.low) * self.rng.beta(cfg.a, cfg.b, size=n)
        if cfg.kind == "discrete":
            return self.rng.choice(np.asarray(cfg.values, dtype=np.float64), size=n)
        raise AssertionError(cfg.kind)

    def sample(self, step: int, batch_size: int) -> np.ndarray:
        """One ratio per record of a batch (all equal when the granularity is `batch`)."""
        if self.cfg.kind == "linear":
            return np.full(batch_size, self.scheduled(step))
        if self.cfg.granularity == "batch":
            # drawn per call, a step of 2 accumulated micro-batches trained on two ratios, and the
            # ratio logged for it (their mean) was no batch's: a run split to save memory trained on
            # a narrower distribution than the same run unsplit
            if self._step_ratio is None or self._step_ratio[0] != step:
                self._step_ratio = (step, float(self._draw(1)[0]))
            return np.full(batch_size, self._step_ratio[1])
        return self._draw(batch_size)

    def expected(self, step: int = 0) -> float:
        """The mean ratio the sampler draws (at `step` for the schedule)."""
        cfg = self.cfg
        return {
            "fixed": cfg.value,
            "uniform": (cfg.low + cfg.high) / 2,
            "beta": cfg.low + (cfg.high - cfg.low) * cfg.a / (cfg.a + cfg.b),
            "discrete": float(np.mean(cfg.values)),
            "linear": self.scheduled(step),
        }[cfg.kind]

    def state_dict(self) -> dict[str, Any]:
        return {"bit_generator": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["bit_generator"]
