"""Labelled DNA tasks derived from a genome's own annotation: real sequence, real labels, and a second
labelled DNA set beside the splice junctions (`datasets.md`: no other labelled DNA is fetchable here).

    biomask datasets task gene-starts --genome ecoli-k12 --output runs/tasks/ecoli-starts.csv
    biomask datasets task gene-starts --genome ecoli-k12 --placement centre --output ...   # a position task

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
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from biomask.errors import InputError, OutputExistsError

TASKS = ("gene-starts",)
PLACEMENTS = ("random", "centre")
_COMPLEMENT = str.maketrans("ACGT", "TGCA")


@dataclass(frozen=True)
class Gene:
    contig: str
    start: int  # 0-based position of the start codon's first base on the forward strand
    strand: int  # +1 or -1


def _annotated_starts(path: Path) -> Iterator[tuple[str, str, list[Gene]]]:
    """(contig id, sequence, CDS starts) per GenBank record; CDS with joined locations (introns,
    ribosomal slippage, origin-spanning) are left out: their start is not one simple codon."""
    from Bio import SeqIO

    from biomask.dna.readers import open_text

    with open_text(path) as handle:
        head = handle.read(1 << 12)
    if not head.lstrip().startswith("LOCUS"):
        raise InputError(f"{path} is not GenBank (a GenBank file starts with a LOCUS line): gene-starts "
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
                    f"{path}: GenBank record {count + 1} cannot be read ({exc}); gene-starts needs an "
                    "annotated genome with its sequence (an ORIGIN section)"
                ) from None
            if record is None:
                return
            count += 1
            genes = []
            for feature in record.features:
                if (
                    feature.type != "CDS"
                    or len(feature.location.parts) != 1
                    or "pseudo" in feature.qualifiers
                ):
                    continue
                loc = feature.location
                if loc.strand == 1:
                    genes.append(Gene(record.id, int(loc.start), 1))
                elif loc.strand == -1:
                    genes.append(Gene(record.id, int(loc.end) - 1, -1))  # the codon's first base, reversed
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
    if length < 20:
        raise InputError(f"length {length} is too short for a gene-start window (use >= 20 bases)")
    rng = np.random.default_rng(seed)
    starts: list[dict[str, str]] = []
    contigs: list[tuple[str, str, dict[int, set[int]]]] = []
    for contig, sequence, genes in _annotated_starts(Path(path)):
        taken: dict[int, set[int]] = {1: set(), -1: set()}
        for gene in genes:
            taken[gene.strand].add(gene.start)
            # offset of the codon's first base in the window, read in the gene's direction
            offset = length // 2 if placement == "centre" else int(rng.integers(length // 4, 3 * length // 4))
            left = gene.start - offset if gene.strand == 1 else gene.start + offset - length + 1
            window = _window(sequence, left, length, gene.strand)
            if window is not None:
                starts.append(_row(window, "start", contig, left, length, gene.strand))
        contigs.append((contig, sequence, taken))
    if not starts:
        raise InputError(f"{path}: no annotated CDS (single-interval, not pseudo) to take starts from")
    others = _other_windows(contigs, len(starts), length, rng)
    starts, others = _clean(starts, max_per_class, rng), _clean(others, max_per_class, rng)
    n = min(len(starts), len(others))
    mixed = starts[:n] + others[:n]
    order = rng.permutation(len(mixed))
    return [mixed[i] for i in order]


def _other_windows(
    contigs: list[tuple[str, str, dict[int, set[int]]]], n: int, length: int, rng: np.random.Generator
) -> list[dict[str, str]]:
    sizes = np.array([len(seq) - length for _, seq, _ in contigs], dtype=np.float64).clip(min=0)
    if sizes.sum() == 0:
        return []
    rows: list[dict[str, str]] = []
    for _ in range(20 * n):  # rejection: most random windows hold no start on their strand
        if len(rows) >= 2 * n:  # spare ones for the duplicates and non-ACGT windows left out
            break
        i = int(rng.choice(len(contigs), p=sizes / sizes.sum()))
        contig, sequence, taken = contigs[i]
        left, strand = int(rng.integers(0, int(sizes[i]) + 1)), int(rng.choice([1, -1]))
        if any(left <= s < left + length for s in taken[strand]):
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
    if output.exists() and not overwrite:
        raise OutputExistsError(f"output {output} exists; pass --overwrite to replace it")
    if genome in datasets.registry():
        path = datasets.fetch(genome)
    elif Path(genome).expanduser().is_file():
        path = Path(genome).expanduser()
    else:
        raise InputError(
            f"--genome {genome!r} is neither a registered dataset (biomask datasets list) nor a file"
        )
    rows = gene_start_windows(
        path, length=length, placement=placement, max_per_class=max_per_class, seed=seed
    )
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=["sequence", "label", "source"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output, text.getvalue())
    return output
