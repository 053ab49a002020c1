"""Reading DNA inputs: FASTA / FASTA.gz genomes (streamed block by block), GenBank genomes (Biopython),
labelled CSV/TSV tables, KEEL files.

Readers check the shape of their input and raise `InputError` naming the file and the record or line
(an empty file, text that is not FASTA, a record without sequence, a missing column). Letters are
checked later, by the cleaning policy.
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import gzip
import io
import logging
import lzma
import os
import re
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from Bio import BiopythonParserWarning, SeqIO
from Bio.Seq import UndefinedSequenceError

from biomask.errors import InputError, missing_input

log = logging.getLogger(__name__)

_GZIP_MAGIC = b"\x1f\x8b"
_BZIP2_MAGIC = b"BZh"
_XZ_MAGIC = b"\xfd7zXZ\x00"
# compressions Python's standard library cannot stream: named, with what to do, rather than read as text
_UNREADABLE = {
    b"\x28\xb5\x2f\xfd": ("zstd-compressed", "`zstd -d` it"),
    b"PK\x03\x04": (
        "a zip archive (an .xlsx workbook is one too)",
        "unzip it and give the file inside, or export a workbook from the spreadsheet as CSV",
    ),
    b"\x04\x22\x4d\x18": ("lz4-compressed", "`lz4 -d` it"),
}


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


def open_binary(path: str | os.PathLike, on_read: Callable[[int], None] | None = None) -> IO[bytes]:
    """Open a file for reading bytes, decompressing gzip, bzip2 or xz by the file's first bytes.
    `on_read` is called with the number of (compressed) bytes read, to drive a progress bar."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"input {path} is a directory; name a file (FASTA, GenBank, CSV/TSV or KEEL)")
    try:
        raw = open(path, "rb")
    except FileNotFoundError:
        raise missing_input(path, "input file") from None
    except OSError as exc:
        raise InputError(f"cannot read input file {path}: {exc.strerror}") from None
    head = raw.read(6)
    raw.seek(0)
    for magic, (what, fix) in _UNREADABLE.items():
        if head.startswith(magic):
            raw.close()
            raise InputError(
                f"{path} is {what}; biomask reads plain, gzip, bzip2 and xz files: {fix} (or recompress "
                "it with gzip)"
            )
    stream: IO[bytes] = io.BufferedReader(_CountingReader(raw, on_read), 1 << 20)
    if head.startswith(_GZIP_MAGIC):
        stream = gzip.GzipFile(fileobj=stream, mode="rb")  # type: ignore[assignment]
    elif head.startswith(_BZIP2_MAGIC):
        stream = bz2.BZ2File(stream, mode="rb")  # type: ignore[assignment]
    elif head.startswith(_XZ_MAGIC):
        stream = lzma.LZMAFile(stream, mode="rb")  # type: ignore[assignment]
    return stream


def open_text(path: str | os.PathLike, errors: str = "replace") -> IO[str]:
    """Open a text file (gzip or plain) for reading; a UTF-8 byte-order mark (spreadsheet exports) is
    skipped, undecodable bytes become U+FFFD (`errors="surrogateescape"`: lone surrogates, which a
    valid UTF-8 file never holds, so `undecodable` tells them from a U+FFFD the file itself holds)."""
    return io.TextIOWrapper(open_binary(path), encoding="utf-8-sig", errors=errors, newline=None)


_ESCAPED = re.compile("[\udc80-\udcff]")  # the lone surrogates surrogateescape gives undecodable bytes


def undecodable(text: str) -> bool:
    """Whether text read with `errors="surrogateescape"` held bytes that are not UTF-8. Checked on every
    field of a table: a sequence is ASCII (a C-speed answer), and a character loop in Python made the
    500,000-row table benchmark 35 % slower (13.4 s to 18 s)."""
    return not text.isascii() and _ESCAPED.search(text) is not None


def shown(text: str) -> str:
    """Text read with surrogateescape as a message shows it: its undecodable bytes as U+FFFD."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


@contextlib.contextmanager
def decompression_errors(path: Path) -> Iterator[None]:
    """Turn a corrupt or truncated compressed stream into an InputError naming the file."""
    try:
        yield
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
        raise InputError(f"{path}: corrupt or truncated {_compression(path)} file ({exc})") from None


def _compression(path: Path) -> str:
    """gzip, bzip2 or xz by a file's first bytes (what a decompression error names)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(6)
    except OSError:
        return "compressed"
    for magic, name in ((_GZIP_MAGIC, "gzip"), (_BZIP2_MAGIC, "bzip2"), (_XZ_MAGIC, "xz")):
        if head.startswith(magic):
            return name
    return "compressed"


_WHITESPACE = b" \t\r\n\v\f"
_READ_CHUNK = 1 << 22


def read_fasta_blocks(
    path: str | os.PathLike, block_size: int, on_read: Callable[[int], None] | None = None
) -> Iterator[tuple[str, int, bytes]]:
    """Yield (record id, block start, bases) for consecutive blocks of `block_size` bases of every
    record of a FASTA or FASTA.gz file (the last block of a record may be shorter).

    Biopython's parsers (whose reading of the format we follow: '>' header lines, sequence lines
    joined, whitespace ignored) return whole records, and one chromosome can be 250 Mb; reading
    4 MiB chunks and emitting blocks keeps memory bounded by the block size whatever the record or
    corpus size, and strips line breaks at C speed.
    """
    path = Path(path)
    state = _FastaState(path, block_size)
    with open_binary(path, on_read) as handle, decompression_errors(path):
        head = b""
        while not head.strip():
            chunk = handle.read(_READ_CHUNK)
            if not chunk:
                raise InputError(
                    f"{path} is empty: expected FASTA records ('>name' lines followed by sequence)"
                )
            head += chunk
        text = head.lstrip()
        if text.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark (Notepad's): not part of the text
            text = text[3:].lstrip()
        if not text.startswith(b">"):
            shown = text.split(b"\n", 1)[0][:60].decode("ascii", errors="replace")
            raise InputError(
                f"{path} is not FASTA: its first line is {shown!r}, a FASTA file starts with '>'"
                + _encoding_hint(text)
            )
        carry, midline = b"", False
        while text:
            if midline:  # the rest of a sequence line begun in an earlier chunk: bases, even a '>'
                end = text.find(b"\n") + 1 or len(text)
                yield from state.feed_bases(text[:end])
                text, midline = text[end:], text[end - 1 : end] != b"\n"
            data = carry + text
            cut = data.rfind(b"\n") + 1
            carry, data = data[cut:], data[:cut]  # keep a partial last line: it may be a header
            yield from state.feed(data)
            if carry and not carry.startswith(b">"):
                # a sequence line longer than a chunk (a chromosome written unwrapped, on one line):
                # kept whole, it would sit in memory, copied at every chunk
                yield from state.feed_bases(carry)
                carry, midline = b"", True
            text = handle.read(_READ_CHUNK)
        yield from state.feed(carry + b"\n")
        yield from state.finish()


_CR_ONLY = (
    " (its lines end in CR alone, as classic Mac OS wrote them: convert them to LF, e.g. tr '\\r' '\\n')"
)


def _encoding_hint(text: bytes) -> str:
    """Why a file that is no FASTA may still be one, where its bytes say so."""
    if text[:2] in (b"\xff\xfe", b"\xfe\xff") or (len(text) > 3 and text[1:4:2] == b"\x00\x00"):
        return " (it is UTF-16 text, as Windows PowerShell's '>' writes it: save it as UTF-8 or ASCII)"
    if b"\r" in text[:4096] and b"\n" not in text[:4096]:
        return _CR_ONLY
    return ""


class _FastaState:
    """Line-aligned FASTA text in, blocks of bases out (see `read_fasta_blocks`)."""

    def __init__(self, path: Path, block_size: int) -> None:
        self.path, self.block_size = path, block_size
        self.count, self.name, self.start = 0, "", 0
        self.pending = bytearray()
        self.cr_inside = False  # the current header holds a CR: lines ending in CR alone
        self.said_encoding = False

    def feed(self, data: bytes) -> Iterator[tuple[str, int, bytes]]:
        pos = 0
        while pos < len(data):
            if data.startswith(b">", pos):
                end = data.find(b"\n", pos)
                yield from self.finish()
                self.count += 1
                # UTF-8, as files are written now: two non-ASCII names stay two names
                raw = data[pos + 1 : end]
                try:
                    title, odd = raw.decode("utf-8").strip(), False
                except UnicodeDecodeError:
                    title, odd = raw.decode("utf-8", errors="replace").strip(), True
                self.name = title.split(None, 1)[0] if title else f"record{self.count}"
                if odd and "\ufffd" in self.name and not self.said_encoding:
                    self.said_encoding = True
                    log.warning(
                        "%s: record %d's name %r holds bytes that are not UTF-8 (shown as U+FFFD); names "
                        "differing there read as one. %s",
                        self.path,
                        self.count,
                        self.name,
                        NOT_UTF8,
                    )
                self.cr_inside = "\r" in title  # the whole file read as one header line
                self.start = 0
                pos = end + 1
                continue
            header = data.find(b"\n>", pos)
            stop = header + 1 if header >= 0 else len(data)
            yield from self.feed_bases(data[pos:stop])
            pos = stop

    def feed_bases(self, data: bytes) -> Iterator[tuple[str, int, bytes]]:
        """Sequence text of the current record (line breaks and spaces are dropped), no header in it."""
        self.pending += data.translate(None, _WHITESPACE)
        while len(self.pending) >= self.block_size:
            yield self.name, self.start, bytes(self.pending[: self.block_size])
            del self.pending[: self.block_size]
            self.start += self.block_size

    def finish(self) -> Iterator[tuple[str, int, bytes]]:
        """Close the current record: emit its last block, or complain if it had no bases."""
        if self.count == 0:
            return
        if self.start == 0 and not self.pending:
            hint = _CR_ONLY if self.cr_inside else ""
            raise InputError(f"{self.path}: record {self.count} ('{self.name}') has no sequence{hint}")
        if self.pending:
            yield self.name, self.start, bytes(self.pending)
            self.start += len(self.pending)
            self.pending.clear()


def read_genbank_blocks(path: str | os.PathLike, block_size: int) -> Iterator[tuple[str, int, bytes]]:
    """The same blocks as `read_fasta_blocks`, from an annotated GenBank file (read with Biopython).

    GenBank files hold whole annotated genomes (prokaryotes: a few Mb per record), so each record
    is read whole by Biopython, then cut into blocks.
    """
    path = Path(path)
    count = 0
    with open_text(path) as handle, decompression_errors(path):
        head = handle.read(1 << 12)
    if not head.lstrip().startswith("LOCUS"):
        raise InputError(f"{path} is not GenBank: a GenBank file starts with a LOCUS line")
    with open_text(path) as handle, decompression_errors(path):
        records = SeqIO.parse(handle, "genbank")
        while True:
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", BiopythonParserWarning)
                    record = next(records, None)
            except ValueError as exc:
                raise InputError(f"{path}: malformed GenBank record after record {count}: {exc}") from None
            if record is None:
                break
            count += 1
            _check_genbank_warnings(path, count, record.id, caught)
            try:
                bases = bytes(record.seq)
            except UndefinedSequenceError:
                raise InputError(f"{path}: record {count} ('{record.id}') has no sequence") from None
            if not bases:
                raise InputError(f"{path}: record {count} ('{record.id}') has no sequence")
            for start in range(0, len(bases), block_size):
                yield record.id, start, bases[start : start + block_size]
    if count == 0:
        raise InputError(f"{path} holds no GenBank records")


# Biopython's warnings that mean bases are missing: a truncated or cut file, never to be used silently.
_GENBANK_FATAL = ("Premature end of file", "Expected sequence length")


def _check_genbank_warnings(path: Path, count: int, record_id: str, caught: list) -> None:
    """A truncated record is an error naming the file and record; other parser notes are logged."""
    for item in caught:
        text = str(item.message)
        if any(key in text for key in _GENBANK_FATAL):
            raise InputError(
                f"{path}: record {count} ('{record_id}') is truncated ({text.rstrip('.')}); "
                "the file is cut short or damaged -- download it again"
            )
    for item in caught:
        if issubclass(item.category, BiopythonParserWarning):
            log.warning("%s: record %d ('%s'): %s", path, count, record_id, item.message)
        else:
            warnings.warn_explicit(item.message, item.category, item.filename, item.lineno)


def header_hint(
    first: str,
    delimiter: str | None = None,
    settable: bool = True,
    column: str | None = None,
    header: list[str] | None = None,
) -> str:
    """What to say when a table's header lacks `column`: a header name that differs only by spaces
    or case, a FASTA file, no header line at all, a comment line above it, or a separator the
    reader did not split on."""
    # UTF-16's zero bytes, or its byte-order mark (read as U+FFFD, or as surrogates)
    if "\x00" in first or first[:2] in ("\ufffd\ufffd", "\udcff\udcfe", "\udcfe\udcff"):
        return ". The file is UTF-16 text (Excel's 'Unicode Text', Windows PowerShell's '>'): save it as UTF-8 (Excel: 'CSV UTF-8')"
    if undecodable(first):
        return f". {NOT_UTF8}"
    for name in header or []:
        if column is not None and name != column and name.strip() == column:
            return f". The header's {name!r} has spaces around it: remove them from the header line"
        if column is not None and name.strip().lower() == column.lower() and name.strip() != column:
            return f". Column names are case-sensitive: the header has {name.strip()!r}"
    if first.lstrip().startswith(">"):
        return ". Line 1 starts with '>': the file looks like FASTA, not a table (labelled sets are read from CSV/TSV tables; a FASTA input is unlabelled, `format: fasta`)"
    if first.startswith("LOCUS "):
        return ". Line 1 starts with 'LOCUS': the file looks like GenBank, not a table (set `format: genbank` on this input)"
    fields = [f.strip().strip('"') for f in first.split(delimiter or ",")]
    if any(len(f) >= 20 and set(f.upper()) <= set("ACGTNRYSWKMBDHV") for f in fields):
        return (
            ". Line 1 holds a sequence: the table has no header line; add one (e.g. sequence,label) above it"
        )
    if first.lstrip().startswith("#"):
        return (
            ". Line 1 is read as the header and starts with '#': remove the comment lines above the header."
        )
    for other in (";", "|", "\t", ","):
        if other != delimiter and first.count(other) >= 1 and (delimiter is None or delimiter not in first):
            fix = (
                f"set `delimiter: {other!r}` on this input"
                if settable
                else "give a comma- or tab-separated table"
            )
            return f". The header looks {other!r}-separated: {fix}"
    return ""


def check_unique_columns(path: Path, header: list[str], used: list[str | None]) -> None:
    """A column the reader uses, named twice in the header: csv.DictReader silently keeps the last."""
    twice = sorted({c for c in used if c is not None and header.count(c) > 1})
    if twice:
        raise InputError(
            f"{path}: the header names column{'s' if len(twice) > 1 else ''} {', '.join(map(repr, twice))} "
            "more than once, and which one holds the data cannot be told; rename the others"
        )


def chain_first(first: str, rest: IO[str]) -> Iterator[str]:
    """The lines of `rest` after `first` (a line already read to sniff the format) was given back."""
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


NOT_UTF8 = (
    "The file is not UTF-8 (Excel's 'CSV (Comma delimited)' on Windows writes cp1252): save it as 'CSV UTF-8', "
    "or convert it, e.g. iconv -f cp1252 -t utf-8 IN > OUT"
)


def check_decoded(path: Path, line: int, column: str, value: str) -> None:
    """A field holding bytes that are not UTF-8 (the file read with surrogateescape): a label would be
    stored garbled, and two labels differing in one accented letter would become one class."""
    if undecodable(value):
        raise InputError(
            f"{path}, line {line}: column {column!r} holds {shown(value)!r}, bytes that are not UTF-8. {NOT_UTF8}"
        )


# How tables written by R (write.csv) and pandas (to_csv) spell a missing value.
MISSING_LABELS = frozenset({"NA", "N/A", "NaN", "nan", "<NA>"})


def check_row(path: Path, line: int, row: dict, header: list[str], delimiter: str) -> None:
    """A csv.DictReader row with as many fields as the header (prep's tables and embed's alike)."""
    if None in row:  # DictReader files the fields beyond the header under the key None
        raise InputError(
            f"{path}, line {line}: {len(header) + len(row[None])} fields, the header has "
            f"{len(header)}; a field holds an unquoted {delimiter!r}, or the row is damaged"
        )
    missing = [c for c in header if row.get(c) is None]  # DictReader: None for a short row
    if missing:
        n = len(header) - len(missing)
        raise InputError(
            f"{path}, line {line}: {n} field{'s' * (n != 1)}, the header has {len(header)} "
            f"(no {', '.join(repr(c) for c in missing[:3])}); the row is cut short or damaged"
        )


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
    with open_text(path, errors="surrogateescape") as handle, decompression_errors(path):
        first = handle.readline()
        if not first.strip():
            raise InputError(f"{path} is empty: expected a table with a header row")
        if delimiter is None:
            delimiter = "\t" if first.count("\t") > first.count(",") else ","
        reader = csv.DictReader(chain_first(first, handle), delimiter=delimiter)
        header = reader.fieldnames or []
        wanted = [("sequence", sequence_column), ("label", label_column)]
        wanted += [("split", split_column)] if split_column else []
        wanted += [("id", id_column)] if id_column else []
        for role, column in wanted:
            if column not in header:
                raise InputError(
                    f"{path}: no {role} column {column!r} in the header (columns: {shown(', '.join(header))}); "
                    f"set `{role}_column` on this input (inputs[].{role}_column) in the config"
                    + header_hint(first, delimiter, column=column, header=header)
                )
        check_unique_columns(path, header, [column for _, column in wanted])
        rows = 0
        spaced: dict[str, tuple[str, int]] = {}  # a label written with spaces around it: first spelling, line
        plain: set[str] = set()
        for row in reader:
            line = reader.line_num  # the physical line (blank lines and quoted line breaks counted)
            rows += 1
            check_row(path, line, row, header, delimiter)
            sequence = (row.get(sequence_column) or "").strip()
            raw_label = row.get(label_column) or ""
            label = raw_label.strip()
            if label != raw_label:
                spaced.setdefault(label, (raw_label, line))
            else:
                plain.add(label)
            if not sequence:
                raise InputError(f"{path}, line {line}: empty sequence in column {sequence_column!r}")
            if not label:
                raise InputError(f"{path}, line {line}: empty label in column {label_column!r}")
            if label in MISSING_LABELS:  # not a class: a table of R's or pandas' with the label missing
                raise InputError(
                    f"{path}, line {line}: label {label!r} in column {label_column!r} is how R and pandas "
                    "write a missing value; give the row its label or leave the row out"
                )
            split = (row.get(split_column) or "").strip() if split_column else None
            record_id = (row.get(id_column) or "").strip() if id_column else f"{path.name}:{line}"
            for column, value in (
                (sequence_column, sequence),
                (label_column, label),
                (split_column, split),
                (id_column, record_id),
            ):
                if column and value:
                    check_decoded(path, line, column, value)
            yield LabelledSequence(record_id, sequence, label, split or None, str(path), line)
        if rows == 0:
            raise InputError(f"{path} has a header but no rows")
        merged = [(label, *spaced[label]) for label in spaced if label in plain]
        if merged:  # what prep cells warns of too; here the spaces are dropped, so the two are one class
            log.warning(
                "%s: label(s) written both with and without spaces around them were read as one class "
                "(spaces around a label are dropped): %s",
                path,
                "; ".join(f"{raw!r} (line {line}) as {label!r}" for label, raw, line in merged[:5]),
            )


def read_keel(path: str | os.PathLike) -> Iterator[LabelledSequence]:
    """Yield the rows of a KEEL data file: `@` header lines, then comma-separated bases with the label last."""
    path = Path(path)
    rows = 0
    with open_text(path) as handle, decompression_errors(path):
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
