"""The study report: how it picks the best fixed ratio, when it calls a difference, and (end to end) a
miniature of the main job's study pipeline on real data producing every section of the report."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import yaml

from biomask.evaluation.evaluate import VAL_METRIC
from biomask.evaluation.metrics import METRICS, summarize
from biomask.report.collect import Evaluation, describe_masking
from biomask.report.config import ReportConfig, TargetSpec
from biomask.report.report import r2mae_vs_fixed, r2mae_vs_random_init, target_rows, target_status, verdict

FIXED15 = {"ratio": {"kind": "fixed", "value": 0.15}}
FIXED40 = {"ratio": {"kind": "fixed", "value": 0.40}}
R2MAE = {"ratio": {"kind": "uniform", "low": 0.15, "high": 0.45}}
DYNAMIC = {"ratio": {"kind": "linear", "start": 0.30, "end": 0.15}}


def _evaluation(
    scores: dict[tuple[str, str], list[float]],
    masking: dict[str, dict],
    val: dict[tuple[str, str], list[float]] | None = None,
) -> Evaluation:
    """An Evaluation as `biomask evaluate` writes it; every metric gets the same per-seed scores, and
    model protocols their validation MCC when `val` gives it."""
    methods, per_seed, summary = [], {}, {}
    for (group, protocol), values in scores.items():
        name = group if group == "baseline" else f"{group}/{protocol}"
        methods.append({"name": name, "group": group, "protocol": protocol})
        on_val = (val or {}).get((group, protocol))
        per_seed[name] = [
            {**{m: v for m in METRICS}, **({VAL_METRIC: on_val[i]} if on_val else {})}
            for i, v in enumerate(values)
        ]
        summary[name] = {m: summarize(values) for m in METRICS}
        if on_val:
            summary[name][VAL_METRIC] = summarize(on_val)
    results = {
        "methods": methods,
        "per_seed": per_seed,
        "summary": summary,
        "seeds": list(range(len(next(iter(scores.values()))))),
        "splits": {"mode": "stored"},
        "strongest_baseline": "baseline" if ("baseline", "linear_probe") in scores else None,
    }
    return Evaluation("task", Path("."), "mcc", "a task", results, {k: "" for k in masking}, masking)


TASK = {"task": {"path": "unused"}}  # the evaluation the targets below name (its results given directly)


def test_r2mae_is_compared_with_the_best_fixed_ratio_never_the_schedule_or_a_baseline():
    ev = _evaluation(
        {
            ("baseline", "linear_probe"): [0.99, 0.99, 0.99],  # stronger than all, but not a masking scheme
            ("r2mae", "linear_probe"): [0.60, 0.62, 0.61],
            ("bert15", "linear_probe"): [0.50, 0.52, 0.51],
            ("fixed40", "linear_probe"): [0.70, 0.71, 0.69],  # the best fixed ratio
            ("dynamic", "linear_probe"): [0.90, 0.91, 0.92],  # a schedule, not a fixed ratio
        },
        {"r2mae": R2MAE, "bert15": FIXED15, "fixed40": FIXED40, "dynamic": DYNAMIC},
    )
    (row,) = r2mae_vs_fixed(ev, "r2mae")
    assert row["group"] == "fixed40"
    assert row["cmp"]["mean_difference"] == pytest.approx(-0.09)
    assert row["cmp"]["wins"] == 0 and row["cmp"]["n"] == 3
    assert verdict(row["cmp"], "better", "worse") == "worse"


def test_the_best_fixed_ratio_is_chosen_on_validation_never_on_the_test_metric():
    scores = {
        ("r2mae", "linear_probe"): [0.60, 0.62, 0.61],
        ("bert15", "linear_probe"): [0.60, 0.61, 0.62],  # the better fixed ratio on validation ...
        ("fixed40", "linear_probe"): [0.70, 0.71, 0.69],  # ... this one on test
    }
    val = {
        ("r2mae", "linear_probe"): [0.62, 0.63, 0.61],
        ("bert15", "linear_probe"): [0.66, 0.65, 0.67],
        ("fixed40", "linear_probe"): [0.61, 0.60, 0.62],
    }
    masking = {"r2mae": R2MAE, "bert15": FIXED15, "fixed40": FIXED40}
    (row,) = r2mae_vs_fixed(_evaluation(scores, masking, val), "r2mae")
    assert row["group"] == "bert15" and row["chosen_on"] == "validation MCC"
    assert row["cmp"]["mean_difference"] == pytest.approx(0.0)
    # an evaluation without validation scores falls back to the test metric, and says so
    (row,) = r2mae_vs_fixed(_evaluation(scores, masking), "r2mae")
    assert row["group"] == "fixed40" and "test metric" in row["chosen_on"]


def test_validation_scores_survive_the_aggregation_over_pretraining_seeds():
    from biomask.report.collect import by_pretraining_seed

    scores = {("r2mae@0", "knn"): [0.5, 0.6], ("r2mae@1", "knn"): [0.7, 0.8]}
    val = {("r2mae@0", "knn"): [0.4, 0.6], ("r2mae@1", "knn"): [0.9, 0.9]}
    ev = _evaluation(scores, {"r2mae@0": R2MAE, "r2mae@1": R2MAE}, val)
    results, _ = by_pretraining_seed(ev.results, dict(ev.masking))
    (row,) = results["methods"]
    assert [r[VAL_METRIC] for r in results["per_seed"][row["name"]]] == pytest.approx([0.5, 0.9])
    assert "pretraining seeds (0, 1;" in results["unit"]


def test_the_detectable_difference_is_the_paired_t_tests_at_80_percent_power():
    from scipy import stats

    from biomask.evaluation.metrics import paired_comparison
    from biomask.report.report import detectable_difference

    a, b = [0.71, 0.65, 0.69, 0.70], [0.66, 0.66, 0.64, 0.67]
    diff = [x - y for x, y in zip(a, b)]
    sd, n = float(np.std(diff, ddof=1)), len(diff)
    for k in (n, 3):  # at 3 seeds the shortcut (t_0.975 + t_0.8)·se is 5 % short
        cmp = paired_comparison(a[:k], b[:k])
        found = detectable_difference(cmp)
        sd = float(np.std(diff[:k], ddof=1))
        # paired t-tests of differences drawn at that true mean reject at 5 % in 80 % of draws
        draws = np.random.default_rng(0).normal(found, sd, size=(40_000, k))
        t = draws.mean(axis=1) / (draws.std(axis=1, ddof=1) / np.sqrt(k))
        assert np.mean(np.abs(t) > stats.t.ppf(0.975, k - 1)) == pytest.approx(0.8, abs=0.01), k
    assert found > (stats.t.ppf(0.975, 2) + stats.t.ppf(0.8, 2)) * sd / np.sqrt(3) * 1.04
    assert np.isnan(detectable_difference(paired_comparison(a[:1], b[:1])))


def test_the_pretraining_table_shows_nats_below_each_reference(dna_checkpoint):
    """A real pretraining run: its held-out loss, each reference predictor's loss on the same masked
    tokens, and the difference, as the report prints them."""
    from biomask.report.collect import find_pretrain_runs
    from biomask.report.report import _learned_verdict, _pretrain_table

    (run,) = find_pretrain_runs([str(dna_checkpoint.parent)])
    text = "\n".join(_pretrain_table([run]))
    final = run.final_eval
    assert "reference: token frequencies | below token frequencies |" in text
    assert "reference: ±2 context | below ±2 context |" in text
    for ref in final["references"].values():
        gap = ref["mean_loss"] - final["mean_loss"]
        assert f"{ref['mean_loss']:.4f} | {gap:+.4f}" in text
    ratio = next(iter(final["loss"]))
    per_ratio = final["references"]["context"]["loss"][ratio] - final["loss"][ratio]
    assert "Nats below the ±2 context reference at each masking ratio" in text and f"{per_ratio:+.4f}" in text
    (line,) = _learned_verdict("DNA", [run])
    assert "±2 context reference" in line and "of 1 runs" in line
    # a run that does not beat the strongest reference carries the caveat on the verdicts
    beaten = final["references"]["context"]["mean_loss"] > final["mean_loss"]
    assert ("learned little beyond it" in line) == (not beaten)


def test_a_difference_is_called_only_when_its_paired_interval_excludes_zero():
    ev = _evaluation(
        {
            ("r2mae", "finetune"): [0.80, 0.70, 0.75],
            ("bert15", "finetune"): [0.78, 0.74, 0.74],  # differences +0.02, -0.04, +0.01
        },
        {"r2mae": R2MAE, "bert15": FIXED15},
    )
    (row,) = r2mae_vs_fixed(ev, "r2mae")
    assert row["cmp"]["ci_low"] < 0 < row["cmp"]["ci_high"]
    assert verdict(row["cmp"], "better", "worse") == "no significant difference"
    one_seed = {"mean_difference": 0.1, "ci_low": float("nan"), "ci_high": float("nan"), "n": 1}
    assert "no verdict" in verdict(one_seed, "better", "worse")


def test_pretraining_is_judged_against_the_random_init_per_protocol():
    ev = _evaluation(
        {
            ("r2mae", "linear_probe"): [0.50, 0.52, 0.51],
            ("r2mae", "finetune"): [0.90, 0.91, 0.92],
            ("random-init", "linear_probe"): [0.70, 0.71, 0.69],
            ("random-init", "finetune"): [0.80, 0.82, 0.81],
        },
        {"r2mae": R2MAE},
    )
    rows = {r["protocol"]: r["cmp"] for r in r2mae_vs_random_init(ev, "r2mae")}
    assert verdict(rows["linear_probe"], "helps", "hurts") == "hurts"
    assert verdict(rows["finetune"], "helps", "hurts") == "helps"


def judged(ev, protocol: str = "linear_probe", metric: str = "macro_f1"):
    """The report config of one target on `ev` (evaluation "task"), its row, and the row's entries by label."""
    cfg = ReportConfig(
        output="unused",
        evaluations=TASK,
        targets=[TargetSpec(evaluation="task", protocol=protocol, metric=metric)],
    )
    (row,) = target_rows(cfg, {"task": ev})
    return cfg, row, {e["label"]: e for e in row["entries"]}


def test_targets_judge_each_pretrained_model_against_the_strongest_baseline():
    ev = _evaluation(
        {
            ("baseline", "linear_probe"): [0.80, 0.81, 0.82],
            ("r2mae", "linear_probe"): [0.70, 0.72, 0.71],
            ("bert15", "linear_probe"): [0.85, 0.86, 0.87],
            ("random-init", "linear_probe"): [0.95, 0.95, 0.95],  # not a pretrained model
        },
        {"r2mae": R2MAE, "bert15": FIXED15},
    )
    cfg, row, entries = judged(ev)
    assert entries["R²MAE"]["method"] == "r2mae/linear_probe" and entries["R²MAE"]["status"] == "not met"
    assert (
        entries["best pretrained (highest test mean)"]["method"] == "bert15/linear_probe"
        and entries["best pretrained (highest test mean)"]["status"] == "met"
    )
    cfg.targets[0].metric = "mcc"
    ev.results["per_seed"]["r2mae/linear_probe"] = [{m: 0.9 for m in METRICS}] * 3
    ev.results["summary"]["r2mae/linear_probe"] = {m: summarize([0.9] * 3) for m in METRICS}
    (row,) = target_rows(cfg, {"task": ev})
    assert [e["label"] for e in row["entries"]] == ["R²MAE, the best pretrained model (highest test mean)"]


def test_the_best_pretrained_model_is_chosen_on_validation_when_there_are_scores():
    """As the best fixed ratio is: the best of several noisy test means is biased upwards."""
    ev = _evaluation(
        {
            ("baseline", "linear_probe"): [0.80, 0.81, 0.82],
            ("r2mae", "linear_probe"): [0.70, 0.72, 0.71],
            ("bert15", "linear_probe"): [0.85, 0.86, 0.87],  # best on test ...
            ("fixed40", "linear_probe"): [0.83, 0.84, 0.85],  # ... this one on validation
        },
        {"r2mae": R2MAE, "bert15": FIXED15, "fixed40": FIXED40},
        val={
            ("r2mae", "linear_probe"): [0.70, 0.70, 0.70],
            ("bert15", "linear_probe"): [0.80, 0.80, 0.80],
            ("fixed40", "linear_probe"): [0.90, 0.90, 0.90],
        },
    )
    *_, entries = judged(ev, metric="mcc")
    assert entries["best pretrained (chosen on validation MCC)"]["method"] == "fixed40/linear_probe"
    # a macro-F1 or Leiden target is picked on the same MCC, and its label says whose and why
    *_, entries = judged(ev, metric="macro_f1")
    label = "best pretrained (chosen on the linear probe's validation MCC; macro-F1 has no validation score)"
    assert entries[label]["method"] == "fixed40/linear_probe"


def test_a_lone_or_near_tied_best_pretrained_model_is_said_so():
    """ "R²MAE, the best pretrained model (chosen on validation MCC)" was printed where R²MAE was the only
    candidate, and where it won on validation by 0.0001 (a last-bit tie) with no word of either."""
    scores = {("baseline", "linear_probe"): [0.80, 0.81, 0.82], ("r2mae", "linear_probe"): [0.85, 0.86, 0.87]}
    val = {("r2mae", "linear_probe"): [0.9, 0.9, 0.9]}
    *_, entries = judged(_evaluation(scores, {"r2mae": R2MAE}, val=val), metric="mcc")
    assert list(entries) == ["R²MAE, the only pretrained model"]
    scores[("fixed40", "linear_probe")] = [0.86, 0.87, 0.88]
    val[("fixed40", "linear_probe")] = [0.8999, 0.8999, 0.8999]
    *_, entries = judged(_evaluation(scores, {"r2mae": R2MAE, "fixed40": FIXED40}, val=val), metric="mcc")
    assert list(entries) == [
        "R²MAE, the best pretrained model (chosen on validation MCC; a near tie: 0.0001 above fixed40)"
    ]
    *_, entries = judged(
        _evaluation(scores, {"r2mae": R2MAE, "fixed40": FIXED40}, val=val), metric="macro_f1"
    )
    assert next(iter(entries)).endswith("macro-F1 has no validation score; a near tie: 0.0001 above fixed40)")
    val[("fixed40", "linear_probe")] = [0.85, 0.85, 0.85]
    *_, entries = judged(_evaluation(scores, {"r2mae": R2MAE, "fixed40": FIXED40}, val=val), metric="mcc")
    assert list(entries) == ["R²MAE, the best pretrained model (chosen on validation MCC)"]


def test_a_call_the_splits_do_not_bear_out_is_said_to_hold_on_these_test_records():
    """The verdict's interval is over pretraining seeds, the baseline taken as fixed: a met or not met
    that the splits' own interval does not bear out was printed as if it held for other test records."""
    from biomask.report.report import _across_splits

    assert _across_splits([0.02, 0.021, 0.019], "mcc", "met") == (
        "; across evaluation splits (each split one unit, its seeds averaged): [+0.018, +0.022]"
    )
    wobbly = _across_splits([0.05, -0.02, 0.03], "mcc", "met")
    assert "holds zero: the call holds on these test records, not shown across draws" in wobbly
    assert "holds zero" not in _across_splits([0.05, -0.02, 0.03], "mcc", "level")
    # a level verdict whose splits all go one way (splice LP-FT against one-hot: −0.006, −0.007, −0.005)
    steady = _across_splits([-0.006, -0.007, -0.005], "mcc", "level")
    assert "excludes zero: on these pretraining seeds every draw of test records goes the same way" in steady
    assert "excludes zero" not in _across_splits([0.05, -0.02, 0.03], "mcc", "level")
    assert "2 evaluation splits" in _across_splits([0.01, 0.02], "mcc", "not met")
    assert _across_splits([0.01, 0.02], "mcc", "level") == ""
    assert "the same cells" in _across_splits([0.01, 0.02, 0.03], "cluster_ari", "met")


def test_a_macro_f1_target_is_read_on_mcc_too():
    """The cell probes tied all genes + LR on macro-F1 and were below it on MCC (−0.020 [−0.029,
    −0.010]), which nothing in the report said."""
    from biomask.report.report import _on_mcc

    ev = _evaluation(
        {("baseline", "linear_probe"): [0.80, 0.81, 0.82], ("r2mae", "linear_probe"): [0.70, 0.72, 0.71]},
        {"r2mae": R2MAE},
    )
    said = _on_mcc(ev, "r2mae/linear_probe", "baseline", "macro_f1")
    assert said.startswith("; on MCC (no target; not among the tests counted below): Δ -0.100 [")
    assert said.endswith("], below")
    assert "p =" not in said  # not one more test in the summary's count
    assert _on_mcc(ev, "r2mae/linear_probe", "baseline", "mcc") == ""


def test_a_one_seed_target_prints_no_nan():
    """With one seed the table and the bullet printed "[+nan, +nan]" and "p = nan"."""
    from biomask.report.report import _cmp_text, _targets_at_a_glance

    ev = _evaluation(
        {("baseline", "linear_probe"): [0.80], ("r2mae", "linear_probe"): [0.85]}, {"r2mae": R2MAE}
    )
    _, row, entries = judged(ev, metric="mcc")
    table = "\n".join(_targets_at_a_glance([row]))
    text = _cmp_text(entries["R²MAE, the only pretrained model"]["cmp"], "mcc", "seeds")
    assert "nan" not in table + text and "(no interval)" in table and "| — |" in table
    assert text == "Δ MCC +0.050, better in 1/1 seeds: no interval and no test (one unit)"


def test_a_target_naming_no_evaluation_is_refused():
    """A typo in a target's evaluation used to drop the claim from the report with exit 0."""
    with pytest.raises(ValueError, match="targets\\[0\\].evaluation 'codng' is not one of the evaluations"):
        ReportConfig(
            output="unused",
            evaluations={"coding": {"path": "x"}},
            targets=[TargetSpec(evaluation="codng", protocol="linear_probe", metric="mcc")],
        )


def test_a_target_is_met_only_when_the_paired_interval_says_so():
    """A mean a hair above the baseline's, with an interval across zero, is level, not a target met
    (the study once printed "met" for +0.002 [-0.032, +0.036]); one below it likewise, not "not met"."""
    ev = _evaluation(
        {
            ("baseline", "linear_probe"): [0.70, 0.72, 0.71],
            ("r2mae", "linear_probe"): [0.74, 0.65, 0.71],  # mean 0.700 < 0.710, the interval holds zero
            ("bert15", "linear_probe"): [0.66, 0.77, 0.71],  # mean 0.713 > 0.710, likewise
        },
        {"r2mae": R2MAE, "bert15": FIXED15},
    )
    *_, entries = judged(ev)
    below, above = entries["R²MAE"], entries["best pretrained (highest test mean)"]
    assert below["status"] == above["status"] == "level"
    assert below["cmp"]["mean_difference"] < 0 < above["cmp"]["mean_difference"]
    assert below["cmp"]["ci_low"] < 0 < below["cmp"]["ci_high"] and above["cmp"]["ci_low"] < 0
    # no interval (one unit, or a degenerate one): the means decide, and the text says so
    assert target_status({"n": 1, "ci_low": float("nan"), "ci_high": float("nan")}, True) == "met"
    assert target_status({"n": 3, "ci_low": float("nan"), "ci_high": float("nan")}, False) == "not met"


def test_a_clustering_target_is_judged_against_the_baselines_that_cluster():
    """Issue 15's "Leiden ARI >= PCA's": protocol knn, metric cluster_ari. Only the kNN baselines
    have clustering scores, so a probe baseline without them is never the bar (nor a crash)."""
    ev = _evaluation(
        {
            ("baseline", "linear_probe"): [0.90, 0.91, 0.92],  # all genes + LR: no Leiden scores
            ("pca", "pca_knn"): [0.52, 0.53, 0.52],
            ("hvg", "hvg_knn"): [0.47, 0.48, 0.48],
            ("r2mae", "knn"): [0.49, 0.50, 0.50],
            ("fixed40", "knn"): [0.53, 0.54, 0.53],
        },
        {"r2mae": R2MAE, "fixed40": FIXED40},
    )
    for name in ("pca/pca_knn", "hvg/hvg_knn"):
        next(m for m in ev.results["methods"] if m["name"] == name)["group"] = "baseline"
    for name in ("pca/pca_knn", "hvg/hvg_knn", "r2mae/knn", "fixed40/knn"):
        values = [r["mcc"] for r in ev.results["per_seed"][name]]
        for row, v in zip(ev.results["per_seed"][name], values):
            row["cluster_ari"] = v
        ev.results["summary"][name]["cluster_ari"] = summarize(values)
    cfg = ReportConfig(
        output="unused",
        evaluations=TASK,
        targets=[TargetSpec(evaluation="task", protocol="knn", metric="cluster_ari")],
    )
    (row,) = target_rows(cfg, {"task": ev})
    assert row["baseline"] == "pca/pca_knn"
    entries = {e["label"]: e for e in row["entries"]}
    assert (
        entries["R²MAE"]["status"] == "not met"
        and entries["best pretrained (highest test mean)"]["status"] == "met"
    )
    assert entries["R²MAE"]["cmp"]["mean_difference"] == pytest.approx(-0.0267, abs=1e-3)
    # models without the metric: said so, not judged
    del ev.results["summary"]["r2mae/knn"]["cluster_ari"]
    (row,) = target_rows(cfg, {"task": ev})
    assert "no cluster_ari" in row["missing"] and "other code" not in row["missing"]


def test_a_metric_missing_from_an_evaluation_by_older_code_says_how_to_measure_it(tmp_path):
    """An evaluation an upgrade reuses holds the metrics of the code that wrote it: a target on a
    metric added since is not assessed, and the report says the evaluation predates it."""
    import dataclasses

    ev = _evaluation(
        {("baseline", "linear_probe"): [0.5, 0.6], ("r2mae", "linear_probe"): [0.6, 0.7]}, {"r2mae": R2MAE}
    )
    (tmp_path / "run.json").write_text(json.dumps({"code": {"source_sha256": "0" * 64}}))
    ev = dataclasses.replace(ev, path=tmp_path)
    cfg = ReportConfig(output="unused", evaluations=TASK,
                       targets=[TargetSpec(evaluation="task", protocol="linear_probe", metric="cluster_ari_best")])  # fmt: skip
    for name in ev.results["summary"]:
        ev.results["summary"][name].pop("cluster_ari_best", None)
    (row,) = target_rows(cfg, {"task": ev})
    assert "no cluster_ari_best" in row["missing"] and "written by other code" in row["missing"]
    assert f"--overwrite` into {tmp_path} recomputes it" in row["missing"]


def test_verdicts_rest_on_pretraining_seeds_when_a_scheme_has_several():
    from biomask.report.collect import by_pretraining_seed

    scores = {
        ("baseline", "linear_probe"): [0.70, 0.72, 0.71],
        ("r2mae@0", "linear_probe"): [0.80, 0.82, 0.81],  # pretraining seed 0: mean 0.81 over 3 splits
        ("r2mae@1", "linear_probe"): [0.60, 0.62, 0.61],  # seed 1: 0.61 — a bad seed
        ("fixed40@0", "linear_probe"): [0.70, 0.70, 0.70],
        ("fixed40@1", "linear_probe"): [0.71, 0.71, 0.71],
        ("random-init", "linear_probe"): [0.50, 0.55, 0.60],
    }
    ev = _evaluation(scores, {"r2mae@0": R2MAE, "r2mae@1": R2MAE, "fixed40@0": FIXED40, "fixed40@1": FIXED40})
    results, masking = by_pretraining_seed(ev.results, dict(ev.masking))
    ev = Evaluation("task", Path("."), "mcc", "a task", results, ev.checkpoints, masking)
    (r2,) = ev.methods("linear_probe", "r2mae")
    assert [round(r["mcc"], 6) for r in results["per_seed"][r2["name"]]] == [0.81, 0.61]
    # two seeds: t with 1 degree of freedom; the interval is cut to MCC's range, as evaluate's are
    assert results["summary"][r2["name"]]["mcc"]["ci_high"] == 1.0
    assert "2 pretraining seeds" in results["unit"]
    # one unit per pretraining seed: the split-level agreement of each seed does not make an interval
    (row,) = r2mae_vs_fixed(ev, "r2mae")
    assert row["group"] == "fixed40" and row["cmp"]["n"] == 2
    assert verdict(row["cmp"], "better", "worse") == "no significant difference"
    (versus_random,) = r2mae_vs_random_init(ev, "r2mae")
    assert versus_random["cmp"]["n"] == 2 and versus_random["cmp"]["mean_difference"] == pytest.approx(0.16)
    assert results["summary"]["baseline"]["mcc"]["n"] == 3  # baselines keep their summary over splits
    # evaluated on the store's one split (splits.mode=store): the unit says so, not "the mean over 3 splits"
    stored = _evaluation(scores, {"r2mae@0": R2MAE, "r2mae@1": R2MAE}).results | {"splits": {"mode": "store"}}
    one_split, _ = by_pretraining_seed(stored, {})
    assert "one split, the store's own" in one_split["unit"] and "mean over" not in one_split["unit"]


def test_a_target_over_pretraining_seeds_ignores_rows_picked_per_split():
    """ "chosen on val" picks a checkpoint per evaluation split: it has no pretraining seeds, so with
    scheme@seed checkpoints it cannot enter a verdict whose unit is the pretraining seed (its split
    mean against the baseline's would be a difference with no spread: "p = 0")."""
    from biomask.report.collect import by_pretraining_seed

    scores = {
        ("baseline", "linear_probe"): [0.40, 0.45, 0.42],
        ("r2mae@0", "linear_probe"): [0.60, 0.62, 0.61],
        ("r2mae@1", "linear_probe"): [0.63, 0.61, 0.62],
        ("chosen on val", "linear_probe"): [0.70, 0.71, 0.72],
    }
    ev = _evaluation(scores, {"r2mae@0": R2MAE, "r2mae@1": R2MAE})
    results, masking = by_pretraining_seed(ev.results, dict(ev.masking))
    ev = Evaluation("task", Path("."), "mcc", "a task", results, ev.checkpoints, masking)
    cfg = ReportConfig(
        output="unused",
        evaluations=TASK,
        targets=[TargetSpec(evaluation="task", protocol="linear_probe", metric="mcc")],
    )
    (row,) = target_rows(cfg, {"task": ev})
    assert [e["method"] for e in row["entries"]] == ["r2mae (2 pretraining seeds, linear_probe)"]
    assert row["entries"][0]["cmp"]["n"] == 2 and row["entries"][0]["status"] == "met"


def test_the_report_says_which_pooling_each_models_probe_chose_on_val():
    # a user copying a template (pooling chosen per model and split) must see what it picked
    from biomask.report.collect import _with_pooling_counts, by_pretraining_seed
    from biomask.report.report import _evaluation_table

    scores = {
        ("baseline", "linear_probe"): [0.40, 0.45, 0.42],
        ("r2mae@0", "linear_probe"): [0.60, 0.62, 0.61],
        ("r2mae@1", "linear_probe"): [0.63, 0.61, 0.62],
        ("random-init", "linear_probe"): [0.50, 0.52, 0.51],
    }
    ev = _evaluation(scores, {"r2mae@0": R2MAE, "r2mae@1": R2MAE})
    picks = {"r2mae@0": ["max", "mean_layers", "mean_layers"], "r2mae@1": ["mean_layers"] * 3}
    for m in ev.results["methods"]:
        if m["group"] != "baseline":
            m["poolings"] = ["mean", "max", "mean_layers"]
            for row, pooling in zip(ev.results["per_seed"][m["name"]], picks.get(m["group"], ["mean"] * 3)):
                row["pooling"] = pooling
    results, masking = by_pretraining_seed(_with_pooling_counts(ev.results), dict(ev.masking))
    table = "\n".join(_evaluation_table(Evaluation("task", Path("."), "mcc", "a task", results, {}, masking)))
    assert "Pooling chosen on val" in table
    assert "r2mae: mean_layers 5×, max 1×" in table and "random-init: mean 3×" in table
    assert "baseline:" not in table  # a baseline chooses no pooling


def test_pairwise_verdicts_give_each_pair_one_bullet():
    from biomask.report.collect import by_pretraining_seed
    from biomask.report.report import comparison_bullets

    scores = {
        ("baseline", "linear_probe"): [0.40, 0.45, 0.42],
        ("r2mae@0", "linear_probe"): [0.60, 0.62, 0.61],
        ("r2mae@1", "linear_probe"): [0.63, 0.61, 0.62],
        ("r2mae@2", "linear_probe"): [0.64, 0.60, 0.63],
        ("fixed40@0", "linear_probe"): [0.55, 0.57, 0.56],
        ("fixed40@1", "linear_probe"): [0.58, 0.56, 0.57],
        ("fixed40@2", "linear_probe"): [0.54, 0.55, 0.57],
        ("corpus@0", "linear_probe"): [0.50, 0.52, 0.51],
        ("corpus@1", "linear_probe"): [0.49, 0.53, 0.50],
        ("corpus@2", "linear_probe"): [0.51, 0.50, 0.52],
        ("random-init", "linear_probe"): [0.30, 0.32, 0.31],
        ("chosen on val", "linear_probe"): [0.64, 0.62, 0.63],
    }
    val = {k: v for k, v in scores.items() if k[0] != "baseline"}
    masking = {f"{g}@{i}": m for g, m in (("r2mae", R2MAE), ("fixed40", FIXED40)) for i in range(3)}
    ev = _evaluation(scores, masking, val=val)
    results, masking = by_pretraining_seed(ev.results, dict(ev.masking))
    ev = Evaluation("task", Path("."), "mcc", "a task", results, ev.checkpoints, masking)
    alone = comparison_bullets(ev, "r2mae")
    both = comparison_bullets(ev, "r2mae", pairwise=True)
    assert both[: len(alone) - 1] == alone[:-1] and both[-1] == alone[-1]  # pairwise adds, never repeats
    added = both[len(alone) - 1 : -1]
    pairs = sorted(line.split("**")[1] for line in added)
    # r2mae vs fixed40, vs corpus (a scheme without a fixed ratio) and vs the random init have their
    # own bullets; a per-split pick pairs with nothing
    assert any("R²MAE vs corpus" in line for line in alone)
    assert pairs == ["corpus vs random-init", "fixed40 vs corpus", "fixed40 vs random-init"]


def test_masking_names_are_readable():
    assert describe_masking(R2MAE) == "U(0.15, 0.45)"
    assert describe_masking(FIXED15) == "15%"
    assert describe_masking(DYNAMIC) == "30%→15%"
    assert describe_masking({**FIXED40, "corruption": {"kind": "mae"}}) == "40%, MAE"


# ------------------------------------------------------------------------------ the study, in miniature


def _miniature_study(repo: Path, run_dir: Path) -> Path:
    """configs/pipelines/study-quick.yaml — the main job's pipeline — cut down to seconds per stage:
    two masking schemes, two seeds, a few training steps, and 200 kb of genome."""
    study = yaml.safe_load((repo / "configs/pipelines/study-quick.yaml").read_text())
    study["run_dir"] = str(run_dir)
    stages = study["stages"]
    for stage in stages.values():
        stage["config"] = str(repo / stage["config"])
    stages["prep_genome"]["overrides"].update({"windows.max_bases": 200_000, "split.block_size": 10_000})
    schemes = ["r2mae", "bert15"]
    stages["pretrain_dna"]["sweep"] = {"masking.scheme": schemes, "train.seed": [0, 1]}
    stages["pretrain_cells"]["sweep"] = {"masking.scheme": schemes, "train.seed": [0, 1]}
    stages["pretrain_cells_corpus"]["sweep"] = {"masking.scheme": ["r2mae"], "train.seed": [0, 1]}
    stages["pretrain_dna_ecoli"]["sweep"] = {"train.seed": [0, 1]}
    stages["prep_ecoli"]["overrides"] = {"windows.max_bases": 200_000, "split.block_size": 10_000}
    stages["prep_motif"]["overrides"]["inputs"][0]["task"]["max_per_class"] = 150
    stages["prep_coding"]["overrides"]["inputs"][0]["task"]["max_per_class"] = 60
    for name in ("pretrain_dna", "pretrain_dna_ecoli", "pretrain_cells", "pretrain_cells_corpus"):
        stages[name]["overrides"].update(
            {
                "train.steps": 6,
                "train.log_every": 2,
                "train.eval_every": 6,
                "train.eval_batches": 1,
                "train.checkpoint_every": 6,
                "optim.warmup_steps": 0,
            }
        )
    for name in (
        "evaluate_splice",
        "evaluate_splice_ft",
        "evaluate_motif",
        "evaluate_coding",
        "evaluate_pbmc68k",
        "evaluate_pbmc68k_transfer",
        "evaluate_cite",
        "evaluate_cite_corpus",
    ):
        over = stages[name]["overrides"]
        over["seeds"] = [0, 1]
        # checkpoints named scheme@seed: verdicts over pretraining seeds
        over["checkpoints"] = {
            k: v
            for k, v in over["checkpoints"].items()
            if k.split("@")[0] in (*schemes, "nematode") and k.split("@")[1] in ("0", "1")
        }
        over["finetune"] = {**over.get("finetune", {}), "max_steps": 4, "eval_every": 2, "patience": 1}
        # one learning rate: each one in the grid is an engine of its own to start (most of the time here)
        over["finetune"]["lr"] = over["finetune"].get("lr", [1e-4])[-1:]
    path = run_dir.parent / "study-mini.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def test_the_study_pipeline_in_miniature_writes_an_honest_report(repo, tmp_path, cli, monkeypatch):
    pipeline = _miniature_study(repo, tmp_path / "study")
    # The runner's own process may hold a process group (a fine-tune ran in it, or it runs under
    # torchrun): its rank variables must not reach the stages, whose trainers start their own.
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        for key, value in {
            "RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_RANK": "0",
            "MASTER_ADDR": "127.0.0.1",
        }.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("MASTER_PORT", str(held.getsockname()[1]))
        code, out, err = cli("pipeline", "run", pipeline)
    assert code == 0, out + err
    report_dir = tmp_path / "study" / "report"
    text = (report_dir / "report.md").read_text()

    # every section the study promises, with figures that exist
    for heading in (
        "## Summary",
        "## Pretraining",
        "## Downstream tasks",
        "## Embeddings",
        "## Configs, seeds",
    ):
        assert heading in text
    for figure in (
        "pretrain-dna-curves.png",
        "pretrain-dna-ratios.png",
        "pretrain-dna-loss-by-ratio.png",
        "pretrain-single-cell-ratios.png",
        "eval-splice.png",
        "eval-splice_ft.png",
        "eval-motif.png",
        "eval-coding.png",
        "eval-pbmc68k.png",
        "umap.png",
        "targets.png",  # the targets' paired differences, under the table at a glance
    ):
        assert f"figures/{figure}" in text
        assert (report_dir / "figures" / figure).stat().st_size > 1000

    # the comparison tables: baselines, the random init and both schemes, per protocol, with intervals
    assert "| one-hot + LR | onehot_lr |" in text and "| PCA(50) + LR | pca_lr |" in text
    assert "| r2mae (U(" in text and "| bert15 (15%) | linear_probe |" in text
    assert "random-init" in text
    # R²MAE is judged against the best fixed ratio, chosen on validation, with a verdict over the
    # pretraining seeds it names, and each target says met or not met
    assert text.count("R²MAE vs the best fixed ratio") == 3  # splice: probe; cells: probe, kNN
    assert text.count("was the best fixed ratio (chosen on validation MCC)") == 3
    # and each target's best pretrained model is chosen on validation too, never by its test mean
    assert (
        "pretrained model (chosen on validation MCC)" in text
        or "best pretrained (chosen on validation MCC)" in text
    )
    assert "highest test mean" not in text
    # splice, splice LP-FT (probe and fine-tune), cells probe and kNN, transfer probe and kNN, the motif
    # and the coding task, the protein-typed cells by both kinds of cell model (probe and kNN each)
    assert text.count("R²MAE vs the same architecture randomly initialised") == 13
    # issue 16's target, measured on the fine-tuning protocol
    assert "LP-FT" in text and "finetune MCC ≥ the strongest baseline" in text
    assert (
        text.count("better in 0/2 pretraining seeds (0, 1;")
        + text.count("2/2 pretraining seeds (0, 1;")
        + (text.count("1/2 pretraining seeds (0, 1;"))
        >= 9
    )
    assert "detectable difference" in text
    # every run's held-out loss against the reference predictors on the same masked tokens
    assert "below token frequencies |" in text and "below ±2 context |" in text
    assert "reference: gene mean" in text and "| all genes + LR | hvg_lr |" in text
    assert "What the DNA models learned" in text
    assert (
        sum(text.count(f"→ **{s}**") for s in ("met", "not met", "level")) >= 2
    )  # each target, R²MAE at least
    # provenance: the configs and the data checksums of the inputs
    pbmc3k_run = json.loads((tmp_path / "study" / "prep_pbmc3k" / "run.json").read_text())
    checksum = pbmc3k_run["inputs"][0]["sha256"]
    assert checksum[:12] in text
    assert "resolved config" in text
    # the runs the report read are named by their stage fingerprint, never passed off as a file's sha256
    read = [i for i in json.loads((report_dir / "run.json").read_text())["inputs"] if "fingerprint" in i]
    assert read and all("sha256" not in i for i in read)
    for entry in read:
        info = json.loads((Path(entry["path"]) / "run.json").read_text())
        assert (entry["fingerprint"], entry["created"]) == (info["fingerprint"], info["created"])

    # the targets' verdicts as data beside report.md, each as the table gives it
    summary = json.loads((report_dir / "summary.json").read_text())["targets"]
    text = (report_dir / "report.md").read_text()
    assert summary and all(f"**{t['verdict']}**" in text for t in summary)
    # settings chosen on an evaluation's own scores (the pipeline's chosen_on: the two pbmc68k
    # evaluations) are said once under each, and marked on every verdict of theirs
    assert text.count("*Settings chosen on this evaluation's own scores*") == 2
    chosen = {t["evaluation"] for t in summary if t.get("settings_chosen_on_this_evaluation")}
    assert chosen == {"pbmc68k", "pbmc68k_transfer"}

    # `biomask main` (what `make run` runs) with nothing changed reuses every stage, the report
    # included, and ends with the report's summary
    mtime = (report_dir / "report.md").stat().st_mtime_ns
    code, out, err = cli("main", "--pipeline", pipeline, "--output", tmp_path / "study")
    assert code == 0, out + err
    assert (report_dir / "report.md").stat().st_mtime_ns == mtime
    assert "│ reused" in out and "│ ran" not in out  # the status table
    assert f"Report: {report_dir / 'report.md'}" in out and "R²MAE vs the best fixed ratio" in out

    # the report written over one of its inputs, --overwrite or not: refused, the input kept
    config = report_dir / "config.yaml"
    evaluation = tmp_path / "study" / "evaluate_splice"
    before = sorted(p.name for p in evaluation.iterdir())
    code, _, err = cli("report", "-c", config, f"output={evaluation}", "--overwrite")
    assert code == 2 and "input" in err and sorted(p.name for p in evaluation.iterdir()) == before
    # an evaluation's metrics.json edited by hand is an input that changed: not reused as current
    assert all("metrics_sha256" in i for i in read if (Path(i["path"]) / "metrics.json").is_file())
    metrics = evaluation / "metrics.json"
    original = metrics.read_text()
    metrics.write_text(original.replace("}", " }", 1))
    code, _, err = cli("report", "-c", config)
    assert code == 2 and "--overwrite" in err, err
    metrics.write_text(original)
    assert cli("report", "-c", config)[0] == 0  # as it was: current again
    # an r2mae name that matches no checkpoint drops every R²MAE comparison: said, not silent
    code, _, err = cli("report", "-c", config, "r2mae=R2MAE", f"output={tmp_path / 'renamed'}")
    assert code == 0 and "r2mae: 'R2MAE' names no checkpoint of these evaluations" in err, err
    assert "r2mae" in err.split("their checkpoints:")[1]


def test_runs_of_one_scheme_are_named_by_the_seed_and_the_model_keys_that_differ(tmp_path):
    """An ablation sweep (model.mask_indicator true / false) must not give two rows the same name."""
    from biomask.report.collect import find_pretrain_runs

    for indicator in (True, False):
        for seed in (0, 1):
            run = tmp_path / f"indicator={indicator},seed={seed}"
            run.mkdir()
            config = {"masking": {"scheme": "fixed40", "ratio": {"kind": "fixed", "value": 0.4}},
                      "model": {"kind": "mlp", "mask_indicator": indicator}, "train": {"seed": seed}}  # fmt: skip
            (run / "config.yaml").write_text(yaml.safe_dump(config))
            (run / "run.json").write_text(json.dumps({"stage": "pretrain", "final_eval": {}}))
            (run / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1, "loss": 1.0}) + "\n")
    names = sorted(r.name for r in find_pretrain_runs([str(tmp_path)]))
    assert names == [
        f"fixed40 40% seed {seed}, model.mask_indicator={flag}"
        for seed in (0, 1)
        for flag in ("false", "true")
    ]


def test_an_unfinished_run_is_named_not_left_out_silently(dna_checkpoint, tmp_path, caplog):
    """An unfinished run given by path made an empty Pretraining section, exit 0; in a sweep folder
    it was left out without a word."""
    import shutil

    from biomask.errors import InputError
    from biomask.report.collect import find_pretrain_runs

    sweep = tmp_path / "sweep"
    shutil.copytree(dna_checkpoint.parent, sweep / "seed=0")
    unfinished = shutil.copytree(dna_checkpoint.parent, sweep / "seed=1")
    (unfinished / "run.json").unlink()
    (unfinished / "in_progress.json").write_text("{}")
    with pytest.raises(InputError, match="is an unfinished run"):
        find_pretrain_runs([str(unfinished)])
    with caplog.at_level("WARNING", logger="biomask"):
        runs = find_pretrain_runs([str(sweep)])
    assert [r.path.name for r in runs] == ["seed=0"] and "1 unfinished run(s) left out" in caplog.text
    assert "seed=1" in caplog.text


def test_a_damaged_run_folder_is_a_clear_error_naming_the_file(dna_checkpoint, tmp_path, cli):
    """A truncated metrics file (a full disk, a copy cut short) is exit 2 naming it, not a traceback."""
    import shutil

    from biomask.errors import InputError
    from biomask.report.collect import load_evaluation, load_pretrain_run

    run = shutil.copytree(dna_checkpoint.parent, tmp_path / "run")
    metrics = run / "metrics.jsonl"
    metrics.write_text(metrics.read_text()[:-40])  # the last line cut short
    with pytest.raises(InputError, match="metrics.jsonl changed since biomask pretrain wrote it"):
        load_pretrain_run(run)  # run.json records its sha256
    info = json.loads((run / "run.json").read_text())
    del info["output_sha256"]  # a run written before the digests were kept: its contents are read
    (run / "run.json").write_text(json.dumps(info))
    with pytest.raises(InputError, match="metrics.jsonl is corrupt"):
        load_pretrain_run(run)
    evaluation = tmp_path / "eval"
    evaluation.mkdir()
    for text in ('{"methods": [', '{"foo": 1}', "[1, 2]"):
        (evaluation / "metrics.json").write_text(text)
        with pytest.raises(InputError, match=r"metrics.json is corrupt .* run `biomask evaluate` again"):
            load_evaluation("task", str(evaluation), "mcc", None)
    # `pipeline status` on a damaged record of a local run
    (tmp_path / "pipe").mkdir()
    for text in ("{", '{"stages": 5}'):
        (tmp_path / "pipe" / "local-run.json").write_text(text)
        code, _, err = cli("pipeline", "status", tmp_path / "pipe")
        assert code == 2 and "local-run.json is corrupt" in err, err


def test_each_input_the_report_config_names_is_checked_by_its_key_first(dna_checkpoint, tmp_path, cli):
    """A missing embedding.path or evaluation was blamed on the output ("writing the output ...
    failed"), a truncated .h5ad was a traceback, a file given as a pretrain run read as missing, and a
    provenance entry with no run record was dropped in silence (exit 0)."""
    import shutil

    run = shutil.copytree(dna_checkpoint.parent, tmp_path / "run")
    config = tmp_path / "report.yaml"
    config.write_text(f"output: {tmp_path / 'out'}\npretrain: {{dna: [{run}]}}\n")
    truncated = tmp_path / "cut.h5ad"
    ad.AnnData(np.ones((3, 2), dtype=np.float32), obsm={"X_biomask": np.ones((3, 2))}).write_h5ad(truncated)
    truncated.write_bytes(truncated.read_bytes()[:600])
    for given, said in (
        ("embedding={path: nope.h5ad, color: c}", "embedding.path nope.h5ad does not exist"),
        (f"embedding={{path: {tmp_path}, color: c}}", f"embedding.path {tmp_path} is a folder"),
        (f"embedding={{path: {truncated}, color: c}}", f"embedding.path {truncated} is not a readable .h5ad"),
        ("evaluations={task: {path: nope}}", "evaluations.task.path nope does not exist"),
        (f"evaluations={{task: {{path: {config}}}}}", f"evaluations.task.path {config} is a file"),
        (f"pretrain={{dna: [{config}]}}", f"pretrain.dna {config} is a file"),
        ("provenance=[nope]", "provenance nope does not exist"),
        (f"provenance=[{tmp_path}]", f"provenance {tmp_path} holds no run.json"),
    ):
        code, _, err = cli("report", "-c", config, given)
        assert code == 2 and said in err and "writing the output" not in err and "Traceback" not in err, (
            given,
            err,
        )
        assert not (tmp_path / "out").exists()
    code, _, err = cli("report", "-c", config, f"provenance=[{run}]")
    assert code == 0, err


def test_the_strongest_baseline_is_the_best_on_the_metric_in_question():
    """One rule for the summary's targets and each evaluation's section: the evaluation's main metric
    (macro-F1 for cells) picks the section's bar, not MCC; a clustering metric only the kNN baselines carry."""
    from biomask.report.report import strongest_baseline

    results = {
        "methods": [{"name": "PCA + LR", "group": "baseline"}, {"name": "all genes + LR", "group": "baseline"},
                    {"name": "PCA + kNN", "group": "baseline"}, {"name": "model", "group": "r2mae"}],
        "summary": {"PCA + LR": {"mcc": {"mean": 0.90}, "macro_f1": {"mean": 0.60}},
                    "all genes + LR": {"mcc": {"mean": 0.85}, "macro_f1": {"mean": 0.70}},
                    "PCA + kNN": {"mcc": {"mean": 0.80}, "macro_f1": {"mean": 0.65}, "ari": {"mean": 0.5}},
                    "model": {"mcc": {"mean": 0.99}, "macro_f1": {"mean": 0.99}, "ari": {"mean": 0.9}}},
    }  # fmt: skip
    ev = Evaluation("cells", Path("."), "macro_f1", "cells", results, {}, {})
    assert strongest_baseline(ev, "macro_f1") == "all genes + LR"
    assert strongest_baseline(ev, "mcc") == "PCA + LR"
    assert strongest_baseline(ev, "ari") == "PCA + kNN"
    assert strongest_baseline(ev, "nmi") is None


def test_a_metrics_file_whose_parts_disagree_is_named_not_a_traceback(tmp_path):
    from biomask.errors import InputError
    from biomask.report.collect import load_evaluation

    (tmp_path / "metrics.json").write_text(
        json.dumps(
            {
                "methods": [{"name": "r2mae@0", "group": "r2mae@0", "protocol": "linear_probe"}],
                "per_seed": {},
                "summary": {},
                "seeds": [0],
            }
        )
    )
    (tmp_path / "config.yaml").write_text("checkpoints: {}\n")
    with pytest.raises(InputError, match="metrics.json is corrupt or not biomask's"):
        load_evaluation("task", str(tmp_path), "mcc", None)
    # a figure edited into a string, or NaN: named on reading, not a traceback in a table
    summary = {"r2mae@0 (linear probe)": {"mcc": {"mean": "0.999", "sd": 0.0, "n": 1}}}
    rows = {"r2mae@0 (linear probe)": [{"seed": 0, "mcc": 0.5}]}
    for text, said in (
        (json.dumps({"methods": [], "per_seed": rows, "summary": summary, "seeds": [0]}), "mean is '0.999'"),
        ('{"methods": [], "per_seed": {}, "summary": {"m": {"mcc": {"mean": NaN}}}, "seeds": [0]}', "NaN"),
    ):
        (tmp_path / "metrics.json").write_text(text)
        with pytest.raises(InputError, match=said):
            load_evaluation("task", str(tmp_path), "mcc", None)
    # ... but the NaN spread evaluate wrote for one seed until 2026-12-05 is read as the null it writes
    # now: an upgrade's report refused every such evaluation as corrupt, and `evaluate` reused it
    one_seed = '{"mean": 0.5, "sd": NaN, "ci_low": NaN, "ci_high": NaN, "n": 1}'
    (tmp_path / "metrics.json").write_text(
        '{"methods": [], "per_seed": {"m": [{"seed": 0, "mcc": 0.5}]}, "summary": {"m": {"mcc": '
        + one_seed
        + '}}, "seeds": [0]}'
    )
    read = load_evaluation("task", str(tmp_path), "mcc", None).results["summary"]["m"]["mcc"]
    assert read == {"mean": 0.5, "sd": None, "ci_low": None, "ci_high": None, "n": 1}
    for other in ('"sd": Infinity', '"mean": NaN'):  # only that NaN, only there
        (tmp_path / "metrics.json").write_text(
            '{"methods": [], "per_seed": {}, "summary": {"m": {"mcc": {'
            + other
            + ', "n": 1}}}, "seeds": [0]}'
        )
        with pytest.raises(InputError, match="where a number belongs"):
            load_evaluation("task", str(tmp_path), "mcc", None)
    # a config.yaml that is no YAML
    (tmp_path / "config.yaml").write_text("checkpoints: {a: [\n")
    (tmp_path / "metrics.json").write_text(
        json.dumps({"methods": [], "per_seed": {}, "summary": {}, "seeds": [0]})
    )
    with pytest.raises(InputError, match="config.yaml is corrupt or not biomask's"):
        load_evaluation("task", str(tmp_path), "mcc", None)


def test_the_evaluation_figure_shows_leiden_ari_where_methods_have_it(tmp_path):
    """The kNN protocol's clustering is where a cell model loses to PCA: the figure must not leave it out."""
    from PIL import Image

    from biomask.report.figures import metric_intervals

    ev = _evaluation(
        {("baseline", "linear_probe"): [0.7, 0.72, 0.71], ("r2mae", "knn"): [0.8, 0.82, 0.81]}, {}
    )
    plain = Image.open(metric_intervals(ev, tmp_path / "plain.png")).size[0]
    ev.results["summary"]["r2mae/knn"]["cluster_ari"] = summarize([0.5, 0.52, 0.51])
    with_ari = Image.open(metric_intervals(ev, tmp_path / "ari.png")).size[0]
    assert with_ari == pytest.approx(plain * 4 / 3, rel=0.05)  # one more panel of the same width


def test_the_pretraining_verdict_never_mixes_runs_of_one_scheme_with_other_settings(tmp_path):
    """An ablation (model.mask_indicator) and a ratio-range sweep share scheme names and seeds: each
    setting and each range gets its own verdict, with its own runs' losses, never another's."""
    from biomask.report.collect import find_pretrain_runs
    from biomask.report.report import _learned_verdict, _pretraining_verdict

    uniform = {"kind": "uniform", "low": 0.15, "high": 0.45}
    runs = [  # (scheme, ratio, mask_indicator, held-out loss of seeds 0..2)
        ("r2mae", uniform, True, [1.00, 1.01, 1.02]),
        ("r2mae", {**uniform, "high": 0.3}, True, [1.20, 1.21, 1.22]),
        ("fixed40", {"kind": "fixed", "value": 0.4}, True, [1.10, 1.11, 1.12]),
        ("r2mae", uniform, False, [2.00, 2.01, 2.02]),
        ("fixed40", {"kind": "fixed", "value": 0.4}, False, [1.90, 1.92, 1.91]),
    ]
    for i, (scheme, ratio, indicator, losses) in enumerate(runs):
        for seed, loss in enumerate(losses):
            run = tmp_path / f"{i}-seed={seed}"
            run.mkdir()
            config = {"masking": {"scheme": scheme, "ratio": ratio}, "model": {"kind": "mlp", "mask_indicator": indicator},
                      "train": {"seed": seed}}  # fmt: skip
            final = {"mean_loss": loss, "references": {"gene mean": {"mean_loss": 3.0}}}
            (run / "config.yaml").write_text(yaml.safe_dump(config))
            (run / "run.json").write_text(json.dumps({"stage": "pretrain", "final_eval": final}))
            (run / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1, "loss": 1.0}) + "\n")
    lines = _pretraining_verdict("cells", find_pretrain_runs([str(tmp_path)]), "r2mae")
    assert len(lines) == 3, lines
    told, told_range, blind = (
        next(line for line in lines if key in line)
        for key in ("mask_indicator=true)**: held-out masked loss averaged over the ratio grid, R²MAE (U(0.15, 0.45)) 1.0100",
                    "R²MAE (U(0.15, 0.3)) 1.2100 against the best fixed ratio (fixed40) 1.1100",
                    "mask_indicator=false)**")
    )  # fmt: skip
    assert (
        "R²MAE (U(0.15, 0.45))'s is **lower**" in told
        and "R²MAE (U(0.15, 0.3))'s is **higher**" in told_range
    )
    assert "R²MAE (U(0.15, 0.45)) 2.0100 against the best fixed ratio (fixed40) 1.9100" in blind
    (learned,) = _learned_verdict("cells", find_pretrain_runs([str(tmp_path)]))
    assert "r2mae (U(0.15, 0.45)) (model.mask_indicator=false) +0.9900" in learned and "(3 seeds)" in learned


def test_the_summary_says_how_many_tests_it_makes_and_which_calls_survive_holm():
    """Dozens of unadjusted 95 % intervals (a pairwise report) call some differences by chance: the
    summary counts its tests and its calls, and how many survive Holm's correction over all of them."""
    from biomask.report.report import _multiplicity_note

    lines = [
        "- **a vs b**, task, knn: a is **better** (Δ +0.100 [+0.050, +0.150], paired t p = 0.001, better in 3/3)",
        "- **a vs c**, task, knn: a is **worse** (Δ -0.020 [-0.039, -0.001], paired t p = 0.03, better in 0/3)",
        "  - a (a@0): 0.9 → **level** (not shown either way); Δ +0.010 [-0.01, +0.03], paired t p = 0.2, better",
        "- **R²MAE vs b**, task, probe: no significant difference (Δ +0.001, paired t p = 0.5, better in 2/3)",
        "- **Pretraining (DNA)**: R²MAE's is **lower** (better) (no p-value: not a paired t line)",
    ]
    (note,) = _multiplicity_note(lines)
    assert "makes 4 paired tests" in note and "about 0.2 would exclude zero by chance" in note
    assert "2 are called" in note and "1 of the 4 p-values stay below 5 % after Holm's correction" in note
    assert _multiplicity_note(lines[:1]) == []  # one test: nothing to correct


def test_a_key_an_older_runs_config_lacks_does_not_split_its_scheme(tmp_path):
    """A run written before a config key existed (its config.yaml lacks it) is still its scheme's."""
    from biomask.report.collect import find_pretrain_runs
    from biomask.report.report import _pretraining_verdict

    for scheme, ratio, losses in (
        ("r2mae", {"kind": "uniform", "low": 0.15, "high": 0.45}, [1.00, 1.01, 1.03]),
        ("fixed40", {"kind": "fixed", "value": 0.4}, [1.10, 1.12, 1.11]),
    ):
        for seed, loss in enumerate(losses):
            run = tmp_path / f"{scheme}-seed={seed}"
            run.mkdir()
            older = scheme == "r2mae" and seed == 0  # written before model.decorrelation existed
            model = {"kind": "cnn"} if older else {"kind": "cnn", "decorrelation": 0.0}
            config = {"masking": {"scheme": scheme, "ratio": ratio}, "model": model, "train": {"seed": seed}}
            (run / "config.yaml").write_text(yaml.safe_dump(config))
            (run / "run.json").write_text(
                json.dumps({"stage": "pretrain", "final_eval": {"mean_loss": loss}})
            )
            (run / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1, "loss": 1.0}) + "\n")
    (line,) = _pretraining_verdict("DNA", find_pretrain_runs([str(tmp_path)]), "r2mae")
    assert line.startswith("- **Pretraining (DNA)**:") and "3 pretraining seeds (0, 1, 2)" in line
    # the best fixed ratio here is picked on the loss it is compared on: said, as its bias is
    assert (
        "(fixed40) 1.1100 (the fixed ratio with the lowest mean of this same loss, a choice that favours it)"
        in line
    )


def test_the_best_fixed_ratio_is_one_built_as_r2maes_model_is_not_an_ablations():
    """cells-ratio-knowledge evaluates fixed 40 % with and without the mask indicator: R²MAE (with it)
    is compared with the fixed ratio built as it is, even where the blind one scores higher on val."""
    scores = {
        ("r2mae", "linear_probe"): [0.60, 0.62, 0.61],
        ("fixed40", "linear_probe"): [0.60, 0.61, 0.62],
        ("fixed40-blind", "linear_probe"): [0.70, 0.71, 0.69],
    }
    val = {(g, p): [v + 0.01 for v in vs] for (g, p), vs in scores.items()}
    ev = _evaluation(scores, {"r2mae": R2MAE, "fixed40": FIXED40, "fixed40-blind": FIXED40}, val)
    ev.architecture = {"r2mae": {"mask_indicator": True}, "fixed40": {"mask_indicator": True},
                       "fixed40-blind": {"mask_indicator": False}}  # fmt: skip
    (row,) = r2mae_vs_fixed(ev, "r2mae")
    assert row["group"] == "fixed40"
    # MAE's decoder is its masking's, not another model: mae75 still competes
    ev.masking["fixed40-blind"] = {**FIXED40, "corruption": {"kind": "mae"}}
    ev.architecture["fixed40-blind"] = {"mask_indicator": True, "decoder_layers": 1}
    (row,) = r2mae_vs_fixed(ev, "r2mae")
    assert row["group"] == "fixed40-blind"
    ev.architecture = {}  # no checkpoint configs to read: every fixed ratio competes, as before
    (row,) = r2mae_vs_fixed(ev, "r2mae")
    assert row["group"] == "fixed40-blind"


def test_a_report_rendered_by_other_code_than_its_results_says_which_code_computed_them(tmp_path):
    """A report rebuilt after a pull names the renderer's commit in its header: a reader would take
    it for the results', so the report names the code that wrote every stage it read."""
    from biomask.report.collect import StageRecord
    from biomask.report.report import _code_versions

    stages = {
        "biomask": "0.1.0",
        "source_sha256": "a" * 64,
        "git_commit": "70cfd6d1" + "0" * 32,
        "git_dirty": False,
    }
    records = [
        StageRecord(tmp_path / name, "evaluate", "f" * 64, stages, [], {}, "") for name in ("e1", "e2")
    ]
    renderer = {**stages, "source_sha256": "b" * 64, "git_commit": "1906d2be" + "0" * 32}
    (_, line) = _code_versions(records, renderer)
    assert "written by 70cfd6d100" in line and "rendered by 1906d2be00" in line
    assert _code_versions(records, stages) == []  # the same code: the header says it all
    assert _code_versions(records, {**renderer, "source_sha256": None}) == []  # nothing to compare
    # outputs of before 2026-12-05 kept no source hash: their clean commit tells (an upgrade audit
    # found a report over week-old outputs credited to the current commit, without a word)
    old = {k: v for k, v in stages.items() if k != "source_sha256"}
    records = [StageRecord(tmp_path / "e1", "evaluate", "f" * 64, old, [], {}, "")]
    (_, line) = _code_versions(records, renderer)
    assert "written by 70cfd6d100" in line and "rendered by 1906d2be00" in line
    assert _code_versions(records, {**renderer, "git_commit": old["git_commit"]}) == []
    (_, line) = _code_versions(records, {**renderer, "git_dirty": True})  # an edited tree at another commit
    assert "written by 70cfd6d100" in line


def test_the_header_says_what_plus_minus_is_and_what_a_paired_interval_leaves_out():
    """Scores read `0.930 ± 0.009 [0.851, 1.000]`: the key must say ± is the sd, the interval is cut
    at the metric's range, and, over pretraining seeds, that a baseline's or the random init's mean is
    taken as fixed (its split-to-split spread is not in the interval a verdict rests on)."""
    from biomask.report.report import _how_to_read

    grouped = _how_to_read(grouped=True)
    assert "mean ± sd [95 % confidence interval" in grouped and "cut to the metric's range" in grouped
    assert "taken as fixed" in grouped and "not the variation between splits" in grouped
    plain = _how_to_read(grouped=False)
    assert "mean ± sd" in plain and "taken as fixed" not in plain  # one unit, the split: nothing left out


def test_the_pretraining_verdicts_count_among_the_summarys_tests(tmp_path):
    """The held-out loss verdicts are paired tests over pretraining seeds too: a multiplicity note
    that left them out counted too few tests and let one call too many survive Holm's correction."""
    from biomask.report.collect import find_pretrain_runs
    from biomask.report.report import _multiplicity_note, _pretraining_verdict

    for scheme, ratio, losses in (
        ("r2mae", {"kind": "uniform", "low": 0.15, "high": 0.45}, [1.00, 1.02, 1.01]),
        ("fixed40", {"kind": "fixed", "value": 0.4}, [1.01, 1.00, 1.03]),
    ):
        for seed, loss in enumerate(losses):
            run = tmp_path / f"{scheme}-seed={seed}"
            run.mkdir()
            config = {
                "masking": {"scheme": scheme, "ratio": ratio},
                "model": {"kind": "cnn"},
                "train": {"seed": seed},
            }
            (run / "config.yaml").write_text(yaml.safe_dump(config))
            (run / "run.json").write_text(
                json.dumps({"stage": "pretrain", "final_eval": {"mean_loss": loss}})
            )
            (run / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1, "loss": 1.0}) + "\n")
    (loss_line,) = _pretraining_verdict("DNA", find_pretrain_runs([str(tmp_path)]), "r2mae")
    assert "paired t p = " in loss_line
    called = (
        "- **a vs b**, task, knn: a is **better** (Δ +0.1 [+0.05, +0.15], paired t p = 0.0019, better in 3/3)"
    )
    (note,) = _multiplicity_note([called, called.replace("0.0019", "0.5"), loss_line])
    assert "makes 3 paired tests" in note
    # a loss verdict that is called (its interval excludes zero) is counted among the calls
    from biomask.report.report import _one_pretraining_verdict

    (lower,) = _one_pretraining_verdict(
        "DNA", "R²MAE", {0: 1.0, 1: 1.01, 2: 1.02}, "fixed40", {0: 1.1, 1: 1.112, 2: 1.118}
    )
    assert "**lower** (better)" in lower
    (note,) = _multiplicity_note([called, lower])
    assert "2 are called" in note, note
    (two,) = _one_pretraining_verdict("DNA", "R²MAE", {0: 1.0, 1: 1.01}, "fixed40", {0: 1.1, 1: 1.112})
    assert "**only 2 seeds**" in two


def test_the_calls_that_survive_holms_correction_are_marked_where_they_stand():
    """'4 of 25 survive' leaves the reader to redo the correction to learn which: the summary marks
    each surviving call on its own line, and only those."""
    from biomask.report.report import HOLM_MARK, _mark_holm_survivors

    lines = [
        "- **a vs b**, task, knn: a is **better** (Δ +0.100 [+0.050, +0.150], paired t p = 0.001, better in 3/3)",
        "- **a vs c**, task, knn: a is **worse** (Δ -0.020 [-0.039, -0.001], paired t p = 0.03, better in 0/3)",
        "- **R²MAE vs b**, task, probe: no significant difference (Δ +0.001, paired t p = 0.5, better in 2/3)",
        "- **What the models learned**: no test here.",
    ]
    marked = _mark_holm_survivors(lines)
    assert marked[0] == lines[0] + HOLM_MARK  # 0.001 ≤ 0.05 / 3
    assert marked[1:] == lines[1:]  # 0.03 > 0.05 / 2: called on its own, not after the correction
    assert _mark_holm_survivors(lines[:1]) == lines[:1]  # one test: nothing to correct


def _runs_against_a_reference(tmp_path, gaps: dict[str, list[float]]):
    """Pretraining runs whose held-out loss is `gap` below a ±2 context reference of 1.30 nats."""
    from biomask.report.collect import find_pretrain_runs

    for scheme, per_seed in gaps.items():
        for seed, gap in enumerate(per_seed):
            run = tmp_path / f"{scheme}-seed={seed}"
            run.mkdir(parents=True)
            config = {"masking": {"scheme": scheme, "ratio": {"kind": "fixed", "value": 0.4}},
                      "model": {"kind": "cnn"}, "train": {"seed": seed}}  # fmt: skip
            final = {"mean_loss": 1.30 - gap, "references": {"context": {"mean_loss": 1.30}},
                     "reference_tables": {"k": 2}}  # fmt: skip
            (run / "config.yaml").write_text(yaml.safe_dump(config))
            (run / "run.json").write_text(json.dumps({"stage": "pretrain", "final_eval": final}))
            (run / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1, "loss": 1.0}) + "\n")
    return find_pretrain_runs([str(tmp_path)])


def test_models_a_hair_below_the_reference_are_not_said_to_have_learned_beyond_it(tmp_path):
    """runs/main's nematode CNNs: 7 of 12 runs below the ±2 context model by ten-thousandths of a nat,
    every scheme's mean within its spread of zero. A majority of runs is no evidence; the summary says
    no scheme is shown above the reference. Where schemes clear it over their seeds, it does not."""
    from biomask.report.report import _learned_verdict

    hair = {"bert15": [0.0002, -0.0036, 0.0003], "fixed40": [0.0012, -0.0009, 0.0005],
            "r2mae": [0.0025, -0.0049, 0.0002], "dynamic": [0.0011, -0.0047, -0.0002]}  # fmt: skip
    (line,) = _learned_verdict("DNA", _runs_against_a_reference(tmp_path / "hair", hair))
    assert "below the ±2 context reference" in line and "Below it in 7 of 12 runs" in line
    assert "no scheme is shown above it" in line
    clear = {"r2mae": [0.0266, 0.0288, 0.0249], "fixed40": [0.0201, 0.0189, 0.0230]}
    (line,) = _learned_verdict("DNA", _runs_against_a_reference(tmp_path / "clear", clear))
    assert line.endswith("Below it in 6 of 6 runs.")


def test_the_embeddings_section_names_the_checkpoint_that_made_them(tmp_path):
    """A study evaluates 15 checkpoints; the UMAP shows one. The report names it (and how it pooled)
    from what `biomask embed` recorded in uns["X_biomask"], and says nothing where there is no record."""
    import anndata

    from biomask.report.report import _embedded_by

    adata = anndata.AnnData(np.zeros((3, 2), dtype=np.float32))
    adata.obsm["X_biomask"] = np.zeros((3, 4), dtype=np.float32)
    plain = tmp_path / "plain.h5ad"
    adata.write_h5ad(plain)
    assert _embedded_by(str(plain), tmp_path, "X_biomask") == ""
    adata.uns["X_biomask"] = {"checkpoint": "runs/main/pretrain_cells/masking.scheme=r2mae,train.seed=0/model",
                              "masking_scheme": "r2mae", "training_steps": 1000, "cells": 3, "pooling": "mean",
                              "layer": -1, "normalisation": "l2", "checkpoint_weights_sha256": "18369d88c472" + "0" * 52}  # fmt: skip
    recorded = tmp_path / "recorded.h5ad"
    adata.write_h5ad(recorded)
    text = _embedded_by(str(recorded), tmp_path, "X_biomask")
    assert (
        "3 cells embedded by the checkpoint `runs/main/pretrain_cells/masking.scheme=r2mae,train.seed=0/model`"
        in text
    )
    assert "(r2mae, 1000 steps)" in text and "`18369d88c472`" in text and "pooling mean" in text
    # how many of the model's genes the cells measured, from which identifiers; few are called few
    adata.uns["X_biomask"]["gene_coverage"] = {"vocab_genes_present": 765, "vocab_genes": 765}
    adata.uns["X_biomask"]["gene_id_column"] = "feature_name"
    adata.write_h5ad(recorded)
    text = _embedded_by(str(recorded), tmp_path, "X_biomask")
    assert (
        text.endswith("; 765 of the model's 765 genes measured, matched on feature_name")
        and "too few" not in text
    )
    adata.uns["X_biomask"]["gene_coverage"] = {"vocab_genes_present": 17, "vocab_genes": 765}
    adata.uns["X_biomask"]["gene_id_column"] = "var index"
    adata.write_h5ad(recorded)
    text = _embedded_by(str(recorded), tmp_path, "X_biomask")
    assert "; 17 of the model's 765 genes measured — **too few" in text and "matched on" not in text


def test_the_report_names_the_runs_beside_it_by_relative_paths(tmp_path, monkeypatch):
    """Every run was printed by its absolute path (/home/<user>/...): a report published or copied
    with its runs folder pointed at the machine it was made on. Runs near the report are relative
    to its folder; others stay absolute, the home folder as `~`; a path recorded relative as it is."""
    from biomask.report.report import shown

    report = tmp_path / "project" / "runs" / "main" / "report"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert (
        shown(tmp_path / "project" / "runs" / "main" / "pretrain_dna" / "r2mae", report)
        == "../pretrain_dna/r2mae"
    )
    assert shown(str(tmp_path / "project" / "runs" / "prep" / "genome"), report) == "../../prep/genome"
    assert shown(report / "figures", report) == "figures"
    assert shown(tmp_path / "home" / "data" / "store", report) == "~/data/store"
    far = tmp_path / "elsewhere" / "store"
    assert shown(far, report) == str(far)
    # a path recorded relative by another stage: as recorded; one the report opened: from here
    assert shown("runs/main/pretrain_cells/model", report, recorded=True) == "runs/main/pretrain_cells/model"
    (tmp_path / "project").mkdir()
    monkeypatch.chdir(tmp_path / "project")
    assert shown("runs/main/pretrain_dna", Path("runs/main/report")) == "../pretrain_dna"


def test_each_targets_verdict_is_in_one_table_at_the_top_of_the_summary():
    """Nine verdicts sat mid-line in long bullets: a reviewer finds each target's model, difference,
    verdict and whether it survives Holm's correction in one table line."""
    from biomask.report.report import _targets_at_a_glance

    ev = _evaluation(
        {
            ("baseline", "linear_probe"): [0.80, 0.81, 0.82],
            ("r2mae", "linear_probe"): [0.70, 0.72, 0.71],
            ("bert15", "linear_probe"): [0.85, 0.87, 0.86],
        },
        {"r2mae": R2MAE, "bert15": FIXED15},
        val={("r2mae", "linear_probe"): [0.7] * 3, ("bert15", "linear_probe"): [0.9] * 3},
    )
    _, row, entries = judged(ev)
    table = _targets_at_a_glance([row], holm_p=0.002)
    assert table[0].startswith("Targets at a glance")
    ours, best = (line for line in table if line.startswith("| a task, linear probe macro-F1 |"))
    p = float(f"{entries['R²MAE']['cmp']['p_value']:.2g}")
    assert "| baseline 0.810 | R²MAE 0.710 | -0.100 [" in ours and "| **not met** |" in ours
    assert ours.endswith(f"| {'yes' if p <= 0.002 else 'no'} |")
    assert "| best pretrained: bert15 0.860 | +0.050 [" in best and "| **met** |" in best
    assert all(line.endswith("| no |") for line in _targets_at_a_glance([row], holm_p=None)[4:-1])
    # the same verdicts as data (summary.json), for a program gating on them without reading Markdown
    from biomask.report.report import _targets_json

    data = json.loads(json.dumps(_targets_json([row], holm_p=0.002), allow_nan=False))["targets"]
    assert [(t["model"]["name"], t["verdict"]) for t in data] == [
        (e["method"], e["status"]) for e in row["entries"]
    ]
    assert data[0]["baseline"] == {"name": "baseline", "mean": pytest.approx(0.81)}
    assert data[0]["difference"] == pytest.approx(-0.1) and data[0]["ci95"][1] < 0 and data[0]["n"] == 3
    assert data[0]["survives_holm"] == (p <= 0.002)
    # settings picked on this evaluation's own scores mark its verdicts, in the table and as data
    chosen = {"task": "the mask-ratio range, picked on this probe"}
    marked = [line for line in _targets_at_a_glance([row], 0.002, chosen) if line.startswith("| a task")]
    assert marked and all("** (settings chosen on it) |" in line for line in marked)
    data = _targets_json([row], 0.002, chosen)["targets"]
    assert all(t["settings_chosen_on_this_evaluation"] == chosen["task"] for t in data)
    assert "settings_chosen_on_this_evaluation" not in _targets_json([row], 0.002)["targets"][0]


def test_the_pretraining_section_says_what_the_models_were_pretrained_on(tmp_path):
    """A table of held-out losses named no genome or cells: each modality's section now names the
    store its runs trained on, the data the store was built from, and the split the loss is on."""
    from biomask.report.collect import find_pretrain_runs
    from biomask.report.report import _pretrained_on

    store = tmp_path / "prep_genome"
    store.mkdir()
    (store / "run.json").write_text(
        json.dumps({"stage": "prep-dna", "inputs": [{"name": "ce2-chrX", "sha256": "0"}]})
    )
    for seed in (0, 1):
        run = tmp_path / "runs" / f"r2mae-seed={seed}"
        run.mkdir(parents=True)
        config = {"data": {"store": str(store), "train_split": "train", "eval_split": "val"},
                  "masking": {"scheme": "r2mae"}, "train": {"seed": seed}}  # fmt: skip
        (run / "config.yaml").write_text(yaml.safe_dump(config))
        (run / "run.json").write_text(json.dumps({"stage": "pretrain", "final_eval": {"mean_loss": 1.3}}))
        (run / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1, "loss": 1.0}) + "\n")
    (line, _) = _pretrained_on(find_pretrain_runs([str(tmp_path / "runs")]), tmp_path / "report")
    assert (
        line
        == "Pretrained on `../prep_genome` (built from ce2-chrX): its 'train' records; held-out loss on its 'val' records."
    )


def test_the_ratio_histograms_of_many_runs_wrap_into_rows(tmp_path):
    """15 runs in one row made a 4,620 × 308 px strip that a Markdown viewer shrinks past reading:
    the panels wrap, HIST_COLUMNS to a row."""
    from PIL import Image

    from biomask.report.collect import PretrainRun
    from biomask.report.figures import HIST_COLUMNS, ratio_histograms

    runs = [
        PretrainRun(
            tmp_path,
            f"r2mae seed {i}",
            {"masking": {"scheme": "r2mae"}},
            {},
            None,
            None,
            np.full(20, 0.3 + i / 50),
            {},
        )
        for i in range(15)
    ]
    width, height = Image.open(ratio_histograms(runs, "cells", tmp_path / "ratios.png")).size
    one = Image.open(ratio_histograms(runs[:1], "cells", tmp_path / "one.png")).size
    assert width <= HIST_COLUMNS * one[0] * 1.1 and height >= 2.5 * one[1]  # 3 rows of 5
    assert width / height < 3


def test_a_run_with_one_logged_step_is_drawn_as_a_point(tmp_path, monkeypatch):
    """A short run logs one training step: a line through one point draws nothing, so the run was
    missing from the curves while its legend entry said it was there."""
    import pandas as pd

    from biomask.report import figures
    from biomask.report.collect import PretrainRun

    drawn = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: drawn.append(fig) or path)
    evals = pd.DataFrame({"step": [1], "mean_loss": [1.3]})
    runs = [
        PretrainRun(tmp_path, name, {}, {}, pd.DataFrame({"step": steps, "loss": [1.4] * len(steps)}), evals,
                    np.zeros(0), {})
        for name, steps in (("short", [1]), ("long", [1, 2, 3]))
    ]  # fmt: skip
    figures.training_curves(runs, "dna", tmp_path / "curves.png")
    short, long = drawn[0].axes[0].lines
    assert short.get_marker() not in (None, "None", "") and len(short.get_xdata()) == 1
    # longer runs stay lines, a marker every so often (an arm's seeds differ by line and marker)
    assert long.get_linestyle() not in ("None", "") and long.get_markevery() == 1


def test_the_clustering_table_says_what_is_clustered_and_how_the_best_resolution_is_chosen():
    """'ARI, best resolution (scIB)' and its intervals: a reader must learn that every labelled cell
    is clustered (a split only reseeds Leiden) and that the labels scored pick the resolution — on the
    grid the evaluation used, which an evaluation reused from before late 2026-12-07 records as another."""
    from biomask.evaluation import clustering
    from biomask.report.report import _evaluation_table, clustering_note

    ev = _evaluation(
        {("baseline", "linear_probe"): [0.8, 0.81, 0.82], ("r2mae", "knn"): [0.7, 0.72, 0.71]},
        {"r2mae": R2MAE},
    )
    assert not any("Leiden" in line for line in _evaluation_table(ev))  # nothing clustered: no note
    ev.results["summary"]["r2mae/knn"]["cluster_ari"] = summarize([0.5, 0.52, 0.51])
    ev.results["protocol_settings"] = {
        "leiden": {
            "best_resolution_grid": list(clustering.RESOLUTIONS),
            "best_resolution_by": clustering.BEST_BY,
        }
    }
    note = clustering_note(ev.results["protocol_settings"]["leiden"])
    assert note in _evaluation_table(ev)
    assert "every labelled record" in note and "highest NMI against these same labels" in note
    assert "resolutions 0.1, 0.2, …, 2" in note and "the lowest of equals" in note
    older = {
        "best_resolution_grid": [0.2, 0.4, 0.6, 0.8, 1.0],
        "best_resolution_by": "NMI against the labels (scIB)",
    }
    assert "resolutions 0.2, 0.4, …, 1" in clustering_note(older) and "nearest 1" in clustering_note(older)
    # metrics.json of before early 2026-12-07 recorded no settings: scored on the half grid
    assert "resolutions 0.2, 0.4, …, 2" in clustering_note({}) and "nearest 1" in clustering_note({})


def test_every_evaluation_defines_the_metrics_its_verdicts_rest_on():
    """DNA verdicts rest on MCC, which the report never defined (only macro-F1 was)."""
    from biomask.evaluation.metrics import MACRO_F1_NOTE
    from biomask.report.report import METRICS_NOTE

    assert METRICS_NOTE.startswith(MACRO_F1_NOTE) and "Matthews correlation coefficient" in METRICS_NOTE


def test_a_targets_caveat_from_its_evaluation_is_in_the_summary_once():
    """pbmc68k's checkpoints were pretrained on the records it tests on: evaluate notes it, but the
    note stood only in the evaluation's section; the summary carries it under the first target of
    that evaluation, once."""
    from biomask.report.report import _notes_once

    ev = _evaluation({("baseline", "linear_probe"): [0.8, 0.81, 0.82]}, {})
    noted: set[str] = set()
    assert _notes_once(ev, noted) == []  # no notes: nothing
    ev.results["notes"] = ["checkpoints r2mae@0: pretrained (label-free) on this store's 'train' records"]
    (line,) = _notes_once(ev, noted)
    assert "pretrained (label-free) on this store's 'train' records" in line
    assert _notes_once(ev, noted) == []  # the second target of the evaluation: already said


def test_r2mae_against_a_checkpoint_masked_alike_is_not_read_as_a_masking_verdict():
    """The motif task sets R²MAE CNNs pretrained on E. coli against 'nematode', the splice CNNs, masked
    the same way: 'R²MAE is better' read as a verdict on masking; the bullet says the masking is the
    same and the checkpoints differ otherwise."""
    from biomask.report.report import comparison_bullets

    scores = {("r2mae", "linear_probe"): [0.62, 0.61, 0.63], ("nematode", "linear_probe"): [0.42, 0.43, 0.44],
              ("dynamic", "linear_probe"): [0.60, 0.61, 0.62]}  # fmt: skip
    ev = _evaluation(scores, {"r2mae": R2MAE, "nematode": R2MAE, "dynamic": DYNAMIC})
    lines = comparison_bullets(ev, "r2mae")
    (nematode,) = (line for line in lines if line.startswith("- **the r2mae checkpoints vs nematode**"))
    assert "(the same masking, U(0.15, 0.45): the checkpoints differ in something else" in nematode
    assert "the r2mae checkpoints are **better**" in nematode and "R²MAE is" not in nematode
    (dynamic,) = (line for line in lines if line.startswith("- **R²MAE vs dynamic**"))
    assert "(30%→15%)" in dynamic and "the same masking" not in dynamic


def test_an_evaluations_splits_are_described_in_words():
    """'2 evaluation splits (0, 1; resample; ...)': the section says what a split is."""
    from biomask.report.report import _split_mode

    ev = _evaluation({("baseline", "linear_probe"): [0.8, 0.81]}, {})
    ev.results["splits"] = {"mode": "resample", "val": 0.1, "test": 0.3}
    assert _split_mode(ev).startswith(
        "resample: each a fresh train / val / test draw from all labelled records"
    )
    ev.results["splits"] = {"mode": "store"}
    assert _split_mode(ev) == "store: each the prep stage's one fixed split"


def test_a_comparison_with_a_method_without_pretraining_seeds_shows_each_splits_difference():
    """Against the random init (one network per split) the paired interval is over pretraining seeds
    with the random init's split mean fixed: a gain called at p = 0.01 can be negative in a split.
    The summary gives the difference split by split, from evaluate's own per-split rows."""
    from biomask.report.collect import by_pretraining_seed
    from biomask.report.report import per_split_differences, r2mae_vs_random_init

    def rows(values):
        return [{"seed": s, **{m: v for m in METRICS}} for s, v in enumerate(values)]

    methods = [
        {"name": f"r2mae@{k} (linear probe)", "group": f"r2mae@{k}", "protocol": "linear_probe"}
        for k in range(3)
    ] + [{"name": "random-init (linear probe)", "group": "random-init", "protocol": "linear_probe"}]
    per_seed = {
        "r2mae@0 (linear probe)": rows([0.60, 0.70]),
        "r2mae@1 (linear probe)": rows([0.61, 0.71]),
        "r2mae@2 (linear probe)": rows([0.62, 0.72]),
        "random-init (linear probe)": rows([0.50, 0.75]),  # beaten in split 0, ahead in split 1
    }
    results = {"methods": methods, "per_seed": per_seed, "seeds": [0, 1], "splits": {"mode": "resample"},
               "summary": {name: {m: summarize([r[m] for r in v]) for m in METRICS} for name, v in per_seed.items()}}  # fmt: skip
    grouped, masking = by_pretraining_seed(results, {"r2mae@0": R2MAE, "r2mae@1": R2MAE, "r2mae@2": R2MAE})
    ev = Evaluation("task", Path("."), "mcc", "a task", grouped, {}, masking)
    ours = "r2mae (3 pretraining seeds, linear_probe)"
    assert per_split_differences(ev, ours, "random-init (linear probe)", "mcc") == pytest.approx(
        [0.11, -0.04]
    )
    (row,) = r2mae_vs_random_init(ev, "r2mae")
    assert row["cmp"]["ci_low"] > 0 and row["splits"] == pytest.approx(
        [0.11, -0.04]
    )  # called, yet split 1 < 0
    assert per_split_differences(_evaluation({("r2mae", "linear_probe"): [0.6, 0.7]}, {}), "r2mae/linear_probe",
                                 "baseline", "mcc") is None  # fmt: skip


def test_the_loss_axes_name_their_unit(tmp_path, monkeypatch):
    """The loss-by-ratio figure's y axis read 'loss': nats for DNA, standardised MSE for the panel
    profiles. Every loss axis names the unit its runs share."""
    import matplotlib.pyplot as plt

    from biomask.report import figures
    from biomask.report.collect import PretrainRun

    def run(arch):
        return PretrainRun(tmp_path, "r2mae", {}, {"architecture": arch}, None, None, np.zeros(0),
                           {"loss": {"0.1": 1.2, "0.5": 1.3}})  # fmt: skip

    dna, cells = run({"target": "tokens"}), run({"target": "values", "scheme": "panel"})
    assert figures.loss_unit_label([dna, dna]) == " (nats)"
    assert figures.loss_unit_label([dna, cells]) == ""
    seen = []
    real_save = figures._save  # read the axis before the figure is written and closed
    monkeypatch.setattr(
        figures, "_save", lambda fig, path: (seen.append(fig.axes[0].get_ylabel()), real_save(fig, path))[1]
    )
    figures.loss_by_ratio([cells], "cells", tmp_path / "by-ratio.png")
    plt.close("all")
    assert seen == ["held-out masked loss (standardised-MSE units)"]


def test_a_report_of_a_moved_run_folder_reads_its_checkpoints_where_they_are_now(tmp_path, monkeypatch):
    """An evaluation records its checkpoints' absolute paths; once the run folder has moved, the
    report (run by the pipeline, which names the run folder) reads their masking from the moved
    checkpoints, instead of losing every scheme's description to a path that is gone."""
    from biomask.relocation import RUN_DIR_ENV
    from biomask.report.collect import load_evaluation

    old, new = tmp_path / "scratch" / "run", tmp_path / "project" / "run"
    evaluation = new / "evaluate"
    evaluation.mkdir(parents=True)
    results = _evaluation({("r2mae@0", "linear_probe"): [0.6, 0.7]}, {"r2mae@0": R2MAE}).results
    (evaluation / "metrics.json").write_text(json.dumps(results))
    recorded = {"output": str(old / "evaluate"), "checkpoints": {"r2mae@0": str(old / "pretrain" / "model")}}
    (evaluation / "config.yaml").write_text(yaml.safe_dump(recorded))
    (new / "pretrain" / "model").mkdir(parents=True)
    (new / "pretrain" / "model" / "config.json").write_text(json.dumps({"masking": R2MAE}))
    monkeypatch.setenv(RUN_DIR_ENV, str(new))
    loaded = load_evaluation("splice", str(evaluation), "mcc", None)
    assert loaded.masking == {"r2mae@0": R2MAE, "r2mae": R2MAE}  # by run, and by scheme


def test_a_published_evaluation_reads_its_own_checkpoint_never_one_in_the_readers_folder(
    tmp_path, monkeypatch, caplog
):
    """A workflow engine's task (Nextflow: each in a work folder) recorded relative paths
    (`output=eval`, `checkpoints.self=pretrain/model`); its outputs published elsewhere and the work
    folder deleted, the report resolved them from the folder it ran in: the checkpoint beside the
    evaluation was lost, and an unrelated `pretrain/model` there (fixed 40 %) labelled the run. The
    paths are taken from where the evaluation was written, and a checkpoint whose config.json is
    not the one the evaluation read is not used."""
    from biomask.relocation import RUN_DIR_ENV
    from biomask.report.collect import load_evaluation

    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    results = tmp_path / "results"
    (results / "eval").mkdir(parents=True)
    metrics = _evaluation({("self", "linear_probe"): [0.6, 0.7]}, {"self": R2MAE}).results
    (results / "eval" / "metrics.json").write_text(json.dumps(metrics))
    (results / "eval" / "config.yaml").write_text(
        yaml.safe_dump({"output": "eval", "checkpoints": {"self": "pretrain/model"}})
    )
    own = json.dumps({"masking": R2MAE}).encode()
    (results / "pretrain" / "model").mkdir(parents=True)
    (results / "pretrain" / "model" / "config.json").write_bytes(own)
    inputs = [{"name": "self", "path": "pretrain/model", "config_sha256": hashlib.sha256(own).hexdigest()}]
    run = {"stage": "evaluate", "cwd": str(tmp_path / "work" / "ab" / "cdef"), "inputs": inputs}
    (results / "eval" / "run.json").write_text(json.dumps(run))
    decoy = tmp_path / "decoy"
    (decoy / "pretrain" / "model").mkdir(parents=True)
    (decoy / "pretrain" / "model" / "config.json").write_text(json.dumps({"masking": {"scheme": "fixed40"}}))
    monkeypatch.chdir(decoy)
    assert load_evaluation("task", str(results / "eval"), "mcc", None).masking["self"] == R2MAE
    # the published checkpoint gone: the one in the reader's folder is not the one the evaluation read
    shutil.rmtree(results / "pretrain")
    with caplog.at_level("WARNING", logger="biomask.report.collect"):
        loaded = load_evaluation("task", str(results / "eval"), "mcc", None)
    assert loaded.masking["self"] == {}
    assert "is not the one the evaluation read" in caplog.text, caplog.text


def test_a_current_report_is_reused_before_its_plotting_and_statistics_are_imported(tmp_path, cli):
    """A pipeline rerun starts the report in a process of its own: one that finds its output current
    says so before importing matplotlib or scikit-learn; a changed input or key is still refused."""
    from tests.conftest import fresh_cli

    evaluation = tmp_path / "eval"
    evaluation.mkdir()
    scores = {("baseline", "linear_probe"): [0.5, 0.6], ("r2mae@0", "linear_probe"): [0.6, 0.7]}
    (evaluation / "metrics.json").write_text(json.dumps(_evaluation(scores, {"r2mae@0": R2MAE}).results))
    (evaluation / "config.yaml").write_text(yaml.safe_dump({"output": str(evaluation)}))
    (evaluation / "run.json").write_text(json.dumps({"fingerprint": "f" * 64, "created": "then"}))
    config = tmp_path / "report.yaml"
    out = tmp_path / "report"
    config.write_text(
        yaml.safe_dump({"output": str(out), "evaluations": {"task": {"path": str(evaluation)}}})
    )
    assert cli("report", "--config", config)[0] == 0
    # the provenance table names the evaluation beside the report by a path that travels with them
    assert "| `../eval` |" in (out / "report.md").read_text(encoding="utf-8")
    code, stdout, err, heavy = fresh_cli("report", "--config", config)
    assert (code, stdout, heavy) == (0, str(out / "report.md"), []), err
    assert "up to date" in err
    code, _, err, _ = fresh_cli("report", "--config", config, "title=another")
    assert code == 2 and "title: " in err and "--overwrite" in err, err
    (evaluation / "metrics.json").write_text((evaluation / "metrics.json").read_text() + " ")
    code, _, err, _ = fresh_cli("report", "--config", config)
    assert code == 2 and "--overwrite" in err, err
    # a report an older biomask wrote (no summary.json, which a workflow gates on) is not reused
    assert cli("report", "--config", config, "--overwrite")[0] == 0
    (out / "summary.json").unlink()
    code, _, err, _ = fresh_cli("report", "--config", config)
    assert code == 2 and "a report written by an older biomask (it has no summary.json" in err, err
    assert cli("report", "--config", config, "--overwrite")[0] == 0 and (out / "summary.json").is_file()


def test_figure_files_are_one_per_section_whatever_the_keys_case_or_punctuation(
    dna_checkpoint, tmp_path, cli
):
    """Keys `DNA` and `dna` (or two in another script) drew into one file, so both sections showed the
    second's curves; on macOS `eval-splice` and `eval-Splice` are one file too; an evaluation key with
    `/..` wrote a figure outside the output. Each key now gets its own file name, inside figures/."""
    import yaml

    from biomask.outputs import file_slugs

    assert file_slugs(["DNA", "dna", "单细胞", "脱氧核糖核酸", "x/../../y", "r2mae@0", "r2mae-0"]) == {
        "DNA": "dna",
        "dna": "dna-2",
        "单细胞": "单细胞",
        "脱氧核糖核酸": "脱氧核糖核酸",
        "x/../../y": "x-y",
        "r2mae@0": "r2mae-0",
        "r2mae-0": "r2mae-0-2",
    }
    assert file_slugs(["splice_ft", "Splice_FT"], keep="_") == {
        "splice_ft": "splice_ft",
        "Splice_FT": "splice_ft-2",
    }
    run = str(dna_checkpoint.parent)
    cfg = tmp_path / "report.yaml"
    cfg.write_text(
        yaml.safe_dump({"output": str(tmp_path / "out"), "pretrain": {"DNA": [run], "dna": [run]}})
    )
    code, _, err = cli("report", "-c", cfg)
    assert code == 0, err
    text = (tmp_path / "out" / "report.md").read_text()
    for slug in ("dna", "dna-2"):
        assert (tmp_path / "out" / "figures" / f"pretrain-{slug}-curves.png").is_file()
        assert f"figures/pretrain-{slug}-curves.png" in text
