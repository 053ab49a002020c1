"""The schema of `biomask prep dna` configs (see configs/dna/*.yaml for annotated examples)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from biomask.config import Config, Seed, SplitFractions
from biomask.datasets.annotation_tasks import TASKS
from biomask.store import DEFAULT_SHARD_TOKENS

# The registry's names (`biomask.datasets.annotation_tasks.TASKS`), so a config names a task it holds.
TaskName = Literal[tuple(TASKS)]  # type: ignore[valid-type]


class TaskSpec(Config):
    """A labelled task derived from an annotated GenBank genome (`biomask.datasets.annotation_tasks`),
    the rows `biomask datasets task` would write, read without a CSV in between — so a pipeline can
    prepare a real labelled set from a registered genome in one stage."""

    # gene-starts: windows holding a CDS start vs others; coding: coding / antisense / noncoding windows
    name: TaskName
    length: int = Field(200, ge=20)  # window length in bases
    # gene-starts only — random: a motif task; centre: a position task
    placement: Literal["random", "centre"] = "random"
    max_per_class: int | None = Field(None, ge=1)  # at most this many windows per label (balanced)
    seed: Seed = 0  # which windows (the random placement, the `other` windows, the subset)


class InputSpec(Config):
    """One input: a registered dataset (`dataset`) or a file (`path`)."""

    dataset: str | None = None
    # a file, or a pattern naming many (genomes/*.fa.gz; **/ reaches subfolders): each match is an input
    path: str | None = None
    # fasta / genbank: genome records to cut into windows; table: CSV/TSV with sequence and label
    # columns; keel: KEEL data file (comma-separated bases, label last); auto: registry or file name.
    format: Literal["auto", "fasta", "genbank", "table", "keel"] = "auto"
    sequence_column: str = "sequence"
    label_column: str = "label"
    split_column: str | None = None  # values train / val / test; without it splits are drawn by seed
    id_column: str | None = None
    delimiter: str | None = None  # table delimiter; default: tab if the header has more tabs than commas
    # a GenBank genome turned into labelled windows (e.g. {name: gene-starts, max_per_class: 4000}):
    # the input is then a labelled set, like a table
    task: TaskSpec | None = None

    @model_validator(mode="after")
    def _one_source(self) -> InputSpec:
        if (self.dataset is None) == (self.path is None):
            raise ValueError("give exactly one of `dataset` (a registry name) or `path` (a file)")
        return self


class CleaningConfig(Config):
    lowercase: Literal["upper", "ambiguous"] = "upper"  # soft-masked repeats: ordinary bases, or ambiguous
    ambiguous: Literal["n_token", "drop", "split", "error"] = "n_token"  # N and IUPAC codes
    max_ambiguous_fraction: float = Field(0.1, ge=0.0, le=1.0)  # n_token: drop windows with more N than this
    min_length: int = Field(1, ge=1)  # shorter sequences (and genome segments) are dropped
    deduplicate: bool = True  # exact duplicates removed before splitting
    conflicting_labels: Literal["drop", "error"] = "drop"  # duplicates with different labels


class WindowConfig(Config):
    length: int = Field(1024, ge=1)
    stride: int | None = Field(None, ge=1)  # default: the window length (no overlap)
    reverse_complement: bool = False  # add the reverse complement of every training window
    keep_tail: bool = False  # keep the shorter last window of a segment
    max_bases: int | None = Field(None, ge=1)  # read at most this many bases (quick runs)


class SplitConfig(SplitFractions):
    seed: Seed = 0
    val: float = Field(0.05, ge=0.0, lt=1.0)
    test: float = Field(0.05, ge=0.0, lt=1.0)
    block_size: int = Field(100_000, ge=1)  # genomes: bases per region block assigned wholly to one split


class TokenizerConfig(Config):
    kind: Literal["char", "kmer", "overlapping_kmer", "bpe"] = "char"
    k: int = Field(6, ge=1, le=8)  # kmer, overlapping_kmer
    vocab_size: int = Field(4096, ge=16)  # bpe
    train_bases: int = Field(20_000_000, ge=1)  # bpe: training-split bases the vocabulary is learnt from
    path: str | None = None  # reuse a saved tokenizer (directory, tokenizer.json, or a token store)


class DNAPrepConfig(Config):
    inputs: list[InputSpec] = Field(min_length=1)
    output: str
    cleaning: CleaningConfig = CleaningConfig()
    windows: WindowConfig = WindowConfig()
    split: SplitConfig = SplitConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    shard_tokens: int = Field(DEFAULT_SHARD_TOKENS, ge=1)
    num_workers: int = Field(1, ge=1)  # threads for BPE encoding

    @model_validator(mode="after")
    def _windows_fit_blocks(self) -> DNAPrepConfig:
        if self.windows.length > self.split.block_size:
            raise ValueError(
                f"windows.length ({self.windows.length}) must not exceed split.block_size ({self.split.block_size})"
            )
        return self
