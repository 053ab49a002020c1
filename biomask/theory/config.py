"""The schema of `biomask theory` configs (see configs/theory.yaml for an annotated example)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from biomask.config import Config


def _default_ratios() -> list[float]:
    return [round(0.05 * i, 2) for i in range(1, 20)]  # 0.05, 0.10, ..., 0.95


class CovarianceConfig(Config):
    """The covariance of the context features (all standardised to unit variance).

    isotropic: Σ = I; the target is y = βᵀx + ε with β a random direction.
    spiked: all d + 1 features (target included) share `spikes` latent factors that carry a fraction
    `signal` of every feature's variance, so Σ = LLᵀ + (1 - signal)·I has `spikes` large eigenvalues.
    """

    kind: Literal["isotropic", "spiked"]
    spikes: int = Field(3, ge=1)  # spiked only: number of latent factors

    @property
    def name(self) -> str:
        return "isotropic" if self.kind == "isotropic" else f"spiked-{self.spikes}"


class RatioRange(Config):
    """R²MAE: every training sample draws its own mask ratio from U(low, high)."""

    low: float = Field(ge=0.0, lt=1.0)
    high: float = Field(gt=0.0, lt=1.0)

    @model_validator(mode="after")
    def _ordered(self) -> RatioRange:
        if self.high <= self.low:
            raise ValueError(f"high ({self.high}) must be larger than low ({self.low})")
        return self

    @property
    def label(self) -> str:
        return f"U({self.low:g}, {self.high:g})"


class TheoryConfig(Config):
    output: str = "runs/theory"
    seed: int = 0
    n: int = Field(100, ge=4)  # pretraining samples
    # model size: d = round(gamma * n) context features (= weights per reconstructed feature);
    # gamma < 1 under-parameterised, gamma > 1 over-parameterised
    gammas: list[float] = Field(default_factory=lambda: [0.25, 0.5, 2.0, 4.0, 8.0], min_length=1)
    covariances: list[CovarianceConfig] = Field(
        default_factory=lambda: [CovarianceConfig(kind="isotropic"), CovarianceConfig(kind="spiked")],
        min_length=1,
    )
    # population R² of the target given all context features (isotropic: exactly; spiked: the
    # factors' share of each feature's variance, so R² is slightly below it for small d)
    signal: float = Field(0.8, gt=0.0, lt=1.0)
    mask_ratios: list[float] = Field(default_factory=_default_ratios, min_length=2)
    random_ratios: list[RatioRange] = Field(
        default_factory=lambda: [
            RatioRange(low=0.1, high=0.9),
            RatioRange(low=0.2, high=0.6),
            RatioRange(low=0.4, high=0.8),
            RatioRange(low=0.6, high=0.9),
        ]
    )
    repetitions: int = Field(100, ge=2)  # independent training sets (data and masks) per setting
    # fraction of the context masked when the risk is measured: 0 = full context (the default)
    eval_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    theory_points: int = Field(181, ge=2)  # grid of the deterministic-equivalent curves
    bootstrap: int = Field(1000, ge=0)  # resamples of repetitions for the optimum's interval

    @model_validator(mode="after")
    def _check(self) -> TheoryConfig:
        for i, p in enumerate(self.mask_ratios):
            if not 0.0 < p < 1.0:
                raise ValueError(f"mask_ratios[{i}] = {p} must lie strictly between 0 and 1")
        if sorted(set(self.mask_ratios)) != self.mask_ratios:
            raise ValueError("mask_ratios must be increasing, without repeats")
        for i, g in enumerate(self.gammas):
            if g <= 0 or round(g * self.n) < 2:
                raise ValueError(f"gammas[{i}] = {g} gives fewer than 2 features at n = {self.n}")
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
