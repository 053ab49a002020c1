"""Whether a cells prep's store already holds its result, decided without the stage's own imports
(anndata's and h5py's readers, pandas, scipy, numba) and without opening a matrix (a 10x folder is
converted when opened): a pipeline rerun starts one prep process per store, and most of such a
process's time went to imports when it had nothing to do. The stage resolves its inputs here too, so
that both compute one fingerprint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from biomask import datasets
from biomask.cells.config import NON_SEMANTIC, CellsPrepConfig, InputSpec, TokenizerConfig
from biomask.cells.formats import FORMATS, checked_vocabulary_dir, guess_format, input_checksum
from biomask.errors import BiomaskError, InputError, missing_input
from biomask.inputs import distinct_names, pattern_matches
from biomask.provenance import sha256_file
from biomask.stage import StageOutput, has_run_record
from biomask.store import TokenStore


def _resolve(spec: InputSpec) -> list[tuple[str, Path, str, str]]:
    """(name, path, format, sha256) of an input -- of each file or 10x folder a pattern in `path:`
    matches (biomask.inputs); registry entries are fetched and verified."""
    if spec.dataset is not None:
        formats = FORMATS if spec.format == "auto" else ()  # the entry's format is used
        path, entry = datasets.fetch_input(spec.dataset, "cells", "prep cells", "expression", formats)
        return [(spec.dataset, path, entry.format if spec.format == "auto" else spec.format, entry.sha256)]
    paths = pattern_matches(str(spec.path), folders=True) or [Path(str(spec.path)).expanduser()]
    resolved = []
    for path in paths:
        if not path.exists():
            raise missing_input(path)
        fmt = guess_format(path) if spec.format == "auto" else spec.format
        resolved.append((path.name, path, fmt, input_checksum(path)))
    return resolved


def resolve_inputs(specs: list[InputSpec]) -> list[tuple[InputSpec, str, Path, str, str]]:
    """(spec, name, path, format, sha256) of every input, files named apart (biomask.inputs)."""
    found = [(spec, *entry) for spec in specs for entry in _resolve(spec)]
    files = [i for i, (spec, *_) in enumerate(found) if spec.dataset is None]
    for i, name in zip(files, distinct_names([found[i][2] for i in files])):
        found[i] = (found[i][0], name, *found[i][2:])
    return found  # type: ignore[return-value]


def vocabulary_inputs(cfg: TokenizerConfig) -> list[dict[str, Any]]:
    """A frozen vocabulary is an input: its files' checksums enter the fingerprint."""
    if cfg.path is None:
        return []
    directory = checked_vocabulary_dir(cfg.path)
    files = [directory / "tokenizer.json", directory / "genes.tsv"]
    for path in files:
        if not path.is_file():
            raise InputError(f"tokenizer.path {cfg.path}: no {path.name} in {directory}")
    return [{"name": f"vocabulary/{p.name}", "path": str(p), "sha256": sha256_file(p)} for p in files]


def stage_output(cfg: CellsPrepConfig, inputs: list[dict[str, Any]]) -> StageOutput:
    """`inputs`: an entry per input (the stage's also say what it found on opening it, its cells and
    genes; only each one's sha256 enters the fingerprint); the frozen vocabulary's files are added here."""
    return StageOutput(
        "prep-cells",
        cfg,
        cfg.output,
        inputs=inputs + vocabulary_inputs(cfg.tokenizer),
        non_semantic=NON_SEMANTIC,
    )


def current(cfg: CellsPrepConfig) -> Path | None:
    """The store when it holds this config's result on these inputs, whole; None when the stage must
    decide (no output, another result, an unreadable input or a damaged store: the stage says what is
    wrong, in its own order)."""
    if not has_run_record(cfg.output):
        return None
    try:
        entries = [
            {"name": name, "path": str(path), "format": fmt, "matrix": spec.matrix, "sha256": digest}
            for spec, name, path, fmt, digest in resolve_inputs(cfg.inputs)
        ]
        if not stage_output(cfg, entries).is_current():
            return None
        TokenStore(cfg.output)  # as the stage: reused only whole
    except (BiomaskError, OSError):
        return None
    return Path(cfg.output)
