"""`biomask theory`: the masked min-norm estimator, its exact risk, the deterministic equivalent,
and the command's outputs, determinism and config errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from biomask.theory import asymptotics, model
from biomask.theory.config import CovarianceConfig, TheoryConfig
from biomask.theory.study import simulate

ISO = CovarianceConfig(kind="isotropic")
SPIKED = CovarianceConfig(kind="spiked", spikes=2)

# A tiny run of the command: two model sizes, both covariances, few repetitions.
TINY = [
    "n=30",
    "gammas=[0.5, 2.0]",
    "mask_ratios=[0.2, 0.4, 0.6, 0.8]",
    "random_ratios=[{low: 0.3, high: 0.7}]",
    "repetitions=6",
    "bootstrap=20",
    "theory_points=15",
]


# ------------------------------------------------------------------------------------ estimator


def _reference_fit(x, y, ratios, context_u, target_u):
    """Independent computation for one repetition: select the samples whose target is masked, zero
    the masked context entries, and take numpy's least-squares (minimum-norm) solution."""
    used = target_u < ratios
    z = np.where(context_u >= ratios[:, None], x, 0.0)[used]
    if not used.any():
        return np.zeros(x.shape[1])
    return np.linalg.lstsq(z, y[used], rcond=None)[0]


@pytest.mark.parametrize(("n", "d", "ratio"), [(12, 30, 0.5), (40, 8, 0.6), (40, 8, 0.9), (25, 25, 0.3)])
def test_masked_min_norm_fit_matches_lstsq(n, d, ratio):
    """Over- and under-parameterised, with empty context rows (p = 0.9, d = 8) and padded rows."""
    rng = np.random.default_rng(1)
    reps = 5
    x = rng.standard_normal((reps, n, d))
    y = rng.standard_normal((reps, n))
    context_u, target_u = rng.random((reps, n, d)), rng.random((reps, n))
    for ratios in (np.full((reps, n), ratio), rng.uniform(0.1, 0.9, (reps, n))):
        w = model.min_norm_solve(*model.masked_training_set(x, y, ratios, context_u, target_u))
        for r in range(reps):
            expected = _reference_fit(x[r], y[r], ratios[r], context_u[r], target_u[r])
            np.testing.assert_allclose(w[r], expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())


@pytest.mark.parametrize("rows", [10, 30])
def test_min_norm_solution_is_the_pseudo_inverse_one_for_rank_deficient_problems(rows):
    """Rank 4 with 15 columns: many least-squares solutions, differing by O(1) null-space components;
    only the minimum-norm one agrees with pinv (here to ~1e-5: the vanishing ridge meets rounding)."""
    rng = np.random.default_rng(2)
    a = rng.standard_normal((3, rows, 4)) @ rng.standard_normal((3, 4, 15))
    t = rng.standard_normal((3, rows))
    w = model.min_norm_solve(a, t)
    for r in range(3):
        expected = np.linalg.pinv(a[r]) @ t[r]
        assert np.abs(w[r] - expected).max() < 1e-4 * np.abs(expected).max()


# ------------------------------------------------------------------------------------ population


@pytest.mark.parametrize("cov", [ISO, SPIKED])
def test_population_is_standardised_and_beta_is_the_regression(cov):
    pop = model.make_population(cov, 40, 0.7, np.random.default_rng(3))
    sigma = pop.loadings @ pop.loadings.T + pop.tau * np.eye(40)
    np.testing.assert_allclose(np.diag(sigma), 1.0)
    assert pop.beta @ sigma @ pop.beta + pop.noise == pytest.approx(1.0)  # Var(y) = 1
    np.testing.assert_allclose(pop.cov_times(pop.beta), sigma @ pop.beta, atol=1e-12)
    lam, mult, energy = pop.spectrum()
    assert mult.sum() == 40 and np.sum(mult * lam) == pytest.approx(np.trace(sigma))
    assert np.sum(lam * energy) == pytest.approx(pop.beta @ sigma @ pop.beta)
    x, y = pop.sample(np.random.default_rng(4), 40_000)
    np.testing.assert_allclose(np.cov(x.T), sigma, atol=0.04)
    assert np.var(y - x @ pop.beta) == pytest.approx(pop.noise, rel=0.05)


# ---------------------------------------------------------------------------------- exact risk


@pytest.mark.parametrize("eval_ratio", [0.0, 0.4])
def test_exact_risk_matches_monte_carlo(eval_ratio):
    """R(ŵ) = E(y − c ŵᵀ(x ⊙ v))², c = (1 − p̄)/(1 − q), against an average over fresh test samples."""
    rng = np.random.default_rng(5)
    pop = model.make_population(SPIKED, 20, 0.8, rng)
    w = pop.beta * 1.3 + 0.1 * rng.standard_normal(20)
    visible = 0.55
    x, y = pop.sample(rng, 400_000)
    mask = rng.random(x.shape) < eval_ratio
    pred = visible / (1 - eval_ratio) * (np.where(mask, 0.0, x) @ w)
    errors = (y - pred) ** 2
    sem = errors.std() / np.sqrt(errors.size)
    assert abs(model.risk(pop, w, visible, eval_ratio) - errors.mean()) < 4 * sem
    # the calibrated risk is the same error with the best scale: never above the dropout-scaled one
    assert model.calibrated_risk(pop, w, eval_ratio) <= model.risk(pop, w, visible, eval_ratio) + 1e-12
    assert model.risk(pop, np.zeros(20), visible) == pytest.approx(1.0)  # the null predictor


def test_visible_fraction_of_random_ratios_is_size_biased():
    """Samples enter the loss with probability p, so their mean ratio is E[p²]/E[p], not E[p]."""
    rng = np.random.default_rng(6)
    p = rng.uniform(0.2, 0.9, 2_000_000)
    used = rng.random(p.size) < p
    assert model.visible_fraction(0.2, 0.9) == pytest.approx(1 - p[used].mean(), abs=1e-3)
    assert model.visible_fraction(0.3) == pytest.approx(0.7)


# ----------------------------------------------------------------------- against known results


def test_unmasked_regression_matches_exact_finite_sample_risk():
    """Isotropic Gaussian ridgeless regression has closed-form expected risk (Hastie et al. 2022):
    σ²(n − 1)/(n − d − 1) when d < n − 1, and ‖β‖²(1 − n/d) + σ²(1 + n/(d − n − 1)) when d > n + 1."""
    for gamma in (0.25, 3.0):
        cfg = TheoryConfig(n=40, gammas=[gamma], mask_ratios=[0.5, 0.6], random_ratios=[], repetitions=300)
        s = simulate(cfg, ISO, gamma)
        n, d, pop = s.n, s.d, s.population
        if d < n:
            exact = pop.noise * (n - 1) / (n - d - 1)
        else:
            exact = pop.beta @ pop.beta * (1 - n / d) + pop.noise * (1 + n / (d - n - 1))
        sem = s.unmasked.std(ddof=1) / np.sqrt(s.unmasked.size)
        assert abs(s.unmasked.mean() - exact) < 4 * sem
        assert abs(s.theory_unmasked - exact) < 0.05  # the deterministic equivalent, at finite n


def test_deterministic_equivalent_matches_simulation_when_over_parameterised():
    cfg = TheoryConfig(n=60, gammas=[4.0], mask_ratios=[0.3, 0.6], random_ratios=[], repetitions=60)
    s = simulate(cfg, ISO, 4.0)
    sem = s.fixed.std(axis=1, ddof=1) / np.sqrt(s.fixed.shape[1])
    assert np.all(np.abs(s.fixed.mean(axis=1) - s.theory_at_grid) < 4 * sem + 0.01)


def test_deterministic_equivalent_diverges_at_the_interpolation_threshold():
    spectrum = model.isotropic(50, 0.8, np.random.default_rng(7)).spectrum()
    assert asymptotics.masked_risk(spectrum, 0.5, 50.0) == float("inf")  # pn = d
    assert np.isfinite(asymptotics.masked_risk(spectrum, 0.5, 40.0))
    assert asymptotics.masked_risk(spectrum, 0.5, 0.0) == 1.0  # no targets: the null predictor


# ------------------------------------------------------------------------------------- command


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from biomask.cli import main

    out = tmp_path_factory.mktemp("theory") / "run"
    assert main(["-q", "theory", *TINY, "--output", str(out)]) == 0
    return out


def test_command_writes_tables_figures_and_summary(tiny_run):
    for name in (
        "risk.csv",
        "risk_reps.csv",
        "theory.csv",
        "results.json",
        "summary.md",
        "config.yaml",
        "run.json",
    ):
        assert (tiny_run / name).stat().st_size > 0, name
    for name in ("risk_vs_ratio.png", "optimum_vs_size.png", "random_vs_fixed.png"):
        assert (tiny_run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    lines = (tiny_run / "risk.csv").read_text().splitlines()
    assert len(lines) == 1 + 2 * 2 * (4 + 1 + 1)  # header + covariances × sizes × (fixed + random + unmasked)
    assert len((tiny_run / "risk_reps.csv").read_text().splitlines()) == 1 + 2 * 2 * 6 * 6
    results = json.loads((tiny_run / "results.json").read_text())
    claims = {f["claim"]: f["verdict"] for f in results["findings"]}
    assert claims["a random ratio U(a, b) beats the best fixed ratio"] in {"reproduced", "not reproduced"}
    setting = results["settings"][0]
    assert {"best_fixed", "interior_optimum", "random", "masking_vs_unmasked"} <= setting.keys()
    assert setting["random"][0]["vs_best_fixed"]["n"] == 6
    summary = (tiny_run / "summary.md").read_text()
    assert "R²MAE" in summary and "interior optimum" in summary
    assert yaml.safe_load((tiny_run / "config.yaml").read_text())["repetitions"] == 6


def test_same_seed_gives_identical_results_and_another_seed_does_not(tiny_run, tmp_path, cli):
    again, other = tmp_path / "again", tmp_path / "other"
    assert cli("theory", *TINY, "--output", again)[0] == 0
    assert cli("theory", *TINY, "seed=1", "--output", other)[0] == 0
    reps = (tiny_run / "risk_reps.csv").read_bytes()
    assert (again / "risk_reps.csv").read_bytes() == reps
    assert (other / "risk_reps.csv").read_bytes() != reps


def test_existing_output_is_reused_or_refused(tiny_run, cli):
    code, out, _ = cli("theory", *TINY, "--output", tiny_run)
    assert code == 0 and str(tiny_run) in out  # same config: reused
    code, _, err = cli("theory", *TINY, "repetitions=7", "--output", tiny_run)
    assert code == 2 and "--overwrite" in err


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("repetitions=1", "repetitions"),
        ("gama=[2.0]", "gama"),
        ("random_ratios=[{low: 0.7, high: 0.2}]", "random_ratios.0"),
        ("covariances=[{kind: banded}]", "covariances.0.kind"),
        ("mask_ratios=[0.0, 0.5]", "mask_ratios"),
        ("covariances=[{kind: spiked, spikes: 30}]", "spikes"),
    ],
)
def test_config_errors_name_the_key(cli, tmp_path, override, key):
    code, _, err = cli("theory", override, "--output", tmp_path / "x")
    assert code == 2
    assert key in err
    assert not (tmp_path / "x").exists()


def test_config_file_matches_defaults(repo):
    from biomask.config import load_config

    assert load_config(TheoryConfig, repo / "configs/theory.yaml") == TheoryConfig()


def test_paired_statistics():
    from biomask.theory.stats import paired, sign_test

    assert sign_test(5, 5) == 1.0
    assert sign_test(10, 0) == pytest.approx(2 / 2**10)
    rng = np.random.default_rng(8)
    a = rng.standard_normal(50)
    c = paired(a + 0.5, a)  # a constant improvement of 0.5
    assert (
        c["mean_difference"] == pytest.approx(0.5) and c["wins"] == 50 and c["ci_low"] == pytest.approx(0.5)
    )
    c = paired(a, a[::-1])
    assert c["ci_low"] < c["mean_difference"] < c["ci_high"]
