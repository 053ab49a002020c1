"""Exact test metrics of a pretrained linear predictor (expectations over a fresh sample and its test
mask, so only the training randomness is simulated), all divided by Var(y) = 1: 1 is the null
predictor, σ² the Bayes risk.

A predictor s·wᵀ(x ⊙ v) on a test input masked at ratio q has risk
R(s, q) = 1 − 2s(1 − q)·wᵀΣβ + s²[(1 − q)²·wᵀΣw + q(1 − q)·‖w‖²]   (diag Σ = 1).

Zero-fill model, weights w, trained with ratio distribution D (c* = D.scale = 1 − p′):
- best_scalar: min_s R(s, 0) = 1 − (wᵀΣβ)²/wᵀΣw — the primary metric: the full-context risk after
  the one scale a downstream refit would choose; scale-free, so it compares directions only.
- full_context: R(c*, 0) — dropout's rescaling with the scale consistent with D's estimator.
- q_avg: the mean over the test ratios q of R(c*/(1 − q), q) — plain model + dropout rescaling.
- masked_loss: the mean over the test ratios of R(1, q) — the held-out pretraining (reconstruction)
  loss of the raw output, every scheme scored at the same ratios (matched).
- own_loss: E_{p~D}[p·R(1, p)]/E[p] — the held-out loss at the scheme's own training ratios (what a
  training log shows; not comparable between schemes, reported only).
Mask-aware model (a, b): at test ratio q its weights are w_q = (1 − q)a + q·b, its output is raw:
- aware_full: R(1, 0) with w = a;  aware_q_avg: the mean over q of its risk at q.
"""

from __future__ import annotations

import numpy as np

from biomask.theory.population import Population
from biomask.theory.ratios import RatioDist

# the metrics the selection runs on, in the order the summary lists them
ZERO_FILL = ("best_scalar", "full_context", "q_avg", "masked_loss")
AWARE = ("aware_full", "aware_q_avg")
SELECTED = ZERO_FILL + AWARE
REPORTED = (*SELECTED, "own_loss")

DESCRIPTION = {
    "best_scalar": "full-context risk after the best scalar rescaling (primary)",
    "full_context": "full-context risk with the dropout-style scale c*",
    "q_avg": "risk averaged over test ratios, plain model + dropout rescaling c*/(1 − q)",
    "masked_loss": "held-out pretraining loss (raw output) averaged over the test ratios",
    "aware_full": "mask-aware model: full-context risk",
    "aware_q_avg": "mask-aware model: risk averaged over test ratios",
    "own_loss": "held-out pretraining loss at the scheme's own ratios (not comparable)",
}


def forms(pop: Population, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(wᵀΣβ, wᵀΣw, ‖w‖²) over the last axis."""
    sw = pop.cov_times(w)
    return sw @ pop.beta, np.sum(w * sw, axis=-1), np.sum(w * w, axis=-1)


def risk(forms: tuple[np.ndarray, ...], scale: float | np.ndarray, q: float) -> np.ndarray:
    cross, quad, sq = forms
    v = 1.0 - q
    return 1.0 - 2.0 * scale * v * cross + scale**2 * (v * v * quad + q * v * sq)


def best_scalar(forms: tuple[np.ndarray, ...]) -> np.ndarray:
    cross, quad, _ = forms
    safe = np.where(quad > 0, quad, 1.0)
    return np.where(quad > 0, 1.0 - cross**2 / safe, 1.0)


def zero_fill(
    pop: Population, w: np.ndarray, dist: RatioDist, test_ratios: list[float]
) -> dict[str, np.ndarray]:
    """The zero-fill metrics of weights w (..., d) trained with `dist`."""
    f = forms(pop, w)
    c = dist.scale
    p, wt = dist.nodes()
    own = sum(wi * pi * risk(f, 1.0, float(pi)) for pi, wi in zip(p, wt)) / float(np.sum(wt * p))
    return {
        "best_scalar": best_scalar(f),
        "full_context": risk(f, c, 0.0),
        "q_avg": np.mean([risk(f, c / (1 - q), q) for q in test_ratios], axis=0),
        "masked_loss": np.mean([risk(f, 1.0, q) for q in test_ratios], axis=0),
        "own_loss": own,
    }


def aware_curve(pop: Population, a: np.ndarray, b: np.ndarray, qs: list[float]) -> np.ndarray:
    """Mask-aware risk at each test ratio (len(qs), ...): the forms of w_q = (1 − q)a + qb are
    bilinear, so Σa and Σb are computed once."""
    sa, sb = pop.cov_times(a), pop.cov_times(b)
    ab, bb_ = sa @ pop.beta, sb @ pop.beta
    aa, ab2, bb = np.sum(a * sa, -1), np.sum(a * sb, -1), np.sum(b * sb, -1)
    na, nab, nb = np.sum(a * a, -1), np.sum(a * b, -1), np.sum(b * b, -1)
    out = []
    for q in qs:
        u, v = 1.0 - q, q
        f = (
            u * ab + v * bb_,
            u * u * aa + 2 * u * v * ab2 + v * v * bb,
            u * u * na + 2 * u * v * nab + v * v * nb,
        )
        out.append(risk(f, 1.0, q))
    return np.array(out)


def aware(pop: Population, a: np.ndarray, b: np.ndarray, test_ratios: list[float]) -> dict[str, np.ndarray]:
    """The mask-aware model's metrics."""
    curve = aware_curve(pop, a, b, [0.0, *test_ratios])
    return {"aware_full": curve[0], "aware_q_avg": curve[1:].mean(axis=0)}


def zero_fill_curve(
    pop: Population, w: np.ndarray, scale: float, qs: list[float], rescale: bool
) -> np.ndarray:
    """Zero-fill risk at each test ratio: with the dropout rescaling scale/(1 − q), or raw."""
    f = forms(pop, w)
    return np.array([risk(f, scale / (1 - q) if rescale else 1.0, q) for q in qs])


def cosine(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Cosine of the angle between weight vectors; nan where one is zero (no training rows)."""
    norm = np.sqrt(np.sum(u * u, axis=-1) * np.sum(v * v, axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 0, np.sum(u * v, axis=-1) / np.where(norm > 0, norm, 1.0), np.nan)
