"""Masking as a first-class component: ratio samplers, position samplers, corruption, targets.

`MaskingConfig` (one `scheme` switch, every key overridable) configures a `Masker`, which turns a
collated batch into a masked one on the training device. See README "Masking schemes".
"""

from biomask.lazy import lazy_names

# Loaded on first use: the config alone needs no torch (`biomask pretrain` reads it to decide whether
# a finished run is reused before it imports torch).
_WHERE = {
    "IGNORE": "masker",
    "SCHEMES": "config",
    "Masker": "masker",
    "MaskingConfig": "config",
    "RatioSampler": "ratio",
    "maskable_positions": "masker",
    "span_positions": "positions",
    "uniform_positions": "positions",
}
__all__ = sorted(_WHERE)
__getattr__, __dir__ = lazy_names(__name__, _WHERE)
