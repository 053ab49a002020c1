"""The linear model of mask pretraining: population, masked training sets, the minimum-norm
estimator and its exact test risk.

Population. One target feature y is reconstructed from the d other ("context") features x:

    x ~ N(0, Σ),   y = βᵀx + ε,   ε ~ N(0, σ²),   Var(y) = βᵀΣβ + σ² = 1,   diag(Σ) = 1,

with Σ = LLᵀ + τI (isotropic: no L, τ = 1; spiked: k latent factors, see `spiked`). Studying one
target loses nothing: the linear MAE loss Σ_i Σ_{j masked in i} (x_ij − w_jᵀ(x_i ⊙ (1 − m_i)))²
is a sum of independent problems, one per reconstructed feature j.

Pretraining with mask ratio p. Every entry of every sample is masked independently with
probability p (R²MAE: sample i draws its own p_i ~ U(a, b) first). The loss counts the target of
sample i only when the target is masked, so the training set is the n_eff ≈ pn samples with
m_i,target = 1, each with the zero-filled context z_i = x_i ⊙ (1 − m_i). The estimator is the
minimum-ℓ2-norm least-squares fit ŵ = Z⁺y over those samples — the ridgeless limit, and what
gradient descent from zero converges to.

Test risk. The pretrained predictor is applied to a fresh sample with its context visible
(eval ratio q = 0, the default) or masked at ratio q. As in dropout, the weights are rescaled by
the ratio of visible fractions, c = (1 − p̄)/(1 − q), where 1 − p̄ is the expected visible fraction
of the training inputs (E[z | x] = (1 − p̄)x). Over the test point and the test mask,

    R(ŵ) = E(y − c ŵᵀ(x ⊙ v))² = 1 − 2(1 − p̄) ŵᵀΣβ + (1 − p̄)² ŵᵀ(Σ + q/(1 − q)·I)ŵ,

exact, so only the training randomness is simulated. The null predictor (ŵ = 0) has risk 1 and
the best linear predictor from the full context has risk σ² (the Bayes risk).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from biomask.theory.config import CovarianceConfig

# Relative size of the vanishing ridge used to compute minimum-norm solutions (see min_norm_solve).
_RIDGE = 1e-11


@dataclass(frozen=True)
class Population:
    """Context covariance Σ = LLᵀ + τI (unit diagonal), target coefficients β and noise σ²."""

    loadings: np.ndarray  # L, (d, k); k = 0 for the isotropic case
    tau: float  # τ, the bulk eigenvalue of Σ
    beta: np.ndarray  # (d,)
    noise: float  # σ² = Var(y | x) = the Bayes risk (Var(y) = 1)

    @property
    def d(self) -> int:
        return int(self.beta.shape[0])

    def cov_times(self, w: np.ndarray) -> np.ndarray:
        """Σw for a vector or a stack of vectors (last axis), in O(dk)."""
        return self.tau * w + (w @ self.loadings) @ self.loadings.T

    def spectrum(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Σ's distinct eigenvalues λ, their multiplicities, and β's energy Σ_{v: Σv=λv}(vᵀβ)² on each.

        The deterministic-equivalent risk depends on Σ and β only through these three arrays.
        """
        d, k = self.loadings.shape
        if k == 0:
            return np.array([self.tau]), np.array([float(d)]), np.array([float(self.beta @ self.beta)])
        u, s, _ = np.linalg.svd(self.loadings, full_matrices=False)
        spike_energy = (u.T @ self.beta) ** 2
        bulk_energy = max(float(self.beta @ self.beta - spike_energy.sum()), 0.0)
        values = np.concatenate([self.tau + s**2, [self.tau]])
        mult = np.concatenate([np.ones(k), [float(d - k)]])
        return values, mult, np.concatenate([spike_energy, [bulk_energy]])

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """n draws of (x, y): x = Lf + √τ e with f, e standard normal, y = βᵀx + σε."""
        d, k = self.loadings.shape
        x = np.sqrt(self.tau) * rng.standard_normal((n, d))
        if k:
            x += rng.standard_normal((n, k)) @ self.loadings.T
        y = x @ self.beta + np.sqrt(self.noise) * rng.standard_normal(n)
        return x, y


def isotropic(d: int, signal: float, rng: np.random.Generator) -> Population:
    """Σ = I and β a uniformly random direction with ‖β‖² = signal, so R² = signal exactly."""
    beta = rng.standard_normal(d)
    beta *= np.sqrt(signal) / np.linalg.norm(beta)
    return Population(np.zeros((d, 0)), 1.0, beta, 1.0 - signal)


def spiked(d: int, signal: float, spikes: int, rng: np.random.Generator) -> Population:
    """A k-factor model over all d + 1 features (the target is feature 0).

    Every feature is ℓᵢᵀf + √(1 − signal)·eᵢ with loadings ℓᵢ uniform on the sphere of radius √signal,
    so the joint covariance F = ℓℓᵀ + (1 − signal)I has unit diagonal and k spikes of size ≈ signal·d/k.
    The target's regression on the context follows from F: β = Σ⁻¹F_ctx,0 and σ² = 1 − βᵀF_ctx,0.
    """
    if spikes >= d:
        raise ValueError(f"a spiked covariance needs fewer spikes ({spikes}) than features ({d})")
    loadings = rng.standard_normal((d + 1, spikes))
    loadings *= np.sqrt(signal) / np.linalg.norm(loadings, axis=1, keepdims=True)
    target, context = loadings[0], loadings[1:]
    tau = 1.0 - signal
    cross = context @ target  # Cov(x, y)
    # Σ⁻¹ by Woodbury: (τI + LLᵀ)⁻¹ = (I − L(τI_k + LᵀL)⁻¹Lᵀ)/τ
    inner = np.linalg.solve(tau * np.eye(spikes) + context.T @ context, context.T @ cross)
    beta = (cross - context @ inner) / tau
    return Population(context, tau, beta, float(1.0 - beta @ cross))


def make_population(cov: CovarianceConfig, d: int, signal: float, rng: np.random.Generator) -> Population:
    if cov.kind == "isotropic":
        return isotropic(d, signal, rng)
    return spiked(d, signal, cov.spikes, rng)


# ------------------------------------------------------------------------------- training sets


def visible_fraction(low: float, high: float | None = None) -> float:
    """Expected visible fraction 1 − p̄ of the context of the samples the loss uses.

    Fixed ratio p: 1 − p. Ratio drawn per sample from U(a, b): a sample enters the loss with
    probability p (its target must be masked), so the ratios of the used samples have density ∝ p
    on [a, b] and p̄ = E[p²]/E[p] = 2(a² + ab + b²) / (3(a + b)), not (a + b)/2.
    """
    if high is None or high == low:
        return 1.0 - low
    a, b = low, high
    return 1.0 - 2.0 * (a * a + a * b + b * b) / (3.0 * (a + b))


def masked_training_set(
    x: np.ndarray, y: np.ndarray, ratios: np.ndarray, context_u: np.ndarray, target_u: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The rows the masked loss uses, zero-filled, for a stack of repetitions.

    x: (r, n, d), y: (r, n); ratios: (r, n) mask ratio of every sample; context_u (r, n, d) and
    target_u (r, n) are uniforms: entry j of sample i is masked iff u_ij < p_i. Sharing the uniforms
    between masking schemes couples them (common random numbers), which makes their paired
    comparison sharp. Returns (A, t) with the used samples first: A (r, m, d) holds x ⊙ (1 − mask)
    and t (r, m) the targets; rows past a repetition's count are zero, which leaves the
    minimum-norm solution unchanged.
    """
    used = target_u < ratios
    r, n, d = x.shape
    order = np.argsort(~used, axis=1, kind="stable")
    m = max(int(used.sum(axis=1).max()), 1)
    rows = order[:, :m]
    keep = np.take_along_axis(used, rows, axis=1)
    # gather rows through a flat index: much faster than take_along_axis broadcast over d
    flat = (np.arange(r)[:, None] * n + rows).ravel()
    p_rows = np.take_along_axis(ratios, rows, axis=1)
    visible = context_u.reshape(r * n, d)[flat].reshape(r, m, d) >= p_rows[..., None]
    a = x.reshape(r * n, d)[flat].reshape(r, m, d) * (visible & keep[..., None])
    t = np.take_along_axis(y, rows, axis=1) * keep
    return a, t


def min_norm_solve(a: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Minimum-norm least-squares solutions ŵ = A⁺t of a stack of problems A (r, m, d), t (r, m).

    Computed as the λ → 0 limit of ridge, ŵ = Aᵀ(AAᵀ + λI)⁻¹t = (AᵀA + λI)⁻¹Aᵀt, in whichever form
    has the smaller Gram matrix, with λ = 1e-11 · tr(Gram)/size: batched linear solves are an order
    of magnitude faster than batched SVDs. On the study's masked problems the result matches numpy's
    lstsq to about 1e-6 relative; on exactly rank-deficient, inconsistent systems rounding limits
    it to about 1e-5 (tests/test_theory.py checks both).
    """
    _r, m, d = a.shape
    at = np.swapaxes(a, 1, 2)
    if m <= d:
        gram = a @ at
    else:
        gram = at @ a
    size = gram.shape[-1]
    scale = np.trace(gram, axis1=1, axis2=2) / size
    lam = _RIDGE * np.maximum(scale, np.finfo(float).tiny / _RIDGE)
    gram = gram + lam[:, None, None] * np.eye(size)
    if m <= d:
        return (at @ np.linalg.solve(gram, t[..., None]))[..., 0]
    return np.linalg.solve(gram, at @ t[..., None])[..., 0]


def risk(pop: Population, w: np.ndarray, visible: float, eval_ratio: float = 0.0) -> np.ndarray:
    """Exact test risk of c·ŵ, c = visible/(1 − q), over a fresh sample and test mask (module docstring).

    w: (..., d) pretrained weights; visible: 1 − p̄ of the training inputs; eval_ratio: q.
    """
    sw = pop.cov_times(w)
    quad = np.sum(w * sw, axis=-1) + eval_ratio / (1.0 - eval_ratio) * np.sum(w * w, axis=-1)
    return 1.0 - 2.0 * visible * (sw @ pop.beta) + visible**2 * quad


def calibrated_risk(pop: Population, w: np.ndarray, eval_ratio: float = 0.0) -> np.ndarray:
    """Risk with the best scalar rescaling of ŵ instead of the dropout one (a sensitivity check:
    what a downstream probe refitting one scale would get): min_c R = 1 − (ŵᵀΣβ)² / ŵᵀ(Σ + q/(1 − q)·I)ŵ.
    """
    sw = pop.cov_times(w)
    quad = np.sum(w * sw, axis=-1) + eval_ratio / (1.0 - eval_ratio) * np.sum(w * w, axis=-1)
    cross = sw @ pop.beta
    safe = np.where(quad > 0, quad, 1.0)
    return np.where(quad > 0, 1.0 - cross**2 / safe, 1.0)
