"""Deterministic-equivalent (proportional-asymptotics) test risk of masked minimum-norm regression.

For a fixed mask ratio p the training rows z = x ⊙ (1 − m) have covariance
S = (1 − p)²Σ + p(1 − p)·I (diag Σ = 1) and cross-covariance g = (1 − p)Σβ with the target, so the
population fit is w_p = S⁻¹g with residual variance σ_p² = 1 − gᵀS⁻¹g. Treating the residual as
noise independent of z (true to first order when the masks have many entries), the minimum-norm
fit on n_eff = pn rows follows the ridgeless deterministic equivalent (e.g. Hastie, Montanari,
Rosset & Tibshirani 2022; Bach 2024): with κ ≥ 0 solving n_eff = tr S(S + κI)⁻¹ when n_eff < d
(κ = 0 otherwise),

    E ŵ           ≈ S(S + κ)⁻¹ w_p
    E ŵᵀAŵ        ≈ ‖S(S + κ)⁻¹w_p‖²_A + (σ_p² + κ² w_pᵀ(S + κ)⁻¹S(S + κ)⁻¹w_p) · df_A / (n_eff − df₂)
    df_A = tr AS(S + κ)⁻², df₂ = tr S²(S + κ)⁻²,

for the test matrix A = Σ + q/(1 − q)·I, and the risk is 1 − 2(1 − p)E ŵᵀΣβ + (1 − p)² E ŵᵀAŵ
(see `biomask.theory.model`). Every matrix here shares Σ's eigenvectors, so the formula runs on
Σ's spectrum in O(number of distinct eigenvalues). It is an approximation at finite n and d; the
study reports its distance to the simulation.
"""

from __future__ import annotations

import numpy as np


def _kappa(s: np.ndarray, mult: np.ndarray, n_eff: float) -> float:
    """The κ > 0 with Σ mult·s/(s + κ) = n_eff (requires 0 < n_eff < Σ mult).

    f(κ) = Σ mult·s/(s + κ) − n_eff is convex and decreasing, so Newton's method started at κ = 0
    (where f > 0) increases monotonically to the root without overshooting.
    """
    kappa = 0.0
    for _ in range(200):
        ratio = s / (s + kappa)
        f = float(np.sum(mult * ratio)) - n_eff
        slope = -float(np.sum(mult * ratio / (s + kappa)))
        step = -f / slope
        kappa += step
        if step <= 1e-13 * kappa:
            break
    return kappa


def masked_risk(
    spectrum: tuple[np.ndarray, np.ndarray, np.ndarray],
    mask_ratio: float,
    n_eff: float,
    eval_ratio: float = 0.0,
) -> float:
    """Deterministic-equivalent risk of the min-norm fit with context mask ratio p on n_eff rows.

    spectrum: (eigenvalues λ, multiplicities, β's energy per eigenvalue) from `Population.spectrum`.
    mask_ratio = 0 with n_eff = n gives plain (unmasked) ridgeless regression. Returns inf at the
    interpolation threshold n_eff = d, where the min-norm risk diverges.
    """
    lam, mult, energy = spectrum
    p, q = mask_ratio, eval_ratio
    d = float(mult.sum())
    if n_eff <= 0:
        return 1.0  # no training rows: ŵ = 0, the null predictor
    s = (1 - p) ** 2 * lam + p * (1 - p)
    coef = (1 - p) * lam / s  # w_p = coef·β in Σ's eigenbasis
    noise = 1.0 - float(np.sum(energy * coef * (1 - p) * lam))  # σ_p² = 1 − gᵀS⁻¹g
    w2 = energy * coef**2  # per-eigenvalue ‖w_p‖²
    if n_eff < d:
        kappa = _kappa(s, mult, n_eff)
        denom = n_eff - float(np.sum(mult * s**2 / (s + kappa) ** 2))
    else:
        kappa, denom = 0.0, n_eff - d
    if denom <= 1e-9:
        return float("inf")
    shrink = s / (s + kappa)
    a = lam + q / (1 - q)
    effective_noise = noise + kappa**2 * float(np.sum(s * w2 / (s + kappa) ** 2))
    df_a = float(np.sum(mult * a * s / (s + kappa) ** 2))
    quad = float(np.sum(a * shrink**2 * w2)) + effective_noise * df_a / denom
    cross = float(np.sum(lam * shrink * coef * energy))  # E ŵᵀΣβ
    v = 1 - p
    return 1.0 - 2.0 * v * cross + v**2 * quad


def masked_curve(
    spectrum: tuple[np.ndarray, np.ndarray, np.ndarray], ratios: np.ndarray, n: int, eval_ratio: float
) -> np.ndarray:
    """masked_risk along a grid of mask ratios, with n_eff = pn (the targets the loss sees)."""
    return np.array([masked_risk(spectrum, float(p), float(p) * n, eval_ratio) for p in ratios])
