"""Contiguous slices of 1-D HDF5 datasets, read straight from the file's pages when they are stored raw.

A block of cells in a CSR (h5ad) or CSC-by-cell (10x) matrix is one slice of `data` and one of
`indices`. h5py reads such a slice chunk by chunk through HDF5's chunk cache -- one `pread` and one
copy per chunk, about 1 GB/s. When a dataset has no filters (no compression, shuffle or checksum;
anndata's default), its bytes in the file *are* the array: this reader asks HDF5 once where each chunk
lies, maps just the bytes of the requested slice and hands them to numpy -- a view when the slice
lies in consecutive chunks, otherwise the pieces joined in one copy. Each read maps only its own
range, and the mapping is released with the arrays, so memory stays bounded by one block.

Compressed, filtered, big-endian or otherwise unusual datasets fall back to h5py's own slicing.
"""

from __future__ import annotations

import mmap
import os

import h5py
import numpy as np

_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)  # populate: fault the pages in at once


class SliceReader:
    """`reader[lo:hi]` -> a numpy array of dataset elements lo..hi-1 (read-only when mapped)."""

    def __init__(self, dataset: h5py.Dataset) -> None:
        self.dataset = dataset
        self.dtype = np.dtype(dataset.dtype)
        self._fd: int | None = None
        layout = self._raw_layout(dataset)
        if layout is not None:
            self._starts, self._offsets = layout  # first element and file offset of each stored run
            self._fd = os.open(dataset.file.filename, os.O_RDONLY)

    def _raw_layout(self, dataset: h5py.Dataset) -> tuple[np.ndarray, np.ndarray] | None:
        """(first element, byte offset) of each run of consecutive stored elements, or None to use h5py."""
        if dataset.ndim != 1 or self.dtype.byteorder == ">" or self.dtype.hasobject or dataset.size == 0:
            return None
        if dataset.file.driver != "sec2" or dataset.id.get_create_plist().get_nfilters() > 0:
            return None
        offset = dataset.id.get_offset()
        if offset is not None:  # contiguous storage: one run
            return np.zeros(1, dtype=np.int64), np.array([offset], dtype=np.int64)
        if dataset.chunks is None:
            return None  # compact or external storage
        chunks: list[tuple[int, int]] = []
        dataset.id.chunk_iter(lambda info: chunks.append((info.chunk_offset[0], info.byte_offset)))
        table = np.array(sorted(chunks), dtype=np.int64).reshape(-1, 2)
        per_chunk = dataset.chunks[0]
        n_chunks = -(-dataset.size // per_chunk)
        if len(table) != n_chunks or not np.array_equal(table[:, 0], np.arange(n_chunks) * per_chunk):
            return None  # chunks never written (fill value) or an unexpected layout
        starts, offsets = table[:, 0], table[:, 1]
        # merge chunks that follow each other in the file into runs
        follows = offsets[1:] == offsets[:-1] + per_chunk * self.dtype.itemsize
        new_run = np.concatenate([[True], ~follows])
        return starts[new_run], offsets[new_run]

    def __getitem__(self, index: slice) -> np.ndarray:
        lo, hi, step = index.indices(self.dataset.size)
        if self._fd is None or step != 1:
            return self.dataset[index]
        if hi <= lo:
            return np.empty(0, dtype=self.dtype)
        first = int(np.searchsorted(self._starts, lo, side="right")) - 1
        last = int(np.searchsorted(self._starts, hi - 1, side="right")) - 1
        pieces = []
        for run in range(first, last + 1):
            start = max(lo, int(self._starts[run]))
            stop = hi if run == last else int(self._starts[run + 1])
            pieces.append(
                self._map(
                    int(self._offsets[run]) + (start - int(self._starts[run])) * self.dtype.itemsize,
                    stop - start,
                )
            )
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def _map(self, offset: int, count: int) -> np.ndarray:
        aligned = offset - offset % mmap.ALLOCATIONGRANULARITY
        length = offset - aligned + count * self.dtype.itemsize
        region = mmap.mmap(self._fd, length, flags=_MAP_FLAGS, prot=mmap.PROT_READ, offset=aligned)
        return np.frombuffer(region, dtype=self.dtype, count=count, offset=offset - aligned)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
