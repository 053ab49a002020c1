"""Masked pretraining with the DeepSpeed engine (`biomask pretrain`).

`collate` (in `biomask.training.data`) is the batch contract shared with evaluation and embedding.
The trainer is imported lazily (it pulls in DeepSpeed).
"""

from biomask.training.data import DataSpec, collate

__all__ = ["DataSpec", "collate"]
