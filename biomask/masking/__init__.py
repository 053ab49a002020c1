"""Masking as a first-class component: ratio samplers, position samplers, corruption, targets.

`MaskingConfig` (one `scheme` switch, every key overridable) configures a `Masker`, which turns a
collated batch into a masked one on the training device. See README "Masking schemes".
"""

from biomask.masking.config import SCHEMES, MaskingConfig
from biomask.masking.masker import IGNORE, Masker, maskable_positions
from biomask.masking.positions import span_positions, uniform_positions
from biomask.masking.ratio import RatioSampler

__all__ = [
    "IGNORE",
    "SCHEMES",
    "Masker",
    "MaskingConfig",
    "RatioSampler",
    "maskable_positions",
    "span_positions",
    "uniform_positions",
]
