"""Reference predictors for the held-out masked loss: what a model has to beat to have learned anything.

A masked loss of 1.34 nats means nothing on its own. It means "nothing learned" when predicting every
masked DNA base by the genome's base frequencies already gives 1.34, and "local sequence statistics
only" when a k-mer context model reaches it. So the held-out evaluation scores, on the very tokens it
masked, two reference predictors whose counts come from the training split:

- `frequency`: P(x) from token counts (add-one smoothed), the context ignored;
- `context`: P(x | the unmasked tokens within ±k), from counts of (2k+1)-mers with add-one smoothing.
  A neighbour that is masked, a special token or beyond the record's ends is unknown: its axis of the
  count table is summed out, so the prediction is the exact (smoothed) conditional given what is
  visible. With every neighbour hidden this is the frequency predictor.

k = 2 (a 4-base context, 5^5 = 3,125 counts for A/C/G/T/N) is the largest k whose every context is
seen thousands of times in a bounded sample of a genome (10^6 bases / 625 contexts), so the smoothing
barely matters and the table stays tiny; k = 3 already has 78,125 cells, mostly sparse on small
corpora. A larger alphabet (k-mer or BPE tokens) lowers k until the table fits in `MAX_TABLE`; at
k = 0 only the frequency reference is reported. Only DNA gets a context model (cell tokens have no
meaningful neighbours); binned cells get bin frequencies; the profile autoencoder reports its own
gene-mean reference.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from biomask.outputs import atomic_write_text
from biomask.store import TokenSplit
from biomask.vocab import NUM_SPECIAL

CONTEXT_K = 2  # ±2 unmasked neighbours: see the module docstring
SAMPLE_TOKENS = 1_000_000  # training tokens counted: every 5-mer context seen ~1,600 times, < 1 s
MAX_TABLE = 1 << 16  # count-table cells; keeps references.json small and the marginals instant
FILE = "references.json"


@dataclass
class ContextCounts:
    """Counts of (2k+1)-token windows on a training sample; axis j of `counts` is offset j - k."""

    field: str  # the record field counted: "tokens" (DNA, rank cells) or "bins" (binned cells)
    low: int  # symbol s of the table is token id (or bin) low + s
    k: int
    counts: np.ndarray  # int64, shape (V,) * (2k + 1)
    n_records: int
    n_tokens: int

    @property
    def size(self) -> int:
        return self.counts.shape[0]

    @classmethod
    def count(
        cls,
        split: TokenSplit,
        *,
        field: str,
        low: int,
        high: int,
        k: int,
        max_tokens: int = SAMPLE_TOKENS,
    ) -> ContextCounts:
        """Count windows on records spread evenly over `split` (about `max_tokens` tokens)."""
        size = high - low
        while k > 0 and size ** (2 * k + 1) > MAX_TABLE:
            k -= 1
        width = 2 * k + 1
        lengths = split.lengths()
        n = len(lengths)
        mean = float(lengths.mean()) if n else 1.0
        picked = np.unique(
            np.linspace(0, n - 1, num=max(1, min(n, int(max_tokens / max(mean, 1.0)))))
        ).astype(int)
        powers = size ** np.arange(width - 1, -1, -1, dtype=np.int64)
        counts = np.zeros(size**width, dtype=np.int64)
        n_tokens = 0
        for i in picked if n else []:
            sym = np.asarray(split[int(i)][field], dtype=np.int64) - low
            n_tokens += len(sym)
            if len(sym) < width:
                continue
            windows = np.lib.stride_tricks.sliding_window_view(sym, width)
            windows = windows[((windows >= 0) & (windows < size)).all(axis=1)]  # [UNK]: not a symbol
            counts += np.bincount(windows @ powers, minlength=counts.size)
        return cls(field, low, k, counts.reshape((size,) * width), len(picked) if n else 0, n_tokens)

    # -------------------------------------------------------------------------------------------- scoring

    def log_probs(self, visible_axes: tuple[int, ...]) -> np.ndarray:
        """log P(centre | the neighbours on `visible_axes`), indexed [*their symbols, centre]."""
        hidden = tuple(a for a in range(2 * self.k + 1) if a != self.k and a not in visible_axes)
        marginal = self.counts.sum(axis=hidden) if hidden else self.counts
        # the centre's axis last, whatever the visible neighbours are
        centre = self.k - sum(a < self.k for a in hidden)
        marginal = np.moveaxis(marginal, centre, -1).astype(np.float64)
        return np.log(marginal + 1.0) - np.log(marginal.sum(axis=-1, keepdims=True) + self.size)

    def nll(self, symbols: torch.Tensor, masked: torch.Tensor, known: torch.Tensor) -> tuple[float, float]:
        """Summed negative log-likelihood (nats) of the masked symbols: (frequency, context).

        `symbols` (B, L): the original ids before masking; `masked` (B, L): the positions scored;
        `known` (B, L): positions a predictor may read (content tokens that are not masked)."""
        sym = symbols.detach().cpu().numpy().astype(np.int64) - self.low
        masked_np = masked.detach().cpu().numpy().astype(bool)
        inside = (sym >= 0) & (sym < self.size)
        known_np = known.detach().cpu().numpy().astype(bool) & inside & ~masked_np
        rows, cols = np.nonzero(masked_np & inside)
        centre = sym[rows, cols]
        frequency = -float(self.log_probs(())[centre].sum())
        if self.k == 0:
            return frequency, frequency
        offsets = [d for d in range(-self.k, self.k + 1) if d != 0]
        length = sym.shape[1]
        neighbours, seen = [], []
        for d in offsets:
            at = cols + d
            ok = (at >= 0) & (at < length)
            at = np.clip(at, 0, length - 1)
            seen.append(ok & known_np[rows, at])
            neighbours.append(np.where(seen[-1], sym[rows, at], 0))
        pattern = sum(s.astype(np.int64) << j for j, s in enumerate(seen))
        context = 0.0
        for p in np.unique(pattern):
            sel = pattern == p
            axes = tuple(j if d < 0 else j + 1 for j, d in enumerate(offsets) if p >> j & 1)
            index = tuple(neighbours[j][sel] for j, d in enumerate(offsets) if p >> j & 1)
            context -= float(self.log_probs(axes)[(*index, centre[sel])].sum())
        return frequency, context

    # -------------------------------------------------------------------------------------------- storage

    def describe(self) -> dict[str, Any]:
        """What the eval results record about the tables (the counts themselves: `FILE`)."""
        return {
            "file": FILE,
            "field": self.field,
            "k": self.k,
            "symbols": self.size,
            "first_id": self.low,
            "sample_records": self.n_records,
            "sample_tokens": self.n_tokens,
        }

    def save(self, run_dir: Path) -> None:
        """The count table as JSON (a few thousand integers), beside the run's metrics."""
        payload = {
            **self.describe(),
            "shape": list(self.counts.shape),
            "counts": self.counts.ravel().tolist(),
        }
        atomic_write_text(Path(run_dir) / FILE, json.dumps(payload) + "\n")


def reference_counts(
    split: TokenSplit, *, modality: str, target: str, vocab_size: int, n_bins: int
) -> ContextCounts | None:
    """The count tables a model's held-out evaluation is compared with, or None (values targets:
    the profile model reports its own gene-mean reference)."""
    if target == "tokens":
        k = CONTEXT_K if modality == "dna" else 0
        return ContextCounts.count(split, field="tokens", low=NUM_SPECIAL, high=vocab_size, k=k)
    if target == "bins":
        return ContextCounts.count(split, field="bins", low=1, high=n_bins + 1, k=0)
    return None
