"""Which tokens to mask, vectorised over the batch in torch (on the training device).

Both samplers mask exactly `n_mask[i]` of the maskable tokens of row `i` (never a special or padding
token). Exact counts matter: with a per-batch ratio and equal lengths every row masks the same number
of tokens, so the MAE encoder input stays rectangular.
"""

from __future__ import annotations

import torch


def _rank_among(scores: torch.Tensor) -> torch.Tensor:
    """Rank of every entry within its row (0 = smallest)."""
    order = scores.argsort(dim=1)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return ranks


def uniform_positions(
    maskable: torch.Tensor, n_mask: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Mask `n_mask[i]` maskable tokens of row i, chosen uniformly without replacement."""
    scores = torch.rand(maskable.shape, generator=generator, device=maskable.device)
    scores.masked_fill_(~maskable, 2.0)  # non-maskable tokens rank last and are never chosen
    return _rank_among(scores) < n_mask[:, None]


def span_positions(
    maskable: torch.Tensor,
    n_mask: torch.Tensor,
    generator: torch.Generator,
    *,
    mean_span: float,
    max_span: int,
) -> torch.Tensor:
    """Mask exactly `n_mask[i]` tokens of row i in non-overlapping spans with geometric lengths.

    Works in "maskable space" (row i's maskable tokens numbered 0..M_i-1; for DNA, the content between
    [CLS] and [SEP]). Span lengths are drawn until they cover the budget (the last one trimmed); the
    M - n unmasked tokens form M - n + 1 gaps, and each span goes into a distinct gap chosen uniformly
    (stars and bars), so spans never overlap and never merge.
    """
    device = maskable.device
    B, L = maskable.shape
    M = maskable.sum(1)
    n = torch.minimum(n_mask, M)
    K = max(int(n.max()), 1)
    # Span lengths, geometric on {1, 2, ...} with the given mean, clipped; trimmed to the budget.
    if mean_span > 1.0:
        lengths = torch.empty(B, K, device=device).geometric_(1.0 / mean_span, generator=generator)
    else:  # the geometric law at p = 1, which torch refuses: every span one token (config allows 1)
        lengths = torch.ones(B, K, device=device)
    lengths = lengths.clamp_(max=max_span).long()
    before = lengths.cumsum(1) - lengths  # tokens covered by the earlier spans
    lengths = torch.minimum(lengths, (n[:, None] - before).clamp(min=0))
    # A row has at most M - n + 1 gaps; extra spans are merged into the last allowed one.
    cap = (M - n + 1).clamp(min=1)
    over = torch.arange(K, device=device)[None, :] >= cap[:, None]
    extra = (lengths * over).sum(1)
    lengths = lengths.masked_fill(over, 0)
    lengths.scatter_add_(1, (cap - 1).clamp(max=K - 1)[:, None], extra[:, None])
    n_spans = (lengths > 0).sum(1)
    # Choose n_spans distinct gaps among 0..M-n, in increasing order.
    slots = torch.rand(B, L + 1, generator=generator, device=device)
    slots.masked_fill_(torch.arange(L + 1, device=device)[None, :] > (M - n)[:, None], 2.0)
    chosen = _rank_among(slots) < n_spans[:, None]
    gap = torch.where(chosen, torch.arange(L + 1, device=device), L + 1).sort(dim=1).values[:, :K]
    # Span j starts after gap j plus the lengths of the spans before it; paint with +1/-1 and a cumsum.
    starts = gap + lengths.cumsum(1) - lengths
    live = lengths > 0
    diff = torch.zeros(B, L + 2, dtype=torch.long, device=device)
    diff.scatter_add_(1, torch.where(live, starts, L + 1), live.long())
    diff.scatter_add_(1, torch.where(live, starts + lengths, L + 1), -live.long())
    covered = diff.cumsum(1)[:, :L] > 0  # in maskable space
    rank = (maskable.long().cumsum(1) - 1).clamp(min=0)  # maskable-space index of every position
    return maskable & covered.gather(1, rank)
