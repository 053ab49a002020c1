"""Peak memory and time of `biomask prep dna` on a labelled table, against the pandas way.

Data: a SYNTHETIC CSV (benchmarks/synthetic_table.py): 200-base rows of uniform random bases, three
labels, ~1 % duplicates (a third of them conflicting) and ~0.5 % rows with an N -- 500,000 rows
(105 MB) by default, the size the README quotes. Synthetic because no real labelled set that large
can be fetched here; every figure printed is labelled SYNTHETIC.

Each arm runs in a fresh process (`benchmarks/rss.py`: peak RSS), wall time including start-up:

- ours: the whole stage, char tokenizer, default settings (32 Mi-token shards);
- `--baseline DIR`: the same stage from another checkout (e.g. `git worktree add /tmp/old HEAD~1`),
  to measure a change; its store must be the same as ours (shard checksums compared);
- peer: what a pandas user writes -- `read_csv`, drop rows with > 10 % N, drop duplicates and
  conflicting labels with `groupby`, a stratified split with `groupby(...).sample`, every row's
  char tokens kept as a uint8 array.

    python -m benchmarks.bench_prep_dna_table [--quick] [--rows N ...] [--baseline DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import peak_rss_of, print_table, save_result
from benchmarks.synthetic_table import SYNTHETIC_NOTE, write_table

REPO = Path(__file__).resolve().parent.parent


def _stage(code: Path, table: Path, out: Path) -> tuple[float, float]:
    """(peak RSS in MB, seconds) of `biomask prep dna` run from the checkout `code`."""
    config = out.parent / f"{out.name}.yaml"
    config.write_text(f"inputs:\n  - path: {table}\noutput: {out}\n")
    start = time.perf_counter()
    # cwd is the checkout: `python -m biomask` imports the biomask found there
    peak = peak_rss_of(
        ["sh", "-c", f'cd "{code}" && exec "{sys.executable}" -m biomask -q prep dna -c "{config}"']
    )
    return peak, time.perf_counter() - start


def _splits(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())["splits"]


def _peer(table: str) -> None:
    import pandas as pd

    frame = pd.read_csv(table)
    frame = frame[frame["sequence"].str.count("N") / frame["sequence"].str.len() <= 0.1]
    n_labels = frame.groupby("sequence")["label"].transform("nunique")
    frame = frame[n_labels == 1].drop_duplicates("sequence")
    test = frame.groupby("label").sample(frac=0.2, random_state=0)
    rest = frame.drop(test.index)
    val = rest.groupby("label").sample(frac=0.1 / 0.8, random_state=0)
    splits = {"train": rest.drop(val.index), "val": val, "test": test}
    tokens = {
        k: [np.frombuffer(s.encode(), dtype=np.uint8).copy() for s in v["sequence"]]
        for k, v in splits.items()
    }
    print(sum(len(t) for t in tokens.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="50,000 rows: a smoke run")
    parser.add_argument("--rows", type=int, nargs="+", help="table sizes (default 100,000 and 500,000)")
    parser.add_argument("--baseline", type=Path, help="another checkout whose stage to measure as well")
    parser.add_argument("--no-peer", action="store_true", help="skip the pandas peer")
    parser.add_argument("--peer", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer:
        _peer(args.peer)
        return
    sizes = args.rows or ([50_000] if args.quick else [100_000, 500_000])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            table = write_table(Path(tmp) / f"table-{size}.csv", size)
            ours_mb, ours_s = _stage(REPO, table, Path(tmp) / f"ours-{size}")
            row = {
                "rows": size,
                "table_mb": table.stat().st_size / 1e6,
                "ours_peak_rss_mb": ours_mb,
                "ours_s": ours_s,
            }
            if args.baseline:
                base_mb, base_s = _stage(args.baseline.resolve(), table, Path(tmp) / f"base-{size}")
                same = _splits(Path(tmp) / f"ours-{size}") == _splits(Path(tmp) / f"base-{size}")
                assert same, "the baseline wrote a different store"
                row |= {
                    "baseline_peak_rss_mb": base_mb,
                    "baseline_s": base_s,
                    "ours_s_over_baseline": ours_s / base_s,
                }
            if not args.no_peer:
                start = time.perf_counter()
                row["peer_peak_rss_mb"] = peak_rss_of([sys.executable, "-m", "benchmarks.bench_prep_dna_table",
                                                       "--peer", str(table)])  # fmt: skip
                row["peer_s"] = time.perf_counter() - start
            rows.append(row)
    print_table(f"prep dna, labelled table: peak RSS and wall time ({SYNTHETIC_NOTE})", rows)
    save_result("prep_dna_table", {"data": SYNTHETIC_NOTE, "rows": rows, "quick": args.quick})


if __name__ == "__main__":
    main()
