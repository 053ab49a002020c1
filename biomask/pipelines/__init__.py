"""Pipelines: stage graphs from `configs/pipelines/*.yaml`, run here (`biomask pipeline run`) or as
chained SLURM jobs (`biomask pipeline submit`, `biomask pipeline status`).

- schema.py    the pipeline file's schema (stages, overrides, needs, sweeps, SLURM resources)
- commands.py  the stage commands a pipeline may run (config schema, training or not)
- plan.py      validation and expansion into tasks with output directories under the run directory
- local.py     the local runner
- sbatch.py    one readable sbatch script per stage (job arrays for sweeps, USR1 -> checkpoint -> requeue)
- slurm.py     submission with afterok chains, job states from scontrol / squeue / sacct
- templates.py the plain sbatch templates in pipelines/slurm/, rendered by the same code
- tables.py    the status tables
"""
