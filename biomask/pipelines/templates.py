"""The plain sbatch templates in pipelines/slurm/, rendered by the code `biomask pipeline submit` uses,
with paths relative to the repository root (submit them from there). tests/test_pipeline_render.py
checks that the files match; `biomask pipeline templates --out pipelines/slurm` rewrites them.

- stage.sbatch     one stage, one task          (configs/pipelines/dna-prep.yaml, prep_genome)
- sweep.sbatch     a sweep as a job array       (configs/pipelines/dna-prep.yaml, prep_splice)
- pretrain.sbatch  a training sweep: srun with one task per GPU, USR1 -> checkpoint -> requeue
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from biomask.errors import InputError, OutputExistsError
from biomask.outputs import atomic_write_text
from biomask.pipelines.plan import Plan, build_plan, load_plan
from biomask.pipelines.sbatch import render
from biomask.pipelines.slurm import job_script
from biomask.resources import config_root

# The repository root in a checkout, the package in a wheel: where `configs/...` paths start.
REPO = config_root()
DNA_PREP = "configs/pipelines/dna-prep.yaml"

# A training sweep on the genome store that stage.sbatch writes (the same run_dir, so the templates
# chain by hand as the README shows).
TRAINING_EXAMPLE: dict[str, Any] = {
    "name": "dna-study",
    "run_dir": "runs/pipelines/dna-prep",
    "stages": {
        "prep_genome": {"command": "prep dna", "config": "configs/dna/ce2-chrX.yaml"},
        "pretrain": {
            "command": "pretrain",
            "config": "configs/pretrain/dna.yaml",
            "overrides": {"data.store": "${stages.prep_genome.output}"},
            "sweep": {"masking.scheme": ["r2mae", "bert15"], "train.seed": [0, 1, 2]},
            "slurm": {
                "nodes": 1,
                "gpus_per_node": 4,
                "cpus_per_task": 8,
                "mem": "64G",
                "time": "12:00:00",
                "partition": "gpu",
                "signal_margin": 600,
            },
        },
    },
}


def _header(name: str, log_dir: str) -> list[str]:
    from biomask.resources import source_checkout

    where = (  # an installed biomask: no repository, its configs/ paths mean the shipped copies
        "the repository root" if source_checkout() is not None else "the folder its relative paths are under"
    )
    return [
        f"Template: edit it, then submit from {where}: mkdir -p {log_dir} && sbatch pipelines/slurm/{name}",
        "Rendered by the same code as `biomask pipeline submit`; regenerate: biomask pipeline templates --out pipelines/slurm",
    ]


def _script(plan: Plan, stage: str, name: str) -> str:
    job = job_script(plan, plan.stages[stage], portable=True)
    job.header = _header(name, job.log_dir)
    return render(job)


def render_templates(repo: Path = REPO) -> dict[str, str]:
    """File name -> text of every template."""
    prep = load_plan(repo / DNA_PREP, check_commands=False, workdir=repo)
    study = build_plan(TRAINING_EXAMPLE, "templates.TRAINING_EXAMPLE", repo / DNA_PREP, False, repo)
    return {
        "stage.sbatch": _script(prep, "prep_genome", "stage.sbatch"),
        "sweep.sbatch": _script(prep, "prep_splice", "sweep.sbatch"),
        "pretrain.sbatch": _script(study, "pretrain", "pretrain.sbatch"),
    }


def write_templates(directory: Path, *, overwrite: bool = False) -> list[Path]:
    """Write the templates into `directory`. A file there that differs from its template (the user
    edited it, as the README says to) is replaced only with `overwrite`."""
    if directory.exists() and not directory.is_dir():  # mkdir would raise FileExistsError: a traceback
        raise InputError(f"--out {directory} is a file; name a folder for the templates")
    templates = render_templates()
    edited = [
        directory / name
        for name, text in templates.items()
        if (directory / name).exists() and (directory / name).read_text(encoding="utf-8") != text
    ]
    if edited and not overwrite:
        raise OutputExistsError(
            f"{', '.join(map(str, edited))}: differ from the templates (edited?); pass --overwrite to "
            "replace them, or write the templates elsewhere with --out"
        )
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in templates.items():
        path = directory / name
        atomic_write_text(path, text)
        path.chmod(0o755)
        written.append(path)
    return written
