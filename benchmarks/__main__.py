"""`make bench` / `python -m benchmarks [--quick] [NAME ...]`: run every benchmarks/bench_*.py.

Each benchmark measures biomask against a peer implementation in the same run and prints ratios;
results are written as JSON under bench-results/ (or $BIOMASK_BENCH_DIR).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


def main() -> int:
    here = Path(__file__).parent
    available = sorted(p.stem.removeprefix("bench_") for p in here.glob("bench_*.py"))
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help=f"benchmarks to run (default: all of {available})"
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes: a smoke run, not figures to report"
    )
    args = parser.parse_args()
    unknown = sorted(set(args.names) - set(available))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; available: {available}")
    failed = []
    for name in args.names or available:
        print(f"\n=== benchmark: {name} ===", flush=True)
        cmd = [sys.executable, "-m", f"benchmarks.bench_{name}", *(["--quick"] if args.quick else [])]
        if subprocess.run(cmd).returncode != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
