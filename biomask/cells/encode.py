"""Tokenizing new expression data exactly as a checkpoint's pretraining store was tokenized.

`biomask embed` reads an h5ad the pretraining corpus never saw. Its cells must reach the model as the
corpus's did: the same frozen gene vocabulary, the same library-size normalisation (`target_sum`),
the same scheme with the same bins, medians and truncation. Those settings travel with the portable
checkpoint (`config.json` → `prep`, written by `biomask pretrain`), and the prep stage's own pieces do the work:
`counts` (what the matrix holds, conversion to counts), `genes` (identifiers, duplicates, the token
map), `tokenize.make_scheme` and the scheme's vectorised `encode`.

What differs from `biomask prep cells`, on purpose: no QC and no splits (every cell of the file gets
an embedding, in file order), and a cell that expresses no vocabulary gene becomes an empty record
(the model sees [CLS] only) and is counted, instead of dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from biomask.cells.config import CountsConfig, NormaliseConfig, TokenizerConfig
from biomask.cells.counts import CountConverter, ValueSummary, check_policy, detect
from biomask.cells.genes import (
    ColumnMap,
    GeneSpace,
    GeneVocabulary,
    case_only_hint,
    check_orientation,
    identifier_hint,
    made_unique_note,
    match_genes,
    no_overlap_reason,
    percent,
    remap_columns,
)
from biomask.cells.qc import row_sums
from biomask.cells.readers import MatrixSource
from biomask.cells.tokenize import Scheme, make_scheme
from biomask.errors import InputError

log = logging.getLogger(__name__)

# Keys of the prep config's tokenizer section that decide what a record holds.
SCHEME_KEYS = ("scheme", "n_bins", "max_length", "truncate", "seed")


@dataclass
class CellPrep:
    """How a checkpoint's corpus was tokenized: vocabulary, scheme and normalisation."""

    vocab: GeneVocabulary
    tokenizer: TokenizerConfig
    normalise: NormaliseConfig
    source: str  # where the settings were read from (for provenance)

    @property
    def scheme(self) -> Scheme:
        return make_scheme(self.tokenizer, self.vocab)

    def describe(self) -> dict[str, Any]:
        return {
            **{k: getattr(self.tokenizer, k) for k in SCHEME_KEYS},
            # what a record holds at most (a panel: every panel gene, whatever tokenizer.max_length says)
            "max_length": self.scheme.max_length,
            "target_sum": self.normalise.target_sum,
            "vocabulary_genes": len(self.vocab.genes),
            "gene_id_column": self.vocab.gene_id_column,
            "settings_from": self.source,
        }


def checkpoint_prep(directory: str | Path, info: dict[str, Any]) -> CellPrep:
    """The tokenization settings of a cells checkpoint (see the module docstring for where they live)."""
    directory = Path(directory)
    prep = info.get("prep")
    source = f"{directory / 'config.json'} (prep)"
    if not prep:
        raise InputError(
            f"{directory / 'config.json'} does not record how its data was tokenized (no `prep` section); "
            "it was not written by `biomask pretrain`: export the checkpoint with it"
        )
    try:
        tokenizer = TokenizerConfig.model_validate(
            {k: v for k, v in (prep.get("tokenizer") or {}).items() if k in SCHEME_KEYS}
        )
        normalise = NormaliseConfig.model_validate(prep.get("normalise") or {})
    except ValueError as exc:
        raise InputError(f"{source}: invalid tokenization settings ({exc})") from None
    if info.get("scheme") and tokenizer.scheme != info["scheme"]:
        raise InputError(
            f"{source}: scheme {tokenizer.scheme!r} differs from the checkpoint's {info['scheme']!r}"
        )
    vocab = GeneVocabulary.load(directory / "tokenizer")
    return CellPrep(vocab, tokenizer, normalise, source)


@dataclass
class OpenedMatrix:
    """One matrix ready for encoding: its converter, its gene → token map, and what was found."""

    source: MatrixSource
    converter: CountConverter
    token_map: ColumnMap
    summary: ValueSummary
    coverage: dict[str, Any]
    gene_column: str | None


class CellEncoder:
    """Expression blocks → records, as the pretraining store's prep stage would have written them."""

    def __init__(
        self,
        prep: CellPrep,
        *,
        counts: CountsConfig,
        gene_column: str | bool | None = True,
        strip_version: bool = False,
        duplicates: str = "sum",
        min_coverage: float = 0.5,
    ) -> None:
        """`gene_column`: a var column with the identifiers, None for the var index, True (auto) for
        the vocabulary's own identifier column when the file has it, else the var index."""
        self.prep = prep
        self.scheme = prep.scheme
        self.counts = counts
        self.gene_column = gene_column
        self.strip_version = strip_version
        self.duplicates = duplicates
        self.min_coverage = min_coverage

    def open(self, source: MatrixSource, block_size: int = 8192) -> OpenedMatrix:
        """Check the matrix against the vocabulary and the counts policy, before any long pass."""
        column = self.gene_column
        if column is True:
            wanted = self.prep.vocab.gene_id_column
            column = wanted if wanted is not None and wanted in source.var.columns else None
        check_orientation(source)
        vocab = self.prep.vocab
        match = match_genes(
            source,
            vocab,
            column,
            self.strip_version,
            search=self.gene_column is True,
            min_coverage=self.min_coverage,
        )
        column, names, found = match.column, match.names, match.found
        space = GeneSpace()
        targets, _ = space.add(source, names, self.duplicates)
        hint = (
            identifier_hint(source, vocab, match, self.strip_version)
            if found["fraction_of_vocab_present"] < self.min_coverage
            else None
        )
        if found["dataset_genes_in_vocab"] == 0:
            ours = ", ".join(str(n) for n in pd.unique(names[names != ""])[:3])
            what = no_overlap_reason(source, vocab, match, hint, instead="train a model on these cells")
            raise InputError(
                f"{source.where}: none of its {found['dataset_genes']:,} genes (e.g. {ours}) is in the checkpoint's "
                f"gene vocabulary (e.g. {', '.join(vocab.genes[:3])}; identifiers from "
                f"{vocab.gene_id_column or 'the var index'}); {what}"
            )
        copies = made_unique_note(names, vocab.genes)
        if copies:
            log.warning("%s: %s", source.where, copies)
        # What matters is how much of the vocabulary the data measures (a vocabulary gene missing from
        # the data never reaches the model); the share of the dataset's own genes is information.
        share = found["fraction_of_vocab_present"]
        dataset_side = (
            f"{percent(found['fraction_of_dataset_genes'])} of its {found['dataset_genes']:,} genes are in the "
            "vocabulary; the others are left out"
        )
        if share < self.min_coverage:
            species = case_only_hint(names, vocab.genes, found["vocab_genes_present"])
            log.warning(
                "%s: only %d of the checkpoint's %d vocabulary genes (%s) are in the data (min_coverage "
                "%.0f%%): the model sees the missing ones as %s (%s)%s",
                source.where,
                found["vocab_genes_present"],
                found["vocab_genes"],
                percent(share),
                100 * self.min_coverage,
                "unmeasured" if self.scheme.complete_profile else "not expressed",
                dataset_side,
                f". {species[0].upper()}{species[1:]}"
                if species
                else f". To match more, {hint}"
                if hint
                else "",
            )
        else:
            log.info(
                "%s: %d of the checkpoint's %d vocabulary genes (%s) are in the data (%s)",
                source.where,
                found["vocab_genes_present"],
                found["vocab_genes"],
                percent(share),
                dataset_side,
            )
        summary = detect(source, self.counts, block_size)
        check_policy(source, summary, self.counts)
        to_token = vocab.token_map(space.names).targets
        token_targets = np.where(targets >= 0, to_token[np.maximum(targets, 0)], -1)
        return OpenedMatrix(
            source,
            CountConverter(source, self.counts),
            ColumnMap(token_targets, vocab.vocab_size),
            summary,
            found,
            column,
        )

    def encode(
        self, opened: OpenedMatrix, start: int, raw: sp.csr_matrix
    ) -> tuple[list[dict], dict[str, float]]:
        """The records of one block of cells (file order), and counts for the coverage report."""
        counts = opened.converter(start, raw)
        observed = row_sums(counts)
        totals = opened.converter.totals
        lib = totals[start : start + raw.shape[0]] if totals is not None else observed
        tokens = remap_columns(counts, opened.token_map)
        # A cell with no counts at all has no library size; its record is empty either way.
        scale = (self.prep.normalise.target_sum / np.where(lib > 0, lib, 1.0)).astype(np.float32)
        cells = np.arange(start, start + raw.shape[0])
        encoded = self.scheme.for_input(opened.token_map.targets).encode(tokens, scale, cells)
        fields = encoded.fields()
        bounds = np.concatenate([[0], np.cumsum(encoded.lengths)])
        records = [
            {name: array[bounds[i] : bounds[i + 1]] for name, array in fields.items()}
            for i in range(encoded.lengths.size)
        ]
        stats = {
            "counts_total": float(counts.data.sum(dtype=np.float64)),
            "counts_in_vocab": float(tokens.data.sum(dtype=np.float64)),
            # no count in any vocabulary gene (a panel record still lists every gene, all zeros)
            "cells_without_vocabulary_genes": int((row_sums(tokens) <= 0).sum()),
        }
        return records, stats

    def blocks(
        self, opened: OpenedMatrix, block_size: int
    ) -> Iterator[tuple[int, list[dict], dict[str, float]]]:
        for start, raw in opened.source.blocks(block_size):
            records, stats = self.encode(opened, start, raw)
            yield start, records, stats
