"""Helpers shared by the benchmarks: peak RSS of a child process, result files, tables."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

RESULTS = Path(os.environ.get("BIOMASK_BENCH_DIR", "bench-results"))


def peak_rss_of(cmd: list[str]) -> float:
    """Run a command in a fresh process; return its peak resident memory in MB (see benchmarks/rss.py)."""
    run = subprocess.run([sys.executable, "-m", "benchmarks.rss", *cmd], capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {run.returncode}): {run.stderr[-2000:]}")
    return float(run.stdout.strip().splitlines()[-1])


def machine() -> dict[str, Any]:
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor()}


def save_result(name: str, result: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "machine": machine(), **result}, indent=2) + "\n")
    return path


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    table = Table(title=title)
    for column in rows[0]:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*(_fmt(v) for v in row.values()))
    Console(width=160).print(table)
