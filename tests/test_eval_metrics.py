"""Metrics, seed statistics and the DNA baselines (on the real splice set)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from sklearn.model_selection import train_test_split

from biomask.dna.tokenizers import load_tokenizer
from biomask.evaluation.baselines import (
    C_GRID,
    Split,
    fit_threads,
    fit_tuned_logistic,
    kmer_frequencies,
    one_hot,
    tuned_logistic,
)
from biomask.evaluation.metrics import classification_metrics, format_summary, paired_comparison, summarize
from biomask.store import TokenStore


def test_metrics_match_hand_computation():
    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 1, 1, 1, 2, 0])
    m = classification_metrics(y_true, y_pred, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    f1 = [0.5, 0.8, 2 / 3]  # per class, from tp/fp/fn by hand
    assert m["macro_f1"] == pytest.approx(np.mean(f1))
    assert m["per_class"]["b"]["precision"] == pytest.approx(2 / 3)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    # Gorodkin's multi-class MCC from the confusion matrix
    c = np.array(m["confusion_matrix"], dtype=float)
    t, p, n, s = c.sum(1), c.sum(0), np.trace(c), c.sum()
    expected = (n * s - t @ p) / math.sqrt((s**2 - p @ p) * (s**2 - t @ t))
    assert m["mcc"] == pytest.approx(expected)


def test_seed_summary_and_paired_comparison():
    s = summarize([1, 2, 3, 4, 5])
    assert s["mean"] == 3 and s["sd"] == pytest.approx(math.sqrt(2.5))
    half = 2.7764451 * math.sqrt(2.5) / math.sqrt(5)  # t(0.975, 4)
    assert (s["ci_low"], s["ci_high"]) == (pytest.approx(3 - half), pytest.approx(3 + half))
    assert format_summary(s).startswith("3.000 ± 1.581 [")
    # a deterministic method on one split scores the same in every seed: no zero-width "interval"
    assert format_summary(summarize([0.937] * 5)) == "0.937 (the same in every seed: no interval)"
    # ... also where the equal values differ in the last bit (a mean over splits): not "± 0.000 [a, a]"
    assert format_summary(summarize([0.1 + 0.2, 0.3, 0.3])) == "0.300 (the same in every seed: no interval)"
    # few seeds of a bounded metric: the interval stops at the metric's range
    tiny = summarize([0.2, 1.0, 0.9], bounds=(-1.0, 1.0))
    assert tiny["ci_high"] == 1.0 and tiny["ci_low"] < 0.2 and tiny["mean"] == pytest.approx(0.7)
    cmp = paired_comparison([0.9, 0.8, 0.85, 0.95], [0.8, 0.75, 0.8, 0.9])
    assert cmp["mean_difference"] == pytest.approx(0.0625)
    # differences 0.1, 0.05, 0.05, 0.05: t = mean / (sd / sqrt(4)) = 5.0 with 3 df -> p = 0.01539
    assert cmp["wins"] == 4 and cmp["p_value"] == pytest.approx(0.015392, abs=1e-5)
    with pytest.raises(ValueError):
        paired_comparison([1, 2], [1])


@pytest.mark.network
def test_position_aware_one_hot_is_the_strong_dna_baseline(splice_store):
    """On splice junctions, one-hot + logistic regression far outperforms a bag of k-mers."""
    store = TokenStore(splice_store)
    tok = load_tokenizer(splice_store)
    seqs, labels = [], []
    for name in store.splits:
        split = store.split(name)
        seqs += [tok.decode(r["tokens"]) for r in split]
        labels += split.record_field("labels").tolist()
    y = np.array(labels)
    onehot_mcc, kmer_mcc = [], []
    for seed in range(3):
        rest, test = train_test_split(np.arange(len(y)), test_size=0.3, stratify=y, random_state=seed)
        train, val = train_test_split(rest, test_size=0.15, stratify=y[rest], random_state=seed)
        pick = lambda idx: [seqs[i] for i in idx]  # noqa: E731
        x = one_hot(seqs)
        pred = tuned_logistic(Split(x[train], y[train], x[val], y[val], x[test], y[test]), seed)
        onehot_mcc.append(classification_metrics(y[test], pred, store.label_names)["mcc"])
        xs = kmer_frequencies(pick(train), [pick(val), pick(test)], k=6)
        pred = tuned_logistic(Split(xs[0], y[train], xs[1], y[val], xs[2], y[test]), seed)
        kmer_mcc.append(classification_metrics(y[test], pred, store.label_names)["mcc"])
    assert np.mean(onehot_mcc) > 0.88
    assert np.mean(kmer_mcc) < 0.65
    assert paired_comparison(onehot_mcc, kmer_mcc)["wins"] == 3


def test_the_grid_fitted_side_by_side_breaks_ties_as_one_after_another():
    """Equal validation scores (here: no validation records, every C scores 0) go to the grid's
    first C, in whatever order the grid is given and however many fits run at once; a C given twice
    is no problem. Random features: only the choice is under test."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((60, 5)), np.repeat([0, 1, 2], 20)
    empty = np.zeros((0, 5))
    data = Split(x, y, empty, np.zeros(0, dtype=int), empty, np.zeros(0, dtype=int))
    for threads in (1, 3, "auto"):
        with fit_threads(threads):
            for grid in ((0.1, 1.0, 10.0), (10.0, 0.01, 10.0, 1.0)):
                model, score = fit_tuned_logistic(data, 0, grid)
                assert (model.C, score) == (grid[0], 0.0)


@pytest.mark.network
def test_the_regularisation_grid_fitted_side_by_side_chooses_as_one_after_another(splice_store):
    """The C grid's fits run side by side (evaluate's num_workers, else $OMP_NUM_THREADS or the cores):
    on splice one-hot features, 1 and 4 at a time give the same C, the same coefficients and the same
    validation MCC, which is the best over the grid fitted one C at a time."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import matthews_corrcoef

    store, tok = TokenStore(splice_store), load_tokenizer(splice_store)
    split = store.split("train")
    x = one_hot([tok.decode(r["tokens"]) for r in split])
    y = split.record_field("labels")
    rest, test = train_test_split(np.arange(len(y)), test_size=0.3, stratify=y, random_state=0)
    train, val = train_test_split(rest, test_size=0.2, stratify=y[rest], random_state=0)
    data = Split(x[train], y[train], x[val], y[val], x[test], y[test])
    fitted = {}
    for threads in (1, 4):
        with fit_threads(threads):
            fitted[threads] = fit_tuned_logistic(data, 0)
    (one, mcc_one), (four, mcc_four) = fitted[1], fitted[4]
    assert one.C == four.C and mcc_one == mcc_four and np.array_equal(one.coef_, four.coef_)
    alone = [
        matthews_corrcoef(
            y[val], LogisticRegression(C=c, max_iter=3000).fit(x[train], y[train]).predict(x[val])
        )
        for c in C_GRID
    ]
    assert mcc_one == pytest.approx(max(alone)) and C_GRID[int(np.argmax(alone))] == one.C


def test_metrics_agree_with_scikit_learn_on_known_predictions():
    """Imbalanced labels, a class never predicted and one never present: every number is scikit-learn's."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    rng = np.random.default_rng(0)
    y_true = rng.choice(4, size=500, p=[0.6, 0.3, 0.1, 0.0])
    y_pred = np.where(rng.random(500) < 0.7, y_true, rng.choice([0, 1, 3], size=500))
    names = ["a", "b", "c", "d"]
    m = classification_metrics(y_true, y_pred, names)
    assert m["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    labels = [0, 1, 2, 3]
    assert m["macro_f1"] == pytest.approx(
        f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)
    )
    from sklearn.metrics import matthews_corrcoef

    assert m["mcc"] == pytest.approx(matthews_corrcoef(y_true, y_pred))
    assert m["confusion_matrix"] == confusion_matrix(y_true, y_pred, labels=labels).tolist()
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    for i, name in enumerate(names):
        assert m["per_class"][name]["precision"] == pytest.approx(precision[i])
        assert m["per_class"][name]["recall"] == pytest.approx(recall[i])
        assert m["per_class"][name]["f1-score"] == pytest.approx(f1[i])
        assert m["per_class"][name]["support"] == support[i]


def test_a_class_absent_from_a_seeds_test_split_has_no_f1_of_zero():
    from biomask.evaluation.metrics import per_class_table

    def row(f1_b, support_b):
        return {
            "per_class": {
                "a": {"f1-score": 0.9, "support": 10},
                "b": {"f1-score": f1_b, "support": support_b},
            }
        }

    results = {"label_names": ["a", "b"], "methods": [{"name": "m"}],
               "per_seed": {"m": [row(0.5, 2), row(0.0, 0)]}}  # fmt: skip
    lines = per_class_table(results)
    assert "| b | 0–2 | 0.500 |" in lines  # the seed without the class is left out, not averaged in as 0
    results["per_seed"]["m"] = [row(0.0, 0)]
    assert "| b | 0 | — |" in per_class_table(results)


def test_a_label_or_checkpoint_name_with_markdown_in_it_keeps_its_table_row_whole():
    """A class label holding `|` (or a checkpoint named so) split its row of report.md's per-class
    table: every F1 after it stood under the wrong method; a link or HTML in it was rendered."""
    from biomask.evaluation.metrics import per_class_table

    label, method = "CD14+ | Mono [x](https://e.example) <b>", "ours|v2"
    row = {"per_class": {label: {"f1-score": 0.9, "support": 10}}}
    results = {"label_names": [label], "methods": [{"name": method}], "per_seed": {method: [row]}}
    header, _, line = [x for x in per_class_table(results) if x.startswith("|")]
    unescaped = re.compile(r"(?<!\\)\|")
    assert len(unescaped.findall(line)) == len(unescaped.findall(header)), (header, line)
    assert line.endswith("| 0.900 |") and "<b>" not in line and "](https" not in line.replace("\\]", "")


def test_a_difference_that_rounds_to_zero_keeps_its_sign_and_size():
    """−0.0003 was printed −0.000, read as "costs"; an interval [−0.000, +0.014] looked negative."""
    from biomask.evaluation.metrics import signed

    assert signed(-0.0003) == "-0.0003" and signed(0.00004) == "+0.00004" and signed(-0.006) == "-0.006"
    assert signed(0.0) == "+0.000" and signed(-0.0) == "+0.000" and signed(-1e-9) == "±0.000"
    assert signed(-0.00021, 4) == "-0.0002" and signed(0.12345, 4) == "+0.1235"
