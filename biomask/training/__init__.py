"""Masked pretraining with the DeepSpeed engine (`biomask pretrain`).

`collate` (in `biomask.training.data`) is the batch contract shared with evaluation and embedding.
Imported lazily, as the trainer is: they bring torch, and `biomask pretrain` decides whether a
finished run is reused (biomask.training.rundir) before it imports torch at all.
"""

from typing import Any

__all__ = ["DataSpec", "collate"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from biomask.training import data

        return getattr(data, name)
    raise AttributeError(f"module 'biomask.training' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
