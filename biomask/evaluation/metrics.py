"""Classification metrics and the statistics biomask reports them with.

Every number is computed per seed, then summarised as mean, standard deviation and a 95 %
confidence interval (Student t over seeds). Two methods evaluated on the same splits (the same
seeds) are compared with a paired t-test on their per-seed differences.

Macro-F1 is the unweighted mean of the per-class F1 over the classes that occur in the test split,
as true labels or as predictions (sklearn's default set). A class absent from both cannot be scored
and is left out instead of counting as 0, which would lower the score of every method alike for a
split that merely lacks the class; a class predicted but absent from the truth scores 0 (its false
positives count). Reports say this (MACRO_F1_NOTE) and show each class's test support.
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

MACRO_F1_NOTE = (
    "Macro-F1: the unweighted mean of per-class F1 over the classes present in the test split (as true "
    "labels or predictions); a class absent from both is left out, not counted as 0."
)


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, label_names: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, macro-F1, MCC, a per-class report (with `support`: test records of the class), the
    classes absent from the test split, and the confusion matrix (rows: true labels)."""
    labels = list(range(len(label_names)))
    report = classification_report(
        y_true, y_pred, labels=labels, target_names=list(label_names), output_dict=True, zero_division=0
    )
    present = sorted(set(np.asarray(y_true).tolist()) | set(np.asarray(y_pred).tolist()))
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "mcc": float(matthews_corrcoef(y_true, y_pred)),
        "per_class": {name: report[name] for name in label_names},
        "absent_classes": [name for i, name in enumerate(label_names) if i not in present],
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def md_cell(text: object) -> str:
    """Text for a cell of a Markdown table: a `|` in a class label or a checkpoint's name split the
    row (every score after it under the wrong column), and a line break ended it; `<` and `>` are
    written as entities and brackets escaped, so a name is shown, never read as HTML or a link."""
    return (
        str(text)
        .replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace("|", "\\|")
        .replace("[", "\\[")  # a label written as a link is shown as text
        .replace("]", "\\]")
        .replace("\r", " ")
        .replace("\n", " ")
    )


def per_class_table(results: dict[str, Any]) -> list[str]:
    """Markdown: each class's test support (records per seed) and every method's F1 (mean over seeds)."""
    names = results["label_names"]
    methods = [m["name"] for m in results["methods"] if results["per_seed"].get(m["name"])]
    if not methods:
        return []
    rows = results["per_seed"][methods[0]]
    lines = [
        "",
        "## Per class: test support and F1",
        "",
        MACRO_F1_NOTE + " Support: test records of the class per seed (min–max over seeds).",
        "",
        "| class | support | " + " | ".join(map(md_cell, methods)) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for name in names:
        support = [int(r["per_class"][name]["support"]) for r in rows]
        shown = str(support[0]) if min(support) == max(support) else f"{min(support)}–{max(support)}"
        # over the seeds whose test split holds the class: an absent class's F1 of 0 is no score
        f1 = [
            [
                r["per_class"][name]["f1-score"]
                for r in results["per_seed"][m]
                if r["per_class"][name]["support"]
            ]
            for m in methods
        ]
        lines.append(
            f"| {md_cell(name)} | {shown} | "
            + " | ".join(f"{np.mean(v):.3f}" if v else "—" for v in f1)
            + " |"
        )
    absent = sorted({c for r in rows for c in r.get("absent_classes", [])})
    if absent:
        lines += [
            "",
            f"Absent from the test split of at least one seed (left out of macro-F1): {', '.join(absent)}.",
        ]
    return lines


# the range a metric can take: a t interval on few seeds can run past it, which no reader can use
METRIC_BOUNDS = {"accuracy": (0.0, 1.0), "macro_f1": (0.0, 1.0), "mcc": (-1.0, 1.0), "val_mcc": (-1.0, 1.0)}


def summarize(
    values: Sequence[float], confidence: float = 0.95, bounds: tuple[float, float] | None = None
) -> dict[str, float]:
    """Mean, sample standard deviation and a t-based confidence interval of per-seed values (cut to
    `bounds`, the metric's range, when given)."""
    arr = np.asarray(values, dtype=float)
    n = arr.size
    mean = float(arr.mean()) if n else math.nan
    sd = float(arr.std(ddof=1)) if n > 1 else math.nan
    if n > 1:
        half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n))
    else:
        half = math.nan
    low, high = mean - half, mean + half
    if bounds is not None and n > 1:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return {"mean": mean, "sd": sd, "ci_low": low, "ci_high": high, "n": n}


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


def signed(x: float, digits: int = 3) -> str:
    """`x` with its sign at `digits` decimals; one that rounds to zero gets up to two more, so a
    difference of −0.0003 is not shown as −0.000 (read as "costs"), and ±0.000 where even those
    round to zero."""
    for d in range(digits, digits + 3):
        text = f"{x:+.{d}f}"
        if float(text) != 0 or x == 0:
            return text if x != 0 else f"{0:+.{digits}f}"
    return f"±{0:.{digits}f}"


def format_summary(summary: dict[str, float], digits: int = 3) -> str:
    """`0.912 ± 0.011 [0.898, 0.926]` (mean ± sd [95 % CI]); one value, or the same value in every
    seed (a deterministic method on one split), has no interval and is not given a zero-width one."""
    if summary["n"] < 2:
        return f"{summary['mean']:.{digits}f}"
    if summary["sd"] <= 1e-12 * max(1.0, abs(summary["mean"])):  # float noise of equal values is no spread
        return f"{summary['mean']:.{digits}f} (the same in every seed: no interval)"
    return (
        f"{summary['mean']:.{digits}f} ± {summary['sd']:.{digits}f} "
        f"[{summary['ci_low']:.{digits}f}, {summary['ci_high']:.{digits}f}]"
    )
