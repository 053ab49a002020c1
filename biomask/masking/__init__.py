"""Masking as a first-class component: ratio samplers, position samplers, corruption, targets.

`MaskingConfig` (one `scheme` switch, every key overridable) configures a `Masker`, which turns a
collated batch into a masked one on the training device. See README "Masking schemes".

The names below load on first use: the config alone needs no torch (`biomask pretrain` reads it
to decide whether a finished run is reused before it imports torch).
"""

from importlib import import_module
from typing import Any

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


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(f"biomask.masking.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'biomask.masking' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
