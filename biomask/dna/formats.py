"""What a DNA file is and where a tokenizer lies, told from names alone: shared by the readers, the
tokenizers and the prep stage's reuse check, which must not import what reads the files (Biopython,
the tokenizers library) to decide that a prepared store is current."""

from __future__ import annotations

import os
from pathlib import Path

# what a compressed file's name ends with: looked through to tell the format from the name (a .zst
# or .zip is then refused by its bytes, saying what to do, rather than as a name that says nothing)
COMPRESSED_SUFFIXES = (".gz", ".bgz", ".bz2", ".xz", ".zst", ".lz4", ".zip")  # .bgz: BGZF, gzip-readable

# File formats by name (a trailing .gz is looked through): `biomask prep dna` and `biomask embed` both
# guess from this one list, so a file one of them reads by its name the other recognises too.
SUFFIXES = {
    "fasta": (".fa", ".fasta", ".fna", ".fas", ".ffn", ".seq"),
    "genbank": (".gb", ".gbk", ".gbff", ".genbank"),
    "table": (".csv", ".tsv", ".txt"),
    "keel": (".dat",),
}


def guess_format(path: str | os.PathLike) -> str | None:
    """fasta, genbank, table or keel from the file name; None when the name does not say."""
    name = Path(path).name.lower()
    name = next((name.removesuffix(c) for c in COMPRESSED_SUFFIXES if name.endswith(c)), name)
    return next((fmt for fmt, suffixes in SUFFIXES.items() if name.endswith(suffixes)), None)


def tokenizer_dir(path: str | os.PathLike) -> Path:
    """Accept a tokenizer directory, a tokenizer.json file, or a token store (its `tokenizer/`)."""
    path = Path(path)
    if path.is_file():
        return path.parent
    if (path / "tokenizer" / "tokenizer.json").is_file():
        return path / "tokenizer"
    return path
