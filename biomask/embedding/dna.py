"""DNA sequences for `biomask embed`: FASTA records (whole, or windows) or the rows of a labelled table.

Each yields chunks of (obs rows, records); records are token ids from the checkpoint's own tokenizer.
Sequences are cleaned as the pretraining corpus was (`cleaning.lowercase` from the checkpoint; N and
IUPAC codes become the N token; any other letter is an error naming file, record and position).
Token stores (already token ids, of either modality) are read by biomask.embedding.records.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from biomask.dna.cleaning import Cleaner, reverse_complement
from biomask.dna.readers import (
    chain_first,
    check_decoded,
    check_row,
    check_unique_columns,
    decompression_errors,
    header_hint,
    open_text,
    read_fasta_blocks,
    shown,
)
from biomask.dna.tokenizers import DNATokenizer, load_tokenizer
from biomask.embedding.config import DNASpec
from biomask.errors import InputError

Chunk = tuple[pd.DataFrame, list[dict[str, Any]]]
log = logging.getLogger(__name__)


def _record(tokenizer: DNATokenizer, chars: np.ndarray, both: bool = False) -> dict[str, Any]:
    """A sequence's tokens; with `both`, also its reverse complement's (`reverse`), tokenized anew
    (a k-mer or BPE split of the other strand is not the forward tokens reversed)."""
    record: dict[str, Any] = {"tokens": tokenizer.encode_windows(chars[None, :]).values}
    if both:
        record["reverse"] = {"tokens": tokenizer.encode_windows(reverse_complement(chars)[None, :]).values}
    return record


def read_fasta(
    path: Path,
    tokenizer: DNATokenizer,
    cleaner: Cleaner,
    *,
    window: int | None,
    stride: int | None,
    chunk_size: int,
    both: bool = False,
) -> Iterator[Chunk]:
    """Whole records (window None) or windows of `window` bases every `stride` (default: `window`);
    windows never cross records, a record's last partial window is kept when it is its only one."""
    rows: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = []
    step = stride or window

    def emit(name: str, start: int, chars: np.ndarray) -> None:
        rows.append(
            {
                "id": f"{name}:{start}-{start + chars.size}",
                "record": name,
                "start": start,
                "end": start + chars.size,
            }
        )
        records.append(_record(tokenizer, chars, both))

    # buffer: the record's bases from buffer_start on that a window may still need; next_start: where
    # the next window begins (a stride longer than the window skips bases, across blocks too)
    current, buffer, buffer_start, next_start, emitted = None, np.zeros(0, dtype=np.uint8), 0, 0, 0
    tails = [0, 0]  # records whose last bases no window covers, and those bases

    def flush_record() -> None:
        if current is None:
            return
        if window is None:
            if buffer.size:
                rows.append({"id": current, "record": current, "start": 0, "end": int(buffer.size)})
                records.append(_record(tokenizer, buffer, both))
        elif emitted == 0 and buffer.size:
            emit(current, 0, buffer)  # a record shorter than one window: embed it whole
        elif emitted and step is not None and window is not None:
            left = buffer_start + buffer.size - (next_start - step + window)  # after the last window
            if left > 0:
                tails[0], tails[1] = tails[0] + 1, tails[1] + left

    for name, offset, bases in read_fasta_blocks(path, block_size=max(1 << 20, window or 0)):
        if offset == 0:  # a record's first block (by name alone, two records called alike would merge)
            flush_record()
            current, buffer, buffer_start, next_start, emitted = name, np.zeros(0, dtype=np.uint8), 0, 0, 0
        chars, _ = cleaner.clean(bases, where=f"{path}, record {name}", offset=offset)
        buffer = np.concatenate([buffer, chars])
        if window is not None and step is not None:
            while True:
                skip = min(next_start - buffer_start, buffer.size)  # bases no window will read
                buffer, buffer_start = buffer[skip:], buffer_start + skip
                if buffer_start != next_start or buffer.size < window:
                    break  # the rest waits for the next block (or the record ends)
                emit(name, next_start, buffer[:window])
                emitted, next_start = emitted + 1, next_start + step
        if len(records) >= chunk_size:
            yield pd.DataFrame(rows), records
            rows, records = [], []
    flush_record()
    if current is None:
        raise InputError(f"{path} holds no FASTA records")
    if tails[0]:
        log.info(
            "%s: %d record%s in bases after the last window (%d bases in all; windows of %d every %d "
            "tile each record from its start)",
            path,
            tails[0],
            " ends" if tails[0] == 1 else "s end",
            tails[1],
            window,
            step,
        )
    if records:
        yield pd.DataFrame(rows), records


def read_sequence_table(
    path: Path,
    tokenizer: DNATokenizer,
    cleaner: Cleaner,
    *,
    sequence_column: str,
    label_column: str | None,
    id_column: str | None,
    chunk_size: int,
    both: bool = False,
    label_required: bool = False,
) -> Iterator[Chunk]:
    """Rows of a CSV/TSV: a sequence column, optionally a label and an id column. The label column
    is copied when present, unless the user named it (`label_required`): then it must be there."""
    with open_text(path, errors="surrogateescape") as handle, decompression_errors(path):
        first = handle.readline()
        if not first.strip():
            raise InputError(f"{path} is empty: expected a table with a header row")
        delimiter = "\t" if first.count("\t") > first.count(",") else ","
        reader = csv.DictReader(chain_first(first, handle), delimiter=delimiter)
        header = reader.fieldnames or []
        required = (("sequence", sequence_column), ("id", id_column))
        for role, column in required + ((("label", label_column),) if label_required else ()):
            if column is not None and column not in header:
                raise InputError(
                    f"{path}: no {role} column {column!r} in the header (columns: {shown(', '.join(header))}); "
                    f"set dna.{role}_column"
                    + header_hint(first, delimiter, settable=False, column=column, header=header)
                )
        check_unique_columns(Path(path), header, [sequence_column, id_column, label_column])
        with_labels = label_column is not None and label_column in header
        rows: list[dict[str, Any]] = []
        records: list[dict[str, Any]] = []
        n_rows = 0
        for row in reader:
            line = reader.line_num  # the physical line, as prep counts it (blank lines, quoted breaks)
            check_row(Path(path), line, row, header, delimiter)
            sequence = (row.get(sequence_column) or "").strip()
            if not sequence:
                raise InputError(f"{path}, line {line}: empty sequence in column {sequence_column!r}")
            chars, _ = cleaner.clean(sequence, where=f"{path}, line {line}")
            entry = {"id": (row.get(id_column) or "").strip() if id_column else f"{path.name}:{line}"}
            if with_labels:
                entry["label"] = (row.get(label_column) or "").strip()
            for column in filter(None, (id_column, label_column if with_labels else None)):
                check_decoded(Path(path), line, column, entry["id" if column == id_column else "label"])
            entry["line"] = line
            rows.append(entry)
            records.append(_record(tokenizer, chars, both))
            n_rows += 1
            if len(records) >= chunk_size:
                yield pd.DataFrame(rows), records
                rows, records = [], []
        if n_rows == 0:
            raise InputError(f"{path} has a header but no rows")
        if records:
            yield pd.DataFrame(rows), records


def _corpus_tokenization(model: Any) -> tuple[DNATokenizer, Cleaner]:
    """The checkpoint's tokenizer and a cleaner that treats letters as its corpus's prep did."""
    tokenizer = load_tokenizer(Path(model.checkpoint_dir) / "tokenizer")
    cleaning = (model.checkpoint_info.get("prep") or {}).get("cleaning") or {}
    # N and IUPAC codes become the N token, as in the corpus; soft-masked bases as the corpus treated them
    return tokenizer, Cleaner(lowercase=cleaning.get("lowercase", "upper"), ambiguous="n_token")


def sequence_encoder(model: Any) -> Callable[[str, str], dict[str, Any]]:
    """`encode(sequence, where)`: a record ({"tokens"}) of one sequence, tokenized and cleaned as the
    checkpoint's corpus was (`where` names the sequence in an error message)."""
    tokenizer, cleaner = _corpus_tokenization(model)

    def encode(sequence: str, where: str) -> dict[str, Any]:
        chars, _ = cleaner.clean(sequence, where=where)
        return _record(tokenizer, chars)

    return encode


def sequence_chunks(model: Any, path: Path, kind: str, spec: DNASpec, chunk_size: int) -> Iterator[Chunk]:
    """The chunks of a FASTA (`kind` fasta) or table file, tokenized and cleaned as the checkpoint's
    corpus was; `spec` is the embed config's `dna` section (windows, table columns)."""
    tokenizer, cleaner = _corpus_tokenization(model)
    if kind == "fasta":
        return read_fasta(
            path,
            tokenizer,
            cleaner,
            window=spec.window,
            stride=spec.stride,
            chunk_size=chunk_size,
            both=spec.strands == "both",
        )
    return read_sequence_table(
        path,
        tokenizer,
        cleaner,
        sequence_column=spec.sequence_column,
        label_column=spec.label_column,
        id_column=spec.id_column,
        chunk_size=chunk_size,
        both=spec.strands == "both",
        # the default "label" is copied when there; a column the user named must be there
        label_required="label_column" in spec.model_fields_set and spec.label_column is not None,
    )
