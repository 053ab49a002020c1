"""`biomask theory`: when can a random mask ratio (R²MAE, Dong, Wang & Kluger 2025) beat the best
fixed one? A linear-model study.

Model. A linear masked autoencoder with the loss on masked entries only splits into one regression
per reconstructed feature, so one target y is studied with its d context features (`population`:
isotropic, k equal spikes, multi-scale spikes, a global factor plus local blocks). Every entry is
masked with probability p (R²MAE: p ~ U(a, b), drawn per sample or per batch); the target enters the
loss where it is masked, the context is zero-filled where masked. Training makes K passes over the
n samples with fresh masks and fits by minimum-norm least squares (`fit`); K = ∞ is the expected
loss, solved in closed form: the generalised ridge (A XᵀX + B diag XᵀX) w = C Xᵀy with
A = E[p(1−p)²], B = E[p²(1−p)], C = E[p(1−p)] — so U(a, b) is exactly the fixed ratio p′ = B/C,
its output scale c* = A/C = 1 − p′ included (`ratios`; with a loss averaged over each batch's masked
entries and the ratio drawn per batch, p′ = E[p(1−p)]/E[1−p] instead). Two models: zero-fill ŷ = wᵀz, and mask-aware ŷ = f·aᵀz + (1 − f)·bᵀz
with f the visible fraction it was masked to.

Metrics (`metrics`, exact given the weights): best-scalar full-context risk (primary), full-context
risk with c*, risk averaged over test ratios (plain model + dropout rescaling; mask-aware model),
held-out pretraining loss at matched ratios, and a few-label probe of each latent factor (`probe`).

Fair selection (`study`): the fixed grid (step 0.05) and every U(a, b) on it are run on selection
repetitions; the best fixed ratio and the best range per metric are compared paired on independent
test repetitions, and each chosen range against its own p′.

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
    from biomask.theory import plots, report
    from biomask.theory.study import run_study

    stage = StageOutput("theory", cfg, cfg.output)
    if stage.is_current(overwrite=overwrite):
        return Path(cfg.output)
    start = time.perf_counter()
    blocks, extras = run_study(cfg)
    ans = report.answer(blocks, extras)
    with stage.writing(seeds={"theory": cfg.seed}) as tmp:
        report.write_tables(blocks, extras, tmp)
        plots.all_figures(blocks, extras, tmp)
        runtime = time.perf_counter() - start
        report.write_results(blocks, extras, ans, runtime, tmp)
        (tmp / "summary.md").write_text(
            report.summary_markdown(cfg, blocks, extras, ans, runtime), encoding="utf-8"
        )
    for m, per_k in ans["counts"].items():
        log.info("theory: %s: range vs best fixed: %s", m, per_k)
    return Path(cfg.output)
