"""Matrix Market coordinate text (a 10x `matrix.mtx[.gz]`, genes x barcodes) read in chunks of lines.

The header is parsed here (and anything but `coordinate integer|real general` refused, naming the
file); the body is cut into blocks of whole lines, and each block is parsed by scipy's `mmread` (its
C++ parser, the one the whole-file read used) under a header written for the block: the same numbers
come out, at the same speed, with only one block in memory. A block that fails is scanned line by
line to say which line is wrong and why.

    with MtxReader(path) as mtx:         # header checked
        for rows, cols, values in mtx.entries():   # 0-based genes, barcodes; values as parsed
            ...
"""

from __future__ import annotations

import gzip
import io
import re
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from biomask.errors import InputError

BLOCK_BYTES = 16 << 20  # text parsed at a time (about a million entries)

_BLANK = re.compile(rb"(?m)^[ \t\r]*\n")
_LINE = re.compile(r"^Line (\d+):\s*(.*)$")


class MtxReader:
    """A Matrix Market coordinate file opened for chunked reading (plain or gzipped)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            raw = open(path, "rb")
        except OSError as exc:
            raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
        self._raw = raw
        self._stream = gzip.GzipFile(fileobj=raw, mode="rb") if path.name.endswith(".gz") else raw
        self.line = 0  # lines read so far
        try:
            self._read_header()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> MtxReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stream.close()
        self._raw.close()

    @property
    def position(self) -> int:
        """Bytes of the file (compressed, if it is) consumed so far, for a progress bar."""
        return self._raw.tell()

    def _readline(self) -> bytes:
        line = self._guarded(self._stream.readline)
        if line:
            self.line += 1
        return line

    def _guarded(self, read, *args):
        try:
            return read(*args)
        except (OSError, EOFError, zlib.error) as exc:  # gzip: BadGzipFile, a cut or damaged stream
            raise InputError(
                f"cannot read {self.path} after line {self.line:,} ({type(exc).__name__}: {exc}); "
                "is the file truncated or damaged?"
            ) from None

    def _fail(self, line: int, why: str) -> InputError:
        return InputError(f"{self.path} line {line:,}: {why}")

    def _read_header(self) -> None:
        first = self._readline()
        words = first.decode("utf-8", "replace").split()
        if not words or words[0].lower() != "%%matrixmarket":
            shown = first[:60].decode("utf-8", "replace").strip()
            raise self._fail(1, f"not a Matrix Market file (it begins {shown!r}, not %%MatrixMarket)")
        kind = [w.lower() for w in words[1:]]
        if len(kind) != 4 or kind[0] != "matrix":
            raise self._fail(1, f"unreadable Matrix Market header {' '.join(words)!r}")
        layout, field, symmetry = kind[1:]
        if layout != "coordinate":
            raise self._fail(
                1, f"a {layout!r} (dense) Matrix Market file; a 10x matrix is 'coordinate' (sparse)"
            )
        if field not in ("integer", "real"):
            what = "no values, only positions" if field == "pattern" else "not integer or real values"
            raise self._fail(1, f"a {field!r} matrix ({what}) cannot hold counts; expected integer or real")
        if symmetry != "general":
            raise self._fail(1, f"a {symmetry!r} matrix is not supported; a 10x matrix is 'general'")
        self.field = field
        line = self._readline()
        while line and (line.startswith(b"%") or not line.strip()):
            line = self._readline()
        try:
            n_rows, n_cols, n_entries = (int(v) for v in line.split())
            if min(n_rows, n_cols, n_entries) < 0:
                raise ValueError
        except ValueError:
            shown = line[:60].decode("utf-8", "replace").strip() if line else "the end of the file"
            raise self._fail(
                self.line, f"expected the sizes 'rows columns entries', found {shown!r}"
            ) from None
        self.n_rows, self.n_cols, self.n_entries = n_rows, n_cols, n_entries
        self.size_line = self.line  # where messages about the sizes point

    # ----------------------------------------------------------------------------------------- body

    def entries(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(rows, cols, values) of consecutive blocks of entries: 0-based int64 indices, values int64
        (integer) or float64 (real), as the whole-file mmread parses them. The count is checked
        against the header's, and every index against its sizes."""
        carry = b""
        seen = 0
        while True:
            chunk = self._guarded(self._stream.read, BLOCK_BYTES)
            if not chunk:
                block, carry = carry, b""
                if block and not block.endswith(b"\n"):
                    block += b"\n"
            else:
                end = chunk.rfind(b"\n")
                if end < 0:
                    carry += chunk
                    continue
                block, carry = carry + chunk[: end + 1], chunk[end + 1 :]
            if not block:
                break
            first = self.line + 1
            self.line += block.count(b"\n")
            rows, cols, values = self._parse(block, first, seen)
            seen += rows.size
            yield rows, cols, values
        if seen < self.n_entries:
            raise InputError(
                f"{self.path}: the header (line {self.size_line:,}) announces {self.n_entries:,} entries but "
                f"the file ends after {seen:,}, at line {self.line:,}: is it truncated?"
            )

    def _parse(self, block: bytes, first: int, seen: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        try:
            coo = self._mmread(block)
        except ValueError as exc:
            # Blank lines (which the whole-file read skipped) make the count of lines too high;
            # looking for them only after a failure keeps the common case at memchr speed.
            cleaned = _BLANK.sub(b"", block)
            try:
                if len(cleaned) == len(block):
                    raise exc
                coo = self._mmread(cleaned)
            except ValueError as failed:
                raise self._locate(block, first, failed) from None
        if seen + coo.nnz > self.n_entries:
            raise self._fail(
                self._entry_line(block, first, self.n_entries - seen),
                f"more entries than the {self.n_entries:,} the header (line {self.size_line:,}) announces",
            )
        return coo.row.astype(np.int64), coo.col.astype(np.int64), np.asarray(coo.data)

    def _mmread(self, text: bytes):
        from scipy.io import mmread

        count = text.count(b"\n")
        head = f"%%MatrixMarket matrix coordinate {self.field} general\n{self.n_rows} {self.n_cols} {count}\n"
        return mmread(io.BytesIO(head.encode() + text))

    def _entry_line(self, block: bytes, first: int, k: int) -> int:
        """The line of the block's k-th (0-based) entry, blank lines not counted."""
        for i, line in enumerate(block.split(b"\n")):
            if line.strip():
                if k == 0:
                    return first + i
                k -= 1
        return first + block.count(b"\n")

    def _locate(self, block: bytes, first: int, exc: ValueError) -> InputError:
        """Which line of a block the parser refused, and why (a Python scan: only on failure)."""
        parse = int if self.field == "integer" else float
        sizes = (("row", self.n_rows, "rows"), ("column", self.n_cols, "columns"))
        for i, line in enumerate(block.split(b"\n")):
            words = line.split()
            if not words:
                continue
            shown = line[:80].decode("utf-8", "replace").strip()
            if len(words) != 3:
                return self._fail(first + i, f"expected 'row column value', found {shown!r}")
            try:
                index = [int(w) for w in words[:2]]
                parse(words[2])
            except ValueError:
                return self._fail(first + i, f"{shown!r} is not 'row column {self.field}-value'")
            for value, (name, size, plural) in zip(index, sizes):
                if not 1 <= value <= size:
                    return self._fail(
                        first + i,
                        f"{name} index {value:,} is outside 1..{size:,} (the header's {plural}, line "
                        f"{self.size_line:,})",
                    )
        match = _LINE.match(str(exc))
        last = first + block.count(b"\n") - 1
        reason = match.group(2) if match else str(exc)
        return InputError(f"{self.path} lines {first:,}-{last:,}: cannot parse them ({reason})")
