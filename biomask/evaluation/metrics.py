"""Classification metrics and the statistics biomask reports them with.

Every number is computed per seed, then summarised as mean, standard deviation and a 95 %
confidence interval (Student t over seeds). Two methods evaluated on the same splits (the same
seeds) are compared with a paired t-test on their per-seed differences.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats
from sklearn.metrics import (
    accuracy_score,
    classification_report,
    confusion_matrix,
    f1_score,
    matthews_corrcoef,
)

METRICS = ("accuracy", "macro_f1", "mcc")


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, label_names: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, macro-F1, MCC, a per-class report and the confusion matrix (rows: true labels)."""
    labels = list(range(len(label_names)))
    report = classification_report(
        y_true, y_pred, labels=labels, target_names=list(label_names), output_dict=True, zero_division=0
    )
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "mcc": float(matthews_corrcoef(y_true, y_pred)),
        "per_class": {name: report[name] for name in label_names},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def summarize(values: Sequence[float], confidence: float = 0.95) -> dict[str, float]:
    """Mean, sample standard deviation and a t-based confidence interval of per-seed values."""
    arr = np.asarray(values, dtype=float)
    n = arr.size
    mean = float(arr.mean()) if n else math.nan
    sd = float(arr.std(ddof=1)) if n > 1 else math.nan
    if n > 1:
        half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n))
    else:
        half = math.nan
    return {"mean": mean, "sd": sd, "ci_low": mean - half, "ci_high": mean + half, "n": n}


def paired_comparison(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Paired comparison of two methods over the same seeds: mean difference a - b with its 95 % CI,
    the paired t-test p-value, and how many seeds `a` won."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise ValueError("paired comparison needs the same seeds on both sides")
    diff = x - y
    summary = summarize(diff)
    if diff.size > 1 and np.any(diff != diff[0]):
        p_value = float(stats.ttest_rel(x, y).pvalue)
    else:
        p_value = math.nan if diff.size < 2 else (1.0 if diff[0] == 0 else 0.0)
    return {
        "mean_difference": summary["mean"],
        "ci_low": summary["ci_low"],
        "ci_high": summary["ci_high"],
        "p_value": p_value,
        "wins": int((diff > 0).sum()),
        "n": int(diff.size),
    }


def format_summary(summary: dict[str, float], digits: int = 3) -> str:
    """`0.912 ± 0.011 [0.898, 0.926]` (mean ± sd [95 % CI])."""
    if summary["n"] < 2:
        return f"{summary['mean']:.{digits}f}"
    return (
        f"{summary['mean']:.{digits}f} ± {summary['sd']:.{digits}f} "
        f"[{summary['ci_low']:.{digits}f}, {summary['ci_high']:.{digits}f}]"
    )
