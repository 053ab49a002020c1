"""Summaries over repetitions, in biomask's reporting conventions: mean, sd, a Student-t 95 % CI,
and paired comparisons (mean difference with its CI, paired t-test, wins) over the same
repetitions. Kept here (scipy.special only) so `biomask theory` starts in a fraction of a second."""

from __future__ import annotations

import math

import numpy as np
from scipy.special import bdtr, stdtr, stdtrit


def summarize(values: np.ndarray, confidence: float = 0.95) -> dict[str, float]:
    """Mean, sample sd, standard error, t-based CI and median of per-repetition values."""
    x = np.asarray(values, dtype=float)
    n = x.size
    mean = float(x.mean())
    sd = float(x.std(ddof=1)) if n > 1 else math.nan
    sem = sd / math.sqrt(n) if n > 1 else math.nan
    half = float(stdtrit(n - 1, 0.5 + confidence / 2)) * sem if n > 1 else math.nan
    return {
        "mean": mean,
        "sd": sd,
        "sem": sem,
        "ci_low": mean - half,
        "ci_high": mean + half,
        "median": float(np.median(x)),
        "n": n,
    }


def paired(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Paired comparison of a − b over the same repetitions: mean difference, 95 % CI, two-sided
    paired t-test p-value, the number of repetitions with a > b, and the two-sided exact sign-test
    p-value of that count (robust where a few near-singular fits give heavy-tailed risks)."""
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    s = summarize(diff)
    if diff.size > 1 and s["sd"] > 0:
        t = s["mean"] / s["sem"]
        p_value = float(2 * stdtr(diff.size - 1, -abs(t)))
    else:
        p_value = math.nan
    wins, losses = int((diff > 0).sum()), int((diff < 0).sum())
    return {
        "mean_difference": s["mean"],
        "ci_low": s["ci_low"],
        "ci_high": s["ci_high"],
        "p_value": p_value,
        "wins": wins,
        "n": int(diff.size),
        "sign_p_value": sign_test(wins, losses),
    }


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact binomial test of wins against losses (ties dropped) under P(win) = 1/2."""
    trials = wins + losses
    if trials == 0:
        return 1.0
    return float(min(1.0, 2 * bdtr(min(wins, losses), trials, 0.5)))


def bootstrap_argmin(
    risks: np.ndarray, grid: np.ndarray, resamples: int, rng: np.random.Generator
) -> tuple[float, float]:
    """95 % percentile interval of argmin_p of the mean risk, resampling repetitions (columns)."""
    if resamples == 0:
        best = float(grid[np.argmin(risks.mean(axis=1))])
        return best, best
    reps = risks.shape[1]
    # a bootstrap resample is a multinomial count per repetition: means = counts @ risksᵀ / reps
    counts = rng.multinomial(reps, np.full(reps, 1.0 / reps), size=resamples)
    means = counts @ risks.T / reps
    best = grid[np.argmin(means, axis=1)]
    return float(np.quantile(best, 0.025)), float(np.quantile(best, 0.975))
