"""The model kinds: `EncoderConfig.kind` -> the class that builds it. Adding a kind is one class in
one module (the interface: `forward(masked_batch)` -> {"loss", "n_masked", "n_correct"},
`features(batch, pooling, layer)` / `embed(...)` -> (B, d_model), `num_parameters()`, a `config`
attribute) plus its line here."""

from __future__ import annotations

from torch import nn

from biomask.models.cnn import DilatedCNN
from biomask.models.config import EncoderConfig
from biomask.models.model import MaskedEncoder
from biomask.models.panel_transformer import PanelTransformer
from biomask.models.profile import ProfileAutoencoder

# What the trainer, export, evaluate and embed call on every kind (besides its `config` attribute).
INTERFACE = ("forward", "features", "embed", "num_parameters")


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
    return kinds


MODEL_KINDS: dict[str, type[nn.Module]] = checked(
    {
        "transformer": MaskedEncoder,
        "mlp": ProfileAutoencoder,
        "panel_transformer": PanelTransformer,
        "cnn": DilatedCNN,
    }
)

# Kinds that read a cell's whole panel profile (never cropped) and reconstruct values or counts.
PROFILE_KINDS = ("mlp", "panel_transformer")


def rebuilt_on_continuing(kind: str) -> str:
    """The weights a run continuing a checkpoint (`model.init_from`) builds anew, by name prefix: a
    profile model's swap detector (scMAE's objective: new when it starts, gone when it ends); a
    token model's MAE decoder (the new run's corruption decides whether it has one)."""
    return "swap_head." if kind in PROFILE_KINDS else "decoder."


def build_model(cfg: EncoderConfig) -> nn.Module:
    """A freshly initialised model of the kind `cfg` names."""
    return MODEL_KINDS[cfg.kind](cfg)
