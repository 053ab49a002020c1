"""The population of the linear model: d + 1 jointly Gaussian features of unit variance, one of them
(the target y, feature 0) reconstructed from the d others (the context x).

Studying one target loses nothing: the linear MAE loss Σ_i Σ_{j masked in i} (x_ij − w_jᵀ(x_i ⊙ (1 − m_i)))²
is a sum of independent regressions, one per reconstructed feature. Factor covariances write every
feature as ℓᵢᵀf + √τ eᵢ (f, e standard normal), so the joint covariance is F = ΛΛᵀ + τI with unit
diagonal; the context covariance is Σ = LLᵀ + τI (L = Λ without row 0), y = βᵀx + ε with
β = Σ⁻¹Cov(x, y) and σ² = Var(y | x), the Bayes risk. The latent factors f are what the probe predicts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from biomask.theory.config import CovarianceConfig


@dataclass(frozen=True)
class Population:
    """Joint loadings Λ ((d + 1) × k, row 0 = the target; k = 0: isotropic), bulk τ, β and σ²."""

    loadings: np.ndarray
    tau: float
    beta: np.ndarray  # (d,)
    noise: float  # σ² = Var(y | x), Var(y) = 1
    factor_names: tuple[str, ...] = ()

    @property
    def d(self) -> int:
        return int(self.beta.shape[0])

    @property
    def context(self) -> np.ndarray:
        return self.loadings[1:]

    def cov_times(self, w: np.ndarray) -> np.ndarray:
        """Σw for a vector or a stack of vectors (last axis), in O(dk)."""
        ctx = self.context
        return self.tau * w + (w @ ctx) @ ctx.T

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """n draws of (x, y, f): context (n, d), target (n,), latent factors (n, k)."""
        k = self.loadings.shape[1]
        if k == 0:
            x = rng.standard_normal((n, self.d))
            y = x @ self.beta + np.sqrt(self.noise) * rng.standard_normal(n)
            return x, y, np.zeros((n, 0))
        f = rng.standard_normal((n, k))
        full = f @ self.loadings.T + np.sqrt(self.tau) * rng.standard_normal((n, self.d + 1))
        return full[:, 1:], full[:, 0], f


def isotropic(d: int, signal: float, rng: np.random.Generator) -> Population:
    """Σ = I and β a uniformly random direction with ‖β‖² = signal, so R² = signal exactly."""
    beta = rng.standard_normal(d)
    beta *= np.sqrt(signal) / np.linalg.norm(beta)
    return Population(np.zeros((d + 1, 0)), 1.0, beta, 1.0 - signal)


def factor_model(loadings: np.ndarray, names: tuple[str, ...]) -> Population:
    """The population of joint loadings Λ whose rows all have the same norm (the rest is the bulk τ)."""
    tau = 1.0 - float(np.sum(loadings[0] ** 2))
    target, context = loadings[0], loadings[1:]
    k = loadings.shape[1]
    cross = context @ target  # Cov(x, y)
    # Σ⁻¹ by Woodbury: (τI + LLᵀ)⁻¹ = (I − L(τI_k + LᵀL)⁻¹Lᵀ)/τ
    inner = np.linalg.solve(tau * np.eye(k) + context.T @ context, context.T @ cross)
    beta = (cross - context @ inner) / tau
    return Population(loadings, tau, beta, float(1.0 - beta @ cross), names)


def spiked(d: int, signal: float, spikes: int, rng: np.random.Generator) -> Population:
    """k equal spikes: loadings uniform on the sphere of radius √signal (spikes ≈ signal·d/k)."""
    if spikes >= d:
        raise ValueError(f"a spiked covariance needs fewer spikes ({spikes}) than features ({d})")
    lam = rng.standard_normal((d + 1, spikes))
    lam *= np.sqrt(signal) / np.linalg.norm(lam, axis=1, keepdims=True)
    return factor_model(lam, tuple(f"factor {i + 1}" for i in range(spikes)))


def multiscale(d: int, shares: list[float], rng: np.random.Generator) -> Population:
    """Factor k loads every feature (target included) with ±√shares[k]: eigenvalues ≈ shares[k]·d + τ."""
    signs = rng.choice([-1.0, 1.0], size=(d + 1, len(shares)))
    return factor_model(signs * np.sqrt(shares), tuple(f"share {s:g}" for s in shares))


def blocks(
    d: int, global_share: float, block_share: float, size: int, rng: np.random.Generator
) -> Population:
    """A global factor on every feature plus one local factor per block of `size` consecutive features
    (the target, feature 0, is in block 1 with size − 1 context features)."""
    count = -(-(d + 1) // size)
    lam = np.zeros((d + 1, 1 + count))
    lam[:, 0] = np.sqrt(global_share) * rng.choice([-1.0, 1.0], size=d + 1)
    rows = np.arange(d + 1)
    lam[rows, 1 + rows // size] = np.sqrt(block_share) * rng.choice([-1.0, 1.0], size=d + 1)
    names = ("global", "block 1 (the target's)", *(f"block {i + 1}" for i in range(1, count)))
    return factor_model(lam, names)


def make_population(cov: CovarianceConfig, d: int, rng: np.random.Generator) -> Population:
    if cov.kind == "isotropic":
        return isotropic(d, cov.signal, rng)
    if cov.kind == "spiked":
        return spiked(d, cov.signal, cov.spikes, rng)
    if cov.kind == "multiscale":
        return multiscale(d, cov.shares, rng)
    return blocks(d, cov.global_share, cov.block_share, cov.block_size, rng)


def probed_factors(pop: Population) -> list[int]:
    """The factors the probe predicts: all of them, except only the first two blocks of `blocks`
    (the others are alike)."""
    k = pop.loadings.shape[1]
    if pop.factor_names and pop.factor_names[0] == "global":
        return list(range(min(k, 3)))
    return list(range(k))
