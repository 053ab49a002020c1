"""`biomask theory`: the masked estimators (finite K and the K = ∞ closed form), the equivalence of a
ratio range with one fixed ratio, the exact metrics and probe, and the command's outputs,
determinism and config errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from biomask.theory import fit, metrics, population
from biomask.theory.config import CovarianceConfig, TheoryConfig
from biomask.theory.probe import probe_risks
from biomask.theory.ratios import RatioDist, ranges

KINDS = [
    CovarianceConfig(kind="isotropic"),
    CovarianceConfig(kind="spiked", spikes=2),
    CovarianceConfig(kind="multiscale"),
    CovarianceConfig(kind="blocks", block_size=5),
]

# A tiny run of the command: two model sizes (one simulated at K = 1, 4), a coarse grid.
TINY = [
    "n=16",
    "gammas=[0.5, 2.0]",
    "sim_gammas=[2.0]",
    "probe_gammas=[2.0]",
    "grid_step=0.2",
    "selection_repetitions=4",
    "test_repetitions=6",
    "probe_labels=5",
    "bootstrap=20",
    "num_workers=1",
    "covariances=[{kind: isotropic}, {kind: multiscale}]",
]


# ------------------------------------------------------------------------------------ estimators


def _reference_fit(x, y, ratios, context_u, target_u):
    """Independent computation for one repetition: stack the K passes, keep the rows whose target is
    masked, zero the masked context entries, and take numpy's minimum-norm least squares."""
    k = ratios.shape[0]
    xs, ys = np.tile(x, (k, 1)), np.tile(y, k)
    p, cu, tu = ratios.reshape(-1), context_u.reshape(-1, x.shape[1]), target_u.reshape(-1)
    used = tu < p
    z = np.where(cu >= p[:, None], xs, 0.0)[used]
    if not used.any():
        return np.zeros(x.shape[1]), z, ys[used], 1 - p[used]
    return np.linalg.lstsq(z, ys[used], rcond=None)[0], z, ys[used], 1 - p[used]


@pytest.mark.parametrize(("n", "d", "epochs"), [(12, 30, 1), (12, 30, 3), (40, 8, 1), (20, 12, 4)])
def test_masked_min_norm_fits_match_lstsq(n, d, epochs):
    """Both models, over- and under-parameterised, fixed and per-sample ratios, several passes."""
    rng = np.random.default_rng(1)
    reps = 4
    x, y = rng.standard_normal((reps, n, d)), rng.standard_normal((reps, n))
    cu = rng.random((reps, epochs, n, d)).astype(np.float32)
    tu = rng.random((reps, epochs, n))
    for ratios in (
        np.full((reps, epochs, n), 0.5),
        rng.uniform(0.1, 0.9, (reps, epochs, n)).astype(np.float32),
    ):
        w, a, b = fit.fit_both(*fit.masked_training_set(x, y, ratios, cu, tu))
        for r in range(reps):
            expected, z, t, f = _reference_fit(x[r], y[r], ratios[r].astype(np.float32), cu[r], tu[r])
            np.testing.assert_allclose(w[r], expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())
            aware = np.linalg.lstsq(np.hstack([f[:, None] * z, (1 - f)[:, None] * z]), t, rcond=None)[0]
            np.testing.assert_allclose(
                np.concatenate([a[r], b[r]]), aware, rtol=1e-5, atol=1e-5 * np.abs(aware).max()
            )


def test_per_batch_ratios_are_shared_within_a_batch():
    rng = np.random.default_rng(2)
    su, bu = rng.random((3, 2, 10)), rng.random((3, 2, 4))
    p = fit.epoch_ratios(RatioDist(0.2, 0.6), "batch", su, bu, batch_size=3)
    assert np.all(p[:, :, 0:3] == p[:, :, :1])
    np.testing.assert_allclose(p[:, :, 9], 0.2 + 0.4 * bu[:, :, 3])
    assert np.all((p >= 0.2) & (p <= 0.6))
    per_sample = fit.epoch_ratios(RatioDist(0.2, 0.6), "sample", su, bu, batch_size=3)
    np.testing.assert_allclose(per_sample, 0.2 + 0.4 * su)


# ------------------------------------------------------------------------- the closed form (K = ∞)


def test_ratio_moments_and_the_equivalent_fixed_ratio():
    """p′ = E[p²(1−p)]/E[p(1−p)] lies in (a, b), c* = 1 − p′, a fixed ratio is its own p′, and the
    quadrature agrees with Monte Carlo."""
    rng = np.random.default_rng(3)
    for low, high in [(0.1, 0.9), (0.6, 0.9), (0.05, 0.1)]:
        dist = RatioDist(low, high)
        a, b, _c = dist.moments()
        p = rng.uniform(low, high, 1_000_000)
        assert a == pytest.approx(np.mean(p * (1 - p) ** 2), rel=3e-3)
        assert b == pytest.approx(np.mean(p**2 * (1 - p)), rel=3e-3)
        assert low < dist.equivalent < high
        assert dist.scale == pytest.approx(1 - dist.equivalent)
        assert dist.ridge == pytest.approx(dist.equivalent / (1 - dist.equivalent))
    assert RatioDist.fixed(0.3).equivalent == pytest.approx(0.3) and RatioDist.fixed(
        0.3
    ).scale == pytest.approx(0.7)
    assert len(ranges([RatioDist.fixed(p) for p in (0.2, 0.4, 0.6, 0.8)])) == 6
    # the fixed grid: every multiple of the step below 1, also when the step does not divide 1
    assert TheoryConfig(grid_step=0.24).ratio_grid() == [0.24, 0.48, 0.72, 0.96]
    assert TheoryConfig(grid_step=0.05).ratio_grid()[-1] == 0.95 and len(TheoryConfig().ratio_grid()) == 19
    assert TheoryConfig(grid_step=0.07).ratio_grid()[-1] == 0.98


@pytest.mark.parametrize("cov", KINDS)
def test_a_range_is_exactly_its_equivalent_fixed_ratio(cov):
    """K = ∞: U(a, b)'s estimator, from its own normal equations (A XᵀX + B D)w = C Xᵀy solved
    directly, is the fixed p′ one, scale included; so every risk is identical. With a loss averaged
    over each batch's masked entries (weight 1/p per batch) it is exactly another fixed ratio."""
    rng = np.random.default_rng(4)
    pop = population.make_population(cov, 30, rng)
    x, y, _ = pop.sample(rng, 12)
    ridge = fit.DualRidge(x[None], y[None])
    for dist in (RatioDist(0.1, 0.9), RatioDist(0.6, 0.9)):
        a, b, c = dist.moments()
        gram = x.T @ x
        w = np.linalg.solve(a * gram + b * np.diag(np.diag(gram)), c * x.T @ y)
        np.testing.assert_allclose(fit.closed_form(ridge, [dist])[0, 0], w, rtol=1e-8, atol=1e-10)
        w_eq = fit.closed_form(ridge, [RatioDist.fixed(dist.equivalent)])[0, 0]
        np.testing.assert_allclose(w, w_eq, rtol=1e-8, atol=1e-12)
        # batch-mean loss: the normal equations weighted by 1/p are those of the fixed p′ (weighted
        # or not: a fixed ratio's weight is a constant), and p′ is not the summed loss's
        a, b, c = dist.moments(lambda p: 1.0 / p)
        w_mean = np.linalg.solve(a * gram + b * np.diag(np.diag(gram)), c * x.T @ y)
        w_mean_eq = fit.closed_form(ridge, [RatioDist.fixed(dist.equivalent_batch_mean)])[0, 0]
        np.testing.assert_allclose(w_mean, w_mean_eq, rtol=1e-8, atol=1e-12)
        assert dist.equivalent_batch_mean < dist.equivalent - 0.005
        p = np.linspace(dist.low, dist.high, 200_001)
        assert dist.equivalent_batch_mean == pytest.approx(np.mean(p * (1 - p)) / np.mean(1 - p), abs=1e-5)
        m_range = metrics.zero_fill(pop, w, dist, [0.0, 0.5])
        m_eq = metrics.zero_fill(pop, w_eq, RatioDist.fixed(dist.equivalent), [0.0, 0.5])
        for key in ("best_scalar", "full_context", "q_avg", "masked_loss"):
            assert m_range[key] == pytest.approx(m_eq[key], abs=1e-10), key
        # the previous study's scale, 1 − E[p²]/E[p], is not c*: it gives another (worse) full-context risk
        assert abs(dist.size_biased_visible - dist.scale) > 0.01


def _many_epochs(x, y, dist, epochs, rng):
    """A direct simulation of K passes with fresh masks, per-sample ratios, fitted by lstsq."""
    n, d = x.shape
    p = np.full((epochs, n), dist.low) if dist.is_fixed else rng.uniform(dist.low, dist.high, (epochs, n))
    cu, tu = rng.random((epochs, n, d)), rng.random((epochs, n))
    used = (tu < p).reshape(-1)
    z = (np.tile(x, (epochs, 1)) * (cu >= p[..., None]).reshape(-1, d))[used]
    f = 1 - p.reshape(-1)[used]
    t = np.tile(y, epochs)[used]
    w = np.linalg.lstsq(z, t, rcond=None)[0]
    theta = np.linalg.lstsq(np.hstack([f[:, None] * z, (1 - f)[:, None] * z]), t, rcond=None)[0]
    return w, theta[:d], theta[d:]


@pytest.mark.parametrize("dist", [RatioDist.fixed(0.4), RatioDist(0.1, 0.8)])
def test_closed_form_is_the_limit_of_many_epochs(dist):
    """An over-parameterised problem (d = 24 > n = 12) simulated for K passes of fresh masks: both
    models' fits approach the K = ∞ closed form (the mask-aware one through its two generalised
    ridges) at the Monte Carlo rate 1/√K, and one pass is far from it."""
    rng = np.random.default_rng(5)
    pop = population.make_population(KINDS[1], 24, rng)
    x, y, _ = pop.sample(rng, 12)
    ridge = fit.DualRidge(x[None], y[None])
    w_inf = fit.closed_form(ridge, [dist])[0, 0]
    a_inf, b_inf = (v[0] for v in fit.closed_form_aware(ridge, dist))

    def rel(u, v):
        return np.linalg.norm(u - v) / np.linalg.norm(v)

    w1, _, _ = _many_epochs(x, y, dist, 1, rng)
    w400, _, _ = _many_epochs(x, y, dist, 400, rng)
    w, a, b = _many_epochs(x, y, dist, 4000, rng)
    assert metrics.cosine(w1, w_inf) < 0.9  # one pass: today's reading is far from the limit
    assert metrics.cosine(w, w_inf) > 0.995 and rel(w, w_inf) < 0.1
    assert rel(w, w_inf) < 0.6 * rel(w400, w_inf)  # ≈ 1/√10 per decade of K
    if dist.is_fixed:  # only (1 − p)a + pb is determined: the min-norm split of w
        p = dist.low
        np.testing.assert_allclose((1 - p) * a_inf + p * b_inf, w_inf, rtol=1e-10)
    assert rel(a, a_inf) < 0.25 and rel(b, b_inf) < 0.25


# --------------------------------------------------------------------------------- population


@pytest.mark.parametrize("cov", KINDS)
def test_population_is_standardised_and_beta_is_the_regression(cov):
    pop = population.make_population(cov, 40, np.random.default_rng(6))
    sigma = pop.context @ pop.context.T + pop.tau * np.eye(40)
    np.testing.assert_allclose(np.diag(sigma), 1.0)
    assert pop.beta @ sigma @ pop.beta + pop.noise == pytest.approx(1.0)  # Var(y) = 1
    np.testing.assert_allclose(pop.cov_times(pop.beta), sigma @ pop.beta, atol=1e-12)
    x, y, f = pop.sample(np.random.default_rng(7), 40_000)
    np.testing.assert_allclose(np.cov(x.T), sigma, atol=0.05)
    assert np.var(y - x @ pop.beta) == pytest.approx(pop.noise, rel=0.05)
    if pop.loadings.shape[1]:  # the factors are what the probe predicts: Cov(x_full, f) = Λ
        full = np.column_stack([y, x])
        np.testing.assert_allclose(full.T @ f / len(f), pop.loadings, atol=0.05)


def test_multiscale_spectrum_has_the_intended_scales():
    """shares 0.5 / 0.05 / 0.005 at d = 200: eigenvalues ≈ 100 / 10 / 1.4 (the issue's example)."""
    pop = population.make_population(CovarianceConfig(kind="multiscale"), 200, np.random.default_rng(8))
    top = np.linalg.eigvalsh(pop.context @ pop.context.T + pop.tau * np.eye(200))[::-1][:4]
    assert top[0] == pytest.approx(100, rel=0.1) and top[1] == pytest.approx(10, rel=0.25)
    assert 1.2 < top[2] < 2.5 and top[3] < top[2]


# ------------------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("q", [0.0, 0.4])
def test_exact_risk_matches_monte_carlo(q):
    """R(s, q) = E(y − s·wᵀ(x ⊙ v))² against an average over fresh test samples and masks, for the
    zero-fill metrics and the mask-aware model's weights at ratio q."""
    rng = np.random.default_rng(9)
    pop = population.make_population(KINDS[2], 20, rng)
    w = pop.beta * 1.3 + 0.1 * rng.standard_normal(20)
    x, y, _ = pop.sample(rng, 400_000)
    v = rng.random(x.shape) >= q
    for scale in (1.0, 0.55 / (1 - q)):
        errors = (y - scale * (np.where(v, x, 0.0) @ w)) ** 2
        sem = errors.std() / np.sqrt(errors.size)
        assert abs(metrics.risk(metrics.forms(pop, w), scale, q) - errors.mean()) < 4 * sem
    best = metrics.best_scalar(metrics.forms(pop, w))
    assert best <= metrics.risk(metrics.forms(pop, w), 0.8, 0.0) + 1e-12
    a, b = w, 0.5 * w + 0.05 * rng.standard_normal(20)
    wq = (1 - q) * a + q * b
    errors = (y - np.where(v, x, 0.0) @ wq) ** 2
    assert abs(metrics.aware_curve(pop, a, b, [q])[0] - errors.mean()) < 4 * errors.std() / np.sqrt(
        errors.size
    )
    assert metrics.risk(metrics.forms(pop, np.zeros(20)), 1.0, q) == pytest.approx(1.0)  # the null predictor


def test_probe_matches_an_explicit_autoencoder():
    """The probe's representation is the full linear MAE's reconstruction: feature j's weights are
    the generalised ridge of x_j on the others; its risk is exact given the probe."""
    rng = np.random.default_rng(10)
    pop = population.make_population(KINDS[3], 24, rng)
    x, y, _ = pop.sample(rng, 15)
    lx, ly, lf = pop.sample(rng, 8)
    train, lab = np.column_stack([y, x]), np.column_stack([ly, lx])
    lam = 0.6
    got = probe_risks(pop, train, lab, lf, np.array([lam]), [0, 1])
    gram = train.T @ train
    s = gram + lam * np.diag(np.diag(gram))
    w = np.zeros((25, 25))
    for j in range(25):
        others = [i for i in range(25) if i != j]
        w[others, j] = np.linalg.solve(s[np.ix_(others, others)], gram[others, j])
    u = w @ (np.linalg.pinv(lab @ w) @ lf[:, [0, 1]])
    full_cov = pop.loadings @ pop.loadings.T + pop.tau * np.eye(25)
    expected = [1 - 2 * u[:, k] @ pop.loadings[:, k] + u[:, k] @ full_cov @ u[:, k] for k in range(2)]
    np.testing.assert_allclose(got[0], expected, rtol=1e-6)
    raw = np.linalg.pinv(lab) @ lf[:, [0, 1]]
    np.testing.assert_allclose(
        got[1],
        [1 - 2 * raw[:, k] @ pop.loadings[:, k] + raw[:, k] @ full_cov @ raw[:, k] for k in range(2)],
        rtol=1e-6,
    )


# ------------------------------------------------------------------------------------- command


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from biomask.cli import main

    out = tmp_path_factory.mktemp("theory") / "run"
    assert main(["-q", "theory", *TINY, "--output", str(out)]) == 0
    return out


def test_command_writes_tables_figures_and_summary(tiny_run):
    for name in (
        "comparisons.csv",
        "curves.csv",
        "probe.csv",
        "results.json",
        "summary.md",
        "config.yaml",
        "run.json",
    ):
        assert (tiny_run / name).stat().st_size > 0, name
    for name in (
        "risk_vs_ratio.png",
        "equivalence.png",
        "random_vs_fixed.png",
        "optimum_vs_size.png",
        "test_ratio.png",
        "probe.png",
    ):
        assert (tiny_run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    # blocks: 2 covariances × (K = ∞ at 2 sizes + K = 1, 4 at one) = 8; per metric: 1 (K = ∞) or 2 modes
    lines = (tiny_run / "comparisons.csv").read_text().splitlines()
    assert len(lines) == 1 + 2 * (2 * 1 + 2 * 2) * len(metrics.SELECTED)
    results = json.loads((tiny_run / "results.json").read_text())
    assert len(results["blocks"]) == 8
    for block in results["blocks"]:
        for entry in block["metrics"].values():
            for r in entry["ranges"].values():
                assert r["vs_best_fixed"]["n"] == 6  # compared on the test repetitions
                assert r["verdict"] in {"better", "worse", "tie"}
        if block["epochs"] == "∞":  # every range is its p′ exactly
            assert block["equivalence"]["ranges"] == 6
            assert max(block["equivalence"]["max_abs_diff"].values()) < 1e-9
            for entry in block["metrics"].values():
                for r in entry["ranges"].values():
                    assert r["cosine_to_equivalent"]["min"] == pytest.approx(1.0, abs=1e-9)
    assert results["answer"]["equivalence"]["direct_min_cosine"] == pytest.approx(1.0, abs=1e-9)
    assert results["probe"] and results["probe"][0]["factors"] == ["share 0.5", "share 0.05", "share 0.005"]
    summary = (tiny_run / "summary.md").read_text()
    assert "## The answer" in summary and "p′" in summary and "best_scalar" in summary
    assert yaml.safe_load((tiny_run / "config.yaml").read_text())["test_repetitions"] == 6


def test_same_seed_gives_identical_results_and_workers_do_not_matter(tiny_run, tmp_path, cli):
    again, other = tmp_path / "again", tmp_path / "other"
    assert cli("theory", *TINY, "num_workers=2", "--output", again)[0] == 0
    assert cli("theory", *TINY, "seed=1", "--output", other)[0] == 0
    table = (tiny_run / "comparisons.csv").read_bytes()
    assert (again / "comparisons.csv").read_bytes() == table
    assert (other / "comparisons.csv").read_bytes() != table


def test_existing_output_is_reused_or_refused(tiny_run, cli):
    code, out, _ = cli("theory", *TINY, "--output", tiny_run)
    assert code == 0 and str(tiny_run) in out  # same config: reused
    code, _, err = cli("theory", *TINY, "test_repetitions=7", "--output", tiny_run)
    assert code == 2 and "--overwrite" in err


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("test_repetitions=1", "test_repetitions"),
        ("gama=[2.0]", "gama"),
        ("covariances=[{kind: banded}]", "covariances.0.kind"),
        ("covariances=[{kind: multiscale, shares: [0.7, 0.5]}]", "shares"),
        ("sim_gammas=[3.0]", "sim_gammas"),
        ("epochs=[0]", "epochs"),
        ("epochs=[1, 4]", "epochs must include inf"),
        ("sim_gammas=[]", "sim_gammas"),
        ("gammas=[0.5, 0.5]", "gammas are listed twice"),
        ("seed=-1", "seed"),
        ("covariances=[{kind: spiked, spikes: 30}]", "spikes"),
        ("gammas=[-1]", "gammas[0] = -1.0 gives fewer than 2 features"),  # not sim_gammas' complaint
        ("gammas=[0.5, 0.51]", "the same number of features twice"),
        ("test_ratios=[0.2, 0.2]", "test_ratios are listed twice"),
        ("test_ratios=[0.99999]", "test_ratios[0] = 0.99999 must lie in [0, 0.95]"),
        ("batch_size=41", "batch_size = 41 is larger than n = 40"),
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
    rng = np.random.default_rng(11)
    a = rng.standard_normal(50)
    c = paired(a + 0.5, a)  # a constant improvement of 0.5
    assert (
        c["mean_difference"] == pytest.approx(0.5) and c["wins"] == 50 and c["ci_low"] == pytest.approx(0.5)
    )
    c = paired(a, a[::-1])
    assert c["ci_low"] < c["mean_difference"] < c["ci_high"]


def test_the_summary_gives_p_prime_of_the_ranges_biomask_ships(repo):
    """The neural-experiments advice quotes p′ for R²MAE's shipped ranges: they must be every shipped
    pretrain config's, resolved (the token cell models' U(0.1, 0.75) was missing)."""
    from biomask.config import load_config
    from biomask.theory.report import SHIPPED_RANGES
    from biomask.training.config import PretrainConfig

    shipped = set()
    for path in sorted((repo / "configs/pretrain").glob("*.yaml")):
        ratio = load_config(PretrainConfig, path).masking.ratio
        if ratio.kind == "uniform":
            shipped.add(RatioDist(ratio.low, ratio.high))
    assert shipped == set(SHIPPED_RANGES)
