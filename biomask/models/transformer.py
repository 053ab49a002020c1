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

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(B, L, D))


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

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), attn_mask))
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
        self, x: torch.Tensor, attention_mask: torch.Tensor, *, all_layers: bool = False
    ) -> torch.Tensor | list[torch.Tensor]:
        """The final normalised states, or (all_layers) [input, block 1, ..., normalised last block]."""
        mask = sdpa_mask(attention_mask)
        hidden = [x]
        for block in self.blocks:
            if self.checkpointing and self.training:
                # Recompute activations in backward; must happen inside forward (ZeRO-3 gathers here).
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask)
            hidden.append(x)
        x = self.norm(x)
        if not all_layers:
            return x
        hidden[-1] = x
        return hidden
