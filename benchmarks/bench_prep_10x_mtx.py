# ruff: noqa: E402 - the thread limits must be set before numpy is imported
"""`biomask prep cells` on a 10x Matrix Market directory: peak memory and time, streamed against whole-file.

Data: SYNTHETIC counts from the negative-binomial model fitted to pbmc3k (benchmarks/synthetic_cells.py;
~850 genes per cell), written as a 10x directory (matrix.mtx.gz, features.tsv.gz, barcodes.tsv.gz;
cached under .cache/bench/): entries in barcode order as Cell Ranger writes them, and the same matrix
with its entries out of order. Every figure printed is labelled SYNTHETIC.

Each arm runs in a fresh process pinned to one CPU core (BLAS, OpenMP, numba and scipy's Matrix Market
parser limited to one thread), under the peak-RSS launcher:

- ours: the whole stage, `prep_cells()` -> a verified token store (binned scheme, its defaults), for
  the sorted and the shuffled directory;
- whole-file read (the reader before it streamed): `scanpy.read_10x_mtx` -- scipy's mmread of the
  whole text, then CSR -- the matrix in memory, against ours opening the directory and reading every
  block once.
- `--before DIR`: the whole stage again with the biomask checkout in DIR (e.g. a git worktree of the
  commit before), on the same files: its time and peak RSS next to ours.

    python -m benchmarks.bench_prep_10x_mtx [--quick] [--cells N] [--before DIR]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = "1"  # one core: before numpy/scipy/numba start their thread pools

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

CACHE = Path(".cache/bench")


def _one_core() -> None:
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    try:
        import scipy.io._fast_matrix_market as fmm

        fmm.PARALLELISM = 1  # its C++ parser's threads (the whole-file read used it too)
    except ImportError:
        pass


def child_prep(path: Path, out: Path) -> dict:
    import anndata  # noqa: F401 - imported before the clock
    import scanpy  # noqa: F401 - the reader before imported it when opening the directory: not timed

    from biomask.cells.config import CellsPrepConfig
    from biomask.cells.prep import prep_cells
    from biomask.store import TokenStore

    cfg = CellsPrepConfig(
        inputs=[{"path": str(path)}],
        output=str(out),
        tokenizer={"scheme": "binned", "n_bins": 51, "max_length": 1200},
        qc={"min_genes": 200, "min_cells": 3},
    )
    start = time.perf_counter()
    prep_cells(cfg, overwrite=True)
    seconds = time.perf_counter() - start
    store = TokenStore(out)
    cells = sum(len(store.split(s)) for s in store.splits)
    return {"seconds": seconds, "cells": cells, "code": str(Path(__import__("biomask").__file__).parent)}


def child_read(path: Path, who: str) -> dict:
    import scanpy as sc  # imported before the clock

    from biomask.cells.readers import open_matrix

    start = time.perf_counter()
    if who == "whole":
        import scipy.sparse as sp

        matrix = sp.csr_matrix(sc.read_10x_mtx(path, make_unique=False).X)
        cells, values = matrix.shape[0], matrix.nnz
    else:
        source = open_matrix(path)
        cells = values = 0
        for _, block in source.blocks(8192):
            cells, values = cells + block.shape[0], values + block.nnz
        source.close()
    return {"seconds": time.perf_counter() - start, "cells": cells, "values": values}


def measure(kind: str, path: Path, tmp: Path, label: str, code: str | None = None) -> dict:
    from benchmarks.common import peak_rss_of

    result = tmp / f"{label}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--input", str(path)]
    cmd += ["--out", str(tmp / label), "--result", str(result)]
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = code or str(Path(__file__).resolve().parent.parent)
    try:
        rss = peak_rss_of(cmd)
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = saved
    found = json.loads(result.read_text())
    return {**found, "cells_per_s": found["cells"] / found["seconds"], "peak_rss_mb": rss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10,000 cells: a smoke run")
    parser.add_argument("--cells", type=int, help="cells (default 200,000)")
    parser.add_argument("--genes", type=int, default=20_000)
    parser.add_argument("--before", help="a biomask checkout to run the whole stage with as well")
    parser.add_argument("--child", choices=["prep", "read-ours", "read-whole"], help=argparse.SUPPRESS)
    for hidden in ("input", "out", "result"):
        parser.add_argument(f"--{hidden}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _one_core()
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        if args.child == "prep":
            found = child_prep(Path(args.input), out / "store")
        else:
            found = child_read(Path(args.input), args.child.removeprefix("read-"))
        Path(args.result).write_text(json.dumps(found))
        return

    from benchmarks.common import print_table, save_result
    from benchmarks.synthetic_cells import SYNTHETIC_NOTE, write_synthetic_10x_mtx

    n = args.cells or (10_000 if args.quick else 200_000)
    print(f"{SYNTHETIC_NOTE}: {n:,} cells x {args.genes:,} genes as a 10x directory", flush=True)
    sorted_dir = write_synthetic_10x_mtx(CACHE / f"synthetic-10x-{n}x{args.genes}", n, args.genes)
    shuffled_dir = write_synthetic_10x_mtx(
        CACHE / f"synthetic-10x-{n}x{args.genes}-shuffled", n, args.genes, shuffled=True
    )
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp_name:
        tmp = Path(tmp_name)
        stage = {
            "ours, entries in barcode order": measure("prep", sorted_dir, tmp, "sorted"),
            "ours, entries shuffled": measure("prep", shuffled_dir, tmp, "shuffled"),
        }
        if args.before:
            stage["before (whole-file read), barcode order"] = measure(
                "prep", sorted_dir, tmp, "before", code=args.before
            )
        reading = {
            "ours: open (convert on disk) + every block once": measure(
                "read-ours", sorted_dir, tmp, "r-ours"
            ),
            "whole-file read: scanpy.read_10x_mtx -> CSR": measure("read-whole", sorted_dir, tmp, "r-whole"),
        }
    results = {
        "whole_stage": [{"data": "SYNTHETIC", "who": who, **m} for who, m in stage.items()],
        "reading": [{"data": "SYNTHETIC", "who": who, **m} for who, m in reading.items()],
        "matrix_mtx_gz_bytes": (sorted_dir / "matrix.mtx.gz").stat().st_size,
    }
    where = f"SYNTHETIC {n:,} x {args.genes:,} counts (NB fitted to pbmc3k), 10x matrix.mtx.gz, one core"
    print_table(f"{where}: prep cells, whole stage", results["whole_stage"])
    print_table(f"{where}: reading the matrix", results["reading"])
    path = save_result("prep_10x_mtx", {"data": SYNTHETIC_NOTE, "cells": n, "genes": args.genes, **results})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
