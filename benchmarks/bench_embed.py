# ruff: noqa: E402 - the thread limits must be set before numpy / torch are imported
"""Embedding throughput and streaming memory: `biomask embed` against what a user would write.

Models: portable checkpoints of the `tiny` encoder (d 64, 2 layers) with RANDOM weights (speed does not
depend on them), written with the real vocabularies: pbmc3k's gene vocabulary and prep settings (binned,
51 bins; inputs up to `--cells-length` tokens for throughput, `--stream-length` for the memory arm) and the char DNA tokenizer (1 kb windows of real
C. elegans chrX, 1,026 tokens with [CLS]/[SEP]).

- throughput (cells/s, sequences/s), one thread, the same records and model on both sides:
  ours `biomask.embedding.inference.embed_records` (records sorted by length into batches, padding
  masked); peer: the plain per-batch loop a user writes — `collate` + `model.embed` over consecutive
  batches in file order, no sorting. Cells: 600 real pbmc3k cells (a seeded sample), tokenized by the prep
  stage (up to 1,200 genes each, so lengths vary). Outputs are checked equal (same vectors up to float rounding).
- `--device cuda`: both arms on the GPU (the models moved there; the plain loop moves each batch),
  written to bench-results/embed-gpu.json: GPU cells/s against the plain loop, and the streaming RSS
  of `biomask embed` on the GPU (it should stay flat as the file grows, as on the CPU).
- peak RSS of the whole `biomask embed` stage streaming a SYNTHETIC h5ad in backed mode (counts drawn
  from a negative-binomial model fitted to pbmc3k, benchmarks/synthetic_cells.py; cached under
  .cache/bench/) at two sizes, each in a fresh process, against reading the file into memory and
  calling the in-memory API (`anndata.read_h5ad` + `biomask.embed`).

    python -m benchmarks.bench_embed [--quick] [--cache DIR] [--device cpu|cuda]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import peak_rss_of, print_table, save_result
from benchmarks.synthetic_cells import SYNTHETIC_NOTE, write_synthetic_h5ad

REPO = Path(__file__).resolve().parent.parent


def _prep(config: str, output: Path, overrides: list[str]) -> Path:
    import subprocess

    cmd = [sys.executable, "-m", "biomask", "-q", config.split()[0], config.split()[1], "-c"]
    cmd += [str(REPO / config.split()[2]), f"output={output}", *overrides]
    subprocess.run(cmd, check=True)
    return output


def random_checkpoint(store: Path, out: Path, max_length: int) -> Path:
    """A portable checkpoint of the tiny encoder for `store`'s data, with random weights (speed only)."""
    from biomask.models import EncoderConfig, MaskedEncoder, save_pretrained
    from biomask.store import TokenStore
    from biomask.training.data import DataSpec
    from biomask.training.trainer import prep_settings

    if (out / "config.json").exists():
        return out
    token_store = TokenStore(store)
    spec = DataSpec.from_store(token_store)
    cells = spec.modality == "cells"
    arch = EncoderConfig(
        vocab_size=spec.vocab_size,
        modality=spec.modality,
        max_len=max_length,
        positions=not cells,
        value_embedding="bins" if cells else "none",
        n_bins=spec.n_bins,
        scheme=spec.scheme,
        target="bins" if cells else "tokens",
    )
    torch.manual_seed(0)
    model = MaskedEncoder(arch)
    info = {
        "modality": spec.modality,
        "scheme": spec.scheme,
        "n_bins": spec.n_bins,
        "masking": {"scheme": "none (random weights: benchmark only)"},
        "tokenizer": {k: v for k, v in token_store.manifest["tokenizer"].items() if k != "dir"},
        "training": {"steps": 0, "max_length": max_length},
        "data": {"store": str(store)},
        "prep": prep_settings(token_store),
    }
    return save_pretrained(model.state_dict(), arch, out, tokenizer_dir=store / "tokenizer", info=info)


def plain_loop(model, records, *, modality: str, batch_size: int) -> np.ndarray:
    """The peer: consecutive batches in the given order, collate + forward, no sorting."""
    from biomask.training.data import collate

    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, len(records), batch_size):
            batch = collate(records[i : i + batch_size], modality=modality)
            batch = {k: v.to(device) for k, v in batch.items()}
            out.append(model.embed(batch, pooling="mean").cpu().numpy())
    return np.concatenate(out)


def throughput(
    checkpoint: Path, records: list[dict], label: str, batch_size: int, repeats: int, device: str = "cpu"
) -> dict:
    from biomask.embedding.inference import embed_records, fit_record, inference_max_length, order_free
    from biomask.models import load_pretrained

    torch.set_num_threads(1)
    model = load_pretrained(checkpoint, device=device)
    specials = 2 if model.config.modality == "dna" else 1
    limit = inference_max_length(model) - specials
    fitted = [
        {k: v for k, v in fit_record(r, limit, order_free=order_free(model)).items() if k != "labels"}
        for r in records
    ]
    times = {"ours": [], "peer": []}
    for _ in range(repeats):  # interleaved, fastest of `repeats`
        t = time.perf_counter()
        ours = embed_records(model, fitted, pooling="mean", batch_size=batch_size)
        times["ours"].append(time.perf_counter() - t)
        t = time.perf_counter()
        peer = plain_loop(model, fitted, modality=model.config.modality, batch_size=batch_size)
        times["peer"].append(time.perf_counter() - t)
    gap = float(np.abs(ours - peer).max())
    assert gap < 1e-4, f"{label}: the two arms disagree by {gap}"
    n = len(fitted)
    tokens = sum(len(r["tokens"]) for r in fitted)
    best = {k: min(v) for k, v in times.items()}
    return {
        "what": label,
        "records": n,
        "mean tokens": round(tokens / n, 1),
        "ours /s": n / best["ours"],
        "plain loop /s": n / best["peer"],
        "ratio": best["peer"] / best["ours"],
        "max |diff|": gap,
    }


def stream_rss(checkpoint: Path, h5ad: Path, tmp: Path, cells: int, device: str = "cpu") -> dict:
    out = tmp / f"emb-{cells}.h5ad"
    cmd = [sys.executable, "-m", "biomask", "-q", "embed", "--checkpoint", str(checkpoint)]
    cmd += ["--input", str(h5ad), "--output", str(out), "chunk_size=4096", f"device={device}", "--overwrite"]
    t = time.perf_counter()
    ours = peak_rss_of(cmd)
    elapsed = time.perf_counter() - t
    script = (
        "import anndata, biomask, sys, torch; torch.set_num_threads(1); "
        "a = anndata.read_h5ad(sys.argv[1]); biomask.embed(a, sys.argv[2], device=sys.argv[3])"
    )
    peer = peak_rss_of([sys.executable, "-c", script, str(h5ad), str(checkpoint), device])
    size = h5ad.stat().st_size / 1e6
    out.unlink(missing_ok=True)
    return {
        "cells (SYNTHETIC)": cells,
        "h5ad MB": size,
        "biomask embed RSS MB": ours,
        "stage cells/s": cells / elapsed,
        "read_h5ad + biomask.embed RSS MB": peer,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument(
        "--cache", default=".cache/bench", help="where prepared data and synthetic files live"
    )
    parser.add_argument(
        "--cells-length",
        type=int,
        default=1201,
        help="throughput: cells model input ([CLS] + up to 1,200 genes)",
    )
    parser.add_argument("--stream-length", type=int, default=129, help="streaming memory: cells model input")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where both arms embed")
    args = parser.parse_args()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    quick = args.quick
    with tempfile.TemporaryDirectory(dir=cache) as tmp_name:
        tmp = Path(tmp_name)
        pbmc = _prep("prep cells configs/cells/pbmc3k.yaml", cache / "embed-pbmc3k", [])
        bases = 1_000_000 if quick else 4_000_000
        genome = _prep(
            "prep dna configs/dna/ce2-chrX.yaml", cache / f"embed-ce2-{bases}", [f"windows.max_bases={bases}"]
        )
        cells_ckpt = random_checkpoint(
            pbmc, cache / f"embed-cells-ckpt-{args.cells_length}", args.cells_length
        )
        stream_ckpt = random_checkpoint(
            pbmc, cache / f"embed-cells-ckpt-{args.stream_length}", args.stream_length
        )
        dna_ckpt = random_checkpoint(genome, cache / f"embed-dna-ckpt-{bases}", 1026)

        from biomask.store import TokenStore

        cell_records = [r for s in ("train", "val", "test") for r in TokenStore(pbmc).split(s)]
        dna_records = list(TokenStore(genome).split("train"))
        # a seeded sample of cells (their lengths vary: 500-1,200 genes), the first windows
        pick = np.random.default_rng(0).permutation(len(cell_records))[: 200 if quick else 600]
        cell_records = [cell_records[i] for i in np.sort(pick)]
        dna_records = dna_records[: 64 if quick else 256]
        repeats = 1 if quick else 3
        rows = [
            throughput(cells_ckpt, cell_records, "pbmc3k cells (real)", 64, repeats, args.device),
            throughput(dna_ckpt, dna_records, "C. elegans 1 kb windows (real)", 32, repeats, args.device),
        ]
        print_table(f"embedding throughput on {args.device}, 1 thread (fastest of interleaved repeats)", rows)

        sizes = (2_500, 10_000) if quick else (10_000, 50_000)
        memory = []
        for n in sizes:
            h5ad = write_synthetic_h5ad(cache / f"synthetic-{n}x20000.h5ad", n, 20_000)
            memory.append(stream_rss(stream_ckpt, h5ad, tmp, n, args.device))
        print_table(f"peak RSS streaming a SYNTHETIC h5ad ({SYNTHETIC_NOTE})", memory)
    path = save_result(
        "embed" if args.device == "cpu" else "embed-gpu",
        {
            "quick": quick,
            "device": args.device,
            "threads": 1,
            "model": "tiny (d 64, 2 layers), random weights",
            "cells_max_length": args.cells_length,
            "streaming_max_length": args.stream_length,
            "throughput": rows,
            "streaming_memory": memory,
            "synthetic": SYNTHETIC_NOTE,
        },
    )
    print(json.dumps({"written": str(path)}))


if __name__ == "__main__":
    main()
