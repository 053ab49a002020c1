"""The masker: ratio -> positions -> corruption -> targets, for one collated batch.

    masker = Masker(cfg.masking, target="tokens", vocab_size=10, total_steps=1000, seed=0, rank=0)
    masked = masker(batch, step)        # batch from biomask.training.data.collate

What it returns (a new dict; the input batch is not modified):
- `masked` (B, L) bool: the positions the loss is computed on;
- the corrupted inputs: `input_ids` (tokens target: [MASK] / random / kept), `bins` (bins target:
  0 = masked / random bin / kept) or `value_hidden` (values target: the value is hidden);
- `target_ids` (B, L) int64 (-100 where not masked) or `target_values` (B, L) float32;
- `ratio` (the drawn ratio per record) and `realised_ratio` (masked / maskable tokens, a 0-dim float
  tensor on the batch's device: reading it back would make the host wait for the GPU every batch).

With MAE corruption, masked tokens are replaced by the mask (no 80/10/10): the model drops them from
the encoder input and the decoder sees only the mask embedding there.
"""

from __future__ import annotations

from typing import Any

import torch

from biomask.masking.config import MaskingConfig
from biomask.masking.positions import span_positions, uniform_positions
from biomask.masking.ratio import RatioSampler
from biomask.vocab import MASK_ID, NUM_SPECIAL

IGNORE = -100  # target id of unmasked positions (torch's cross-entropy ignore_index)


def maskable_positions(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Content tokens: attended, and not a special token ([CLS], [SEP], [PAD], [MASK], [UNK])."""
    return batch["attention_mask"] & (batch["input_ids"] >= NUM_SPECIAL)


class Masker:
    """Masks batches reproducibly; its generators are part of the training checkpoint."""

    def __init__(
        self,
        cfg: MaskingConfig,
        *,
        target: str,
        vocab_size: int,
        n_bins: int = 0,
        total_steps: int = 1,
        seed: int = 0,
        rank: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        if target not in ("tokens", "bins", "values"):
            raise ValueError(f"unknown masking target {target!r}")
        self.cfg = cfg
        self.target = target
        self.vocab_size = int(vocab_size)
        self.n_bins = int(n_bins)
        self.device = torch.device(device)
        # Ratios: the same stream on every rank (one ratio per optimizer step's global batch, its
        # accumulated micro-batches included), per record a stream per rank. Positions: one per rank.
        self.ratios = RatioSampler(cfg.ratio, total_steps=total_steps, seed=seed, rank=rank)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int(seed) * 1_000_003 + 7919 * (int(rank) + 1))

    # ------------------------------------------------------------------------------------------------

    def __call__(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, Any]:
        maskable = maskable_positions(batch)
        ratio = torch.as_tensor(
            self.ratios.sample(step, maskable.shape[0]), dtype=torch.float32, device=maskable.device
        )
        return self.apply(batch, ratio, maskable=maskable)

    def apply(
        self, batch: dict[str, torch.Tensor], ratio: torch.Tensor, *, maskable: torch.Tensor | None = None
    ) -> dict[str, Any]:
        """Mask a batch at the given per-record ratios (used directly by the evaluation grid)."""
        maskable = maskable_positions(batch) if maskable is None else maskable
        n_maskable = maskable.sum(1)
        # Round to the nearest count; at least one token (a loss to compute), never all of them
        # when there are several (something left to predict from).
        n_mask = torch.floor(ratio * n_maskable + 0.5).long()
        n_mask = torch.minimum(n_mask.clamp(min=1), (n_maskable - 1).clamp(min=1))
        n_mask = torch.minimum(n_mask, n_maskable)
        if self.cfg.positions.kind == "span":
            masked = span_positions(
                maskable,
                n_mask,
                self.generator,
                mean_span=self.cfg.positions.mean_span,
                max_span=self.cfg.positions.max_span,
            )
        else:
            masked = uniform_positions(maskable, n_mask, self.generator)
        out: dict[str, Any] = dict(batch)
        out["masked"] = masked
        out["ratio"] = ratio
        out["realised_ratio"] = masked.sum() / n_maskable.sum().clamp(min=1)
        # each record's own realised ratio is masked.sum(1) / n_maskable (a ratio drawn per record
        # shows there, where the batch's pooled ratio averages it away)
        out["n_maskable"] = n_maskable
        self._corrupt(batch, masked, out)
        return out

    def _corrupt(self, batch: dict[str, torch.Tensor], masked: torch.Tensor, out: dict[str, Any]) -> None:
        cfg = self.cfg.corruption
        if cfg.kind == "mae":  # the model drops masked tokens; the decoder only sees the mask there
            replace, randomise = masked, torch.zeros_like(masked)
        else:
            u = torch.rand(masked.shape, generator=self.generator, device=masked.device)
            replace = masked & (u < cfg.mask_token)
            randomise = masked & (u >= cfg.mask_token) & (u < cfg.mask_token + cfg.random_token)
        if self.target == "tokens":
            ids = batch["input_ids"]
            out["target_ids"] = torch.where(masked, ids, IGNORE)
            random_ids = torch.randint(
                NUM_SPECIAL, self.vocab_size, ids.shape, generator=self.generator, device=ids.device
            )
            corrupted = torch.where(replace, MASK_ID, ids)
            out["input_ids"] = torch.where(randomise, random_ids, corrupted)
        elif self.target == "bins":
            bins = batch["bins"]
            out["target_ids"] = torch.where(masked, bins, IGNORE)
            random_bins = torch.randint(
                1, self.n_bins + 1, bins.shape, generator=self.generator, device=bins.device
            )
            out["bins"] = torch.where(randomise, random_bins, torch.where(replace, 0, bins))
        else:  # values: a continuous value is hidden at every masked position (no random values)
            out["target_values"] = batch["values"]
            out["value_hidden"] = masked

    # ------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"ratios": self.ratios.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ratios.load_state_dict(state["ratios"])
        self.generator.set_state(state["generator"])
