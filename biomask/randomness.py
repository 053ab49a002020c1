"""The global random streams (Python's `random`, numpy's, torch's and CUDA's) and giving them back.

biomask's stages seed them (training, for reproducibility; fine-tuning and random-init baselines in
evaluate) and draw from them (dropout). In a notebook or script those streams are the caller's: after
a call, its own draws must be the ones its seed gives, not train.seed's.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from biomask.errors import Requeue


def global_streams() -> dict[str, Any]:
    """The state of every global generator a stage may seed or draw from."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_global_streams(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def callers_streams() -> Iterator[None]:
    """A Python caller's global streams as they were, when the block returns or raises. The `biomask`
    command exits after its stage: nothing to give back (and reading CUDA's state would set up every
    GPU before the stage picks its own)."""
    if Requeue.ends_process:
        yield
        return
    saved = global_streams()
    try:
        yield
    finally:
        restore_global_streams(saved)
