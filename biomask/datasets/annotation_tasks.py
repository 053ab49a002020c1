"""Labelled DNA tasks derived from a genome's own annotation: real sequence, real labels, and more
labelled DNA sets beside the splice junctions (`datasets.md`: no other labelled DNA is fetchable here).

    biomask datasets task gene-starts --genome ecoli-k12 --output runs/tasks/ecoli-starts.csv
    biomask datasets task gene-starts --genome ecoli-k12 --placement centre --output ...   # a position task
    biomask datasets task coding --genome bjaponicum --max-per-class 3000 --output ...     # 3 classes

A task is a function from an annotated genome to labelled rows, registered in `TASKS`; adding one is a
function here and its entry there (prep's `TaskSpec.name` and `biomask datasets task` read `TASKS`).

`gene-starts`: windows of `length` bases read in a gene's direction (minus-strand genes reverse-
complemented). Label `start`: the window holds an annotated CDS start codon. Label `other`: a window at a
random position and strand of the same genome whose span holds no annotated CDS start on that strand
(coding, intergenic or both, as the genome has them). What tells them apart is what bacterial gene
starts carry: a Shine-Dalgarno site ~8 bases upstream of an ATG/GTG/TTG, the coding/non-coding change.

- `placement: random` (a motif task): the start codon sits at an offset drawn uniformly from the middle
  half of the window, so what matters is which motifs a window holds, not where: configs/evaluate/
  motif-task.yaml's kind of task.
- `placement: centre` (a position task): the start codon at `length // 2` in every window: where a motif
  sits matters, as in splice junctions: position-task.yaml's kind.

Classes are balanced (as many `other` windows as starts, at most `max_per_class` each, drawn with
`seed`); windows holding anything but A/C/G/T and exact duplicates are left out. The table (`sequence`,
`label`, `source`: contig:start-end(strand)) is what `biomask prep dna` reads as a labelled table.

`coding`: windows of `length` bases at random positions, read on a random strand, labelled by what the
annotation says about every base of them — `coding` (inside annotated CDS read in the genes' direction),
`antisense` (inside CDS read against it) or `noncoding` (no CDS on either strand); windows that mix
are left out. No motif carries the label: codon usage, the 3-base period and the strand asymmetry of
coding sequence do — composition, a bag-of-k-mers task of another kind than gene starts. Windows never
overlap (a test window shares no base with a training one), classes are balanced to the rarest (at
most `max_per_class`; without it, what about 4 × genome / `length` random draws give). `placement` is
gene-starts' option only.
"""

from __future__ import annotations

import bisect
import csv
import datetime as _dt
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from biomask.errors import InputError, OutputExistsError
from biomask.provenance import code_version, sha256_file

log = logging.getLogger(__name__)

PLACEMENTS = ("random", "centre")
_COMPLEMENT = str.maketrans("ACGT", "TGCA")


@dataclass(frozen=True)
class Gene:
    contig: str
    start: int  # 0-based position of the start codon's first base on the forward strand
    strand: int  # +1 or -1
    left: int  # the CDS's span on the forward strand: [left, right) (a joined CDS: its first part's)
    right: int
    # the bases it covers, [left, right) per part (a joined CDS: introns, slippage, across the origin)
    parts: tuple[tuple[int, int], ...] = ()
    # not taken as a start window (its span is not one interval, or its start is not annotated: a
    # 5'-partial CDS); still covered
    joined: bool = False


def _annotated_genes(path: Path, task: str) -> Iterator[tuple[str, str, list[Gene]]]:
    """(contig id, sequence, CDS) per GenBank record. A CDS with a joined location (introns, ribosomal
    slippage, origin-spanning) is marked `joined`: not taken as a start window, but its start is no
    `other` window's and its bases are coding (they were counted as noncoding before 2026-12-07)."""
    from Bio import SeqIO
    from Bio.SeqFeature import AfterPosition, BeforePosition

    from biomask.dna.readers import open_text

    with open_text(path) as handle:
        head = handle.read(1 << 12)
    if not head.lstrip().startswith("LOCUS"):
        raise InputError(f"{path} is not GenBank (a GenBank file starts with a LOCUS line): {task} "
                         "needs an annotated genome")  # fmt: skip
    with open_text(path) as handle:
        records = SeqIO.parse(handle, "genbank")
        count = 0
        while True:
            try:  # Biopython's errors (a malformed record, no sequence) name neither file nor record
                record = next(records, None)
                sequence = None if record is None else str(record.seq).upper()
            except ValueError as exc:
                raise InputError(
                    f"{path}: GenBank record {count + 1} cannot be read ({exc}); {task} needs an "
                    "annotated genome with its sequence (an ORIGIN section)"
                ) from None
            if record is None:
                return
            count += 1
            genes = []
            for feature in record.features:
                # /pseudogene="..." is INSDC's qualifier for one (ENA's files carry no /pseudo with it)
                if feature.type != "CDS" or {"pseudo", "pseudogene"} & set(feature.qualifiers):
                    continue
                loc = feature.location
                first = loc.parts[0]  # in the order translated (Biopython orders a complement(join) so)
                if first.strand not in (1, -1):
                    continue  # no strand: no reading direction to label by
                if any(part.strand != first.strand for part in loc.parts):
                    # parts on both strands (trans-spliced): each strand's parts are coding there (they
                    # were labelled noncoding), and no start window is taken from it
                    for strand in (1, -1):
                        on = [part for part in loc.parts if part.strand == strand]
                        if on:
                            spans = tuple((int(part.start), int(part.end)) for part in on)
                            at = spans[0][0] if strand == 1 else spans[0][1] - 1
                            genes.append(Gene(record.id, at, strand, *spans[0], spans, True))
                    continue
                parts = tuple((int(part.start), int(part.end)) for part in loc.parts)
                left, right = int(first.start), int(first.end)
                start = left if first.strand == 1 else right - 1  # the codon's first base, reversed
                # a 5'-partial CDS (`<` on the forward strand, `>` on the reverse) has no annotated start
                # codon: it was labelled a start all the same
                partial = isinstance(
                    first.start if first.strand == 1 else first.end, (BeforePosition, AfterPosition)
                )
                joined = len(parts) != 1 or partial
                genes.append(Gene(record.id, start, int(first.strand), left, right, parts, joined))
            yield record.id, sequence, genes


def _window(sequence: str, left: int, length: int, strand: int) -> str | None:
    """`length` bases from forward position `left`, read on `strand`; None off the contig's ends."""
    if left < 0 or left + length > len(sequence):
        return None
    piece = sequence[left : left + length]
    return piece if strand == 1 else piece.translate(_COMPLEMENT)[::-1]


def gene_start_windows(
    path: str | os.PathLike,
    *,
    length: int = 200,
    placement: str = "random",
    max_per_class: int | None = None,
    seed: int = 0,
) -> list[dict[str, str]]:
    """The `gene-starts` rows (see the module docstring), starts and others interleaved by seed."""
    if placement not in PLACEMENTS:
        raise InputError(f"placement must be one of {', '.join(PLACEMENTS)}, not {placement!r}")
    rng = np.random.default_rng(seed)
    starts: list[dict[str, str]] = []
    contigs: list[tuple[str, str, dict[int, list[int]]]] = []  # each strand's starts, sorted
    n_genes = 0
    for contig, sequence, genes in _annotated_genes(Path(path), "gene-starts"):
        taken: dict[int, set[int]] = {1: set(), -1: set()}
        n_genes += sum(not g.joined for g in genes)
        for gene in genes:
            taken[gene.strand].add(gene.start)
            if gene.joined:
                continue
            # offset of the codon's first base in the window, read in the gene's direction
            offset = length // 2 if placement == "centre" else int(rng.integers(length // 4, 3 * length // 4))
            left = gene.start - offset if gene.strand == 1 else gene.start + offset - length + 1
            window = _window(sequence, left, length, gene.strand)
            if window is not None:
                starts.append(_row(window, "start", contig, left, length, gene.strand))
        contigs.append((contig, sequence, {strand: sorted(at) for strand, at in taken.items()}))
    if not starts and n_genes:
        raise InputError(
            f"{path}: none of its {n_genes:,} annotated CDS starts has a {length}-base window inside its "
            "contig (each lies too near a contig end); use a shorter --length"
        )
    if not starts:
        raise InputError(f"{path}: no annotated CDS (single-interval, not pseudo) to take starts from")
    others = _other_windows(contigs, len(starts), length, rng)
    starts, others = _clean(starts, max_per_class, rng), _clean(others, max_per_class, rng)
    n = min(len(starts), len(others))
    if n == 0:
        raise InputError(
            f"{path}: no {length}-base windows for both labels (start, other); try a shorter --length"
        )
    mixed = starts[:n] + others[:n]
    order = rng.permutation(len(mixed))
    return [mixed[i] for i in order]


def _other_windows(
    contigs: list[tuple[str, str, dict[int, list[int]]]], n: int, length: int, rng: np.random.Generator
) -> list[dict[str, str]]:
    sizes = np.array([len(seq) - length for _, seq, _ in contigs], dtype=np.float64).clip(min=0)
    if sizes.sum() == 0:
        return []
    # An `other` window only keeps every start codon out; it may share bases with a start window or
    # another `other` window, so split record by record, a test window can overlap a training one
    # (docs/dna-models.md measures what that does: little, and the same to every method).
    rows: list[dict[str, str]] = []
    for _ in range(20 * n):  # rejection: most random windows hold no start on their strand
        if len(rows) >= 2 * n:  # spare ones for the duplicates and non-ACGT windows left out
            break
        i = int(rng.choice(len(contigs), p=sizes / sizes.sum()))
        contig, sequence, taken = contigs[i]
        left, strand = int(rng.integers(0, int(sizes[i]) + 1)), int(rng.choice([1, -1]))
        # the first start at or after `left` (each try scanned every start: 97 s of CPU at 20k genes)
        at = bisect.bisect_left(taken[strand], left)
        if at < len(taken[strand]) and taken[strand][at] < left + length:
            continue
        window = _window(sequence, left, length, strand)
        if window is not None:
            rows.append(_row(window, "other", contig, left, length, strand))
    return rows


def _row(window: str, label: str, contig: str, left: int, length: int, strand: int) -> dict[str, str]:
    source = f"{contig}:{left + 1}-{left + length}({'+' if strand == 1 else '-'})"
    return {"sequence": window, "label": label, "source": source}


def _clean(rows: list[dict[str, str]], limit: int | None, rng: np.random.Generator) -> list[dict[str, str]]:
    """Only A/C/G/T, no exact duplicates, at most `limit` (a random subset)."""
    seen: set[str] = set()
    kept = []
    for row in rows:
        seq = row["sequence"]
        if seq in seen or set(seq) - set("ACGT"):
            continue
        seen.add(seq)
        kept.append(row)
    if limit is not None and len(kept) > limit:
        kept = [kept[i] for i in sorted(rng.choice(len(kept), size=limit, replace=False))]
    return kept


CODING_LABELS = ("coding", "antisense", "noncoding")


def coding_windows(
    path: str | os.PathLike,
    *,
    length: int = 200,
    placement: str = "random",
    max_per_class: int | None = None,
    seed: int = 0,
) -> list[dict[str, str]]:
    """The `coding` rows (see the module docstring), the three classes interleaved by seed."""
    if placement != "random":
        raise InputError(f"placement {placement!r} is gene-starts' option; coding windows lie at random")
    rng = np.random.default_rng(seed)
    contigs = [(c, seq, genes) for c, seq, genes in _annotated_genes(Path(path), "coding")]
    if not any(genes for _, _, genes in contigs):
        raise InputError(f"{path}: no annotated CDS (not pseudo) to label windows by")
    # every eligible window start, by class: (contig index, left, strand read). 32-bit: a genome's
    # candidates are about one per base and class, and with 64-bit arrays prep held ~84 bytes a base
    found: dict[str, list[np.ndarray]] = {label: [] for label in CODING_LABELS}
    for index, (_, sequence, genes) in enumerate(contigs):
        starts = len(sequence) - length + 1
        if starts <= 0:
            continue
        full = {}
        for strand in (1, -1):  # bases of each window inside a CDS on this strand, from prefix sums
            edges = np.zeros(len(sequence) + 1, dtype=np.int32)
            for gene in (g for g in genes if g.strand == strand):
                for left, right in gene.parts:
                    edges[left] += 1
                    edges[right] -= 1
            covered = np.zeros(len(sequence) + 1, dtype=np.int32)
            np.cumsum(np.cumsum(edges, dtype=np.int32)[:-1] > 0, dtype=np.int32, out=covered[1:])
            del edges
            full[strand] = covered[length:] - covered[:starts]
            del covered
        plus_only = np.flatnonzero((full[1] == length) & (full[-1] == 0)).astype(np.int32)
        minus_only = np.flatnonzero((full[-1] == length) & (full[1] == 0)).astype(np.int32)
        neither = np.flatnonzero((full[1] == 0) & (full[-1] == 0)).astype(np.int32)
        del full

        def rows_of(lefts: np.ndarray, strands: np.ndarray | int, index: int = index) -> np.ndarray:
            columns = [np.full(len(lefts), index), lefts, np.broadcast_to(strands, lefts.shape)]
            return np.column_stack([np.asarray(c, dtype=np.int32) for c in columns])

        found["coding"] += [rows_of(plus_only, 1), rows_of(minus_only, -1)]
        found["antisense"] += [rows_of(plus_only, -1), rows_of(minus_only, 1)]
        found["noncoding"].append(rows_of(neither, rng.choice([1, -1], size=len(neither))))
        del plus_only, minus_only, neither
    used = [np.zeros(len(seq), dtype=bool) for _, seq, _ in contigs]  # windows never overlap
    wanted = None if max_per_class is None else max_per_class + max_per_class // 5  # spares: duplicates
    rows: dict[str, list[dict[str, str]]] = {}
    # the rarest class first, so that the others cannot take its few windows
    drawn: dict[str, list[tuple[int, int, int]]] = {}  # (contig index, left, strand) of each row
    for label in sorted(CODING_LABELS, key=lambda name: sum(len(a) for a in found[name])):
        candidates = np.concatenate(found[label]) if found[label] else np.empty((0, 3), dtype=np.int32)
        found[label] = []  # held once: concatenated, its parts go
        rows[label], drawn[label] = [], []
        for i in rng.permutation(len(candidates)):
            if wanted is not None and len(rows[label]) >= wanted:
                break
            index, left, strand = (int(v) for v in candidates[i])
            if used[index][left : left + length].any():
                continue
            used[index][left : left + length] = True
            contig, sequence, _ = contigs[index]
            window = _window(sequence, left, length, strand)
            assert window is not None
            rows[label].append(_row(window, label, contig, left, length, strand))
            drawn[label].append((index, left, strand))
        if wanted is None:  # without a limit, as many as the rarest class gives
            wanted = len(rows[label]) + len(rows[label]) // 5
    # coding and antisense are the same windows read on either strand: drawn one after the other, the
    # first could take every window and leave the other none (a sparsely coding genome: "no 200-base
    # window is antisense"). A short one gets half the difference from the other, read the other way
    for short, full in (("antisense", "coding"), ("coding", "antisense")):
        give = (len(rows[full]) - len(rows[short])) // 2
        if len(rows[short]) < (wanted or 0) and give > 0:
            for index, left, strand in drawn[full][-give:]:
                contig, sequence, _ = contigs[index]
                window = _window(sequence, left, length, -strand)
                assert window is not None
                rows[short].append(_row(window, short, contig, left, length, -strand))
            rows[full] = rows[full][:-give]
    # a sequence at two loci (repeats, rRNA operons) could land on both sides of a split: drop every copy
    counts = Counter(row["sequence"] for found_rows in rows.values() for row in found_rows)
    unique = {
        label: [r for r in found_rows if counts[r["sequence"]] == 1] for label, found_rows in rows.items()
    }
    kept = [_clean(unique[label], max_per_class, rng) for label in CODING_LABELS]
    n = min(len(k) for k in kept)
    if n == 0:
        empty = [label for label, k in zip(CODING_LABELS, kept) if not k]
        raise InputError(f"{path}: no {length}-base window is {' or '.join(empty)}; try a shorter --length")
    mixed = [row for k in kept for row in k[:n]]
    order = rng.permutation(len(mixed))
    return [mixed[i] for i in order]


# name -> function(genome path, *, length, placement, max_per_class, seed) -> rows
TASKS = {"gene-starts": gene_start_windows, "coding": coding_windows}


def task_windows(
    task: str, path: str | os.PathLike, *, length: int = 200, max_per_class: int | None = None, **options
) -> list[dict[str, str]]:
    """The rows of the registered `task` for the annotated genome at `path` (the options every task
    shares checked here)."""
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    if length < 20:
        raise InputError(f"length {length} is too short for a {task} window (use >= 20 bases)")
    if max_per_class is not None and max_per_class < 1:
        raise InputError(f"max_per_class {max_per_class}: at least 1 window per label (or leave it unset)")
    return TASKS[task](path, length=length, max_per_class=max_per_class, **options)


def _is_task_csv(path: Path) -> bool:
    """A CSV this command wrote: its first line is exactly the header it writes."""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.readline().rstrip("\r\n") == "sequence,label,source"
    except (OSError, UnicodeDecodeError):
        return False


def record_path(csv_path: Path) -> Path:
    """Where `biomask datasets task` records how a CSV was made: beside it, hidden (`.NAME.biomask.json`),
    so a pattern over the folder (`tasks/*`, `tasks/*.csv*`) still names the CSVs alone."""
    return csv_path.with_name(f".{csv_path.name}.biomask.json")


def _is_task_record(path: Path) -> bool:
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(found, dict) and found.get("made_by") == "biomask datasets task"


def write_task(
    task: str,
    genome: str,
    output: str | os.PathLike,
    *,
    length: int = 200,
    placement: str = "random",
    max_per_class: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Build `task` from `genome` (a registered dataset name or a GenBank path) into the CSV `output`
    (written under a temporary name, then renamed); returns it."""
    from biomask import datasets
    from biomask.outputs import atomic_write_text

    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    output = Path(output).expanduser()
    record = record_path(output)
    if output.exists():
        if not _is_task_csv(output):  # --overwrite replaces only a task CSV this command wrote
            raise OutputExistsError(
                f"output {output} exists and is not a task CSV of biomask's (header sequence,label,source); "
                "choose another output"
            )
        if not overwrite:
            raise OutputExistsError(f"output {output} exists; pass --overwrite to replace it")
    if record.exists() and not _is_task_record(record):
        raise OutputExistsError(
            f"{record} exists and is not the record of a task CSV of biomask's; the CSV's record would "
            "replace it. Move it away or choose another output"
        )
    if genome in datasets.registry():
        path = datasets.fetch(genome)
    elif Path(genome).expanduser().is_file():
        path = Path(genome).expanduser()
    else:
        raise InputError(
            f"--genome {genome!r} is neither a registered dataset (biomask datasets list) nor a file"
        )
    rows = task_windows(
        task, path, length=length, placement=placement, max_per_class=max_per_class, seed=seed
    )
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=["sequence", "label", "source"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output, text.getvalue())
    # how the CSV was made, beside it: a store prepared from it records only the CSV's path and sha256
    atomic_write_text(
        record,
        json.dumps(
            {
                "made_by": "biomask datasets task",
                "csv_sha256": sha256_file(output),
                "task": task,
                "genome": genome,
                "genome_sha256": sha256_file(path),
                "length": length,
                "placement": placement,
                "max_per_class": max_per_class,
                "seed": seed,
                "rows": len(rows),
                "code": code_version(),
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            },
            indent=2,
        )
        + "\n",
    )
    counts = Counter(r["label"] for r in rows)
    log.info(
        "%s of %s: %s windows of %d bases (%s) written to %s",
        task,
        genome,
        f"{len(rows):,}",
        length,
        ", ".join(f"{label} {n:,}" for label, n in sorted(counts.items())),
        output,
    )
    return output
