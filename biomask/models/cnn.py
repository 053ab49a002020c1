"""The dilated convolutional DNA encoder (kind `cnn`): token embedding -> residual blocks of dilated 1-D
convolutions -> per-position states -> the masked-token prediction head.

    model = DilatedCNN(EncoderConfig(vocab_size=10, kind="cnn", **CNN_PRESETS["tiny"]))
    out = model(masked_batch)                      # {"loss", "n_masked", "n_correct"}: MLM training
    vectors = model.embed(batch, pooling="mean")   # (B, d_model): one vector per record

Why a CNN next to the transformer: at small scale, DNA tasks are mostly about short motifs and where
they sit; a convolution detects a motif wherever it is with few parameters, and dilations 1, 2, 4, ...
(block i: 2**i) grow the receptive field geometrically: with kernel k and n blocks a position sees
1 + (k - 1)(2**n - 1) tokens, e.g. 253 for the tiny preset (k 5, 6 blocks), more than a 128-base
record on both sides. There are no position embeddings: a CNN is translation-equivariant, so it reads
records of any length (`max_len` bounds nothing here); concat pooling keeps where things sit.

A block (pre-norm, residual, ConvNeXt / ByteNet-like): x + W2 GELU(W1 GELU(DilatedConv(LayerNorm(x)))),
with the dilated convolution d_model -> d_model and the pointwise layers W1: d_model -> d_ff, W2 back.
Padding is zeroed before every convolution, so a record's states are those of the record alone (as with
"same" zero padding): the vector of a record does not depend on its batch-mates.

Training is MLM only: masked positions are replaced by [MASK] (or a random token, or kept), the model
predicts them from their neighbourhood. MAE corruption (dropping masked tokens) would collapse the
spacing a convolution relies on, so the trainer refuses it (`masking.corruption.kind`).

Pooling: `mean` (the content tokens: padding, [CLS] and [SEP] excluded), `max` (their per-feature
maximum), `concat` (every content token's vector in order; fixed-length records) and `mean_layers`
(every block's mean, concatenated: the lower blocks' short-motif detectors next to the last). `cls` is
refused: a CNN's [CLS] position only sees its neighbourhood at the record's start, it is no summary of
the record.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from biomask.errors import InputError
from biomask.models.config import EncoderConfig
from biomask.models.model import Head, StatePooling, pool_content, pool_layers

POOLINGS = ("mean", "max", "concat", "mean_layers")


def receptive_field(cfg: EncoderConfig) -> int:
    """Tokens one output position sees (its own included)."""
    return 1 + (cfg.kernel_size - 1) * (2**cfg.n_layers - 1)


class ConvBlock(nn.Module):
    def __init__(self, cfg: EncoderConfig, dilation: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.conv = nn.Conv1d(
            cfg.d_model,
            cfg.d_model,
            cfg.kernel_size,
            dilation=dilation,
            padding=dilation * (cfg.kernel_size - 1) // 2,
        )
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff)
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """x (B, L, D); keep (B, L, 1): 1 at real tokens, 0 at padding."""
        h = self.norm(x) * keep  # padding enters the convolution as zeros: no leak across records
        # contiguous: GELU's backward on a transposed view against a contiguous gradient (from fc)
        # runs about 15x slower on CPU; the copy made the block's step 30 % faster (2026-12-04)
        h = self.conv(h.transpose(1, 2)).transpose(1, 2).contiguous()
        h = self.proj(F.gelu(self.fc(F.gelu(h))))
        return x + self.drop(h)


class ConvEncoder(nn.Module):
    """The blocks (dilation 2**i) and a final LayerNorm; `blocks` lets fine-tuning decay lr by depth."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ConvBlock(cfg, 2**i) for i in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        upto: int | None = None,
        all_layers: bool = False,
    ) -> torch.Tensor | list[torch.Tensor]:
        """The states after `upto` blocks (None: all, final LayerNorm applied), or (all_layers)
        [input, block 1, ..., normalised last block]."""
        keep = attention_mask[..., None].to(x.dtype)
        states = [x]
        for block in self.blocks[:upto]:
            x = block(x, keep)
            states.append(x)
        if upto is None:
            states[-1] = x = self.norm(x)
        return states if all_layers else x


class DilatedCNN(StatePooling, nn.Module):
    family = "sequence"  # biomask.models.kinds.FAMILIES: no positions, reads long records whole
    poolings = POOLINGS  # what `features` offers (evaluate's pooling: auto picks among these)
    # how far one output reads: inference reads a position-free kind's records in pieces this long
    receptive_field = staticmethod(receptive_field)

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        if cfg.modality != "dna":
            raise ValueError("the dilated CNN (kind 'cnn') reads DNA token stores only")
        if cfg.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (centred on a position), not {cfg.kernel_size}")
        self.config = cfg
        self.embedder = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder = ConvEncoder(cfg)
        self.head = Head(cfg, cfg.vocab_size)
        self.apply(self._init_weights)
        # GPT-2's depth scaling on each block's last projection: the residual stream's variance stays put
        for block in self.encoder.blocks:
            nn.init.normal_(block.proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear | nn.Conv1d) and module.bias is not None:
            nn.init.zeros_(module.bias)
        # Conv1d keeps PyTorch's fan-in (Kaiming-uniform) init: a 0.02 init over k * d inputs would
        # shrink the signal block after block

    def num_parameters(self, *, embeddings: bool = True) -> int:
        total = sum(p.numel() for p in self.parameters())
        return total if embeddings else total - self.embedder.weight.numel()

    def _states(
        self, batch: dict[str, torch.Tensor], upto: int | None = None, all_layers: bool = False
    ) -> torch.Tensor | list[torch.Tensor]:
        x = self.drop(self.embedder(batch["input_ids"]))
        return self.encoder(x, batch["attention_mask"], upto=upto, all_layers=all_layers)

    # -------------------------------------------------------------------------------------- training

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Masked-token cross-entropy on the positions `batch["masked"]` (a batch from the Masker)."""
        masked = batch["masked"]
        pred = self.head(self._states(batch)[masked])  # (n_masked, vocab_size)
        target = batch["target_ids"][masked]
        return {
            "loss": F.cross_entropy(pred.float(), target),
            "n_masked": torch.tensor(target.numel(), device=pred.device),
            "n_correct": (pred.argmax(-1) == target).sum(),
        }

    # -------------------------------------------------------------------------------------- embeddings

    def features(
        self, batch: dict[str, torch.Tensor], pooling: str = "mean", layer: int = -1
    ) -> torch.Tensor:
        """One vector per record with gradients; `layer` indexes [embeddings, block 1, ..., block n
        (final LayerNorm applied)] like a Python list. Pooling: mean, max, concat or mean_layers (see the
        module)."""
        self._check_pooling(pooling, layer)
        n = self.config.n_layers + 1
        if pooling == "mean_layers":
            states = self._states(batch, all_layers=True)
            return pool_layers(states, batch["input_ids"], batch["attention_mask"], layer)
        layer %= n
        h = self._states(batch, upto=None if layer == n - 1 else layer)
        return pool_content(h, batch["input_ids"], batch["attention_mask"], pooling)

    def _check_pooling(self, pooling: str, layer: int) -> None:
        if pooling == "cls":
            raise InputError(
                "pooling=cls: the cnn model kind has no [CLS] summary (its first position sees only the "
                "record's start); use pooling=mean, max, concat, or auto"
            )
        super()._check_pooling(pooling, layer)

    def _all_states(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return self._states(batch, all_layers=True)

    def _final_states(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._states(batch)

    @torch.no_grad()
    def embed(self, batch: dict[str, torch.Tensor], pooling: str = "mean", layer: int = -1) -> torch.Tensor:
        """`features` without gradients."""
        return self.features(batch, pooling, layer)
