"""`biomask pretrain` with the real DeepSpeed engine on CPU (gloo), on real prepared DNA (C. elegans
chrX) and a real expression matrix: every ZeRO stage learns, two processes under torchrun, resume
after SIGKILL ends with bit-identical weights, SIGUSR1 checkpoints and exits 75, the portable
checkpoint reproduces the engine's numbers without DeepSpeed, and bad input exits 2."""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from biomask.config import load_config
from biomask.models import load_pretrained
from biomask.store import TokenStore
from biomask.training.config import PretrainConfig
from biomask.training.data import DataSpec, eval_batches
from biomask.training.distributed import RANK_VARS
from biomask.training.trainer import held_out_loss
from tests.cells_store import prep_pbmc

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "pretrain" / "dna-tiny.yaml"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a small shared machine, OpenMP threads waiting for descheduled
    siblings slow tiny models down by orders of magnitude (torchrun sets the same)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def overrides(store: Path, output: Path, **extra) -> list[str]:
    """A tiny, quick run: 128-base crops of the 512-base windows, small batches, few steps."""
    keys = {
        "data.store": store,
        "output": output,
        "data.max_length": 130,
        "model.max_len": 130,
        "model.d_model": 32,
        "model.d_ff": 64,
        "optim.lr": 3e-3,
        "optim.warmup_steps": 2,
        "train.steps": 24,
        "train.micro_batch_size": 8,
        "train.log_every": 4,
        "train.eval_batches": 2,
        "train.eval_ratios": "[0.15,0.5]",
        "train.checkpoint_every": 8,
        "train.progress": "false",
        **extra,
    }
    return [f"{k}={v}" for k, v in keys.items()]


def config(store: Path, output: Path, **extra) -> PretrainConfig:
    return load_config(PretrainConfig, CONFIG, overrides(store, output, **extra))


def train_losses(output: Path) -> list[float]:
    lines = [json.loads(x) for x in (output / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if x["kind"] == "train"]


def subprocess_env() -> dict[str, str]:
    """The environment for a child run: without the rank variables an in-process run left behind."""
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARS}
    env.update(DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return env


def biomask_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "biomask", *args]


def pretrain_to_end(args: list[str], env: dict[str, str]) -> None:
    """`biomask pretrain` with the test config and `args`, in a child process, to a clean exit."""
    cmd = biomask_cmd("pretrain", "-c", str(CONFIG), *args)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]


def reloaded_eval(output: Path, store: Path, cfg: PretrainConfig) -> tuple[dict, dict]:
    """Held-out losses of the portable checkpoint, loaded without DeepSpeed, beside the engine's own."""
    from biomask.training.distributed import DistEnv

    model = load_pretrained(output / "model")
    info = json.loads((output / "model" / "config.json").read_text())
    token_store = TokenStore(store)
    batches = eval_batches(
        token_store.split("val"),
        DataSpec.from_store(token_store),
        max_length=cfg.data.max_length,
        batch_size=cfg.train.micro_batch_size,
        n_batches=cfg.train.eval_batches,
        world_size=1,
        rank=0,
    )
    again = held_out_loss(
        model, batches, cfg, model.config, DistEnv(0, 1, 0, "", 0, "plain"), torch.device("cpu")
    )
    return again["loss"], info["eval"]["loss"]


def reloaded_eval_matches(output: Path, store: Path, cfg: PretrainConfig) -> None:
    """The portable checkpoint reproduces the engine's final held-out losses."""
    again, engine = reloaded_eval(output, store, cfg)
    assert again == engine  # bit-identical: same fp32 weights, same kernels


def deepspeed_engines() -> int:
    import gc

    return sum(type(o).__name__ == "DeepSpeedEngine" for o in gc.get_objects())


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_every_zero_stage_learns_and_exports(stage, genome_store, tmp_path):
    """... and a Python caller's run frees its engine when it returns: ZeRO 1-3 hook every parameter's
    gradient accumulator, which kept their engines (model, optimizer state) alive for good, so on a GPU
    a notebook's next run found the memory of every earlier one still held."""
    import gc

    from biomask.training.trainer import pretrain

    extra = {"deepspeed.stage": stage}
    if stage == 3:  # partition even the tiny test parameters
        extra["deepspeed.overrides.zero_optimization.stage3_param_persistence_threshold"] = 0
    cfg = config(genome_store, tmp_path / "run", **extra)
    gc.collect()
    before = deepspeed_engines()
    linear = torch.nn.functional.linear
    gc.disable()  # what the call frees, it frees itself
    try:
        out = pretrain(cfg)
        assert deepspeed_engines() == before
    finally:
        gc.enable()
    assert torch.nn.functional.linear is linear  # ZeRO-3's own "until manually reset": torch's is back
    losses = train_losses(out)
    assert losses[-1] < losses[0] - 0.4, losses  # from ~ln(10) toward the base composition
    run = json.loads((out / "run.json").read_text())
    assert run["deepspeed"]["zero_optimization"]["stage"] == stage
    assert run["inputs"][0]["sha256"]  # the store's manifest checksum
    assert not (out / "in_progress.json").exists()
    assert sorted(p.name for p in (out / "checkpoints").glob("step*")) == ["step00000016", "step00000024"]
    reloaded_eval_matches(out, genome_store, cfg)


@pytest.mark.parametrize("precision", ["bf16", "bf16-weights"])
def test_both_bf16_modes_learn_and_export_fp32(precision, genome_store, tmp_path):
    """The GPU default (bf16: DeepSpeed's torch_autocast) and DeepSpeed's bf16 weights, run on the CPU's
    bf16 kernels: the loss falls, and the portable checkpoint holds fp32 weights that reproduce the
    engine's held-out losses up to bf16 rounding."""
    from biomask.training.trainer import pretrain

    cfg = config(genome_store, tmp_path / "run", **{"deepspeed.stage": 2, "train.precision": precision})
    out = pretrain(cfg)
    losses = train_losses(out)
    assert losses[-1] < losses[0] - 0.4, losses
    run = json.loads((out / "run.json").read_text())
    assert run["deepspeed"]["torch_autocast"]["enabled"] is (precision == "bf16")
    assert run["deepspeed"]["bf16"]["enabled"] is (precision == "bf16-weights")
    weights = load_file(out / "model" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}
    info = json.loads((out / "model" / "config.json").read_text())
    assert info["training"]["precision"] == precision
    again, engine = reloaded_eval(out, genome_store, cfg)
    assert again == pytest.approx(engine, abs=0.05)


def test_rerun_reuses_and_changed_config_is_refused(genome_store, tmp_path, cli):
    args = ["pretrain", "-c", CONFIG, *overrides(genome_store, tmp_path / "run", **{"train.steps": 4})]
    code, _, _ = cli(*args)
    assert code == 0
    before = (tmp_path / "run" / "run.json").read_text()
    code, _, err = cli(*args, "train.log_every=1")  # a non-semantic key: still the same result
    assert code == 0 and "reusing" in err
    assert (tmp_path / "run" / "run.json").read_text() == before
    code, _, err = cli(*args, "optim.lr=0.01")
    assert code == 2 and "optim.lr" in err and "--overwrite" in err
    assert "model.init_from" not in err
    # more steps: --overwrite trains again from the start; going on from these weights is said too
    code, _, err = cli(*args[:-1], "train.steps=8")
    assert code == 2 and "train.steps: 4 -> 8" in err and "--overwrite" in err
    assert f"model.init_from={tmp_path / 'run' / 'model'}" in err
    # going on from them: the log names the sizes that train (the checkpoint's), not model.preset's
    cont = overrides(genome_store, tmp_path / "cont", **{"train.steps": 2})
    code, _, err = cli("pretrain", "-c", CONFIG, *cont, f"model.init_from={tmp_path / 'run' / 'model'}",
                       "model.preset=small")  # fmt: skip
    arch = json.loads((tmp_path / "run" / "model" / "config.json").read_text())["architecture"]
    assert code == 0 and f"pretrain: {arch['n_layers']}-layer, {arch['d_model']}-wide encoder" in err, err
    assert "small encoder" not in err
    # 2 steps of a 2-step warm-up: the rate never reaches its peak before the end, said
    assert (
        "optim.warmup_steps (2) >= train.steps (2): the learning rate reaches 100% of optim.lr at most" in err
    )


def test_a_run_written_before_keys_were_added_is_reused_by_an_upgrade(genome_store, tmp_path, cli):
    """Keys pretrain gained on 2026-12-03/04 (model.embed_norm, model.objective, optim.fused,
    train.compile) at the values that do what it did before: a run written before them is the same
    run. An upgrade refused it as 'a different config' listing those keys (a pipeline trained every
    model again); now it is reused, and a real change still names only itself."""
    import yaml

    from biomask.provenance import sha256_json
    from biomask.stage import OUTPUT_FORMAT_VERSION, input_identity
    from biomask.training.config import NON_SEMANTIC

    run = tmp_path / "run"
    args = ["pretrain", "-c", CONFIG, *overrides(genome_store, run, **{"train.steps": 4})]
    assert cli(*args)[0] == 0
    # what biomask of 2026-12-03 wrote: its config.yaml without those keys, and its fingerprint of it
    config = yaml.safe_load((run / "config.yaml").read_text())
    for section, key in [("model", "embed_norm"), ("model", "objective"), ("model", "decorrelation"),
                         ("model", "batch_covariate"), ("model", "input_scale"), ("optim", "fused"),
                         ("train", "compile")]:  # fmt: skip
        del config[section][key]
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    semantic = json.loads(json.dumps(config))
    for dotted in NON_SEMANTIC:
        *parents, last = dotted.split(".")
        node = semantic
        for part in parents:
            node = node.get(part, {})
        node.pop(last, None)
    info = json.loads((run / "run.json").read_text())
    info.pop("output_sha256")  # recorded since 2026-12-06 only
    info["fingerprint"] = sha256_json(
        {
            "stage": "pretrain",
            "format": OUTPUT_FORMAT_VERSION,
            "config": sha256_json(semantic),
            "inputs": sorted(input_identity(i) for i in info["inputs"]),
        }
    )
    (run / "run.json").write_text(json.dumps(info))
    weights = (run / "model" / "model.safetensors").stat().st_mtime_ns

    code, _, err = cli(*args)
    assert code == 0 and "reusing" in err, err
    assert (run / "model" / "model.safetensors").stat().st_mtime_ns == weights
    # as a pipeline starts it, a process of its own: reused before torch is imported (most of each
    # reused task's time in a pipeline rerun)
    script = "import sys; from biomask.cli import main; rc = main(sys.argv[1:]); print('torch' in sys.modules); sys.exit(rc)"
    fresh = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True)
    assert fresh.returncode == 0 and fresh.stdout.split() == [str(run), "False"], fresh.stderr
    assert "is up to date (same config and data); reusing it" in fresh.stderr
    code, _, err = cli(*args, "train.steps=5")
    assert code == 2 and "train.steps: 4 -> 5" in err, err
    assert "embed_norm" not in err and "fused" not in err and "compile" not in err


def test_a_runs_own_deepspeed_json_counts_by_its_contents(genome_store, tmp_path, cli, repo):
    """deepspeed.config: the user's own JSON. Its path was the run's identity, not its contents: an
    edited file (another ZeRO stage, clipping, buckets) reused the finished run as if nothing changed,
    and an interrupted run resumed under it met checkpoints it could not read."""
    own = tmp_path / "ds.json"
    own.write_text((repo / "configs/deepspeed/zero0.json").read_text())
    run = tmp_path / "run"
    args = [
        "pretrain",
        "-c",
        CONFIG,
        *overrides(genome_store, run, **{"train.steps": 4}),
        f"deepspeed.config={own}",
    ]
    assert cli(*args)[0] == 0
    code, _, err = cli(*args)
    assert code == 0 and "reusing" in err, err
    settings = json.loads(own.read_text())
    settings["zero_optimization"]["reduce_bucket_size"] = 1e7
    own.write_text(json.dumps(settings))
    code, _, err = cli(*args)
    # named: the file, edited in place, with its digests before and after
    assert code == 2 and f"other input data:\n  deepspeed-config: {own}, changed since (" in err, err
    assert "--overwrite" in err
    assert cli(*args, "--overwrite")[0] == 0
    assert (
        json.loads((run / "run.json").read_text())["deepspeed"]["zero_optimization"]["reduce_bucket_size"]
        == 1e7
    )


def test_resuming_a_run_other_code_started_says_so_and_records_it(genome_store, tmp_path, cli):
    """An upgrade between a requeue and its resume: the steps before were trained by the old code, the
    rest by the new. That was silent and run.json named the new code alone; now the resume says so
    and run.json's trained_by records which code trained which steps (absent when one code did)."""
    from biomask.provenance import code_version

    run = tmp_path / "run"
    args = ["pretrain", "-c", CONFIG, *overrides(genome_store, run, **{"train.steps": 4})]
    assert cli(*args, "train.checkpoint_every=2")[0] == 0
    info = json.loads((run / "run.json").read_text())
    assert "trained_by" not in info and info["resumed_from_steps"] == []
    # what an interrupted run of the 2026-12-05 biomask left: no code in its in_progress.json
    (run / "run.json").unlink()
    shutil.rmtree(run / "model")
    shutil.rmtree(run / "checkpoints" / "step00000004")
    state = {"fingerprint": info["fingerprint"], "world_size": 1, "started": info["created"]}
    (run / "in_progress.json").write_text(json.dumps(state))

    code, _, err = cli(*args, "train.checkpoint_every=2")
    assert code == 0, err
    assert "up to 2 were trained by other code (an earlier biomask, which did not record its code)" in err
    info = json.loads((run / "run.json").read_text())
    assert info["resumed_from_steps"] == [2]
    assert info["trained_by"] == [{"from_step": 0, "code": None}, {"from_step": 2, "code": code_version()}]


def test_two_processes_under_torchrun(genome_store, tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    out = tmp_path / "run"
    from biomask.training.distributed import free_port

    cmd = [str(torchrun), "--nproc_per_node=2", f"--master_port={free_port()}", "-m", "biomask"]
    cmd += ["pretrain", "-c", str(CONFIG)]
    cmd += overrides(genome_store, out, **{"train.steps": 6, "deepspeed.stage": 2})
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 2 and run["launcher"] == "torchrun"
    model = json.loads((out / "model" / "config.json").read_text())
    assert model["training"]["global_batch"] == 16
    assert len(train_losses(out)) == 2
    load_pretrained(out / "model")
    # a rerun of the finished run: every rank sees it is done and returns, none waits on the others
    before = (out / "run.json").read_text()
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reusing" in proc.stderr and (out / "run.json").read_text() == before
    assert proc.stderr.count("is up to date") == 1  # said by one process, not by each
    # an srun task sets SLURM_PROCID, not RANK: its second task says nothing either
    task = {k: v for k, v in subprocess_env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    task.update(SLURM_PROCID="1", SLURM_NTASKS="2", SLURM_JOB_ID="7")
    cmd_task = [sys.executable, "-m", "biomask", "pretrain", "-c", str(CONFIG)]
    cmd_task += overrides(genome_store, out, **{"train.steps": 6, "deepspeed.stage": 2})
    proc = subprocess.run(cmd_task, env=task, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0 and proc.stdout == "" and "up to date" not in proc.stderr, proc.stderr[-2000:]


def test_deepspeed_launcher_and_zero3_with_activation_checkpointing(genome_store, tmp_path):
    from biomask.training.distributed import free_port

    out = tmp_path / "run"
    launcher = Path(sys.executable).parent / "deepspeed"
    script = Path(sys.executable).parent / "biomask"  # the console script, as the README shows
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(free_port()), str(script)]
    cmd += [
        "pretrain",
        "-c",
        str(CONFIG),
        *overrides(genome_store, out, **{"train.steps": 4, "deepspeed.stage": 3}),
    ]
    cmd += ["model.activation_checkpointing=true"]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert (run["world_size"], run["launcher"], run["deepspeed"]["zero_optimization"]["stage"]) == (
        2,
        "deepspeed",
        3,
    )
    assert run["parameters"] > 20_000  # counted before ZeRO-3 partitioned them
    load_pretrained(out / "model")


def test_a_process_with_a_group_ends_with_its_code_its_output_and_its_exit_handlers(tmp_path):
    """leave_process skips the interpreter's teardown (where a gloo rank once aborted, exit 250), not
    what a user sees: the exit code, buffered output, and exit handlers (which destroy the group)."""
    marker = tmp_path / "handlers-ran"
    script = f"""
import atexit, pathlib, sys, torch
from biomask.training.distributed import init_process_group, leave_process, setup_env
init_process_group(setup_env())
atexit.register(lambda: pathlib.Path({str(marker)!r}).write_text(str(torch.distributed.is_initialized())))
sys.stdout.write("no newline yet")
leave_process(3)
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], env=subprocess_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert proc.stdout.endswith("no newline yet")
    # handlers run last-registered first: the group is still up for this one, destroyed after it
    assert marker.read_text() == "True"


def test_a_traceback_in_a_process_with_a_group_still_exits_1_with_its_traceback():
    script = """
import biomask.cli as cli
from biomask.training.distributed import init_process_group, setup_env
def failing(argv=None):
    init_process_group(setup_env())
    raise RuntimeError("the backend failed")
cli.main = failing
cli.entry()
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], env=subprocess_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" in proc.stderr and "RuntimeError: the backend failed" in proc.stderr


def test_ctrl_c_before_a_command_starts_is_a_line_not_a_traceback():
    """A kill-fuzzer's Ctrl-C 0.35 s into `export-hf` landed before the command's own handler (while
    it imported what it parses with): a 40-line KeyboardInterrupt traceback. Now one line, exit 130."""
    script = """
from biomask import cli
def interrupted(argv=None):
    raise KeyboardInterrupt
cli.main = interrupted
cli.entry()
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130 and proc.stderr.strip() == "biomask: interrupted", proc.stderr[-2000:]


def test_srun_style_launch_maps_slurm_variables(genome_store, tmp_path):
    """Two tasks started the way srun starts them: only SLURM_* variables (and a port) set."""
    from biomask.training.distributed import free_port

    out = tmp_path / "run"
    cmd = biomask_cmd("pretrain", "-c", str(CONFIG), *overrides(genome_store, out, **{"train.steps": 4}))
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = subprocess_env()
        env.update(
            SLURM_PROCID=str(rank),
            SLURM_NTASKS="2",
            SLURM_LOCALID=str(rank),
            SLURM_JOB_ID="4242",
            SLURM_JOB_NODELIST="localhost",
            MASTER_PORT=port,
        )
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    for proc in procs:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert (run["world_size"], run["launcher"]) == (2, "slurm")


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"run ended early (exit {proc.returncode}): {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.02)


def test_sigkill_then_resume_gives_the_same_final_weights(genome_store, tmp_path):
    extra = {
        "train.steps": 30,
        "train.checkpoint_every": 5,
        "model.dropout": 0.1,
        "masking.positions.kind": "span",
        "masking.ratio.granularity": "sample",  # each record's ratio logged too, across the resume
        "masking.ratio.low": 0.1,
        "masking.ratio.high": 0.9,
    }
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    env = subprocess_env()
    pretrain_to_end(overrides(genome_store, straight, **extra), env)

    cmd = biomask_cmd("pretrain", "-c", str(CONFIG), *overrides(genome_store, resumed, **extra))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: (resumed / "checkpoints" / "step00000010").is_dir(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (resumed / "run.json").exists() and (resumed / "in_progress.json").exists()

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr
    # run.json tells a resumed run from one that never stopped
    resumed_at = json.loads((resumed / "run.json").read_text())["resumed_from_steps"]
    assert len(resumed_at) == 1 and resumed_at[0] >= 10
    assert json.loads((straight / "run.json").read_text())["resumed_from_steps"] == []
    a, b = (
        load_file(str(straight / "model" / "model.safetensors")),
        load_file(str(resumed / "model" / "model.safetensors")),
    )
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name  # bit-identical
    # the metrics read as one run: every step logged once
    lines = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    train_steps = [x["step"] for x in lines if x["kind"] == "train"]
    assert train_steps == sorted(set(train_steps)) == [*range(4, 29, 4), 30]
    assert train_losses(straight) == pytest.approx(train_losses(resumed), rel=1e-12)
    # every step's realised mask ratio is logged, once, across the kill and the resume
    step_ratios = [
        json.loads(x).get("step_ratios") for x in (straight / "metrics.jsonl").read_text().splitlines()
    ]
    again_ratios = [x.get("step_ratios") for x in lines]
    assert step_ratios == again_ratios
    flat = [r for window in step_ratios if window for r in window]
    assert len(flat) == 30 and all(0.0 < r < 1.0 for r in flat)
    # drawn per record: each record's realised ratio, where the pooled step ratio averages them away
    from biomask.report.collect import load_pretrain_run

    counts = load_pretrain_run(resumed).record_ratio_counts
    assert counts.sum() == 30 * 8  # every record of every step, once, across the kill
    assert counts.tolist() == load_pretrain_run(straight).record_ratio_counts.tolist()
    records = np.repeat((np.arange(40) + 0.5) / 40, counts.astype(int))
    assert records.min() < 0.2 and records.max() > 0.8  # U(0.1, 0.9) per record ...
    assert np.std(records) > 2 * np.std(flat)  # ... while the pooled step ratios crowd its mean


def test_every_micro_batch_s_records_are_counted_and_only_where_drawn_per_record(genome_store, tmp_path):
    """With gradient accumulation each micro-batch's records count; a ratio drawn per batch (or a
    schedule) logs no per-record counts (its step ratios are the records')."""
    from biomask.training.trainer import pretrain

    extra = {
        "train.steps": 3,
        "train.grad_accum": 2,
        "train.log_every": 1,
        "masking.ratio.granularity": "sample",
    }
    out = pretrain(config(genome_store, tmp_path / "accum", **extra))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert [sum(x["record_ratio_counts"]) for x in lines] == [8 * 2] * 3  # micro-batch 8, accumulated 2
    extra["masking.ratio.granularity"] = "batch"
    out = pretrain(config(genome_store, tmp_path / "batch", **extra))
    assert "record_ratio_counts" not in (out / "metrics.jsonl").read_text()


def test_each_record_is_counted_in_the_bin_of_its_realised_ratio():
    """From the whole counts: 7 of 10 masked as a float32 ratio (0.6999999) fell in the bin below."""
    from biomask.training.trainer import RECORD_RATIO_BINS, count_record_ratios

    n_maskable = torch.tensor([10, 10, 40, 7, 0, 7])
    masked = torch.zeros(6, 40, dtype=torch.bool)  # padded to 40: the ratio is of the maskable tokens
    for row, k in enumerate([7, 10, 1, 3, 0, 5]):
        masked[row, :k] = True
    counts = torch.zeros(RECORD_RATIO_BINS, dtype=torch.float64)
    count_record_ratios(counts, {"masked": masked, "n_maskable": n_maskable})
    # 0.7 -> bin 28; 1.0 -> the last bin; 1/40 -> bin 1; 3/7 (0.43) -> bin 17; 5/7 (0.714) -> bin 28, its
    # bin's lower edge 0.7 (not rounded up to 29); nothing to mask: not counted
    assert {i: int(c) for i, c in enumerate(counts.tolist()) if c} == {28: 2, 39: 1, 1: 1, 17: 1}


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGINT], ids=["SIGUSR1", "Ctrl-C"])
def test_a_signal_checkpoints_and_exits_75_then_resumes(genome_store, tmp_path, cli, sig):
    """A scheduler's signal, or Ctrl-C at a terminal: the steps so far are kept, not lost."""
    out = tmp_path / "run"
    args = overrides(genome_store, out, **{"train.steps": 150, "train.checkpoint_every": 1000})
    proc = subprocess.Popen(
        biomask_cmd("pretrain", "-c", str(CONFIG), *args),
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # as at a terminal: a suite started in the background of a script inherits Ctrl-C ignored,
        # which biomask rightly keeps
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    _wait_for(lambda: (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").stat().st_size > 0, proc)
    if sig == signal.SIGUSR1:  # the live run holds its output: any second run is refused while it trains
        from biomask.errors import OutputBusyError
        from biomask.outputs import hold_output

        with pytest.raises(OutputBusyError, match=f"pretrain, pid {proc.pid} on "):
            hold_output(out, "pretrain")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    assert "exiting with code 75 so the job can be requeued" in err and f"received {sig.name}" in err
    (ckpt,) = list((out / "checkpoints").glob("step*"))
    step = int(ckpt.name[4:])
    assert 4 <= step < 150
    assert not (out / "run.json").exists()

    # an incompatible config cannot resume it ...
    code, _, err = cli("pretrain", "-c", CONFIG, *args, "masking.scheme=bert15")
    assert code == 2 and "interrupted run" in err and "masking.ratio.kind" in err
    # ... the same one does, in-process and to the end
    code, _, err = cli(
        "pretrain", "-c", CONFIG, *args[:-2], "train.steps=150", f"train.checkpoint_every={step + 2}"
    )
    assert code == 0, err
    assert (out / "run.json").exists()
    meta = json.loads((out / "model" / "config.json").read_text())
    assert meta["training"]["steps"] == 150


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGUSR2, signal.SIGXCPU], ids=lambda s: s.name)
def test_other_schedulers_stop_signals_ask_training_for_its_checkpoint(sig):
    """SGE's -notify sends SIGUSR2 before its SIGKILL, LSF's -wa often USR2, a CPU-time limit SIGXCPU:
    each ended a training run where it stood (no checkpoint, no message, the steps since the last
    checkpoint lost). Each is a stop request now, as SIGTERM and SIGUSR1 are (the loop then
    checkpoints and exits 75: test_a_signal_checkpoints_and_exits_75_then_resumes), and left ignored
    after that checkpoint so a repeat cannot turn exit 75 into a kill."""
    from biomask.training.distributed import StopSignal

    stop = StopSignal()
    signal.signal(sig, lambda *_: None)  # a signal StopSignal left alone fails here, not kills pytest
    stop.install()
    try:
        os.kill(os.getpid(), sig)
        assert stop.received == sig and stop.name == sig.name
        stop.ignore_from_now()
        assert signal.getsignal(sig) is signal.SIG_IGN
    finally:
        stop.restore()
        signal.signal(sig, signal.SIG_DFL)
    # one the job script ignores (`trap '' USR1`: SGE's -notify warns of a suspend with it) stays
    # ignored: the run goes on through the suspend rather than ending
    signal.signal(sig, signal.SIG_IGN)
    kept = StopSignal()
    kept.install()
    try:
        assert signal.getsignal(sig) is signal.SIG_IGN
        os.kill(os.getpid(), sig)
        assert kept.received is None
    finally:
        kept.restore()
        signal.signal(sig, signal.SIG_DFL)


def test_a_stop_signal_before_training_began_still_asks_for_a_requeue(
    genome_store, tmp_path, cli, monkeypatch
):
    """A scheduler's signal while pretrain was starting (importing, reading its config and store),
    before training's own handlers, exited 143 where training exits 75: a job script requeueing on
    75 let the job end. Both are 75 now, with nothing written; other commands keep 143."""
    import biomask.cli as cli_module

    real = cli_module._stage_config

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGUSR2)  # SGE's -notify, while the config is read
        return real(*args, **kwargs)

    monkeypatch.setattr(cli_module, "_stage_config", signalled)
    out = tmp_path / "run"
    code, _, err = cli("pretrain", "-c", CONFIG, *overrides(genome_store, out))
    assert code == 75, err
    assert "stopped by SIGUSR2 outside the training steps" in err and "requeued" in err
    assert not out.exists()
    code, _, err = cli("prep", "dna", "-c", REPO / "configs/dna/splice.yaml", f"output={tmp_path / 'p'}")
    assert code == 143 and "stopped by SIGUSR2" in err
    # fit-cells trains too (exit 75 during training): reading the cells or preparing them, the same
    from biomask.embedding import fit

    def reading(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGUSR2)

    monkeypatch.setattr(fit, "fit_cells_file", reading)
    code, _, err = cli("fit-cells", "--input", tmp_path / "cells.h5ad", "--output", tmp_path / "fit")
    assert code == 75 and "stopped by SIGUSR2 outside the training steps" in err, err


def test_a_resume_in_another_precision_or_on_another_device_is_said_and_recorded(tmp_path, caplog):
    """train.precision auto: a run that started in bf16 on a GPU and resumed on a CPU node went on in
    fp32 without a word, and run.json named fp32 alone."""
    import logging

    from biomask.training import rundir

    rundir.mark_in_progress(tmp_path, "f", 1)
    with caplog.at_level(logging.WARNING, logger="biomask"):
        rundir.note_precision(tmp_path, 0, "bf16", "cuda")
        rundir.note_precision(tmp_path, 120, "bf16", "cuda")  # the same again: nothing to say
        assert caplog.text == "" and rundir.trained_in(tmp_path) is None
        rundir.note_precision(tmp_path, 295, "fp32", "cpu")
    assert "resumes in fp32 on cpu where steps 0-295 trained in bf16 on cuda" in caplog.text
    # train.precision auto: the way back is the device (naming bf16 would change the config, refused)
    assert "resume it on a cuda node;" in caplog.text and "train.precision=" not in caplog.text
    assert rundir.trained_in(tmp_path) == [
        {"from_step": 0, "precision": "bf16", "device": "cuda"},
        {"from_step": 295, "precision": "fp32", "device": "cpu"},
    ]
    # the same precision on another device is a change too; a precision the config names is advised
    other = tmp_path / "other"
    other.mkdir()
    rundir.mark_in_progress(other, "f", 1)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="biomask"):
        rundir.note_precision(other, 0, "bf16", "cuda", "bf16")
        rundir.note_precision(other, 10, "bf16", "cpu", "bf16")
    assert [s["device"] for s in rundir.trained_in(other)] == ["cuda", "cpu"]
    assert "resume it on a cuda node with train.precision=bf16" in caplog.text


def test_pretrain_records_each_parts_precision_and_device(genome_store, tmp_path, monkeypatch, caplog):
    """run.json's trained_in, written by the run itself: the steps before a resume stood in for by a
    GPU part (bf16 on cuda), this machine's after it."""
    import logging

    from biomask.training import rundir, trainer

    real = rundir.note_precision

    def after_a_gpu_part(path, step, precision, device, asked="auto"):
        real(path, 0, "bf16", "cuda")
        real(path, step, precision, device, asked)

    monkeypatch.setattr(rundir, "note_precision", after_a_gpu_part)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with caplog.at_level(logging.WARNING, logger="biomask"):
        out = trainer.pretrain(config(genome_store, tmp_path / "run", **{"train.steps": 2}))
    info = json.loads((out / "run.json").read_text())
    assert [(s["precision"], s["device"]) for s in info["trained_in"]] == [("bf16", "cuda"), ("fp32", "cpu")]
    assert "resumes in fp32 on cpu" in caplog.text


def test_a_python_caller_gets_its_torch_thread_count_back(genome_store, tmp_path, monkeypatch):
    """A run sets torch's threads to $OMP_NUM_THREADS (numba's OpenMP layer had reset them); a caller
    who had set its own count (torch.set_num_threads) was left with the run's."""
    from biomask.training.trainer import pretrain

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        pretrain(config(genome_store, tmp_path / "run", **{"train.steps": 2}))
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_a_python_caller_gets_its_signal_handlers_and_random_streams_back_and_can_resume(
    genome_store, tmp_path, monkeypatch
):
    """A notebook kernel (or a script) calling the pretrain API, as fit_cells does: a SIGTERM that
    stopped training left SIGTERM, SIGUSR1 and SIGHUP ignored in the caller's process, so the kernel
    manager could no longer stop it. The `biomask` command keeps them ignored until it exits 75 (srun
    may signal it again meanwhile); a Python caller gets its own handlers back, and resumes by calling
    again. Its random streams are its own too: a run left numpy and random seeded with train.seed."""
    import gc
    import threading

    from biomask.errors import Requeue
    from biomask.training.trainer import pretrain

    out = tmp_path / "run"
    # ZeRO-0, what one process (a notebook's fit_cells) trains with (ZeRO 1-3 released: every-stage test)
    steps = {"train.steps": 60, "train.checkpoint_every": 1000, "deepspeed.stage": 0}
    cfg = config(genome_store, out, **steps)
    received: list[int] = []

    def kernel(signum, frame):  # the caller's own handler, as a notebook kernel or a service has
        received.append(signum)

    names = (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)
    saved = {sig: signal.signal(sig, kernel) for sig in names}

    def engines() -> int:
        return sum(type(o).__name__ == "DeepSpeedEngine" for o in gc.get_objects())

    gc.collect()
    leaked = engines()  # earlier tests' ZeRO-2 engines

    def stopped_by_sigterm(sig: int = signal.SIGTERM, raised: type = Requeue) -> BaseException:
        """Run until training logs, then SIGTERM (as a kernel manager or a scheduler sends it)."""
        size = (out / "metrics.jsonl").stat().st_size if (out / "metrics.jsonl").is_file() else 0

        def terminate_once_training() -> None:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").stat().st_size > size:
                    os.kill(os.getpid(), sig)
                    return
                time.sleep(0.01)

        sender = threading.Thread(target=terminate_once_training, daemon=True)
        sender.start()
        with pytest.raises(
            raised, match=f"received {signal.Signals(sig).name}: checkpointed step"
        ) as stopped:
            pretrain(cfg)
        sender.join()
        return stopped.value

    try:
        with monkeypatch.context() as command_line:  # as cli.entry, the `biomask` command, sets it
            command_line.setattr(Requeue, "ends_process", True)
            stopped_by_sigterm()
        assert {sig: signal.getsignal(sig) for sig in names} == dict.fromkeys(names, signal.SIG_IGN)
        for sig in names:
            signal.signal(sig, kernel)

        gc.disable()  # what the call frees, it frees itself
        try:
            stopped = stopped_by_sigterm()  # from Python
            assert engines() == leaked  # the stop the caller holds does not keep the run's engine alive
        finally:
            gc.enable()
        # what to do, said to a Python caller: no process exits there with 75
        assert "again to resume" in str(stopped) and "exiting with code" not in str(stopped)
        assert received == []  # training's handler took it, not the caller's
        assert {sig: signal.getsignal(sig) for sig in names} == dict.fromkeys(names, kernel)
        os.kill(os.getpid(), signal.SIGTERM)  # and the caller's handler works again
        assert received == [signal.SIGTERM]
        assert not (out / "run.json").exists()
        # Ctrl-C (Jupyter's "Interrupt kernel") from Python: checkpointed too, and a KeyboardInterrupt,
        # so a loop over samples with `except Exception` stops (a Requeue there trained the next one)
        from biomask.errors import Interrupted

        interrupt = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a kernel
        try:
            interrupted = stopped_by_sigterm(signal.SIGINT, Interrupted)
        finally:
            signal.signal(signal.SIGINT, interrupt)
        assert isinstance(interrupted, KeyboardInterrupt) and not isinstance(interrupted, Exception)
        assert "again to resume" in str(interrupted)
        # the same call again resumes from the checkpoint and finishes
        np.random.seed(7), random.seed(7), torch.manual_seed(7)
        expected = np.random.rand(), random.random(), torch.rand(1).item()
        np.random.seed(7), random.seed(7), torch.manual_seed(7)
        gc.disable()
        try:
            pretrain(cfg)
            assert engines() == leaked  # a notebook's next run (on a GPU) finds this one's memory freed
        finally:
            gc.enable()
        assert (np.random.rand(), random.random(), torch.rand(1).item()) == expected
        resumed = json.loads((out / "run.json").read_text())["resumed_from_steps"]
        assert len(resumed) == 3 and 4 <= resumed[0] < resumed[1] < resumed[2] < 60
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_training_runs_from_a_thread_other_than_the_main_one(genome_store, tmp_path):
    """fit_cells or the pretrain API in a background thread (a notebook kept responsive, a web
    service's worker) stopped with "ValueError: signal only works in main thread" once the cells were
    prepared. Signals reach the main thread only: training from another thread leaves its handlers as
    they are, and runs."""
    import threading

    from biomask.training.trainer import pretrain

    out = tmp_path / "run"
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    result: list = []
    worker = threading.Thread(
        target=lambda: result.append(_outcome(pretrain, config(genome_store, out, **{"train.steps": 8})))
    )
    worker.start()
    worker.join()
    assert result == [out], result
    assert json.loads((out / "model" / "config.json").read_text())["training"]["steps"] == 8
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_two_runs_in_threads_of_one_process_take_turns_and_give_their_seeds_results(
    genome_store, tmp_path, monkeypatch
):
    """A notebook's seed sweep with a thread pool: two runs at once drew from one set of global
    generators (each seed's weights a mix of both, recorded as that seed's) and swapped fds 1 and 2 over
    each other (the process's output went to /dev/null for good). They take turns: each gives what it
    gives alone, and the descriptors are the ones the process had."""
    import threading

    from biomask.training import trainer
    from biomask.training.trainer import pretrain

    real_build = trainer.build_model

    def slow_build(arch):  # between seeding the global generators and drawing the weights: the
        time.sleep(0.3)  # other thread's run, side by side, would reseed them here
        return real_build(arch)

    monkeypatch.setattr(trainer, "build_model", slow_build)

    def run(seed: int, name: str) -> Path:
        return pretrain(config(genome_store, tmp_path / name, **{"train.steps": 6, "train.seed": seed}))

    def weights(name: str) -> str:
        return json.loads((tmp_path / name / "model" / "config.json").read_text())["weights_sha256"]

    def side_by_side(train, prefix: str) -> list:
        """Seeds 0 and 1 trained by `train(seed, name)` in two threads at once: what each returned or raised."""
        results: list = []
        workers = [
            threading.Thread(target=lambda s=seed: results.append(_outcome(train, s, f"{prefix}{s}")))
            for seed in (0, 1)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        return sorted(map(str, results))

    descriptors = [(os.fstat(fd).st_dev, os.fstat(fd).st_ino) for fd in (1, 2)]
    results = side_by_side(run, "thread")
    assert results == [str(tmp_path / "thread0"), str(tmp_path / "thread1")], results
    assert [(os.fstat(fd).st_dev, os.fstat(fd).st_ino) for fd in (1, 2)] == descriptors
    run(0, "alone0"), run(1, "alone1")
    assert weights("thread0") == weights("alone0") and weights("thread1") == weights("alone1")
    assert weights("alone0") != weights("alone1")
    # fit_cells' runs give their group back, each in its turn (a release after the turn could not be
    # shown to harm a one-process run: it makes no collective call once started): both runs finish, as
    # alone, and no group is left
    import torch.distributed as dist

    real_release = trainer.release_own_group

    def slow_release():
        time.sleep(1.0)
        real_release()

    monkeypatch.setattr(trainer, "release_own_group", slow_release)

    def released(seed: int, name: str) -> Path:
        cfg = config(genome_store, tmp_path / name, **{"train.steps": 6, "train.seed": seed})
        return pretrain(cfg, release_group=True)

    for name in RANK_VARS:  # what the runs above exported; a library caller has none of it
        monkeypatch.delenv(name, raising=False)
    environment = dict(os.environ)
    results = side_by_side(released, "released")
    assert results == [str(tmp_path / "released0"), str(tmp_path / "released1")], results
    assert not dist.is_initialized() and weights("released1") == weights("alone1")
    # and give the caller's environment back within their turn: restored after it (fit_cells did so),
    # one thread's restore deleted LOCAL_RANK under the other's run, or put its variables back for good
    assert dict(os.environ) == environment


def test_a_library_runs_environment_is_given_back_before_the_next_thread_starts(tmp_path, monkeypatch):
    """The rank variables a run exports are the caller's again when it returns — inside its turn. Given
    back after the turn (fit_cells did, around the call), one thread's restore deleted LOCAL_RANK
    from under the next thread's starting run (DeepSpeed's AssertionError) or put its own back for
    good. The run itself is a stand-in here: what is checked is when the environment comes back."""
    import threading

    from biomask.training import trainer

    seen: dict[str, str | None] = {}

    def run(tag, *, overwrite, local_rank, began):
        os.environ["LOCAL_RANK"] = tag  # what a run exports for torch.distributed
        time.sleep(0.3)
        seen[tag] = os.environ.get("LOCAL_RANK")
        return tmp_path

    class Turns:
        """The one-run-at-a-time lock, with the next thread let in at once after a release."""

        lock = threading.RLock()

        def acquire(self, blocking=True):
            return self.lock.acquire(blocking)

        def release(self):
            self.lock.release()
            time.sleep(0.2)  # the next thread's run starts here; a restore after this undid it

    monkeypatch.setattr(trainer, "_pretrain", run)
    monkeypatch.setattr(trainer, "_ONE_RUN_AT_A_TIME", Turns())
    monkeypatch.setattr(trainer, "release_own_group", lambda: None)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    workers = [
        threading.Thread(target=trainer.pretrain, args=(tag,), kwargs={"release_group": True}) for tag in "ab"
    ]
    for worker in workers:
        worker.start()
        time.sleep(0.05)  # a first, b waiting for its turn
    for worker in workers:
        worker.join()
    assert seen == {"a": "a", "b": "b"} and "LOCAL_RANK" not in os.environ


def test_a_callers_float64_default_and_no_grad_block_do_not_reach_the_run(genome_store, tmp_path):
    """A notebook that set torch's default dtype to float64 (GPyTorch, BoTorch) or called inside
    `torch.no_grad()` / `inference_mode()` failed after prep with DeepSpeed's bare assertion. The run
    trains as the command line does, the same weights, and the caller's settings are back after it."""
    from biomask.training.trainer import pretrain

    def weights(out: Path) -> str:
        return json.loads((out / "model" / "config.json").read_text())["weights_sha256"]

    plain = pretrain(config(genome_store, tmp_path / "plain", **{"train.steps": 3}), release_group=True)
    torch.set_default_dtype(torch.float64)
    try:
        with torch.no_grad():
            out = pretrain(config(genome_store, tmp_path / "f64", **{"train.steps": 3}), release_group=True)
            assert torch.get_default_dtype() == torch.float64 and not torch.is_grad_enabled()
        with torch.inference_mode():
            again = pretrain(config(genome_store, tmp_path / "inf", **{"train.steps": 3}), release_group=True)
            assert torch.is_inference_mode_enabled()
    finally:
        torch.set_default_dtype(torch.float32)
    assert weights(out) == weights(plain) == weights(again)


def test_a_run_after_the_caller_destroyed_the_process_group_starts_a_new_one(
    genome_store, tmp_path, monkeypatch
):
    """torch's destroy_process_group, ordinary teardown in a user's other torch code, left DeepSpeed's
    copy of the world group behind: the next run failed in deepspeed.initialize with a bare ValueError
    ("Group ... is not registered")."""
    import torch.distributed as dist
    from deepspeed.utils import groups

    from biomask.training.trainer import pretrain

    pretrain(config(genome_store, tmp_path / "first", **{"train.steps": 2}))
    kept = groups._WORLD_GROUP
    pretrain(config(genome_store, tmp_path / "again", **{"train.steps": 2}))
    assert kept is not None and groups._WORLD_GROUP is kept  # a group torch still knows is kept
    dist.destroy_process_group()
    out = pretrain(config(genome_store, tmp_path / "second", **{"train.steps": 2}))
    assert dist.is_initialized() and (out / "model" / "model.safetensors").is_file()
    # a library call (fit_cells) gives its group back: Lightning (scvi-tools) read a group left
    # initialised as a distributed run; the next run starts a new one
    pretrain(config(genome_store, tmp_path / "released", **{"train.steps": 2}), release_group=True)
    assert not dist.is_initialized()
    pretrain(config(genome_store, tmp_path / "after", **{"train.steps": 2}), release_group=True)
    assert not dist.is_initialized() and (tmp_path / "after" / "model" / "model.safetensors").is_file()
    from biomask.training import distributed

    assert not distributed.started_process_group()  # the command line's exit path: a plain exit
    # a launcher's group of several processes is never a library call's to destroy
    pretrain(config(genome_store, tmp_path / "several", **{"train.steps": 2}))
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 2)
    distributed.release_own_group()
    assert dist.is_initialized()
    monkeypatch.undo()
    distributed.release_own_group()
    assert not dist.is_initialized()
    # a group the caller started is theirs: used, and left to them
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    theirs = dist.group.WORLD
    try:
        pretrain(config(genome_store, tmp_path / "theirs", **{"train.steps": 2}), release_group=True)
        assert dist.is_initialized() and dist.group.WORLD is theirs
    finally:
        dist.destroy_process_group()  # as the caller would: the tests after this one start their own
    # several processes cannot make their rendezvous again: refused with what to do (gloo waited, then
    # said the other processes were lost)
    from types import SimpleNamespace

    from biomask.errors import BiomaskError
    from biomask.training.distributed import _forget_destroyed_groups

    stale = SimpleNamespace(utils=SimpleNamespace(groups=SimpleNamespace(_WORLD_GROUP=object())))
    with pytest.raises(BiomaskError, match="cannot start a new one in the same launch"):
        _forget_destroyed_groups(stale, world_size=2)
    _forget_destroyed_groups(stale, world_size=1)
    assert stale.utils.groups._WORLD_GROUP is None
    # and the start of a run of several processes asks it with their number
    import dataclasses

    from biomask.training import distributed

    monkeypatch.setattr(groups, "_WORLD_GROUP", object())
    two = dataclasses.replace(distributed.setup_env(None), world_size=2)
    with pytest.raises(BiomaskError, match="cannot start a new one in the same launch"):
        distributed.init_process_group(two)


def test_tokens_per_second_leaves_out_held_out_evaluation_and_checkpoints(
    genome_store, tmp_path, monkeypatch
):
    """A long run's tok/s dipped in every window after an evaluation or a checkpoint (their time was
    counted as training's): the throughput logged is the training steps' own."""
    import time as clock

    from biomask.training import trainer

    real = trainer.held_out_loss

    def slow(*args, **kwargs):  # a held-out evaluation far longer than a tiny step
        clock.sleep(0.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "held_out_loss", slow)
    extra = {"train.steps": 8, "train.log_every": 1, "train.eval_every": 2, "train.checkpoint_every": 4}
    real_save = trainer.checkpoint.save

    def slow_save(*args, **kwargs):  # a checkpoint written to a slow file system
        clock.sleep(0.5)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(trainer.checkpoint, "save", slow_save)
    out = trainer.pretrain(config(genome_store, tmp_path / "run", **extra))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rates = {x["step"]: x["tokens_per_s"] for x in lines if x["kind"] == "train"}
    after = [rates[s] for s in (3, 5, 7)]  # after an evaluation (2, 6) and after both (4)
    others = sorted(rates[s] for s in (2, 4, 6, 8))
    assert min(after) > others[1] / 4, rates  # with the pause counted: 0.5-1 s against a step's ms


def test_the_logged_learning_rate_is_the_one_its_step_trained_with(genome_store, tmp_path):
    """Each line logged the scheduler's rate after the step, the next step's: warm-up's first line
    showed 2/4 of optim.lr where step 1 trained at 1/4, and the last line the floor no step used."""
    from biomask.training import trainer

    extra = {"train.steps": 6, "train.log_every": 1, "optim.warmup_steps": 4, "optim.min_lr_ratio": 0.1}
    out = trainer.pretrain(config(genome_store, tmp_path / "run", **extra))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    logged = {x["step"]: x["lr"] for x in lines if x["kind"] == "train"}
    lr = yaml.safe_load((out / "config.yaml").read_text())["optim"]["lr"]
    expected = {
        step: lr * trainer.warmup_cosine(step - 1, warmup=4, total=6, min_ratio=0.1) for step in range(1, 7)
    }
    assert logged == pytest.approx(expected), (logged, expected)
    assert logged[1] == pytest.approx(lr / 4) and logged[6] > lr * 0.1 + 1e-12


def _outcome(function, *args):
    try:
        return function(*args)
    except Exception as exc:  # the thread's error, for the assertion to show
        return exc


def test_a_signal_during_start_up_is_a_checkpoint_and_exit_75_not_a_lost_job(
    genome_store, tmp_path, cli, monkeypatch
):
    """SLURM's USR1 (600 s before the time limit) can arrive while the engine is being built: its
    default action would end the job without the exit 75 the batch script requeues on."""
    import deepspeed

    original = deepspeed.initialize

    def initialize(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGUSR1)  # while DeepSpeed sets up the engine
        return original(*args, **kwargs)

    monkeypatch.setattr(deepspeed, "initialize", initialize)
    out = tmp_path / "run"
    args = overrides(genome_store, out, **{"train.steps": 20, "train.checkpoint_every": 1000})
    # without biomask's handler the signal would reach this one, and the run would end with 0
    previous = signal.signal(signal.SIGUSR1, lambda *_: None)
    try:
        code, _, err = cli("pretrain", "-c", CONFIG, *args)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert code == 75, err[-3000:]
    assert "received SIGUSR1" in err
    assert [int(p.name[4:]) for p in (out / "checkpoints").glob("step*")] == [1]  # one step, kept
    assert not (out / "run.json").exists()
    monkeypatch.setattr(deepspeed, "initialize", original)
    code, _, err = cli("pretrain", "-c", CONFIG, *args)
    assert code == 0, err
    assert json.loads((out / "model" / "config.json").read_text())["training"]["steps"] == 20


def test_bad_inputs_exit_2_and_write_nothing(genome_store, tmp_path, cli):
    code, _, err = cli("pretrain", "-c", CONFIG, *overrides(tmp_path / "missing", tmp_path / "a"))
    assert code == 2 and "does not exist" in err and not (tmp_path / "a").exists()

    corrupt = tmp_path / "corrupt"
    shutil.copytree(genome_store, corrupt)
    shard = next((corrupt / "train").glob("*.tokens.npy"))
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # same size, different content
    shard.write_bytes(bytes(data))
    code, _, err = cli("pretrain", "-c", CONFIG, *overrides(corrupt, tmp_path / "b"))
    assert code == 2 and "corrupted" in err and str(shard) in err and not (tmp_path / "b").exists()

    code, _, err = cli(
        "pretrain", "-c", CONFIG, *overrides(genome_store, tmp_path / "c"), "masking.ratio.kind=gaussian"
    )
    assert code == 2 and "masking.ratio.kind" in err

    code, _, err = cli(
        "pretrain", "-c", CONFIG, *overrides(genome_store, tmp_path / "d"), "masking.target=values"
    )
    assert code == 2 and "cells" in err


def test_cells_store_pretrains_and_tokenizer_mismatch_is_refused(genome_store, tmp_path, cli):
    """Binned cells from the real `prep cells` stage: bins target, order-free genes."""
    cells = prep_pbmc(tmp_path / "pbmc", "binned")
    cfg = REPO / "configs" / "pretrain" / "cells-tiny.yaml"
    args = [f"data.store={cells}", f"output={tmp_path / 'cells'}", "data.max_length=129", "train.steps=12"]
    args += ["train.micro_batch_size=8", "train.eval_batches=2", "train.progress=false", "train.log_every=3"]
    code, _, err = cli("pretrain", "-c", cfg, *args)
    assert code == 0, err
    losses = train_losses(tmp_path / "cells")
    assert losses[-1] < losses[0]
    model = load_pretrained(tmp_path / "cells" / "model")
    assert model.config.target == "bins" and model.config.positions is False

    # continuing from the cells checkpoint on a DNA store: exit 2, named as a cells model (not advice to
    # prepare DNA with the cells model's gene vocabulary)
    code, _, err = cli(
        "pretrain",
        "-c",
        CONFIG,
        *overrides(genome_store, tmp_path / "x"),
        f"model.init_from={tmp_path / 'cells' / 'model'}",
    )
    assert code == 2 and "is a cells model" in err and "holds dna data" in err, err
    assert "tokenizer.path" not in err and not (tmp_path / "x").exists()


def test_rank_environment_from_each_launcher():
    from biomask.training.distributed import expand_nodelist, resolve_env

    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456"}
    env["SLURM_JOB_NODELIST"] = "gpu[07-08,10],login1"
    d = resolve_env(env)
    assert (d.rank, d.world_size, d.local_rank, d.launcher) == (5, 8, 1, "slurm")
    assert d.master_port == 15000 + 123456 % 20000
    assert expand_nodelist("gpu[07-08,10],login1") == ["gpu07", "gpu08", "gpu10", "login1"]
    # several bracket groups in one name: every combination, in scontrol's order
    assert expand_nodelist("rack[1-2]-n[01-02]") == ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]
    assert expand_nodelist("n[01-02]x[1-2],cn-12-3") == ["n01x1", "n01x2", "n02x1", "n02x2", "cn-12-3"]
    assert expand_nodelist("compute-1-[01-02],n[008-010]") == [
        "compute-1-01",
        "compute-1-02",
        "n008",
        "n009",
        "n010",
    ]
    assert d.master_addr == "gpu07"  # (scontrol, where installed, agrees)
    # rank variables inherited from the submitting shell do not override srun's
    stale = resolve_env({**env, "RANK": "0", "WORLD_SIZE": "1"})
    assert (stale.rank, stale.world_size, stale.launcher) == (5, 8, "slurm")
    # torchrun or the deepspeed launcher inside an allocation: theirs win
    ranks = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "29500"}
    tr = resolve_env({**env, **ranks, "TORCHELASTIC_RUN_ID": "x"})
    assert (tr.rank, tr.world_size, tr.launcher) == (1, 2, "torchrun")
    ds = resolve_env({**ranks, "CROSS_RANK": "0"}, local_rank_arg=1)
    assert (ds.local_rank, ds.launcher) == (1, "deepspeed")
    assert resolve_env(ranks).launcher == "env"
    plain = resolve_env({})
    assert (plain.rank, plain.world_size, plain.launcher) == (0, 1, "plain")
    assert set(plain.variables()) == set(RANK_VARS)


def test_resume_picks_the_latest_complete_checkpoint(tmp_path):
    """A save cut short (.tmp-), or a checkpoint whose file was truncated, is never resumed from."""
    from biomask.training import checkpoint

    root = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        d = root / checkpoint.tag_of(step)
        d.mkdir(parents=True)
        (d / "mp_rank_00_model_states.pt").write_bytes(b"x" * 100)
        (d / "meta.json").write_text(json.dumps({"step": step, "files": {"mp_rank_00_model_states.pt": 100}}))
    (root / ".tmp-step00000040").mkdir()  # killed while saving
    assert checkpoint.latest(root).name == "step00000030"
    (root / "step00000030" / "mp_rank_00_model_states.pt").write_bytes(b"x" * 50)  # truncated
    assert checkpoint.latest(root).name == "step00000020"
    checkpoint.prune(root, keep=1)  # keeps the newest valid one; never deletes an invalid one (evidence)
    assert sorted(p.name for p in root.iterdir()) == ["step00000020", "step00000030"]


def test_a_link_under_a_checkpoint_name_is_removed_never_written_through(tmp_path):
    """A run folder (copied, or crafted) with `.tmp-stepN` linked to a folder of the user's: the save
    wrote DeepSpeed's files into that folder and replaced its meta.json. Links under biomask's names
    (`.tmp-`, `.old-`, the step itself, `model`) are unlinked; their targets are left as they were."""
    from biomask.training import checkpoint

    class Engine:  # writes what DeepSpeed's save_checkpoint would, under the tag it is given
        def save_checkpoint(self, root: str, tag: str, save_latest: bool) -> None:
            (Path(root) / tag).mkdir(parents=True, exist_ok=True)
            (Path(root) / tag / "mp_rank_00_model_states.pt").write_bytes(b"weights")

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "meta.json").write_text("precious")
    root = tmp_path / "run" / "checkpoints"
    root.mkdir(parents=True)
    for name in (".tmp-step00000020", ".old-step00000020", "step00000020"):
        (root / name).symlink_to(victim, target_is_directory=True)
    final = checkpoint.save(Engine(), root, 20, rank=0, rng={"seed": 1}, meta={"kind": "test"})
    assert final == root / "step00000020" and final.is_dir() and not final.is_symlink()
    assert json.loads((final / "meta.json").read_text())["step"] == 20
    assert sorted(p.name for p in victim.iterdir()) == ["meta.json"]
    assert (victim / "meta.json").read_text() == "precious"
    assert sorted(p.name for p in root.iterdir()) == ["step00000020"]
    (root / ".tmp-step00000030").symlink_to(victim, target_is_directory=True)  # left by a crafted folder
    checkpoint.prune(root, keep=1)
    assert not (root / ".tmp-step00000030").is_symlink() and (victim / "meta.json").read_text() == "precious"
    (root / "step00000040").symlink_to(tmp_path / "gone", target_is_directory=True)  # dangling
    assert checkpoint.save(Engine(), root, 40, rank=0, rng={"seed": 1}, meta={}).is_dir()
    assert not (root / "step00000040").is_symlink()


def test_the_portable_model_replaces_a_link_at_its_name_never_its_target(dna_checkpoint, tmp_path):
    """`model` linked to a folder of the user's (a crafted or copied run folder): the export's swap
    deleted through the link (or stopped on rmtree's refusal of a link); the link is unlinked now."""
    from biomask.models.pretrained import load_pretrained
    from biomask.training import checkpoint

    model = load_pretrained(dna_checkpoint)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "notes.txt").write_text("mine")
    out = tmp_path / "run"
    out.mkdir()
    (out / "model").symlink_to(victim, target_is_directory=True)
    written = checkpoint.export_portable(
        out,
        model.state_dict(),
        model.config,
        tokenizer_dir=dna_checkpoint / "tokenizer",
        info=model.checkpoint_info,
    )
    assert written.is_dir() and not written.is_symlink() and (written / "model.safetensors").is_file()
    assert sorted(p.name for p in victim.iterdir()) == ["notes.txt"]


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("cc") is None or not (Path(sysconfig.get_path("include")) / "Python.h").exists(),
    reason="torch inductor compiles C++ against Python.h: needs a C compiler and the Python headers",
)
def test_compile_changes_floats_only_and_survives_resume(genome_store, tmp_path):
    """train.compile (and the fused AdamW kernel): the same run as an eager one up to float rounding,
    and a compiled run killed after a checkpoint resumes compiled and ends where the eager one does."""
    extra = {"train.steps": 12, "train.checkpoint_every": 6, "train.log_every": 2}
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    env = subprocess_env()
    pretrain_to_end(overrides(genome_store, eager, **extra), env)

    args = overrides(genome_store, compiled, **extra, **{"train.compile": "true", "optim.fused": "true"})
    cmd = biomask_cmd("pretrain", "-c", str(CONFIG), *args)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: (compiled / "checkpoints" / "step00000006").is_dir(), proc, timeout=400)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (compiled / "run.json").exists()
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr and "compiled" in again.stderr

    a = load_file(str(eager / "model" / "model.safetensors"))
    b = load_file(str(compiled / "model" / "model.safetensors"))
    assert a.keys() == b.keys()  # the compiled module's checkpoint is the eager one's
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-4, msg=name)
    assert train_losses(compiled) == pytest.approx(train_losses(eager), rel=1e-4)
    run = json.loads((compiled / "run.json").read_text())
    assert run["final_eval"]["mean_loss"] == pytest.approx(
        json.loads((eager / "run.json").read_text())["final_eval"]["mean_loss"], rel=1e-4
    )


def test_compile_without_a_compiler_is_refused_before_anything_is_written(
    genome_store, tmp_path, cli, monkeypatch
):
    from biomask.training import trainer

    monkeypatch.setattr(trainer.shutil, "which", lambda name: None)  # a machine without g++
    out = tmp_path / "run"
    code, _, err = cli("pretrain", "-c", CONFIG, *overrides(genome_store, out, **{"train.compile": "true"}))
    assert code == 2 and "train.compile" in err and "g++" in err and "train.compile=false" in err, err
    assert "Traceback" not in err and not out.exists()


def test_an_interrupted_run_of_other_settings_is_an_output_to_replace_like_a_finished_one(tmp_path):
    """`pipeline run` replaces an output of changed settings (it reruns a stage that refused with
    StaleOutputError with --overwrite): an interrupted run of other settings must refuse the same way,
    or the pipeline stays stuck on it; the same settings resume it."""
    import yaml

    from biomask.errors import InputError, StaleOutputError
    from biomask.training import rundir

    out = tmp_path / "run"
    out.mkdir()
    rundir.mark_in_progress(out, "fingerprint-before", 1)
    with pytest.raises(StaleOutputError, match="interrupted run of a different config"):
        rundir.decide(out, "fingerprint-now", 1, {}, overwrite=False)
    assert rundir.decide(out, "fingerprint-before", 1, {}, overwrite=False) == "resume"
    # the refusal names what stands in the way, not the keys a resume may change
    (out / "config.yaml").write_text(yaml.safe_dump({"train": {"steps": 10, "progress": True}}))
    with pytest.raises(StaleOutputError) as refused:
        rundir.decide(out, "fingerprint-now", 1, {"train": {"steps": 20, "progress": False}}, overwrite=False)
    assert "train.steps: 10 -> 20" in str(refused.value) and "train.progress" not in str(refused.value)
    assert rundir.decide(out, "fingerprint-now", 1, {}, overwrite=True) == "fresh"
    # started with another number of processes: it cannot be resumed by this launch (DeepSpeed cannot
    # re-partition its optimizer state), so it is replaced like other settings' output
    with pytest.raises(StaleOutputError, match="started with 1 process; resume it with the same number"):
        rundir.decide(out, "fingerprint-before", 2, {}, overwrite=False)
    # a marker that cannot be read: whether it may be resumed cannot be told, so it is not discarded
    # by a pipeline rerun either (a plain refusal, not one the runner answers with --overwrite)
    (out / rundir.IN_PROGRESS).write_text("{not json")
    with pytest.raises(InputError, match="is unreadable") as refused:
        rundir.decide(out, "fingerprint-now", 1, {}, overwrite=False)
    assert not isinstance(refused.value, StaleOutputError)


def test_ctrl_c_twice_stops_at_once_and_the_caller_gets_its_handler_back():
    """A notebook (fit_cells, pretrain) goes on after a run that Ctrl-C checkpointed: its Ctrl-C
    must work again. A SIGTERM between two Ctrl-C (a launcher's shutdown) does not reset the count;
    a process started with Ctrl-C ignored (a background job of a script) keeps ignoring it."""
    import os

    from biomask.training.distributed import StopSignal

    inherited = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as at a terminal, whatever ran pytest
    before = signal.getsignal(signal.SIGINT)
    term = signal.getsignal(signal.SIGTERM)
    stop = StopSignal()
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        assert (stop.received, stop.name, stop.interrupted) == (signal.SIGINT, "SIGINT", True)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        stop.ignore_from_now()  # the checkpoint for a requeue: SIGTERM can no longer cut the exit short
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        stop.restore()
        signal.signal(signal.SIGTERM, term)
    assert signal.getsignal(signal.SIGINT) is before
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ignored = StopSignal()
        ignored.install()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        ignored.restore()
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_a_closed_terminal_is_a_checkpoint_not_a_kill_and_nohup_keeps_it_ignored():
    """SIGHUP (ssh dropped, terminal closed) ended a run without its checkpoint; under nohup it is
    ignored, and stays so."""
    import os

    from biomask.training.distributed import StopSignal

    inherited = signal.getsignal(signal.SIGHUP)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        stop = StopSignal()
        stop.install()
        try:
            os.kill(os.getpid(), signal.SIGHUP)
            assert stop.name == "SIGHUP"
            stop.ignore_from_now()  # exiting 75: a second SIGHUP must not make it "killed"
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        finally:
            stop.restore()
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nohup
        ignored = StopSignal()
        ignored.install()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        ignored.restore()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, inherited)


def test_an_output_a_live_run_writes_is_refused_and_a_finished_run_of_other_processes_too(tmp_path):
    """Two launches into one output delete each other's checkpoints (also when a killed launcher
    left its workers running): the second is refused while the first runs, --overwrite or not. A run
    finished with another number of processes had another global batch: not reused as this one."""
    import socket
    import sys

    from biomask.errors import InputError, StaleOutputError
    from biomask.training import rundir

    out = tmp_path / "run"
    out.mkdir()
    rundir.mark_in_progress(out, "fp", 1)
    state = json.loads((out / rundir.IN_PROGRESS).read_text())
    assert (state["pid"], state["host"]) == (os.getpid(), socket.gethostname())
    assert rundir.decide(out, "fp", 1, {}, overwrite=False) == "resume"  # its own process: not "another"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "biomask pretrain"])
    _wait_for(lambda: b"biomask" in Path(f"/proc/{other.pid}/cmdline").read_bytes(), other)  # exec'd
    try:
        state["pid"] = other.pid
        (out / rundir.IN_PROGRESS).write_text(json.dumps(state))
        for overwrite in (False, True):
            with pytest.raises(InputError, match=f"still running \\(pid {other.pid} on "):
                rundir.decide(out, "fp", 1, {}, overwrite=overwrite)
    finally:
        other.kill()
        other.wait()
    assert rundir.decide(out, "fp", 1, {}, overwrite=False) == "resume"  # gone: resumed
    (out / "run.json").write_text(json.dumps({"stage": "pretrain", "fingerprint": "fp", "world_size": 2}))
    assert rundir.is_done(out, "fp", 2)
    with pytest.raises(StaleOutputError, match="finished with 2 processes; this launch has 1"):
        rundir.is_done(out, "fp", 1)


HOLDER = """import sys, time
from biomask.outputs import hold_output
lock = hold_output(sys.argv[1], "pretrain")
print("held", flush=True)
time.sleep(120)
"""


def test_a_second_run_into_an_output_is_refused_whatever_started_either(genome_store, tmp_path, cli):
    """Two notebook kernels, or two `python script.py` runs, training into one output were not refused
    (the check knew only processes whose command line said biomask), nor a second call in the same
    kernel: they would delete each other's checkpoints. Refused now, naming the holder, with nothing
    written; a killed holder blocks nothing."""
    from biomask.errors import OutputBusyError
    from biomask.outputs import hold_output

    out = tmp_path / "run"
    script = tmp_path / "kernel.py"  # a process whose command line does not say biomask
    script.write_text(HOLDER)
    holder = subprocess.Popen(
        [sys.executable, str(script), str(out)], env=subprocess_env(), stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "held\n"
        assert b"biomask" not in Path(f"/proc/{holder.pid}/cmdline").read_bytes()
        code, _, err = cli("pretrain", "-c", CONFIG, *overrides(genome_store, out))
        assert code == 2, err
        assert f"output {out} is being written by another run" in err and f"pid {holder.pid} on " in err
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    with hold_output(out, "fit_cells"):  # the dead holder's lock went with it; this process's is held
        code, _, err = cli("pretrain", "-c", CONFIG, *overrides(genome_store, out))
        assert code == 2 and f"fit_cells, pid {os.getpid()} on " in err, err
        (tmp_path / "alias").symlink_to(out)
        with pytest.raises(OutputBusyError, match="alias"):
            hold_output(tmp_path / "alias", "pretrain")  # the same folder through a link
    assert not out.exists() and not (tmp_path / ".run.lock").exists()  # let go: nothing left beside it


def test_a_checkpoint_folder_that_cannot_be_made_is_a_message_not_a_traceback(tmp_path):
    """DeepSpeed only logs that it could not make the folder (permission denied, read-only); torch.save
    then raises a RuntimeError about the missing parent. That is the file system refusing: exit 2."""
    from biomask.errors import EnvironmentIOError
    from biomask.training.checkpoint import _save_failed

    tmp = tmp_path / "checkpoints" / ".tmp-step00000030"
    tmp.mkdir(parents=True)
    with pytest.raises(EnvironmentIOError, match="make the folder writable"):
        _save_failed(tmp, RuntimeError(f"Parent directory {tmp} does not exist."))
    assert not tmp.exists()
    with pytest.raises(ValueError, match="a bug"):  # anything else is not dressed up as bad input
        _save_failed(tmp, ValueError("a bug"))
    # a full disk in torch.save: its words said nothing of space, and the free space was measured
    # after the partial checkpoint went, reading as plenty
    tmp.mkdir()
    (tmp / "partial.pt").write_bytes(b"x" * 40_000_000)
    free = shutil.disk_usage(tmp).free
    with pytest.raises(EnvironmentIOError) as said:
        _save_failed(
            tmp, RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 917440 vs 917304")
        )
    reported = int(
        re.search(r"\(([\d,]+) bytes free there when it failed\)", str(said.value))[1].replace(",", "")
    )
    assert "the disk is probably full" in str(said.value) and abs(reported - free) < 20_000_000


def test_zero_0_logs_and_checks_the_gradient_norm_as_the_other_stages_do(genome_store, tmp_path, cli):
    """DeepSpeed reports no gradient norm at ZeRO-0 (what `stage: auto` picks for one process): biomask
    takes it itself, before clipping, so it is logged and a non-finite one stops the run there too."""
    norms = {}
    for stage in (0, 2):
        out = tmp_path / f"z{stage}"
        args = overrides(genome_store, out, **{"train.steps": 8, "deepspeed.stage": stage})
        code, _, err = cli("pretrain", "-c", CONFIG, *args)
        assert code == 0, err
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        norms[stage] = [x["grad_norm"] for x in lines if x["kind"] == "train"]
    assert len(norms[0]) == 2 and all(math.isfinite(n) and n > 0 for n in norms[0])
    assert norms[0] == pytest.approx(norms[2], rel=1e-4)  # the same quantity DeepSpeed gives at ZeRO-2


def test_an_error_every_rank_shares_is_printed_by_rank_0_alone(monkeypatch):
    """Rank 0's bad-input verdict reaches every rank (so none waits in a collective); printed by each it
    would fill a 64-GPU log 64 times. An error of a rank's own is still printed where it happened."""
    from biomask.cli import _said_by_rank0
    from biomask.errors import InputError, Requeue

    shared = InputError("bad input seen by rank 0")
    shared.from_rank0 = True  # what on_rank0 marks on the ranks it hands rank 0's error to
    cases = [(shared, "0", False), (shared, "1", True), (InputError("rank 1's own"), "1", False),
             (Requeue("checkpointed"), "1", True), (Requeue("checkpointed"), "0", False)]  # fmt: skip
    for exc, rank, silent in cases:
        monkeypatch.setenv("RANK", rank)
        assert _said_by_rank0(exc) is silent, (rank, exc)


def test_sighup_from_a_closed_terminal_checkpoints_and_exits_75(genome_store, tmp_path):
    """ssh dropped: SIGHUP arrives and every write to the terminal fails (EIO). The checkpoint was
    saved, then the message after it raised, and the run ended with exit 1 (a traceback nobody saw)
    instead of 75, the code that says "resume me"."""
    import pty
    import select
    import threading

    out = tmp_path / "run"
    args = overrides(genome_store, out, **{"train.steps": 150, "train.checkpoint_every": 1000})
    master, terminal = pty.openpty()
    proc = subprocess.Popen(
        biomask_cmd("pretrain", "-c", str(CONFIG), *args),
        env=subprocess_env(),
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL),  # as at an interactive shell
    )
    os.close(terminal)
    shown: list[bytes] = []
    closing = threading.Event()

    def read_terminal() -> None:  # a terminal's reader: the run's output must not fill it up
        while not closing.is_set():
            if select.select([master], [], [], 0.05)[0]:
                try:
                    shown.append(os.read(master, 65536))
                except OSError:
                    return

    reader = threading.Thread(target=read_terminal, daemon=True)
    reader.start()
    try:
        _wait_for(
            lambda: (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").stat().st_size > 0, proc
        )
        closing.set()
        reader.join()
        os.close(master)  # the terminal is gone
        proc.send_signal(signal.SIGHUP)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert b"pretrain" in b"".join(shown)  # it did write to the terminal while there was one
    assert code == 75
    (ckpt,) = list((out / "checkpoints").glob("step*"))
    assert 4 <= int(ckpt.name[4:]) < 150 and not (out / "run.json").exists()


def test_quiet_pretraining_prints_no_progress_lines(genome_store, tmp_path, cli):
    """`biomask -q pretrain` (only warnings and errors) still printed a line per logged step."""
    extra = {"train.steps": 4, "train.log_every": 2, "train.checkpoint_every": 4, "train.progress": "true"}
    code, _, err = cli("pretrain", "-q", "-c", CONFIG, *overrides(genome_store, tmp_path / "quiet", **extra))
    assert code == 0 and "pretrain step" not in err, err
    code, _, err = cli("pretrain", "-c", CONFIG, *overrides(genome_store, tmp_path / "told", **extra))
    assert code == 0 and "pretrain step 2/4" in err, err


def two_ranks_checkpointed(genome_store, out: Path, *, timeout_minutes: float):
    """torchrun training on two processes (ZeRO-2) until stopped, once it has written a checkpoint:
    (the launcher, rank -> pid)."""
    import time

    from biomask.training.distributed import free_port

    cmd = [
        str(Path(sys.executable).parent / "torchrun"),
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
    ]
    cmd += ["-m", "biomask", "pretrain", "-c", str(CONFIG)]
    cmd += overrides(genome_store, out, **{"train.steps": 100_000, "train.checkpoint_every": 2,
                                           "deepspeed.stage": 2, "deepspeed.timeout_minutes": timeout_minutes})  # fmt: skip
    proc = subprocess.Popen(cmd, env=subprocess_env(), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not list((out / "checkpoints").glob("step*")) and time.monotonic() < deadline:
            time.sleep(0.2)
        return proc, torchrun_ranks(out)
    except BaseException:
        proc.kill()
        raise


def torchrun_ranks(out: Path) -> dict[int, int]:
    """The processes torchrun started for the run writing `out`: rank -> pid (from /proc)."""
    ranks = {}
    for child in Path("/proc").iterdir():
        if child.name.isdigit():
            try:
                environ = (child / "environ").read_bytes().split(b"\0")
                cmdline = (child / "cmdline").read_bytes()
            except OSError:
                continue
            if b"TORCHELASTIC_RUN_ID" in b"".join(environ) and str(out).encode() in cmdline:
                rank = next((e.split(b"=", 1)[1] for e in environ if e.startswith(b"RANK=")), None)
                if rank is not None:
                    ranks[int(rank)] = int(child.name)
    return ranks


def test_a_process_lost_mid_run_is_named_with_the_checkpoint_to_resume_from(genome_store, tmp_path):
    """A rank killed under torchrun left the other one a 50-line gloo traceback naming no rank, step or
    way on ("Connection reset by peer ... GLHF!"). It now says which process it is, what happened, the
    last complete checkpoint, and that the same command resumes (resuming is tested above)."""
    import signal as sig

    out = tmp_path / "run"
    proc, ranks = two_ranks_checkpointed(genome_store, out, timeout_minutes=0.5)
    try:
        os.kill(ranks[1], sig.SIGKILL)
        _, err = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert "pretrain (process 0 of 2): lost the other processes" in err, err[-3000:]
    assert "the last complete checkpoint is step" in err and "run the same command to resume" in err


def test_a_peer_that_hangs_ends_the_run_after_deepspeed_timeout_minutes(genome_store, tmp_path):
    """A process frozen mid-run (a node stopped, not dead: its sockets stay open) held the others
    silently for torch's 30 minutes whatever deepspeed.timeout_minutes said: ZeRO's collectives run
    on groups DeepSpeed makes, which took torch's default, not the world group's timeout."""
    import contextlib
    import signal as sig
    import time

    out = tmp_path / "run"
    proc, ranks = two_ranks_checkpointed(genome_store, out, timeout_minutes=0.25)
    try:
        os.kill(ranks[1], sig.SIGSTOP)
        frozen = time.monotonic()
        while time.monotonic() - frozen < 150:  # 15 s configured; torch's default is 1,800
            if (
                not Path(f"/proc/{ranks[0]}").exists()
                or Path(f"/proc/{ranks[0]}/stat").read_text().split()[2] == "Z"
            ):
                break
            time.sleep(0.5)
        waited = time.monotonic() - frozen
    finally:
        for pid in ranks.values():
            with contextlib.suppress(OSError):
                os.kill(pid, sig.SIGKILL)
        proc.kill()
        _, err = proc.communicate(timeout=60)
    assert waited < 150, "process 0 still waited for the frozen process after 150 s"
    assert "pretrain (process 0 of 2): lost the other processes" in err, err[-3000:]
    assert (
        "stopped answering for deepspeed.timeout_minutes (0.25)" in err
        and "run the same command to resume" in err
    )


def test_deepspeed_stage_auto_and_the_stage_it_resolves_to_are_one_config(genome_store, tmp_path, cli):
    """A run started with deepspeed.stage=0 and rerun with auto (0 for one process) was refused as a
    changed key, though both train alike; a stage auto does not resolve to is still another config."""
    out = tmp_path / "run"
    steps = {"train.steps": 4, "train.checkpoint_every": 2}
    code, _, err = cli(
        "pretrain", "-c", CONFIG, *overrides(genome_store, out, **steps, **{"deepspeed.stage": 0})
    )
    assert code == 0, err
    code, _, err = cli(
        "pretrain", "-c", CONFIG, *overrides(genome_store, out, **steps, **{"deepspeed.stage": "auto"})
    )
    assert code == 0 and "up to date" in err, err
    code, _, err = cli(
        "pretrain", "-c", CONFIG, *overrides(genome_store, out, **steps, **{"deepspeed.stage": 2})
    )
    assert code == 2 and "deepspeed.stage: 0 -> 2" in err, err
    # an interrupted run resumes under the other spelling
    from biomask.training import rundir

    fingerprint = json.loads((out / "run.json").read_text())["fingerprint"]
    (out / "run.json").unlink()
    shutil.rmtree(out / "model")
    rundir.mark_in_progress(out, fingerprint, 1)
    code, _, err = cli(
        "pretrain", "-c", CONFIG, *overrides(genome_store, out, **steps, **{"deepspeed.stage": "auto"})
    )
    assert code == 0 and "resum" in err, err


def test_what_counts_as_a_lost_process_and_what_its_message_advises(tmp_path):
    from biomask.training.distributed import DistEnv
    from biomask.training.trainer import _lost_peer, _lost_peer_message

    gloo = RuntimeError(
        "[../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer"
    )
    assert _lost_peer(gloo)
    assert not _lost_peer(RuntimeError("mlflow: Connection reset by peer"))  # a tracker's network error
    assert not _lost_peer(ValueError("gloo/transport"))
    env = DistEnv(1, 2, 1, "127.0.0.1", 29500, "torchrun")
    said = _lost_peer_message(gloo, env, tmp_path, 30, False, [])
    assert said.startswith("pretrain (process 1 of 2): lost the other processes ([../third_party/gloo")
    assert "no checkpoint was written yet" in said and "resume" not in said
    said = _lost_peer_message(gloo, env, tmp_path, 30, True, [8])
    assert (
        "the last complete checkpoint is step 8" in said
        and "run the command again without --overwrite" in said
    )
    assert "run the same command to resume" in _lost_peer_message(gloo, env, tmp_path, 30, False, [8])
    # a replacement put back: the old run's checkpoints are not this run's to resume from
    said = _lost_peer_message(gloo, env, tmp_path, 30, True, [], restored=True)
    assert (
        "this run wrote no checkpoint, and the run it was to replace is back" in said and "resume" not in said
    )


def test_a_taken_master_port_is_said_at_once_not_as_a_rendezvous_timeout(genome_store, tmp_path):
    """Two runs on one host with one MASTER_PORT: rank 0 cannot listen, at once; it read as "the other
    processes did not join within N minutes", with advice about RANK and WORLD_SIZE."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**subprocess_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0",
               "WORLD_SIZE": "2", "LOCAL_RANK": "0"}  # fmt: skip
        cmd = [sys.executable, "-m", "biomask", "pretrain", "-c", str(CONFIG)]
        cmd += overrides(genome_store, tmp_path / "run", **{"deepspeed.timeout_minutes": 0.5})
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"MASTER_PORT {port} on 127.0.0.1 is taken" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_corruption_settings_the_run_never_reads_are_refused(genome_store, tmp_path, cli):
    """A decoder depth without MAE corruption, or mask/random shares with it (MAE drops the masked
    tokens), ran and changed no weight."""
    out = tmp_path / "run"
    for given, said in (
        (["model.decoder_layers=3"], "model.decoder_layers=3 (the depth of the transformer's MAE decoder"),
        (["masking.corruption.kind=mae", "masking.corruption.random_token=0.0"], "MAE drops them"),
    ):
        code, _, err = cli(
            "pretrain", "-c", CONFIG, *overrides(genome_store, out, **{"train.steps": 2}), *given
        )
        assert code == 2 and said in err and "(a transformer)" in err, err
        assert not out.exists()
    for loss in ("nb", "poisson"):
        code, _, err = cli(
            "pretrain",
            "-c",
            CONFIG,
            *overrides(genome_store, out, **{"train.steps": 2}),
            f"model.loss={loss}",
        )
        assert code == 2 and f"model.loss={loss} (the expression models' likelihood; it predicts" in err, err
    code, _, err = cli("pretrain", "-c", CONFIG, *overrides(genome_store, out, **{"train.steps": 2}),
                       "masking.corruption.kind=mae", "model.decoder_layers=2")  # fmt: skip
    assert code == 0, err


def test_a_run_an_earlier_biomask_started_with_a_setting_now_refused_goes_on(
    genome_store, tmp_path, monkeypatch
):
    """A run written before a setting it cannot use was refused (model.decoder_layers without MAE) could
    neither resume nor be reused from Python: refused with it, refused as a changed config without it."""
    from biomask.errors import ConfigError
    from biomask.training import trainer

    cfg = config(genome_store, tmp_path / "run", **{"train.steps": 2, "model.decoder_layers": 2})
    with monkeypatch.context() as before:  # what an earlier biomask did: nothing refused
        before.setattr(trainer, "_inert_settings", lambda arch, cfg: [])
        out = trainer.pretrain(cfg)
    stamp = (out / "run.json").stat().st_mtime_ns
    assert trainer.pretrain(cfg) == out and (out / "run.json").stat().st_mtime_ns == stamp  # reused
    with pytest.raises(ConfigError, match="does not use model.decoder_layers=2"):
        trainer.pretrain(cfg, overwrite=True)  # a new run of it: refused, and the old one kept
    assert (out / "run.json").stat().st_mtime_ns == stamp
    other = config(genome_store, tmp_path / "fresh", **{"train.steps": 2, "model.decoder_layers": 2})
    with pytest.raises(ConfigError, match="does not use model.decoder_layers=2"):
        trainer.pretrain(other)
    # the same run asked with another value of the key: refused as inert, not let through as it was
    with pytest.raises(ConfigError, match="does not use model.decoder_layers=3"):
        trainer.pretrain(
            config(genome_store, tmp_path / "run", **{"train.steps": 2, "model.decoder_layers": 3})
        )


def test_activation_checkpointing_is_refused_for_a_continued_cnn(genome_store, tmp_path, cli):
    """The kind that trains is the checkpoint's: a transformer config with activation checkpointing,
    continuing a CNN (which has no blocks to recompute), ran with the switch doing nothing."""
    cnn = tmp_path / "cnn"
    code, _, err = cli("pretrain", "-c", REPO / "configs/pretrain/dna-cnn-quick.yaml", f"data.store={genome_store}",
                       f"output={cnn}", "train.steps=2", "train.micro_batch_size=4", "data.max_length=130",
                       "train.eval_batches=1", "train.progress=false")  # fmt: skip
    assert code == 0, err
    out = tmp_path / "continued"
    code, _, err = cli("pretrain", "-c", CONFIG, *overrides(genome_store, out, **{"train.steps": 2}),
                       f"model.init_from={cnn / 'model'}", "model.activation_checkpointing=true")  # fmt: skip
    assert code == 2 and "the model that trains (model.init_from's) is a cnn, which has none" in err, err
    assert not out.exists()


def test_a_run_waiting_for_processes_that_never_come_stops_on_sigterm(genome_store, tmp_path):
    """RANK and WORLD_SIZE left from another launch: the run waits for the other processes (up to
    deepspeed.timeout_minutes) and says to stop it — but the wait blocks in C++, where training's
    stop handler (a flag) never ran, so SIGTERM and Ctrl-C left it waiting its 30 minutes. Until the
    group stands they end it, nothing written; and a rank variable that is no number is named."""
    from biomask.training.distributed import free_port

    out = tmp_path / "run"
    env = {**subprocess_env(), "RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": str(free_port())}
    proc = subprocess.Popen(
        biomask_cmd("pretrain", "-c", str(CONFIG), *overrides(genome_store, out)),
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    said = []

    def waiting() -> bool:
        said.append(proc.stderr.readline())
        return "waiting up to" in said[-1]

    _wait_for(waiting, proc)
    time.sleep(1.0)  # inside the wait
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("SIGTERM did not stop a run waiting for its other processes") from None
    assert code in (-signal.SIGTERM, 143) and not out.exists()
    env["RANK"] = "abc"
    run = subprocess.run(
        biomask_cmd("pretrain", "-c", str(CONFIG), *overrides(genome_store, out)),
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2 and "RANK='abc' is not a whole number" in run.stderr, run.stderr[-2000:]


def test_a_launched_process_waiting_long_for_its_peers_says_so(monkeypatch, caplog):
    """Under srun or torchrun a process whose peers never came (a failed srun step on one node)
    waited deepspeed.timeout_minutes, 30 by default, without a line; a wait longer than a launch's
    processes take to join is said, with the way out."""
    import logging

    from biomask.training import trainer
    from biomask.training.distributed import DistEnv

    monkeypatch.setattr(trainer, "WAIT_SAID_AFTER_S", 0.3)
    # a slow wait of 2 processes is said; a quick one, and one process (no peers), are not
    waits = {"slow": (1.0, 2), "quick": (0.0, 2), "alone": (1.0, 1)}
    for kind, (seconds, world) in waits.items():
        monkeypatch.setattr(trainer, "init_process_group", lambda *_, s=seconds: time.sleep(s))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="biomask"):
            trainer._start_process_group(DistEnv(world - 1, world, 0, "10.0.0.1", 29500, "slurm"), 0.5)
            time.sleep(0.5)  # past the point a wait is said
        said = "still waiting after 0.3 s for the other processes at 10.0.0.1:29500"
        assert (said in caplog.text) == (kind == "slow"), (kind, caplog.text)
        assert ("ends this after 0.5 minutes (deepspeed.timeout_minutes)" in caplog.text) == (kind == "slow")
