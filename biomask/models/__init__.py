"""The encoder: one pre-LN transformer with modality embedders, prediction heads and an MAE decoder.

from biomask.models import load_pretrained
model = load_pretrained("runs/pretrain/dna-tiny/model")
vectors = model.embed(batch, pooling="cls", layer=-1)
"""

from biomask.lazy import lazy_names

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
    "read_checkpoint_config": "checkpoint_config",
    "save_pretrained": "pretrained",
    "ProfileAutoencoder": "profile",
}
__all__ = sorted(_WHERE)
__getattr__, __dir__ = lazy_names(__name__, _WHERE)
