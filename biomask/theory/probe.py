"""A few-label linear probe of each latent factor on the representation the linear MAE learns.

The full linear MAE reconstructs every one of the d + 1 features from the others; at K = ∞ with
ratio p (or any distribution, through its λ) feature j's weights are the generalised ridge of x_j on
the rest, which for all j at once is W = I − Θ diag(Θ)⁻¹ with Θ = (XᵀX + λ diag XᵀX)⁻¹ over all
features (the partitioned inverse; an overall scale does not matter for a least-squares probe).
The representation of a sample is its reconstruction h(x) = Wᵀx. The probe is the minimum-norm
least-squares fit of a factor f_k on h over `labels` labelled samples, and its risk
E(f_k − vᵀh(x))² (Var f_k = 1) is exact given v. Θ is never formed: with X diag(XᵀX)^(-1/2) = USVᵀ,
(VS²Vᵀ + λI)⁻¹ = (I − V diag(s²/(s² + λ))Vᵀ)/λ costs O(nd) per product.
"""

from __future__ import annotations

import numpy as np

from biomask.theory.population import Population


def probe_risks(
    pop: Population,
    train: np.ndarray,
    labelled: np.ndarray,
    factors: np.ndarray,
    lams: np.ndarray,
    probed: list[int],
) -> np.ndarray:
    """Probe risks (len(lams) + 1, len(probed)) for one repetition; the last row probes the raw
    input x itself. train: (n, d + 1) pretraining samples (target first); labelled: (m, d + 1) and
    factors (m, k) the labelled samples."""
    dsq = np.sqrt(np.sum(train * train, axis=0))
    _u, s, vt = np.linalg.svd(train / dsq, full_matrices=False)
    lam_f = pop.loadings[:, probed]  # Cov(x_full, f_k)
    ls = labelled / dsq
    ls_v = ls @ vt.T
    out = np.empty((len(lams) + 1, len(probed)))

    def exact(u: np.ndarray) -> np.ndarray:  # risks of the probes whose weights on x are u (d + 1, K)
        cross = np.sum(u * lam_f, axis=0)
        quad = np.sum((pop.loadings.T @ u) ** 2, axis=0) + pop.tau * np.sum(u * u, axis=0)
        return 1.0 - 2.0 * cross + quad

    for i, lam in enumerate(lams):
        shrink = s**2 / (s**2 + lam)
        theta_diag = (1.0 - (vt.T**2) @ shrink) / dsq**2  # λ·diag Θ
        l_theta = (ls - (ls_v * shrink) @ vt) / dsq  # λ·X_l Θ
        h = labelled - l_theta / theta_diag
        v = np.linalg.pinv(h) @ factors[:, probed]  # (d + 1, K)
        z = v / (theta_diag * dsq)[:, None]  # D^(-1/2)·v/diag Θ
        u = v - (z - vt.T @ ((vt @ z) * shrink[:, None])) / dsq[:, None]  # W v = v − Θ(v/diag Θ)
        out[i] = exact(u)
    out[-1] = exact(np.linalg.pinv(labelled) @ factors[:, probed])
    return out
