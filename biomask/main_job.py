"""The main job (`make run`, `biomask main`): the R²MAE vs fixed-ratio study end to end on real data.

It runs the pipeline `configs/pipelines/study-quick.yaml` (or `--pipeline study-full.yaml`) with the
local runner: fetch and prepare the built-in data (C. elegans chrX and the UCI splice junctions;
pbmc3k and pbmc68k_reduced), pretrain a tiny DNA CNN and a cell profile autoencoder per masking scheme
(R²MAE, fixed 15 %, fixed 40 %, the dynamic 30→15 % schedule; fixed 75 % for cells) × 3 pretraining
seeds, evaluate them next to the baselines and the random init (splice: linear probe over 2 splits, and
LP-FT of the R²MAE CNNs over 3; cells: linear probe and kNN + Leiden over 5), embed pbmc68k_reduced, and
write the report (docs/studies.md, "What the main job runs"). Beside the study: the DNA CNN pretrained on the E. coli genome and probed on B. japonicum gene
starts (a motif task cut from that genome's annotation) and on M. acetivorans coding / antisense /
noncoding windows (a composition task) against k-mer LR. Stages whose outputs are
current are reused, so a second run only redoes what changed.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from biomask.pipelines.local import exit_code, run_pipeline
from biomask.pipelines.plan import load_plan
from biomask.pipelines.tables import local_table, print_failures, show
from biomask.resources import configs_dir, shipped_config

log = logging.getLogger(__name__)

PIPELINES = configs_dir() / "pipelines"
DEFAULT_PIPELINE = PIPELINES / "study-quick.yaml"


def _pipeline(given: str | None) -> Path:
    """The pipeline file: a path, a `configs/pipelines/...` path or a bare name of a shipped pipeline."""
    if given is None:
        return DEFAULT_PIPELINE
    path = Path(given)
    if path.exists():
        return path
    shipped = shipped_config(path) or PIPELINES / path
    return shipped if shipped.is_file() else path


def run_main_job(args: argparse.Namespace) -> int:
    pipeline = _pipeline(args.pipeline)
    plan = load_plan(pipeline, [f"run_dir={args.output}"])
    if getattr(args, "dry_run", False):
        from biomask.pipelines.preview import print_preview

        return print_preview(plan, verbose=args.verbose)
    log.info("main job: %s -> %s (%d stages)", pipeline, plan.run_dir, len(plan.stages))
    results = run_pipeline(plan, echo=not args.quiet, jobs=getattr(args, "jobs", None))
    show(local_table(f"main job ({plan.run_dir})", results))
    code = exit_code(results)
    if code != 0:
        print_failures(results)
        return code
    report = plan.stages["report"].tasks[0].output / "report.md" if "report" in plan.stages else None
    if report is not None and report.exists():
        summary = report.read_text(encoding="utf-8").split("## Summary", 1)[-1].split("\n## ", 1)[0].strip()
        print(f"\nReport: {report}\n\nSummary\n{summary}\n")
    return 0
