"""`biomask pipeline submit` / `status` against a real SLURM cluster (tests/slurm_cluster.py; two nodes on
this machine): afterok chains, a sweep as a job array, a failing stage cancelling its dependents, the
training scripts' USR1 -> checkpoint (exit 75) -> requeue mechanics, a small real pipeline — prep →
pretrain as 2 srun tasks running DeepSpeed over gloo → evaluate of the pretrained checkpoint —
completing in order, and a training stage across the two nodes.

A real `biomask pretrain` under srun signalled with USR1, requeued and resuming to the same final
weights as an uninterrupted run is tested in tests/test_pretrain_slurm.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from biomask.cli import main
from biomask.pipelines.plan import load_plan
from biomask.pipelines.sbatch import JobScript, render
from biomask.pipelines.schema import SlurmSpec
from biomask.pipelines.slurm import job_states, sacct_states, wait
from biomask.provenance import read_run_info
from biomask.store import TokenStore
from tests.conftest import DNA_PIPELINE, REPO, leftovers

# one xdist worker runs them all: they share the one SLURM cluster the session starts
pytestmark = [
    pytest.mark.network,
    pytest.mark.slurm,
    pytest.mark.xdist_group("slurm"),
    pytest.mark.timeout(300),
]


def write_pipeline(directory: Path) -> Path:
    path = directory / "dna-test.yaml"
    path.write_text(DNA_PIPELINE.format(run_dir=directory / "run", repo=REPO))
    return path


def finished(run_dir: Path, cluster, timeout: float = 150) -> dict[str, list]:
    """Wait for every job of the run to end; its final states by stage."""
    states = wait(run_dir, timeout=timeout)
    by_stage: dict[str, list] = {}
    for s in states:
        by_stage.setdefault(s.stage, []).append(s)
    pending = [s for s in states if s.state not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")]
    assert not pending, (
        f"jobs did not finish: {pending}\nslurmctld log:\n{cluster.log('slurmctld.log')[-3000:]}"
    )
    return by_stage


@pytest.fixture(scope="module")
def submitted(slurm_cluster, tmp_path_factory):
    """The DNA pipeline submitted once and waited for: (run dir, final states by stage)."""
    directory = tmp_path_factory.mktemp("slurm-dna")
    assert main(["-q", "pipeline", "submit", str(write_pipeline(directory))]) == 0
    run_dir = directory / "run"
    return run_dir, finished(run_dir, slurm_cluster)


def test_a_pipeline_runs_as_an_afterok_chain(submitted):
    run_dir, states = submitted
    jobs = json.loads((run_dir / "jobs.json").read_text())["stages"]
    assert jobs["prep_splice"]["after"] == [jobs["prep_genome"]["job_id"]]
    assert f"--dependency=afterok:{jobs['prep_genome']['job_id']}" in jobs["prep_splice"]["sbatch"]
    (genome,) = states["prep_genome"]
    assert genome.state == "COMPLETED" and genome.exit_code == "0:0"
    for task in states["prep_splice"]:
        assert task.state == "COMPLETED"
        assert task.start >= genome.end  # started only after the genome stage had ended
    # real outputs, and the splice set read the genome's tokenizer
    genome_out = run_dir / "prep_genome"
    assert TokenStore(genome_out).verify() > 0
    inputs = {i["name"]: i["path"] for i in read_run_info(run_dir / "prep_splice" / "split.seed=0")["inputs"]}
    assert inputs["tokenizer"].startswith(str(genome_out))
    # reproducibility: resolved pipeline, the rendered scripts, each stage's config and run.json
    assert (run_dir / "pipeline.yaml").exists()
    assert sorted(p.name for p in (run_dir / "slurm").iterdir()) == [
        "prep_genome.sbatch",
        "prep_splice.sbatch",
    ]
    assert "biomask: wrote" in (run_dir / "logs" / f"prep_genome-{genome.job_id}.out").read_text()


def test_a_sweep_runs_every_task_of_its_job_array(submitted):
    run_dir, states = submitted
    tasks = states["prep_splice"]
    array_id = json.loads((run_dir / "jobs.json").read_text())["stages"]["prep_splice"]["job_id"]
    assert [(t.task, t.job_id, t.state) for t in tasks] == [
        ("0", f"{array_id}_0", "COMPLETED"),
        ("1", f"{array_id}_1", "COMPLETED"),
    ]
    for seed in (0, 1):
        out = run_dir / "prep_splice" / f"split.seed={seed}"
        assert yaml.safe_load((out / "config.yaml").read_text())["split"]["seed"] == seed
        assert TokenStore(out).verify() > 0
        assert (run_dir / "logs" / f"prep_splice-{array_id}_{seed}.out").exists()


def test_status_shows_each_stage_job(submitted, cli):
    run_dir, _ = submitted
    code, out, _ = cli("pipeline", "status", run_dir, "--json")
    assert code == 0
    rows = json.loads(out)
    assert [(r["stage"], r["task"], r["state"], r["source"]) for r in rows] == [
        ("prep_genome", "", "COMPLETED", "scontrol"),
        ("prep_splice", "0", "COMPLETED", "scontrol"),
        ("prep_splice", "1", "COMPLETED", "scontrol"),
    ]
    code, out, _ = cli("pipeline", "status", run_dir)
    assert code == 0 and "prep_genome" in out and "COMPLETED" in out
    # once slurmctld forgets a job (MinJobAge), sacct answers; without accounting storage, from the jobcomp file
    genome_id = rows[0]["job_id"]
    assert [(s.job_id, s.state, s.exit_code) for s in sacct_states("prep_genome", genome_id)] == [
        (genome_id, "COMPLETED", "0:0")
    ]


def test_a_submission_sbatch_refuses_leaves_the_earlier_one_as_it_was(submitted, slurm_cluster, cli):
    """A resubmission whose second stage names a partition the cluster lacks: its first job, already
    accepted, is cancelled, and the run directory keeps the first submission's scripts, pipeline.yaml
    and jobs.json (which name the jobs that ran), not scripts of jobs that never ran."""
    run_dir, _ = submitted
    kept = ["pipeline.yaml", "jobs.json", "slurm/prep_genome.sbatch", "slurm/prep_splice.sbatch"]
    before = {name: (run_dir / name).read_text() for name in kept}
    jobs = json.loads(before["jobs.json"])["stages"]
    code, _, err = cli(
        "-q", "pipeline", "submit", run_dir.parent / "dna-test.yaml",
        "stages.prep_genome.slurm.mem=900M", "stages.prep_splice.slurm.partition=nosuch",
    )  # fmt: skip
    assert code == 2
    assert "sbatch refused stage prep_splice" in err and "nosuch" in err and "were cancelled" in err
    assert {name: (run_dir / name).read_text() for name in kept} == before
    assert leftovers(run_dir) == leftovers(run_dir / "slurm") == []
    assert [s.job_id for s in job_states(run_dir)] == [
        jobs["prep_genome"]["job_id"], *(f"{jobs['prep_splice']['job_id']}_{i}" for i in (0, 1))
    ]  # fmt: skip
    queued = slurm_cluster.command("squeue", "--noheader", "--format=%i %j %T").stdout
    assert "dna-test" not in queued, queued  # the genome job this submission made was cancelled


def test_submit_says_what_each_job_will_do_and_refuses_what_its_job_would(submitted, slurm_cluster, cli):
    """A job decides whether its output is current only when it runs, after its wait in the queue; a
    stage's output of other settings it refuses (exit 2) unless submitted with --overwrite. submit
    tells at once: the earlier run's outputs reused, or the changed key, with nothing submitted."""
    run_dir, _ = submitted
    path = run_dir.parent / "dna-test.yaml"
    code, out, err = cli("-q", "pipeline", "submit", "--dry-run", path)
    assert code == 0 and "3 reuse" in out, err
    jobs = (run_dir / "jobs.json").read_text()
    code, out, err = cli("-q", "pipeline", "submit", path, "stages.prep_genome.overrides.windows.stride=256")
    assert code == 2 and "nothing was submitted" in err
    assert "prep_genome: config changed: windows.stride: 512 -> 256" in err and "pass --overwrite" in err
    assert "prep_splice" not in err  # its job would run again after the new genome, not refuse
    assert "3 run again" in out
    assert (run_dir / "jobs.json").read_text() == jobs
    assert "dna-test" not in slurm_cluster.command("squeue", "--noheader", "--format=%j").stdout


def test_a_time_limit_above_the_partitions_is_refused_before_sbatch(slurm_cluster, tmp_path, cli):
    """sbatch takes it (EnforcePartLimits is off by default) and the job pends for ever, reason
    PartitionTimeLimit. The test cluster's partition `short` allows 10 minutes."""
    path = write_pipeline(tmp_path)
    for dry_run in (["--dry-run"], []):
        code, _, err = cli(
            "-q", "pipeline", "submit", *dry_run, path, "slurm.partition=short", "slurm.time='00:30:00'"
        )
        assert code == 2 and "slurm.time 00:30:00 is above partition short's MaxTime 00:10:00" in err, err
    assert not (tmp_path / "run" / "jobs.json").exists()
    assert "dna-test" not in slurm_cluster.command("squeue", "--noheader", "--format=%j").stdout
    # within the limit, or on the default partition (no limit), the same pipeline is accepted
    for setting in (["slurm.partition=short", "slurm.time='00:10:00'"], ["slurm.time='3-00:00:00'"]):
        code, _, err = cli("-q", "pipeline", "submit", "--dry-run", path, *setting)
        assert code == 0, err


def test_a_failing_stage_cancels_its_dependents(slurm_cluster, tmp_path, cli):
    missing = tmp_path / "no-such-genome.fa"
    path = write_pipeline(tmp_path)
    code, _, err = cli(
        "-q", "pipeline", "submit", path, f"stages.prep_genome.overrides.inputs=[{{path: {missing}}}]"
    )
    assert code == 0, err
    states = finished(tmp_path / "run", slurm_cluster)
    (genome,) = states["prep_genome"]
    assert (genome.state, genome.exit_code) == ("FAILED", "2:0")  # bad input: exit 2
    assert states["prep_splice"] and {s.state for s in states["prep_splice"]} == {"CANCELLED"}
    log = (tmp_path / "run" / "logs" / f"prep_genome-{genome.job_id}.out").read_text()
    assert str(missing) in log
    assert not (tmp_path / "run" / "prep_genome").exists() and leftovers(tmp_path / "run") == []
    code, out, _ = cli("pipeline", "status", tmp_path / "run")
    assert code == 1 and "FAILED" in out  # a script polling status learns the run failed
    # and a person reading it, where the log is and how to go on
    flat = " ".join(out.split())
    assert (
        f"prep_genome: FAILED — log {tmp_path / 'run' / 'logs' / f'prep_genome-{genome.job_id}.out'}" in flat
    )
    assert f"When the cause is fixed: biomask pipeline submit {path}" in flat
    cancelled = len(states["prep_splice"])  # each cancelled for prep_genome, not a failure of its own
    assert f"{cancelled} job(s) cancelled because a job they depend on ended without its output" in flat
    assert "prep_splice[0]: CANCELLED — log" not in flat and "prep_splice: CANCELLED — log" not in flat


@pytest.mark.parametrize("folder", ['it\'s 50%x "done"', "exp#2"])
def test_a_run_folder_with_spaces_quotes_and_percent_gets_its_job_logs(slurm_cluster, tmp_path, cli, folder):
    # sbatch reads `#SBATCH --output=` its own way: a space made it refuse the script ("Invalid
    # directive"), a quote was "unmatched", %x in a folder's name was expanded (the log lost), and a #
    # ended the line (every stage's log went to one file named after the folder before it)
    run_dir = tmp_path / folder / "run"
    missing = tmp_path / "no-such-genome.fa"
    code, _, err = cli(
        "-q",
        "pipeline",
        "submit",
        write_pipeline(tmp_path),
        f"run_dir={run_dir}",
        f"stages.prep_genome.overrides.inputs=[{{path: {missing}}}]",
    )
    assert code == 0, err
    (genome,) = finished(run_dir, slurm_cluster)["prep_genome"]
    assert (genome.state, genome.exit_code) == ("FAILED", "2:0")
    log = run_dir / "logs" / f"prep_genome-{genome.job_id}.out"
    assert str(missing) in log.read_text(encoding="utf-8")
    code, out, _ = cli("pipeline", "status", run_dir)
    assert code == 1 and str(log) in " ".join(out.split())


# A stand-in for a training step, to check the job script's mechanics (not training): each srun task
# records its start, and on USR1 "checkpoints" and exits 75; after the requeue it finds its checkpoint,
# "resumes" and exits 0 (ignoring any further USR1: the requeued job's time limit starts again).
STAND_IN = """\
#!/bin/bash
trap '' USR1
out=$1
echo "task $SLURM_PROCID of $SLURM_NTASKS restart ${SLURM_RESTART_COUNT:-0}" >> "$out/task$SLURM_PROCID.log"
if [ -f "$out/checkpoint$SLURM_PROCID" ]; then echo resumed >> "$out/task$SLURM_PROCID.log"; exit 0; fi
trap 'echo step > "$out/checkpoint$SLURM_PROCID"; exit 75' USR1
touch "$out/started$SLURM_PROCID"
for _ in $(seq 3000); do sleep 0.1; done
exit 1
"""


def test_requeue_mechanics_with_a_stand_in_step(slurm_cluster, tmp_path):
    """The rendered training script under SLURM's own near-the-limit signal: a 2-minute job with
    --signal=B:USR1@60 gets USR1 in the batch script 60-90 s before its limit -> forwarded to both srun
    tasks -> exit 75 -> `scontrol requeue` -> the job reruns (SLURM_RESTART_COUNT=1) and completes; an
    afterok dependent runs only after that final completion."""
    (tmp_path / "stand_in.sh").write_text(STAND_IN)
    job = JobScript(
        pipeline="mechanics",
        stage="train",
        summary="stand-in training step (mechanics test)",
        workdir=str(tmp_path),
        python="python3",
        program=f"bash {tmp_path / 'stand_in.sh'}",
        log_dir=str(tmp_path),
        slurm=SlurmSpec(tasks_per_node=2, time="2", signal_margin=60, mem="100M"),
        training=True,
        tasks=[[str(tmp_path)]],
    )
    script = tmp_path / "train.sbatch"
    script.write_text(render(job))
    job_id = slurm_cluster.command("sbatch", "--parsable", str(script)).stdout.strip()
    after = slurm_cluster.command(
        "sbatch", "--parsable", f"--dependency=afterok:{job_id}", "--kill-on-invalid-dep=yes",
        f"--output={tmp_path}/after.out", "--wrap", f"date +%s.%N > {tmp_path}/after",
    ).stdout.strip()  # fmt: skip
    assert job_id.isdigit() and after.isdigit()

    deadline = time.monotonic() + 170
    while not (tmp_path / "after").exists():
        assert time.monotonic() < deadline, slurm_cluster.command(
            "scontrol", "show", "job", "-o", job_id
        ).stdout
        time.sleep(0.5)
    show = slurm_cluster.command("scontrol", "show", "job", "-o", job_id).stdout
    fields = dict(f.split("=", 1) for f in show.split() if "=" in f)
    assert (fields["JobState"], fields["Restarts"], fields["ExitCode"]) == ("COMPLETED", "1", "0:0")
    for rank in (0, 1):
        assert (tmp_path / f"checkpoint{rank}").exists()  # USR1 reached both srun tasks
        assert (tmp_path / f"task{rank}.log").read_text().splitlines() == [
            f"task {rank} of 2 restart 0",
            f"task {rank} of 2 restart 1",
            "resumed",
        ]
    log = (tmp_path / f"train-{job_id}.out").read_text()
    assert "USR1: asking the training step to checkpoint" in log
    assert "requeueing job" in log and "(restart 1)" in log  # --open-mode=append keeps both runs
    end = time.mktime(time.strptime(fields["EndTime"], "%Y-%m-%dT%H:%M:%S"))
    assert float((tmp_path / "after").read_text()) >= end  # the dependent waited for the final run


def test_status_of_a_run_directory_loaded_from_the_pipeline_file(submitted, cli, monkeypatch):
    run_dir, _ = submitted
    monkeypatch.chdir(run_dir.parent)
    plan = load_plan(run_dir.parent / "dna-test.yaml")
    assert plan.run_dir == run_dir
    code, out, _ = cli("pipeline", "status", run_dir.parent / "dna-test.yaml", "--json")
    assert code == 0 and len(json.loads(out)) == 3
    assert [s.state for s in job_states(run_dir)] == ["COMPLETED"] * 3


# prep (genome, then the splice set with its tokenizer) -> pretrain (2 srun tasks, real DeepSpeed over
# gloo) -> evaluate (the pretrain stage's model/ against the one-hot baseline on splice).
TRAIN_EVAL_PIPELINE = """\
name: train-eval-test
run_dir: {run_dir}
env: {{OMP_NUM_THREADS: "1", DS_ACCELERATOR: cpu, PYTHONPATH: {repo}}}
slurm: {{time: "00:10:00", mem: 2G}}
stages:
  prep_genome:
    command: prep dna
    config: {repo}/configs/dna/ce2-chrX.yaml
    overrides:
      windows: {{length: 512, stride: 512, max_bases: 300000}}
      split.block_size: 10000
  prep_splice:
    command: prep dna
    config: {repo}/configs/dna/splice.yaml
    overrides:
      tokenizer.path: ${{stages.prep_genome.output}}
  pretrain:
    command: pretrain
    config: {repo}/configs/pretrain/dna-tiny.yaml
    overrides:
      data: {{store: "${{stages.prep_genome.output}}", max_length: 130}}
      model: {{max_len: 130, d_model: 32, d_ff: 64}}
      train: {{steps: 20, micro_batch_size: 8, eval_batches: 2, eval_ratios: [0.15, 0.5], checkpoint_every: 1000, progress: false}}
    slurm: {{tasks_per_node: 2, mem: 4G}}
  evaluate:
    command: evaluate
    config: {repo}/configs/evaluate/splice.yaml
    overrides:
      store: ${{stages.prep_splice.output}}
      checkpoints: {{tiny: "${{stages.pretrain.output}}/model"}}
      protocols: [linear_probe]
      seeds: [0, 1]
      baselines: [onehot_lr]
      random_init: false
"""


def test_prep_pretrain_on_two_srun_tasks_then_evaluate_completes_in_order(
    slurm_cluster, tmp_path, monkeypatch
):
    from biomask.training.distributed import RANK_VARS

    for name in RANK_VARS:  # jobs inherit the submitter's environment: no stale rank variables
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "train-eval.yaml"
    path.write_text(TRAIN_EVAL_PIPELINE.format(run_dir=tmp_path / "run", repo=REPO))
    assert main(["-q", "pipeline", "submit", str(path)]) == 0
    run_dir = tmp_path / "run"
    states = finished(run_dir, slurm_cluster, timeout=240)
    jobs = json.loads((run_dir / "jobs.json").read_text())["stages"]
    assert sorted(jobs["evaluate"]["after"]) == sorted(
        [jobs["prep_splice"]["job_id"], jobs["pretrain"]["job_id"]]
    )
    assert jobs["pretrain"]["after"] == [jobs["prep_genome"]["job_id"]]
    final = {name: s for name, (s,) in states.items()}
    logs = {name: (run_dir / "logs" / f"{name}-{s.job_id}.out") for name, s in final.items()}
    for name, s in final.items():
        assert (s.state, s.exit_code) == ("COMPLETED", "0:0"), logs[name].read_text()[-3000:]
    assert final["pretrain"].start >= final["prep_genome"].end
    assert final["evaluate"].start >= max(final["pretrain"].end, final["prep_splice"].end)
    # the training stage really ran as two srun tasks of one DeepSpeed job
    run = json.loads((run_dir / "pretrain" / "run.json").read_text())
    assert (run["world_size"], run["launcher"]) == (2, "slurm")
    # the evaluate stage read the pretrain stage's portable checkpoint
    model = run_dir / "pretrain" / "model"
    inputs = {i["name"]: i for i in read_run_info(run_dir / "evaluate")["inputs"]}
    assert inputs["tiny"]["path"] == str(model)
    assert inputs["tiny"]["sha256"] == json.loads((model / "config.json").read_text())["weights_sha256"]
    results = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    assert [m["name"] for m in results["methods"]] == ["one-hot + LR", "tiny (linear probe)"]
    assert results["summary"]["tiny (linear probe)"]["mcc"]["n"] == 2


def across_nodes_pipeline(run_dir: Path) -> str:
    """The training pipeline above, its pretrain stage on two nodes (partition multi), evaluation left out."""
    spec = yaml.safe_load(TRAIN_EVAL_PIPELINE.format(run_dir=run_dir, repo=REPO))
    spec["name"] = "across-nodes-test"
    spec["slurm"]["partition"] = "multi"
    spec["stages"] = {name: spec["stages"][name] for name in ("prep_genome", "pretrain")}
    spec["stages"]["pretrain"]["slurm"] = {"nodes": 2, "tasks_per_node": 1}
    spec["stages"]["pretrain"]["overrides"]["train"]["checkpoint_every"] = 10
    return yaml.safe_dump(spec)


def test_a_training_stage_runs_across_two_nodes(slurm_cluster, tmp_path, monkeypatch):
    """`slurm.nodes: 2` as the README documents it, on two slurmd of the test cluster: one srun task
    per node, the rendezvous at the first node by name (MASTER_ADDR from the step's host list), one
    DeepSpeed job of two processes writing one checkpoint."""
    import os
    import re
    import subprocess

    from biomask.training.distributed import RANK_VARS

    for name in RANK_VARS:  # jobs inherit the submitter's environment: no stale rank variables
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "across.yaml"
    path.write_text(across_nodes_pipeline(tmp_path / "run"))
    assert main(["-q", "pipeline", "submit", str(path)]) == 0
    run_dir = tmp_path / "run"
    states = finished(run_dir, slurm_cluster, timeout=240)
    (train,) = states["pretrain"]
    log = (run_dir / "logs" / f"pretrain-{train.job_id}.out").read_text()
    assert (train.state, train.exit_code) == ("COMPLETED", "0:0"), log[-3000:]
    job = slurm_cluster.command("scontrol", "show", "job", str(train.job_id)).stdout
    listed = re.search(r"^\s*NodeList=(\S+)", job, re.MULTILINE)
    assert listed is not None, job
    hosts = subprocess.run(
        ["scontrol", "show", "hostnames", listed.group(1)],
        capture_output=True, text=True, env={**os.environ, **slurm_cluster.env}, check=True,
    ).stdout.split()  # fmt: skip
    assert len(hosts) == 2 and "NumNodes=2" in job, job
    run = json.loads((run_dir / "pretrain" / "run.json").read_text())
    assert (run["world_size"], run["launcher"]) == (2, "slurm")
    assert "2 process(es) (slurm)" in log
    checkpoints = sorted(
        p.name for p in (run_dir / "pretrain" / "checkpoints").iterdir() if p.name.startswith("step")
    )
    assert checkpoints == ["step00000010", "step00000020"], checkpoints
    assert (run_dir / "pretrain" / "model" / "model.safetensors").is_file()
