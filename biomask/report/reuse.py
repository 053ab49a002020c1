"""Whether a report's output already holds its result, decided without the report's own imports
(matplotlib, scikit-learn, scipy): a pipeline rerun starts a report process of its own, and most of
its time went to imports when it had nothing to do."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from biomask.errors import BiomaskError, InputError, StaleOutputError, missing_input
from biomask.provenance import read_run_info, sha256_file
from biomask.report.config import ReportConfig
from biomask.stage import StageOutput, has_run_record


def stage_inputs(cfg: ReportConfig) -> list[dict[str, Any]]:
    """Each input stage's fingerprint: the report is rebuilt when any of them changes."""
    paths = [p for ps in cfg.pretrain.values() for p in ps] + [e.path for e in cfg.evaluations.values()]
    inputs = []
    for p in paths:
        root = Path(p)
        runs = (
            [root]
            if (root / "run.json").exists()
            else sorted(x for x in root.glob("*") if (x / "run.json").exists() and not x.name.startswith("."))
        )
        for run in runs:
            info = read_run_info(run) or {}
            # "path": the output may not be, hold or lie inside an input (--overwrite would delete it)
            entry = {
                "name": str(run),
                "path": str(run),
                "fingerprint": info.get("fingerprint", ""),  # the stage's, not a file's sha256
                "created": info.get("created", ""),
            }
            if (run / "metrics.json").is_file():  # what the report reads of an evaluation: an edit counts
                entry["metrics_sha256"] = sha256_file(run / "metrics.json")
            inputs.append(entry)
    if cfg.embedding is not None and Path(cfg.embedding.path).exists():
        inputs.append(
            {
                "name": cfg.embedding.path,
                "path": cfg.embedding.path,
                "sha256": sha256_file(cfg.embedding.path),
            }
        )
    return inputs


def check_inputs(cfg: ReportConfig) -> None:
    """Each input the config names exists and is what its key says, named by that key, before anything
    is read: a missing one was blamed on the output ("writing the output ... failed"), a file given for
    a folder read as missing, and a provenance entry with no run record dropped without a word."""
    named = [(f"pretrain.{label}", p, "dir") for label, ps in cfg.pretrain.items() for p in ps]
    named += [
        (f"evaluations.{name}.path", e.path, "dir") for name, e in cfg.evaluations.items() if e is not None
    ]
    named += [("provenance", p, "run") for p in cfg.provenance]
    if cfg.embedding is not None:
        named.append(("embedding.path", cfg.embedding.path, "file"))
    for key, given, kind in named:
        path = Path(given)
        if not path.exists():
            raise missing_input(given, key)
        if kind == "file" and not path.is_file():
            raise InputError(f"{key} {given} is a folder: give the .h5ad file `biomask embed` wrote")
        if kind != "file" and not path.is_dir():
            raise InputError(
                f"{key} {given} is a file: give a biomask output folder (a run's, or a sweep's that holds runs)"
            )
        if kind == "run" and not has_run_record(path):
            raise InputError(
                f"{key} {given} holds no run.json: give an output folder a biomask stage wrote (a token store, "
                "a pretrain run, an evaluation) whose config and checksums the report should list"
            )


def stage_output(cfg: ReportConfig) -> StageOutput:
    return StageOutput("report", cfg, cfg.output, inputs=stage_inputs(cfg))


# What every report this biomask writes holds beside report.md (report.py writes it; a workflow gates
# on it). Named here, not imported, so a rerun that reuses a report imports no plotting.
SUMMARY_JSON = "summary.json"


def refuse_older_report(cfg: ReportConfig) -> None:
    """A report an older biomask wrote (before 2026-12-06: no summary.json, and its record of the
    evaluations it read in an older form) is not this version's result: reused, a workflow gating on
    summary.json found none, and compared, its inputs read as changed data. Refused as stale, naming
    why, so `--overwrite` (a pipeline does it itself) writes it again in seconds."""
    out = Path(cfg.output)
    info = read_run_info(out) if has_run_record(out) else None
    if info is not None and info.get("stage") == "report" and not (out / SUMMARY_JSON).is_file():
        raise StaleOutputError(
            f"output directory {out} holds a report written by an older biomask (it has no {SUMMARY_JSON}, "
            "which reports now hold); pass --overwrite to write it again (a report takes seconds), or "
            "choose another output path"
        )


def current(cfg: ReportConfig) -> Path | None:
    """report.md when the output holds this config's report of these inputs; None when the stage must
    decide (no output, another result, an unreadable input: the stage says what is wrong)."""
    if not has_run_record(cfg.output):
        return None
    try:
        refuse_older_report(cfg)
        return Path(cfg.output) / "report.md" if stage_output(cfg).is_current() else None
    except (BiomaskError, OSError):
        return None
