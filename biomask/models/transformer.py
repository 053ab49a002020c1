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


class QKVProjection(nn.Linear):
    """Queries, keys and values in one matmul, each returned as (B, heads, L, head_dim).

    With `rows` (B, Lq), queries only for those positions: the last block needs every position's keys
    and values but only the output rows' queries. The rows path still runs in this module's forward,
    so ZeRO-3 gathers the weight here as it does for any Linear; the state-dict keys are a Linear's."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__(d_model, 3 * d_model)
        self.n_heads = n_heads

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, rows: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, L, D = x.shape
        heads = (self.n_heads, D // self.n_heads)
        if rows is None:
            q, k, v = super().forward(x).view(B, L, 3, *heads).unbind(2)
        else:
            k, v = F.linear(x, self.weight[D:], self.bias[D:]).view(B, L, 2, *heads).unbind(2)
            x_rows = x.gather(1, rows[..., None].expand(-1, -1, D))
            q = F.linear(x_rows, self.weight[:D], self.bias[:D]).view(B, rows.shape[1], *heads)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


class SelfAttention(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.dropout = cfg.dropout
        self.qkv = QKVProjection(cfg.d_model, cfg.n_heads)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None, queries: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, L, D) -> (B, L, D); with `queries` (B, Lq) positions, only those rows: (B, Lq, D)."""
        q, k, v = self.qkv(x, queries)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        B, H, Lq, hd = y.shape
        return self.proj(y.transpose(1, 2).reshape(B, Lq, H * hd))


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
