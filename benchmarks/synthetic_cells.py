"""SYNTHETIC single-cell counts for speed and memory benchmarks only -- never for results.

A negative-binomial model is fitted to the real pbmc3k counts (fetched from the registry):

- library sizes: a log-normal fitted to pbmc3k's per-cell totals;
- genes: pbmc3k's genes ordered by mean expression (the first `n_genes`); for gene g, its share of
  a cell's counts mu_g and a dispersion theta_g by the method of moments on size-normalised counts
  (var = m + m^2 / theta; genes without excess variance get theta = 1000, close to Poisson);
- cell c, gene g: count ~ NB(mean = L_c * mu_g, dispersion theta_g).

Drawing 200k x 20k entries one by one would take minutes, so the sampler works sparsely and exactly:
which entries are non-zero is decided per gene by thinning (candidates at the block's highest
non-zero probability, each accepted with its own probability), and each non-zero entry's value comes
from the zero-truncated NB -- by CDF inversion where zeros are likely, by redrawing zeros elsewhere.
Cells are written block by block into an h5ad (CSR), so memory stays small at any size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

SYNTHETIC_NOTE = "SYNTHETIC: negative-binomial draws from a model fitted to pbmc3k (benchmarks only)"
_VERSION = 2  # bump when the model or sampler changes (cached files are keyed by it)


@dataclass
class NBModel:
    genes: np.ndarray  # gene names (pbmc3k symbols)
    mu: np.ndarray  # share of a cell's counts, per gene
    theta: np.ndarray  # NB dispersion per gene
    log_lib_mean: float
    log_lib_std: float

    @classmethod
    def fit_pbmc3k(cls, n_genes: int) -> NBModel:
        import anndata

        from biomask import datasets

        adata = anndata.read_h5ad(datasets.fetch("pbmc3k"))
        counts = sp.csr_matrix(adata.X, dtype=np.float64)
        lib = np.asarray(counts.sum(axis=1)).ravel()
        mean = np.asarray(counts.sum(axis=0)).ravel() / lib.sum()  # each gene's share of the counts
        detected = np.bincount(counts.indices, minlength=counts.shape[1]) / counts.shape[0]
        order = np.argsort(-mean, kind="stable")[:n_genes]
        if n_genes > order.size:
            raise ValueError(f"pbmc3k has {order.size} genes; ask for at most that many")
        return cls(
            genes=adata.var_names.to_numpy()[order],
            mu=mean[order],
            theta=_fit_theta(mean[order], 1.0 - detected[order], lib),
            log_lib_mean=float(np.log(lib).mean()),
            log_lib_std=float(np.log(lib).std()),
        )

    def sample(self, n_cells: int, rng: np.random.Generator) -> sp.csr_matrix:
        """n_cells x n_genes counts (float32 CSR, sorted indices)."""
        lib = np.exp(rng.normal(self.log_lib_mean, self.log_lib_std, size=n_cells))
        by_size = np.argsort(lib)
        parts = [self._nonzero(by_size[lo : lo + 512], lib, rng) for lo in range(0, n_cells, 512)]
        cells, genes = (np.concatenate(a) for a in zip(*parts))
        lam = lib[cells] * self.mu[genes]
        theta = self.theta[genes]
        values = _zero_truncated_nb(lam, theta, (1.0 + lam / theta) ** (-theta), rng)
        matrix = sp.csr_matrix((values.astype(np.float32), (cells, genes)), shape=(n_cells, self.mu.size))
        matrix.sort_indices()
        return matrix

    def _nonzero(
        self, cells: np.ndarray, lib: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """(cell, gene) of the non-zero entries among `cells` (similar library sizes), drawn by thinning:
        per gene, a uniform random set of candidate cells at the group's largest non-zero probability,
        each kept with its own probability / that bound."""
        n = cells.size
        q_max = 1.0 - (1.0 + lib[cells].max() * self.mu / self.theta) ** (-self.theta)
        # Frequently detected genes: every cell is a candidate (bound 1), so drawing subsets stays cheap.
        q_max[q_max > 0.25] = 1.0
        per_gene = rng.binomial(n, q_max)
        genes = np.repeat(np.arange(self.mu.size), per_gene)
        # K distinct cells per gene: draw with replacement, redraw repeats (exactly uniform subsets)
        slot = np.empty(genes.size, dtype=np.int64)
        everyone = q_max[genes] == 1.0
        slot[everyone] = np.arange(int(everyone.sum())) % n  # genes are grouped: 0..n-1 per such gene
        # the others: K distinct cells per gene -- draw with replacement, redraw repeats (uniform subsets)
        rest = np.flatnonzero(~everyone)
        slot[rest] = rng.integers(0, n, size=rest.size)
        while rest.size:
            _, first = np.unique(genes[rest] * n + slot[rest], return_index=True)
            repeat = np.ones(rest.size, dtype=bool)
            repeat[first] = False
            if not repeat.any():
                break
            slot[rest[repeat]] = rng.integers(0, n, size=int(repeat.sum()))
        chosen = cells[slot]
        lam = lib[chosen] * self.mu[genes]
        q = 1.0 - (1.0 + lam / self.theta[genes]) ** (-self.theta[genes])
        keep = rng.random(genes.size) * q_max[genes] < q
        return chosen[keep], genes[keep]


def _fit_theta(mu: np.ndarray, zero_fraction: np.ndarray, lib: np.ndarray) -> np.ndarray:
    """Per gene, the dispersion whose expected fraction of zero counts over pbmc3k's library sizes matches
    the observed one -- sparsity is what tokenization cost depends on, so it is what the fit preserves."""
    grid = np.logspace(-2, 3, 101)
    libs = np.quantile(lib, np.linspace(0.01, 0.99, 32))
    theta = np.empty(mu.size)
    for lo in range(0, mu.size, 2048):
        m = mu[lo : lo + 2048, None, None]
        p0 = ((1.0 + libs[None, None, :] * m / grid[None, :, None]) ** (-grid[None, :, None])).mean(axis=2)
        theta[lo : lo + 2048] = grid[np.argmin(np.abs(p0 - zero_fraction[lo : lo + 2048, None]), axis=1)]
    return theta


def _zero_truncated_nb(lam: np.ndarray, theta: np.ndarray, p_zero: np.ndarray, rng) -> np.ndarray:
    """One draw of NB(mean lam, dispersion theta) conditioned on being >= 1, per entry."""
    out = np.zeros(lam.size, dtype=np.int64)
    invert = lam <= 2.0  # small means: few steps of the CDF walk
    # Small means: invert the CDF above P(0), walking k = 1, 2, ... with the NB pmf recursion.
    idx = np.flatnonzero(invert)
    target = p_zero[idx] + rng.random(idx.size) * (1.0 - p_zero[idx])
    th, ratio = theta[idx], lam[idx] / (lam[idx] + theta[idx])
    pmf, cdf, k = p_zero[idx].copy(), p_zero[idx].copy(), 0
    while idx.size:
        k += 1
        pmf *= (k - 1 + th) / k * ratio
        cdf += pmf
        done = cdf >= target - 1e-12
        out[idx[done]] = k
        if k > 10_000:  # numerical safety, never expected
            out[idx] = np.where(done, k, k)
            break
        idx, target, th, ratio, pmf, cdf = (a[~done] for a in (idx, target, th, ratio, pmf, cdf))
    # Larger means: draw NB and redraw the zeros.
    idx = np.flatnonzero(~invert)
    while idx.size:
        draw = rng.negative_binomial(theta[idx], theta[idx] / (theta[idx] + lam[idx]))
        out[idx] = draw
        idx = idx[draw == 0]
    return out


def write_synthetic_h5ad(
    path: Path, n_cells: int, n_genes: int = 20_000, seed: int = 0, block: int = 8192
) -> Path:
    """Write (or reuse) a SYNTHETIC counts h5ad of n_cells x n_genes, block by block."""
    from anndata.io import sparse_dataset, write_elem

    stamp = {"version": _VERSION, "cells": n_cells, "genes": n_genes, "seed": seed, "note": SYNTHETIC_NOTE}
    marker = path.with_suffix(".json")
    if path.exists() and marker.exists() and json.loads(marker.read_text()) == stamp:
        return path
    model = NBModel.fit_pbmc3k(n_genes)
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.h5ad")
    with h5py.File(tmp, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"

        write_elem(f, "var", pd.DataFrame(index=model.genes))
        write_elem(f, "uns", {"note": SYNTHETIC_NOTE})
        totals = np.zeros(n_cells)
        for start in range(0, n_cells, block):
            part = model.sample(min(block, n_cells - start), rng)
            totals[start : start + part.shape[0]] = np.asarray(part.sum(axis=1)).ravel()
            if start == 0:
                write_elem(f, "X", part)
                matrix = sparse_dataset(f["X"])
            else:
                matrix.append(part)
        obs = pd.DataFrame({"n_counts": totals}, index=[f"synthetic-{i:07d}" for i in range(n_cells)])
        write_elem(f, "obs", obs)
    tmp.replace(path)
    marker.write_text(json.dumps(stamp))
    return path


def write_synthetic_10x_mtx(
    directory: Path, n_cells: int, n_genes: int = 20_000, *, shuffled: bool = False, seed: int = 0,
    block: int = 8192, compresslevel: int = 1,
) -> Path:  # fmt: skip
    """Write (or reuse) a SYNTHETIC 10x directory: matrix.mtx.gz (genes x barcodes, integer),
    features.tsv.gz, barcodes.tsv.gz. Entries come in barcode order, as Cell Ranger writes them, or --
    `shuffled` -- blocks of cells in a random order with their entries shuffled: the same matrix either
    way (each block of cells is drawn from its own seed), so the two read paths can be compared.
    gzip level 1 keeps writing a few GB of text to minutes; the reader does not care."""
    import gzip
    import io

    import scipy.io

    stamp = {"version": _VERSION, "cells": n_cells, "genes": n_genes, "seed": seed, "block": block,
             "shuffled": shuffled, "note": SYNTHETIC_NOTE}  # fmt: skip
    marker = directory / "synthetic.json"
    if marker.exists() and json.loads(marker.read_text()) == stamp:
        return directory
    model = NBModel.fit_pbmc3k(n_genes)
    directory.mkdir(parents=True, exist_ok=True)
    starts = list(range(0, n_cells, block))
    order = np.random.default_rng([seed, 1]).permutation(len(starts)) if shuffled else np.arange(len(starts))
    body, entries = directory / "body.tmp.gz", 0
    with gzip.open(body, "wb", compresslevel=compresslevel) as out:
        for k in order:
            start = starts[k]
            rng = np.random.default_rng([seed, int(k)])
            part = model.sample(min(block, n_cells - start), rng).T.tocsc().tocoo()  # genes x cells, by cell
            rows, cols, values = part.row, part.col + start, part.data.astype(np.int64)
            if shuffled:
                mix = rng.permutation(rows.size)
                rows, cols, values = rows[mix], cols[mix], values[mix]
            text = io.BytesIO()
            coo = sp.coo_matrix((values, (rows, cols)), shape=(n_genes, n_cells))
            scipy.io.mmwrite(text, coo, field="integer")
            lines = text.getvalue()
            # mmwrite's banner, comments and size line go; its body keeps the entries' order
            while lines.startswith(b"%"):
                lines = lines[lines.index(b"\n") + 1 :]
            lines = lines[lines.index(b"\n") + 1 :]
            out.write(lines)
            entries += values.size
    header = f"%%MatrixMarket matrix coordinate integer general\n%SYNTHETIC\n{n_genes} {n_cells} {entries}\n"
    with open(directory / "matrix.mtx.gz", "wb") as matrix:  # gzip members may follow each other
        matrix.write(gzip.compress(header.encode()))
        with open(body, "rb") as part_file:
            while chunk := part_file.read(64 << 20):
                matrix.write(chunk)
    body.unlink()
    genes = pd.DataFrame({"id": [f"SYN{i:08d}" for i in range(n_genes)], "name": model.genes,
                          "type": "Gene Expression"})  # fmt: skip
    genes.to_csv(directory / "features.tsv.gz", sep="\t", header=False, index=False)
    pd.Series([f"synthetic-{i:07d}" for i in range(n_cells)]).to_csv(
        directory / "barcodes.tsv.gz", header=False, index=False
    )
    marker.write_text(json.dumps(stamp))
    return directory
