"""Whether a DNA prep's store already holds its result, decided without the stage's own imports
(numpy's and pandas' readers, Biopython, the tokenizers library): a pipeline rerun starts one prep
process per store, and most of such a process's time went to imports when it had nothing to do. The
stage resolves its inputs here too, so that both compute one fingerprint."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from biomask import datasets
from biomask.datasets.registry import with_origin
from biomask.dna.config import DNAPrepConfig, InputSpec, TokenizerConfig
from biomask.dna.formats import guess_format, tokenizer_dir
from biomask.errors import BiomaskError, InputError, missing_input
from biomask.inputs import distinct_names, pattern_matches
from biomask.provenance import read_run_info, sha256_file, written_by_biomask
from biomask.stage import StageOutput, has_run_record
from biomask.store import TokenStore

GENOME_FORMATS = ("fasta", "genbank")
# what an input (and a registry entry of DNA) can be read as
INPUT_FORMATS = tuple(f for f in get_args(InputSpec.model_fields["format"].annotation) if f != "auto")


@dataclass
class ResolvedInput:
    """An input file ready to read: where it is, how to read it, and its checksum."""

    name: str
    path: Path
    format: str
    spec: InputSpec
    sha256: str
    # the name the path itself gives, where a link made `name` the file it leads to: a store an
    # earlier biomask split under it is this input's still
    given_name: str | None = None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "format": self.format, "sha256": self.sha256}


def _guess_format(path: Path) -> str:
    fmt = guess_format(path)
    if fmt is not None:
        return fmt
    raise InputError(
        f"cannot tell the format of {path} from its name; set `format: fasta`, `genbank`, `table` or `keel` on this input"
    )


def _task_format(spec: InputSpec, fmt: str, path: Path) -> str:
    """An input with a `task` reads as a labelled set ("task"); only a GenBank genome has the
    annotation a task is cut from."""
    if spec.task is None:
        return fmt
    if fmt != "genbank":
        raise InputError(
            f"input {spec.dataset or path}: task {spec.task.name} needs an annotated GenBank genome, "
            f"not {fmt}; use a registered GenBank dataset (e.g. ecoli-k12, bjaponicum) or a .gbk file"
        )
    return "task"


def _input_paths(text: str) -> list[Path]:
    """The file `path:` names, or the files a pattern in it matches (biomask.inputs)."""
    matches = pattern_matches(text)
    if matches is not None:
        return matches
    path = Path(text).expanduser()
    if path.is_dir():
        raise InputError(
            f"input {path} is a directory; name a file (FASTA, GenBank, CSV/TSV or KEEL) in `path:`, or "
            f"the files in it with a pattern: `path: {path}/*.fa.gz` (every match is an input)"
        )
    if not path.is_file():
        raise missing_input(path, "input file")
    return [path]


def _resolve_one(spec: InputSpec, resolved: list[ResolvedInput]) -> None:
    if spec.dataset is not None:
        formats = INPUT_FORMATS if spec.format == "auto" else ()  # the entry's format is used
        path, entry = datasets.fetch_input(spec.dataset, "dna", "prep dna", "DNA", formats)
        fmt = entry.format if spec.format == "auto" else spec.format
        resolved.append(ResolvedInput(spec.dataset, path, _task_format(spec, fmt, path), spec, entry.sha256))
    else:
        for path in _input_paths(str(spec.path)):
            if path.stat().st_size == 0:
                raise InputError(f"input file {path} is empty")
            fmt = _guess_format(path) if spec.format == "auto" else spec.format
            try:
                digest = sha256_file(path)
            except OSError as exc:
                raise InputError(f"cannot read input file {path}: {exc.strerror or exc}") from None
            resolved.append(ResolvedInput(path.name, path, _task_format(spec, fmt, path), spec, digest))


def resolve_inputs(specs: list[InputSpec]) -> list[ResolvedInput]:
    """Fetch registered datasets, check local files, and work out each input's format."""
    resolved: list[ResolvedInput] = []
    for spec in specs:
        _resolve_one(spec, resolved)
    files = [r for r in resolved if r.spec.dataset is None]
    # named as the file a link leads to: a genome's split hashes the name, and a workflow engine that
    # links it in under a name of its own (input.1.fa) must get the split of the genome it links. Not
    # where the target's name is no file name of a format (a content-addressed cache: DVC, git-annex,
    # the Hugging Face hub name their blobs by hash): there the link's own name is the meaningful one
    named = [_named_as(r.path) for r in files]
    given = distinct_names([r.path for r in files])
    for r, name, own in zip(files, distinct_names(named), given):
        r.name, r.given_name = name, own
    kinds = {"genome" if r.format in GENOME_FORMATS else "labelled" for r in resolved}
    if len(kinds) > 1:
        raise InputError(
            "inputs mix genomes (FASTA/GenBank) and labelled tables; prepare them as separate stores"
        )
    return resolved


_CONTENT_KEY = re.compile(r"^[A-Z0-9]+E?-s\d+--")  # git-annex's keys (SHA256E-s14--9f86d08.fa)


def _named_as(path: Path) -> Path:
    """The path an input is named by: along its chain of links, the last file whose name says its
    format and is not a content key (a DVC, git-annex or Hugging Face cache names its blobs by hash)."""
    named, current, seen = path, Path(os.path.abspath(path)), set()
    while current.is_symlink() and current not in seen:
        seen.add(current)
        target = Path(os.readlink(current))
        current = Path(os.path.normpath(current.parent / target))
        if guess_format(current) is not None and not _CONTENT_KEY.match(current.name):
            named = current
    return named


def tokenizer_inputs(cfg: TokenizerConfig) -> list[dict[str, Any]]:
    """A reused tokenizer is an input: its checksum enters the fingerprint."""
    if cfg.path is None:
        return []
    json_path = tokenizer_dir(cfg.path) / "tokenizer.json"
    if not json_path.is_file():
        raise InputError(f"tokenizer.path {cfg.path}: no tokenizer.json there")
    return [{"name": "tokenizer", "path": str(json_path), "sha256": sha256_file(json_path)}]


def stage_output(cfg: DNAPrepConfig, inputs: list[ResolvedInput]) -> StageOutput:
    return StageOutput(
        "prep-dna",
        cfg,
        cfg.output,
        inputs=[with_origin(i.describe()) for i in inputs] + tokenizer_inputs(cfg.tokenizer),
    )


def renamed_genome(cfg: DNAPrepConfig, inputs: list[ResolvedInput]) -> str | None:
    """Why the output, though of this config and these files' contents, is not this result: a genome
    input now named otherwise than when it was split (its blocks draw their split from the name, so
    a fresh prep would split it otherwise). None when no genome input was renamed."""
    info = read_run_info(cfg.output)
    if not written_by_biomask(info):
        return None
    recorded: dict[Any, set[Any]] = {}  # identical files under several names: each name is recorded
    for entry in info.get("inputs") or []:
        if isinstance(entry, dict):
            recorded.setdefault(entry.get("sha256"), set()).add(entry.get("name"))
    renamed = [
        (sorted(map(str, recorded[i.sha256])), i.name)
        for i in inputs
        if i.format in GENOME_FORMATS
        and i.sha256 in recorded
        and not recorded[i.sha256] & {i.name, i.given_name}
    ]
    if not renamed:
        return None
    old, new = renamed[0]
    return (
        f"output directory {cfg.output} holds this genome split under the input name {' or '.join(map(repr, old))}, "
        f"and this command names it {new!r}: a genome's blocks draw their split from the name, so it would "
        f"be split otherwise. Give the input under its recorded name, or pass --overwrite to split it as {new!r}"
    )


def current(cfg: DNAPrepConfig) -> Path | None:
    """The store when it holds this config's result on these inputs, whole; None when the stage must
    decide (no output, another result, an unreadable input or a damaged store: the stage says what is
    wrong, in its own order)."""
    if not has_run_record(cfg.output):
        return None
    try:
        inputs = resolve_inputs(cfg.inputs)
        if renamed_genome(cfg, inputs) or not stage_output(cfg, inputs).is_current():
            return None
        TokenStore(cfg.output)  # as the stage: reused only whole
    except (BiomaskError, OSError):
        return None
    return Path(cfg.output)
