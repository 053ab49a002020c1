"""The schema of `biomask embed` configs (see configs/embed/*.yaml).

    biomask embed --checkpoint runs/pretrain/cells-tiny/model --input pbmc.h5ad --output pbmc.emb.h5ad
    biomask embed --config configs/embed/pbmc68k_reduced.yaml [key=value ...] [--overwrite]

The flags are shortcuts for `checkpoint=`, `input=`, `output=`, `pooling=`, `layer=`, `batch_size=`
and `umap.color=`.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field, model_validator

from biomask.cells.config import CountsConfig
from biomask.config import Config, Seed


class GenesSpec(Config):
    """How the input's genes are matched to the checkpoint's vocabulary."""

    # A var column with the identifiers; null: the var index; auto: the vocabulary's own identifier
    # column when the file has it (e.g. gene_ids for Ensembl IDs), else the var index; where that
    # covers less than min_coverage of the vocabulary, the var column that covers the most.
    column: str | None = "auto"
    strip_version: bool = False  # ENSG00000141510.17 -> ENSG00000141510
    duplicates: Literal["sum", "first", "error"] = "sum"
    # Below this share of the vocabulary's genes found in the input: a warning (zero overlap is an error).
    min_coverage: float = Field(0.5, ge=0, le=1)


class DNASpec(Config):
    """DNA inputs: FASTA records (whole, or windows), a CSV/TSV table, or a DNA token store."""

    window: int | None = Field(None, ge=1)  # FASTA: cut records into windows of this many bases
    stride: int | None = Field(None, ge=1)  # with window; default: the window (no overlap)
    sequence_column: str = "sequence"  # tables
    label_column: str | None = "label"  # tables: copied into obs when present
    id_column: str | None = None  # tables: obs names (default: file:line)
    # a sequence longer than the model's input (the CNN: 4 receptive fields; a transformer: its
    # max_len): window = the whole sequence in windows of the model's length, their vectors pooled
    # (as `biomask evaluate` does by default); centre = the middle; first = the start; refuse = exit 2
    long_records: Literal["window", "centre", "first", "refuse"] = "window"
    # forward: the sequence as given; both: the mean of its vector and its reverse complement's (one
    # vector whichever strand a FASTA or table holds: for motifs that bind either strand)
    strands: Literal["forward", "both"] = "forward"

    @model_validator(mode="after")
    def _stride_needs_window(self) -> DNASpec:
        if self.stride is not None and self.window is None:
            raise ValueError(
                "dna.stride applies to dna.window's windows: set dna.window too (or drop stride)"
            )
        return self


class UmapSpec(Config):
    color: str | None = None  # obs column the UMAP PNG is coloured by; null: no plot
    max_cells: int = Field(50_000, ge=10)  # a seeded sample of this many cells is plotted
    seed: Seed = 0


class EmbedConfig(Config):
    checkpoint: str  # a portable checkpoint: the `model/` directory of a pretrain run
    input: str  # h5ad (cells), or FASTA / CSV / TSV / a DNA token store, or a registered dataset name
    # A .h5ad file, or a directory (the pipeline's way): <output>/embeddings.h5ad, umap.png,
    # config.yaml and run.json.
    output: str
    format: Literal["auto", "h5ad", "fasta", "table", "store"] = "auto"
    matrix: str = "X"  # h5ad: X, raw or layers/NAME (the counts, as for `biomask prep cells`)
    counts: CountsConfig = CountsConfig()
    genes: GenesSpec = GenesSpec()
    dna: DNASpec = DNASpec()
    # mean, cls ([CLS] vector; not the cnn kind), max (per-feature maximum over the tokens: DNA motif
    # tasks; token models only — a profile model has one vector per cell, so mean and cls name it),
    # mean_layers (every block's mean, concatenated: n_layers × d_model; with layer -1 only)
    # (no concat, which evaluate offers: its width follows each record's length)
    pooling: Literal["cls", "mean", "max", "mean_layers"] = "mean"
    # Profile cell models (kinds mlp, panel_transformer): each gene standardised by the mean and sd of
    # the model's pretraining cells (checkpoint), or of the cells embedded here (data; one more pass
    # over the file, at least 20 cells): for cells of another experiment than the pretraining corpus
    # (docs/cell-models.md, "Standardising by the cells embedded").
    standardise: Literal["checkpoint", "data"] = "checkpoint"
    layer: int = -1  # [embeddings, block 1, ..., block n] indexed like a Python list
    # obsm key; no "/" (an .h5ad would hold it as nested groups that anndata cannot read back)
    key: str = Field("X_biomask", min_length=1, pattern=r"^[^/]+$")
    batch_size: int = Field(64, ge=1)  # the vectors agree to float rounding across sizes (~1e-6)
    chunk_size: int = Field(8192, ge=1)  # cells read, tokenized and embedded at a time (memory only)
    umap: UmapSpec = UmapSpec()
    device: str = "auto"  # auto: a GPU when there is one
    overwrite_input: bool = False  # output == input is refused unless this is set


# Keys that change no embedding: they may differ between runs that reuse an output.
EMBED_POOLINGS: tuple[str, ...] = get_args(EmbedConfig.model_fields["pooling"].annotation)
NON_SEMANTIC = ("output", "batch_size", "chunk_size", "device", "overwrite_input")


def non_semantic(cfg: EmbedConfig, modality: str) -> tuple[str, ...]:
    """NON_SEMANTIC, and the keys added on 2026-12-05 where they change nothing — so that an output
    written before them is still reused: dna.strands at forward (what was done), dna.long_records
    for cells (it applies to DNA) or at first (what was done)."""
    keys = list(NON_SEMANTIC)
    if cfg.dna.strands == "forward":
        keys.append("dna.strands")
    if modality != "dna" or cfg.dna.long_records == "first":
        keys.append("dna.long_records")
    return tuple(keys)
