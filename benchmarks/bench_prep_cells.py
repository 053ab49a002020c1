# ruff: noqa: E402 - the thread limits must be set before numpy is imported
"""Single-cell tokenization speed and peak memory: `biomask prep cells` against the straightforward peer.

Data: SYNTHETIC counts, drawn from a negative-binomial model fitted to pbmc3k (benchmarks/synthetic_cells.py:
library sizes, per-gene means and dispersions; sparsity matches pbmc3k, ~850 genes per cell), 200,000
cells x 20,000 genes written as an h5ad (cached under .cache/bench/). Synthetic only because no real
matrix that large can be fetched here; every figure printed is labelled SYNTHETIC.

Each measurement runs in a fresh process pinned to one CPU core (BLAS, OpenMP and numba limited to one
thread), reading the same h5ad from disk; imports happen before the clock starts.

- ours: the whole stage, `prep_cells()` -> a verified token store: input checksum, two streamed passes
  (counts checks, QC, corpus statistics; tokenize), binned scheme with its defaults (51 bins, at most
  1,200 genes per cell: the top-expressed), shards written with sha256. Twice: building the gene
  vocabulary from the matrix (a pretraining corpus) and with a frozen vocabulary (a dataset tokenized
  for a trained model).
- peer (scGPT-style): what scGPT's preprocessing does -- `sc.read_h5ad`, `sc.pp.filter_cells` /
  `filter_genes`, `sc.pp.normalize_total(1e4)`, `sc.pp.log1p`, then its per-cell loops as written in
  scGPT (Preprocessor binning: quantile edges of the cell's non-zero values, `_digitize` with random
  tie-breaking; tokenize_and_pad_batch: non-zero genes, <cls>, 1,200 genes sampled), over rows
  densified one at a time (scGPT densifies the whole matrix -- 16 GB here -- and stacks dense binned rows
  -- 32 GB -- so the peer keeps only what it needs; numpy arrays instead of torch tensors).
- tokenization alone: the small matrix already in memory, ours `BinnedScheme.encode` over CSR blocks
  against scanpy normalisation + scGPT's loops (no file reading, QC or writing on either side).
- rank, for reference: ours with the rank scheme (frozen vocabulary and its medians) against the
  Geneformer-style loop (backed h5ad, chunks of 512 cells normalised by n_counts and the same medians,
  then per cell `X[i]` + `np.argsort`, top 2,048).

Peak RSS of ours and the scGPT-style peer at two sizes shows what grows with the number of cells.

    python -m benchmarks.bench_prep_cells [--quick] [--cells N] [--small-cells N]
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

import numpy as np

from benchmarks.common import peak_rss_of, print_table, save_result
from benchmarks.synthetic_cells import SYNTHETIC_NOTE, write_synthetic_h5ad

CACHE = Path(".cache/bench")
N_BINS, MAX_LENGTH, RANK_LENGTH = 51, 1200, 2048


def _one_core() -> None:
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


# --------------------------------------------------------------------------------------------- children


def child_ours(path: Path, out: Path, scheme: str, vocab: str | None) -> dict:
    import anndata  # noqa: F401 - imported before the clock, like the peer's libraries

    from biomask.cells.config import CellsPrepConfig
    from biomask.cells.prep import prep_cells
    from biomask.store import TokenStore

    tokenizer = {"scheme": scheme, "n_bins": N_BINS, "path": vocab}  # default truncation: top-expressed
    tokenizer["max_length"] = MAX_LENGTH if scheme == "binned" else RANK_LENGTH
    cfg = CellsPrepConfig(
        inputs=[{"path": str(path)}],
        output=str(out),
        tokenizer=tokenizer,
        qc={"min_genes": 200, "min_cells": 3},
    )
    start = time.perf_counter()
    prep_cells(cfg, overwrite=True)
    seconds = time.perf_counter() - start
    store = TokenStore(out)
    cells = sum(len(store.split(s)) for s in store.splits)
    tokens = sum(store.split(s).num_tokens for s in store.splits)
    return {"seconds": seconds, "cells": cells, "tokens": tokens}


def _digitize(x: np.ndarray, bins: np.ndarray, side: str = "both") -> np.ndarray:
    """scGPT's preprocess._digitize: ties between bin edges broken at random."""
    left_digits = np.digitize(x, bins)
    if side == "one":
        return left_digits
    right_digits = np.digitize(x, bins, right=True)
    rands = np.random.rand(len(x))
    digits = rands * (right_digits - left_digits) + left_digits
    return np.ceil(digits).astype(np.int64)


def scgpt_loop(matrix, gene_ids: np.ndarray) -> list[np.ndarray]:
    """scGPT's per-cell steps on log1p-normalised CSR: Preprocessor binning (its `binning` loop), then
    tokenize_and_pad_batch (non-zero genes, a leading <cls>, max_len genes sampled). Returns the genes."""
    cls_id = 1
    genes_out = []
    for i in range(matrix.shape[0]):
        row = matrix[i].toarray().ravel()  # scGPT: a row of the densified layer
        if row.max() == 0:
            continue
        non_zero_ids = row.nonzero()
        non_zero_row = row[non_zero_ids]
        bins = np.quantile(non_zero_row, np.linspace(0, 1, N_BINS - 1))
        non_zero_digits = _digitize(non_zero_row, bins)
        binned_row = np.zeros_like(row, dtype=np.int64)
        binned_row[non_zero_ids] = non_zero_digits
        idx = np.nonzero(binned_row)[0]  # tokenize_batch(include_zero_gene=False, append_cls=True)
        genes = np.insert(gene_ids[idx], 0, cls_id)
        values = np.insert(binned_row[idx], 0, 0)
        if len(genes) > MAX_LENGTH:  # pad_batch: sample max_len - 1 genes, keep <cls>
            keep = np.random.choice(len(genes) - 1, MAX_LENGTH - 1, replace=False) + 1
            keep = np.insert(keep, 0, 0)
            genes, values = genes[keep], values[keep]
        genes_out.append(genes)
    return genes_out


def child_peer_binned(path: Path, out: Path) -> dict:
    """scGPT's preprocessing: scanpy filters and normalisation, then its per-cell loops."""
    import scanpy as sc

    np.random.seed(0)
    start = time.perf_counter()
    adata = sc.read_h5ad(path)
    sc.pp.filter_cells(adata, min_genes=200)
    sc.pp.filter_genes(adata, min_cells=3)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    genes = scgpt_loop(adata.X, np.arange(adata.n_vars) + 5)
    np.save(out / "genes.npy", np.concatenate(genes))
    seconds = time.perf_counter() - start
    # tokens without the <cls> the loop adds (our records hold content tokens only)
    return {"seconds": seconds, "cells": len(genes), "tokens": int(sum(g.size - 1 for g in genes))}


def child_core(path: Path, who: str) -> dict:
    """Tokenization alone, the matrix already in memory (no file reading or writing, no QC)."""
    import anndata
    import scanpy as sc

    from biomask.cells.qc import row_sums
    from biomask.cells.tokenize import BinnedScheme

    adata = anndata.read_h5ad(path)
    matrix = adata.X.tocsr()
    np.random.seed(0)
    if who == "ours":  # numba compiles the kernel for these types on the first call: not tokenizing
        warm = matrix[:64]
        BinnedScheme(N_BINS, MAX_LENGTH).encode(
            warm, (10_000 / row_sums(warm)).astype(np.float32), np.arange(64)
        )
    start = time.perf_counter()
    if who == "ours":
        scheme = BinnedScheme(N_BINS, MAX_LENGTH)
        tokens = 0
        for lo in range(0, matrix.shape[0], 8192):
            block = matrix[lo : lo + 8192]
            scale = (10_000 / row_sums(block)).astype(np.float32)
            tokens += int(scheme.encode(block, scale, np.arange(lo, lo + block.shape[0])).lengths.sum())
    else:
        sc.pp.normalize_total(adata, target_sum=1e4)
        sc.pp.log1p(adata)
        tokens = int(sum(g.size - 1 for g in scgpt_loop(adata.X, np.arange(adata.n_vars) + 5)))
    return {"seconds": time.perf_counter() - start, "cells": matrix.shape[0], "tokens": tokens}


def child_peer_rank(path: Path, out: Path, vocab: Path) -> dict:
    """Geneformer's tokenize_anndata: backed h5ad, chunks normalised by n_counts and medians, a per-cell loop."""
    import pandas as pd
    import scanpy as sc
    import scipy.sparse as sp

    table = pd.read_csv(vocab / "genes.tsv", sep="\t", keep_default_na=False)
    start = time.perf_counter()
    adata = sc.read_h5ad(path, backed="r")
    position = pd.Index(adata.var_names).get_indexer(table["gene"])
    coding_loc = position[position >= 0]
    tokens = table["id"].to_numpy()[position >= 0]
    norm_factor = table["median"].to_numpy(np.float64)[position >= 0]
    tokenized, chunk = [], 512
    for lo in range(0, adata.n_obs, chunk):
        idx = np.arange(lo, min(lo + chunk, adata.n_obs))
        n_counts = adata.obs["n_counts"].to_numpy()[idx][:, None]
        x_view = adata[idx, :].X[:, coding_loc]
        x_norm = sp.csr_matrix(x_view / n_counts * 10_000 / norm_factor)
        for i in range(x_norm.shape[0]):
            row = x_norm[i]
            tokenized.append(tokens[row.indices][np.argsort(-row.data)][:RANK_LENGTH])
    np.save(out / "tokens.npy", np.concatenate(tokenized))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "cells": adata.n_obs, "tokens": int(sum(t.size for t in tokenized))}


def run_child(args: argparse.Namespace) -> None:
    _one_core()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.child == "ours":
        result = child_ours(Path(args.input), out / "store", args.scheme, args.vocab)
    elif args.child == "peer-binned":
        result = child_peer_binned(Path(args.input), out)
    elif args.child == "peer-rank":
        result = child_peer_rank(Path(args.input), out, Path(args.vocab))
    else:
        result = child_core(Path(args.input), args.child.removeprefix("core-"))
    Path(args.result).write_text(json.dumps(result))


# --------------------------------------------------------------------------------------------- parent


def measure(kind: str, path: Path, tmp: Path, label: str, **options: str) -> dict:
    """Run one child under the peak-RSS launcher; return its timing with the peak RSS."""
    result = tmp / f"{label}.json"
    cmd = [sys.executable, "-m", "benchmarks.bench_prep_cells", "--child", kind, "--input", str(path)]
    cmd += ["--out", str(tmp / label), "--result", str(result)]
    for key, value in options.items():
        cmd += [f"--{key}", value]
    rss = peak_rss_of(cmd)
    found = json.loads(result.read_text())
    return {**found, "cells_per_s": found["cells"] / found["seconds"], "peak_rss_mb": rss}


def table_rows(measured: dict[str, dict], peer: str) -> list[dict]:
    return [
        {"data": "SYNTHETIC", "who": who, "cells": m["cells"], "tokens": m["tokens"], "seconds": m["seconds"],
         "cells_per_s": m["cells_per_s"], "x_peer": m["cells_per_s"] / measured[peer]["cells_per_s"],
         "peak_rss_mb": m["peak_rss_mb"]}
        for who, m in measured.items()
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10,000 and 2,500 cells: a smoke run")
    parser.add_argument("--cells", type=int, help="main size (default 200,000)")
    parser.add_argument("--small-cells", type=int, help="second size, for peak RSS (default 50,000)")
    parser.add_argument("--genes", type=int, default=20_000)
    kinds = ["ours", "peer-binned", "peer-rank", "core-ours", "core-peer"]
    parser.add_argument("--child", choices=kinds, help=argparse.SUPPRESS)
    for hidden in ("input", "out", "result", "vocab"):
        parser.add_argument(f"--{hidden}", help=argparse.SUPPRESS)
    parser.add_argument("--scheme", default="binned", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args)
        return

    big = args.cells or (10_000 if args.quick else 200_000)
    small = args.small_cells or (2_500 if args.quick else 50_000)
    print(f"{SYNTHETIC_NOTE}: {big:,} and {small:,} cells x {args.genes:,} genes", flush=True)
    files = {
        n: write_synthetic_h5ad(CACHE / f"synthetic-{n}x{args.genes}.h5ad", n, args.genes)
        for n in (small, big)
    }
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp_name:
        tmp = Path(tmp_name)
        # a frozen vocabulary (with medians) built from the small matrix, as a trained model would bring
        small_build = measure("ours", files[small], tmp, "vocab")
        vocab = str(tmp / "vocab" / "store")
        binned = {
            "ours: whole stage, building the vocabulary": measure("ours", files[big], tmp, "build"),
            "ours: whole stage, frozen vocabulary": measure("ours", files[big], tmp, "frozen", vocab=vocab),
            "peer: scanpy + scGPT's per-cell loops": measure("peer-binned", files[big], tmp, "peer"),
        }
        rank = {
            "ours: whole stage, rank scheme, frozen vocabulary": measure(
                "ours", files[big], tmp, "rank", vocab=vocab, scheme="rank"
            ),
            "peer: Geneformer's per-cell loop": measure(
                "peer-rank", files[big], tmp, "peer-rank", vocab=vocab + "/tokenizer"
            ),
        }
        core = {
            "ours: BinnedScheme.encode on CSR blocks": measure("core-ours", files[small], tmp, "core-ours"),
            "peer: scanpy normalise + scGPT's loops": measure("core-peer", files[small], tmp, "core-peer"),
        }
        small_peer = measure("peer-binned", files[small], tmp, "peer-small")
    results = {
        "binned": table_rows(binned, "peer: scanpy + scGPT's per-cell loops"),
        "rank": table_rows(rank, "peer: Geneformer's per-cell loop"),
        "tokenization_only": table_rows(core, "peer: scanpy normalise + scGPT's loops"),
        "memory": [
            {"data": "SYNTHETIC", "cells": n, "ours_peak_rss_mb": ours["peak_rss_mb"],
             "peer_peak_rss_mb": peer["peak_rss_mb"], "ours_cells_per_s": ours["cells_per_s"]}
            for n, ours, peer in ((small, small_build, small_peer),
                                  (big, binned["ours: whole stage, building the vocabulary"],
                                   binned["peer: scanpy + scGPT's per-cell loops"]))
        ],
    }  # fmt: skip
    where = f"SYNTHETIC {big:,} x {args.genes:,} counts (NB fitted to pbmc3k), one core"
    print_table(f"{where}: h5ad file to tokens, binned scheme", results["binned"])
    print_table(f"{where}: h5ad file to tokens, rank scheme", results["rank"])
    print_table(
        f"SYNTHETIC {small:,} cells already in memory: binned tokenization alone",
        results["tokenization_only"],
    )
    print_table(
        "SYNTHETIC: peak RSS at two sizes (ours: whole stage building the vocabulary)", results["memory"]
    )
    path = save_result(
        "prep_cells",
        {"data": SYNTHETIC_NOTE, "cells": big, "genes": args.genes, "quick": args.quick, **results},
    )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
