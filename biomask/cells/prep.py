"""`biomask prep cells`: expression matrices in, a token store of cells out.

The stage streams every input twice, one block of cells at a time, and never holds a whole matrix:

1. **open**: fetch registered datasets, open each matrix, refuse non-numeric values, detect what the
   matrix holds and apply the counts policy (`counts.py`) -- all before any long pass; read the gene
   identifiers into one gene space; with a frozen vocabulary, report coverage (and refuse zero
   overlap); check the label, split and metadata columns exist.
2. **scan**: convert each block to counts (checking every value), decide which cells pass QC and --
   when this corpus builds the vocabulary -- gather its statistics: cells per gene, per-gene medians
   of the normalised expression, and a seeded cell sample for HVG selection.
3. **vocabulary and splits**: build and freeze the gene vocabulary (or use the frozen one given by
   `tokenizer.path`), then draw the deterministic (stratified) splits of the kept cells.
4. **write**: read again, tokenize each block with the configured scheme (`tokenize.py`) and append
   the records, their labels and metadata to their split of the token store.

The output directory is written atomically with its manifest, gene vocabulary, resolved config and
run.json (inputs with checksums, seeds, code version); a failure leaves nothing behind.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from biomask.cells.config import CellsPrepConfig, InputSpec, TokenizerConfig
from biomask.cells.counts import CountConverter, ValueSummary, check_policy, detect
from biomask.cells.genes import (
    ColumnMap,
    GeneMatch,
    GeneSpace,
    GeneVocabulary,
    case_only_hint,
    check_orientation,
    coverage,
    gene_names,
    identifier_hint,
    made_unique_note,
    match_genes,
    no_overlap_reason,
    percent,
    remap_columns,
)
from biomask.cells.medians import GeneCounts, MedianAccumulator
from biomask.cells.protein_gates import protein_labels
from biomask.cells.qc import CellQC, row_sums, select_hvg
from biomask.cells.readers import MatrixSource, open_matrix
from biomask.cells.reuse import resolve_inputs, stage_output
from biomask.cells.samples import MissingGenes
from biomask.cells.splits import SPLITS, split_from_column, stratified_split
from biomask.cells.tokenize import Scheme, make_scheme, scheme_class
from biomask.datasets.registry import with_origin
from biomask.errors import InputError
from biomask.progress import bar as progress_bar
from biomask.provenance import code_version, sha256_file
from biomask.store import (
    TokenStore,
    TokenStoreWriter,
    label_order,
    label_spellings,
    label_strings,
    token_dtype,
    tokenizer_files,
)
from biomask.vocab import NUM_SPECIAL

log = logging.getLogger(__name__)

NOT_KEPT = 255  # split code of a cell that is not written
COUNT_MODES = ("require", "from_log1p")  # counts.mode values whose matrix holds (or rebuilds) counts


@dataclass
class CellInput:
    """One opened input and everything the passes learn about it."""

    spec: InputSpec
    name: str
    format: str
    sha256: str
    source: MatrixSource
    names: np.ndarray  # gene identifier of each column
    gene_targets: np.ndarray  # column -> gene-space index (-1: unnamed or a dropped duplicate)
    gene_stats: dict[str, int]
    offset: int = 0  # global index of this input's first cell
    summary: ValueSummary | None = None
    converter: CountConverter | None = None
    qc: CellQC | None = None
    exclude: np.ndarray | None = None  # cells left out before QC (missing label, or a rare one)
    rare: np.ndarray | None = None  # of those, the cells of a label under labels.min_cells
    keep: np.ndarray | None = None  # cells that pass QC (after the scan)
    splits: np.ndarray | None = None  # split code per cell (NOT_KEPT for cells not written)
    labels: np.ndarray | None = None  # label string per cell
    batches: np.ndarray | None = None  # batch_column's value per cell, as text
    token_map: ColumnMap | None = None
    coverage: dict[str, Any] = field(default_factory=dict)
    gene_column: str | None = None  # the var column its identifiers were read from (None: the index)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.source.path),
            "format": self.format,
            "matrix": self.spec.matrix,
            "sha256": self.sha256,
            "cells": self.source.n_obs,
            "genes": self.source.n_vars,
        }

    def libsize(self, start: int, observed: np.ndarray) -> np.ndarray:
        """Each cell's library size: the total-counts column when configured, else its summed counts."""
        assert self.converter is not None
        if self.converter.totals is not None:
            return self.converter.totals[start : start + observed.size]
        return observed


# --------------------------------------------------------------------------------------------- open


def open_inputs(
    cfg: CellsPrepConfig, space: GeneSpace, frozen: GeneVocabulary | None = None
) -> list[CellInput]:
    """Open every input and register its genes in `space` (closing what was opened if one fails).
    Against a `frozen` vocabulary with genes.column null, an input whose var index covers less than
    tokenizer.min_coverage of it is read by the var column that covers the most (as embed does)."""
    inputs: list[CellInput] = []
    offset = 0
    try:
        for spec, name, path, fmt, digest in resolve_inputs(cfg.inputs):
            source = open_matrix(path, fmt, spec.matrix, name=name)
            try:
                check_orientation(source)
                if frozen is None:
                    column, names = (
                        cfg.genes.column,
                        gene_names(source, cfg.genes.column, cfg.genes.strip_version),
                    )
                else:
                    match = match_genes(
                        source,
                        frozen,
                        cfg.genes.column,
                        cfg.genes.strip_version,
                        search=cfg.genes.column is None,
                        min_coverage=cfg.tokenizer.min_coverage,
                    )
                    column, names = match.column, match.names
                targets, stats = space.add(source, names, cfg.genes.duplicates)
            except BaseException:
                source.close()
                raise
            inputs.append(
                CellInput(spec, name, fmt, digest, source, names, targets, stats, offset, gene_column=column)
            )
            offset += source.n_obs
    except BaseException:
        close_inputs(inputs)
        raise
    return inputs


def close_inputs(inputs: list[CellInput]) -> None:
    for inp in inputs:
        inp.source.close()


def _check_columns(cfg: CellsPrepConfig, inp: CellInput) -> None:
    """Every configured obs column must exist in every input (and a label must be there for each cell)."""
    obs = inp.source.obs
    wanted = {
        "labels.column": cfg.labels.column,
        "split.column": cfg.split.column,
        "split.stratify_by": cfg.split.stratify_by,
        "batch_column": cfg.batch_column,
        **{f"obs_columns[{i}]": c for i, c in enumerate(cfg.obs_columns)},
    }
    if inp.spec.task == "protein-gates":
        if cfg.labels.column in obs.columns:  # never overwrite what the file says
            raise InputError(
                f"{inp.source.where}: obs already has a {cfg.labels.column!r} column, and task protein-gates "
                "would write its labels there: name another labels.column, or drop the task to use the column"
            )
        obs[cfg.labels.column] = protein_labels(
            inp.source.path, inp.source.where, inp.source.n_obs, inp.format
        )
    for key, column in wanted.items():
        if column is not None and column not in obs.columns:
            raise InputError(
                f"{inp.source.where}: obs has no column {column!r} ({key}); obs columns: "
                f"{', '.join(map(str, obs.columns)) or 'none'}"
            )
    inp.exclude = np.zeros(inp.source.n_obs, dtype=bool)
    if cfg.batch_column is not None:
        inp.batches, no_batch = label_strings(obs[cfg.batch_column])
        if no_batch.any():  # a decoder conditioned on the batch needs one for every cell it trains on
            first = int(np.flatnonzero(no_batch)[0])
            raise InputError(
                f"{inp.source.where}: {int(no_batch.sum()):,} cells have no {cfg.batch_column!r} value "
                f"(batch_column; first: {obs.index[first]!r}); give every cell its sample or batch"
            )
    if cfg.labels.column is not None:
        labels, missing = label_strings(obs[cfg.labels.column])
        if (
            missing.size and missing.all() and cfg.labels.missing == "error"
        ):  # none at all: the empty matrix's message
            raise InputError(
                f"{inp.source.where}: no cell has a {cfg.labels.column!r} label (every value is empty or "
                f"NaN); is it the right column (labels.column)? obs columns: {', '.join(map(str, obs.columns))}"
            )
        if missing.size and missing.all():
            log.warning(
                "%s: no cell has a %r label; all %s are left out (labels.missing: drop)",
                inp.source.where, cfg.labels.column, f"{missing.size:,}",
            )  # fmt: skip
        elif missing.any() and cfg.labels.missing == "error":
            first = int(np.flatnonzero(missing)[0])
            raise InputError(
                f"{inp.source.where}: {int(missing.sum()):,} cells have no {cfg.labels.column!r} label (first: "
                f"{obs.index[first]!r}"
                + ("; task protein-gates leaves the cells no gate takes unlabelled" if inp.spec.task else "")
                + "); set labels.missing: drop to leave them out"
            )
        inp.exclude = missing
        inp.labels = labels


def _drop_rare_labels(cfg: CellsPrepConfig, inputs: list[CellInput]) -> None:
    """Labels held by fewer than labels.min_cells cells over all inputs are left out like missing ones."""
    counts: collections.Counter[str] = collections.Counter()
    for inp in inputs:
        counts.update(str(v) for v in inp.labels[~inp.exclude])
    rare = {label: n for label, n in counts.items() if n < cfg.labels.min_cells}
    if not rare:
        return
    log.warning(
        "labels with fewer than %d cells (labels.min_cells) are left out: %s",
        cfg.labels.min_cells, ", ".join(f"{label!r} ({n})" for label, n in sorted(rare.items())),
    )  # fmt: skip
    for inp in inputs:
        inp.rare = np.isin(inp.labels.astype(str), list(rare)) & ~inp.exclude
        inp.exclude = inp.exclude | inp.rare


LARGE_PANEL = 5000  # genes: above this a panel of every gene is worth a word


def prepare_inputs(cfg: CellsPrepConfig, inputs: list[CellInput]) -> None:
    """Detect each matrix's values and apply the counts policy: fails fast, before the long passes."""
    for inp in inputs:
        _check_columns(cfg, inp)
    if cfg.labels.column is not None and cfg.labels.min_cells:
        _drop_rare_labels(cfg, inputs)
    for inp in inputs:
        inp.summary = detect(inp.source, cfg.counts, cfg.block_size)
        log.info("%s: %s", inp.source.where, inp.summary.describe())
        # what the matrix holds first: a from_log1p config on counts is the mistake, not its column
        check_policy(inp.source, inp.summary, cfg.counts)
        inp.converter = CountConverter(inp.source, cfg.counts)  # a missing totals column: named here
        inp.qc = CellQC(cfg.qc, inp.source, inp.names)


# --------------------------------------------------------------------------------------------- scan


@dataclass
class CorpusStats:
    """What the scan learns about the corpus when it builds the vocabulary."""

    genes: GeneCounts  # cells expressing each gene of the gene space, and rare genes' values
    medians: MedianAccumulator
    sample: list[sp.csr_matrix] = field(default_factory=list)  # HVG sample, gene space
    sample_scale: list[np.ndarray] = field(default_factory=list)


def scan(cfg: CellsPrepConfig, inputs: list[CellInput], space: GeneSpace, build: bool) -> CorpusStats | None:
    total = sum(inp.source.n_obs for inp in inputs)
    stored = sum(inp.source.stored_values for inp in inputs)
    if build and stored > cfg.tokenizer.median_max_values:
        # a dense matrix's bound (every entry) would choose a subset where the same cells stored
        # sparse get exact medians: count its non-zeros (one more read, of dense inputs only)
        stored = sum(inp.source.nonzero_values(cfg.block_size) for inp in inputs)
    fraction = cfg.tokenizer.median_max_values / max(stored, 1)
    stats = (
        CorpusStats(
            GeneCounts.for_subset(len(space), fraction),
            MedianAccumulator(len(space), fraction, cfg.tokenizer.seed),
        )
        if build
        else None
    )
    sampled = np.zeros(total, dtype=bool)
    if build and cfg.hvg.n_top_genes is not None:
        rng = np.random.default_rng(cfg.split.seed)
        sampled[rng.choice(total, size=min(cfg.hvg.max_cells, total), replace=False)] = True
    target = cfg.normalise.target_sum
    # a bar on a terminal or in a notebook only, not in a pipeline's log files (biomask.progress)
    with progress_bar(total, "scan", unit="cells") as bar:
        for inp in inputs:
            assert inp.converter is not None and inp.qc is not None and inp.exclude is not None
            inp.keep = np.zeros(inp.source.n_obs, dtype=bool)
            gene_map = ColumnMap(inp.gene_targets, len(space))
            unmeasured = MissingGenes(inp.source, genes=inp.gene_targets >= 0)
            for start, raw in inp.source.blocks(cfg.block_size):
                stop = start + raw.shape[0]
                unmeasured.add(start, raw)
                counts = inp.converter(start, raw)
                observed = row_sums(counts)
                lib = inp.libsize(start, observed)
                keep = inp.qc.keep(start, counts, observed, lib, candidates=~inp.exclude[start:stop])
                inp.keep[start:stop] = keep
                bar.update(raw.shape[0])
                if stats is None or not keep.any():
                    continue
                genes = remap_columns(counts[keep] if not keep.all() else counts, gene_map)
                scale = target / lib[keep]
                stats.genes.add(genes, scale)
                stats.medians.add(genes, scale, inp.offset + start + np.flatnonzero(keep))
                chosen = sampled[inp.offset + start : inp.offset + stop][keep]
                if chosen.any():
                    stats.sample.append(genes[chosen])
                    stats.sample_scale.append(scale[chosen])
            unmeasured.warn(inp.names)
    return stats


# --------------------------------------------------------------------------------------------- vocabulary


def build_vocabulary(
    cfg: CellsPrepConfig, inputs: list[CellInput], space: GeneSpace, stats: CorpusStats
) -> GeneVocabulary:
    """Genes detected in at least qc.min_cells kept cells (then the HVGs among them), in corpus order."""
    names = [inp.name for inp in inputs]
    n_cells = stats.genes.n_cells
    chosen = n_cells >= cfg.qc.min_cells
    if not chosen.any():
        raise InputError(
            f"no gene is detected in at least qc.min_cells={cfg.qc.min_cells} kept cells of "
            f"{', '.join(names)}; lower qc.min_cells or relax the cell filters"
        )
    hvg = None
    if cfg.hvg.n_top_genes is not None and stats.sample:
        sample = sp.vstack(stats.sample, format="csr")[:, np.flatnonzero(chosen)]
        hvg = select_hvg(sample, np.concatenate(stats.sample_scale), cfg.hvg)
        chosen[np.flatnonzero(chosen)] = hvg
        log.info("HVG: %d genes selected from a sample of %d cells", int(chosen.sum()), sample.shape[0])
    index = np.flatnonzero(chosen)
    if scheme_class(cfg.tokenizer.scheme).complete_profile and hvg is None and index.size > LARGE_PANEL:
        log.warning(
            "the panel holds every gene detected: %s of them. A profile model reads all of them (its first "
            "layer is genes x width wide, so training slows with it); hvg.n_top_genes: 2000 keeps the most "
            "variable genes instead",
            f"{index.size:,}",
        )
    medians = stats.medians.medians()[index]
    # rare genes (the subset may miss them, or hold only a few of their values): exact, from all values
    exact = stats.genes.exact_medians(index)
    medians = np.where(np.isnan(exact), medians, exact)
    missing = np.isnan(medians)
    if missing.any():
        # the subset missed genes with more values than were kept for them: rare, so one more pass
        log.info("medians: one more pass for %d genes the cell subset missed", int(missing.sum()))
        medians[missing] = exact_medians(cfg, inputs, space, index[missing])
    settings = {
        "built_from": names,
        "min_cells": cfg.qc.min_cells,
        "hvg": cfg.hvg.model_dump(mode="json") if hvg is not None else None,
        "target_sum": cfg.normalise.target_sum,
        "medians": stats.medians.describe(stats.genes.per_gene),
    }
    return GeneVocabulary(
        [space.names[i] for i in index], medians, n_cells[index], cfg.genes.column, settings
    )


def exact_medians(
    cfg: CellsPrepConfig, inputs: list[CellInput], space: GeneSpace, genes: np.ndarray
) -> np.ndarray:
    """Exact medians of a few genes (gene-space indices) over every kept cell: one more streamed pass."""
    accumulator = MedianAccumulator(genes.size)
    position = np.full(len(space), -1, dtype=np.int64)
    position[genes] = np.arange(genes.size)
    for inp in inputs:
        assert inp.converter is not None and inp.keep is not None
        to_subset = ColumnMap(
            np.where(inp.gene_targets >= 0, position[np.maximum(inp.gene_targets, 0)], -1), genes.size
        )
        for start, raw in inp.source.blocks(cfg.block_size):
            keep = inp.keep[start : start + raw.shape[0]]
            if not keep.any():
                continue
            counts = inp.converter(start, raw, check=False)
            lib = inp.libsize(start, row_sums(counts))[keep]
            block = remap_columns(counts[keep], to_subset)
            accumulator.add(block, cfg.normalise.target_sum / lib, np.zeros(lib.size, dtype=np.int64))
    return accumulator.medians()


def load_frozen(cfg: TokenizerConfig) -> GeneVocabulary | None:
    if cfg.path is None:
        return None
    return GeneVocabulary.load(cfg.path)


def check_coverage(
    cfg: CellsPrepConfig, inputs: list[CellInput], vocab: GeneVocabulary, frozen: bool
) -> None:
    """Report how much of each dataset the vocabulary covers; refuse a dataset it does not cover at all."""
    for inp in inputs:
        inp.coverage = coverage(vocab, inp.names)
        if not frozen:
            continue
        if inp.gene_column != cfg.genes.column:  # chosen by the search: recorded with the counts
            inp.coverage["gene_column"] = inp.gene_column if inp.gene_column is not None else "var index"
        match = GeneMatch(inp.gene_column, inp.names, inp.coverage)
        hint = (
            identifier_hint(inp.source, vocab, match, cfg.genes.strip_version)
            if inp.coverage["fraction_of_vocab_present"] < cfg.tokenizer.min_coverage
            else None
        )
        share = inp.coverage["fraction_of_dataset_genes"]
        if inp.coverage["dataset_genes_in_vocab"] == 0:
            ours = ", ".join(str(n) for n in pd.unique(inp.names[inp.names != ""])[:3])
            theirs = ", ".join(vocab.genes[:3])
            what = no_overlap_reason(
                inp.source,
                vocab,
                match,
                hint,
                instead="build a vocabulary from these cells (no tokenizer.path)",
            )
            raise InputError(
                f"{inp.source.where}: none of its {inp.coverage['dataset_genes']:,} genes (e.g. {ours}) is in the "
                f"frozen vocabulary {cfg.tokenizer.path} (e.g. {theirs}); {what}"
            )
        # what matters is how much of the vocabulary the data measures (a vocabulary gene it lacks never
        # reaches the model); the share of the dataset's own genes is information (a 30,000-gene file
        # against a 2,000-gene panel is fully usable)
        present, known = inp.coverage["vocab_genes_present"], inp.coverage["vocab_genes"]
        copies = made_unique_note(inp.names, vocab.genes)
        if copies:
            log.warning("%s: %s", inp.source.where, copies)
        dataset_side = (
            f"{percent(share)} of its {inp.coverage['dataset_genes']:,} genes are in the vocabulary; "
            "the others are left out"
        )
        if inp.coverage["fraction_of_vocab_present"] < cfg.tokenizer.min_coverage:
            have = set(map(str, inp.names))
            missing = [g for g in vocab.genes if g not in have]
            species = case_only_hint(inp.names, vocab.genes, present)
            log.warning(
                "%s: only %d of the frozen vocabulary's %d genes (%s) are in the data "
                "(tokenizer.min_coverage=%.0f%%); the model sees the other %d as %s (e.g. %s). %s%s",
                inp.source.where,
                present,
                known,
                percent(inp.coverage["fraction_of_vocab_present"]),
                100 * cfg.tokenizer.min_coverage,
                len(missing),
                "unmeasured" if scheme_class(cfg.tokenizer.scheme).complete_profile else "not expressed",
                ", ".join(missing[:10]),
                dataset_side,
                f". {species[0].upper()}{species[1:]}"
                if species
                else f". To match more, {hint}"
                if hint
                else "",
            )
        else:
            log.info(
                "%s: %d of the frozen vocabulary's %d genes (%s) are in the data (%s)",
                inp.source.where,
                present,
                known,
                percent(inp.coverage["fraction_of_vocab_present"]),
                dataset_side,
            )


# --------------------------------------------------------------------------------------------- splits


def assign_splits(cfg: CellsPrepConfig, inputs: list[CellInput]) -> None:
    """Split code for every kept cell (NOT_KEPT elsewhere): a split column, or a seeded stratified draw."""
    kept = [np.flatnonzero(inp.keep) for inp in inputs]
    if sum(k.size for k in kept) == 0:
        dropped = collections.Counter()
        for inp in inputs:
            dropped.update(inp.qc.dropped)
        reasons = ", ".join(f"{k.removeprefix('cells_dropped_')}: {v:,}" for k, v in dropped.items() if v)
        excluded = sum(int(inp.exclude.sum()) for inp in inputs)
        if excluded:
            reasons = ", ".join(filter(None, [reasons, f"no label: {excluded:,}"]))
        raise InputError(f"no cell is left to write ({reasons}); relax the qc settings or check the labels")
    if cfg.split.column is not None:
        codes = [
            split_from_column(inp.source.obs[cfg.split.column].iloc[k], inp.source.where, cfg.split.column)
            for inp, k in zip(inputs, kept)
        ]
    else:
        column = cfg.split.stratify_by or cfg.labels.column
        groups = (
            np.concatenate([inp.source.obs[column].astype(str).to_numpy()[k] for inp, k in zip(inputs, kept)])
            if column is not None
            else None
        )
        drawn = stratified_split(
            groups, sum(k.size for k in kept), cfg.split.val, cfg.split.test, cfg.split.seed
        )
        codes = np.split(drawn, np.cumsum([k.size for k in kept])[:-1])
    for inp, k, c in zip(inputs, kept, codes):
        inp.splits = np.full(inp.source.n_obs, NOT_KEPT, dtype=np.uint8)
        inp.splits[k] = c


# --------------------------------------------------------------------------------------------- write


def _meta_columns(cfg: CellsPrepConfig) -> list[str]:
    extra = [cfg.labels.column] if cfg.labels.column else []
    extra += [c for c in cfg.obs_columns if c not in extra]
    return ["id", "source", *extra]


_MIN_BATCH_CELLS = 5  # a batch's cells below which a batch column looks like a per-cell one


def _batch_names(cfg: CellsPrepConfig, inputs: list[CellInput]) -> list[str] | None:
    """The batch_column's values over the cells written (sorted, as text): record field `batch` indexes them."""
    if cfg.batch_column is None:
        return None
    names: set[str] = set()
    sizes: collections.Counter = collections.Counter()
    for inp in inputs:
        assert inp.batches is not None and inp.splits is not None
        kept = inp.batches[inp.splits != NOT_KEPT].tolist()
        names.update(kept)
        sizes.update(kept)
    # a cell-id or barcode column given as the batch is accepted as one batch per cell, and the
    # decoder then reads which cell it rebuilds: say so rather than train on it silently
    if len(sizes) > 1 and float(np.median(list(sizes.values()))) < _MIN_BATCH_CELLS:
        log.warning(
            "the batch column %r (batch_column) has %s values for %s cells (half of them with fewer than %d "
            "cells): a batch is a sample, run or donor, each of many cells; is %r a per-cell column (an id, "
            "a barcode)?",
            cfg.batch_column,
            f"{len(sizes):,}",
            f"{sum(sizes.values()):,}",
            _MIN_BATCH_CELLS,
            cfg.batch_column,
        )
    return sorted(names)


def _label_names(cfg: CellsPrepConfig, inputs: list[CellInput]) -> list[str] | None:
    """The store's classes; one number written two ways (`3`, `3.0`) is refused, naming the inputs."""
    if not cfg.labels.column:
        return None
    kept = [set(map(str, inp.labels[inp.splits != NOT_KEPT])) for inp in inputs]
    names = set().union(*kept)
    groups = label_spellings(names)
    if groups:
        where = {
            name: next(inp.source.where for inp, own in zip(inputs, kept) if name in own) for name in names
        }
        shown = "; ".join(" and ".join(f"{name!r} ({where[name]})" for name in group) for group in groups[:3])
        raise InputError(
            f"obs[{cfg.labels.column!r}] writes one number in several ways: {shown}"
            f"{f' and {len(groups) - 3} more' if len(groups) > 3 else ''}; each would be a class of its "
            "own -- write every label one way, e.g. "
            f"adata.obs[{cfg.labels.column!r}].replace({{{groups[0][1]!r}: {groups[0][0]!r}}})"
        )
    return label_order(names)


def write_store(
    cfg: CellsPrepConfig, inputs: list[CellInput], vocab: GeneVocabulary, out: Path
) -> dict[str, Any]:
    scheme = make_scheme(cfg.tokenizer, vocab)
    label_names = _label_names(cfg, inputs)
    label_index = {name: i for i, name in enumerate(label_names or [])}
    batch_names = _batch_names(cfg, inputs)
    meta_columns = _meta_columns(cfg)
    record_fields: dict[str, Any] = {"labels": np.int64} if label_names is not None else {}
    if batch_names is not None:
        record_fields["batch"] = np.int64
    # A panel store from counts keeps each cell's library size, so a count likelihood can rebuild the
    # raw counts (expm1(value) * library_size / target_sum); normalised inputs have no counts to keep.
    with_library = scheme.complete_profile and cfg.counts.mode in COUNT_MODES
    if with_library:
        record_fields["library_size"] = np.float64
    writer = TokenStoreWriter(
        out,
        token_fields=scheme.token_fields(token_dtype(vocab.vocab_size)),
        record_fields=record_fields,
        meta_columns=meta_columns,
        shard_tokens=cfg.shard_tokens,
    )
    for split in SPLITS:
        writer.split(split)  # every split exists, even when empty
    stats: collections.Counter = collections.Counter()
    class_counts = {s: collections.Counter() for s in SPLITS}
    target = cfg.normalise.target_sum
    total = sum(int((inp.splits != NOT_KEPT).sum()) for inp in inputs)
    with progress_bar(total, "tokenize", unit="cells") as bar:
        for inp in inputs:
            assert inp.converter is not None and inp.token_map is not None and inp.splits is not None
            obs = inp.source.obs
            counts_in_vocab = counts_total = 0.0
            for start, raw in inp.source.blocks(cfg.block_size):
                codes = inp.splits[start : start + raw.shape[0]]
                local = np.flatnonzero(codes != NOT_KEPT)
                if local.size == 0:
                    continue
                # Kept cells grouped by split (stable: file order within a split), so that one row
                # selection, one encode call and then plain slices give every split its records.
                local = local[np.argsort(codes[local], kind="stable")]
                counts = inp.converter(start, raw, check=False)
                sums = row_sums(counts)
                lib, observed = inp.libsize(start, sums)[local], sums[local]
                in_place = local.size == raw.shape[0] and bool((local == np.arange(local.size)).all())
                tokens = remap_columns(counts, inp.token_map, rows=None if in_place else local)
                counts_total += float(observed.sum())
                counts_in_vocab += float(tokens.data.sum(dtype=np.float64))
                expressed = np.diff(tokens.indptr) > 0
                if not expressed.all():
                    stats["cells_dropped_no_vocabulary_gene"] += int((~expressed).sum())
                    tokens, lib, local = tokens[expressed], lib[expressed], local[expressed]
                if local.size == 0:
                    continue
                cells = start + local
                scale = (target / lib).astype(np.float32)
                encoded = scheme.for_input(inp.token_map.targets).encode(tokens, scale, inp.offset + cells)
                meta = pd.DataFrame({"id": obs.index[cells], "source": inp.name})
                for column in meta_columns[2:]:
                    meta[column] = obs[column].to_numpy()[cells]
                labels = (
                    np.array([label_index[v] for v in inp.labels[cells]], dtype=np.int64)
                    if label_names is not None
                    else None
                )
                batches = (
                    np.searchsorted(batch_names, inp.batches[cells].astype(str)).astype(np.int64)
                    if batch_names is not None and inp.batches is not None
                    else None
                )
                bounds = np.searchsorted(inp.splits[cells], np.arange(len(SPLITS) + 1))
                for code, split in enumerate(SPLITS):
                    lo, hi = int(bounds[code]), int(bounds[code + 1])
                    if lo == hi:
                        continue
                    part = encoded.rows(lo, hi)
                    extra = {"labels": labels[lo:hi]} if labels is not None else {}
                    if batches is not None:
                        extra["batch"] = batches[lo:hi]
                    if with_library:
                        extra["library_size"] = lib[lo:hi]
                    writer.split(split).add_batch(
                        part.lengths, meta=meta.iloc[lo:hi], **part.fields(), **extra
                    )
                    stats[f"cells_{split}"] += hi - lo
                    if labels is not None:
                        class_counts[split].update(inp.labels[cells[lo:hi]].tolist())
                bar.update(local.size)
            inp.coverage["fraction_of_counts"] = counts_in_vocab / counts_total if counts_total else 0.0
    written = sum(stats[f"cells_{s}"] for s in SPLITS)
    if written == 0:
        raise InputError(
            "no cell expresses any vocabulary gene: nothing to write (check genes.column and the vocabulary)"
        )
    vocab_path = vocab.save(out / "tokenizer")
    for inp in inputs:
        for reason, n in inp.qc.dropped.items():
            stats[reason] += n
        rare = int(inp.rare.sum()) if inp.rare is not None else 0
        stats["cells_dropped_missing_label"] += int(inp.exclude.sum()) - rare
        if rare:  # only then: a manifest of a prep without labels.min_cells stays as it was
            stats["cells_dropped_rare_label"] += rare
        stats["cells_read"] += inp.source.n_obs
    return writer.finish(
        modality="cells",
        kind="expression",
        scheme=scheme.name,
        n_bins=cfg.tokenizer.n_bins if scheme.writes_bins() else None,
        max_length=scheme.max_length,
        values=_values_description(scheme, cfg),
        tokenizer={
            "kind": "genes",
            "vocab_size": vocab.vocab_size,
            "dir": "tokenizer",
            "sha256": sha256_file(vocab_path),
            "files": tokenizer_files(vocab_path.parent),
            "frozen_from": cfg.tokenizer.path,
            "medians": vocab.settings.get("medians"),
        },
        label_names=label_names,
        label_column=cfg.labels.column,
        # the model's batch covariate reads these (its checkpoint keeps the names)
        **({"batch": {"column": cfg.batch_column, "names": batch_names}} if batch_names is not None else {}),
        class_counts={s: {n: c[n] for n in label_names if n in c} for s, c in class_counts.items()}
        if label_names
        else None,
        gene_id_column=cfg.genes.column,
        coverage={inp.name: inp.coverage for inp in inputs},
        counts={inp.name: {"mode": cfg.counts.mode, **inp.summary.as_dict()} for inp in inputs},
        genes={inp.name: inp.gene_stats for inp in inputs},
        sources=[inp.describe() for inp in inputs],
        stats=dict(stats),
        config=cfg.model_dump(mode="json"),
        code=code_version(),
    )


def _values_description(scheme: Scheme, cfg: CellsPrepConfig) -> str:
    library = (
        f"obs[{cfg.counts.total_counts_column!r}]"
        if cfg.counts.total_counts_column
        else "the cell's total counts"
    )
    normalised = f"count / library_size * {cfg.normalise.target_sum:g} (library_size: {library})"
    return scheme.describe_values(normalised)


# --------------------------------------------------------------------------------------------- entry point


def prep_cells(cfg: CellsPrepConfig, *, overwrite: bool = False) -> Path:
    """Run the single-cell prep stage; return the token store's directory (reused when already current)."""
    space = GeneSpace()
    frozen = load_frozen(cfg.tokenizer)
    inputs = open_inputs(cfg, space, frozen)
    try:
        stage = stage_output(cfg, [with_origin(inp.describe()) for inp in inputs])
        if stage.is_current(overwrite=overwrite):
            TokenStore(cfg.output)  # reused only whole: a damaged store says so (and to use --overwrite)
            return Path(cfg.output)
        if frozen is not None:
            check_coverage(cfg, inputs, frozen, frozen=True)  # zero overlap fails before reading values
        prepare_inputs(cfg, inputs)
        stats = scan(cfg, inputs, space, build=frozen is None)
        assign_splits(cfg, inputs)
        if frozen is None:
            assert stats is not None
            vocab = build_vocabulary(cfg, inputs, space, stats)
            check_coverage(cfg, inputs, vocab, frozen=False)
        else:
            vocab = frozen
        to_token = vocab.token_map(space.names).targets  # gene space -> token id
        for inp in inputs:
            targets = np.where(inp.gene_targets >= 0, to_token[np.maximum(inp.gene_targets, 0)], -1)
            inp.token_map = ColumnMap(targets, vocab.vocab_size)
        with stage.writing(seeds={"split": cfg.split.seed, "tokenizer": cfg.tokenizer.seed}) as tmp:
            manifest = write_store(cfg, inputs, vocab, tmp)
    finally:
        close_inputs(inputs)
    _log_summary(Path(cfg.output), manifest)
    _warn_most_cells_dropped(cfg, manifest["stats"])
    return Path(cfg.output)


# QC dropping this share of the cells read is a warning (scvelo's pancreas through pbmc3k-panel.yaml's
# thresholds: 49 of 100 cells, by qc.max_genes)
_QC_WARN_SHARE = 0.25
# what each QC drop reason is set by, to name it in the warning
_QC_KEYS = {
    "zero_counts": "qc.zero_count_cells",
    "min_genes": "qc.min_genes",
    "max_genes": "qc.max_genes",
    "min_counts": "qc.min_counts",
    "max_counts": "qc.max_counts",
    "max_mito_fraction": "qc.max_mito_fraction",
    "missing_label": "labels.missing",
}


def _warn_most_cells_dropped(cfg: CellsPrepConfig, stats: dict[str, Any]) -> None:
    """The shipped configs' QC thresholds are their own set's (pbmc3k: 10x v1 chemistry, at most 2,500
    genes and 5 % mitochondrial counts); copied for other cells they can drop most of them, which the
    info line of drops alone does not make plain (a 10x v3 PBMC sample: 147 of 200 cells)."""
    read = stats.get("cells_read", 0)
    dropped = {
        k.removeprefix("cells_dropped_"): v for k, v in stats.items() if k.startswith("cells_dropped_") and v
    }
    total = sum(dropped.values())
    if not read or total < _QC_WARN_SHARE * read:
        return
    qc = cfg.qc.model_dump()
    reasons = []
    for reason, n in sorted(dropped.items(), key=lambda kv: -kv[1]):
        key = _QC_KEYS.get(reason, reason)
        setting = key.removeprefix("qc.")
        reasons.append(
            f"{n:,} by {key}" + (f" {qc[setting]}" if key.startswith("qc.") and setting in qc else "")
        )
    log.warning(
        "%s: QC dropped %s of the %s cells read (%s): %s. Check these thresholds suit these cells (a "
        "config's are set for its own data); null turns a filter off (e.g. qc.max_genes=null)",
        cfg.output,
        f"{total:,}",
        f"{read:,}",
        percent(total / read),
        ", ".join(reasons),
    )


def _log_summary(path: Path, manifest: dict[str, Any]) -> None:
    parts = [f"{name}: {s['num_records']:,} cells" for name, s in manifest["splits"].items()]
    log.info(
        "wrote %s (%s scheme, %d genes) -- %s",
        path,
        manifest["scheme"],
        manifest["tokenizer"]["vocab_size"] - NUM_SPECIAL,
        "; ".join(parts),
    )
    dropped = {
        k.removeprefix("cells_dropped_"): v for k, v in manifest["stats"].items() if "dropped" in k and v
    }
    if dropped:
        log.info(
            "cells dropped: %s", ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in sorted(dropped.items()))
        )
