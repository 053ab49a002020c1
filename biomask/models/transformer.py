"""A pre-LayerNorm transformer encoder, nanoGPT-style: attention through
`torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient kernels where the
platform has them, plain math elsewhere; no custom kernel), padding handled by a boolean mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from biomask.models.config import EncoderConfig


class SelfAttention(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)  # one matmul for q, k and v
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None, queries: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, L, D) -> (B, L, D); with `queries` (B, Lq) positions, only those rows: (B, Lq, D)."""
        B, L, D = x.shape
        q, k, v = (
            t.transpose(1, 2) for t in self.qkv(x).view(B, L, 3, self.n_heads, D // self.n_heads).unbind(2)
        )
        if queries is not None:
            q = q.gather(2, queries[:, None, :, None].expand(-1, self.n_heads, -1, D // self.n_heads))
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(B, q.shape[2], D))


class MLP(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff)
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """x + attn(LN(x)), then x + mlp(LN(x)): pre-LN trains stably without warm-up tricks."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = SelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None, queries: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`queries` (B, Lq): compute only those positions' outputs (keys and values still see every
        position), (B, Lq, D)."""
        attended = self.attn(self.ln1(x), attn_mask, queries)
        if queries is not None:
            x = x.gather(1, queries[..., None].expand(-1, -1, x.shape[-1]))
        x = x + self.drop(attended)
        return x + self.drop(self.mlp(self.ln2(x)))


def sdpa_mask(attention_mask: torch.Tensor) -> torch.Tensor | None:
    """(B, L) bool -> (B, 1, 1, L) for SDPA (keys a query may attend to); None when nothing is padded,
    which lets SDPA take its fastest kernel."""
    if bool(attention_mask.all()):
        return None
    return attention_mask[:, None, None, :]


class Encoder(nn.Module):
    """A stack of blocks and a final LayerNorm."""

    def __init__(self, cfg: EncoderConfig, n_layers: int | None = None) -> None:
        super().__init__()
        self.checkpointing = cfg.activation_checkpointing
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers if n_layers is None else n_layers))
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        all_layers: bool = False,
        outputs: torch.Tensor | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """The final normalised states, or (all_layers) [input, block 1, ..., normalised last block].

        `outputs` (B, Lq) positions: only their final states are wanted -- (B, Lq, D). A training loss
        reads the masked positions only, so the last block computes just those rows (its keys and
        values still come from every position): the same loss and gradients, for a fraction of the
        last block's cost."""
        mask = sdpa_mask(attention_mask)
        hidden = [x]
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            queries = outputs if i == last else None
            if self.checkpointing and self.training:
                # Recompute activations in backward; must happen inside forward (ZeRO-3 gathers here).
                x = checkpoint(block, x, mask, queries, use_reentrant=False)
            else:
                x = block(x, mask, queries)
            hidden.append(x)
        x = self.norm(x)
        if not all_layers:
            return x
        hidden[-1] = x
        return hidden
