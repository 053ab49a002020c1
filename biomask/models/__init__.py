"""The encoder: one pre-LN transformer with modality embedders, prediction heads and an MAE decoder.

from biomask.models import load_pretrained
model = load_pretrained("runs/pretrain/dna-tiny/model")
vectors = model.embed(batch, pooling="cls", layer=-1)
"""

from importlib import import_module
from typing import Any

# Loaded on first use: `biomask.models.config` alone needs no torch (`biomask pretrain` reads the
# config to decide whether a finished run is reused before it imports torch).
_WHERE = {
    "MLP_PRESETS": "config",
    "PRESETS": "config",
    "EncoderConfig": "config",
    "MODEL_KINDS": "kinds",
    "build_model": "kinds",
    "MaskedEncoder": "model",
    "check_tokenizer": "pretrained",
    "load_pretrained": "pretrained",
    "read_checkpoint_config": "pretrained",
    "save_pretrained": "pretrained",
    "ProfileAutoencoder": "profile",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(f"biomask.models.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'biomask.models' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
