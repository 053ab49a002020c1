"""Reading DNA inputs: FASTA / FASTA.gz genomes (Biopython), labelled CSV/TSV tables, KEEL files.

Readers check the shape of their input and raise `InputError` naming the file and the record or line
(an empty file, text that is not FASTA, a record without sequence, a missing column). Letters are
checked later, by the cleaning policy.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import os
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from Bio.SeqIO.FastaIO import SimpleFastaParser

from biomask.errors import InputError

_GZIP_MAGIC = b"\x1f\x8b"


class _CountingReader(io.RawIOBase):
    """Wraps a binary file and counts the bytes read, to drive a progress bar over compressed input."""

    def __init__(self, raw: IO[bytes], on_read: Callable[[int], None] | None) -> None:
        self._raw, self._on_read = raw, on_read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        n = self._raw.readinto(buffer)
        if self._on_read and n:
            self._on_read(n)
        return n or 0

    def close(self) -> None:
        self._raw.close()
        super().close()


def open_text(path: str | os.PathLike, on_read: Callable[[int], None] | None = None) -> IO[str]:
    """Open a text file, decompressing gzip when the file starts with the gzip magic bytes."""
    path = Path(path)
    try:
        raw = open(path, "rb")
    except FileNotFoundError:
        raise InputError(f"input file {path} does not exist") from None
    except OSError as exc:
        raise InputError(f"cannot read input file {path}: {exc.strerror}") from None
    head = raw.read(2)
    raw.seek(0)
    stream: IO[bytes] = io.BufferedReader(_CountingReader(raw, on_read), 1 << 20)
    if head == _GZIP_MAGIC:
        stream = gzip.GzipFile(fileobj=stream, mode="rb")  # type: ignore[assignment]
    return io.TextIOWrapper(stream, encoding="ascii", errors="replace", newline=None)


@contextlib.contextmanager
def _decompression_errors(path: Path) -> Iterator[None]:
    """Turn a corrupt or truncated gzip stream into an InputError naming the file."""
    try:
        yield
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(f"{path}: corrupt or truncated gzip file ({exc})") from None


def read_fasta(
    path: str | os.PathLike, on_read: Callable[[int], None] | None = None
) -> Iterator[tuple[str, str]]:
    """Yield (record id, sequence) of a FASTA or FASTA.gz file, one record at a time."""
    path = Path(path)
    count = 0
    with open_text(path, on_read) as handle, _decompression_errors(path):
        first = ""
        for line in handle:
            if line.strip():
                first = line
                break
        if not first:
            raise InputError(f"{path} is empty: expected FASTA records ('>name' lines followed by sequence)")
        if not first.startswith(">"):
            shown = first.strip()[:60]
            raise InputError(
                f"{path} is not FASTA: its first line is {shown!r}, a FASTA file starts with '>'"
            )
        # Hand Biopython the header line we consumed, then the rest of the stream.
        for title, seq in SimpleFastaParser(_chain(first, handle)):
            count += 1
            name = title.split(None, 1)[0] if title.strip() else f"record{count}"
            if not seq:
                raise InputError(f"{path}: record {count} ('{name}') has no sequence")
            yield name, seq
    if count == 0:
        raise InputError(f"{path} holds no FASTA records")


def _chain(first: str, rest: IO[str]) -> Iterator[str]:
    yield first
    yield from rest


@dataclass
class LabelledSequence:
    """One row of a labelled table: where it came from, its sequence, label and optional split."""

    id: str
    sequence: str
    label: str
    split: str | None
    source: str
    line: int


def read_table(
    path: str | os.PathLike,
    *,
    sequence_column: str,
    label_column: str,
    split_column: str | None = None,
    id_column: str | None = None,
    delimiter: str | None = None,
) -> Iterator[LabelledSequence]:
    """Yield the rows of a CSV/TSV (optionally gzipped) with sequence, label and optional split/id columns."""
    path = Path(path)
    with open_text(path) as handle, _decompression_errors(path):
        first = handle.readline()
        if not first.strip():
            raise InputError(f"{path} is empty: expected a table with a header row")
        if delimiter is None:
            delimiter = "\t" if first.count("\t") > first.count(",") else ","
        reader = csv.DictReader(_chain(first, handle), delimiter=delimiter)
        header = reader.fieldnames or []
        wanted = [("sequence", sequence_column), ("label", label_column)]
        wanted += [("split", split_column)] if split_column else []
        wanted += [("id", id_column)] if id_column else []
        for role, column in wanted:
            if column not in header:
                raise InputError(
                    f"{path}: no {role} column {column!r} in the header (columns: {', '.join(header)}); "
                    f"set input.{role}_column in the config"
                )
        rows = 0
        for line, row in enumerate(reader, start=2):
            rows += 1
            sequence = (row.get(sequence_column) or "").strip()
            label = (row.get(label_column) or "").strip()
            if not sequence:
                raise InputError(f"{path}, line {line}: empty sequence in column {sequence_column!r}")
            if not label:
                raise InputError(f"{path}, line {line}: empty label in column {label_column!r}")
            split = (row.get(split_column) or "").strip() if split_column else None
            record_id = (row.get(id_column) or "").strip() if id_column else f"{path.name}:{line}"
            yield LabelledSequence(record_id, sequence, label, split or None, str(path), line)
        if rows == 0:
            raise InputError(f"{path} has a header but no rows")


def read_keel(path: str | os.PathLike) -> Iterator[LabelledSequence]:
    """Yield the rows of a KEEL data file: `@` header lines, then comma-separated bases with the label last."""
    path = Path(path)
    rows = 0
    with open_text(path) as handle, _decompression_errors(path):
        for line_no, line in enumerate(handle, start=1):
            text = line.strip()
            if not text or text.startswith("@") or text.startswith("%"):
                continue
            fields = [f.strip() for f in text.split(",")]
            if len(fields) < 2:
                raise InputError(
                    f"{path}, line {line_no}: expected comma-separated bases and a label, got {text[:60]!r}"
                )
            rows += 1
            yield LabelledSequence(
                f"{path.name}:{line_no}", "".join(fields[:-1]), fields[-1], None, str(path), line_no
            )
    if rows == 0:
        raise InputError(f"{path} holds no data rows")
