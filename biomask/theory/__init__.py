"""`biomask theory`: the linear-model simulation of mask pretraining (Dong, Wang & Kluger 2025).

Formulation. A linear masked autoencoder with per-feature weights and the loss on masked entries
only, Σ_i Σ_{j masked in i} (x_ij − w_jᵀ(x_i ⊙ (1 − m_i)))², splits into one regression per
reconstructed feature, so we study one target y and its d context features x (y = βᵀx + ε,
Var(y) = 1, diag Σ = 1; Σ isotropic, or spiked by k latent factors that all features share).
With mask ratio p every entry is masked independently with probability p; the target enters the
loss in the ≈ pn samples where it is masked, with the other features zero-filled where masked —
so p sets both the effective sample size (pn) and the sparsity of the covariates (1 − p visible).
The pretraining estimator is the minimum-norm least-squares fit on those samples (the ridgeless
limit, and what gradient descent from zero finds). R²MAE draws p_i ~ U(a, b) for every sample.
The test risk is that of the pretrained predictor on a fresh sample with its full context (how a
pretrained model is used downstream, and the same task for every masking scheme), with the
dropout rescaling by the training inputs' visible fraction, divided by Var(y): 1 is the null
predictor, σ² the Bayes risk. It is computed exactly given ŵ; the training randomness (data and
masks) is simulated over repetitions that all schemes share, so comparisons are paired. Model size
is γ = d/n: over-parameterised (γ > 1) means more weights per feature than pretraining samples, so
the per-feature regression interpolates for every p; for γ < 1 it crosses the interpolation
threshold pn = d at p = γ. A deterministic-equivalent formula (`asymptotics`) gives the fixed-p
curves without sampling noise and is checked against the simulation.

    from biomask.theory import TheoryConfig, run_theory
    run_theory(TheoryConfig(output="runs/theory"))
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from biomask.theory.config import TheoryConfig

__all__ = ["TheoryConfig", "run_theory"]

log = logging.getLogger(__name__)


def run_theory(cfg: TheoryConfig, *, overwrite: bool = False) -> Path:
    """Run the study and write its tables, figures and summary into `cfg.output`."""
    from biomask.stage import StageOutput
    from biomask.theory import findings, plots, report
    from biomask.theory.study import run_study

    stage = StageOutput("theory", cfg, cfg.output)
    if stage.is_current(overwrite=overwrite):
        return Path(cfg.output)
    start = time.perf_counter()
    settings = run_study(cfg)
    step = min(b - a for a, b in zip(cfg.mask_ratios, cfg.mask_ratios[1:]))
    checked = findings.all_findings([s.analysis for s in settings], step)
    with stage.writing(seeds={"theory": cfg.seed}) as tmp:
        report.write_tables(settings, tmp)
        plots.all_figures(settings, tmp)
        runtime = time.perf_counter() - start
        report.write_results(settings, checked, runtime, tmp)
        (tmp / "summary.md").write_text(report.summary_markdown(cfg, settings, checked, runtime))
    for f in checked:
        log.info("theory: %s: %s", f["claim"], f["verdict"])
    return Path(cfg.output)
