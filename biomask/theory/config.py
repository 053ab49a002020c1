"""The schema of `biomask theory` configs (see configs/theory.yaml for an annotated example)."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from biomask.config import Config

Epochs = int | Literal["inf"]
MAX_TEST_RATIO = 0.95  # the q_avg metric rescales by 1/(1 − q): ×20 at most


def _default_test_ratios() -> list[float]:
    return [round(0.1 * i, 1) for i in range(10)]  # 0.0, 0.1, ..., 0.9


class CovarianceConfig(Config):
    """The joint covariance of the d + 1 features (target and context, all of unit variance).

    isotropic: Σ = I; the target is y = βᵀx + ε with β a random direction and R² = `signal`.
    spiked: all features share `spikes` latent factors of equal size that carry a fraction `signal` of
      every feature's variance (k equal spikes of ≈ signal·d/k).
    multiscale: one factor per entry of `shares`; factor k carries the share shares[k] of every
      feature's variance (target included), so the eigenvalues are ≈ shares[k]·d (+ the bulk).
    blocks: a global factor carrying `global_share` of every feature's variance plus one local factor
      per block of `block_size` consecutive features carrying `block_share` (the target is in block 1).
    """

    kind: Literal["isotropic", "spiked", "multiscale", "blocks"]
    signal: float = Field(0.8, gt=0.0, lt=1.0)  # isotropic: R²; spiked: the factors' share
    spikes: int = Field(3, ge=1)  # spiked
    shares: list[float] = Field(default_factory=lambda: [0.5, 0.05, 0.005], min_length=1)  # multiscale
    global_share: float = Field(0.3, ge=0.0, lt=1.0)  # blocks
    block_share: float = Field(0.5, gt=0.0, lt=1.0)  # blocks
    block_size: int = Field(10, ge=2)  # blocks

    @model_validator(mode="after")
    def _check(self) -> CovarianceConfig:
        if self.kind == "multiscale" and (any(s <= 0 for s in self.shares) or sum(self.shares) >= 1):
            raise ValueError(f"shares {self.shares} must be positive and sum to less than 1")
        if self.kind == "blocks" and self.global_share + self.block_share >= 1:
            raise ValueError("global_share + block_share must be below 1")
        return self

    @property
    def name(self) -> str:
        if self.kind == "spiked":
            return f"spiked-{self.spikes}"
        if self.kind == "blocks":
            return f"blocks-{self.block_size}"
        return self.kind


class TheoryConfig(Config):
    output: str = "runs/theory"
    seed: int = Field(0, ge=0)
    n: int = Field(40, ge=8)  # pretraining samples
    # model sizes γ = d/n (d = round(γ n) context features = weights per reconstructed feature);
    # γ < 1 under-parameterised, γ > 1 over-parameterised. K = ∞ (closed form) runs at every γ.
    gammas: list[float] = Field(default_factory=lambda: [0.5, 2.0, 4.0, 8.0], min_length=1)
    # the γ simulated with finitely many epochs (each must be in `gammas`)
    sim_gammas: list[float] = Field(default_factory=lambda: [0.5, 4.0])
    # passes over the n samples, each with fresh masks (and ratios); "inf": the closed form
    epochs: list[Epochs] = Field(default_factory=lambda: [1, 4, "inf"], min_length=1)
    covariances: list[CovarianceConfig] = Field(
        default_factory=lambda: [
            CovarianceConfig(kind="isotropic"),
            CovarianceConfig(kind="spiked"),
            CovarianceConfig(kind="multiscale"),
            CovarianceConfig(kind="blocks"),
        ],
        min_length=1,
    )
    # fixed ratios step, 2·step, ..., 1 − step; R²MAE: every U(a, b) with a < b on that grid
    grid_step: float = Field(0.05, gt=0.0, le=0.25)
    # how R²MAE draws the ratio at finite K: per sample, or once per batch of `batch_size` samples
    modes: list[Literal["sample", "batch"]] = Field(default_factory=lambda: ["sample", "batch"], min_length=1)
    batch_size: int = Field(10, ge=1)
    # repetitions (data and masks) on which the best fixed ratio and the best range are chosen, and
    # the independent ones on which the chosen schemes are compared (paired)
    selection_repetitions: int = Field(20, ge=2)
    test_repetitions: int = Field(100, ge=2)
    # context mask ratios of the test inputs averaged by the "q_avg" and "masked_loss" metrics
    test_ratios: list[float] = Field(default_factory=_default_test_ratios, min_length=1)
    # the few-label linear probe of each latent factor (K = ∞, factor covariances, these γ)
    probe_gammas: list[float] = Field(default_factory=lambda: [4.0])
    probe_labels: int = Field(20, ge=2)
    bootstrap: int = Field(1000, ge=10)  # resamples of repetitions for the best fixed ratio's interval
    num_workers: int = Field(2, ge=1)  # processes (one setting each); results do not depend on it

    @model_validator(mode="after")
    def _check(self) -> TheoryConfig:
        for key in ("gammas", "sim_gammas", "probe_gammas"):
            values = getattr(self, key)
            if len(set(values)) != len(values):
                raise ValueError(f"{key} are listed twice: {values}")
        for i, g in enumerate(self.gammas):  # before the lists that must name them
            if g <= 0 or self.dimension(g) < 2:
                raise ValueError(f"gammas[{i}] = {g} gives fewer than 2 features at n = {self.n}")
        dims = [self.dimension(g) for g in self.gammas]
        if len(set(dims)) != len(dims):
            raise ValueError(
                f"gammas {self.gammas} give the same number of features twice at n = {self.n} "
                f"(d = round(γ·n) = {dims}): the same setting, run twice"
            )
        for key in ("sim_gammas", "probe_gammas"):
            for i, g in enumerate(getattr(self, key)):
                if g not in self.gammas:
                    raise ValueError(f"{key}[{i}] = {g} is not one of gammas {self.gammas}")
        if self.batch_size > self.n:
            raise ValueError(
                f"batch_size = {self.batch_size} is larger than n = {self.n} (the samples per pass)"
            )
        for i, k in enumerate(self.epochs):
            if isinstance(k, int) and k < 1:
                raise ValueError(f"epochs[{i}] = {k} must be at least 1 (or inf)")
        if len(set(map(str, self.epochs))) != len(self.epochs):
            raise ValueError(f"epochs are listed twice: {self.epochs}")
        if "inf" not in self.epochs:  # the closed form: the summary's conclusion rests on it
            raise ValueError(f"epochs must include inf (the closed form, K = ∞); got {self.epochs}")
        if any(k != "inf" for k in self.epochs) and not self.sim_gammas:
            raise ValueError("finite epochs are simulated for sim_gammas: give at least one, or epochs=[inf]")
        for i, q in enumerate(self.test_ratios):
            if not 0.0 <= q <= MAX_TEST_RATIO:  # dropout rescaling 1/(1 − q) explodes towards 1
                raise ValueError(f"test_ratios[{i}] = {q} must lie in [0, {MAX_TEST_RATIO}]")
        if len(set(self.test_ratios)) != len(self.test_ratios):
            raise ValueError(f"test_ratios are listed twice: {self.test_ratios}")
        if len(self.ratio_grid()) < 2:
            raise ValueError(f"grid_step = {self.grid_step} leaves fewer than 2 ratios")
        smallest = min(self.dimension(g) for g in self.gammas)
        for i, c in enumerate(self.covariances):
            if c.kind == "spiked" and c.spikes >= smallest:
                raise ValueError(
                    f"covariances[{i}].spikes = {c.spikes} must be below the smallest d ({smallest})"
                )
        names = [c.name for c in self.covariances]
        if len(set(names)) != len(names):
            raise ValueError(f"covariances are listed twice: {names}")
        return self

    def dimension(self, gamma: float) -> int:
        return round(gamma * self.n)

    def ratio_grid(self) -> list[float]:
        """The fixed ratios: multiples of grid_step strictly between 0 and 1."""
        count = math.floor((1.0 - 1e-9) / self.grid_step)  # 0.24 -> 0.24, 0.48, 0.72, 0.96
        return [round(i * self.grid_step, 10) for i in range(1, count + 1)]
