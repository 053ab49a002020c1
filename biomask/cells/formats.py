"""What an expression input is and where a gene vocabulary lies, told from names and checksums
without reading a matrix: shared by the readers, the vocabulary and the prep stage's reuse check,
which must not import what reads the files (h5py, pandas, scipy, numba) to decide that a prepared
store is current."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from biomask.errors import InputError
from biomask.provenance import sha256_file
from biomask.store import check_store_tokenizer

FORMATS = ("h5ad", "10x_h5", "10x_mtx", "loom")


_TABLE = re.compile(r"\.(csv|tsv|txt)(\.gz|\.bz2|\.xz)?$", re.IGNORECASE)


def table_hint(path: Path) -> str | None:
    """For a CSV/TSV name: how to make an .h5ad of it. No cell reader parses text tables (their
    orientation, header and index vary), and anndata reads them in one line -- which the messages for
    such a file otherwise did not say (one suggested a biomask.read_cells that cannot read it)."""
    if not _TABLE.search(path.name):
        return None
    return (
        f"a table of counts is read with anndata: adata = anndata.io.read_csv('{path}') (cells as rows; "
        "add .T when each cell is a column; delimiter='\\t' for TSV), then adata.write_h5ad('cells.h5ad'), "
        "or hand adata to biomask.fit_cells / biomask.embed in Python"
    )


def guess_format(path: Path) -> str:
    if path.is_dir():
        return "10x_mtx"
    suffix = path.name.lower()
    for ending, fmt in ((".h5ad", "h5ad"), (".loom", "loom"), (".h5", "10x_h5"), (".hdf5", "10x_h5")):
        if suffix.endswith(ending):
            return fmt
    if (hint := table_hint(path)) is not None:
        raise InputError(f"{path}: not a format biomask reads cells from ({', '.join(FORMATS)}); {hint}")
    raise InputError(
        f"cannot tell the format of {path} from its name; set `format:` to one of {', '.join(FORMATS)}"
    )


def mtx_files(directory: Path) -> list[Path]:
    names = [("matrix.mtx.gz", "matrix.mtx"), ("features.tsv.gz", "genes.tsv", "features.tsv"),
             ("barcodes.tsv.gz", "barcodes.tsv")]  # fmt: skip
    found = []
    for options in names:
        hit = next((directory / n for n in options if (directory / n).is_file()), None)
        if hit is None:
            raise InputError(f"{directory}: a 10x matrix directory needs one of {', '.join(options)}")
        found.append(hit)
    return found


def input_checksum(path: str | os.PathLike) -> str:
    """sha256 of an input file; for a 10x directory, of its three files' checksums together."""
    path = Path(path)
    try:
        if path.is_dir():
            digest = hashlib.sha256()
            for item in mtx_files(path):
                digest.update(f"{item.name}:{sha256_file(item)}\n".encode())
            return digest.hexdigest()
        return sha256_file(path)
    except OSError as exc:
        raise InputError(f"cannot read input {exc.filename or path}: {exc.strerror or exc}") from None


def vocabulary_dir(path: str | os.PathLike) -> Path:
    """Accept a vocabulary directory, its tokenizer.json, or a token store (its `tokenizer/`)."""
    path = Path(path).expanduser()
    if path.is_file():
        return path.parent
    if (path / "tokenizer" / "genes.tsv").is_file() or (
        path / "tokenizer" / "tokenizer_config.json"
    ).is_file():
        return path / "tokenizer"  # a token store (a DNA one too: `load` then says it is not a vocabulary)
    return path


def checked_vocabulary_dir(path: str | os.PathLike) -> Path:
    """`vocabulary_dir`, refused when it holds another modality's tokenizer or (in a token store)
    files that differ from those its manifest recorded."""
    directory = vocabulary_dir(path)
    check_store_tokenizer(directory)
    try:
        modality = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))[
            "biomask"
        ].get("modality")
    except (OSError, ValueError, KeyError, AttributeError):
        modality = None  # no readable config: `GeneVocabulary.load` says what is missing
    if modality not in (None, "cells"):
        raise InputError(
            f"tokenizer.path {path}: {directory} holds a {modality} tokenizer, not a gene vocabulary; give "
            "a cells token store (or its tokenizer/ directory) written by `biomask prep cells`"
        )
    return directory
