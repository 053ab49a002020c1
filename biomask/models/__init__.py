"""The encoder: one pre-LN transformer with modality embedders, prediction heads and an MAE decoder.

from biomask.models import load_pretrained
model = load_pretrained("runs/pretrain/dna-tiny/model")
vectors = model.embed(batch, pooling="cls", layer=-1)
"""

from biomask.models.config import MLP_PRESETS, PRESETS, EncoderConfig
from biomask.models.kinds import MODEL_KINDS, build_model
from biomask.models.model import MaskedEncoder
from biomask.models.pretrained import (
    check_tokenizer,
    load_pretrained,
    read_checkpoint_config,
    save_pretrained,
)
from biomask.models.profile import ProfileAutoencoder

__all__ = [
    "MLP_PRESETS",
    "MODEL_KINDS",
    "PRESETS",
    "EncoderConfig",
    "MaskedEncoder",
    "ProfileAutoencoder",
    "build_model",
    "check_tokenizer",
    "load_pretrained",
    "read_checkpoint_config",
    "save_pretrained",
]
