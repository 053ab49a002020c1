"""Genes: identifiers, duplicates, the corpus gene space, and the frozen gene vocabulary.

- `gene_names` reads a source's gene identifiers (the var index or a var column such as Ensembl
  `gene_ids`), optionally without Ensembl version suffixes.
- `GeneSpace` gives every distinct gene of the corpus an index and maps each input's columns onto it;
  several columns with one name are summed, reduced to the first, or refused (`genes.duplicates`).
- `GeneVocabulary` is the frozen token vocabulary: specials at ids 0-4, then genes. It is saved as a
  Hugging Face WordLevel `tokenizer.json` (+ `tokenizer_config.json`) and `genes.tsv` (id, gene,
  corpus non-zero median of the normalised expression -- what rank encoding divides by -- and the
  number of corpus cells expressing the gene). Later datasets reuse it through `tokenizer.path`.
- `remap_columns` moves a CSR block from one column space to another (dropping unmapped columns and
  summing columns that land on the same target), which is how blocks reach gene and token space.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from biomask.cells.formats import checked_vocabulary_dir
from biomask.cells.kernels import njit
from biomask.cells.readers import MatrixSource
from biomask.errors import InputError
from biomask.vocab import CLS_ID, NUM_SPECIAL, SPECIAL_TOKENS, tokenizer_config

log = logging.getLogger(__name__)

DUPLICATE_GENES = "gene names occur more than once"  # its warning, said once by callers that read twice
_ENSEMBL_VERSION = re.compile(r"^(ENS[A-Z]*\d{6,})\.\d+$")
# a cell barcode (10x: 16 bases, often with a -1 or sample suffix); no gene symbol is 12 bases in a row
_BARCODE = re.compile(r"[ACGTN]{12,}")
_ENSEMBL_GENE = re.compile(r"^ENS[A-Z]*G\d{6,}")
# mitochondrial genes every full transcriptome measures, as human (MT-CO1) and mouse (mt-Co1) files name them
_MITO_GENES = {
    name
    for g in ("CO1", "CO2", "CO3", "ND1", "ND2", "ND4", "ND5", "CYB", "CYTB", "ATP6")
    for name in (f"MT-{g}", f"mt-{g.capitalize()}")
}


def _sample(index: pd.Index, n: int = 1000) -> list[str]:
    """Up to `n` names spread over the index (a file's genes run in genome order)."""
    step = max(1, len(index) // n)
    return [str(v) for v in index[::step][:n]]


def transposed_why(source: MatrixSource) -> str | None:
    """Why the matrix looks stored with cells as columns (genes as obs), or None. A CSV of genes as
    rows read as it is (anndata.io.read_csv) trains and embeds without error -- every gene taken for
    a cell, every cell for a gene -- so this is the one place it can be caught."""
    var = _sample(source.var.index)
    barcodes = [v for v in var if _BARCODE.search(v)]
    if len(var) >= 20 and len(barcodes) >= 0.9 * len(var):
        return f"its genes (var names) look like cell barcodes (e.g. {', '.join(barcodes[:3])})"
    obs = source.obs.index
    mito = sorted({str(v) for v in obs[obs.isin(_MITO_GENES)]})  # hashed: fast on millions of cells
    if len(mito) >= 3:
        return f"its cells (obs names) include mitochondrial genes ({', '.join(mito[:3])})"
    sample = _sample(obs)
    ensembl = [v for v in sample if _ENSEMBL_GENE.match(v)]
    if len(sample) >= 20 and len(ensembl) >= 0.5 * len(sample):
        return f"its cells (obs names) look like Ensembl gene IDs (e.g. {', '.join(ensembl[:3])})"
    return None


def check_orientation(source: MatrixSource) -> None:
    """Refuse a matrix of genes x cells (see `transposed_why`)."""
    why = transposed_why(source)
    if why is not None:
        raise InputError(
            f"{source.where}: the matrix looks transposed, cells as columns: {why}. biomask reads cells as "
            "rows (obs) and genes as columns (var): transpose it (adata = adata.T; a CSV with a column per "
            "cell: anndata.io.read_csv(path).T) and run again"
        )


def cells_named_as_genes(source: MatrixSource, vocabulary: list[str]) -> str | None:
    """At zero overlap: a note when the cell names are the vocabulary's genes -- a genes x cells
    matrix that `transposed_why`'s signs (mitochondrial genes, barcodes) did not give away."""
    known = set(vocabulary)
    hits = [str(n) for n in source.obs.index[:100_000] if str(n) in known]
    if len(hits) < 3:
        return None
    return (
        f"its cell names include {len(hits):,} of the vocabulary's genes (e.g. {', '.join(hits[:3])}): the "
        "matrix looks transposed, cells as columns; transpose it (adata = adata.T; a CSV with a column per "
        "cell: anndata.io.read_csv(path).T) and run again"
    )


def other_case_hint(names: np.ndarray, vocabulary: list[str]) -> str | None:
    """At zero overlap: a note when the identifiers match once case is ignored. Mouse genes are
    written Cd3e, human ones CD3E, so that is a model of another species -- which no gene column or
    version suffix fixes, the only hints the zero-overlap message otherwise gives."""
    return _case_note(_case_pairs(names, vocabulary), "")


def case_only_hint(names: np.ndarray, vocabulary: list[str], exact: int) -> str | None:
    """Below min_coverage: the same note when more genes match the vocabulary only once case is
    ignored than match it as written. Mouse and human share a few symbols spelt alike (F5, the
    C1orf… genes), so zero overlap is rare between species, and the note must not wait for it."""
    known = set(vocabulary)
    others = np.array([n for n in pd.unique(names[names != ""]) if str(n) not in known], dtype=object)
    pairs = _case_pairs(others, vocabulary)
    return _case_note(pairs, f" (and {exact:,} as written)") if len(pairs) > exact else None


def _case_pairs(names: np.ndarray, vocabulary: list[str]) -> list[tuple[str, str]]:
    upper = {g.upper(): g for g in vocabulary}
    return [(str(n), upper[str(n).upper()]) for n in pd.unique(names[names != ""]) if str(n).upper() in upper]


def _case_note(pairs: list[tuple[str, str]], also: str) -> str | None:
    if not pairs:
        return None
    shown = ", ".join(f"{ours} ~ {theirs}" for ours, theirs in pairs[:3])
    return (
        f"{len(pairs):,} of its genes match the vocabulary's when case is ignored ({shown}){also}: the data and "
        "the model are likely of different species (mouse genes are written Cd3e, human ones CD3E). "
        "biomask does not map genes across species: train a model on these cells (biomask.fit_cells, "
        "biomask fit-cells, or prep cells without tokenizer.path), or map them to the model's species first"
    )


_MADE_UNIQUE = re.compile(r"^(.+)-(\d+)$")


def made_unique_note(names: np.ndarray, vocabulary: list[str]) -> str | None:
    """Genes named `G-1`, `G-2` beside a `G` of the vocabulary, themselves not in it: what scanpy's
    `var_names_make_unique` (its 10x readers call it) makes of genes sharing a symbol. biomask reading
    the 10x file itself sums such genes into `G`; read through scanpy, the copies' counts were left
    out without a word."""
    known, present = set(vocabulary), {str(n) for n in names}
    pairs = [
        (str(n), m.group(1))
        for n in pd.unique(names[names != ""])
        if str(n) not in known
        and (m := _MADE_UNIQUE.match(str(n)))
        and m.group(1) in known
        and m.group(1) in present
    ]
    if not pairs:
        return None
    shown = ", ".join(f"{copy} beside {gene}" for copy, gene in pairs[:3])
    return (
        f"{len(pairs):,} of its genes {'is' if len(pairs) == 1 else 'are'} named as scanpy's var_names_make_unique names a second gene of the "
        f"same symbol ({shown}{', ...' if len(pairs) > 3 else ''}) and {'is' if len(pairs) == 1 else 'are'} not in the vocabulary: their counts "
        "are left out. To count them in their symbol's gene, read the 10x file with biomask (it sums genes "
        "that share a name) or sum them in the AnnData first; to leave them out, nothing to do"
    )


def gene_names(source: MatrixSource, column: str | None, strip_version: bool = False) -> np.ndarray:
    """The source's gene identifiers, one per column ("" where a gene has none)."""
    if column is None:
        values = source.var.index.to_numpy(dtype=object)
    else:
        if column not in source.var.columns:
            raise InputError(
                f"{source.where}: var has no column {column!r} (genes.column); var columns: "
                f"{', '.join(map(str, source.var.columns)) or 'none'} (null uses the var index)"
            )
        values = source.var[column].to_numpy(dtype=object)
    names = np.array(["" if pd.isna(v) else str(v).strip() for v in values], dtype=object)
    names[names == "nan"] = ""
    if strip_version:
        names = np.array([_ENSEMBL_VERSION.sub(r"\1", n) for n in names], dtype=object)
    return names


# --------------------------------------------------------------------------- matching to a vocabulary


@dataclass
class GeneMatch:
    """A dataset's gene identifiers as read to match a vocabulary, and how much they match."""

    column: str | None  # the var column read (None: the var index)
    names: np.ndarray
    found: dict[str, Any]  # `coverage`


def _identifier_columns(source: MatrixSource) -> list[str]:
    """The var columns that may hold identifiers: text, named by a text label that names one column
    only (genes.column takes a name; a label two columns share reads as both)."""
    var = source.var
    unique = var.columns[~var.columns.duplicated(keep=False)]
    return [
        c
        for c in unique
        if isinstance(c, str)
        and (var[c].dtype == object or isinstance(var[c].dtype, (pd.CategoricalDtype, pd.StringDtype)))
    ]


def _vocabulary_versions(names: np.ndarray, vocabulary: list[str]) -> np.ndarray:
    """strip_version against a vocabulary of versioned Ensembl IDs (a checkpoint trained on a GENCODE
    file): each name takes the vocabulary's version of its gene, so one annotation release matches
    another. Stripping the data's suffixes alone never could (ENSG….13 and ENSG….12 both became
    ENSG…, in no vocabulary)."""
    versions: dict[str, list[str]] = {}
    for gene in vocabulary:
        if m := _ENSEMBL_VERSION.match(gene):
            versions.setdefault(m.group(1), []).append(gene)
    if not versions:
        return names
    single = {base: genes[0] for base, genes in versions.items() if len(genes) == 1}
    return np.array([single.get(n, n) for n in names], dtype=object)


def read_matched(
    source: MatrixSource, vocab: GeneVocabulary, column: str | None, strip_version: bool
) -> GeneMatch:
    """The identifiers of var `column` (None: the index) as they meet `vocab`."""
    names = gene_names(source, column, strip_version)
    if strip_version:
        names = _vocabulary_versions(names, vocab.genes)
    return GeneMatch(column, names, coverage(vocab, names))


def where_genes(column: str | None) -> str:
    return f"var column {column!r}" if column is not None else "the var index"


def match_genes(
    source: MatrixSource,
    vocab: GeneVocabulary,
    column: str | None,
    strip_version: bool,
    *,
    search: bool,
    min_coverage: float,
) -> GeneMatch:
    """The identifiers of `column`; with `search`, where they cover less than `min_coverage` of the
    vocabulary, those of the var column (or index) that covers the most, said in the log. 10x files
    keep symbols in the index and Ensembl IDs in gene_ids, CELLxGENE's the reverse, and a model may
    have been trained on either: a file matching 5 of 765 genes by its index was embedded from those
    5, with a warning that never named the column matching all 765."""
    match = read_matched(source, vocab, column, strip_version)
    if not search or match.found["fraction_of_vocab_present"] >= min_coverage:
        return match
    best = match
    for other in [None, *_identifier_columns(source)]:
        if other == column:
            continue
        candidate = read_matched(source, vocab, other, strip_version)
        if candidate.found["vocab_genes_present"] > best.found["vocab_genes_present"]:
            best = candidate
    if best is not match:
        log.warning(
            "%s: %s matches %d of the %d vocabulary genes; matched on %s instead (%d genes; set "
            "genes.column to choose)",
            source.where,
            where_genes(column),
            match.found["vocab_genes_present"],
            match.found["vocab_genes"],
            where_genes(best.column),
            best.found["vocab_genes_present"],
        )
    return best


def identifier_hint(
    source: MatrixSource, vocab: GeneVocabulary, match: GeneMatch, strip_version: bool
) -> str | None:
    """The identifier setting that matches the vocabulary best, where one matches more genes than
    `match` does: the var column (or index), with or without Ensembl version suffixes. Checked, not
    guessed: the hint named genes.strip_version where it could not help (a vocabulary of symbols)."""
    best = (match.found["vocab_genes_present"], match.column, strip_version)
    for other in [None, *_identifier_columns(source)]:
        for strip in dict.fromkeys((strip_version, True)):
            if (other, strip) == (match.column, strip_version):
                continue
            present = read_matched(source, vocab, other, strip).found["vocab_genes_present"]
            if present > best[0]:
                best = (present, other, strip)
    present, column, strip = best
    if present == match.found["vocab_genes_present"]:
        return None
    settings = []
    if column != match.column:
        settings.append(
            f"genes.column to {column!r}" if column is not None else "genes.column to null (the var index)"
        )
    if strip != strip_version:
        settings.append("genes.strip_version")
    return (
        f"set {' and '.join(settings)}: {present:,} of the {len(vocab.genes):,} vocabulary genes match then"
    )


def no_overlap_reason(
    source: MatrixSource, vocab: GeneVocabulary, match: GeneMatch, hint: str | None, *, instead: str
) -> str:
    """Why no gene of `source` is in `vocab`, and what to do: a transposed matrix, another species,
    the setting that matches (`hint`), or, where none does, every var column read and `instead`."""
    columns = ", ".join(map(str, source.var.columns)) or "none"
    return (
        cells_named_as_genes(source, vocab.genes)
        or other_case_hint(match.names, vocab.genes)
        or (
            f"the identifiers differ -- {hint}"
            if hint
            else f"the identifiers differ, and no var column matches (read: {where_genes(match.column)}; var "
            f"columns: {columns}): rename the genes to the vocabulary's identifiers (or name a var column "
            f"that holds them with genes.column), or {instead}"
        )
    )


@dataclass
class ColumnMap:
    """Where each input column goes in a target space (-1: nowhere), and how the mapping behaves."""

    targets: np.ndarray  # one per input column
    size: int  # number of target columns
    _identity: bool | None = field(default=None, repr=False, compare=False)
    _increasing: bool | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        # int32 halves the memory traffic of the per-block gather (every vocabulary fits easily)
        self.targets = np.asarray(self.targets, dtype=np.int32 if self.size < 2**31 else np.int64)

    @property
    def identity(self) -> bool:
        if self._identity is None:
            self._identity = self.targets.size == self.size and bool(
                (self.targets == np.arange(self.size)).all()
            )
        return self._identity

    @property
    def increasing(self) -> bool:
        """Mapped columns keep their order and never share a target (the usual case: a vocabulary in
        corpus order): then a sorted row stays sorted, and remapping is one compiled pass."""
        if self._increasing is None:
            mapped = self.targets[self.targets >= 0]
            self._increasing = bool((np.diff(mapped) > 0).all())
        return self._increasing


def remap_columns(block: sp.csr_matrix, mapping: ColumnMap, rows: np.ndarray | None = None) -> sp.csr_matrix:
    """The block with its columns moved to the target space (duplicate targets summed, order sorted);
    with `rows`, only those rows, in that order (selected in the same pass when it can be)."""
    if not mapping.identity and mapping.increasing and block.has_canonical_format:
        rows = np.arange(block.shape[0]) if rows is None else rows
        lengths = np.diff(block.indptr)[rows]
        indptr = np.zeros(rows.size + 1, dtype=np.int64)
        indices = np.empty(int(lengths.sum()), dtype=mapping.targets.dtype)
        data = np.empty(indices.size, dtype=block.data.dtype)
        kept = _keep_mapped(
            block.indptr, block.indices, block.data, rows, mapping.targets, indptr, indices, data
        )
        out = sp.csr_matrix((data[:kept], indices[:kept], indptr), shape=(rows.size, mapping.size))
        out.has_canonical_format = True
        return out
    if rows is not None:
        block = block[rows]
    if mapping.identity:
        out = block
    else:
        targets = mapping.targets[block.indices]
        dropped = targets < 0
        data = block.data
        if dropped.any():
            # unmapped entries become explicit zeros, which scipy's eliminate_zeros removes in one C pass
            data = np.where(dropped, 0, data)
            targets[dropped] = 0
        out = sp.csr_matrix((data, targets, block.indptr.copy()), shape=(block.shape[0], mapping.size))
        if dropped.any():
            out.eliminate_zeros()
    if not out.has_canonical_format:
        out = out.copy() if out is block else out
        out.sum_duplicates()  # sorts each row's columns and adds up columns that share a target
    return out


@njit
def _keep_mapped(indptr, indices, data, rows, targets, out_indptr, out_indices, out_data):
    """The given rows' entries whose column maps somewhere, relabelled, in order; returns how many."""
    kept = 0
    for i in range(rows.size):
        row = rows[i]
        for j in range(indptr[row], indptr[row + 1]):
            target = targets[indices[j]]
            if target >= 0:
                out_indices[kept] = target
                out_data[kept] = data[j]
                kept += 1
        out_indptr[i + 1] = kept
    return kept


@dataclass
class GeneSpace:
    """Every distinct gene name of the corpus, indexed in first-seen order."""

    names: list[str] = field(default_factory=list)
    index: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.names)

    def add(
        self, source: MatrixSource, names: np.ndarray, duplicates: str
    ) -> tuple[np.ndarray, dict[str, int]]:
        """Register a source's genes; return where each of its columns goes in this space (-1: left out)
        and counts of what was left out. Build the `ColumnMap` once every input is registered."""
        unnamed = names == ""
        special = sorted({str(n) for n in names} & set(SPECIAL_TOKENS))
        if special:  # the tokenizer would map that name to two ids, and a checkpoint not load back
            raise InputError(
                f"{source.where}: gene name(s) {', '.join(special)} are biomask's special tokens; rename "
                "those genes in the file, or choose another identifier column with genes.column (e.g. gene_ids)"
            )
        seen = pd.Series(names).duplicated(keep="first").to_numpy() & ~unnamed
        if seen.any() and duplicates == "error":
            dups = pd.unique(names[seen])
            shown = ", ".join(map(str, dups[:10])) + (" ..." if dups.size > 10 else "")
            raise InputError(
                f"{source.where}: {dups.size:,} gene names occur more than once ({shown}); set "
                "genes.duplicates: sum (add their counts) or first (keep the first column), or choose a "
                "unique identifier with genes.column (e.g. gene_ids)"
            )
        if seen.any():  # not an error by default (10x files repeat a few symbols), but never silent
            dups = pd.unique(names[seen])
            log.warning(
                "%s: %d %s (%s%s); their columns are %s (genes.duplicates; "
                "genes.column picks a unique identifier, e.g. gene_ids)",
                source.where,
                dups.size,
                DUPLICATE_GENES,
                ", ".join(map(str, dups[:10])),
                " ..." if dups.size > 10 else "",
                "added up" if duplicates == "sum" else "left out but the first",
            )
        targets = np.full(names.size, -1, dtype=np.int64)
        for i, name in enumerate(names):
            if unnamed[i] or (duplicates == "first" and seen[i]):
                continue
            j = self.index.get(name)
            if j is None:
                j = self.index[name] = len(self.names)
                self.names.append(name)
            targets[i] = j
        stats = {
            "columns": int(names.size),
            "genes": int(np.unique(names[~unnamed]).size),
            "unnamed_columns": int(unnamed.sum()),
            "duplicate_columns": int(seen.sum()),
        }
        return targets, stats


# --------------------------------------------------------------------------------------------- vocabulary


@dataclass
class GeneVocabulary:
    """Gene tokens after the specials: gene i has token id NUM_SPECIAL + i."""

    genes: list[str]
    medians: np.ndarray  # float32: corpus median of each gene's non-zero normalised values
    n_cells: np.ndarray  # int64: corpus cells expressing each gene
    gene_id_column: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # how it was built (recorded in tokenizer_config)

    def __post_init__(self) -> None:
        self.medians = np.asarray(self.medians, dtype=np.float32)
        self.n_cells = np.asarray(self.n_cells, dtype=np.int64)
        self._ids = {g: NUM_SPECIAL + i for i, g in enumerate(self.genes)}
        if len(self._ids) != len(self.genes):
            raise InputError("a gene vocabulary cannot hold the same gene twice")

    @property
    def vocab_size(self) -> int:
        return NUM_SPECIAL + len(self.genes)

    def token_map(self, names: list[str] | np.ndarray) -> ColumnMap:
        """Column map from a list of gene names to token ids (-1 for genes outside the vocabulary)."""
        targets = np.fromiter((self._ids.get(str(n), -1) for n in names), dtype=np.int64, count=len(names))
        return ColumnMap(targets, self.vocab_size)

    def token_medians(self) -> np.ndarray:
        """Medians indexed by token id (specials get 1 so that nothing divides by zero)."""
        return np.concatenate([np.ones(NUM_SPECIAL, dtype=np.float32), self.medians])

    # ----------------------------------------------------------------------------------- saving
    def hf_tokenizer(self) -> Tokenizer:
        vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *self.genes])}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.add_special_tokens(list(SPECIAL_TOKENS))
        # Cells get [CLS] only (DEVELOPERS.md: the collator adds [CLS] for cells, no [SEP]).
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A", special_tokens=[("[CLS]", CLS_ID)]
        )
        return tok

    def save(self, directory: str | os.PathLike) -> Path:
        """Write tokenizer.json, tokenizer_config.json and genes.tsv; return tokenizer.json's path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "tokenizer.json"
        self.hf_tokenizer().save(str(path))
        config = tokenizer_config(
            {
                "modality": "cells",
                "kind": "genes",
                "gene_id_column": self.gene_id_column,
                "vocab_size": self.vocab_size,
                **self.settings,
            }
        )
        (directory / "tokenizer_config.json").write_text(
            json.dumps(config, indent=2) + "\n", encoding="utf-8"
        )
        table = pd.DataFrame(
            {
                "id": np.arange(NUM_SPECIAL, self.vocab_size),
                "gene": self.genes,
                # %.9g round-trips float32 exactly, so a reloaded vocabulary gives identical values
                "median": [f"{m:.9g}" for m in self.medians.tolist()],
                "n_cells": self.n_cells,
            }
        )
        table.to_csv(directory / "genes.tsv", sep="\t", index=False)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> GeneVocabulary:
        """Reload a saved vocabulary from its directory, its tokenizer.json, or a token store."""
        directory = checked_vocabulary_dir(path)
        config_path, table_path = directory / "tokenizer_config.json", directory / "genes.tsv"
        if not table_path.is_file():
            raise InputError(
                f"tokenizer.path {path}: no genes.tsv in {directory}; give a gene vocabulary written by "
                "`biomask prep cells` (its tokenizer/ directory, or the token store)"
            )
        try:
            settings = json.loads(config_path.read_text(encoding="utf-8"))["biomask"]
        except (OSError, ValueError, KeyError):
            raise InputError(f"{config_path} is missing or has no biomask section") from None
        if settings.get("modality") != "cells" or settings.get("kind") != "genes":
            raise InputError(
                f"{directory} holds a {settings.get('modality')} tokenizer, not a gene vocabulary"
            )
        table = pd.read_csv(table_path, sep="\t", keep_default_na=False, dtype={"gene": str})
        expected = np.arange(NUM_SPECIAL, NUM_SPECIAL + len(table))
        if list(table.columns[:3]) != ["id", "gene", "median"] or not np.array_equal(table["id"], expected):
            raise InputError(
                f"{table_path}: expected columns id, gene, median with ids {NUM_SPECIAL}, {NUM_SPECIAL + 1}, ..."
            )
        hf = Tokenizer.from_file(str(directory / "tokenizer.json"))
        if hf.get_vocab_size(with_added_tokens=True) != NUM_SPECIAL + len(table):
            raise InputError(f"{directory}: tokenizer.json and genes.tsv list different numbers of genes")
        extra = {
            k: v for k, v in settings.items() if k not in ("modality", "kind", "gene_id_column", "vocab_size")
        }
        return cls(
            genes=table["gene"].astype(str).tolist(),
            medians=pd.to_numeric(table["median"], errors="coerce").to_numpy(dtype=np.float32),
            n_cells=table["n_cells"].to_numpy() if "n_cells" in table else np.zeros(len(table), np.int64),
            gene_id_column=settings.get("gene_id_column"),
            settings=extra,
        )


def percent(share: float) -> str:
    """A share as a percentage that reads 100 % only when it is whole, 0 % only when it is none
    (1,999 of 2,000: 99.9 %)."""
    value = min(max(round(100 * share, 1), 0.1 if share > 0 else 0.0), 99.9 if share < 1 else 100.0)
    return f"{value:.1f}%"


def coverage(vocab: GeneVocabulary, names: np.ndarray) -> dict[str, Any]:
    """How the dataset and the vocabulary overlap, from both sides. What matters for a model is the
    vocabulary side (`fraction_of_vocab_present`: the share of the genes the model knows that the data
    measures; a panel store lists only those); the dataset side (`fraction_of_dataset_genes`) is
    information: a dataset measuring 30,000 genes against a 2,000-gene vocabulary is fully usable."""
    genes = {str(n) for n in names if n != ""}
    known = sum(1 for g in genes if g in vocab._ids)
    return {
        "dataset_genes": len(genes),
        "dataset_genes_in_vocab": known,
        "fraction_of_dataset_genes": known / len(genes) if genes else 0.0,
        "vocab_genes": len(vocab.genes),
        "vocab_genes_present": known,
        "fraction_of_vocab_present": known / len(vocab.genes) if vocab.genes else 0.0,
    }
