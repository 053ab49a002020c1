"""Real cells token stores for the pretraining tests, written by the `biomask prep cells` stage itself:
scanpy's `pbmc68k_reduced` (700 PBMCs, 765 genes, 10 labelled cell types; registry `pbmc68k_reduced`),
with its own gene vocabulary, in any of the three schemes."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def prep_pbmc(output: Path, scheme: str = "binned") -> Path:
    from biomask.cells.config import CellsPrepConfig
    from biomask.cells.prep import prep_cells
    from biomask.config import load_config

    overrides = [f"output={output}", "tokenizer.path=null", f"tokenizer.scheme={scheme}"]
    cfg = load_config(CellsPrepConfig, REPO / "configs" / "cells" / "pbmc68k_reduced.yaml", overrides)
    return prep_cells(cfg)
