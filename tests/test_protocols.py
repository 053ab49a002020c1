"""`biomask evaluate` with pretrained checkpoints: probes on frozen embeddings beat chance on real data,
fine-tuning through the DeepSpeed engine improves over the untrained head and is reproducible, every
checkpoint × protocol (and the random init) lands in the table, and mismatched checkpoints exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import matthews_corrcoef

from biomask.evaluation.config import FinetuneSpec, SplitSpec
from biomask.evaluation.data import load_labelled, seed_split
from biomask.evaluation.finetune import finetune
from biomask.models import load_pretrained

pytestmark = [pytest.mark.network, pytest.mark.timeout(300)]


def test_probes_beat_chance_on_splice_next_to_the_baselines(
    splice_store, dna_checkpoint, tmp_path, cli, repo
):
    out = tmp_path / "eval"
    code, _, err = cli(
        "evaluate",
        "-c",
        repo / "configs/evaluate/splice.yaml",
        f"store={splice_store}",
        f"output={out}",
        f"checkpoints.tiny={dna_checkpoint}",
        "protocols=[linear_probe,mlp_probe]",
        "seeds=[0,1]",
        "baselines=[onehot_lr]",
    )
    assert code == 0, err
    results = json.loads((out / "metrics.json").read_text())
    rows = [(m["name"], m["group"], m["protocol"]) for m in results["methods"]]
    assert rows == [
        ("one-hot + LR", "baseline", "onehot_lr"),
        ("tiny (linear probe)", "tiny", "linear_probe"),
        ("tiny (MLP probe)", "tiny", "mlp_probe"),
        ("random-init (linear probe)", "random-init", "linear_probe"),
        ("random-init (MLP probe)", "random-init", "mlp_probe"),
    ]
    summary = results["summary"]
    # three classes, the largest half of the records: chance is MCC 0, accuracy ~0.52
    majority = max(np.bincount(load_labelled(splice_store).labels)) / len(load_labelled(splice_store))
    for name in ("tiny (linear probe)", "random-init (linear probe)"):
        assert summary[name]["mcc"]["mean"] > 0.25, summary[name]["mcc"]
        assert summary[name]["accuracy"]["mean"] > majority + 0.08
    assert all(r["mcc"] > 0.15 for r in results["per_seed"]["tiny (linear probe)"])
    # every model row is compared with the strongest baseline on the same seeds, and each checkpoint
    # with the random init per protocol (what pretraining adds)
    pairs = {(c["a"], c["b"]) for c in results["comparisons"]}
    assert ("tiny (linear probe)", "one-hot + LR") in pairs
    assert ("tiny (MLP probe)", "random-init (MLP probe)") in pairs and len(pairs) == 6
    report = (out / "report.md").read_text()
    assert "| tiny (linear probe) | linear_probe |" in report and "random-init (MLP probe)" in report


def test_the_random_init_is_paired_only_with_checkpoints_of_its_architecture(
    splice_store, dna_checkpoint, genome_store, tmp_path, cli, repo
):
    """The untrained model is the first checkpoint's architecture: a checkpoint of another (here a
    cnn beside a transformer) gets no "what pretraining adds" row against it, in metrics.json or in
    the report's verdicts, where a difference of architecture would pass for one of pretraining."""
    from tests.conftest import _pretrain

    cnn = _pretrain(
        "configs/pretrain/dna-cnn-quick.yaml", tmp_path / "cnn",
        **{"data.store": genome_store, "data.max_length": 130, "model.max_len": 130, "train.steps": 2},
    )  # fmt: skip
    out = tmp_path / "eval"
    code, _, err = cli(
        "evaluate", "-c", repo / "configs/evaluate/splice.yaml", f"store={splice_store}", f"output={out}",
        f"checkpoints.tiny={dna_checkpoint}", f"checkpoints.cnn={cnn}", "protocols=[linear_probe]",
        "seeds=[0,1]", "baselines=[onehot_lr]", "select_on_val=false",
    )  # fmt: skip
    assert code == 0, err
    results = json.loads((out / "metrics.json").read_text())
    random = next(m for m in results["methods"] if m["group"] == "random-init")
    assert random["architecture_of"] == ["tiny"]
    pairs = {(c["a"], c["b"]) for c in results["comparisons"]}
    assert ("tiny (linear probe)", "random-init (linear probe)") in pairs
    assert ("cnn (linear probe)", "random-init (linear probe)") not in pairs
    assert ("cnn (linear probe)", "one-hot + LR") in pairs  # still measured against the baseline
    assert any("random-init is tiny's architecture" in n for n in results["notes"])

    from biomask.report.collect import load_evaluation
    from biomask.report.report import r2mae_vs_random_init

    ev = load_evaluation("splice", str(out), "mcc", None)
    assert r2mae_vs_random_init(ev, "cnn") == [] and r2mae_vs_random_init(ev, "tiny")


@pytest.fixture(scope="module")
def splice_split(splice_store):
    data = load_labelled(splice_store)
    train, val, test = seed_split(data, SplitSpec(mode="resample", val=0.1, test=0.3), 0)
    records = [data.record(i) for i in range(len(data))]
    return data, records, (train, val, test)


def run_finetune(checkpoint, splice_split, *, stage: int, seed: int = 0):
    data, records, split = splice_split
    settings = FinetuneSpec(
        max_steps=80,
        batch_size=32,
        lr=1e-3,
        head_lr=3e-3,
        eval_every=20,
        patience=3,
        zero_stage=stage,
        warmup=0.0,
    )
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return finetune(
            load_pretrained(checkpoint),
            records,
            data.labels,
            split,
            n_classes=3,
            settings=settings,
            seed=seed,
            max_length=62,
        )
    finally:
        torch.set_num_threads(before)


def test_finetuning_through_deepspeed_improves_over_the_untrained_head(dna_checkpoint, splice_split):
    """Several engines in one process (ZeRO-2, ZeRO-0); the same seed gives the same predictions."""
    data, _, (_, _, test) = splice_split
    zero2 = run_finetune(dna_checkpoint, splice_split, stage=2)
    untrained = zero2.history[0]
    assert untrained["step"] == 0
    assert zero2.best_val_mcc > untrained["val_mcc"] + 0.2 and zero2.best_step > 0
    assert matthews_corrcoef(data.labels[test], zero2.test_predictions) > 0.25  # chance: 0
    assert zero2.steps <= 80 and [h["step"] for h in zero2.history][:2] == [0, 20]
    again = run_finetune(dna_checkpoint, splice_split, stage=2)
    assert np.array_equal(again.test_predictions, zero2.test_predictions)
    assert [h["val_mcc"] for h in again.history] == [h["val_mcc"] for h in zero2.history]
    zero0 = run_finetune(dna_checkpoint, splice_split, stage=0)
    assert zero0.best_val_mcc > untrained["val_mcc"] + 0.2


def test_cells_checkpoint_fine_tunes_through_evaluate(pbmc_store, cells_checkpoint, tmp_path, cli, repo):
    out = tmp_path / "eval"
    code, _, err = cli(
        "evaluate",
        "-c",
        repo / "configs/evaluate/splice.yaml",
        f"store={pbmc_store}",
        f"output={out}",
        f"checkpoints.cells={cells_checkpoint}",
        "protocols=[linear_probe,finetune]",
        "seeds=[0]",
        "baselines=[pca_lr]",
        "random_init=false",
        "pooling=mean",
        "finetune.max_steps=30",
        "finetune.eval_every=10",
        "finetune.max_length=33",
        "finetune.zero_stage=1",
    )
    assert code == 0, err
    results = json.loads((out / "metrics.json").read_text())
    assert [m["name"] for m in results["methods"]] == [
        "PCA(50) + LR",
        "cells (linear probe)",
        "cells (fine-tune)",
    ]
    for name in ("cells (linear probe)", "cells (fine-tune)"):
        assert np.array(results["per_seed"][name][0]["confusion_matrix"]).sum() == round(0.3 * 700)
    assert (out / "confusion-cells-fine-tune.csv").exists()


@pytest.mark.parametrize("case", ["modality", "tokenizer", "pooling"])
def test_a_checkpoint_that_does_not_fit_the_store_exits_2(
    case, splice_store, pbmc_store, dna_checkpoint, cells_checkpoint, tmp_path, cli, repo
):
    extra = []
    if case == "modality":
        store, checkpoint, expected = splice_store, cells_checkpoint, "is a cells model"
    elif case == "pooling":  # cells have as many tokens as expressed genes: no position-aware pooling
        store, checkpoint, expected = (
            pbmc_store,
            cells_checkpoint,
            "pooling concat needs records of one length",
        )
        extra = ["pooling=concat", "baselines=[pca_lr]"]
    else:  # cells of another gene vocabulary (a DNA checkpoint would re-tokenize the sequences)
        from biomask.cells.config import CellsPrepConfig
        from biomask.cells.prep import prep_cells
        from biomask.config import load_config

        cfg = load_config(
            CellsPrepConfig,
            repo / "configs/cells/pbmc68k_reduced.yaml",
            [f"output={tmp_path / 'hvg'}", "tokenizer.path=null", "hvg.n_top_genes=300"],
        )
        store, checkpoint, expected = prep_cells(cfg), cells_checkpoint, "different tokenizer"
        extra = ["baselines=[pca_lr]"]
    out = tmp_path / "eval"
    code, _, err = cli(
        "evaluate", "-c", repo / "configs/evaluate/splice.yaml", f"store={store}", f"output={out}",
        f"checkpoints.m={checkpoint}", "seeds=[0]", *extra,
    )  # fmt: skip
    assert code == 2 and expected in err and (str(checkpoint) in err or str(store) in err)
    assert not out.exists()
