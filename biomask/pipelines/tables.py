"""Status tables (rich) for local runs and SLURM jobs."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from biomask.pipelines.local import TaskResult
from biomask.pipelines.slurm import JobState

_STYLE = {
    "ran": "green",
    "ran (changed)": "green",
    "reused": "cyan",
    "failed": "bold red",
    "stopped": "yellow",
    "not run": "yellow",
    "run": "green",
    "resume": "green",
    "run again": "green",
    "reuse": "cyan",
    "refused": "bold red",
    "COMPLETED": "green",
    "RUNNING": "cyan",
    "PENDING": "yellow",
    "REQUEUED": "yellow",
    "FAILED": "bold red",
    "CANCELLED": "red",
    "TIMEOUT": "red",
}


def styled(text: str) -> str:
    style = _STYLE.get(text)
    return f"[{style}]{text}[/]" if style else text


def _short(path: str) -> str:
    """A path relative to the working directory when it lies below it (narrower tables)."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


def local_table(title: str, results: Sequence[TaskResult]) -> Table:
    table = Table(title=title)
    for column in ("stage", "status", "exit", "time", "output / detail"):
        table.add_column(column, overflow="fold")
    for r in results:
        exit_code = "" if r.exit_code is None else str(r.exit_code)
        detail = _short(r.output) if r.ok else (r.detail or _short(r.log or r.output))
        table.add_row(r.task, styled(r.status), exit_code, f"{r.seconds:.1f} s", detail)
    return table


def slurm_table(title: str, states: Sequence[JobState]) -> Table:
    table = Table(title=title)
    for column in ("stage", "task", "job", "state", "reason", "exit", "restarts", "start", "end"):
        table.add_column(column, overflow="fold")
    for s in states:
        table.add_row(
            s.stage,
            s.task,
            s.job_id,
            styled(s.state),
            s.reason,
            s.exit_code,
            str(s.restarts),
            s.start,
            s.end,
        )
    return table


def show(table: Table) -> None:
    Console(width=max(Console().width, 120)).print(table)


def print_failures(results: Sequence[TaskResult]) -> None:
    """One error line per failed stage on stderr, with the path of its log."""
    for r in results:
        if r.status == "failed":
            print(f"biomask: error: stage {r.task} failed (exit {r.exit_code}): {r.detail}", file=sys.stderr)
            print(f"  log: {r.log}", file=sys.stderr)
        elif r.status == "stopped":
            print(f"biomask: stage {r.task} stopped (exit {r.exit_code}): {r.detail}", file=sys.stderr)
