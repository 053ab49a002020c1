"""Mask-ratio distributions: a fixed p or R²MAE's U(a, b), their moments, and the fixed ratio p′ a
distribution is equivalent to when training runs to convergence on fresh masks (K = ∞).

With every context entry masked with probability p and the loss on the target only when it is
masked, the expected loss of sample i over the masks is
p·[(yᵢ − (1 − p)wᵀxᵢ)² + p(1 − p)Σⱼ wⱼ²xᵢⱼ²]; averaging over p ~ D (per sample or per batch alike)
gives the normal equations (A XᵀX + B diag XᵀX) w = C Xᵀy with A = E[p(1 − p)²], B = E[p²(1 − p)],
C = E[p(1 − p)] = A + B. So D acts only through λ = B/A: divided by A, its equations read
(XᵀX + λ diag XᵀX) w = (C/A) Xᵀy, and those of the fixed ratio p′ = λ/(1 + λ) = B/C are the same
ones, the same C/A = 1/(1 − p′) included: the two give one estimator, not two that differ by a
scale. Its output scale relative to the generalised ridge (XᵀX + λ diag XᵀX)⁻¹Xᵀy is
c* = A/C = 1 − p′ (for a fixed p: 1 − p, dropout's).

That loss sums over the masked targets, each sample weighing the same. A loss *averaged* over a
batch's masked entries (biomask's neural losses) weighs a batch masked at p by 1/(its masked count)
∝ 1/p when the ratio is drawn once per batch: then A, B, C become E[(1 − p)²], E[p(1 − p)],
E[1 − p] — still C = A + B, so still exactly one fixed ratio, but another one:
p′ = E[p(1 − p)]/E[1 − p] (`equivalent_batch_mean`; U(0.1, 0.9): 0.393, not 0.5). Drawn per sample,
a batch's masked count barely varies and `equivalent` stands.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# Gauss-Legendre with 12 nodes: exact for polynomials of degree ≤ 23 (the moments here have ≤ 6)
_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(12)


@dataclass(frozen=True)
class RatioDist:
    """A fixed mask ratio (low == high) or the uniform distribution U(low, high)."""

    low: float
    high: float

    @classmethod
    def fixed(cls, p: float) -> RatioDist:
        return cls(p, p)

    @property
    def is_fixed(self) -> bool:
        return self.low == self.high

    @property
    def label(self) -> str:
        return f"p = {self.low:g}" if self.is_fixed else f"U({self.low:g}, {self.high:g})"

    def nodes(self) -> tuple[np.ndarray, np.ndarray]:
        """Quadrature nodes on [low, high] and weights summing to 1 (one node for a fixed ratio)."""
        if self.is_fixed:
            return np.array([self.low]), np.array([1.0])
        half = (self.high - self.low) / 2
        return self.low + half * (_NODES + 1), _WEIGHTS / 2

    def expect(self, g: Callable[[np.ndarray], np.ndarray]) -> float:
        p, w = self.nodes()
        return float(np.sum(w * g(p)))

    def moments(self, weight: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[float, float, float]:
        """(A, B, C) = (E[h p(1 − p)²], E[h p²(1 − p)], E[h p(1 − p)]), h = weight(p) (default 1: a
        summed loss; 1/p: a batch-mean loss with the ratio drawn per batch)."""
        h = weight or (lambda p: np.ones_like(p))
        a = self.expect(lambda p: h(p) * p * (1 - p) ** 2)
        b = self.expect(lambda p: h(p) * p**2 * (1 - p))
        return a, b, a + b

    @property
    def ridge(self) -> float:
        """λ = B/A of the K = ∞ generalised ridge."""
        a, b, _ = self.moments()
        return b / a

    @property
    def equivalent(self) -> float:
        """p′ = λ/(1 + λ) = B/C: the fixed ratio with the same K = ∞ estimator (scale included)."""
        _, b, c = self.moments()
        return b / c

    @property
    def equivalent_batch_mean(self) -> float:
        """p′ for a loss averaged over a batch's masked entries with the ratio drawn per batch (each
        batch weighs 1/p): E[p(1 − p)]/E[1 − p]. A fixed ratio is its own p′ either way."""
        _, b, c = self.moments(lambda p: 1.0 / p)
        return b / c

    @property
    def scale(self) -> float:
        """c* = E[p(1 − p)²]/E[p(1 − p)]: the consistent dropout-style output scale (= 1 − p′)."""
        a, _, c = self.moments()
        return a / c

    @property
    def size_biased_visible(self) -> float:
        """1 − E[p²]/E[p]: the mean visible fraction of the samples the loss uses (the scale the
        previous study used; not the one consistent with the mixture's estimator)."""
        return 1.0 - self.expect(lambda p: p**2) / self.expect(lambda p: p)


def ranges(fixed: list[RatioDist]) -> list[RatioDist]:
    """Every U(a, b) with a < b on the grid of fixed ratios."""
    ps = [f.low for f in fixed]
    return [RatioDist(a, b) for i, a in enumerate(ps) for b in ps[i + 1 :]]
