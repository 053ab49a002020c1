"""Quality control of cells (per block) and genes (over the corpus), and optional HVG selection.

Cell filters look at one cell at a time, so they are decided while streaming: genes detected,
total counts, the mitochondrial share, and cells with no counts at all (an error by default: a
matrix with empty cells is usually an unfiltered droplet matrix or the wrong matrix). Gene filters
(`min_cells`) and HVG selection need the whole corpus and shape the vocabulary.
"""

from __future__ import annotations

import collections

import numpy as np
import scipy.sparse as sp

from biomask.cells.config import HVGConfig, QCConfig
from biomask.cells.readers import MatrixSource
from biomask.errors import InputError


def row_sums(block: sp.csr_matrix) -> np.ndarray:
    """Per-cell sums (float64). Summed in the stored type -- several times faster than a float64
    pass, and exact for integer counts while a cell's total stays below 2**24 (else redone in float64)."""
    sums = np.zeros(block.shape[0], dtype=np.float64)
    filled = np.diff(block.indptr) > 0
    if filled.any():
        starts = block.indptr[:-1][filled]
        part = np.add.reduceat(block.data, starts)
        if part.dtype != np.float64 and part.max() >= 2**24:
            part = np.add.reduceat(block.data, starts, dtype=np.float64)
        sums[filled] = part
    return sums


class CellQC:
    """Decides which cells of a source are kept; counts the reasons cells are dropped."""

    def __init__(self, cfg: QCConfig, source: MatrixSource, names: np.ndarray) -> None:
        self.cfg = cfg
        self.source = source
        self.mito = np.array([n.upper().startswith(cfg.mito_prefix.upper()) for n in names], dtype=bool)
        self.dropped: collections.Counter = collections.Counter()

    def keep(
        self,
        start: int,
        counts: sp.csr_matrix,
        observed: np.ndarray,
        libsize: np.ndarray,
        candidates: np.ndarray | None = None,
    ) -> np.ndarray:
        """Boolean mask of the block's cells that pass every filter. `observed`: each cell's summed counts;
        `libsize`: its library size (the same, or a total-counts column). `candidates`: the cells still
        in play (a cell left out already, by its label, is neither checked nor counted again)."""
        cfg = self.cfg
        zero = observed == 0
        if candidates is not None:
            zero &= candidates
        if zero.any() and cfg.zero_count_cells == "error":
            rows = np.flatnonzero(zero)
            first = start + int(rows[0])
            raise InputError(
                f"{self.source.where}: {rows.size:,} cells in rows {start}-{start + counts.shape[0] - 1} have "
                f"zero counts (first: {self.source.obs.index[first]!r}, row {first}); this looks like an unfiltered "
                "or wrong matrix. Set qc.zero_count_cells: drop to drop such cells"
            )
        genes = np.diff(counts.indptr)
        checks = {
            "zero_counts": zero,
            "min_genes": genes < cfg.min_genes,
            "max_genes": genes > cfg.max_genes if cfg.max_genes else None,
            "min_counts": libsize < cfg.min_counts,
            "max_counts": libsize > cfg.max_counts if cfg.max_counts else None,
        }
        if cfg.max_mito_fraction is not None and self.mito.any():
            mito = row_sums(counts[:, np.flatnonzero(self.mito)])
            checks["max_mito_fraction"] = mito > cfg.max_mito_fraction * np.maximum(observed, 1)
        keep = np.ones(counts.shape[0], dtype=bool) if candidates is None else candidates.copy()
        for reason, failed in checks.items():
            if failed is None:
                continue
            # each dropped cell is counted once, under the first filter it fails
            self.dropped[f"cells_dropped_{reason}"] += int((failed & keep).sum())
            keep &= ~failed
        return keep


def select_hvg(counts: sp.csr_matrix, scale: np.ndarray, cfg: HVGConfig) -> np.ndarray:
    """Highly variable genes (scanpy) of a sample of cells: boolean mask over the sample's columns.

    The sample is normalised with each cell's own library size (the same values the tokens get),
    log1p-transformed, and handed to `scanpy.pp.highly_variable_genes`."""
    if cfg.n_top_genes is None or cfg.n_top_genes >= counts.shape[1]:
        return np.ones(counts.shape[1], dtype=bool)
    try:
        return _select_hvg(counts, scale, cfg)
    except MemoryError:
        # the panel prep's peak: scanpy holds several copies of the sample (a numpy traceback said nothing)
        from biomask.errors import BiomaskError

        raise BiomaskError(
            f"out of memory selecting the {cfg.n_top_genes:,} most variable genes from a sample of "
            f"{counts.shape[0]:,} cells x {counts.shape[1]:,} genes ({counts.nnz:,} values; scanpy holds "
            f"several copies of it): lower hvg.max_cells (now {cfg.max_cells:,}), or give the prep more memory"
        ) from None


def _select_hvg(counts: sp.csr_matrix, scale: np.ndarray, cfg: HVGConfig) -> np.ndarray:
    import anndata
    import scanpy as sc

    values = sp.csr_matrix(counts, dtype=np.float32, copy=True)
    values.data *= np.repeat(scale.astype(np.float32), np.diff(values.indptr))
    np.log1p(values.data, out=values.data)
    adata = anndata.AnnData(values)
    sc.pp.highly_variable_genes(adata, n_top_genes=cfg.n_top_genes, flavor=cfg.flavor, subset=False)
    chosen = adata.var["highly_variable"].to_numpy(dtype=bool)
    if chosen.sum() > cfg.n_top_genes:
        # scanpy keeps every gene tied with the last one's dispersion, so a panel asked for 2,000 could
        # hold 2,001; the first of the tied genes in the vocabulary's order are kept.
        score = adata.var["dispersions_norm"].to_numpy(dtype=np.float64)
        ranked = np.flatnonzero(chosen)[np.argsort(-score[chosen], kind="stable")]
        chosen = np.zeros_like(chosen)
        chosen[ranked[: cfg.n_top_genes]] = True
    return chosen
