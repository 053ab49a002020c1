"""A cells x genes CSR matrix built on disk from entries read in any order, then read back in row blocks.

Two inputs cannot be served a block of cells at a time as they are stored: Matrix Market text (not
row-addressable; entries in any order) and CSC h5ad (a cell's values are scattered over every column).
Each is converted once, when it is opened, into `data` and `indices` files in a temporary directory
plus `indptr` in memory (8 bytes per cell); blocks are then slices read from those files. Memory stays at a
chunk of entries, whatever the matrix's size; disk holds about 8 bytes per stored value (12 while
unordered entries are bucketed).

    writer = RowWriter(directory, n_cols, dtype)      # rows arrive in order: append CSR pieces
    spill = EntrySpill(directory, n_rows, n_cols, dtype, expected, combine)   # any order
    spill.add(rows, cols, values); ...; matrix = spill.finish()
    matrix.rows(start, stop)                          # a CSR block, read from the files

Every piece is made canonical by the caller's `combine` (so that the blocks equal what the whole
matrix, read at once and converted the reader's usual way, would give).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from biomask.errors import EnvironmentIOError, describe_os_error, is_environment_error

# Entries per bucket of unordered input: a bucket is sorted in memory (about 40 bytes an entry with
# scipy's temporaries), so this bounds the conversion's memory at a few hundred MB.
BUCKET_ENTRIES = 4_000_000

Combine = Callable[[np.ndarray, np.ndarray, np.ndarray, int], sp.csr_matrix]


def index_dtype(limit: int) -> np.dtype:
    return np.dtype(np.int32) if limit < 2**31 else np.dtype(np.int64)


class ScratchDir:
    """A temporary directory removed on `cleanup()`, when garbage-collected, or at interpreter exit:
    a source that is never closed (or a run that fails half-way) leaves nothing behind.

    A process killed outright (SIGKILL, the kernel's OOM killer: most likely during a big conversion)
    runs none of these, so the next ScratchDir of the same prefix removes such folders of this host
    and user: those whose process id names no live process and whose flock, held for the folder's
    life, can be taken — the lock alone tells a live process in another PID namespace (a container
    sharing /tmp and the host name) from a dead one."""

    def __init__(self, prefix: str) -> None:
        where = Path(tempfile.gettempdir())
        host = _host()
        sweep_orphans(where, prefix, host)
        try:
            self.path = Path(tempfile.mkdtemp(prefix=f"{prefix}{host}-{os.getpid()}-", dir=where))
        except OSError as exc:
            raise scratch_error(exc, where) from None
        self._held = _lock_folder(self.path)
        self._finalizer = weakref.finalize(self, _remove_held, str(self.path), self._held)

    def cleanup(self) -> None:
        self._finalizer()


def _lock_folder(path: Path) -> int | None:
    """A descriptor holding an exclusive flock on `path` (None: held elsewhere, or no flock here)."""
    from biomask.outputs import lock_folder

    return lock_folder(path)[0]


def _remove_held(path: str, fd: int | None) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


def _host() -> str:
    """This host's name as a file-name piece (a '-' inside it is fine: the pid is read from the right)."""
    return "".join(c if c.isalnum() or c in "._" else "_" for c in socket.gethostname()) or "host"


def sweep_orphans(where: Path, prefix: str, host: str) -> list[Path]:
    """Remove `where`'s folders `{prefix}{host}-{pid}-XXXXXXXX` owned by this user whose process is
    gone (no such pid here, and the folder's flock free); return them. Another host's (a shared
    TMPDIR), a running process's and anything not named that way (not biomask's) are left alone."""
    removed = []
    try:
        entries = list(where.glob(f"{glob.escape(prefix + host)}-*-*"))
    except OSError:
        return removed
    for folder in entries:
        pid_text = folder.name[len(prefix + host) + 1 :].rsplit("-", 1)[0]
        if not pid_text.isdigit() or int(pid_text) == os.getpid():
            continue
        try:
            if not folder.is_dir() or folder.is_symlink() or folder.stat().st_uid != os.getuid():
                continue
            os.kill(int(pid_text), 0)
            continue  # a live process of that id here
        except ProcessLookupError:
            pass
        except (OSError, OverflowError):  # alive under another user (EPERM), or unreadable: leave it
            continue
        held = _lock_folder(folder)
        if held is None:  # locked: its process lives, in another PID namespace
            continue
        try:
            shutil.rmtree(folder, ignore_errors=True)
        finally:
            os.close(held)
        removed.append(folder)
    return removed


def scratch_error(exc: OSError, where: Path) -> Exception:
    """A full or read-only temporary directory, said with the way out (TMPDIR)."""
    if not is_environment_error(exc):
        return exc
    return EnvironmentIOError(
        f"{describe_os_error(exc, str(where))}. The matrix is converted to a temporary copy there "
        "(about 8 bytes per stored value); set TMPDIR to a directory on a larger disk"
    )


class DiskCSR:
    """A finished CSR matrix: data and indices read from their files by offset, indptr in memory.

    Read with pread, not memory-mapped: pages of a long-lived map stay in the process's resident set
    after a pass over the matrix, so its RSS would grow to the matrix's size."""

    def __init__(self, directory: Path, shape: tuple[int, int], indptr: np.ndarray, dtype: np.dtype) -> None:
        self.shape = shape
        self.indptr = indptr
        self.dtype = np.dtype(dtype)
        self.index = index_dtype(shape[1])
        self.nnz = int(indptr[-1])
        self._data = os.open(directory / "data.bin", os.O_RDONLY)
        self._indices = os.open(directory / "indices.bin", os.O_RDONLY)
        # closed with the object too, for a source nobody closes
        self._closer = weakref.finalize(self, _close_all, (self._data, self._indices))

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        lo, hi = int(self.indptr[start]), int(self.indptr[stop])
        return sp.csr_matrix(
            (_pread(self._data, self.dtype, lo, hi), _pread(self._indices, self.index, lo, hi),
             self.indptr[start : stop + 1] - lo),
            shape=(stop - start, self.shape[1]),
        )  # fmt: skip

    def close(self) -> None:
        self._closer()


def _close_all(fds: tuple[int, ...]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _pread(fd: int, dtype: np.dtype, lo: int, hi: int) -> np.ndarray:
    """Elements lo..hi-1 of a file of `dtype` values, read straight into a new array."""
    out = np.empty(hi - lo, dtype=dtype)
    view = memoryview(out).cast("B")
    done, offset = 0, lo * dtype.itemsize
    while done < view.nbytes:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise OSError(
                f"{view.nbytes - done} bytes missing from a temporary matrix file (was it removed?)"
            )
        done += got
    return out


class RowWriter:
    """Appends CSR pieces of consecutive rows to data.bin / indices.bin."""

    def __init__(self, directory: Path, n_cols: int, dtype: np.dtype) -> None:
        self.directory, self.n_cols, self.dtype = directory, n_cols, np.dtype(dtype)
        self.index = index_dtype(n_cols)
        self._data = open(directory / "data.bin", "wb")
        self._indices = open(directory / "indices.bin", "wb")
        self._indptr = [np.zeros(1, dtype=np.int64)]
        self.n_rows = 0
        self.nnz = 0

    def append(self, piece: sp.csr_matrix) -> None:
        if piece.shape[0] == 0:
            return
        piece.data.astype(self.dtype, copy=False).tofile(self._data)
        piece.indices.astype(self.index, copy=False).tofile(self._indices)
        self._indptr.append(piece.indptr[1:].astype(np.int64) + self.nnz)
        self.nnz += int(piece.indptr[-1])
        self.n_rows += piece.shape[0]

    def finish(self) -> DiskCSR:
        self.abandon()
        indptr = np.concatenate(self._indptr)
        return DiskCSR(self.directory, (self.n_rows, self.n_cols), indptr, self.dtype)

    def abandon(self) -> None:
        self._data.close()
        self._indices.close()


class EntrySpill:
    """Entries (row, column, value) in any order, bucketed by ranges of rows into files; `finish()`
    turns each bucket, in row order, into a CSR piece with `combine` and writes it with a RowWriter.

    `combine(rows, cols, values, n_rows)` gets a bucket's entries (rows relative to the bucket) in the
    order they were added, and returns its canonical CSR piece."""

    def __init__(
        self, directory: Path, n_rows: int, n_cols: int, dtype: np.dtype, expected: int, combine: Combine
    ) -> None:
        self.directory, self.n_rows, self.n_cols, self.dtype = directory, n_rows, n_cols, np.dtype(dtype)
        self.combine = combine
        n_buckets = max(1, min(n_rows, -(-expected // BUCKET_ENTRIES)))
        self.bucket_rows = max(1, -(-n_rows // n_buckets))
        self.n_buckets = max(1, -(-n_rows // self.bucket_rows))
        self.record = np.dtype(
            [("row", index_dtype(n_rows)), ("col", index_dtype(n_cols)), ("value", self.dtype)]
        )

    def _bucket(self, k: int) -> Path:
        return self.directory / f"bucket-{k:06d}.bin"

    def add(self, rows: np.ndarray, cols: np.ndarray, values: np.ndarray) -> None:
        if rows.size == 0:
            return
        records = np.empty(rows.size, dtype=self.record)
        bucket = rows // self.bucket_rows
        if self.n_buckets > 1:
            # stable: a bucket keeps the entries in the order they came (duplicates are summed or
            # ordered the way the whole-matrix conversion would)
            order = np.argsort(bucket, kind="stable")
            bucket = bucket[order]
            rows, cols, values = rows[order], cols[order], values[order]
        records["row"], records["col"], records["value"] = rows, cols, values
        edges = np.searchsorted(bucket, np.arange(self.n_buckets + 1))
        for k in np.flatnonzero(np.diff(edges)):
            with open(self._bucket(int(k)), "ab") as handle:
                records[edges[k] : edges[k + 1]].tofile(handle)

    def finish(self) -> DiskCSR:
        writer = RowWriter(self.directory, self.n_cols, self.dtype)
        try:
            for k in range(self.n_buckets):
                lo = k * self.bucket_rows
                n = min(self.bucket_rows, self.n_rows - lo)
                path = self._bucket(k)
                if path.exists():
                    records = np.fromfile(path, dtype=self.record)
                    path.unlink()  # the disk holds the spill or the result, never both whole
                else:
                    records = np.empty(0, dtype=self.record)
                rows = records["row"].astype(np.int64) - lo
                writer.append(self.combine(rows, records["col"], records["value"], n))
        except BaseException:
            writer.abandon()
            raise
        return writer.finish()


def stable_by_row(
    rows: np.ndarray, cols: np.ndarray, values: np.ndarray, n_rows: int, n_cols: int
) -> sp.csr_matrix:
    """CSR of entries grouped by row, each row's entries in the order given (no sorting, no summing):
    what scipy's csc -> csr conversion gives when the entries come column by column."""
    order = np.argsort(rows, kind="stable")
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n_rows), out=indptr[1:])
    return sp.csr_matrix((values[order], cols[order], indptr), shape=(n_rows, n_cols))
