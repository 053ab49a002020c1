"""SYNTHETIC labelled DNA task -- a check of the motif template, never a result on real data.

Real background, planted signal: 200-base windows at random positions of the C. elegans chrX genome
(the registry's `ce2-chrX`, windows with N skipped), every other one labelled `bound` and given one
instance of a degenerate 12-base motif (a CTCF-core-like consensus, each position the consensus base
with a probability drawn once from U(0.55, 0.9), otherwise one of the other three; either strand; a
random offset). The rest are `unbound`. k-mer counts see only fragments of so degenerate a motif
(k-mer LR MCC ≈ 0.43), where a convolution can learn the whole pattern: the situation of a
transcription-factor binding task without its composition signal (docs/dna-models.md).

    python -m benchmarks.planted_motif_task --output planted-motif.csv      # 8,000 windows, seed 0
    biomask prep dna -c configs/dna/splice.yaml 'inputs=[{path: planted-motif.csv, format: table}]' \\
        tokenizer.path=runs/main/prep_ecoli output=runs/prep/planted-motif
"""

from __future__ import annotations

import argparse
import csv
import gzip
from pathlib import Path

import numpy as np
from Bio import SeqIO

from biomask.datasets.registry import fetch
from biomask.outputs import atomic_file

CONSENSUS = "GCCACCAGGGGG"
LENGTH = 200
COMPLEMENT = str.maketrans("ACGT", "TGCA")


def planted_motif_rows(genome: str, n: int, seed: int) -> list[tuple[str, str]]:
    """`n` (sequence, label) rows, half `bound`, in the order drawn (the draw is fixed by `seed`)."""
    rng = np.random.default_rng(seed)
    keep = rng.uniform(0.55, 0.9, len(CONSENSUS))  # each position's chance of the consensus base

    def motif() -> str:
        bases = [
            c if rng.random() < p else str(rng.choice([b for b in "ACGT" if b != c]))
            for c, p in zip(CONSENSUS, keep, strict=True)
        ]
        site = "".join(bases)
        return site[::-1].translate(COMPLEMENT) if rng.random() < 0.5 else site

    rows: list[tuple[str, str]] = []
    while len(rows) < n:
        start = int(rng.integers(0, len(genome) - LENGTH))
        window = genome[start : start + LENGTH]
        if "N" in window:
            continue
        bound = len(rows) % 2 == 1
        if bound:
            site = motif()
            at = int(rng.integers(0, LENGTH - len(site)))
            window = window[:at] + site + window[at + len(site) :]
        rows.append((window, "bound" if bound else "unbound"))
    return rows


def _at_least_two(text: str) -> int:
    n = int(text)
    if n < 2:  # one of each label at least; argparse turns this into a message and exit 2
        raise argparse.ArgumentTypeError(f"{n}: at least 2 windows (one bound, one unbound)")
    return n


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--n", type=_at_least_two, default=8000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    args = parser.parse_args(argv)
    if args.output.exists() and not args.overwrite:
        parser.error(f"{args.output} exists; pass --overwrite to replace it")  # exit 2
    with gzip.open(fetch("ce2-chrX"), "rt") as handle:
        genome = str(next(SeqIO.parse(handle, "fasta")).seq).upper()
    rows = planted_motif_rows(genome, args.n, args.seed)
    with atomic_file(args.output) as tmp, tmp.open("w", newline="") as out:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["sequence", "label"])
        writer.writerows(rows)
    print(f"{args.output}: {len(rows)} SYNTHETIC windows (planted motif on C. elegans chrX)")


if __name__ == "__main__":
    main()
