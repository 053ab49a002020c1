"""Checkpoints of different DNA tokenizers in one evaluation (issue 16: the tokenizer chosen per task on
validation data): a 3-mer checkpoint reads the char splice store's sequences in its own tokens, next to
a char checkpoint on the same splits, and `select_on_val` adds the row that uses, per seed, the
checkpoint whose linear probe is best on validation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, _pretrain


@pytest.fixture(scope="module")
def kmer_checkpoint(tmp_path_factory) -> Path:
    """A tiny encoder pretrained for 30 steps on 200 kb of C. elegans chrX in non-overlapping 3-mers."""
    from biomask.config import load_config
    from biomask.dna.config import DNAPrepConfig
    from biomask.dna.prep import prep_dna

    root = tmp_path_factory.mktemp("kmer")
    overrides = [f"output={root / 'store'}", "windows.length=512", "windows.stride=512",
                 "windows.max_bases=200000", "tokenizer.kind=kmer", "tokenizer.k=3"]  # fmt: skip
    store = prep_dna(load_config(DNAPrepConfig, REPO / "configs/dna/ce2-chrX.yaml", overrides))
    return _pretrain(
        "configs/pretrain/dna-tiny.yaml",
        root / "model",
        **{"data.store": store, "data.max_length": 66, "model.max_len": 66, "train.steps": 30},
    )


@pytest.mark.network
def test_checkpoints_of_other_tokenizers_are_evaluated_and_one_is_chosen_on_val(
    dna_checkpoint, kmer_checkpoint, splice_store, tmp_path, cli
):
    out = tmp_path / "eval"
    code, _, err = cli(
        "evaluate", "-c", REPO / "configs/evaluate/splice.yaml", f"store={splice_store}", f"output={out}",
        f"checkpoints.char={dna_checkpoint}", f"checkpoints.kmer3={kmer_checkpoint}", "seeds=[0,1]",
        "protocols=[linear_probe]", "baselines=[onehot_lr]", "random_init=false", "pooling=mean",
        "select_on_val=true",
    )  # fmt: skip
    assert code == 0, err
    results = json.loads((out / "metrics.json").read_text())
    methods = {m["name"]: m for m in results["methods"]}
    assert methods["kmer3 (linear probe)"]["inputs"].get("retokenized") is True
    assert "retokenized" not in methods["char (linear probe)"]["inputs"]
    # 60 bases in 3-mers: 20 tokens a record (no record needed windows)
    assert methods["kmer3 (linear probe)"]["inputs"]["n_long"] == 0
    # which tokens each read is recorded and reported: the chosen row may pick a tokenizer
    assert methods["kmer3 (linear probe)"]["inputs"]["tokenizer"] == "kmer (k=3)"
    assert methods["char (linear probe)"]["inputs"]["tokenizer"] == "char"
    report = (out / "report.md").read_text()
    assert (
        "Tokenizers the checkpoints read: char: char; kmer3: kmer (k=3) (the store's sequences re-tokenized)"
        in report
    )

    per_seed = results["per_seed"]
    for i, row in enumerate(per_seed["chosen on val (linear probe)"]):
        scores = row["chosen_val_mcc"]
        assert set(scores) == {"char", "kmer3"}
        assert row["chosen"] == max(scores, key=scores.get)  # the better probe on validation ...
        picked = per_seed[f"{row['chosen']} (linear probe)"][i]
        assert row["seed"] == picked["seed"]
        assert np.isclose(row["mcc"], picked["mcc"])  # ... and exactly its test predictions
        for name, score in scores.items():
            assert np.isclose(score, per_seed[f"{name} (linear probe)"][i]["val_mcc"], atol=1e-4)
    assert "checkpoint per seed" in (out / "report.md").read_text()
    # no linear probe to choose by: said, not a silent missing row; no protocol at all: refused
    common = ["evaluate", "-c", REPO / "configs/evaluate/splice.yaml", f"store={splice_store}",
              f"checkpoints.char={dna_checkpoint}", f"checkpoints.kmer3={kmer_checkpoint}", "seeds=[0]",
              "baselines=[]", "random_init=false", "pooling=mean", "select_on_val=true"]  # fmt: skip
    code, _, err = cli(*common, f"output={tmp_path / 'knn'}", "protocols=[knn]")
    assert code == 0 and "protocols ['knn'] has no linear_probe: no row added" in err, err
    methods = [m["name"] for m in json.loads((tmp_path / "knn" / "metrics.json").read_text())["methods"]]
    assert sorted(methods) == ["char (kNN)", "kmer3 (kNN)"]
    code, _, err = cli(*common, f"output={tmp_path / 'knn-only'}", "protocols=[knn]", "select_on_val=false")
    assert code == 0 and "no linear_probe" not in err  # nothing asked of a probe: nothing said of it
    code, _, err = cli(*common, f"output={tmp_path / 'none'}", "protocols=[]")
    assert code == 2 and "protocols: empty, so none of the checkpoints would be evaluated" in err
    assert not (tmp_path / "none").exists()
