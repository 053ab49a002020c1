"""DNA tokenization throughput and peak memory, against HF `tokenizers` on the same windows.

Real data: the first 70 Mb of human chrX (GRCh37, registry `hs37-chrX-70mb`), cleaned (N kept,
windows with > 10 % N dropped) and cut into 1,024-bp windows: ≈ 66 Mbp. For each tokenizer both
sides encode the same windows with the same vocabulary — ours through the vectorised paths, the
peer through `Tokenizer.encode_batch` on the saved tokenizer.json (the DNABERT-2 / Nucleotide
Transformer way) — and the ids are checked to be identical before timing. Single core: the
peer's Rust thread pool is limited to one thread (`RAYON_NUM_THREADS=1`); a second run gives the
peer every core for reference.

Peak memory: the whole `biomask prep dna` stage at two corpus sizes (10 and 70 Mbp) with the same
shard size, each in a fresh process, against the peer's natural script (tokenize every window with
`encode_batch`, keep the ids) at the same sizes.

    python -m benchmarks.bench_tokenize_dna [--quick]
"""

from __future__ import annotations

import os

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # before tokenizers starts its thread pool

import argparse
import json
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks.common import peak_rss_of, print_table, save_result
from biomask import datasets
from biomask.dna.cleaning import Cleaner
from biomask.dna.readers import read_fasta_blocks
from biomask.dna.tokenizers import (
    BPETokenizer,
    CharTokenizer,
    DNATokenizer,
    KmerTokenizer,
    OverlappingKmerTokenizer,
)

WINDOW = 1024
BATCH = 2048


def load_windows(max_bases: int | None) -> list[np.ndarray]:
    """Cleaned 1,024-bp windows of hs37 chrX as uint8 blocks (what the prep stage tokenizes)."""
    path = datasets.fetch("hs37-chrX-70mb")
    cleaner = Cleaner("upper", "n_token")
    rows, total = [], 0
    for _, _, bases in read_fasta_blocks(path, WINDOW * 64):
        chars, amb = cleaner.clean(bases, where="hs37")
        usable = chars.size // WINDOW * WINDOW
        windows = chars[:usable].reshape(-1, WINDOW)
        keep = amb[:usable].reshape(-1, WINDOW).sum(axis=1) <= 0.1 * WINDOW
        rows.append(windows[keep])
        total += int(keep.sum()) * WINDOW
        if max_bases and total >= max_bases:
            break
    stacked = np.concatenate(rows)
    return [stacked[i : i + BATCH] for i in range(0, len(stacked), BATCH)]


def tokenizers(windows: list[np.ndarray]) -> list[tuple[str, DNATokenizer]]:
    sample = [row.tobytes().decode() for batch in windows[:5] for row in batch]  # ~10 Mbp for BPE
    return [
        ("char", CharTokenizer()),
        ("kmer-6", KmerTokenizer(6)),
        ("overlapping-6", OverlappingKmerTokenizer(6)),
        ("bpe-4096", BPETokenizer.train(sample, vocab_size=4096)),
    ]


def time_ours(tok: DNATokenizer, windows: list[np.ndarray]) -> float:
    start = time.perf_counter()
    for batch in windows:
        tok.encode_windows(batch)
    return time.perf_counter() - start


def peer_texts(tok: DNATokenizer, windows: list[np.ndarray]) -> list[list[str]]:
    return [[tok.hf_text(row.tobytes().decode()) for row in batch] for batch in windows]


def time_peer(tok: DNATokenizer, texts: list[list[str]]) -> float:
    start = time.perf_counter()
    for batch in texts:
        tok.hf.encode_batch(batch, add_special_tokens=False)
    return time.perf_counter() - start


def throughput(args: argparse.Namespace) -> list[dict]:
    windows = load_windows(10_000_000 if args.quick else None)
    bases = sum(b.size for b in windows)
    rows = []
    for name, tok in tokenizers(windows):
        texts = peer_texts(tok, windows)
        for batch in sorted({0, len(windows) // 2, len(windows) - 1}):  # the first, middle and last batch
            ours = tok.encode_windows(windows[batch]).to_list()
            theirs = [e.ids for e in tok.hf.encode_batch(texts[batch], add_special_tokens=False)]
            assert [a.tolist() for a in ours] == theirs, (
                f"{name}: ids differ from the HF tokenizer (batch {batch})"
            )
        t_ours, t_peer = time_ours(tok, windows), time_peer(tok, texts)
        rows.append(
            {
                "tokenizer": name,
                "bases": bases,
                "ours_mbp_s": bases / t_ours / 1e6,
                "peer_mbp_s": bases / t_peer / 1e6,
                "speedup": t_peer / t_ours,
            }
        )
    return rows


def peer_all_cores(args: argparse.Namespace) -> dict[str, float]:
    """The peer again with every core (a fresh process: the thread pool size is fixed at start)."""
    env = {**os.environ, "RAYON_NUM_THREADS": str(os.cpu_count() or 1)}
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.bench_tokenize_dna",
        "--peer-only",
        *(["--quick"] if args.quick else []),
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory(args: argparse.Namespace) -> list[dict]:
    sizes = [2_000_000, 10_000_000] if args.quick else [10_000_000, 70_000_000]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            ours = peak_rss_of(
                [sys.executable, "-m", "biomask", "-q", "prep", "dna", "-c", "configs/dna/hs37-chrX.yaml",
                 f"output={tmp}/prep-{size}", "tokenizer.kind=kmer", f"windows.max_bases={size}",
                 "cleaning.ambiguous=n_token", f"shard_tokens={1 << 22}"]
            )  # fmt: skip
            peer = peak_rss_of(
                [sys.executable, "-m", "benchmarks.bench_tokenize_dna", "--peer-memory", str(size)]
            )
            rows.append({"corpus_bases": size, "ours_peak_rss_mb": ours, "peer_peak_rss_mb": peer})
    return rows


def _peer_memory_script(max_bases: int) -> None:
    """What a peer script does: every window through encode_batch, every id kept."""
    tok = KmerTokenizer(6)
    kept = []
    for batch in load_windows(max_bases):
        kept.extend(
            e.ids
            for e in tok.hf.encode_batch([r.tobytes().decode() for r in batch], add_special_tokens=False)
        )
    print(len(kept))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 Mbp instead of 66 Mbp")
    parser.add_argument("--peer-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--peer-memory", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer_memory:
        _peer_memory_script(args.peer_memory)
        return
    if args.peer_only:
        windows = load_windows(10_000_000 if args.quick else None)
        bases = sum(b.size for b in windows)
        result = {
            name: bases / time_peer(tok, peer_texts(tok, windows)) / 1e6 for name, tok in tokenizers(windows)
        }
        print(json.dumps(result))
        return

    speed = throughput(args)
    multi = peer_all_cores(args)
    for row in speed:
        row[f"peer_{os.cpu_count()}_threads_mbp_s"] = multi[row["tokenizer"]]
    print_table(
        f"DNA tokenization, real genome (hs37 chrX, {speed[0]['bases'] / 1e6:.1f} Mbp in 1,024-bp windows), one core",
        speed,
    )
    mem = memory(args)
    for row in mem:
        row["peer_over_ours"] = row["peer_peak_rss_mb"] / row["ours_peak_rss_mb"]
    print_table("Peak RSS: the whole prep stage (ours, 4 Mi-token shards) vs tokenize-and-keep (peer)", mem)
    save_result("tokenize_dna", {"throughput": speed, "memory": mem, "quick": args.quick})


if __name__ == "__main__":
    main()
