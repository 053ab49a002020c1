"""The encoder's architecture: what `config.json` of a checkpoint carries so it can be rebuilt anywhere.

`EncoderConfig` is complete (vocabulary, modality, value embedding, target, sizes); `PRESETS` name the
sizes from `tiny` (tests, CPU) to `1b`. Parameter counts (DNA char vocabulary, 1,026 positions):
tiny ≈ 0.17 M, small ≈ 3.5 M, base ≈ 86 M, large ≈ 304 M, 1b ≈ 1.01 B.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

# The profile autoencoder (kind mlp): d_model is the latent (the cell embedding), d_ff the hidden
# width, n_layers the encoder's linear layers; n_heads is unused (1).
MLP_PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"d_model": 64, "n_layers": 2, "n_heads": 1, "d_ff": 256},  # cell-models.md's prototype
    "small": {"d_model": 128, "n_layers": 3, "n_heads": 1, "d_ff": 512},
    "base": {"d_model": 256, "n_layers": 3, "n_heads": 1, "d_ff": 1024},
}

# The dilated CNN (kind cnn, DNA): n_layers blocks of dilation 1, 2, 4, ...; d_ff the pointwise width;
# n_heads unused (1). tiny ≈ 0.18 M parameters (the transformer tiny's size class), receptive field
# 253 tokens with kernel 5; small ≈ 3.0 M, 2,045 tokens.
CNN_PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"d_model": 64, "n_layers": 6, "n_heads": 1, "d_ff": 64},
    "small": {"d_model": 192, "n_layers": 9, "n_heads": 1, "d_ff": 384},
}

# The model kinds, named once: the pretrain config's `model.kind`, a checkpoint's architecture and
# the registry `biomask.models.kinds.MODEL_KINDS` (which a test keeps in step with this list).
ModelKind = Literal["transformer", "mlp", "panel_transformer", "cnn"]

PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 256},
    "small": {"d_model": 256, "n_layers": 4, "n_heads": 4, "d_ff": 1024},
    "base": {"d_model": 768, "n_layers": 12, "n_heads": 12, "d_ff": 3072},  # BERT-base size
    "large": {"d_model": 1024, "n_layers": 24, "n_heads": 16, "d_ff": 4096},  # BERT-large size
    "1b": {"d_model": 2048, "n_layers": 20, "n_heads": 16, "d_ff": 8192},
}

# The kinds whose sizes are presets of their own (n_heads unused: 1); every other kind reads PRESETS.
# `model.preset` must name one of a kind's own presets (or custom).
KIND_PRESETS: dict[str, dict[str, dict[str, int]]] = {"mlp": MLP_PRESETS, "cnn": CNN_PRESETS}


@dataclass
class EncoderConfig:
    """Everything needed to rebuild the model (saved as `architecture` in a checkpoint's config.json)."""

    vocab_size: int
    modality: Literal["dna", "cells"] = "dna"
    # transformer: tokens through a transformer (DNA, cells); mlp: the expression-profile masked
    # autoencoder (cells; biomask.models.profile). One class per kind in `biomask.models.MODEL_KINDS`.
    kind: ModelKind = "transformer"
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 256
    dropout: float = 0.0
    max_len: int = 1026  # positions, [CLS] and [SEP] included
    norm_eps: float = 1e-5
    # Learned absolute positions: DNA and rank-encoded cells. Binned and panel cells are order-free.
    positions: bool = True
    # Cells: how a gene's value enters: none (rank), bins (embedding of 0..n_bins; 0 = masked), mlp.
    value_embedding: Literal["none", "bins", "mlp"] = "none"
    n_bins: int = 0
    scheme: str | None = None  # cells: binned | rank | panel
    target: Literal["tokens", "bins", "values"] = "tokens"
    decoder_layers: int = 0  # > 0: an MAE decoder of this depth (masked tokens leave the encoder input)
    activation_checkpointing: bool = False
    # Profile autoencoder (kind mlp): whether the input says which genes are hidden. With it the model
    # knows how much of the cell it sees (the "mask-aware" model of `biomask theory`, where a random
    # ratio can help); without it a hidden gene looks like a gene at its mean. An ablation switch.
    mask_indicator: bool = True
    # kind mlp: one more input, the share of the panel hidden in the cell (its mask ratio)
    ratio_input: bool = False
    # kind mlp: the cell embedding (the latent, `features(layer=-1)`) scaled to unit length. Cosine
    # geometry: the latent's norm tracks how far a profile is from the mean cell (depth, overall
    # activity) more than its type, and a kNN graph built on it mixes types (scGPT's embed_data
    # normalises the same way). Training is unchanged: the decoder reads the raw latent.
    # Checkpoints written before this field load with "none", so their embeddings stay as they were.
    embed_norm: Literal["none", "l2"] = "none"
    # kind mlp: the pretraining objective. mae: a masked gene enters as 0 with its mask indicator and
    # only the masked genes are reconstructed. scmae (Fang, Zheng & Li, Bioinformatics 2024): a masked
    # gene takes the value that gene has in another cell of the batch, so the input still looks like a
    # cell and nothing says which genes were swapped; the model reconstructs every gene and predicts
    # which were swapped (a second head). Checkpoints written before this field load as mae.
    objective: Literal["mae", "scmae"] = "mae"
    # Cells profile models (mlp, panel_transformer): what the masked genes' reconstruction is scored
    # by. mse: the standardised log1p values. poisson / nb: the raw counts given the library size
    # (scVI-style; nb with a learned per-gene dispersion; biomask.models.likelihood). Counts are
    # rebuilt from the store's values and its per-cell `library_size` (counts = expm1(value) *
    # library_size / target_sum), so only stores prepared from counts have them.
    loss: Literal["mse", "poisson", "nb"] = "mse"
    target_sum: float = 10000.0
    # panel_transformer: at most this many visible genes enter the encoder per cell during training
    # (a random subset; 0: all of them). Embedding reads every gene.
    max_visible: int = 0
    # kind cnn (biomask.models.cnn): the dilated convolutions' width (odd); block i dilates by 2**i
    kernel_size: int = 5
    # kind mlp: weight of the latent's variance-covariance penalty in training (0: none); training
    # only, so it does not change what a checkpoint computes
    decorrelation: float = 0.0
    # kind mlp: "visible": visible genes' values scaled by panel genes / visible genes in the encoder's
    # input (inverted dropout). Checkpoints written before this field load with "none".
    input_scale: Literal["none", "visible"] = "none"
    # kind mlp: the batches (a store's batch_column values) whose one-hot code the decoder reads
    # beside the latent; empty: no batch covariate. The encoder never reads it.
    batches: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        small = [
            f"{name} {getattr(self, name)}"
            for name, least in (("vocab_size", 1), ("d_model", 1), ("n_layers", 0), ("n_heads", 1), ("d_ff", 1),
                                ("max_len", 1), ("n_bins", 0), ("decoder_layers", 0), ("kernel_size", 1))
            if getattr(self, name) < least
        ]  # fmt: skip
        if small:
            raise ValueError(f"sizes out of range: {', '.join(small)}")
        # a negative norm_eps gives NaN embeddings, a dropout of 5 an error inside torch
        numbers = {"dropout": 0.0 <= self.dropout < 1.0, "norm_eps": 0.0 < self.norm_eps < 1.0,
                   "decorrelation": 0.0 <= self.decorrelation < math.inf, "max_visible": self.max_visible >= 0,
                   "target_sum": 0.0 < self.target_sum < math.inf}  # fmt: skip
        bad = [f"{name} {getattr(self, name)}" for name, ok in numbers.items() if not ok]
        if bad:
            raise ValueError(f"values out of range: {', '.join(bad)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")
        if self.value_embedding == "bins" and self.n_bins < 1:
            raise ValueError("value_embedding 'bins' needs n_bins >= 1")
        if self.target == "bins" and self.n_bins < 1:
            raise ValueError("target 'bins' needs n_bins >= 1")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncoderConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown architecture keys {unknown} (written by a newer biomask?)")
        from pydantic import TypeAdapter, ValidationError

        # each value of its field's type (a config.json is read, not trusted): a list for a name, a
        # string for a size is a ValueError naming the key, not an error deep inside the model
        try:
            config = TypeAdapter(cls).validate_python(data)
            # lax validation reads "64" as 64 and "no" as False: a config.json biomask wrote holds neither
            quoted = [
                k for k, v in data.items() if isinstance(v, str) and not isinstance(getattr(config, k), str)
            ]
            if quoted:
                raise ValueError(
                    f"{', '.join(quoted)}: a string where the architecture has a number or switch"
                )
            return config
        except ValidationError as exc:
            problems = [
                f"{'.'.join(map(str, e['loc'])) or 'architecture'}: {e['msg'].removeprefix('Value error, ')}"
                for e in exc.errors()
            ]
            raise ValueError("; ".join(problems)) from None
