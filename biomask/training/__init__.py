"""Masked pretraining with the DeepSpeed engine (`biomask pretrain`).

`pretrain(config)` (in `biomask.training.trainer`) runs one from Python; `collate` (in
`biomask.training.data`) is the batch contract shared with evaluation and embedding.
"""

from biomask.lazy import lazy_names

# Loaded on first use, as the trainer is: they bring torch, and `biomask pretrain` decides whether a
# finished run is reused (biomask.training.rundir) before it imports torch at all.
_WHERE = {
    "DataSpec": "data",
    "collate": "data",
    "pretrain": "trainer",
}
__all__ = sorted(_WHERE)
__getattr__, __dir__ = lazy_names(__name__, _WHERE)
