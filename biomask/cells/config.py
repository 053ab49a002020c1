"""The schema of `biomask prep cells` configs (see configs/cells/*.yaml for annotated examples)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from biomask.cells.tokenize import SCHEMES
from biomask.config import Config, Seed, SplitFractions
from biomask.store import DEFAULT_SHARD_TOKENS

# The registered cell schemes' names (one class each in biomask.cells.tokenize).
SchemeName = Literal[tuple(SCHEMES)]  # type: ignore[valid-type]

# `matrix:` values: the main matrix, the frozen raw matrix, or a named layer.
_MATRIX = re.compile(r"^(X|raw|layers/[^/]+)$")


class InputSpec(Config):
    """One expression matrix: a registered dataset (`dataset`) or a file or 10x directory (`path`)."""

    dataset: str | None = None
    # a file or 10x folder, or a pattern naming many (samples/*.h5ad, runs/*/filtered_feature_bc_matrix):
    # each match is an input
    path: str | None = None
    # h5ad; 10x_h5 (Cell Ranger .h5); 10x_mtx (directory with matrix.mtx[.gz], features/genes, barcodes);
    # loom; auto: from the registry or the file name.
    format: Literal["auto", "h5ad", "10x_h5", "10x_mtx", "loom"] = "auto"
    # Which matrix holds the expression: X, raw (h5ad `.raw`), or layers/NAME (h5ad and loom layers).
    matrix: str = "X"
    # protein-gates: label each cell by gating its surface proteins (CITE-seq antibody counts: an
    # h5ad's obsm["protein_expression"], or a 10x input's "Antibody Capture" features) as flow
    # cytometry gates PBMCs, into the obs column labels.column (biomask.cells.protein_gates); cells no
    # gate takes have no label (labels.missing: drop).
    task: Literal["protein-gates"] | None = None

    @field_validator("matrix")
    @classmethod
    def _matrix(cls, value: str) -> str:
        if not _MATRIX.match(value):
            raise ValueError("must be X, raw, or layers/NAME")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> InputSpec:
        if (self.dataset is None) == (self.path is None):
            raise ValueError(
                "give exactly one of `dataset` (a registry name) or `path` (a file or directory)"
            )
        return self


class CountsConfig(Config):
    """What the matrix must hold. Tokenization starts from UMI counts; anything else is refused unless
    `mode: from_log1p` rebuilds counts from log1p(counts / total * scale) and a total-counts column.

    Many public h5ads carry no counts at all. For them (and for the profile autoencoder, which reads
    normalised values anyway): `mode: log1p` takes log1p-normalised values as they are (normalised to
    `scale` per cell), `mode: normalised` takes linear-scale normalised values (TPM, FPKM, CP10k) and
    applies log1p. Neither rebuilds counts, so nothing that needs counts (a count likelihood) can use them."""

    mode: Literal["require", "from_log1p", "log1p", "normalised"] = "require"
    total_counts_column: str | None = None  # obs column with each cell's total counts (from_log1p: required)
    # from_log1p, log1p, normalised: the per-cell target sum the values were normalised to (with
    # normalise.target_sum equal to it, log1p and normalised values pass through unchanged)
    scale: float = Field(10_000.0, gt=0)
    # require: a float within this of an integer is an integer (some writers store 0.99999999).
    integer_tolerance: float = Field(0.01, ge=0, lt=0.5)
    # from_log1p: |count - round(count)| <= reconstruct_rtol * max(1, round(count)) for every value
    # (stored log values are often rounded to ~3 decimals, which costs ~5e-4 relative).
    reconstruct_rtol: float = Field(0.01, ge=0, lt=0.5)
    detect_cells: int = Field(2000, ge=1)  # cells read to tell what the matrix holds

    @model_validator(mode="after")
    def _total_column(self) -> CountsConfig:
        if self.mode == "from_log1p" and not self.total_counts_column:
            raise ValueError("counts.mode=from_log1p needs counts.total_counts_column (an obs column)")
        return self


class GenesConfig(Config):
    # var column holding the gene identifiers (e.g. gene_ids for Ensembl IDs); null: the var index,
    # or, against a frozen tokenizer.path, the var column that covers its genes best where the index
    # covers less than tokenizer.min_coverage of them (said in the log)
    column: str | None = None
    # ENSG00000141510.17 -> ENSG00000141510 (match across annotations; a frozen vocabulary's versioned
    # IDs match on the unversioned part too)
    strip_version: bool = False
    # Several columns with the same gene: sum their counts (one token), keep the first, or refuse.
    duplicates: Literal["sum", "first", "error"] = "sum"


class QCConfig(Config):
    min_genes: int = Field(200, ge=0)  # cells expressing fewer genes are dropped
    max_genes: int | None = Field(None, ge=1)
    min_counts: int = Field(0, ge=0)
    max_counts: int | None = Field(None, ge=1)
    max_mito_fraction: float | None = Field(
        None, gt=0, le=1
    )  # of a cell's counts in genes named mito_prefix*
    mito_prefix: str = "MT-"
    min_cells: int = Field(3, ge=1)  # building a vocabulary: genes detected in fewer cells are left out
    zero_count_cells: Literal["error", "drop"] = "error"  # cells whose counts are all zero

    @model_validator(mode="after")
    def _ranges(self) -> QCConfig:
        # found here, not after reading the data as "no cell is left to write"
        for low, high in (("min_genes", "max_genes"), ("min_counts", "max_counts")):
            if getattr(self, high) is not None and getattr(self, low) > getattr(self, high):
                raise ValueError(
                    f"qc.{low} ({getattr(self, low)}) is above qc.{high} ({getattr(self, high)}): no cell could pass"
                )
        return self


class HVGConfig(Config):
    """Optional highly-variable-gene selection (scanpy) for the vocabulary built from the corpus."""

    n_top_genes: int | None = Field(None, ge=1)  # null: no HVG selection
    flavor: Literal["seurat", "cell_ranger"] = "seurat"  # both work on log-normalised values
    max_cells: int = Field(50_000, ge=100)  # a seeded sample of this many cells is loaded for scanpy


class NormaliseConfig(Config):
    target_sum: float = Field(10_000.0, gt=0)  # library-size normalisation, then log1p


class TokenizerConfig(Config):
    # binned: expressed genes + per-cell value bins (scGPT); rank: genes ranked by their expression over
    # the corpus median (Geneformer); panel: every vocabulary gene with its continuous value.
    scheme: SchemeName = "binned"
    path: str | None = (
        None  # reuse a frozen gene vocabulary (its directory, tokenizer.json, or a token store)
    )
    n_bins: int = Field(51, ge=2, le=255)  # binned: expressed genes get bins 1..n_bins
    max_length: int = Field(1200, ge=1)  # binned and rank: at most this many genes per cell
    truncate: Literal["top", "sample"] = "top"  # binned beyond max_length: top-expressed, or a seeded sample
    seed: Seed = 0  # binned with truncate=sample, and the cell subset for medians
    min_coverage: float = Field(0.5, ge=0, le=1)  # warn when the data measures less of the vocabulary's genes
    # medians of a corpus storing more values than this come from a seeded subset of its cells
    median_max_values: int = Field(10_000_000, ge=1)


class LabelsConfig(Config):
    column: str | None = None  # obs column with the label (cell type) of each cell
    missing: Literal["error", "drop"] = "error"  # cells without a label
    # labels held by fewer cells (over all inputs, before QC) are left out like missing ones: a type of
    # 5 cells cannot sit in every evaluation split's training and test part
    min_cells: int = Field(0, ge=0)


class SplitConfig(SplitFractions):
    seed: Seed = 0
    val: float = Field(0.05, ge=0.0, lt=1.0)
    test: float = Field(0.05, ge=0.0, lt=1.0)
    column: str | None = None  # obs column with train/val/test; without it splits are drawn by seed
    # Draw splits per value of this obs column (default: the label column, when there is one).
    stratify_by: str | None = None


# Keys that change no result: a store written with other values of these is reused.
NON_SEMANTIC = ("output", "block_size")


class CellsPrepConfig(Config):
    inputs: list[InputSpec] = Field(min_length=1)
    output: str
    counts: CountsConfig = CountsConfig()
    genes: GenesConfig = GenesConfig()
    qc: QCConfig = QCConfig()
    hvg: HVGConfig = HVGConfig()
    normalise: NormaliseConfig = NormaliseConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    labels: LabelsConfig = LabelsConfig()
    obs_columns: list[str] = []  # obs columns copied into the per-cell metadata (with id and source)
    # An obs column naming each cell's sample or batch: stored per cell (record field `batch`, names
    # in the manifest) for a model that conditions its decoder on it (pretrain model.batch_covariate).
    batch_column: str | None = None
    split: SplitConfig = SplitConfig()
    block_size: int = Field(8192, ge=1, le=65_536)  # cells read and tokenized at a time (memory, not results)
    shard_tokens: int = Field(DEFAULT_SHARD_TOKENS, ge=1)

    @model_validator(mode="after")
    def _task_labels(self) -> CellsPrepConfig:
        if any(spec.task for spec in self.inputs) and self.labels.column is None:
            raise ValueError(
                "an input's task (protein-gates) labels its cells: set labels.column to the obs column "
                "the labels go to (e.g. labels.column=cell_type)"
            )
        return self
