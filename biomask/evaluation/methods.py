"""A row of an evaluation: a named way to predict a seed's test labels (baselines and model protocols
alike), so the evaluate stage and the model protocols share it without importing each other."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from biomask.evaluation.data import LabelledRecords

# The group of the row that picks, per evaluation split, the checkpoint whose probe is best on validation.
CHOSEN_ON_VAL = "chosen on val"
# The group of the checkpoints' architecture left untrained: what pretraining adds is measured against it.
RANDOM_INIT = "random-init"

# Test predictions, or (test predictions, details for that seed's row: e.g. the chosen k or lr)
Predict = Callable[
    [LabelledRecords, np.ndarray, np.ndarray, np.ndarray, int], np.ndarray | tuple[np.ndarray, dict]
]


@dataclass
class Method:
    """One row of the results table: how to predict test labels from a seed's split."""

    name: str
    group: str  # "baseline", or the checkpoint name ("random-init" for the untrained architecture)
    protocol: str
    predict: Predict
    info: dict[str, Any] = field(default_factory=dict)  # reported with the method (e.g. its inputs)
