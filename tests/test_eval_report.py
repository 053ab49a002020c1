"""What an evaluation report says about its numbers (issues 18 and 19): macro-F1's averaging and each
class's test support, and — with `splits.mode: store` — the store's actual split sizes, not the
config's resample fractions."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score

from biomask.evaluation.metrics import MACRO_F1_NOTE, classification_metrics
from biomask.store import TokenStore


def test_macro_f1_leaves_out_a_class_absent_from_the_test_split():
    y_true = np.array([0, 0, 1, 1, 1, 0])
    y_pred = np.array([0, 1, 1, 1, 0, 0])
    m = classification_metrics(y_true, y_pred, ["a", "b", "c"])  # c: neither true nor predicted
    assert m["absent_classes"] == ["c"]
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))  # over a and b
    assert m["macro_f1"] > f1_score(y_true, y_pred, labels=[0, 1, 2], average="macro", zero_division=0)
    assert m["per_class"]["c"]["support"] == 0 and m["per_class"]["b"]["support"] == 3


@pytest.mark.network
def test_store_splits_report_their_sizes_support_and_averaging(splice_store, tmp_path, cli):
    out = tmp_path / "eval"
    code, _, err = cli("evaluate", "-c", "configs/evaluate/splice.yaml", f"store={splice_store}", f"output={out}",
                       "seeds=[0,1]", "splits.mode=store", "baselines=[onehot_lr]", "protocols=[]",
                       "random_init=false")  # fmt: skip
    assert code == 0, err
    store = TokenStore(splice_store)
    n = {name: len(store.split(name)) for name in ("train", "val", "test")}
    report = (out / "report.md").read_text()
    assert f"the store's own (train {n['train']:,}, val {n['val']:,}, test {n['test']:,} records)" in report
    assert "val 0.1" not in report and "test 0.3" not in report  # the config's unused resample fractions
    assert MACRO_F1_NOTE in report
    test_labels = np.bincount(store.split("test").record_field("labels"), minlength=len(store.label_names))
    for name, count in zip(store.label_names, test_labels):
        assert re.search(rf"^\| {re.escape(name)} \| {count} \| \d\.\d{{3}} \|$", report, re.M), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert [s["test"] for s in metrics["split_sizes"]] == [n["test"], n["test"]]
    # which records each seed used, shipped: here the store's own split for every seed
    table = pd.read_csv(out / "splits.csv.gz", keep_default_na=False)
    assert len(table) == sum(n.values()) and table["id"].is_unique
    assert (table["seed_0"] == table["store_split"]).all() and (table["seed_1"] == table["store_split"]).all()
    test_ids = store.split("test").meta()["id"].tolist()
    assert table.loc[table["seed_0"] == "test", "id"].tolist() == test_ids
