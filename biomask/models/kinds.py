"""The model kinds: `EncoderConfig.kind` -> the class that builds it. Adding a kind is one class in
one module (the interface: `forward(masked_batch)` -> {"loss", "n_masked", "n_correct"},
`features(batch, pooling, layer)` / `embed(...)` -> (B, d_model), `num_parameters()`, a `config`
attribute, and a `family`, below) plus its line here and in `biomask.models.config.ModelKind`.

A kind's family says what it reads and how it trains, so the rest of biomask asks the family, never
the kind's name: `biomask.training.architecture` resolves a pretrain config for it, inference
decides how long a record it reads in one piece, evaluate whether a record is ever cropped."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from biomask.models.cnn import DilatedCNN
from biomask.models.config import EncoderConfig
from biomask.models.model import MaskedEncoder
from biomask.models.panel_transformer import PanelTransformer
from biomask.models.profile import ProfileAutoencoder

# What the trainer, export, evaluate and embed read on every kind (besides its `config` attribute;
# `poolings`: the poolings `features` offers).
INTERFACE = ("forward", "features", "embed", "num_parameters", "poolings")

# A kind's `family` class attribute:
# - tokens: token sequences with learned positions (DNA, rank or binned cells), up to `max_len`;
#   MLM or MAE corruption (the transformer).
# - sequence: DNA read position by position in place, no position embeddings: MLM only (MAE's
#   dropped tokens would break the spacing it reads), records longer than training read whole or in
#   long pieces (`receptive_field(config)`, when the class has it) (the dilated CNN).
# - profile: a cell's whole panel profile, never cropped; reconstructs values or counts (mlp,
#   panel_transformer).
FAMILIES = ("tokens", "sequence", "profile")


def checked(kinds: dict[str, type[nn.Module]]) -> dict[str, type[nn.Module]]:
    """`kinds`, each class checked for the interface now: a kind without `embed` would otherwise
    train and export, and fail with an AttributeError only when evaluate or embed first reads it."""
    for name, cls in kinds.items():
        missing = [m for m in INTERFACE if getattr(cls, m, None) in (None, getattr(nn.Module, m, None))]
        if missing:
            raise TypeError(
                f"model kind {name!r} ({cls.__name__}) does not define {', '.join(missing)} "
                "(the interface: biomask/models/kinds.py)"
            )
        if getattr(cls, "family", None) not in FAMILIES:
            raise TypeError(
                f"model kind {name!r} ({cls.__name__}) has family {getattr(cls, 'family', None)!r}; "
                f"give the class one of {', '.join(FAMILIES)} (biomask/models/kinds.py)"
            )
    return kinds


MODEL_KINDS: dict[str, type[nn.Module]] = checked(
    {
        "transformer": MaskedEncoder,
        "mlp": ProfileAutoencoder,
        "panel_transformer": PanelTransformer,
        "cnn": DilatedCNN,
    }
)


def family(kind: str) -> str:
    """The family of a registered kind (`FAMILIES`)."""
    return MODEL_KINDS[kind].family  # type: ignore[attr-defined, return-value]


# Kinds that read a cell's whole panel profile (never cropped) and reconstruct values or counts.
PROFILE_KINDS = tuple(name for name in MODEL_KINDS if family(name) == "profile")


def rebuilt_on_continuing(kind: str) -> str:
    """The weights a run continuing a checkpoint (`model.init_from`) builds anew, by name prefix: a
    profile model's swap detector (scMAE's objective: new when it starts, gone when it ends); a
    token model's MAE decoder (the new run's corruption decides whether it has one)."""
    return "swap_head." if kind in PROFILE_KINDS else "decoder."


def build_model(cfg: EncoderConfig) -> nn.Module:
    """A freshly initialised model of the kind `cfg` names (in float32, whatever torch's default)."""
    with float32_default():
        return MODEL_KINDS[cfg.kind](cfg)


@contextlib.contextmanager
def float32_default() -> Iterator[None]:
    """torch's default dtype as biomask's models are built and run: float32, whatever a caller set. A
    notebook's float64 (GPyTorch and BoTorch users set it) built float64 models, whose float32
    weights were then refused ("export the checkpoint again"), and DeepSpeed failed on their
    gradients. The caller's default is back when the block ends."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(dtype)
