"""`biomask pretrain` under a real SLURM cluster (tests/slurm_cluster.py): the job script that
`biomask pipeline` renders for a training stage runs two srun tasks (rank environment mapped from
SLURM_*), USR1 reaches both DeepSpeed ranks, they checkpoint and exit 75, the script requeues the job,
the requeued job resumes (also when submitted with --overwrite) — and ends with exactly the weights of an
uninterrupted 2-process run."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from biomask.pipelines.sbatch import JobScript, render
from biomask.pipelines.schema import SlurmSpec
from biomask.training.distributed import RANK_VARS, free_port
from tests.test_pretrain import CONFIG, REPO, overrides, subprocess_env

# one xdist worker runs them all: they share the one SLURM cluster the session starts
pytestmark = [
    pytest.mark.network,
    pytest.mark.slurm,
    pytest.mark.xdist_group("slurm"),
    pytest.mark.timeout(400),
]


def test_srun_usr1_checkpoint_requeue_resume_gives_the_same_weights(
    slurm_cluster, genome_store, tmp_path, monkeypatch
):
    for name in RANK_VARS:  # jobs inherit the submitter's environment: no port taken by this process
        monkeypatch.delenv(name, raising=False)
    extra = {"train.steps": 120, "train.checkpoint_every": 1000, "model.dropout": 0.1}
    out = tmp_path / "slurm"
    job = JobScript(
        pipeline="pretrain-test",
        stage="train",
        summary="biomask pretrain, 2 srun tasks",
        workdir=str(REPO),
        python=sys.executable,
        program=f"{sys.executable} -m biomask pretrain --config {CONFIG}",
        log_dir=str(tmp_path),
        slurm=SlurmSpec(tasks_per_node=2, time="10", mem="4G"),
        training=True,
        tasks=[overrides(genome_store, out, **extra)],
        # as `pipeline submit --overwrite` renders it: the requeued job must still resume, not start over
        replace_stale=True,
        env={"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)},
    )
    script = tmp_path / "train.sbatch"
    script.write_text(render(job))
    job_id = slurm_cluster.command("sbatch", "--parsable", str(script)).stdout.strip()
    assert job_id.isdigit()

    # The same training, uninterrupted, by torchrun (two ranks, one thread each) while the job runs.
    reference = tmp_path / "reference"
    cmd = [
        str(Path(sys.executable).parent / "torchrun"),
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
    ]
    cmd += ["-m", "biomask", "pretrain", "-c", str(CONFIG), *overrides(genome_store, reference, **extra)]
    torchrun = subprocess.Popen(
        cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )

    deadline = time.monotonic() + 200
    metrics = out / "metrics.jsonl"
    while not (metrics.is_file() and metrics.stat().st_size > 0):
        assert time.monotonic() < deadline, slurm_cluster.command(
            "scontrol", "show", "job", "-o", job_id
        ).stdout
        time.sleep(0.1)
    assert slurm_cluster.command("scancel", "--signal=USR1", "--batch", job_id).returncode == 0

    fields: dict[str, str] = {}
    while fields.get("JobState") not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
        assert time.monotonic() < deadline + 120, fields
        time.sleep(1)
        show = slurm_cluster.command("scontrol", "show", "job", "-o", job_id).stdout
        fields = dict(f.split("=", 1) for f in show.split() if "=" in f)
    log = (tmp_path / f"train-{job_id}.out").read_text()
    assert (fields["JobState"], fields["Restarts"], fields["ExitCode"]) == ("COMPLETED", "1", "0:0"), log[
        -4000:
    ]
    assert "requeueing job" in log and "(restart 1)" in log
    assert "checkpointed step" in log and "resumed from" in log
    run = json.loads((out / "run.json").read_text())
    assert (run["world_size"], run["launcher"]) == (2, "slurm")

    _, err = torchrun.communicate(timeout=300)
    assert torchrun.returncode == 0, err[-3000:]
    a = load_file(str(out / "model" / "model.safetensors"))
    b = load_file(str(reference / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
