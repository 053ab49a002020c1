"""The pretrained estimators: masked minimum-norm least squares after K passes of fresh masks over
the n samples (K finite: simulated), and its K = ∞ limit in closed form.

Two models reconstruct the target y from the zero-filled context z = x ⊙ (1 − m):
- zero-fill: ŷ = wᵀz (today's linear MAE);
- mask-aware: ŷ = f·aᵀz + (1 − f)·bᵀz, where f = 1 − p is the visible fraction the input was masked
  to (the model is told its ratio), i.e. a model whose output can depend on how much it sees.
Training uses the rows whose target is masked (about pn per pass); the fit is the minimum-ℓ2-norm
least-squares solution (the ridgeless limit, what gradient descent from zero finds).

K = ∞ (the expected loss over masks, see `ratios`): zero-fill is the generalised ridge
ŵ = (C/A)(XᵀX + λD)⁻¹Xᵀy, D = diag XᵀX. The mask-aware model's normal equations are
(M₁ ⊗ XᵀX + M₂ ⊗ D)(a; b) = r ⊗ Xᵀy with φ = (1 − p, p), M₁ = E[p(1 − p)²φφᵀ], M₂ = E[p²(1 − p)φφᵀ],
r = E[p(1 − p)φ]; a congruence T that diagonalises M₁ and M₂ together splits them into two
generalised ridges. For a fixed ratio only (1 − p)a + pb is determined; the minimum-norm (a, b) is
taken, which is what the finite-K min-norm fit gives too.
"""

from __future__ import annotations

import numpy as np

from biomask.theory.ratios import RatioDist

# Relative size of the vanishing ridge used to compute minimum-norm solutions (see min_norm_solve).
_RIDGE = 1e-11


# ------------------------------------------------------------------------------------ K = ∞


class DualRidge:
    """(XᵀX + λ diag XᵀX)⁻¹Xᵀy for a stack of data sets (r, n, d) and any λ > 0, from one thin SVD of
    X diag(XᵀX)^(-1/2) per data set: O(min(n, d)·nd) once, then O(nd) per λ."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.dinv = 1.0 / np.sqrt(np.sum(x * x, axis=1))  # (r, d)
        u, s, vt = np.linalg.svd(x * self.dinv[:, None, :], full_matrices=False)
        self.s, self.vt = s, vt
        self.uty = np.einsum("rnk,rn->rk", u, y)

    def solve(self, lams: np.ndarray) -> np.ndarray:
        """(r, len(lams), d)."""
        lams = np.asarray(lams, dtype=float)
        coef = self.s[:, None, :] * self.uty[:, None, :] / (self.s[:, None, :] ** 2 + lams[None, :, None])
        return (coef @ self.vt) * self.dinv[:, None, :]


def closed_form(ridge: DualRidge, dists: list[RatioDist]) -> np.ndarray:
    """Zero-fill K = ∞ estimators (r, len(dists), d): (C/A)(XᵀX + λD)⁻¹Xᵀy."""
    lams = np.array([dist.ridge for dist in dists])
    scale = np.array([dist.scale for dist in dists])
    return ridge.solve(lams) / scale[None, :, None]


def closed_form_aware(ridge: DualRidge, dist: RatioDist) -> tuple[np.ndarray, np.ndarray]:
    """Mask-aware K = ∞ estimator (a, b), each (r, d)."""
    if dist.is_fixed:
        p = dist.low
        w = closed_form(ridge, [dist])[:, 0]
        norm = (1 - p) ** 2 + p**2
        return (1 - p) * w / norm, p * w / norm
    p, wt = dist.nodes()
    phi = np.stack([1 - p, p])  # (2, nodes)
    m1 = (phi * wt * p * (1 - p) ** 2) @ phi.T
    m2 = (phi * wt * p**2 * (1 - p)) @ phi.T
    r = phi @ (wt * p * (1 - p))
    rinv = np.linalg.inv(np.linalg.cholesky(m2))
    mu, q = np.linalg.eigh(rinv @ m1 @ rinv.T)
    t = rinv.T @ q  # TᵀM₂T = I, TᵀM₁T = diag(μ)
    rho = t.T @ r
    eta = ridge.solve(1.0 / mu) * (rho / mu)[None, :, None]  # (r, 2, d)
    theta = np.einsum("ij,rjd->rid", t, eta)
    return theta[:, 0], theta[:, 1]


# ------------------------------------------------------------------------------------ K finite


def epoch_ratios(
    dist: RatioDist, mode: str, sample_u: np.ndarray, batch_u: np.ndarray, batch_size: int
) -> np.ndarray:
    """The ratio of every (repetition, epoch, sample), (r, K, n): fixed; drawn per sample from the
    uniforms sample_u (r, K, n); or per batch of `batch_size` consecutive samples from batch_u (r, K, b)."""
    if dist.is_fixed:
        return np.full(sample_u.shape, dist.low)
    if mode == "sample":
        u = sample_u
    else:
        u = batch_u[:, :, np.arange(sample_u.shape[2]) // batch_size]
    return dist.low + (dist.high - dist.low) * u


def masked_training_set(
    x: np.ndarray, y: np.ndarray, ratios: np.ndarray, context_u: np.ndarray, target_u: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rows the masked loss uses over K passes, zero-filled, for a stack of repetitions.

    x: (r, n, d), y: (r, n); ratios, target_u: (r, K, n); context_u: (r, K, n, d). Entry j of sample i
    in pass k is masked iff context_u < ratio; the target iff target_u < ratio. Sharing the uniforms
    between masking schemes couples them (common random numbers), which makes paired comparisons
    sharp. Returns (Z, t, f): Z (r, m, d) the used rows, t (r, m) their targets, f (r, m) their
    visible fraction 1 − p; rows past a repetition's count are zero (f = 0), which leaves the
    minimum-norm solution unchanged.
    """
    r, k, n, d = context_u.shape
    used = (target_u < ratios).reshape(r, k * n)
    ratios = ratios.reshape(r, k * n)
    order = np.argsort(~used, axis=1, kind="stable")
    m = max(int(used.sum(axis=1).max()), 1)
    rows = order[:, :m]
    keep = np.take_along_axis(used, rows, axis=1)
    p_rows = np.take_along_axis(ratios, rows, axis=1)
    flat = (np.arange(r)[:, None] * (k * n) + rows).ravel()
    visible = context_u.reshape(r * k * n, d)[flat].reshape(r, m, d) >= p_rows[..., None].astype(
        context_u.dtype
    )
    sample = rows % n  # pass k of sample i is flat row k·n + i
    flat_x = (np.arange(r)[:, None] * n + sample).ravel()
    z = x.reshape(r * n, d)[flat_x].reshape(r, m, d) * (visible & keep[..., None])
    t = np.take_along_axis(y, sample, axis=1) * keep
    return z, t, np.where(keep, 1.0 - p_rows, 0.0)


def _regularise(gram: np.ndarray) -> np.ndarray:
    """Adds the vanishing ridge to the diagonal, in place (gram is a fresh array)."""
    size = gram.shape[-1]
    diag = np.einsum("rii->ri", gram)  # a writable view of the diagonals
    lam = _RIDGE * np.maximum(diag.sum(axis=1) / size, np.finfo(float).tiny / _RIDGE)
    diag += lam[:, None]
    return gram


def min_norm_solve(a: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Minimum-norm least-squares solutions ŵ = A⁺t of a stack of problems A (r, m, d), t (r, m).

    The λ → 0 limit of ridge, Aᵀ(AAᵀ + λI)⁻¹t = (AᵀA + λI)⁻¹Aᵀt, in whichever form has the smaller
    Gram matrix, with λ = 1e-11 · tr(Gram)/size: batched solves are much faster than batched SVDs and
    match numpy's lstsq to ~1e-6 relative on these problems (tests/test_theory.py).
    """
    _r, m, d = a.shape
    at = np.swapaxes(a, 1, 2)
    if m <= d:
        return (at @ np.linalg.solve(_regularise(a @ at), t[..., None]))[..., 0]
    return np.linalg.solve(_regularise(at @ a), at @ t[..., None])[..., 0]


def fit_both(z: np.ndarray, t: np.ndarray, f: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Min-norm fits of both models on the same rows: w (zero-fill), and (a, b) (mask-aware, whose
    features are [f·z, (1 − f)·z]). When m ≤ d both come from the m × m Gram matrix ZZᵀ: the
    mask-aware one is (ffᵀ + (1 − f)(1 − f)ᵀ) ⊙ ZZᵀ."""
    _r, m, d = z.shape
    g = 1.0 - f
    if m > d:
        w = min_norm_solve(z, t)
        theta = min_norm_solve(np.concatenate([f[..., None] * z, g[..., None] * z], axis=2), t)
        return w, theta[..., :d], theta[..., d:]
    zt = np.swapaxes(z, 1, 2)
    gram = z @ zt
    weights = f[:, :, None] * f[:, None, :] + g[:, :, None] * g[:, None, :]
    weights *= gram
    w = (zt @ np.linalg.solve(_regularise(gram), t[..., None]))[..., 0]
    alpha = np.linalg.solve(_regularise(weights), t[..., None])[..., 0]
    a = (zt @ (f * alpha)[..., None])[..., 0]
    b = (zt @ (g * alpha)[..., None])[..., 0]
    return w, a, b
