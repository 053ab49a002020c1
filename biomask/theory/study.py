"""The simulation study: for every covariance and model size, the risk of masked min-norm
pretraining along a sweep of fixed mask ratios, for R²MAE ranges U(a, b), and for unmasked
regression, over repetitions that share data and masks (paired); then the statistics the summary
states (optimum, its interval, interior-optimum test, R²MAE against the best fixed ratio)."""

from __future__ import annotations

import contextlib
import logging
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from biomask.theory import asymptotics, model
from biomask.theory.config import CovarianceConfig, TheoryConfig
from biomask.theory.stats import bootstrap_argmin, paired, summarize

log = logging.getLogger(__name__)

# Repetitions are simulated in chunks holding about this many context entries (bounds memory).
_CHUNK_ENTRIES = 4_000_000


@dataclass
class Setting:
    """One covariance at one model size, with its simulated risks (repetitions on the last axis)."""

    cov: CovarianceConfig
    gamma: float
    n: int
    d: int
    population: model.Population
    ratios: np.ndarray  # fixed mask ratios
    fixed: np.ndarray  # (ratios, reps)
    random: np.ndarray  # (ranges, reps)
    unmasked: np.ndarray  # (reps,)
    fixed_calibrated: np.ndarray  # the same estimators, risk with the best scalar rescaling
    random_calibrated: np.ndarray
    theory_ratios: np.ndarray
    theory: np.ndarray  # deterministic equivalent on theory_ratios
    theory_at_grid: np.ndarray  # ... and on the fixed ratios
    theory_unmasked: float
    analysis: dict[str, Any] = field(default_factory=dict)

    @property
    def regime(self) -> str:
        return "over" if self.d > self.n else "under" if self.d < self.n else "boundary"


@contextlib.contextmanager
def _single_threaded_blas() -> Iterator[None]:
    """The matrices are small: multi-threaded BLAS only adds overhead (and contends on shared CPUs)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _stream(seed: int, cov: CovarianceConfig, d: int, index: int) -> np.random.Generator:
    """Independent random stream per (seed, covariance, d, index): repetition r uses index r + 1 and
    the population index 0, so adding settings or repetitions never changes existing draws."""
    return np.random.default_rng([seed, zlib.crc32(cov.name.encode()), d, index])


def simulate(cfg: TheoryConfig, cov: CovarianceConfig, gamma: float) -> Setting:
    """Simulate every masking scheme on the same repetitions of one setting."""
    n, d, reps = cfg.n, cfg.dimension(gamma), cfg.repetitions
    pop = model.make_population(cov, d, cfg.signal, _stream(cfg.seed, cov, d, 0))
    ratios = np.asarray(cfg.mask_ratios)
    ranges = cfg.random_ratios
    fixed, fixed_cal = np.empty((len(ratios), reps)), np.empty((len(ratios), reps))
    random, random_cal = np.empty((len(ranges), reps)), np.empty((len(ranges), reps))
    unmasked = np.empty(reps)
    q = cfg.eval_ratio
    chunk = max(1, _CHUNK_ENTRIES // (n * d))
    for start in range(0, reps, chunk):
        idx = range(start, min(start + chunk, reps))
        draws = [_draw(pop, _stream(cfg.seed, cov, d, r + 1), n) for r in idx]
        x, y, context_u, target_u, ratio_u = (np.stack(parts) for parts in zip(*draws))
        sl = slice(idx.start, idx.stop)
        for i, p in enumerate(ratios):
            per_sample = np.full_like(target_u, p)
            w = model.min_norm_solve(*model.masked_training_set(x, y, per_sample, context_u, target_u))
            fixed[i, sl] = model.risk(pop, w, model.visible_fraction(p), q)
            fixed_cal[i, sl] = model.calibrated_risk(pop, w, q)
        for k, rr in enumerate(ranges):
            per_sample = rr.low + (rr.high - rr.low) * ratio_u
            w = model.min_norm_solve(*model.masked_training_set(x, y, per_sample, context_u, target_u))
            random[k, sl] = model.risk(pop, w, model.visible_fraction(rr.low, rr.high), q)
            random_cal[k, sl] = model.calibrated_risk(pop, w, q)
        # unmasked regression: every target observed, full context, no rescaling
        unmasked[sl] = model.risk(pop, model.min_norm_solve(x, y), 1.0, q)
    spectrum = pop.spectrum()
    theory_ratios = np.linspace(0.0, 1.0, cfg.theory_points + 2)[1:-1]
    return Setting(
        cov=cov,
        gamma=gamma,
        n=n,
        d=d,
        population=pop,
        ratios=ratios,
        fixed=fixed,
        random=random,
        unmasked=unmasked,
        fixed_calibrated=fixed_cal,
        random_calibrated=random_cal,
        theory_ratios=theory_ratios,
        theory=asymptotics.masked_curve(spectrum, theory_ratios, n, cfg.eval_ratio),
        theory_at_grid=asymptotics.masked_curve(spectrum, ratios, n, cfg.eval_ratio),
        theory_unmasked=asymptotics.masked_risk(spectrum, 0.0, float(n), cfg.eval_ratio),
    )


def regular_ratios(ratios: np.ndarray, n: int, d: int) -> np.ndarray:
    """Ratios where the deterministic equivalent is expected to hold and simulated means are stable:
    at least 25 % away from the interpolation threshold pn = d (where the min-norm risk diverges and
    a few near-singular repetitions dominate the mean), and at least 5 visible context entries per
    sample on average (the formula assumes many; with 1-2, columns seen in only a couple of rows
    make the fit explode)."""
    return (np.abs(ratios * n / d - 1.0) > 0.25) & ((1.0 - ratios) * d >= 5)


def _draw(pop: model.Population, rng: np.random.Generator, n: int) -> tuple[np.ndarray, ...]:
    """One repetition: data (x, y) and the uniforms every masking scheme derives its masks from."""
    x, y = pop.sample(rng, n)
    return x, y, rng.random((n, pop.d)), rng.random(n), rng.random(n)


# --------------------------------------------------------------------------------------- analysis


def analyse(setting: Setting, cfg: TheoryConfig) -> dict[str, Any]:
    """The numbers the summary states for one setting (also stored in results.json)."""
    s = setting
    means = s.fixed.mean(axis=1)
    best = int(np.argmin(means))
    rng = np.random.default_rng([cfg.seed, zlib.crc32(s.cov.name.encode()), s.d, 2**31])
    interval = bootstrap_argmin(s.fixed, s.ratios, cfg.bootstrap, rng)
    finite = np.isfinite(s.theory)
    theory_best = int(np.argmin(np.where(finite, s.theory, np.inf)))
    edges = {
        "lowest_ratio": paired(s.fixed[0], s.fixed[best]),
        "highest_ratio": paired(s.fixed[-1], s.fixed[best]),
    }
    # risks at the grid's edges can be heavy-tailed (a few near-singular fits), so "p* beats the
    # edge" is decided per repetition: more wins than losses by an exact sign test, and on average
    interior = 0 < best < len(s.ratios) - 1 and all(
        c["mean_difference"] > 0 and c["wins"] > c["n"] / 2 and c["sign_p_value"] < 0.05
        for c in edges.values()
    )
    gap = np.abs(s.theory_at_grid - means)[regular_ratios(s.ratios, s.n, s.d)]
    centre = [int(np.argmin(np.abs(s.ratios - (r.low + r.high) / 2))) for r in cfg.random_ratios]
    best_cal = int(np.argmin(s.fixed_calibrated.mean(axis=1)))
    # the grid ratio nearest the theory optimum: a best fixed ratio not selected on these repetitions
    theory_pick = int(np.argmin(np.abs(s.ratios - s.theory_ratios[theory_best])))
    return {
        "covariance": s.cov.name,
        "gamma": s.gamma,
        "n": s.n,
        "d": s.d,
        "regime": s.regime,
        "interpolation_ratio": s.d / s.n if s.d < s.n else None,  # p at which pn = d
        "bayes_risk": s.population.noise,
        "null_risk": 1.0,
        "unmasked": summarize(s.unmasked) | {"theory": s.theory_unmasked},
        "fixed": [
            {"ratio": float(p)} | summarize(r) | {"theory": float(t)}
            for p, r, t in zip(s.ratios, s.fixed, s.theory_at_grid)
        ],
        "best_fixed": {
            "ratio": float(s.ratios[best]),
            "interval": list(interval),
            "risk": summarize(s.fixed[best]),
            "theory_ratio": float(s.theory_ratios[theory_best]),
            "theory_risk": float(s.theory[theory_best]),
            "theory_grid_ratio": float(s.ratios[theory_pick]),
        },
        "best_fixed_calibrated": {
            "ratio": float(s.ratios[best_cal]),
            "risk": summarize(s.fixed_calibrated[best_cal]),
        },
        "interior_optimum": bool(interior),
        "edge_vs_best": edges,
        "masking_vs_unmasked": paired(s.unmasked, s.fixed[best]),  # > 0: masking better
        "theory_max_gap": float(gap.max()) if gap.size else None,
        "random": [
            {
                "range": [r.low, r.high],
                "label": r.label,
                "risk": summarize(s.random[k]),
                # > 0: R²MAE has the lower risk
                "vs_best_fixed": paired(s.fixed[best], s.random[k]),
                "centre_ratio": float(s.ratios[c]),
                "vs_centre_fixed": paired(s.fixed[c], s.random[k]),
                "vs_theory_fixed": paired(s.fixed[theory_pick], s.random[k]),
                "calibrated_vs_best_fixed": paired(s.fixed_calibrated[best_cal], s.random_calibrated[k]),
            }
            for k, (r, c) in enumerate(zip(cfg.random_ratios, centre))
        ],
    }


def run_study(cfg: TheoryConfig) -> list[Setting]:
    """Simulate and analyse every (covariance, model size) setting of the config."""
    settings = []
    with _single_threaded_blas():
        for cov in cfg.covariances:
            for gamma in cfg.gammas:
                setting = simulate(cfg, cov, gamma)
                setting.analysis = analyse(setting, cfg)
                b = setting.analysis["best_fixed"]
                log.info(
                    "theory: %s, gamma %g (d = %d): best fixed ratio %.2f, risk %.3f",
                    cov.name,
                    gamma,
                    setting.d,
                    b["ratio"],
                    b["risk"]["mean"],
                )
                settings.append(setting)
    return settings
