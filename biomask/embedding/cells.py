"""Embedding cells: a matrix of counts in, one vector per cell out, in file order.

The one cells path, shared by `biomask embed` (an .h5ad file, written chunk by chunk into a copy of
it) and `biomask.embed` (an AnnData in memory or backed): both open a `CellsEmbedding` and give it
somewhere to put each chunk's vectors.

    job = CellsEmbedding(model, source, counts=..., gene_column=True, ...)   # every check, nothing read yet
    record = job.run(write, pooling="mean", layer=-1, batch_size=64)       # write(start, vectors) per chunk

The cells are tokenized exactly as the checkpoint's pretraining corpus was (biomask.cells.encode).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from biomask.cells.config import CountsConfig
from biomask.cells.readers import MatrixSource
from biomask.cells.samples import MissingGenes
from biomask.embedding.inference import embed_records, inference_max_length
from biomask.errors import InputError

log = logging.getLogger(__name__)

# What the encoder counts per chunk, summed over the file for the gene-coverage record.
_TOTALS = ("counts_total", "counts_in_vocab", "cells_without_vocabulary_genes")


class CellsEmbedding:
    """A matrix checked against a cells checkpoint (vocabulary coverage, counts policy), ready to stream."""

    def __init__(
        self,
        model: Any,
        source: MatrixSource,
        *,
        counts: CountsConfig,
        gene_column: str | bool | None = True,
        strip_version: bool = False,
        duplicates: str = "sum",
        min_coverage: float = 0.5,
        chunk_size: int = 8192,
        standardise: str = "checkpoint",
    ) -> None:
        from biomask.cells.encode import CellEncoder, checkpoint_prep
        from biomask.models.profile import check_standardise

        check_standardise(model, standardise, f"checkpoint {model.checkpoint_dir}")
        self.model, self.source, self.chunk_size = model, source, chunk_size
        self.standardise = standardise
        self.counts = counts
        self.prep = checkpoint_prep(model.checkpoint_dir, model.checkpoint_info)
        self.encoder = CellEncoder(
            self.prep,
            counts=counts,
            gene_column=gene_column,
            strip_version=strip_version,
            duplicates=duplicates,
            min_coverage=min_coverage,
        )
        # the counts check reads a sample of blocks: bounded like the chunks that follow
        self.opened = self.encoder.open(source, min(chunk_size, 8192))
        self.max_length = inference_max_length(model)

    def run(
        self,
        write: Callable[[int, np.ndarray], None],
        *,
        pooling: str,
        layer: int,
        batch_size: int,
        on_chunk: Callable[[int], None] | None = None,
    ) -> dict[str, Any]:
        """Embed every cell, calling `write(start, vectors)` per chunk (and `on_chunk(n_cells)` for
        progress); returns what the provenance records about the cells (coverage, tokenization)."""
        model = self.model
        if self.standardise == "data":  # a first pass: each gene's mean and sd over these cells
            from biomask.models.profile import standardised_on

            model = standardised_on(model, self._records(), self.source.where)
        totals = dict.fromkeys(_TOTALS, 0.0)
        # only the genes the model reads: a sample lacking others does not move its vectors
        unmeasured = MissingGenes(self.source, genes=self.opened.token_map.targets >= 0)
        for start, raw in self.source.blocks(self.chunk_size):
            unmeasured.add(start, raw)
            records, stats = self.encoder.encode(self.opened, start, raw)
            write(
                start,
                embed_records(
                    model,
                    records,
                    pooling=pooling,
                    layer=layer,
                    batch_size=batch_size,
                    max_length=self.max_length,
                ),
            )
            for name, value in stats.items():
                totals[name] += value
            if on_chunk is not None:
                on_chunk(len(records))
        unmeasured.warn(np.asarray(self.source.var.index))
        coverage = dict(self.opened.coverage)
        coverage["fraction_of_counts"] = (
            totals["counts_in_vocab"] / totals["counts_total"] if totals["counts_total"] else 0.0
        )
        empty = int(totals["cells_without_vocabulary_genes"])
        if empty and empty == self.source.n_obs:
            # every vector would be the same one: refused as fit_cells refuses it, not written with a warning
            present = coverage.get("vocab_genes_present", 0)
            raise InputError(
                f"{self.source.where}: none of its {empty:,} cells expresses any of the {present:,} genes of the "
                f"checkpoint's vocabulary that it measures: every cell would get one and the same vector. Check "
                "that the data and the model are of one species and that the genes are matched on the right "
                "identifiers (genes.column), see the warnings above; or train a model on these cells "
                "(biomask.fit_cells, biomask fit-cells)"
            )
        if empty:
            log.warning(
                "%s: %d of its %d cells express no gene of the model's vocabulary: they all get one and the same "
                "vector (of an empty profile), and will cluster together; leave them out before clustering "
                "(sc.pp.filter_cells(adata, min_counts=1), or on the genes the model reads)",
                self.source.where,
                empty,
                self.source.n_obs,
            )
        return {
            "counts_found": self.opened.summary.describe(),
            # what to pass again for more cells of this kind (the checkpoint does not keep it)
            "counts_policy": json.dumps(self.counts.model_dump(mode="json"), sort_keys=True),
            "gene_id_column": "var index"
            if self.opened.gene_column is None
            else str(self.opened.gene_column),
            "gene_coverage": coverage,
            "cells": int(self.source.n_obs),
            "cells_without_vocabulary_genes": empty,
            "tokenization": self.prep.describe(),
            "standardise": self.standardise,
        }

    def _records(self):
        """Every cell's record, streamed chunk by chunk (the pass that standardise=data adds)."""
        for start, raw in self.source.blocks(self.chunk_size):
            yield from self.encoder.encode(self.opened, start, raw)[0]
