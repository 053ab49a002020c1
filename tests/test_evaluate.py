"""`biomask evaluate`: methods on shared per-seed splits, summaries, reports, bad input."""

from __future__ import annotations

import datetime
import json
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

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
    # headed by the evaluation's own name: two evaluations of one store had one heading
    assert report.splitlines()[0] == f"# Evaluation {out.name}: {splice_store.name}"
    assert f"Store: `{splice_store}`" in report
    assert (out / "confusion-one-hot-lr.csv").exists()
    assert results["notes"] == [
        "no checkpoints given (checkpoints.NAME=PATH): the baselines only; the protocols and random_init "
        "run on checkpoints"
    ]
    assert "**Notes:**\n- no checkpoints given" in report
    # a compare name the config allows but this run has no rows of: refused before any seed runs
    code, _, err = cli(*args, "compare=[[random-init, chosen on val]]", f"output={tmp_path / 'cmp'}")
    assert code == 2 and "compare: 'random-init' has no rows in this evaluation" in err, err
    assert not (tmp_path / "cmp").exists()
    assert cli(*args)[0] == 0 and "up to date" in cli(*args)[2]  # reused
    # a key older configs lacked, at a value that behaves as its absence did on both sides: named, not
    # blamed on "different input data"
    code, _, err = cli(*args, "device=cpu")
    assert code == 2 and "device: 'auto' -> 'cpu'" in err and "different input data" not in err, err
    # as a pipeline starts it, a process of its own: reused before scikit-learn or torch is imported
    script = "import sys; from biomask.cli import main; rc = main(sys.argv[1:]); print(sorted({'sklearn', 'torch'} & set(sys.modules))); sys.exit(rc)"
    fresh = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True)
    assert fresh.returncode == 0 and fresh.stdout.split("\n")[:2] == [str(out), "[]"], fresh.stderr
    assert "up to date" in fresh.stderr
    # an input changed since: the stage decides, and says what changed
    manifest = splice_store / "manifest.json"
    original = manifest.read_text()
    try:
        manifest.write_text(original + " ")
        code, _, err = cli(*args)
        assert code == 2 and "--overwrite" in err, err
    finally:
        manifest.write_text(original)


def test_what_a_report_reader_must_know_is_in_its_notes(tmp_path, cli, repo):
    """A baseline that cannot run, and a checkpoint pretrained on the records it is tested on, are
    said in metrics.json and report.md, not only in the log."""
    from biomask.datasets import fetch
    from tests.conftest import _pretrain

    began = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    rng = np.random.default_rng(0)
    rows = ["id,sequence,label"]
    lines = [
        x for x in fetch("uci-splice").read_text().splitlines() if x.strip() and not x.startswith(("@", "%"))
    ]
    for i, line in enumerate(lines[::6]):
        fields = [f.strip() for f in line.split(",")]
        rows.append(f"r{i},{''.join(fields[:-1])[: rng.integers(40, 61)]},{fields[-1]}")
    (tmp_path / "cut.csv").write_text("\n".join(rows) + "\n")
    store = tmp_path / "store"
    code, _, err = cli(
        "prep", "dna", "-c", repo / "configs/dna/splice.yaml", f"inputs=[{{path: {tmp_path / 'cut.csv'}}}]",
        f"output={store}",
    )  # fmt: skip
    assert code == 0, err
    own = _pretrain(
        "configs/pretrain/dna-tiny.yaml", tmp_path / "own",
        **{"data.store": store, "data.max_length": 66, "model.max_len": 66, "train.steps": 2},
    )  # fmt: skip
    args = ["evaluate", "-c", repo / "configs/evaluate/position-task.yaml", f"store={store}"]
    args += [f"checkpoints.own={own}", "seeds=[0]", "protocols=[linear_probe]", "random_init=false"]
    args += ["baseline.kmer_k=2"]  # pooling auto: concat cannot apply to records of several lengths
    code, _, err = cli(*args, f"output={tmp_path / 'e1'}")
    assert code == 0, err
    # one seed: no interval, written null (strict JSON, which any parser reads), not a bare NaN
    results = json.loads((tmp_path / "e1" / "metrics.json").read_text(), parse_constant=pytest.fail)
    # the records of the seed's resampled splits, shipped by id (the table's own line numbers)
    import pandas as pd

    table = pd.read_csv(tmp_path / "e1" / "splits.csv.gz", keep_default_na=False)
    sizes = results["split_sizes"][0]
    assert table["seed_0"].value_counts().to_dict() == {k: sizes[k] for k in ("train", "val", "test")}
    assert table["id"].str.startswith("cut.csv:").all() and table["id"].is_unique
    assert results["summary"]["own (linear probe)"]["mcc"]["sd"] is None
    assert "nan" not in (tmp_path / "e1" / "report.md").read_text()
    # what a methods section states: the probes' and clustering's fixed settings, each seed's C, and
    # the machine and time (run.json), the optimizer and schedule of the pretraining run
    from biomask.evaluation.baselines import C_GRID
    from biomask.provenance import content_sha256

    settings = results["protocol_settings"]
    assert settings["linear_probe"]["C_grid"] == list(C_GRID) and settings["knn"]["k"] == 15
    assert (
        settings["leiden"]["best_resolution_grid"][:2] == [0.1, 0.2]
        and settings["leiden"]["flavor"] == "igraph"
    )
    # the study report reads the tie rule from here: scIB's, the lowest resolution of equal NMIs
    assert "the lowest resolution of the highest NMI" in settings["leiden"]["best_resolution_by"]
    assert all(r["C"] in C_GRID for r in results["per_seed"]["own (linear probe)"])
    for run in (
        json.loads((tmp_path / "e1" / "run.json").read_text()),
        json.loads((own.parent / "run.json").read_text()),
    ):
        assert 0 <= run["wall_seconds"] < 600 and began <= run["started"] <= run["created"], run
        assert run["environment"]["cpu_cores"] >= 1 and run["environment"]["memory_gib"] > 0
    # the data's digest beside the manifest's, to compare runs made elsewhere
    recorded = json.loads((tmp_path / "e1" / "run.json").read_text())["inputs"][0]
    assert recorded["content_sha256"] == content_sha256(json.loads((store / "manifest.json").read_text()))
    assert "torch.optim.AdamW" in json.loads((own.parent / "run.json").read_text())["optimizer"]["class"]
    notes = results["notes"]
    assert notes[0].startswith("baseline onehot_lr (one-hot + LR) not run: it needs records of one length")
    assert "kmer_lr (k-mer counts + LR) reads records of any length" in notes[0]
    assert notes[1].startswith("checkpoint own: pretrained (label-free) on this store's 'train' records")
    assert "set splits.mode=store" in notes[1]
    assert "concat pooling not tried: it needs records of one length" in notes[2]
    report = (tmp_path / "e1" / "report.md").read_text()
    assert all(f"- {n}" in report for n in notes)
    # the same table prepared again in another folder, from a copy: the same data (content_sha256),
    # so the same specific note, not the guess that a store of the same input file gives
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "cut.csv").write_bytes((tmp_path / "cut.csv").read_bytes())
    code, _, err = cli(
        "prep", "dna", "-c", repo / "configs/dna/splice.yaml", f"inputs=[{{path: {tmp_path / 'copy' / 'cut.csv'}}}]",
        f"output={tmp_path / 'copy' / 'store'}",
    )  # fmt: skip
    assert code == 0, err
    again = [a.replace(f"store={store}", f"store={tmp_path / 'copy' / 'store'}") for a in map(str, args)]
    code, _, err = cli(*again, f"output={tmp_path / 'e-copy'}")
    assert code == 0, err
    notes = json.loads((tmp_path / "e-copy" / "metrics.json").read_text())["notes"]
    assert notes[1].startswith("checkpoint own: pretrained (label-free) on this store's 'train' records"), (
        notes
    )
    # tested only on the store's test split, which pretraining never read: nothing to say about it
    code, _, err = cli(*args, f"output={tmp_path / 'e2'}", "splits.mode=store")
    assert code == 0, err
    assert not any("own" in n for n in json.loads((tmp_path / "e2" / "metrics.json").read_text())["notes"])
    # a validation split too small to choose on steadily is said to be
    code, _, err = cli(*args, f"output={tmp_path / 'e3'}", "splits.val=0.04", "protocols=[knn]")
    assert code == 0, err
    notes = json.loads((tmp_path / "e3" / "metrics.json").read_text())["notes"]
    assert any(n.startswith("the validation split holds 2") and "are noisy" in n for n in notes), notes
    # the same table prepared again (another split seed: another store) still holds the records the
    # checkpoint read: said by the input file's checksum, which config.json records
    again = tmp_path / "again"
    code, _, err = cli(
        "prep", "dna", "-c", repo / "configs/dna/splice.yaml", f"inputs=[{{path: {tmp_path / 'cut.csv'}}}]",
        f"output={again}", "split.seed=7",
    )  # fmt: skip
    assert code == 0, err
    code, _, err = cli(*args[:-4], f"store={again}", f"output={tmp_path / 'e4'}", "protocols=[knn]")
    assert code == 0, err
    notes = json.loads((tmp_path / "e4" / "metrics.json").read_text())["notes"]
    assert any("pretrained (label-free) on a store prepared from the same input file as this one (cut" in n
               for n in notes), notes  # fmt: skip
    # the same records from another file (a task cut inline from a GenBank file, where pretraining
    # read the CSV `datasets task` wrote): no input file in common, the same token shards
    other = tmp_path / "other.csv"
    other.write_text((tmp_path / "cut.csv").read_text() + "\n")  # another checksum, the same rows
    code, _, err = cli("prep", "dna", "-c", repo / "configs/dna/splice.yaml", f"inputs=[{{path: {other}}}]",
                       f"output={tmp_path / 'other'}")  # fmt: skip
    assert code == 0, err
    code, _, err = cli(
        *args[:-4], f"store={tmp_path / 'other'}", f"output={tmp_path / 'e5'}", "protocols=[knn]"
    )
    assert code == 0, err
    notes = json.loads((tmp_path / "e5" / "metrics.json").read_text())["notes"]
    assert any("token shards identical to this store's" in n for n in notes), notes


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


def test_kmer_baseline_chooses_k_on_validation_per_seed(splice_store, tmp_path, cli, repo):
    out = tmp_path / "eval"
    args = ["evaluate", "-c", repo / "configs/evaluate/splice.yaml", f"store={splice_store}", f"output={out}"]
    code, _, err = cli(*args, "seeds=[0,1]", "baselines=[kmer_lr]", "baseline.kmer_k=[1,2]")
    assert code == 0, err
    results = json.loads((out / "metrics.json").read_text())
    assert [m["name"] for m in results["methods"]] == ["k-mer counts + LR"] and results["kmer_k"] == [1, 2]
    assert all(r["kmer_k"] in (1, 2) for r in results["per_seed"]["k-mer counts + LR"])
    report = (out / "report.md").read_text()
    assert "k chosen on val per seed" in report
    assert "long_records" not in report  # baselines read every record whole: no model, no policy to report
    code, _, err = cli(*args, "baseline.kmer_k=[0,3]")
    assert code == 2 and "kmer_k" in err


def test_seeds_on_the_stores_one_split_give_no_interval_to_a_difference_that_cannot_vary(
    splice_store, dna_checkpoint, tmp_path, cli, repo
):
    """splits.mode=store: every seed evaluates the same split. A checkpoint's probe against one-hot LR
    (both deterministic on a split) differs by the same amount in every seed: one observation, so no
    interval and no p-value (not a zero-width interval with p = 0), and a note says why."""
    out = tmp_path / "eval"
    code, _, err = cli("evaluate", "-c", repo / "configs/evaluate/splice.yaml", f"store={splice_store}",
                       f"output={out}", f"checkpoints.tiny={dna_checkpoint}", "seeds=[0,1]", "splits.mode=store",
                       "baselines=[onehot_lr]", "random_init=false", "protocols=[linear_probe]", "pooling=mean")  # fmt: skip
    assert code == 0, err
    results = json.loads((out / "metrics.json").read_text())
    (vs_baseline,) = [c for c in results["comparisons"] if c["b"] == "one-hot + LR"]
    mcc = vs_baseline["mcc"]
    assert mcc["one_split"] and mcc["n"] == 1 and mcc["ci_low"] is None and mcc["p_value"] is None
    scores = [r["mcc"] for r in results["per_seed"]["tiny (linear probe)"]]
    assert scores[0] == scores[1]  # deterministic on the one split
    assert any("splits.mode=store: all 2 seeds evaluate the store's one split" in n for n in results["notes"])
    assert "(one split, the same in every seed: no interval)" in (out / "report.md").read_text()


def test_long_records_are_never_cut_silently(splice_store, dna_checkpoint, tmp_path, cli, repo):
    """Fine-tuning on a 30-base input: 60-base records are refused (exit 2), or windowed and reported."""
    out = tmp_path / "eval"
    args = ["evaluate", "-c", repo / "configs/evaluate/splice.yaml", f"store={splice_store}", f"output={out}"]
    args += [f"checkpoints.tiny={dna_checkpoint}", "seeds=[0]", "baselines=[]", "random_init=false"]
    args += ["protocols=[finetune]", "finetune.max_length=32", "finetune.max_steps=10", "finetune.lr=1.0e-3"]
    code, _, err = cli(*args, "long_records=refuse")
    assert code == 2 and "longer than the model's input of 30 tokens" in err and "long_records=window" in err
    assert not out.exists()
    # called from Python (a notebook): fine-tuning seeds torch's global generator and its dropout
    # draws from it; the caller's streams are its own again afterwards
    np.random.seed(7), random.seed(7), torch.manual_seed(7)
    expected = np.random.rand(), random.random(), torch.rand(1).item()
    np.random.seed(7), random.seed(7), torch.manual_seed(7)
    code, _, err = cli(*args)  # the default: windows
    assert code == 0, err
    assert (np.random.rand(), random.random(), torch.rand(1).item()) == expected
    results = json.loads((out / "metrics.json").read_text())
    assert results["long_records"] == "window"
    (method,) = results["methods"]
    assert method["inputs"] == {
        "max_tokens": 128,
        "long_records": "window",
        "n_long": 0,
        "n_long_finetune": 3003,
        "max_tokens_finetune": 30,
        "n_records": 3003,
        "longest": 60,
        "tokenizer": "char",
    }
    (row,) = results["per_seed"]["tiny (fine-tune)"]
    assert row["finetune_source"] in ("finetune", "probe") and row["best_val_mcc"] >= row["start_val_mcc"]
    assert row["lr"] == 1e-3 and [g["lr"] for g in row["grid"]] == [1e-3]
    report = (out / "report.md").read_text()
    assert (
        "- tiny: 3,003 of 3,003 records are longer than its fine-tuning input (finetune.max_length) of 30 "
        in report
    )
    assert (
        "embedded in windows of the model's length, their vectors pooled (averaged, or concatenated in order under concat pooling) (long_records=window)"
        in report
    )


def test_the_long_records_section_names_the_models_it_did_not_apply_to():
    """With one checkpoint windowed and another reading every record whole, the report names both:
    a model missing from the list would read as unreported, not as unaffected."""
    from biomask.evaluation.evaluate import _long_records_lines

    fits = {"max_tokens": 256, "n_long": 0, "n_records": 600}
    results = {
        "long_records": "window",
        "methods": [
            {"group": "baseline", "name": "k-mer counts + LR"},
            {"group": "cnn", "name": "cnn (linear probe)", "inputs": fits},
            {
                "group": "tf",
                "name": "tf (linear probe)",
                "inputs": {**fits, "max_tokens": 128, "n_long": 600},
            },
            {"group": "random-init", "name": "random-init (linear probe)", "inputs": fits},
        ],
    }
    lines = _long_records_lines(results)
    assert any(
        line.startswith("- tf: 600 of 600 records are longer than its input of 128 tokens") for line in lines
    )
    assert "- cnn, random-init: every record fits; long_records=window did not apply." in lines


@pytest.mark.parametrize(
    ("template", "pooling", "first_baseline"),
    [
        ("motif-task", ["mean", "max", "mean_layers", "cls"], "kmer_lr"),
        ("position-task", "auto", "onehot_lr"),
    ],
)
def test_copyable_templates_are_valid_and_choose_on_validation(template, pooling, first_baseline, repo):
    """The templates in configs/evaluate/ load as they are (a user sets store, output and checkpoints)."""
    from biomask.config import load_config
    from biomask.evaluation.config import EvaluateConfig

    cfg = load_config(
        EvaluateConfig, repo / f"configs/evaluate/{template}.yaml", ["checkpoints.m=some/model"]
    )
    assert cfg.pooling == pooling and cfg.baselines[0] == first_baseline and cfg.long_records == "window"
    assert isinstance(cfg.baseline.kmer_k, list) and len(cfg.baseline.kmer_k) > 1
    assert (
        isinstance(cfg.finetune.lr, list)
        and cfg.finetune.init_head == "probe"
        and cfg.finetune.min_epochs >= 1
    )
    assert cfg.protocols == ["linear_probe", "finetune"] and cfg.random_init


def test_threads_follow_the_environment_unless_set(monkeypatch):
    """`num_workers: auto` (the default) takes $OMP_NUM_THREADS — what a pipeline running stages side
    by side sets per stage — else the cores this process may use; a number is kept; 0 is refused."""
    import os

    import torch
    from pydantic import ValidationError

    from biomask import resources
    from biomask.evaluation.config import EvaluateConfig
    from biomask.evaluation.protocols import torch_threads
    from biomask.resources import resolve_threads

    cfg = EvaluateConfig(store="s", output="o", baselines=["kmer_lr"])
    assert cfg.num_workers == "auto"
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert resolve_threads("auto") == len(os.sched_getaffinity(0))
    monkeypatch.setattr(resources, "usable_cores", lambda: 4)  # a 4-core machine
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert resolve_threads("auto") == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert resolve_threads("auto") == 4
    assert resolve_threads(5) == 5
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ValidationError, match="num_workers"):
        EvaluateConfig(store="s", output="o", baselines=["kmer_lr"], num_workers=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="torch sees a GPU here")
def test_a_device_torch_cannot_use_is_refused_before_anything_is_written(
    splice_store, dna_checkpoint, tmp_path, cli, repo, monkeypatch
):
    out = tmp_path / "eval"
    args = [f"store={splice_store}", f"output={out}", "seeds=[0]", "protocols=[linear_probe]"]
    code, _, err = cli("evaluate", "-c", repo / "configs/evaluate/splice.yaml", *args,
                       f"checkpoints.a={dna_checkpoint}", "device=cuda")  # fmt: skip
    assert code == 2 and "device=cuda" in err and "Traceback" not in err, err
    assert not out.exists()
    # devices torch parses but biomask never ran on: a RuntimeError / NotImplementedError traceback before
    for device, said in (
        ("mps", "Apple GPUs (mps) are not supported yet: use device=cpu"),
        ("meta", "use auto or cpu"),
    ):
        code, _, err = cli("evaluate", "-c", repo / "configs/evaluate/splice.yaml", *args,
                           f"checkpoints.a={dna_checkpoint}", f"device={device}")  # fmt: skip
        assert code == 2 and f"device='{device}': biomask runs on cpu or cuda[:N]" in err and said in err, err
        assert "Traceback" not in err and not out.exists()
        assert "PCA" not in err and "one-hot" not in err  # before the baselines, which ran first
    # fine-tuning on an accelerator the node lacks: refused before the baselines, not at the first fine-tune
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    code, _, err = cli("evaluate", "-c", repo / "configs/evaluate/splice.yaml", *args[:-1],
                       "protocols=[linear_probe,finetune]", f"checkpoints.a={dna_checkpoint}")  # fmt: skip
    assert code == 2 and "DS_ACCELERATOR=cuda" in err and "PCA" not in err and "one-hot" not in err, err
    assert not out.exists()


def test_a_protocol_is_named_once_and_one_without_a_method_is_refused(splice_store, dna_checkpoint):
    """The evaluate config, the report's targets and the tables read one list of protocols; a name in
    it that model_methods has no branch for is refused, not run as fine-tuning under that name."""
    from typing import get_args

    from biomask.evaluation.config import PROTOCOLS, EvaluateConfig, Protocol
    from biomask.evaluation.protocols import model_methods
    from biomask.report.config import TargetSpec

    assert set(get_args(Protocol)) == set(PROTOCOLS)
    assert EvaluateConfig.model_fields["protocols"].annotation == list[Protocol]
    assert TargetSpec.model_fields["protocol"].annotation is Protocol
    cfg = EvaluateConfig(
        store=str(splice_store), output="unused", seeds=[0], checkpoints={"m": str(dna_checkpoint)}
    )
    # a protocol registered in PROTOCOLS whose branch was forgotten (validation would accept it)
    cfg = cfg.model_copy(update={"protocols": ["centroid"], "random_init": False})
    with pytest.raises(ValueError, match="protocol 'centroid' has no method"):
        model_methods(cfg, load_labelled(splice_store))


def test_a_baseline_without_a_method_is_refused_not_left_out(splice_store):
    """A baseline added to EvaluateConfig.baselines but given no branch in baseline_methods gave no row
    and no note: the table silently lacked it."""
    from biomask.evaluation.config import EvaluateConfig
    from biomask.evaluation.evaluate import baseline_methods

    cfg = EvaluateConfig(store=str(splice_store), output="unused", baselines=["kmer_lr"])
    assert [m.protocol for m in baseline_methods(cfg, load_labelled(splice_store))] == ["kmer_lr"]
    cfg = cfg.model_copy(update={"baselines": ["kmer_lr", "gc_lr"]})  # as if named in the config only
    with pytest.raises(ValueError, match="baseline 'gc_lr' has no method"):
        baseline_methods(cfg, load_labelled(splice_store))
    # every baseline names the data it reads, so another modality's store skips it with a note
    from typing import get_args

    from biomask.evaluation.evaluate import BASELINE_MODALITY

    (names,) = get_args(EvaluateConfig.model_fields["baselines"].annotation)
    assert set(get_args(names)) == set(BASELINE_MODALITY)
    notes: list[str] = []
    cfg = cfg.model_copy(update={"baselines": ["pca_lr", "kmer_lr"]})
    assert [m.protocol for m in baseline_methods(cfg, load_labelled(splice_store), notes)] == ["kmer_lr"]
    assert notes == ["baseline pca_lr needs expression; skipped for a dna store"]


@pytest.mark.slow  # pynndescent's numba compilation, once per process
def test_a_knn_graph_of_8192_records_or_more_builds_in_the_pinned_environment():
    """From 8,192 records scanpy builds its kNN graph with pynndescent, whose 0.7 returns a csr_array
    scanpy 1.11 cannot read: evaluate's knn protocol, embed's UMAP and a user's
    `sc.pp.neighbors(adata, use_rep="X_biomask")` all failed there (pyproject now keeps it below 0.7)."""
    import anndata as ad
    import scanpy as sc

    adata = ad.AnnData(np.zeros((8192, 0), dtype=np.float32))
    adata.obsm["X_biomask"] = np.random.default_rng(0).normal(size=(8192, 8)).astype(np.float32)
    sc.pp.neighbors(adata, use_rep="X_biomask", n_neighbors=15, random_state=0)
    assert adata.obsp["connectivities"].shape == (8192, 8192) and adata.obsp["distances"].nnz >= 8192 * 14


def test_the_best_resolution_is_scibs_every_tenth_from_01_keeping_the_first_maximum():
    """scIB scores Leiden at 0.1, 0.2, ..., 2.0 and keeps the lowest resolution of the highest NMI;
    biomask tried every other step and kept the one nearest 1, so a representation whose clusters
    match the labels at 0.1 was judged at another resolution than scIB's."""
    from biomask.evaluation.clustering import RESOLUTIONS, cluster_scores

    assert tuple(round(0.1 * i, 1) for i in range(1, 21)) == RESOLUTIONS
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 30)
    x = rng.normal(scale=0.01, size=(90, 4)) + 100.0 * labels[:, None]  # three graph components
    scores = cluster_scores(x, labels, seed=0)
    # every resolution up to where Leiden starts splitting the components finds the labels exactly
    assert scores["cluster_nmi_best"] == pytest.approx(1.0) and scores["best_resolution"] == 0.1
    assert scores["cluster_ari_best"] == pytest.approx(1.0)


def test_an_environment_whose_scanpy_cannot_read_pynndescents_graph_is_named(monkeypatch, tmp_path):
    """A scientist's environment upgraded to pynndescent 0.7 after installing biomask met scanpy's bare
    AttributeError once the models were done: the versions and the fix are named instead."""
    import scanpy as sc

    from biomask.errors import BiomaskError
    from biomask.evaluation.clustering import cluster_scores

    def broken(*args, **kwargs):
        raise AttributeError("'csr_array' object has no attribute 'getnnz'")

    monkeypatch.setattr(sc.pp, "neighbors", broken)
    x = np.random.default_rng(0).normal(size=(40, 4))
    with pytest.raises(
        BiomaskError,
        match=r"pynndescent .* install the version biomask requires: pip install 'pynndescent<0.7'",
    ):
        cluster_scores(x, np.arange(40) % 2, seed=0)
    import pandas as pd

    from biomask.embedding.plots import umap_png

    with pytest.raises(BiomaskError, match="pynndescent<0.7"):  # embed's and the report's UMAP too
        umap_png(x.astype(np.float32), pd.Series(["a", "b"] * 20, name="kind"), tmp_path / "u.png", title="t")

    def other(*args, **kwargs):
        raise AttributeError("some other bug")

    monkeypatch.setattr(sc.pp, "neighbors", other)
    with pytest.raises(AttributeError, match="some other bug"):  # not blamed on pynndescent
        cluster_scores(x, np.arange(40) % 2, seed=0)


def test_a_compare_pair_naming_no_checkpoint_is_refused_not_left_out():
    """`compare=[[beta, logit]]` with checkpoints named beta@0, logit@0 (as the config's own example
    reads) ran, exit 0, and the pair was missing from metrics.json and the report without a word."""
    from biomask.config import load_config
    from biomask.errors import ConfigError
    from biomask.evaluation.config import EvaluateConfig

    base = ["store=s", "output=o", "checkpoints={beta@0: a, logit@0: b}"]
    with pytest.raises(
        ConfigError, match=r"compare: 'beta' names no checkpoint .* compared as such, e\.g\. beta@0"
    ):
        load_config(EvaluateConfig, None, [*base, "compare=[[beta, logit]]"])
    cfg = load_config(
        EvaluateConfig,
        None,
        [*base, "compare=[[beta@0, logit@0], [beta@0, random-init], [chosen on val, random-init]]"],
    )
    assert cfg.compare == [["beta@0", "logit@0"], ["beta@0", "random-init"], ["chosen on val", "random-init"]]


def test_batch_mixing_counts_each_label_and_batch_once():
    """The expected share of other-batch neighbours was a scan of every record per record (quadratic:
    18 s at 80,000 records); now counted per (label, batch), to the same values."""
    from biomask.evaluation import clustering

    rng = np.random.default_rng(0)
    labels, batches = rng.choice(["a", "b", "c"], 600), rng.integers(0, 3, 600)
    x = rng.normal(size=(600, 4)).astype(np.float32) + batches[:, None]  # batches apart: mixing below 1
    scores = clustering.batch_scores(x, labels, batches)
    expected = np.array([np.mean(batches[labels == lab] != b) for lab, b in zip(labels, batches)])
    from sklearn.neighbors import NearestNeighbors

    k = clustering.N_NEIGHBORS
    near = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x, return_distance=False)[:, 1:]
    other = (batches[near] != batches[:, None]).mean(axis=1)
    assert scores["batch_mixing"] == pytest.approx(other.mean() / expected.mean(), rel=1e-12)


def test_the_expression_matrix_is_the_stores_values_cell_by_cell(pbmc_store, tmp_path):
    """The cell baselines' matrix, built as CSR directly since 2026-12-07 (5.7 GB for 50,000 panel
    cells the COO way): every record's genes and values, in order, columns no record names dropped.
    A panel record stores every gene, zeros included: those zeros are not stored (86 % of an
    atlas's panel values; 200,000 cells took over 12 GB), a gene every record holds at 0 keeps its
    column, and the dense matrix is the same."""
    import scipy.sparse as sp

    from biomask.vocab import NUM_SPECIAL
    from tests.cells_store import prep_pbmc

    panel = prep_pbmc(tmp_path / "panel", scheme="panel")
    for store in (pbmc_store, panel):
        data = load_labelled(store)
        matrix = data.expression
        rows, cols, vals = [], [], []
        for i in range(len(data)):
            record = data.record(i)
            rows.append(np.full(record["tokens"].size, i))
            cols.append(np.asarray(record["tokens"], dtype=np.int64))
            vals.append(np.asarray(record["values"], dtype=np.float32))
        vocab = int(data.store.manifest["tokenizer"]["vocab_size"])
        reference = sp.csr_matrix(
            (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(len(data), vocab)
        )
        reference = reference[:, np.unique(reference.indices)]
        stored_zeros = int((reference.data == 0).sum())
        reference.eliminate_zeros()
        assert matrix.shape == reference.shape and matrix.dtype == np.float32
        for name in ("indptr", "indices", "data"):
            assert np.array_equal(getattr(matrix, name), getattr(reference, name)), name
        if store == panel:  # the case that matters: zeros were most of what was stored
            assert stored_zeros > matrix.nnz and matrix.shape[1] == vocab - NUM_SPECIAL
    # a gene every record holds at 0 keeps its column (the baselines' feature count), a gene no record
    # names has none
    from types import SimpleNamespace

    from biomask.evaluation.data import LabelledRecords

    records = [
        {"tokens": np.array([5, 6, 7]), "values": np.array([1.0, 0.0, 2.0], dtype=np.float32)},
        {"tokens": np.array([5, 6, 7]), "values": np.array([0.0, 0.0, 3.0], dtype=np.float32)},
    ]
    store = SimpleNamespace(manifest={"tokenizer": {"vocab_size": 9}})
    data = LabelledRecords(
        store, np.zeros(2, dtype=np.int64), np.array(["train"] * 2), [("train", 0), ("train", 1)]
    )
    data.__dict__["_splits"] = {"train": records}
    matrix = data.expression
    assert matrix.shape == (2, 3) and matrix.nnz == 3
    assert matrix.toarray().tolist() == [[1.0, 0.0, 2.0], [0.0, 0.0, 3.0]]


def test_evaluate_gives_torchs_linear_back_after_a_zero3_fine_tune(monkeypatch, tmp_path):
    """ZeRO-3 fine-tuning swaps torch.nn.functional.linear for DeepSpeed's own "until manually reset";
    a notebook's next model ran on it. evaluate gives torch's back, as pretrain does (tested there
    with a real ZeRO-3 run)."""
    import torch

    from biomask.evaluation import evaluate as module

    linear = torch.nn.functional.linear

    def swapping(cfg, **kwargs):  # what deepspeed.initialize does at ZeRO-3
        torch.nn.functional.linear = lambda *a, **k: linear(*a, **k)
        return tmp_path

    monkeypatch.setattr(module, "_evaluate", swapping)
    assert module.evaluate(None) == tmp_path
    assert torch.nn.functional.linear is linear
