"""On a CUDA machine only (skipped elsewhere; benchmarks/device_session.sh runs it there): a run with
DS_ACCELERATOR unset trains on the GPU torch sees, says so in its first line, trains in bf16 with the
fused AdamW kernel, and its portable checkpoint reproduces the engine's held-out losses on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_pretrain import CONFIG, REPO, overrides, reloaded_eval

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU that torch can use")


def gpu_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "CUDA_VISIBLE_DEVICES")}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    return env


def test_a_run_on_the_gpu_says_so_and_its_model_reloads_on_the_cpu(genome_store, tmp_path):
    from biomask.config import load_config
    from biomask.training.config import PretrainConfig

    out = tmp_path / "run"
    args = overrides(genome_store, out, **{"train.steps": 30})
    proc = subprocess.run(
        [sys.executable, "-m", "biomask", "pretrain", "-c", str(CONFIG), *args],
        env=gpu_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = next(line for line in proc.stderr.splitlines() if "pretrain:" in line)
    name = torch.cuda.get_device_name(0)
    assert "cuda" in first and name in first and "bf16" in first, first
    run = json.loads((out / "run.json").read_text())
    assert run["precision"] == "bf16" and run["deepspeed"]["torch_autocast"]["enabled"]
    # bf16 autocast on the GPU, fp32 on the CPU: the same losses to bf16's precision
    cfg = load_config(PretrainConfig, CONFIG, args)
    again, recorded = reloaded_eval(Path(out), genome_store, cfg)
    for ratio, loss in recorded.items():
        assert again[ratio] == pytest.approx(loss, rel=2e-2), ratio


def test_lp_ft_on_the_gpu_with_concat_pooling_and_zero2_finishes_and_exits(
    splice_store, dna_checkpoint, tmp_path
):
    """evaluate embeds on the GPU (device auto), then fine-tunes there: the concat head's width is
    measured on the GPU-resident encoder (it was a device-mismatch crash), and a ZeRO-2 fine-tune's
    NCCL group is torn down so the process exits (it hung after writing its results on an H200)."""
    out = tmp_path / "eval"
    args = [
        f"store={splice_store}",
        f"output={out}",
        f"checkpoints.mine={dna_checkpoint}",
        "seeds=[0]",
        "pooling=concat",
        "random_init=false",
        "finetune.zero_stage=2",
        "finetune.epochs=1",
        "finetune.lr=[1.0e-4, 3.0e-4]",
        "finetune.screen_epochs=0.5",
    ]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "biomask",
            "evaluate",
            "-c",
            str(REPO / "configs/evaluate/position-task.yaml"),
            *args,
        ],
        env=gpu_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert "mine (fine-tune)" in metrics["summary"]
    assert metrics["summary"]["mine (fine-tune)"]["mcc"]["mean"] >= 0.5
