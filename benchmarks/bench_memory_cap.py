"""Pretraining on a token store larger than the memory it may use: the profile autoencoder under a
hard memory cap (a cgroup) below its training split's size, as shipped against the same trainer
without its random-access advice to the kernel (`TokenSplit.read_randomly`, MADV_RANDOM) — the peer
here is biomask's own loop as it read before 2026-12-06, in the same run.

    python -m benchmarks.bench_memory_cap            # 200,000 cells x 1,000-gene panel (~1.1 GB split), cap 400 MB
    python -m benchmarks.bench_memory_cap --quick    # 100,000 cells (~0.55 GB split), cap 380 MB

Data: SYNTHETIC counts (benchmarks/synthetic_cells.py: a negative-binomial model fitted to pbmc3k),
prepared with configs/cells/pbmc3k-panel.yaml (1,000 HVGs). Each arm is a fresh `biomask pretrain`
of configs/pretrain/cells-mlp.yaml in its own cgroup, after the store's pages are dropped from the
page cache (so pages the prep read are not counted as free). Recorded: wall time, peak usage,
how often the cgroup hit its cap (v1 failcnt, v2 `max` events) and OOM kills.

Needs root and the cgroup v1 memory controller (/sys/fs/cgroup/memory) or cgroup v2 with the memory
controller delegated to the root group; elsewhere it says so and records nothing. Memory pages are
file-backed here, so the advice changes no result, only how often the same pages are read again:
the time ratio is the figure (this machine's disk readahead, /sys/block/*/queue/read_ahead_kb,
decides how large it is).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import print_table, save_result
from benchmarks.synthetic_cells import SYNTHETIC_NOTE, write_synthetic_h5ad

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "bench"
V1 = Path("/sys/fs/cgroup/memory")
V2 = Path("/sys/fs/cgroup")

# The comparison arm: the trainer with the training split's advice turned off.
WITHOUT_ADVICE = (
    "import sys; from biomask import store; store.TokenSplit.read_randomly = lambda self: self; "
    "from biomask.cli import main; sys.exit(main(sys.argv[1:]))"
)


class Cgroup:
    """A memory cgroup of its own (v1 or v2), with a hard limit; processes join it as they start."""

    def __init__(self, limit_bytes: int) -> None:
        name = f"biomask-bench-{os.getpid()}"
        if (V1 / "memory.limit_in_bytes").exists():
            self.path, self.v1 = V1 / name, True
            self.path.mkdir()
            (self.path / "memory.limit_in_bytes").write_text(str(limit_bytes))
            (self.path / "memory.swappiness").write_text("0")
        else:
            self.path, self.v1 = V2 / name, False
            self.path.mkdir()
            (self.path / "memory.max").write_text(str(limit_bytes))
            (self.path / "memory.swap.max").write_text("0")

    def run(self, cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
        join = f'echo $$ > {self.path / "cgroup.procs"}; exec "$@"'
        return subprocess.run(["bash", "-c", join, "_", *cmd], env=env, capture_output=True, text=True)

    def stats(self) -> dict[str, Any]:
        if self.v1:
            oom = dict(line.split() for line in (self.path / "memory.oom_control").read_text().splitlines())
            return {
                "peak_mb": int((self.path / "memory.max_usage_in_bytes").read_text()) / 2**20,
                "hit_cap": int((self.path / "memory.failcnt").read_text()),
                "oom_kills": int(oom.get("oom_kill", 0)),
            }
        events = dict(line.split() for line in (self.path / "memory.events").read_text().splitlines())
        peak = self.path / "memory.peak"
        return {
            "peak_mb": int(peak.read_text()) / 2**20 if peak.exists() else float("nan"),
            "hit_cap": int(events.get("max", 0)),
            "oom_kills": int(events.get("oom_kill", 0)),
        }

    def remove(self) -> None:
        self.path.rmdir()


def usable() -> str | None:
    """Why this machine cannot run the benchmark, or None."""
    if os.geteuid() != 0:
        return "needs root (it creates a memory cgroup)"
    if (V1 / "memory.limit_in_bytes").exists() and os.access(V1, os.W_OK):
        return None
    controllers = V2 / "cgroup.subtree_control"
    if controllers.exists() and "memory" in controllers.read_text().split():
        return None
    return "no writable memory cgroup (v1 /sys/fs/cgroup/memory, or v2 with the memory controller)"


def drop_cached(root: Path) -> None:
    """Take the store's pages out of the page cache: pages another process read are not charged to
    the capped run, and would make it look as if the store fitted."""
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def split_bytes(store: Path) -> int:
    return sum(p.stat().st_size for p in (store / "train").rglob("*") if p.is_file())


def arm(name: str, python_args: list[str], store: Path, out: Path, cap: int, steps: int) -> dict[str, Any]:
    drop_cached(store)
    group = Cgroup(cap)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    cmd = [
        sys.executable,
        *python_args,
        "pretrain",
        "--config",
        str(REPO / "configs" / "pretrain" / "cells-mlp.yaml"),
        f"data.store={store}",
        f"output={out}",
        f"train.steps={steps}",
        f"train.checkpoint_every={steps}",
        "train.eval_every=0",
        "train.progress=false",
    ]
    started = time.perf_counter()
    try:
        done = group.run(cmd, env)
        seconds = time.perf_counter() - started
        stats = group.stats()
    finally:
        group.remove()
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no message)"])[-1][-200:]
        stats["error"] = (
            "killed for memory (the cap is below the run's own needs)" if stats["oom_kills"] else last
        )
    return {
        "arm": name,
        "finished": done.returncode == 0,
        "seconds": round(seconds, 1),
        "steps_per_s": round(steps / seconds, 2),
        **stats,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100,000 cells, a 380 MB cap: a smoke run")
    parser.add_argument("--cells", type=int, help="cells (default 200,000)")
    # the run itself needs ~280 MB of anonymous memory (the model, DeepSpeed, torch): a cap below ~350 MB
    # kills it whatever it reads
    parser.add_argument("--cap-mb", type=int, help="the memory cap (default 400 MB; quick 380 MB)")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    why = usable()
    if why:
        print(f"bench_memory_cap: skipped: {why}")
        return
    cells = args.cells or (100_000 if args.quick else 200_000)
    cap = (args.cap_mb or (380 if args.quick else 400)) * 2**20
    print(f"{SYNTHETIC_NOTE}: {cells:,} cells x 3,000 genes, 1,000-gene panel", flush=True)
    source = write_synthetic_h5ad(CACHE / f"synthetic-{cells}x3000.h5ad", cells, 3000)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp_name:
        tmp = Path(tmp_name)
        store = tmp / "store"
        prep = [
            sys.executable, "-m", "biomask", "prep", "cells",
            "--config", str(REPO / "configs" / "cells" / "pbmc3k-panel.yaml"),
            f"inputs=[{{path: {source}}}]", f"output={store}", "hvg.n_top_genes=1000",
        ]  # fmt: skip
        subprocess.run(prep, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        size = split_bytes(store)
        rows = [
            arm("biomask (MADV_RANDOM on the training split)", ["-m", "biomask"], store, tmp / "a", cap, args.steps),
            arm("the same loop without the advice", ["-c", WITHOUT_ADVICE], store, tmp / "b", cap, args.steps),
        ]  # fmt: skip
    for row in rows:  # time against biomask's arm: how much longer the same steps took
        row["time_x"] = round(row["seconds"] / rows[0]["seconds"], 1) if rows[0]["finished"] else None
    title = (
        f"SYNTHETIC {cells:,} cells: cells-mlp pretraining, {args.steps} steps, training split "
        f"{size / 2**20:,.0f} MB under a {cap / 2**20:,.0f} MB cap"
    )
    print_table(title, rows)
    path = save_result(
        "memory_cap",
        {"data": SYNTHETIC_NOTE, "cells": cells, "split_mb": size / 2**20, "cap_mb": cap / 2**20,
         "steps": args.steps, "arms": rows},
    )  # fmt: skip
    print(f"written: {path}")


if __name__ == "__main__":
    main()
