"""Expression matrices opened for reading in blocks of cells, sparse throughout.

Every reader gives a `MatrixSource`: the cells' metadata (`obs`, index = cell ids), the genes'
metadata (`var`, index = the file's gene names), and `rows(start, stop)`, a CSR block of cells x genes.
Only one block (or one chunk of a conversion) is ever in memory:

| format    | how a block is read                                                                    |
|-----------|----------------------------------------------------------------------------------------|
| `h5ad`    | `X`, `raw` or `layers/NAME`: CSR rows as slices of data/indices (`h5slices.py`)         |
|           | or an h5py slice of a dense matrix; obs/var with anndata. CSC: converted once to CSR on |
|           | disk, a run of columns at a time (like 10x_mtx)                                        |
| `10x_h5`  | Cell Ranger .h5 (v2 and v3): cells are columns of its CSC matrix, so a block of cells is |
|           | one contiguous slice of data/indices (v3: Gene Expression features only, like scanpy)  |
| `loom`    | a column slice of the genes x cells matrix (or a layer), densified one block at a time  |
| `10x_mtx` | Matrix Market text is not row-addressable: converted once, when opened, to CSR in a     |
|           | temporary directory (`spill.py`; one pass when entries come in barcode order, as Cell  |
|           | Ranger writes them, else bucketed by cells first), then served as slices of it          |

Gene names are kept as the file has them (no `-1` suffixes): duplicates are handled on purpose later.
"""

from __future__ import annotations

import errno
import logging
import os
import warnings
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from biomask.cells.formats import FORMATS, guess_format, mtx_files
from biomask.cells.h5slices import SliceReader
from biomask.cells.mtx import MtxReader
from biomask.cells.spill import DiskCSR, EntrySpill, RowWriter, ScratchDir, scratch_error, stable_by_row
from biomask.errors import InputError, missing_input
from biomask.progress import bar as progress_bar

log = logging.getLogger(__name__)


class MatrixSource(ABC):
    """A cells x genes matrix read in row blocks; `obs` and `var` are in memory, the values are not."""

    def __init__(
        self, name: str, path: Path, key: str, obs: pd.DataFrame, var: pd.DataFrame, alternatives: list[str]
    ) -> None:
        self.name = name
        self.path = path
        self.key = key  # which matrix inside the file, for messages
        self.obs = obs
        self.var = var
        self.alternatives = alternatives  # every matrix the file offers (for hints in error messages)

    @property
    def n_obs(self) -> int:
        return len(self.obs)

    @property
    def n_vars(self) -> int:
        return len(self.var)

    @property
    def where(self) -> str:
        """`file [matrix]`, the way error messages name a matrix."""
        return f"{self.path} [{self.key}]"

    @property
    @abstractmethod
    def dtype(self) -> np.dtype:
        """The stored value type (checked before anything is read)."""

    @property
    def stored_values(self) -> int:
        """An upper bound on the non-zero values, known without reading them (dense: every entry)."""
        return self.n_obs * self.n_vars

    sparse_storage = False  # whether stored_values counts what is stored (else every entry)

    def nonzero_values(self, block_size: int) -> int:
        """The stored values, as a sparse matrix of these cells would hold them: a dense matrix is read
        once to count its non-zeros, so that the same cells stored either way give the same result."""
        if self.sparse_storage:
            return self.stored_values
        return sum(int(block.nnz) for _, block in self.blocks(block_size))

    @abstractmethod
    def _read(self, start: int, stop: int) -> sp.csr_matrix:
        """Cells [start, stop) as CSR."""

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        try:
            block = self._read(start, stop)
        except OSError as exc:  # HDF5: a chunk that fails its filter (damaged compression) or checksum
            raise InputError(
                f"{self.where}: cells {start + 1:,}-{stop:,} cannot be read ({exc}); the file is damaged: "
                "write it again (or fetch it again)"
            ) from None
        if block.shape != (stop - start, self.n_vars):
            raise InputError(
                f"{self.where}: a block of cells has shape {block.shape}, expected {(stop - start, self.n_vars)}; "
                "the file is inconsistent (matrix and obs/var sizes differ)"
            )
        check_csr(self.where, block.indices, block.indptr, len(block.data), self.n_vars, start)
        return block

    def blocks(self, block_size: int) -> Iterator[tuple[int, sp.csr_matrix]]:
        """(first cell index, CSR block) for consecutive blocks of at most `block_size` cells."""
        for start in range(0, self.n_obs, block_size):
            yield start, self.rows(start, min(start + block_size, self.n_obs))

    def close(self) -> None:  # noqa: B027 - most sources hold nothing to release
        pass


# --------------------------------------------------------------------------------------------- helpers


def check_csr(where: str, indices: np.ndarray, indptr: np.ndarray, nnz: int, n_cols: int, first: int) -> None:
    """A CSR block's structure as a damaged file can break it, checked before any sparse arithmetic
    (scipy trusts it: an index past the last gene reads or writes outside its arrays and crashes the
    process). `first` is the block's first cell, for the message."""
    damaged = (
        "the matrix is damaged (a damaged file, or one written wrongly): write it again, or fetch it again"
    )
    if (
        len(indptr) < 1
        or indptr[0] != 0
        or indptr[-1] != nnz
        or len(indices) != nnz
        or (np.diff(indptr) < 0).any()
    ):
        raise InputError(
            f"{where}: the row pointers (indptr) of cells {first + 1:,}-{first + len(indptr) - 1:,} do not "
            f"describe their {nnz:,} stored values; {damaged}"
        )
    if nnz:
        bad = (indices < 0) | (indices >= n_cols)
        if bad.any():
            at = int(np.argmax(bad))
            cell = first + int(np.searchsorted(indptr, at, side="right")) - 1
            raise InputError(
                f"{where}: cell {cell + 1:,} stores a gene index {int(indices[at]):,} outside 0..{n_cols - 1:,}; "
                f"{damaged}"
            )


def _strings(values: np.ndarray) -> np.ndarray:
    """HDF5 string arrays come back as bytes: decode them to str."""
    values = np.asarray(values)
    if values.dtype.kind == "S" or (
        values.dtype.kind == "O" and values.size and isinstance(values[0], bytes)
    ):
        return np.array([v.decode("utf-8", "replace") for v in values], dtype=object)
    return values.astype(object)


def _check_sizes(where: str, n_obs: int, n_vars: int, shape: tuple[int, ...]) -> None:
    if tuple(shape) != (n_obs, n_vars):
        raise InputError(
            f"{where}: the matrix is {shape[0]} x {shape[1]} but obs has {n_obs} cells and var {n_vars} genes"
        )


def _open_h5(path: Path) -> h5py.File:
    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        if exc.errno == errno.EMFILE or "Too many open files" in str(exc):  # h5py's carries no errno
            from biomask.errors import EnvironmentIOError, describe_os_error

            error = OSError(errno.EMFILE, "Too many open files", str(path))
            raise EnvironmentIOError(describe_os_error(error)) from None
        raise InputError(f"{path} is not a readable HDF5 file ({exc}); is it really this format?") from None
    try:
        _check_self_contained(handle, path)
    except BaseException:
        handle.close()
        raise
    return handle


def _check_self_contained(handle: h5py.File, path: Path) -> None:
    """Refuse data kept in other files: HDF5 external links, virtual datasets and datasets with
    external storage are followed when read, but only this file is hashed, so a store built from it would be reused (and its provenance
    called unchanged) after the other file changed. A user's copy of the data into the file is one
    command (h5copy, or anndata's read and write)."""
    elsewhere: list[str] = []

    def links(group: h5py.Group) -> None:
        for key in group:  # the link itself, not what it leads to
            link = group.get(key, getlink=True)
            if isinstance(link, h5py.ExternalLink):
                elsewhere.append(f"{group.name.rstrip('/')}/{key} -> {link.filename}:{link.path}")

    def visit(name: str, item: Any) -> None:
        if isinstance(item, h5py.Group):
            links(item)
        elif isinstance(item, h5py.Dataset) and item.is_virtual:
            sources = sorted({source.file_name for source in item.virtual_sources()})
            elsewhere.append(f"/{name} -> a virtual dataset of {', '.join(sources)}")
        elif isinstance(item, h5py.Dataset) and item.external:  # raw bytes kept in files beside it
            files = sorted({str(entry[0]) for entry in item.external})
            elsewhere.append(f"/{name} -> its values stored in {', '.join(files)}")

    links(handle)
    handle.visititems(visit)  # every object reached by hard links, each once (no external ones)
    if elsewhere:
        shown = "; ".join(elsewhere[:3]) + (f"; and {len(elsewhere) - 3} more" if len(elsewhere) > 3 else "")
        raise InputError(
            f"{path}: holds data kept in other files ({shown}). biomask hashes the input file, so changes "
            "there would go unseen; copy the data into the file (anndata.read_h5ad(path).write_h5ad(new), "
            "or h5copy) and give that"
        )


def _sparse_ready(values: Any) -> Any:
    """Values scipy.sparse can hold: float16 (which it refuses) widened to float32, exactly."""
    return values.astype(np.float32) if getattr(values, "dtype", None) == np.float16 else values


def _canonical(block: sp.csr_matrix) -> sp.csr_matrix:
    """A gene stored twice in one cell's row (allowed in CSR; scipy and scanpy add them up) summed into
    one value: checked entry by entry, 0.5 + 0.5 read as a cell of non-integer values."""
    if not block.has_canonical_format:
        block = block.copy()
        block.sum_duplicates()
    return block


class _CSRSource(MatrixSource):
    """A matrix already in memory as CSR (10x mtx, an AnnData, a CSC file converted once)."""

    def __init__(self, matrix: sp.spmatrix | np.ndarray, **kwargs) -> None:
        super().__init__(**kwargs)
        self.matrix = sp.csr_matrix(_sparse_ready(matrix))
        _check_sizes(self.where, self.n_obs, self.n_vars, self.matrix.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.matrix.dtype

    sparse_storage = True

    @property
    def stored_values(self) -> int:
        return int(self.matrix.nnz)

    def _read(self, start: int, stop: int) -> sp.csr_matrix:
        return _canonical(self.matrix[start:stop])


# --------------------------------------------------------------------------------------------- h5ad


class _H5ADSource(MatrixSource):
    """A sparse (CSR) or dense matrix inside an open h5ad file, read block by block."""

    def __init__(self, handle: h5py.File, element: h5py.Group | h5py.Dataset, **kwargs) -> None:
        super().__init__(**kwargs)
        self.handle = handle
        if isinstance(element, h5py.Group):
            from anndata.io import sparse_dataset

            self.sparse = sparse_dataset(element)  # checks the encoding; blocks are read directly (below)
            self.dense = None
            shape, self._dtype = self.sparse.shape, self.sparse.dtype
            self._stored = int(element["data"].shape[0])
            self._indptr = element["indptr"]
            self._data, self._indices = SliceReader(element["data"]), SliceReader(element["indices"])
        else:
            self.sparse, self.dense = None, element
            shape, self._dtype = element.shape, element.dtype
            if len(shape) != 2:
                raise InputError(f"{self.where}: expected a 2-D matrix, found shape {shape}")
        _check_sizes(self.where, self.n_obs, self.n_vars, shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self._dtype)

    @property
    def sparse_storage(self) -> bool:  # type: ignore[override]
        return self.sparse is not None

    @property
    def stored_values(self) -> int:
        return self._stored if self.sparse is not None else self.n_obs * self.n_vars

    def _read(self, start: int, stop: int) -> sp.csr_matrix:
        if self.sparse is not None:
            indptr = self._indptr[start : stop + 1].astype(np.int64)
            lo, hi = int(indptr[0]), int(indptr[-1])
            if lo < 0 or hi > self._stored or bool((np.diff(indptr) < 0).any()):
                raise InputError(
                    f"{self.where}: its indptr (where each cell's values start) does not fit the "
                    f"{self._stored:,} stored values for cells {start:,}-{stop - 1:,}; the file is damaged: "
                    "write it again (adata.write_h5ad) from the source"
                )
            return _canonical(
                sp.csr_matrix(
                    (_sparse_ready(self._data[lo:hi]), self._indices[lo:hi], indptr - lo),
                    shape=(stop - start, self.n_vars),
                )
            )
        return sp.csr_matrix(_sparse_ready(self.dense[start:stop]))

    def close(self) -> None:
        if self.sparse is not None:
            self._data.close()
            self._indices.close()
        self.handle.close()


def _h5ad_frames(path: Path, handle: h5py.File) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame | None]:
    """obs, var and raw's var. Files written by anndata < 0.7 store them differently: let anndata read those
    (backed, so the matrices stay on disk)."""
    if "encoding-type" in handle.attrs:
        from anndata.io import read_elem

        raw_var = read_elem(handle["raw/var"]) if "raw" in handle and "var" in handle["raw"] else None
        return read_elem(handle["obs"]), read_elem(handle["var"]), raw_var
    import anndata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata's notes about converting the old layout
        adata = anndata.read_h5ad(path, backed="r")
    try:
        raw_var = adata.raw.var.copy() if adata.raw is not None else None
        return adata.obs.copy(), adata.var.copy(), raw_var
    finally:
        adata.file.close()


def _h5ad_alternatives(handle: h5py.File) -> list[str]:
    found = ["X"] if "X" in handle else []
    if "raw" in handle or "raw.X" in handle:
        found.append("raw")
    if "layers" in handle:
        found += [f"layers/{name}" for name in handle["layers"]]
    return found


def open_h5ad(path: Path, matrix: str = "X", name: str | None = None) -> MatrixSource:
    handle = _open_h5(path)
    try:
        alternatives = _h5ad_alternatives(handle)
        if matrix not in alternatives:
            raise InputError(
                f"{path} has no matrix {matrix!r}; it has: {', '.join(alternatives) or 'none'} "
                "(set `matrix:` on this input)"
            )
        obs, var, raw_var = _h5ad_frames(path, handle)
        if matrix == "X":
            element = handle["X"]
        elif matrix == "raw":
            element = handle["raw/X"] if "raw" in handle else handle["raw.X"]
            if raw_var is None:
                raise InputError(f"{path}: .raw has a matrix but no var table")
            var = raw_var
        else:
            element = handle["layers"][matrix.split("/", 1)[1]]
        kwargs = dict(
            name=name or path.name, path=path, key=matrix, obs=obs, var=var, alternatives=alternatives
        )
        if isinstance(element, h5py.Group):
            from anndata.io import sparse_dataset

            stored = sparse_dataset(element)
            if stored.format == "csc":
                # A cell's values are scattered over every column: convert once, to CSR on disk.
                log.warning(
                    "%s [%s] is stored by column (CSC): converting it to a temporary CSR copy (store it "
                    "as CSR to skip this)",
                    path,
                    matrix,
                )
                scratch = ScratchDir("biomask-csc-")
                try:
                    disk = _csc_to_disk(element, scratch.path, stored.shape, f"{path} [{matrix}]")
                except BaseException:
                    scratch.cleanup()
                    raise
                handle.close()
                return _DiskSource(disk, scratch, **kwargs)
        return _H5ADSource(handle, element, **kwargs)
    except BaseException:
        if handle.id.valid:
            handle.close()
        raise


CSC_CHUNK = 4_000_000  # stored values read at a time while converting a CSC matrix


def _csc_to_disk(group: h5py.Group, directory: Path, shape: tuple[int, int], where: str) -> DiskCSR:
    """A CSC cells x genes matrix -> CSR on disk, read a run of columns at a time: the same arrays
    scipy's csc.tocsr() gives (rows' genes in order, repeats and zeros kept as stored)."""
    n_cells, n_genes = (int(n) for n in shape)
    indptr = group["indptr"][:].astype(np.int64)  # one integer per gene: small
    nnz = int(group["data"].shape[0])
    if indptr.size != n_genes + 1 or indptr[0] != 0 or indptr[-1] != nnz or (np.diff(indptr) < 0).any():
        raise InputError(f"{where}: the CSC matrix's indptr does not describe its {nnz:,} stored values")
    dtype = np.dtype(group["data"].dtype)
    data, indices = SliceReader(group["data"]), SliceReader(group["indices"])

    def combine(cells: np.ndarray, genes: np.ndarray, values: np.ndarray, n: int) -> sp.csr_matrix:
        return stable_by_row(cells, genes, values, n, n_genes)

    try:
        spill = EntrySpill(directory, n_cells, n_genes, dtype, nnz, combine)
        with progress_bar(nnz, "convert CSC", unit="values") as bar:
            gene = 0
            while gene < n_genes:
                end = int(np.searchsorted(indptr, indptr[gene] + CSC_CHUNK, side="right")) - 1
                end = min(max(end, gene + 1), n_genes)
                lo, hi = int(indptr[gene]), int(indptr[end])
                cells = np.asarray(indices[lo:hi], dtype=np.int64)
                if cells.size and (cells.min() < 0 or cells.max() >= n_cells):
                    raise InputError(f"{where}: a stored cell index is outside 0..{n_cells - 1:,}")
                genes = np.repeat(np.arange(gene, end, dtype=np.int64), np.diff(indptr[gene : end + 1]))
                spill.add(cells, genes, np.asarray(data[lo:hi]))
                bar.update(hi - lo)
                gene = end
        return spill.finish()
    except OSError as exc:
        raise scratch_error(exc, directory) from None
    finally:
        data.close()
        indices.close()


# --------------------------------------------------------------------------------------------- 10x .h5


class _TenxH5Source(MatrixSource):
    """Cell Ranger's genes x cells CSC matrix: cell i's values are data[indptr[i]:indptr[i+1]]."""

    def __init__(self, handle: h5py.File, group: h5py.Group, keep: np.ndarray | None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.handle, self.group = handle, group
        self.indptr = group["indptr"][:].astype(np.int64)  # one integer per cell: small
        self._data, self._indices = SliceReader(group["data"]), SliceReader(group["indices"])
        self.n_features = int(group["shape"][0])
        self.keep = keep  # feature columns kept (v3: Gene Expression), or None for all
        if self.indptr.size != self.n_obs + 1:
            raise InputError(f"{self.where}: indptr has {self.indptr.size} entries for {self.n_obs} barcodes")

    @property
    def dtype(self) -> np.dtype:
        return self.group["data"].dtype

    sparse_storage = True

    @property
    def stored_values(self) -> int:
        return int(self.indptr[-1])

    def _read(self, start: int, stop: int) -> sp.csr_matrix:
        lo, hi = self.indptr[start], self.indptr[stop]
        data, indices, indptr = self._data[lo:hi], self._indices[lo:hi], self.indptr[start : stop + 1] - lo
        check_csr(self.where, indices, indptr, len(data), self.n_features, start)  # before the column pick
        block = sp.csr_matrix((data, indices, indptr), shape=(stop - start, self.n_features))
        return block[:, self.keep] if self.keep is not None else block

    def close(self) -> None:
        self._data.close()
        self._indices.close()
        self.handle.close()


def open_10x_h5(path: Path, matrix: str = "X", name: str | None = None) -> MatrixSource:
    if matrix != "X":
        raise InputError(
            f"{path}: a 10x .h5 file holds one matrix; remove `matrix: {matrix}` from this input"
        )
    handle = _open_h5(path)
    try:
        if "matrix" in handle:  # Cell Ranger >= 3
            group = handle["matrix"]
            features = group["features"]
            names, ids = _strings(features["name"][:]), _strings(features["id"][:])
            types = _strings(features["feature_type"][:])
            keep = np.flatnonzero(types == "Gene Expression")
            var = pd.DataFrame({"gene_ids": ids[keep], "feature_types": types[keep]}, index=names[keep])
            keep_cols = None if keep.size == names.size else keep
        else:  # Cell Ranger 2: one group per genome
            genomes = list(handle.keys())
            if len(genomes) != 1:
                raise InputError(
                    f"{path}: expected one genome group in a Cell Ranger 2 file, found {genomes or 'none'}"
                )
            group = handle[genomes[0]]
            if "gene_names" not in group:
                raise InputError(f"{path}: not a 10x .h5 file (no matrix/features or <genome>/gene_names)")
            names, ids = _strings(group["gene_names"][:]), _strings(group["genes"][:])
            var = pd.DataFrame({"gene_ids": ids}, index=names)
            keep_cols = None
        obs = pd.DataFrame(index=pd.Index(_strings(group["barcodes"][:]), name=None))
        var.index.name = None
        return _TenxH5Source(
            handle,
            group,
            keep_cols,
            name=name or path.name,
            path=path,
            key="matrix",
            obs=obs,
            var=var,
            alternatives=["X"],
        )
    except KeyError as exc:
        handle.close()
        raise InputError(f"{path}: not a 10x .h5 file (missing {exc})") from None
    except BaseException:
        handle.close()
        raise


# --------------------------------------------------------------------------------------------- loom


class _LoomSource(MatrixSource):
    """A loom matrix is genes x cells (dense, chunked): a block of cells is a column slice."""

    def __init__(self, handle: h5py.File, dataset: h5py.Dataset, **kwargs) -> None:
        super().__init__(**kwargs)
        self.handle, self.dataset = handle, dataset
        _check_sizes(self.where, self.n_obs, self.n_vars, dataset.shape[::-1])

    @property
    def dtype(self) -> np.dtype:
        return self.dataset.dtype

    def _read(self, start: int, stop: int) -> sp.csr_matrix:
        return sp.csr_matrix(self.dataset[:, start:stop].T)

    def close(self) -> None:
        self.handle.close()


# The attributes naming a loom's genes and cells: loompy's and velocyto's (Gene, CellID), then
# anndata's write_loom (var_names, obs_names)
_LOOM_GENES, _LOOM_CELLS = ("Gene", "var_names"), ("CellID", "obs_names")


def _attrs_frame(group: h5py.Group, index_keys: tuple[str, ...], where: str) -> pd.DataFrame:
    attrs = [key for key, ds in group.items() if isinstance(ds, h5py.Dataset) and ds.ndim == 1]
    index_key = next((key for key in index_keys if key in attrs), None)
    if index_key is None:
        wanted = " or ".join(f"{group.name}/{key}" for key in index_keys)
        raise InputError(
            f"{where}: no {wanted} (its {group.name} are: {', '.join(attrs) or 'none'}); name the one "
            f"holding the {'gene names' if index_keys == _LOOM_GENES else 'cell ids'} {index_keys[0]} "
            f"(h5py: f['{group.name}/{index_keys[0]}'] = f['{group.name}/<name>']), or convert the file: "
            "anndata.read_loom(path, var_names=..., obs_names=...).write_h5ad(...) (read_loom needs loompy: pip install loompy)"
        )
    columns = {
        key: _strings(group[key][:]) if group[key].dtype.kind in "SO" else group[key][:]
        for key in attrs
        if key != index_key
    }
    return pd.DataFrame(columns, index=pd.Index(_strings(group[index_key][:])))


def open_loom(path: Path, matrix: str = "X", name: str | None = None) -> MatrixSource:
    handle = _open_h5(path)
    try:
        if "matrix" not in handle and "obs" in handle and "var" in handle:  # an h5ad under another name
            raise InputError(
                f"{path} is not a loom file (no /matrix); it looks like an h5ad (it has /obs and /var): "
                "set format: h5ad for this input, or rename it to .h5ad"
            )
        layers = list(handle["layers"]) if "layers" in handle else []
        alternatives = ["X", *(f"layers/{n}" for n in layers if n)]
        if matrix == "X":
            dataset = handle.get("matrix")
        elif matrix.startswith("layers/") and matrix.split("/", 1)[1] in layers:
            dataset = handle["layers"][matrix.split("/", 1)[1]]
        else:
            dataset = None
        if dataset is None:
            raise InputError(f"{path} has no matrix {matrix!r}; it has: {', '.join(alternatives)}")
        for group in ("row_attrs", "col_attrs"):
            if not isinstance(handle.get(group), h5py.Group):
                raise InputError(
                    f"{path}: no /{group} group; a loom file keeps gene names in /row_attrs/Gene and "
                    "cell ids in /col_attrs/CellID"
                )
        var = _attrs_frame(handle["row_attrs"], _LOOM_GENES, str(path))
        obs = _attrs_frame(handle["col_attrs"], _LOOM_CELLS, str(path))
        return _LoomSource(
            handle,
            dataset,
            name=name or path.name,
            path=path,
            key=matrix,
            obs=obs,
            var=var,
            alternatives=alternatives,
        )
    except BaseException:
        handle.close()
        raise


# --------------------------------------------------------------------------------------------- 10x mtx


def open_10x_mtx(path: Path, matrix: str = "X", name: str | None = None) -> MatrixSource:
    if matrix != "X":
        raise InputError(
            f"{path}: a 10x directory holds one matrix; remove `matrix: {matrix}` from this input"
        )
    values, features, barcodes = mtx_files(path)
    legacy = features.name == "genes.tsv"
    try:
        if legacy or all(f.name.endswith(".gz") for f in (values, features, barcodes)):
            obs, var, keep, n_features = _scanpy_tables(features, barcodes, legacy)
        else:  # Cell Ranger >= 3 files stored uncompressed, which scanpy does not look for
            obs, var, keep, n_features = _v3_tables(features, barcodes)
    except (ValueError, OSError, IndexError, KeyError, EOFError, zlib.error, pd.errors.ParserError) as exc:
        raise InputError(
            f"{path}: cannot read the 10x gene or barcode table ({type(exc).__name__}: {exc}); "
            "is a file truncated or damaged?"
        ) from None
    scratch = ScratchDir("biomask-mtx-")
    try:
        disk = _mtx_to_disk(values, scratch.path, n_features, len(obs), keep, (features, barcodes))
    except BaseException:
        scratch.cleanup()
        raise
    return _DiskSource(
        disk,
        scratch,
        name=name or path.name,
        path=path,
        key=values.name,
        obs=obs,
        var=var,
        alternatives=["X"],
    )


def _scanpy_tables(
    features: Path, barcodes: Path, legacy: bool
) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray | None, int]:
    """obs, var, the feature rows kept and the number of features, the way scanpy.read_10x_mtx
    (gene symbols as names, not made unique; gex_only) reads them: what this reader gave when it
    used scanpy, so that stores stay the same."""
    genes = pd.read_csv(features, header=None, sep="\t")
    var = pd.DataFrame({"gene_ids": genes[0].to_numpy()}, index=pd.Index(genes[1].to_numpy()))
    keep = None
    if not legacy:
        types = genes[2].to_numpy()
        var["feature_types"] = types
        mask = types == "Gene Expression"
        if not mask.all():
            keep = np.flatnonzero(mask)
            var = var.iloc[keep]
    cells = pd.read_csv(barcodes, header=None)[0]
    obs = pd.DataFrame(index=pd.Index(cells.to_numpy()), columns=pd.Index([], dtype=object))  # as AnnData's
    return obs, var, keep, len(genes)


def _v3_tables(features: Path, barcodes: Path) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray | None, int]:
    """features.tsv / barcodes.tsv read as text, keeping Gene Expression features, symbols as names."""
    table = pd.read_csv(features, sep="\t", header=None, dtype=str, keep_default_na=False)
    if table.shape[1] < 2:
        raise ValueError(f"{features.name} has {table.shape[1]} column(s); expected id, name and type")
    types = table[2] if table.shape[1] > 2 else pd.Series("Gene Expression", index=table.index)
    cells = pd.read_csv(barcodes, sep="\t", header=None, dtype=str, keep_default_na=False)[0]
    mask = types.to_numpy() == "Gene Expression"
    keep = np.flatnonzero(mask)
    var = pd.DataFrame(
        {"gene_ids": table[0].to_numpy()[keep], "feature_types": types.to_numpy()[keep]},
        index=pd.Index(table[1].to_numpy()[keep]),
    )
    return pd.DataFrame(index=pd.Index(cells.to_numpy())), var, None if mask.all() else keep, len(table)


class _Unsorted(Exception):
    """Entries are not in barcode order: the one-pass conversion gives way to bucketing."""


def _mtx_to_disk(
    values: Path, directory: Path, n_features: int, n_cells: int, keep: np.ndarray | None, tables: tuple
) -> DiskCSR:
    """matrix.mtx -> a cells x kept-genes float32 CSR on disk, as scipy's mmread + tocsr would give it
    (entries of one cell summed when repeated, explicit zeros kept, genes in order)."""
    gene_map = None
    if keep is not None:  # non-GEX features dropped as they are read, not stored first
        gene_map = np.full(n_features, -1, dtype=np.int64)
        gene_map[keep] = np.arange(keep.size)
    n_genes = n_features if keep is None else keep.size

    def combine(cells: np.ndarray, genes: np.ndarray, data: np.ndarray, n: int) -> sp.csr_matrix:
        return sp.coo_matrix((data, (cells, genes)), shape=(n, n_genes)).tocsr()

    def entries(mtx: MtxReader, bar) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        for genes, cells, data in mtx.entries():
            bar.update(mtx.position - bar.n)
            data = data.astype(np.float32)  # the old whole-file read cast before summing repeats
            if gene_map is not None:
                genes = gene_map[genes]
                kept = genes >= 0
                genes, cells, data = genes[kept], cells[kept], data[kept]
            yield cells, genes, data

    def opened() -> MtxReader:
        mtx = MtxReader(values)
        if (mtx.n_rows, mtx.n_cols) != (n_features, n_cells):
            mtx.close()
            raise InputError(
                f"{values} line {mtx.size_line:,}: the header says {mtx.n_rows:,} features x {mtx.n_cols:,} "
                f"barcodes, but {tables[0].name} lists {n_features:,} and {tables[1].name} {n_cells:,}"
            )
        return mtx

    size = values.stat().st_size
    log.info("%s: converting to a temporary CSR copy in %s", values, directory)
    try:
        with opened() as mtx, progress_bar(size, f"read {values.name}", unit="B") as bar:
            return _sorted_to_disk(entries(mtx, bar), directory, n_cells, n_genes, combine)
    except _Unsorted:
        log.info("%s: entries are not sorted by barcode; bucketing them on disk first", values)
    except OSError as exc:
        raise scratch_error(exc, directory) from None
    try:
        with opened() as mtx, progress_bar(size, f"read {values.name}", unit="B") as bar:
            spill = EntrySpill(directory, n_cells, n_genes, np.dtype(np.float32), mtx.n_entries, combine)
            for cells, genes, data in entries(mtx, bar):
                spill.add(cells, genes, data)
        return spill.finish()
    except OSError as exc:
        raise scratch_error(exc, directory) from None


def _sorted_to_disk(entries, directory: Path, n_cells: int, n_genes: int, combine) -> DiskCSR:
    """One pass over entries sorted by cell (Cell Ranger's order): each cell's row is written as soon
    as a later cell appears; raises _Unsorted at the first entry out of order."""
    writer = RowWriter(directory, n_genes, np.dtype(np.float32))
    try:
        done = 0  # cells written
        pending = (np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32))
        for cells, genes, data in entries:
            if cells.size == 0:
                continue
            if (
                (pending[0].size and cells[0] < pending[0][-1])
                or cells[0] < done
                or (np.diff(cells) < 0).any()
            ):
                raise _Unsorted
            cells, genes, data = (np.concatenate(pair) for pair in zip(pending, (cells, genes, data)))
            last = int(cells[-1])  # its entries may go on in the next chunk
            cut = int(np.searchsorted(cells, last))
            writer.append(combine(cells[:cut] - done, genes[:cut], data[:cut], last - done))
            done = last
            pending = (cells[cut:], genes[cut:], data[cut:])
        writer.append(combine(pending[0] - done, pending[1], pending[2], n_cells - done))
    except BaseException:
        writer.abandon()
        raise
    return writer.finish()


class _DiskSource(MatrixSource):
    """A matrix converted to CSR in a temporary directory (10x mtx, CSC h5ad), read a block at a time."""

    def __init__(self, disk: DiskCSR, scratch: ScratchDir, **kwargs) -> None:
        super().__init__(**kwargs)
        self.disk, self.scratch = disk, scratch
        # the copy's files are open (DiskCSR holds their descriptors): unlinked now, they live until
        # closed and vanish with the process however it ends, SIGKILL included
        scratch.cleanup()
        _check_sizes(self.where, self.n_obs, self.n_vars, disk.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.disk.dtype

    sparse_storage = True

    @property
    def stored_values(self) -> int:
        return self.disk.nnz

    def _read(self, start: int, stop: int) -> sp.csr_matrix:
        return self.disk.rows(start, stop)

    def close(self) -> None:
        self.disk.close()
        self.scratch.cleanup()


# --------------------------------------------------------------------------------------------- entry points


def check_matrix_name(matrix: str, layers: list[str] | None = None) -> None:
    """`matrix=` is X, raw or layers/NAME; a layer's bare name (matrix="spliced") is the usual slip, and
    it crashed biomask.embed with an IndexError. `layers`: the AnnData's, to suggest the one meant."""
    if matrix in ("X", "raw") or (matrix.startswith("layers/") and len(matrix) > len("layers/")):
        return
    meant = f": for the layer {matrix!r} write matrix='layers/{matrix}'" if matrix in (layers or []) else ""
    raise InputError(f"matrix={matrix!r} (the CLI's --matrix) must be 'X', 'raw' or 'layers/NAME'{meant}")


def from_anndata(adata, matrix: str = "X", name: str = "anndata") -> MatrixSource:
    """An in-memory AnnData (e.g. from a notebook) as a source; `matrix` as in the config."""
    check_matrix_name(matrix, list(adata.layers))
    alternatives = [
        *(["X"] if adata.X is not None else []),
        *(["raw"] if adata.raw is not None else []),
        *(f"layers/{k}" for k in adata.layers),
    ]
    if matrix == "X":
        if adata.X is None:  # AnnData(X=None, layers=...): scipy's "does not support dtype object" before
            raise InputError(
                f"{name}: the AnnData has no X (it is None); its matrices: {', '.join(alternatives) or 'none'} "
                "(set matrix=, the CLI's --matrix, to the one with the counts)"
            )
        values, var = adata.X, adata.var
    elif matrix == "raw":
        if adata.raw is None:
            raise InputError(f"{name}: the AnnData has no .raw; its matrices: {', '.join(alternatives)}")
        values, var = adata.raw.X, adata.raw.var
    else:
        layer = matrix.split("/", 1)[1]
        if layer not in adata.layers:
            raise InputError(f"{name}: no layer {layer!r}; its matrices: {', '.join(alternatives)}")
        values, var = adata.layers[layer], adata.var
    return _CSRSource(
        values, name=name, path=Path(name), key=matrix, obs=adata.obs, var=var, alternatives=alternatives
    )


_OPENERS = {"h5ad": open_h5ad, "10x_h5": open_10x_h5, "10x_mtx": open_10x_mtx, "loom": open_loom}


def open_matrix(
    path: str | os.PathLike, fmt: str = "auto", matrix: str = "X", name: str | None = None
) -> MatrixSource:
    """Open an expression matrix for block reading (see the module docstring for the formats)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise missing_input(path)
    if path.is_file() and path.stat().st_size == 0:
        raise InputError(f"input file {path} is empty")
    fmt = guess_format(path) if fmt == "auto" else fmt
    if fmt not in _OPENERS:
        raise InputError(f"unknown format {fmt!r} for {path}; known: {', '.join(FORMATS)}")
    source = _OPENERS[fmt](path, matrix, name)
    source.obs.index = source.obs.index.astype(str)
    source.var.index = source.var.index.astype(str)
    repeated = source.obs.index[source.obs.index.duplicated()].unique()
    if len(repeated):
        shown = ", ".join(repeated[:5]) + (f" and {len(repeated) - 5} more" if len(repeated) > 5 else "")
        log.warning(
            "%s: duplicate cell ids (%d): %s; every cell is kept, but their ids in the store are not unique",
            source.where,
            len(repeated),
            shown,
        )
    return source
