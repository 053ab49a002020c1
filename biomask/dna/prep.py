"""`biomask prep dna`: DNA sequences in, a token store out.

Two kinds of input, never mixed in one store:

- genomes (FASTA/FASTA.gz): records are cleaned, split by region into train/val/test blocks, cut
  into windows, deduplicated across the whole corpus, and tokenized — streamed record by record;
- labelled sequences (CSV/TSV tables, KEEL files): cleaned, deduplicated (conflicting labels
  handled by policy), split by a split column or a seeded stratified draw, and tokenized.

The output directory is written atomically with its manifest, tokenizer, resolved config and run.json.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from biomask.dna.cleaning import Cleaner, reverse_complement
from biomask.dna.config import DNAPrepConfig, TokenizerConfig
from biomask.dna.labelled import LabelledRows, stratified_split
from biomask.dna.readers import (
    LabelledSequence,
    read_fasta_blocks,
    read_genbank_blocks,
    read_keel,
    read_table,
)
from biomask.dna.reuse import GENOME_FORMATS, ResolvedInput, renamed_genome, resolve_inputs, stage_output
from biomask.dna.tokenizers import (
    BPETokenizer,
    CharTokenizer,
    DNATokenizer,
    KmerTokenizer,
    OverlappingKmerTokenizer,
    load_tokenizer,
)
from biomask.dna.windows import SPLITS, WindowBatch, block_split, block_windows
from biomask.errors import InputError, StaleOutputError
from biomask.progress import bar as progress_bar
from biomask.provenance import code_version, sha256_file
from biomask.resources import restoring_env
from biomask.store import (
    TokenStore,
    TokenStoreWriter,
    label_order,
    label_spellings,
    token_dtype,
    tokenizer_files,
)

log = logging.getLogger(__name__)

GENOME_META = ("id", "source", "record", "start", "end", "strand")
LABELLED_META = ("id", "source", "line", "label")


# --------------------------------------------------------------------------------------------- tokenizer


def make_tokenizer(cfg: TokenizerConfig, training_texts: Callable[[], Iterable[str]]) -> DNATokenizer:
    """Reuse a saved tokenizer, build a fixed one, or train BPE on the training split's texts."""
    if cfg.path is not None:
        return load_tokenizer(cfg.path)
    if cfg.kind == "char":
        return CharTokenizer()
    if cfg.kind == "kmer":
        return KmerTokenizer(cfg.k)
    if cfg.kind == "overlapping_kmer":
        return OverlappingKmerTokenizer(cfg.k)
    log.info(
        "training a BPE vocabulary of %d tokens on up to %s training bases",
        cfg.vocab_size,
        f"{cfg.train_bases:,}",
    )
    return BPETokenizer.train(training_texts(), vocab_size=cfg.vocab_size)


def _tokenizer_manifest(tokenizer: DNATokenizer, directory: Path) -> dict[str, Any]:
    path = tokenizer.save(directory)
    return {
        **tokenizer.settings(),
        "vocab_size": tokenizer.vocab_size,
        "dir": directory.name,
        "sha256": sha256_file(path),
        "files": tokenizer_files(directory),
    }


# --------------------------------------------------------------------------------------------- genomes


class _Deduplicator:
    """Remembers a 128-bit digest of every window seen (its canonical strand when RC is on)."""

    def __init__(self, canonical_strand: bool) -> None:
        self.seen: set[bytes] = set()
        self.canonical_strand = canonical_strand

    def keep(self, windows: np.ndarray) -> np.ndarray:
        keys = windows
        keep = np.ones(len(windows), dtype=bool)
        rc = reverse_complement(windows) if self.canonical_strand else None
        for i, row in enumerate(keys):
            data = row.tobytes()
            if rc is not None:
                data = min(data, rc[i].tobytes())
            digest = hashlib.blake2b(data, digest_size=16).digest()
            if digest in self.seen:
                keep[i] = False
            else:
                self.seen.add(digest)
        return keep


# a FASTA header that carries a class (">seq1|label=promoter", ">seq1 class:1"): a genome reader ignores it
LABEL_IN_HEADER = re.compile(r"(label|class|target)\s*[=:]", re.IGNORECASE)
_TABLE_ADVICE = (
    "; a FASTA is read as an unlabelled genome, cut into windows (headers such as {example!r} are names "
    "to it, not labels). For a labelled set, one record per example, give a CSV/TSV table with a "
    "sequence and a label column (`format: table`; README: `biomask prep dna`)"
)


def _genome_windows(
    cfg: DNAPrepConfig,
    inputs: list[ResolvedInput],
    cleaner: Cleaner,
    counts: collections.Counter,
    desc: str,
    header_samples: list[str] | None = None,
    record_lengths: collections.Counter | None = None,
) -> Iterator[tuple[ResolvedInput, WindowBatch]]:
    """Every window of every input, streamed block by block (memory bounded by the block size).
    `header_samples` gets the first 20 record names, `record_lengths` the first 10,000 records' lengths
    (for the messages about inputs that give no windows)."""
    stride = cfg.windows.stride or cfg.windows.length
    budget = cfg.windows.max_bases if cfg.windows.max_bases is not None else float("inf")
    last_record = None
    seen: set[tuple[str, str]] = set()
    repeated: list[str] = []  # record names that occur twice in one input
    for inp in inputs:
        size = inp.path.stat().st_size
        with progress_bar(size, f"{desc} {inp.name}", unit="B") as bar:
            if inp.format == "genbank":
                blocks = read_genbank_blocks(inp.path, cfg.split.block_size)
            else:
                blocks = read_fasta_blocks(inp.path, cfg.split.block_size, on_read=bar.update)
            for record, offset, bases in blocks:
                if budget <= 0:
                    break
                bases = bases[: int(min(len(bases), budget))]
                budget -= len(bases)
                if offset == 0 or (inp.name, record) != last_record:  # blocks of a record start at 0
                    counts["records"] += 1
                    last_record = (inp.name, record)
                    if last_record in seen:
                        repeated.append(f"{inp.path}: '{record}'")
                    seen.add(last_record)
                counts["bases"] += len(bases)
                if header_samples is not None and len(header_samples) < 20 and offset == 0:
                    header_samples.append(record)
                if record_lengths is not None and (
                    len(record_lengths) < 10_000 or last_record in record_lengths
                ):
                    record_lengths[last_record] = offset + len(bases)
                where = f"{inp.path}, record '{record}'"
                chars, ambiguous = cleaner.clean(bases, where=where, offset=offset)
                counts["ambiguous_bases"] += int(ambiguous.sum())
                split = block_split(
                    f"{inp.name}/{record}",
                    offset // cfg.split.block_size,
                    cfg.split.val,
                    cfg.split.test,
                    cfg.split.seed,
                )
                for batch in block_windows(
                    f"{inp.name}/{record}",
                    offset,
                    chars,
                    ambiguous,
                    split=split,
                    length=cfg.windows.length,
                    stride=stride,
                    keep_tail=cfg.windows.keep_tail,
                    min_length=cfg.cleaning.min_length,
                    policy=cfg.cleaning.ambiguous,
                    max_ambiguous_fraction=cfg.cleaning.max_ambiguous_fraction,
                    counts=counts,
                ):
                    yield inp, batch
        if budget <= 0:
            break
    if repeated and desc == "prep":
        _warn_duplicates("record names", repeated)


def _warn_duplicates(what: str, names: list[str], total: int | None = None) -> None:
    """Duplicate ids do not stop prep (window ids and split draws stay defined), but are reported.
    `names` may be only the first few of `total`."""
    total = len(names) if total is None else total
    shown = ", ".join(names[:5]) + (f" and {total - 5} more" if total > 5 else "")
    log.warning(
        "duplicate %s (%d): %s; their records are kept, under the same id -- rename them if they differ",
        what,
        total,
        shown,
    )


def _window_meta(inp: ResolvedInput, batch: WindowBatch, strand: str) -> pd.DataFrame:
    record = batch.record[len(inp.name) + 1 :]  # batch.record is "{input name}/{record}"
    width = batch.windows.shape[1]
    ends = batch.starts + width
    return pd.DataFrame(
        {
            "id": [f"{record}:{s}-{e}({strand})" for s, e in zip(batch.starts.tolist(), ends.tolist())],
            "source": inp.name,
            "record": record,
            "start": batch.starts,
            "end": ends,
            "strand": strand,
        }
    )


def _prep_genome(
    cfg: DNAPrepConfig, inputs: list[ResolvedInput], cleaner: Cleaner, out: Path
) -> dict[str, Any]:
    def bpe_corpus() -> Iterator[str]:
        remaining = cfg.tokenizer.train_bases
        for _, batch in _genome_windows(cfg, inputs, cleaner, collections.Counter(), "BPE corpus"):
            if batch.split != "train":
                continue
            for row in batch.windows:
                yield row.tobytes().decode("ascii")
                remaining -= row.size
                if remaining <= 0:
                    return

    tokenizer = make_tokenizer(cfg.tokenizer, bpe_corpus)
    tok_info = _tokenizer_manifest(tokenizer, out / "tokenizer")
    writer = TokenStoreWriter(
        out,
        token_fields={"tokens": token_dtype(tokenizer.vocab_size)},
        meta_columns=GENOME_META,
        shard_tokens=cfg.shard_tokens,
    )
    for split in SPLITS:
        writer.split(split)  # every split exists, even when empty
    counts: collections.Counter = collections.Counter()
    dedup = (
        _Deduplicator(canonical_strand=cfg.windows.reverse_complement) if cfg.cleaning.deduplicate else None
    )
    header_samples: list[str] = []  # the first record names (labels in headers are a common mistake)
    record_lengths: collections.Counter = collections.Counter()
    for inp, batch in _genome_windows(cfg, inputs, cleaner, counts, "prep", header_samples, record_lengths):
        if dedup is not None:
            keep = dedup.keep(batch.windows)
            counts["windows_dropped_duplicate"] += int((~keep).sum())
            batch = WindowBatch(batch.split, batch.record, batch.windows[keep], batch.starts[keep])
            if not len(batch.starts):
                continue
        strands = [("+", batch.windows)]
        if cfg.windows.reverse_complement and batch.split == "train":
            strands.append(("-", reverse_complement(batch.windows)))
        for strand, windows in strands:
            encoded = tokenizer.encode_windows(windows)
            writer.split(batch.split).add_batch(
                encoded.lengths, tokens=encoded.values, meta=_window_meta(inp, batch, strand)
            )
            counts[f"windows_{batch.split}"] += len(windows)
    labelled = [n for n in header_samples if LABEL_IN_HEADER.search(n)]
    held_out = counts["windows_val"] + counts["windows_test"]
    if counts["windows_train"] == 0 and held_out:
        # a genome of one or two blocks: each block goes wholly to one split, and these all drew val/test
        raise InputError(
            f"no training windows from {', '.join(str(i.path) for i in inputs)}: all {held_out:,} windows "
            f"lie in blocks held out for validation or test (split.block_size={cfg.split.block_size:,} "
            f"bases, {counts['records']:,} records of at most {max(record_lengths.values(), default=0):,}); "
            "set a smaller split.block_size so each record spans several blocks, or split.val=0 split.test=0"
        )
    if counts["windows_train"] == 0:
        longest = max(record_lengths.values(), default=0)
        short = (
            f"; the records read are shorter than that (longest: {longest:,} bases, {counts['records']:,} records)"
            if 0 < longest < cfg.windows.length
            else ""
        )
        raise InputError(
            f"no training windows were produced from {', '.join(str(i.path) for i in inputs)} "
            f"(windows.length={cfg.windows.length}, cleaning.ambiguous={cfg.cleaning.ambiguous}{short}); "
            "shorten the windows or relax the cleaning policy"
            + (_TABLE_ADVICE.format(example=(labelled or header_samples)[0]) if labelled or short else "")
        )
    if labelled:
        log.warning(
            "%s%s",
            ", ".join(str(i.path) for i in inputs),
            _TABLE_ADVICE.format(example=labelled[0]).replace("; ", ": ", 1),
        )
    return writer.finish(
        modality="dna",
        kind="genome",
        tokenizer=tok_info,
        label_names=None,
        sources=[i.describe() for i in inputs],
        stats=dict(counts),
        config=cfg.model_dump(mode="json"),
        code=code_version(),
    )


# --------------------------------------------------------------------------------------------- labelled


def _labelled_rows(inp: ResolvedInput) -> Iterator[LabelledSequence]:
    """The rows of one labelled input, read lazily (a reader's errors come as the reading reaches them)."""
    spec = inp.spec
    if inp.format == "keel":
        return read_keel(inp.path)
    if inp.format == "task":
        return _task_rows(inp)
    return read_table(
        inp.path,
        sequence_column=spec.sequence_column,
        label_column=spec.label_column,
        split_column=spec.split_column,
        id_column=spec.id_column,
        delimiter=spec.delimiter,
    )


def _task_rows(inp: ResolvedInput) -> Iterator[LabelledSequence]:
    """The labelled windows `biomask datasets task` would write for this genome, in its order."""
    from biomask.datasets.annotation_tasks import task_windows

    task = inp.spec.task
    assert task is not None
    rows = task_windows(
        task.name,
        inp.path,
        length=task.length,
        placement=task.placement,
        max_per_class=task.max_per_class,
        seed=task.seed,
    )
    where = f"{inp.name} ({task.name})"
    for i, row in enumerate(rows, start=1):
        yield LabelledSequence(row["source"], row["sequence"], row["label"], None, where, i)


def _chunks(members: np.ndarray, lengths: np.ndarray, budget: int) -> Iterator[np.ndarray]:
    """`members` in runs of about `budget` bases: a split encoded whole held its tokens as int64 twice
    over (1.6 GB for 100 M bases) and went into one shard whatever `shard_tokens` said; in runs, the
    writer closes a shard at `shard_tokens`, as for genomes."""
    start, total = 0, 0
    for end, length in enumerate(lengths.tolist(), start=1):
        total += length
        if total >= budget:
            yield members[start:end]
            start, total = end, 0
    if start < len(members):
        yield members[start:]


_ENCODE_SLICE = 1 << 18  # bases


def _encode(tokenizer: DNATokenizer, texts: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(lengths, tokens) of `texts`, encoded in slices of ~256 Ki bases, each narrowed to the store's
    dtype at once: tokenizers return int64, and a run of 4 Mi bases encoded whole held ~70 MB of
    int64 tokens on the way (sequences are encoded one by one, so slicing changes no token)."""
    lengths, tokens = [], []
    start = 0
    while start < len(texts):
        end, size = start, 0
        while end < len(texts) and size < _ENCODE_SLICE:
            size += len(texts[end])
            end += 1
        encoded = tokenizer.encode_batch(texts[start:end])
        lengths.append(encoded.lengths)
        tokens.append(encoded.values.astype(dtype))
        start = end
    return np.concatenate(lengths), np.concatenate(tokens)


def _prep_labelled(
    cfg: DNAPrepConfig, inputs: list[ResolvedInput], cleaner: Cleaner, out: Path
) -> dict[str, Any]:
    policy = cfg.cleaning
    if policy.ambiguous == "split":
        raise InputError(
            "cleaning.ambiguous=split applies to genome records; use n_token, drop or error for labelled sequences"
        )
    # the spill lives in the output's temporary directory: on the output's disk, gone with it on failure
    rows = LabelledRows(
        out / ".labelled-rows.spill",
        cleaner,
        policy,
        digest_ids=any(inp.spec.id_column for inp in inputs),
    )
    try:
        return _write_labelled(cfg, inputs, rows, out)
    finally:
        rows.close()


def _check_label_spellings(
    rows: LabelledRows, kept: np.ndarray, label_codes: np.ndarray, present: list[int]
) -> None:
    """Refuse one label written two ways (`1` and `1.0`), naming where each spelling first occurs."""
    groups = label_spellings(rows.labels.values[c] for c in present)
    if not groups:
        return
    first = {rows.labels.values[c]: rows.where(int(kept[np.argmax(label_codes == c)])) for c in present}
    shown = "; ".join(" and ".join(f"{name!r} ({first[name]})" for name in group) for group in groups[:3])
    raise InputError(
        f"the label column writes one number in several ways: {shown}"
        f"{f' and {len(groups) - 3} more' if len(groups) > 3 else ''}; each would be a class of its "
        "own -- write every label one way in the table(s)"
    )


def _write_labelled(
    cfg: DNAPrepConfig, inputs: list[ResolvedInput], rows: LabelledRows, out: Path
) -> dict[str, Any]:
    for inp in inputs:
        rows.read(_labelled_rows(inp))
    rows.finish_reading()
    if rows.id_digest is not None:
        shown, total = rows.repeated_ids()
        if total:
            _warn_duplicates("ids", shown, total)
    if rows.error is not None:
        raise rows.error
    counts: collections.Counter = collections.Counter(rows_read=len(rows))
    counts.update(rows.dropped)
    kept = rows.clean_rows()
    if cfg.cleaning.deduplicate:
        kept = rows.deduplicate(kept, counts)
    if not len(kept):
        why = ", ".join(f"{n:,} {reason.removeprefix('dropped_').replace('_', ' ')}" for reason, n in counts.items()
                        if reason.startswith("dropped_") and n)  # fmt: skip
        raise InputError(
            f"{', '.join(str(inp.path) for inp in inputs)}: no sequences left after cleaning "
            f"({counts['rows_read']:,} rows read; dropped: {why or 'none'}); check the sequence and label "
            "columns, or relax the cleaning policy (cleaning.*)"
        )

    label_codes = rows.label_codes(kept)
    splits = rows.given_splits(kept)
    if splits is None:
        splits = stratified_split(
            label_codes, rows.labels.values, cfg.split.val, cfg.split.test, cfg.split.seed
        )

    present = np.unique(label_codes).tolist()
    _check_label_spellings(rows, kept, label_codes, present)
    label_names = label_order({rows.labels.values[c] for c in present})
    # a row's label code (order of first appearance) -> the store's class number (label_order)
    class_of = np.full(len(rows.labels.values), -1, dtype=np.int64)
    for i, name in enumerate(label_names):
        class_of[rows.labels.code(name)] = i
    tokenizer = make_tokenizer(cfg.tokenizer, lambda: rows.texts(kept[splits == SPLITS.index("train")]))
    tok_info = _tokenizer_manifest(tokenizer, out / "tokenizer")
    writer = TokenStoreWriter(
        out,
        token_fields={"tokens": token_dtype(tokenizer.vocab_size)},
        record_fields={"labels": np.int64},
        meta_columns=LABELLED_META,
        shard_tokens=cfg.shard_tokens,
    )
    dtype = token_dtype(tokenizer.vocab_size)
    source_names = [Path(s).name for s in rows.sources.values]
    bases = np.frombuffer(rows.length, dtype=np.int32)
    class_counts: dict[str, dict[str, int]] = {}
    for index, split in enumerate(SPLITS):
        members = kept[splits == index]
        part = writer.split(split)
        found = np.bincount(class_of[rows.label_codes(members)], minlength=len(label_names))
        class_counts[split] = {n: int(found[i]) for i, n in enumerate(label_names) if found[i]}
        for chunk in _chunks(members, bases[members], min(cfg.shard_tokens, 1 << 22)):
            texts, ids = rows.texts_and_ids(chunk.tolist())
            codes = rows.label_codes(chunk)
            meta = pd.DataFrame(
                {
                    "id": ids,
                    "source": [source_names[rows.source[i]] for i in chunk.tolist()],
                    "line": [rows.line[i] for i in chunk.tolist()],
                    "label": [rows.labels.values[c] for c in codes.tolist()],
                }
            )
            lengths, tokens = _encode(tokenizer, texts, dtype)
            part.add_batch(lengths, tokens=tokens, labels=class_of[codes], meta=meta)
    counts["kept"] = len(kept)
    return writer.finish(
        modality="dna",
        kind="labelled",
        tokenizer=tok_info,
        label_names=label_names,
        class_counts=class_counts,
        sources=[i.describe() for i in inputs],
        stats=dict(counts),
        config=cfg.model_dump(mode="json"),
        code=code_version(),
    )


# --------------------------------------------------------------------------------------------- entry point


def prep_dna(cfg: DNAPrepConfig, *, overwrite: bool = False) -> Path:
    """Run the DNA prep stage; return the token store's directory (reused when already current)."""
    inputs = resolve_inputs(cfg.inputs)
    stage = stage_output(cfg, inputs)
    renamed = None if overwrite else renamed_genome(cfg, inputs)
    if renamed:
        raise StaleOutputError(renamed)
    if stage.is_current(overwrite=overwrite):
        TokenStore(cfg.output)  # reused only whole: a damaged store says so (and to use --overwrite)
        return Path(cfg.output)
    cleaner = Cleaner(cfg.cleaning.lowercase, cfg.cleaning.ambiguous)
    genome = inputs[0].format in GENOME_FORMATS
    with restoring_env("RAYON_NUM_THREADS"), stage.writing(seeds={"split": cfg.split.seed}) as tmp:
        if cfg.num_workers > 1:  # the tokenizers library's threads (read when its pool starts)
            os.environ["RAYON_NUM_THREADS"] = str(cfg.num_workers)
        manifest = (_prep_genome if genome else _prep_labelled)(cfg, inputs, cleaner, tmp)
    _log_summary(Path(cfg.output), manifest)
    return Path(cfg.output)


def _log_summary(path: Path, manifest: dict[str, Any]) -> None:
    parts = [
        f"{name}: {s['num_records']:,} records, {s['num_tokens']:,} tokens"
        for name, s in manifest["splits"].items()
    ]
    log.info(
        "wrote %s (%s tokenizer, vocab %d) — %s",
        path,
        manifest["tokenizer"]["kind"],
        manifest["tokenizer"]["vocab_size"],
        "; ".join(parts),
    )
    dropped = {
        k.replace("dropped_", "").replace("_", " "): v
        for k, v in manifest["stats"].items()
        if "dropped" in k and v
    }
    if dropped:
        log.info("dropped: %s", ", ".join(f"{k} {v:,}" for k, v in sorted(dropped.items())))
