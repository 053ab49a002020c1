"""How the data_prep scripts take their output path and write their .h5ad: as biomask's stages do,
never over a file they did not write (the user's notes, another tool's h5ad), nothing half-written."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

MARK = "biomask_data_prep"  # uns key: which script wrote the file, so a rerun may replace it


def output_argument(parser: argparse.ArgumentParser, name: str = "output") -> None:
    parser.add_argument(
        name, type=Path, help="the .h5ad to write (refused if it exists and is not this script's)"
    )


def check(output: Path, script: str) -> None:
    """Refuse (exit 2) an output that is not an .h5ad, or one that exists and was not written by
    `script`: before the work, and again before the write."""
    import h5py

    if output.suffix != ".h5ad":
        _refuse(f"{output}: the output must be an .h5ad file")
    if not (output.exists() or output.is_symlink()):
        return
    ours = False
    if output.is_file() and not output.is_symlink():
        try:
            with h5py.File(output, "r") as handle:
                mark = handle["uns"][MARK][()] if "uns" in handle and MARK in handle["uns"] else b""
                ours = (mark.decode() if isinstance(mark, bytes) else str(mark)) == script
        except (OSError, KeyError, AttributeError, TypeError):
            ours = False
    if not ours:
        _refuse(
            f"{output} exists and was not written by {script}: it is left as it is; choose another output, "
            "or move that file away"
        )


def write(adata: Any, output: Path, script: str) -> None:
    """Write `adata` to `output` under a temporary name, then rename it into place (see `check`)."""
    from biomask.outputs import atomic_file

    check(output, script)
    adata.uns[MARK] = script
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(output) as tmp:
        adata.write_h5ad(tmp)


def _refuse(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)
