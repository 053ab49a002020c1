"""SYNTHETIC labelled DNA tables for speed and memory benchmarks only -- never for results.

Uniform random A/C/G/T rows of one length, with a label from three classes, and the cases prep has
to handle mixed in at fixed rates: exact duplicates of an earlier row (about 1 %; a third of them
with a different label, so they conflict), and rows with an N (about 0.5 %). Written in blocks, so
a table of any size is generated in little memory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SYNTHETIC_NOTE = "SYNTHETIC: uniform random bases, three labels, ~1 % duplicates (benchmarks only)"
LABELS = ("promoter", "enhancer", "silencer")
_BASES = np.frombuffer(b"ACGT", dtype=np.uint8)


def write_table(path: Path, rows: int, length: int = 200, seed: int = 0, block: int = 50_000) -> Path:
    """A CSV with `sequence` and `label` columns, `rows` rows of `length` bases."""
    rng = np.random.default_rng(seed)
    earlier: list[tuple[bytes, int]] = []  # a small pool of rows to duplicate from
    with open(path, "wb") as handle:
        handle.write(b"sequence,label\n")
        for start in range(0, rows, block):
            n = min(block, rows - start)
            seqs = _BASES[rng.integers(0, 4, size=(n, length))]
            with_n = rng.random(n) < 0.005
            seqs[with_n, rng.integers(0, length, size=int(with_n.sum()))] = ord("N")
            labels = rng.integers(0, len(LABELS), size=n)
            duplicate = rng.random(n) < 0.01
            lines = []
            for i in range(n):
                seq, label = seqs[i].tobytes(), int(labels[i])
                if duplicate[i] and earlier:
                    seq, same = earlier[int(rng.integers(len(earlier)))]
                    label = same if rng.random() < 2 / 3 else (same + 1) % len(LABELS)
                elif len(earlier) < 1000:
                    earlier.append((seq, label))
                lines.append(seq + b"," + LABELS[label].encode() + b"\n")
            handle.write(b"".join(lines))
    return path
