"""`biomask evaluate`: methods on shared per-seed splits, summaries, reports, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from biomask.evaluation.config import SplitSpec
from biomask.evaluation.data import load_labelled, seed_split

pytestmark = pytest.mark.network


def test_splits_are_deterministic_stratified_and_disjoint(splice_store):
    data = load_labelled(splice_store)
    spec = SplitSpec(mode="resample", val=0.1, test=0.3)
    a = seed_split(data, spec, 3)
    b = seed_split(data, spec, 3)
    c = seed_split(data, spec, 4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[2], c[2])
    train, val, test = a
    assert len(set(train) | set(val) | set(test)) == len(data) == len(train) + len(val) + len(test)
    assert abs(len(test) / len(data) - 0.3) < 0.01
    fractions = [np.bincount(data.labels[idx], minlength=3) / len(idx) for idx in (train, test)]
    assert np.abs(fractions[0] - fractions[1]).max() < 0.02  # stratified
    stored = seed_split(data, SplitSpec(mode="store"), 0)
    assert [len(x) for x in stored] == [len(data.store.split(s)) for s in ("train", "val", "test")]


def test_baselines_end_to_end(splice_store, tmp_path, cli, repo):
    out = tmp_path / "eval"
    args = ["evaluate", "-c", repo / "configs/evaluate/splice.yaml", f"store={splice_store}", f"output={out}"]
    args += ["seeds=[0,1,2]", "baseline.kmer_k=2"]
    code, _, err = cli(*args)
    assert code == 0, err
    results = json.loads((out / "metrics.json").read_text())
    names = [m["name"] for m in results["methods"]]
    assert names == ["2-mer counts + LR", "one-hot + LR"]
    onehot = results["summary"]["one-hot + LR"]
    assert (
        onehot["mcc"]["n"] == 3
        and onehot["mcc"]["ci_low"] <= onehot["mcc"]["mean"] <= onehot["mcc"]["ci_high"]
    )
    assert results["strongest_baseline"] == "one-hot + LR"
    per_seed = results["per_seed"]["one-hot + LR"]
    assert [r["seed"] for r in per_seed] == [0, 1, 2]
    assert np.array(per_seed[0]["confusion_matrix"]).sum() == round(0.3 * 3003)
    report = (out / "report.md").read_text()
    assert "| one-hot + LR | onehot_lr |" in report and "±" in report
    assert (out / "confusion-one-hot-lr.csv").exists()
    assert cli(*args)[0] == 0 and "up to date" in cli(*args)[2]  # reused


def test_store_without_labels_is_refused(genome_store, tmp_path, cli, repo):
    code, _, err = cli(
        "evaluate",
        "-c",
        repo / "configs/evaluate/splice.yaml",
        f"store={genome_store}",
        f"output={tmp_path / 'e'}",
    )
    assert code == 2 and "has no labels" in err
    assert not (tmp_path / "e").exists()
