"""Per-gene medians of the non-zero normalised expression over a corpus, in bounded memory.

Rank encoding (Geneformer) divides each gene's normalised expression by its median over the cells
that express it. `MedianAccumulator` keeps (gene, value) pairs and computes exact medians (numpy's
definition: the mean of the two middle values for an even count).

Memory is bounded by `tokenizer.median_max_values`: when the corpus stores more values than that
(known before reading -- the stored entries of its matrices), the medians are computed exactly over
a seeded random subset of cells expected to hold that many values. Whether a cell is in the subset
depends only on the seed and its index in the corpus, so the result does not depend on block size.
With the default (10 M values, ~12k PBMC-like cells) a gene detected in 1 % of cells still has ~120
values behind its median; the manifest records the fraction used.

A subset misses rare genes. `GeneCounts` therefore also keeps each gene's first values (enough that a
gene the subset misses almost surely has no more than that): genes with that few values get their
exact median from all of them, with no further pass over the corpus.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from biomask.cells.kernels import njit
from biomask.cells.tokenize import mix_hash

FIRST_VALUES_BUDGET = 8 << 20  # float32 values kept for rare genes: 32 MiB whatever the corpus size


class MedianAccumulator:
    def __init__(self, n_genes: int, fraction: float = 1.0, seed: int = 0) -> None:
        self.n_genes = n_genes
        self.fraction = min(max(fraction, 0.0), 1.0)
        self.seed = seed
        self._threshold = np.uint64(min(int(self.fraction * 2**32), 2**32))
        self._genes: list[np.ndarray] = []
        self._values: list[np.ndarray] = []
        self.cells = 0  # cells whose values were kept

    def add(self, block: sp.csr_matrix, scale: np.ndarray, cells: np.ndarray) -> None:
        """Record a block of counts (columns = gene indices) of the corpus cells `cells` (global indices);
        a value is count * scale of its cell -- the normalised expression, float32 as the tokens get it."""
        if self.fraction < 1.0:
            chosen = mix_hash(self.seed, cells, np.zeros_like(cells)).astype(np.uint64) < self._threshold
            if not chosen.any():
                return
            block, scale = block[chosen], scale[chosen]
        self.cells += block.shape[0]
        self._genes.append(block.indices.astype(np.int32))
        self._values.append(
            block.data.astype(np.float32) * np.repeat(scale.astype(np.float32), np.diff(block.indptr))
        )

    def add_values(self, genes: np.ndarray, values: np.ndarray) -> None:
        """Record values (already normalised, float32) of the given genes, every one of them."""
        self._genes.append(genes.astype(np.int32))
        self._values.append(values.astype(np.float32))

    def medians(self) -> np.ndarray:
        """float32 median per gene (NaN for a gene without any non-zero value)."""
        out = np.full(self.n_genes, np.nan, dtype=np.float32)
        if not self._genes:
            return out
        packed = np.concatenate(self._genes).astype(np.uint64) << np.uint64(32)
        packed |= np.concatenate(self._values).view(np.uint32)
        self._genes, self._values = [], []
        # One sort of (gene, value) packed into 64 bits: positive float32 bit patterns sort like the floats.
        packed.sort()
        genes = (packed >> np.uint64(32)).astype(np.uint32)
        starts = np.concatenate([[0], np.flatnonzero(genes[1:] != genes[:-1]) + 1])
        count = np.diff(np.append(starts, genes.size))
        low = (packed[starts + (count - 1) // 2] & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.float32)
        high = (packed[starts + count // 2] & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.float32)
        out[genes[starts]] = ((low.astype(np.float64) + high) / 2).astype(np.float32)
        return out

    def describe(self, exact_up_to: int = 0) -> dict[str, Any]:
        """How the medians were computed; `exact_up_to`: genes with at most this many values are exact."""
        if self.fraction >= 1.0:
            return {"method": "exact", "cells": self.cells}
        return {
            "method": "exact over a seeded subset of cells",
            "exact_for_genes_with_at_most": exact_up_to,
            "fraction": round(self.fraction, 6),
            "cells": self.cells,
            "seed": self.seed,
            "reason": "the corpus stores more values than tokenizer.median_max_values",
        }


class GeneCounts:
    """Cells expressing each gene, and the first `per_gene` normalised values of each (one compiled pass
    per block). Genes with at most `per_gene` values have exact medians from these alone."""

    def __init__(self, n_genes: int, per_gene: int) -> None:
        self.n_cells = np.zeros(n_genes, dtype=np.int64)
        self.first_values = np.empty((n_genes, per_gene), dtype=np.float32)

    @classmethod
    def for_subset(cls, n_genes: int, fraction: float) -> GeneCounts:
        """Keep enough values that a gene the subset misses entirely has more only with odds ~e^-12."""
        wanted = 0 if fraction >= 1.0 else int(np.ceil(12 / max(fraction, 1e-9)))
        return cls(n_genes, min(wanted, FIRST_VALUES_BUDGET // max(n_genes, 1)))

    @property
    def per_gene(self) -> int:
        return self.first_values.shape[1]

    def add(self, block: sp.csr_matrix, scale: np.ndarray) -> None:
        """A block of counts (columns = genes, canonical CSR: one entry per cell and gene) of kept cells."""
        _count_and_keep(
            block.indptr,
            block.indices,
            block.data.astype(np.float32, copy=False),
            scale.astype(np.float32),
            self.n_cells,
            self.first_values,
        )

    def exact_medians(self, genes: np.ndarray) -> np.ndarray:
        """Medians of the given genes from every one of their values (NaN where more were seen than kept)."""
        out = np.full(genes.size, np.nan, dtype=np.float32)
        known = np.flatnonzero((self.n_cells[genes] <= self.per_gene) & (self.n_cells[genes] > 0))
        if known.size:
            counts = self.n_cells[genes[known]]
            accumulator = MedianAccumulator(known.size)
            accumulator.add_values(
                np.repeat(np.arange(known.size), counts),
                self.first_values[genes[known]][np.arange(self.per_gene) < counts[:, None]],
            )
            out[known] = accumulator.medians()
        return out


@njit
def _count_and_keep(indptr, indices, data, scale, n_cells, first_values):
    per_gene = first_values.shape[1]
    for row in range(indptr.size - 1):
        for j in range(indptr[row], indptr[row + 1]):
            gene = indices[j]
            seen = n_cells[gene]
            if seen < per_gene:
                first_values[gene, seen] = data[j] * scale[row]
            n_cells[gene] = seen + 1
