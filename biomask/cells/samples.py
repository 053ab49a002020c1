"""Samples that never measured some genes: the mark an outer join leaves in a concatenated AnnData.

`anndata.concat(..., join="outer")` writes 0 for every gene a sample's own matrix lacked, and a
model reads that 0 as "not expressed": such a sample's cells then sit apart from the others in
`X_biomask` (measured in the README: 99.8 % of its cells' neighbours from itself). Nothing in the
matrix says which zeros are real, but the pattern is plain: genes the other samples express in many
cells have not a single count in any cell of this one. The check reads every block the stage streams
anyway and warns, naming the obs column, the sample and some of the genes; it refuses nothing (a
sorted population or one sex's donors lack a few genes for real, which the thresholds allow for).

    check = MissingGenes(source)            # picks obs columns that look like sample labels
    for start, block in source.blocks(n):
        check.add(start, block)
    check.warn(gene_names)                  # one warning per sample that looks outer-joined
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import scipy.sparse as sp

from biomask.cells.readers import MatrixSource

log = logging.getLogger(__name__)

MAX_COLUMNS = 8  # obs columns tracked (each costs a samples x genes table of counts)
MAX_SAMPLES = 64  # more values than this is no sample label (cell types, clusters, barcodes)
MIN_CELLS = 20  # a sample smaller than this says too little about its zeros
# A gene counts as "expressed elsewhere" when the other samples detect it in this share of their
# cells AND this sample's cells would then show it this many times: seeing none of them is not chance.
OTHER_SHARE = 0.05
EXPECTED_HITS = 20.0
# How many such genes make the warning: more than a few sex-linked or cell-type-specific genes.
MIN_GENES = 20
MIN_SHARE_OF_GENES = 0.05


def _label_columns(obs: pd.DataFrame) -> list[tuple[str, np.ndarray, list[str]]]:
    """(column, per-cell sample code, sample names) for the obs columns that look like sample labels."""
    found = []
    for column in obs.columns:
        values = obs[column]
        if pd.api.types.is_float_dtype(values) or pd.api.types.is_integer_dtype(values):
            continue  # numbers are measurements (totals, QC metrics), not labels
        codes, names = pd.factorize(values.astype(str), sort=True)
        if 2 <= len(names) <= MAX_SAMPLES:
            found.append((str(column), codes.astype(np.int64), [str(n) for n in names]))
        if len(found) == MAX_COLUMNS:
            break
    return found


class MissingGenes:
    """Per obs label column: how many cells of each sample express each gene (streamed, block by block)."""

    def __init__(self, source: MatrixSource, genes: np.ndarray | None = None) -> None:
        """`genes`: a mask over the matrix's columns to look at (e.g. those a checkpoint reads); all by default."""
        self.where = source.where
        self.columns = _label_columns(source.obs)
        self.genes = np.ones(source.n_vars, dtype=bool) if genes is None else np.asarray(genes, dtype=bool)
        self.detected = [
            np.zeros((len(names), source.n_vars), dtype=np.int64) for _, _, names in self.columns
        ]

    def add(self, start: int, block: sp.csr_matrix) -> None:
        if not self.columns:
            return
        expressed = sp.csr_matrix(block, copy=True)
        expressed.data = (expressed.data != 0).astype(np.int64)
        rows = np.arange(block.shape[0])
        for (_, codes, names), detected in zip(self.columns, self.detected, strict=True):
            member = sp.csr_matrix(
                (np.ones(rows.size, dtype=np.int64), (codes[start : start + rows.size], rows)),
                shape=(len(names), rows.size),
            )
            detected += (member @ expressed).toarray()

    def findings(self, gene_names: np.ndarray) -> list[str]:
        """One sentence per sample whose zeros look like genes it never measured."""
        out = []
        for (column, codes, names), detected in zip(self.columns, self.detected, strict=True):
            cells = np.bincount(codes, minlength=len(names))
            everywhere = detected.sum(axis=0)
            sizable = cells >= MIN_CELLS
            for sample, name in enumerate(names):
                others = cells.sum() - cells[sample]
                if cells[sample] < MIN_CELLS or others < MIN_CELLS:
                    continue
                share_elsewhere = (everywhere - detected[sample]) / others
                # a gene a sample never measured is still measured by every other sample; a cell type's
                # missing genes are another type's markers, absent from the rest as well (Leiden clusters
                # of a 400-cell PBMC pair: T cells lack CX3CR1, CD302, ... as B cells do)
                in_every_other = (
                    detected[np.flatnonzero(sizable & (np.arange(len(names)) != sample))] > 0
                ).all(axis=0)
                expressed = (
                    self.genes
                    & in_every_other
                    & (share_elsewhere >= OTHER_SHARE)
                    & (share_elsewhere * cells[sample] >= EXPECTED_HITS)
                )
                missing = expressed & (detected[sample] == 0)
                n = int(missing.sum())
                if n >= max(MIN_GENES, MIN_SHARE_OF_GENES * int(expressed.sum())):
                    examples = ", ".join(str(g) for g in np.asarray(gene_names)[np.flatnonzero(missing)[:5]])
                    out.append(
                        f"obs column {column!r} = {name!r} ({cells[sample]:,} cells): not one count in {n:,} of "
                        f"the {int(expressed.sum()):,} genes the other cells express (e.g. {examples})"
                    )
        return out

    def warn(self, gene_names: np.ndarray) -> list[str]:
        found = self.findings(gene_names)
        for finding in found:
            log.warning(
                "%s: %s. Did that sample never measure them? An outer join (anndata.concat(join='outer')) "
                "writes 0 for a sample's missing genes, and the model reads them as not expressed: its cells "
                "then sit apart from the others in X_biomask. Concatenate on the genes every sample measures "
                "(join='inner'), or subset to them; if the zeros are real, ignore this",
                self.where,
                finding,
            )
        return found
