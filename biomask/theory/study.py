"""The study: for every covariance, model size γ and number of epochs K, every masking scheme (the
fixed-ratio grid, every U(a, b) on it per sample and per batch) on a set of selection repetitions;
the best fixed ratio and the best range chosen there per metric; the chosen schemes (and each chosen
range's equivalent fixed ratio p′) compared paired on independent test repetitions."""

from __future__ import annotations

import contextlib
import logging
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from biomask.theory import fit, metrics
from biomask.theory.config import CovarianceConfig, TheoryConfig
from biomask.theory.population import Population, make_population, probed_factors
from biomask.theory.probe import probe_risks
from biomask.theory.ratios import RatioDist, ranges
from biomask.theory.stats import bootstrap_argmin, paired, summarize

log = logging.getLogger(__name__)

# Repetitions are simulated in chunks holding about this many mask uniforms (bounds memory).
_CHUNK_ENTRIES = 3_000_000


@dataclass(frozen=True)
class Scheme:
    dist: RatioDist
    mode: str  # "fixed", "sample", "batch"; K = ∞: "mixture" (per sample and per batch coincide)

    @property
    def label(self) -> str:
        if self.mode in ("fixed", "mixture"):
            return self.dist.label
        return f"{self.dist.label} per {self.mode}"


@dataclass
class Data:
    """Repetitions of one (covariance, γ): data, and the factors of the pretraining samples."""

    index: list[int]  # stream indices
    x: np.ndarray  # (r, n, d)
    y: np.ndarray  # (r, n)


@dataclass
class Block:
    """One (covariance, γ, K): per-metric arrays (schemes, repetitions) on both sets of repetitions."""

    cov: CovarianceConfig
    gamma: float
    n: int
    d: int
    epochs: int | None  # None: K = ∞
    population: Population
    selection_schemes: list[Scheme]
    selection: dict[str, np.ndarray]
    test_schemes: list[Scheme] = field(default_factory=list)
    test: dict[str, np.ndarray] = field(default_factory=dict)
    weights: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)
    analysis: dict[str, Any] = field(default_factory=dict)

    @property
    def k_label(self) -> str:
        return "∞" if self.epochs is None else str(self.epochs)

    @property
    def regime(self) -> str:
        """Of the unmasked problem (d against n). A masked fit at ratio p over K passes has about
        p·K·n rows (the targets masked), so at finite K it is over-parameterised below
        `interpolation_ratio` whatever this says."""
        return "over" if self.d > self.n else "under" if self.d < self.n else "boundary"

    @property
    def interpolation_ratio(self) -> float | None:
        """p = d/(K n): where the finite-K masked fit has as many rows as weights (its risk peaks
        there); None at K = ∞ (the closed form has no such peak)."""
        return None if self.epochs is None else self.d / (self.epochs * self.n)


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """The matrices are small: multi-threaded BLAS only adds overhead (and contends on shared CPUs)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def stream(seed: int, cov: CovarianceConfig, d: int, *index: int) -> np.random.Generator:
    """Independent random stream per (seed, covariance, d, index...): index (0,) is the population,
    (r,) repetition r's data, (r, K) its masks for K epochs, (r, -1) its probe labels — so adding
    settings, epochs or repetitions never changes existing draws."""
    return np.random.default_rng([seed, zlib.crc32(cov.name.encode()), d, *(i + 2**20 for i in index)])


def draw_data(pop: Population, cfg: TheoryConfig, cov: CovarianceConfig, index: list[int]) -> Data:
    xs, ys = [], []
    for r in index:
        x, y, _f = pop.sample(stream(cfg.seed, cov, pop.d, r), cfg.n)
        xs.append(x)
        ys.append(y)
    return Data(index, np.stack(xs), np.stack(ys))


def _mask_uniforms(
    cfg: TheoryConfig, cov: CovarianceConfig, d: int, index: list[int], epochs: int
) -> tuple[np.ndarray, ...]:
    n, batches = cfg.n, -(-cfg.n // cfg.batch_size)
    parts = []
    for r in index:
        rng = stream(cfg.seed, cov, d, r, epochs)
        parts.append(
            (
                rng.random((epochs, n, d), dtype=np.float32),
                rng.random((epochs, n)),
                rng.random((epochs, n)),
                rng.random((epochs, batches)),
            )
        )
    return tuple(np.stack(p) for p in zip(*parts))


def _empty(schemes: list[Scheme], reps: int) -> dict[str, np.ndarray]:
    return {m: np.empty((len(schemes), reps)) for m in metrics.REPORTED}


def evaluate(
    cfg: TheoryConfig,
    cov: CovarianceConfig,
    pop: Population,
    data: Data,
    schemes: list[Scheme],
    epochs: int | None,
    keep: set[int] = frozenset(),  # type: ignore[assignment]
) -> tuple[dict[str, np.ndarray], dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """Every metric of every scheme on every repetition of `data`; the weights (w, a, b) of the
    schemes in `keep`."""
    reps = data.x.shape[0]
    out = _empty(schemes, reps)
    kept: dict[int, list[tuple[np.ndarray, ...]]] = {i: [] for i in keep}
    qs = cfg.test_ratios
    if epochs is None:
        ridge = fit.DualRidge(data.x, data.y)
        step = 32
        for lo in range(0, len(schemes), step):
            chunk = schemes[lo : lo + step]
            w = fit.closed_form(ridge, [s.dist for s in chunk])
            for j, s in enumerate(chunk):
                i = lo + j
                a, b = fit.closed_form_aware(ridge, s.dist)
                values = metrics.zero_fill(pop, w[:, j], s.dist, qs) | metrics.aware(pop, a, b, qs)
                for m, v in values.items():
                    out[m][i] = v
                if i in kept:
                    kept[i].append((w[:, j], a, b))
    else:
        chunk_reps = max(1, _CHUNK_ENTRIES // (epochs * cfg.n * pop.d))
        for lo in range(0, reps, chunk_reps):
            sl = slice(lo, min(lo + chunk_reps, reps))
            context_u, target_u, sample_u, batch_u = _mask_uniforms(cfg, cov, pop.d, data.index[sl], epochs)
            for i, s in enumerate(schemes):
                ratios = fit.epoch_ratios(s.dist, s.mode, sample_u, batch_u, cfg.batch_size)
                z, t, f = fit.masked_training_set(data.x[sl], data.y[sl], ratios, context_u, target_u)
                w, a, b = fit.fit_both(z, t, f)
                values = metrics.zero_fill(pop, w, s.dist, qs) | metrics.aware(pop, a, b, qs)
                for m, v in values.items():
                    out[m][i, sl] = v
                if i in kept:
                    kept[i].append((w, a, b))
    weights = {i: tuple(np.concatenate(p) for p in zip(*parts)) for i, parts in kept.items()}
    return out, weights  # type: ignore[return-value]


def run_block(
    cfg: TheoryConfig,
    cov: CovarianceConfig,
    pop: Population,
    gamma: float,
    sel: Data,
    test: Data,
    epochs: int | None,
) -> Block:
    fixed = [RatioDist.fixed(p) for p in cfg.ratio_grid()]
    rngs = ranges(fixed)
    modes = ["mixture"] if epochs is None else list(cfg.modes)
    schemes = [Scheme(f, "fixed") for f in fixed] + [Scheme(r, m) for m in modes for r in rngs]
    if epochs is None:  # every range's equivalent fixed ratio p′ (cheap here)
        schemes += [Scheme(RatioDist.fixed(r.equivalent), "fixed") for r in rngs]
    selection, _ = evaluate(cfg, cov, pop, sel, schemes, epochs)
    block = Block(cov, gamma, cfg.n, pop.d, epochs, pop, schemes, selection)
    grid_count = len(fixed)
    # the selection runs over the grid and the ranges only (the equivalents are extra fixed ratios)
    picks = {m: _select_grid(block, m, modes, grid_count, len(rngs)) for m in metrics.SELECTED}
    chosen = sorted({i for p in picks.values() for i in p.values()} - set(range(grid_count)))
    test_schemes = schemes[:grid_count] + [schemes[i] for i in chosen]
    test_schemes += [Scheme(RatioDist.fixed(schemes[i].dist.equivalent), "fixed") for i in chosen]
    position = {s: j for j, s in enumerate(test_schemes)}
    keep = set()
    for p in picks.values():
        for i in p.values():
            keep.add(position[schemes[i]])
            if i >= grid_count:
                keep.add(position[Scheme(RatioDist.fixed(schemes[i].dist.equivalent), "fixed")])
    block.test, block.weights = evaluate(cfg, cov, pop, test, test_schemes, epochs, keep)
    block.test_schemes = test_schemes
    block.analysis = analyse(block, cfg, picks, grid_count)
    block.weights = {}  # analysed: keep the results small (they travel between processes)
    return block


def _select_grid(
    block: Block, metric: str, modes: list[str], grid_count: int, range_count: int
) -> dict[str, int]:
    means = block.selection[metric].mean(axis=1)
    out = {"fixed": int(np.argmin(means[:grid_count]))}
    for k, mode in enumerate(modes):
        lo = grid_count + k * range_count
        out[mode] = lo + int(np.argmin(means[lo : lo + range_count]))
    return out


# --------------------------------------------------------------------------------------- analysis


def analyse(
    block: Block, cfg: TheoryConfig, picks: dict[str, dict[str, int]], grid_count: int
) -> dict[str, Any]:
    b = block
    position = {s: j for j, s in enumerate(b.test_schemes)}
    grid = np.array([s.dist.low for s in b.selection_schemes[:grid_count]])
    rng = np.random.default_rng([cfg.seed, zlib.crc32(b.cov.name.encode()), b.d, 2**31])
    out: dict[str, Any] = {
        "covariance": b.cov.name,
        "gamma": b.gamma,
        "n": b.n,
        "d": b.d,
        "epochs": b.k_label,
        "regime": b.regime,
        "interpolation_ratio": b.interpolation_ratio,
        "bayes_risk": b.population.noise,
        "grid": grid.tolist(),
        "curves": {
            m: {
                "selection": b.selection[m][:grid_count].mean(axis=1).tolist(),
                "test": [summarize(v) for v in b.test[m][:grid_count]],
            }
            for m in metrics.REPORTED
        },
        "metrics": {},
    }
    for m in metrics.SELECTED:
        p = picks[m]
        fixed_sel = b.selection_schemes[p["fixed"]]
        fixed_test = b.test[m][position[fixed_sel]]
        entry: dict[str, Any] = {
            "best_fixed": {
                "ratio": fixed_sel.dist.low,
                "selection_mean": float(b.selection[m][p["fixed"]].mean()),
                "test": summarize(fixed_test),
                # where the optimum lies given the repetitions it was chosen on
                "interval": list(bootstrap_argmin(b.selection[m][:grid_count], grid, cfg.bootstrap, rng)),
            },
            "ranges": {},
        }
        for mode, i in p.items():
            if mode == "fixed":
                continue
            s = b.selection_schemes[i]
            eq = Scheme(RatioDist.fixed(s.dist.equivalent), "fixed")
            rt, et = b.test[m][position[s]], b.test[m][position[eq]]
            w_r, w_e = b.weights[position[s]][0], b.weights[position[eq]][0]
            cos = metrics.cosine(w_r, w_e)
            row = {
                "label": s.label,
                "range": [s.dist.low, s.dist.high],
                "equivalent": s.dist.equivalent,
                "selection_mean": float(b.selection[m][i].mean()),
                "test": summarize(rt),
                "vs_best_fixed": paired(fixed_test, rt),  # > 0: the range is better
                "vs_equivalent": paired(et, rt),  # > 0: the range beats its own p′
                "equivalent_test": summarize(et),
                "cosine_to_equivalent": {"mean": float(np.nanmean(cos)), "min": float(np.nanmin(cos))},
            }
            if m == "full_context":  # the previous study's scale 1 − E[p²]/E[p] instead of c*
                old_scale = s.dist.size_biased_visible
                forms = metrics.forms(b.population, w_r)
                row["old_scale"] = {"scale": old_scale, "c_star": s.dist.scale}
                row["old_scale"]["test"] = summarize(metrics.risk(forms, old_scale, 0.0))
            if m in metrics.AWARE:  # the control: the plain model with dropout rescaling
                control = picks["q_avg" if m == "aware_q_avg" else "full_context"]["fixed"]
                ctrl = b.selection_schemes[control]
                ctrl_metric = "q_avg" if m == "aware_q_avg" else "full_context"
                row["control"] = {
                    "label": f"plain {ctrl.dist.label} + rescaling",
                    "test": summarize(b.test[ctrl_metric][position[ctrl]]),
                    "vs_range": paired(b.test[ctrl_metric][position[ctrl]], rt),  # > 0: range better
                }
            row["verdict"] = verdict(row["vs_best_fixed"])
            row["vs_equivalent_verdict"] = verdict(row["vs_equivalent"])
            entry["ranges"][mode] = row
        out["metrics"][m] = entry
    if b.epochs is None:
        out["equivalence"] = equivalence(b, grid_count)
    out["test_ratio_curves"] = _test_ratio_curves(b, cfg, picks, position)
    return out


def _test_ratio_curves(
    b: Block, cfg: TheoryConfig, picks: dict[str, dict[str, int]], position: dict[Scheme, int]
) -> dict[str, Any]:
    """Mean risk against the test ratio q of the schemes chosen on q_avg (plain model, with and
    without dropout rescaling) and on aware_q_avg (mask-aware model)."""
    qs = list(cfg.test_ratios)
    out: dict[str, Any] = {"q": qs, "curves": {}}
    for mode, i in picks["q_avg"].items():
        s = b.selection_schemes[i]
        w = b.weights[position[s]][0]
        out["curves"][f"plain {s.label} + rescaling"] = (
            metrics.zero_fill_curve(b.population, w, s.dist.scale, qs, rescale=True).mean(axis=1).tolist()
        )
        if mode == "fixed":
            out["curves"][f"plain {s.label}, raw"] = (
                metrics.zero_fill_curve(b.population, w, s.dist.scale, qs, rescale=False)
                .mean(axis=1)
                .tolist()
            )
    for i in picks["aware_q_avg"].values():
        s = b.selection_schemes[i]
        _w, a, bb = b.weights[position[s]]
        out["curves"][f"mask-aware {s.label}"] = (
            metrics.aware_curve(b.population, a, bb, qs).mean(axis=1).tolist()
        )
    return out


# differences below this are rounding (K = ∞: a range and its p′ agree to ~1e-15)
IDENTICAL = 1e-9


def verdict(c: dict[str, float]) -> str:
    """'better' / 'worse' / 'tie' for the range, from the paired 95 % CI of risk(fixed) − risk(range)."""
    if max(abs(c["ci_low"]), abs(c["ci_high"])) < IDENTICAL:
        return "tie"
    return "better" if c["ci_low"] > 0 else "worse" if c["ci_high"] < 0 else "tie"


def equivalence(b: Block, grid_count: int) -> dict[str, Any]:
    """K = ∞: every range against its equivalent fixed ratio p′, on the selection repetitions (the
    largest differences of the scale-free and the c*-scaled risks, and of the aware model's)."""
    count = (len(b.selection_schemes) - grid_count) // 2
    rng_idx = list(range(grid_count, grid_count + count))
    eq_idx = list(range(grid_count + count, grid_count + 2 * count))

    def gap(m: str) -> float:
        return float(np.abs(b.selection[m][rng_idx] - b.selection[m][eq_idx]).max())

    aware = b.selection["aware_q_avg"][eq_idx] - b.selection["aware_q_avg"][rng_idx]  # > 0: range better
    bs = b.selection["best_scalar"]
    points = [
        [s.dist.low, s.dist.high, s.dist.equivalent, float(bs[i].mean()), float(bs[j].mean())]
        for i, j, s in zip(rng_idx, eq_idx, b.selection_schemes[grid_count:])
    ]
    return {
        "ranges": count,
        "points": points,  # low, high, p′, mean best-scalar risk of the range and of p′
        "max_abs_diff": {m: gap(m) for m in ("best_scalar", "full_context", "q_avg", "masked_loss")},
        "aware_q_avg_range_better": int((aware.mean(axis=1) > 0).sum()),
        "aware_q_avg_largest_gain": float(aware.mean(axis=1).max()),
    }


def direct_equivalence(data: Data, pop: Population, dists: list[RatioDist]) -> dict[str, float]:
    """An independent path to the K = ∞ equivalence: build each range's normal equations
    (A XᵀX + B D) w = C Xᵀy from its moments and solve them directly (d × d), and compare with the
    fixed ratio p′ fitted through the dual SVD. Returns the smallest cosine and the largest relative
    difference after the scale c*."""
    ridge = fit.DualRidge(data.x, data.y)
    gram = np.swapaxes(data.x, 1, 2) @ data.x
    xty = np.einsum("rnd,rn->rd", data.x, data.y)
    diag = np.einsum("rdd->rd", gram)
    worst_cos, worst_rel = 1.0, 0.0
    for dist in dists:
        a, b, c = dist.moments()
        mat = a * gram + b * diag[:, :, None] * np.eye(pop.d)
        w = np.linalg.solve(mat, c * xty[..., None])[..., 0]
        w_eq = fit.closed_form(ridge, [RatioDist.fixed(dist.equivalent)])[:, 0]
        worst_cos = min(worst_cos, float(metrics.cosine(w, w_eq).min()))
        rel = np.linalg.norm(dist.scale * w - (1 - dist.equivalent) * w_eq, axis=1) / np.linalg.norm(
            w_eq, axis=1
        )
        worst_rel = max(worst_rel, float(rel.max()))
    return {"ranges": len(dists), "min_cosine": worst_cos, "max_relative_difference": worst_rel}


def run_probe(
    cfg: TheoryConfig,
    cov: CovarianceConfig,
    pop: Population,
    test: Data,
    extra: list[RatioDist],
    primary: float,
) -> dict[str, Any]:
    """The few-label probe at K = ∞ for the fixed grid, the given ranges (through their λ), and the
    raw input: risk per (scheme, factor), summarised over the test repetitions; `primary` is the
    fixed ratio chosen on the primary metric, which the ranges are compared with."""
    fixed = [RatioDist.fixed(p) for p in cfg.ratio_grid()]
    dists = fixed + extra
    lams = np.array([dist.ridge for dist in dists])
    probed = probed_factors(pop)
    risks = []
    for r, x, y in zip(test.index, test.x, test.y):
        labelled_x, labelled_y, factors = pop.sample(stream(cfg.seed, cov, pop.d, r, -1), cfg.probe_labels)
        train = np.column_stack([y, x])
        labelled = np.column_stack([labelled_y, labelled_x])
        risks.append(probe_risks(pop, train, labelled, factors, lams, probed))
    risks = np.stack(risks, axis=-1)  # (schemes + 1, factors, reps)
    labels = [d.label for d in dists] + ["raw input x"]
    out = {"factors": [pop.factor_names[k] for k in probed], "labels": labels, "grid": cfg.ratio_grid()}
    out["risk"] = [[summarize(risks[i, k]) for k in range(len(probed))] for i in range(len(labels))]
    g = len(fixed)
    chosen = int(np.argmin(np.abs(np.array(cfg.ratio_grid()) - primary)))
    rows = []
    for k, name in enumerate(out["factors"]):
        i = int(np.argmin(risks[:g, k].mean(axis=1)))
        rows.append(
            {
                "factor": name,
                "best_ratio": fixed[i].low,  # this factor's own best fixed ratio (on these repetitions)
                "best": summarize(risks[i, k]),
                "chosen_ratio": fixed[chosen].low,  # the fixed ratio chosen on the primary metric
                "chosen": summarize(risks[chosen, k]),
                "ranges": [
                    {
                        "label": dist.label,
                        "equivalent": dist.equivalent,
                        "risk": summarize(risks[g + j, k]),
                        "vs_chosen": paired(risks[chosen, k], risks[g + j, k]),  # > 0: the range is better
                    }
                    for j, dist in enumerate(extra)
                ],
                "raw": summarize(risks[-1, k]),
            }
        )
    out["factors_table"] = rows
    return out


def run_setting(
    cfg: TheoryConfig, cov: CovarianceConfig, gamma: float
) -> tuple[list[Block], dict[str, list]]:
    """Every K of one (covariance, γ), plus its probe and direct equivalence check where due."""
    blocks: list[Block] = []
    extras: dict[str, list] = {"probe": [], "direct_equivalence": []}
    sel_index = list(range(1, cfg.selection_repetitions + 1))
    test_index = list(
        range(cfg.selection_repetitions + 1, cfg.selection_repetitions + cfg.test_repetitions + 1)
    )
    d = cfg.dimension(gamma)
    with single_threaded_blas():
        pop = make_population(cov, d, stream(cfg.seed, cov, d, 0))
        sel, test = draw_data(pop, cfg, cov, sel_index), draw_data(pop, cfg, cov, test_index)
        for k in cfg.epochs:
            epochs = None if k == "inf" else int(k)
            if epochs is not None and gamma not in cfg.sim_gammas:
                continue
            block = run_block(cfg, cov, pop, gamma, sel, test, epochs)
            blocks.append(block)
            a = block.analysis["metrics"]["best_scalar"]
            log.info(
                "theory: %s γ=%g K=%s: best fixed p %.2f (%.4f); best range %s",
                cov.name,
                gamma,
                block.k_label,
                a["best_fixed"]["ratio"],
                a["best_fixed"]["test"]["mean"],
                ", ".join(f"{r['label']} ({r['test']['mean']:.4f})" for r in a["ranges"].values()),
            )
            if epochs is not None:
                continue
            fixed = [RatioDist.fixed(p) for p in cfg.ratio_grid()]
            if gamma == max(cfg.gammas):
                few = Data(test.index[:3], test.x[:3], test.y[:3])
                check = direct_equivalence(few, pop, ranges(fixed)[:: max(1, len(fixed) // 4)])
                extras["direct_equivalence"].append({"covariance": cov.name, "gamma": gamma} | check)
            if gamma in cfg.probe_gammas and pop.loadings.shape[1]:
                chosen = [RatioDist(*r["range"]) for r in a["ranges"].values()]
                probe = run_probe(cfg, cov, pop, test, chosen, a["best_fixed"]["ratio"])
                extras["probe"].append({"covariance": cov.name, "gamma": gamma} | probe)
    return blocks, extras


def run_study(cfg: TheoryConfig) -> tuple[list[Block], dict[str, list]]:
    """Every (covariance, γ) of the config, on `num_workers` processes (results do not depend on it:
    every setting draws from its own random streams)."""
    tasks = [(cov, gamma) for cov in cfg.covariances for gamma in cfg.gammas]
    if cfg.num_workers > 1 and len(tasks) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # the settings simulated at finite K are the slow ones: start them first
        order = sorted(range(len(tasks)), key=lambda i: (tasks[i][1] not in cfg.sim_gammas, -tasks[i][1]))
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=cfg.num_workers, mp_context=context) as pool:
            futures = {i: pool.submit(run_setting, cfg, *tasks[i]) for i in order}
            results = [futures[i].result() for i in range(len(tasks))]
    else:
        results = [run_setting(cfg, *task) for task in tasks]
    blocks: list[Block] = []
    extras: dict[str, list] = {"probe": [], "direct_equivalence": []}
    for b, e in results:
        blocks += b
        for key in extras:
            extras[key] += e[key]
    return blocks, extras
