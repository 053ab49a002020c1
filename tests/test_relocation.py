"""A stage run by hand (no pipeline, so no run folder to measure paths from) compares its input paths
by the files they name: `runs/prep/p`, `./runs/prep/p`, its absolute path, the same from another
working directory or through a linked folder are one input, and the rerun is reused. A really
different file is still refused, naming its key. Each stage here runs on pbmc68k_reduced's panel."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PANEL = REPO / "configs" / "cells" / "pbmc68k_reduced-panel.yaml"
MLP = REPO / "configs" / "pretrain" / "cells-mlp.yaml"
EVALUATE = REPO / "configs" / "evaluate" / "pbmc68k_reduced.yaml"
EMBED = REPO / "configs" / "embed" / "pbmc68k_reduced.yaml"
TINY = ["train.steps=5", "train.log_every=5", "train.eval_batches=1", "optim.warmup_steps=1"]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project folder, run by hand from its root: a panel store at runs/prep/p, and a profile model
    pretrained on it at runs/pretrain/y (with a DeepSpeed JSON of the user's own, ds.json), every path
    relative as a user types them."""
    import torch

    from biomask.cells.config import CellsPrepConfig
    from biomask.cells.prep import prep_cells
    from biomask.config import load_config
    from biomask.training.config import PretrainConfig
    from biomask.training.trainer import pretrain

    root = tmp_path_factory.mktemp("project")
    shutil.copy(REPO / "configs" / "deepspeed" / "zero0.json", root / "ds.json")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.chdir(root):
            prep_cells(load_config(CellsPrepConfig, PANEL, ["output=runs/prep/p"]))
            overrides = ["data.store=runs/prep/p", "output=runs/pretrain/y", "deepspeed.config=ds.json"]
            pretrain(load_config(PretrainConfig, MLP, [*overrides, *TINY]))
    finally:
        torch.set_num_threads(threads)
    return root


def test_a_recorded_path_is_kept_where_the_new_one_names_the_same_file(tmp_path, monkeypatch):
    from biomask.relocation import as_recorded, written_from

    (tmp_path / "runs" / "x").mkdir(parents=True)
    (tmp_path / "runs" / "other").mkdir()
    monkeypatch.chdir(tmp_path)
    recorded = {"store": "runs/x", "checkpoints": {"a": "runs/x"}, "seeds": [0], "pooling": "mean"}
    new = {
        "store": f"{tmp_path}/runs/x/",
        "checkpoints": {"a": "./runs/other"},
        "seeds": [0],
        "pooling": "cls",
    }
    assert as_recorded(new, recorded, tmp_path) == {**new, "store": "runs/x"}
    # a relative recorded output says where its config's relative paths were relative to
    assert written_from(tmp_path / "runs" / "out", "./runs/out", None) == tmp_path
    assert written_from(tmp_path / "elsewhere", "runs/out", "/was/here") == Path("/was/here")
    assert written_from(tmp_path / "out", "/abs/out", None) is None


def test_prep_cells_tokenizer_path_however_spelled(project, tmp_path, monkeypatch, cli):
    monkeypatch.chdir(project)
    args = ["prep", "cells", "--config", PANEL, "output=runs/prep/q"]
    code, _, err = cli(*args, "tokenizer.path=runs/prep/p")
    assert code == 0, err
    written = (project / "runs" / "prep" / "q" / "run.json").read_text()
    for spelled in ("./runs/prep/p", f"{project}/runs/prep/p", "runs/prep/p/", "runs//prep/p"):
        code, _, err = cli(*args, f"tokenizer.path={spelled}")
        assert code == 0 and "reusing it" in err, (spelled, err)
    # from another working directory, and through a link to the project folder
    monkeypatch.chdir(project / "runs")
    code, _, err = cli("prep", "cells", "--config", PANEL, "output=prep/q", "tokenizer.path=prep/p")
    assert code == 0 and "reusing it" in err, err
    (tmp_path / "link").symlink_to(project)
    monkeypatch.chdir(tmp_path / "link")
    code, _, err = cli(*args, f"tokenizer.path={tmp_path}/link/runs/prep/p")
    assert code == 0 and "reusing it" in err, err
    assert (project / "runs" / "prep" / "q" / "run.json").read_text() == written
    # a copy is another store (the same contents today, not tomorrow): refused, naming the key
    shutil.copytree(project / "runs" / "prep" / "p", project / "runs" / "prep" / "p-copy")
    code, _, err = cli(*args, "tokenizer.path=./runs/prep/p-copy")
    assert code == 2 and "tokenizer.path: 'runs/prep/p' -> './runs/prep/p-copy'" in err, err


def test_an_output_that_recorded_no_working_directory_is_still_reused(project, monkeypatch, cli):
    """Outputs written before run.json recorded `cwd`: their relative output says where they were run."""
    monkeypatch.chdir(project)
    args = ["prep", "cells", "--config", PANEL, "output=runs/prep/old"]
    assert cli(*args, "tokenizer.path=runs/prep/p")[0] == 0
    info_file = project / "runs" / "prep" / "old" / "run.json"
    info = json.loads(info_file.read_text())
    info.pop("cwd", None)
    info_file.write_text(json.dumps(info))
    code, _, err = cli(*args, f"tokenizer.path={project}/runs/prep/p")
    assert code == 0 and "reusing it" in err, err


def test_pretrain_init_from_and_deepspeed_config_however_spelled(project, monkeypatch, cli):
    from biomask.config import load_config
    from biomask.training.config import PretrainConfig
    from biomask.training.rundir import finished_run

    monkeypatch.chdir(project)
    # the run the fixture wrote, found by the torch-free check however its files are spelled
    spelled = [
        "data.store=./runs/prep/p",
        f"output={project}/runs/pretrain/y",
        f"deepspeed.config={project}/ds.json",
    ]
    assert finished_run(load_config(PretrainConfig, MLP, [*spelled, *TINY]), 1) is not None
    shutil.copy(project / "ds.json", project / "ds-copy.json")
    copied = [*spelled[:2], "deepspeed.config=ds-copy.json"]
    code, _, err = cli("pretrain", "--config", MLP, *copied, *TINY)
    assert code == 2 and "deepspeed.config: 'ds.json' -> 'ds-copy.json'" in err, err

    args = ["pretrain", "--config", MLP, "data.store=runs/prep/p", "output=runs/pretrain/z", *TINY]
    assert cli(*args, "model.init_from=runs/pretrain/y/model")[0] == 0
    for init in ("./runs/pretrain/y/model", f"{project}/runs/pretrain/y/model/"):
        code, _, err = cli(*args, f"model.init_from={init}")
        assert code == 0 and "reusing it" in err, (init, err)


def test_evaluate_and_embed_checkpoints_and_inputs_however_spelled(project, tmp_path, monkeypatch, cli):
    from biomask.config import load_config
    from biomask.evaluation.config import EvaluateConfig
    from biomask.evaluation.reuse import current

    monkeypatch.chdir(project)
    quick = [
        "seeds=[0]",
        "baselines=[]",
        "protocols=[linear_probe]",
        "random_init=false",
        "output=runs/eval/e",
    ]
    args = ["evaluate", "--config", EVALUATE, *quick]
    assert cli(*args, "store=runs/prep/p", "checkpoints={y: runs/pretrain/y/model}")[0] == 0
    spelled = ["store=./runs/prep/p", f"checkpoints={{y: {project}/runs/pretrain/y/model}}"]
    # the torch-free check a pipeline rerun makes, and the stage's own
    assert current(load_config(EvaluateConfig, EVALUATE, [*quick, *spelled])) == Path("runs/eval/e")
    code, _, err = cli(*args, *spelled)
    assert code == 0 and "reusing it" in err, err
    # the same spelling from another folder, naming a copy of the store there: another store
    other = tmp_path / "other"
    shutil.copytree(project / "runs" / "prep" / "p", other / "runs" / "prep" / "p")
    monkeypatch.chdir(other)
    elsewhere = [*spelled[1:], "store=runs/prep/p", f"output={project}/runs/eval/e"]
    code, _, err = cli(*args, *elsewhere)
    assert code == 2 and f"store: 'runs/prep/p' -> '{other}/runs/prep/p'" in err, err
    monkeypatch.chdir(project)

    h5ad = project / "cells.h5ad"
    shutil.copy(Path(os.environ["BIOMASK_DATA_DIR"]) / "pbmc68k_reduced" / "10x_pbmc68k_reduced.h5ad", h5ad)
    args = ["embed", "--config", EMBED, "output=runs/embed/m", "umap.color=null"]
    assert cli(*args, "checkpoint=runs/pretrain/y/model", "input=cells.h5ad")[0] == 0
    code, _, err = cli(*args, "checkpoint=./runs/pretrain/y/model/", f"input={h5ad}")
    assert code == 0 and "reusing it" in err, err
    # a registered dataset's own copy is another file than the user's: refused, naming the key
    code, _, err = cli(*args, "checkpoint=runs/pretrain/y/model", "input=pbmc68k_reduced")
    assert code == 2 and "input: 'cells.h5ad' -> 'pbmc68k_reduced'" in err, err


def test_embed_into_an_h5ad_file_however_its_paths_are_spelled(project, monkeypatch, cli):
    """An .h5ad output holds no config.yaml: its uns[key] records the config and working directory."""
    h5ad = project / "cells-for-file.h5ad"
    shutil.copy(Path(os.environ["BIOMASK_DATA_DIR"]) / "pbmc68k_reduced" / "10x_pbmc68k_reduced.h5ad", h5ad)
    shutil.copytree(project / "runs" / "pretrain" / "y" / "model", project / "runs" / "model-copy")
    embed = ["embed", "--config", EMBED, "umap.color=null"]
    monkeypatch.chdir(project)
    code, _, err = cli(
        *embed, "output=runs/embedded.h5ad", "checkpoint=runs/pretrain/y/model", f"input={h5ad.name}"
    )
    assert code == 0, err
    monkeypatch.chdir(project / "runs")
    code, _, err = cli(*embed, "output=embedded.h5ad", "checkpoint=pretrain/y/model", f"input={h5ad}")
    assert code == 0 and "reusing it" in err, err
    # the same weights in another folder: another checkpoint, refused
    code, _, err = cli(*embed, "output=embedded.h5ad", "checkpoint=model-copy", f"input={h5ad}")
    assert code == 2 and "holds other results" in err and "changed settings: checkpoint:" in err, err


def test_an_embedding_written_before_a_setting_existed_is_refused_with_the_way_to_keep_it(repo):
    """A DNA embedding of before 2026-12-05 recorded no dna.long_records: refused as "other results",
    naming nothing (an upgrade audit's find). The refusal names the setting and the value that keeps it."""
    from biomask.config import load_config
    from biomask.embedding.config import EmbedConfig
    from biomask.embedding.stage import _what_differs
    from biomask.stage import StageOutput

    cfg = load_config(EmbedConfig, repo / EMBED, ["checkpoint=m", "input=x.fa", "output=o.h5ad"])
    earlier = cfg.model_dump(mode="json")
    del earlier["dna"]["long_records"]
    said = _what_differs(earlier, StageOutput("embed", cfg, Path("o.h5ad")))
    assert "dna.long_records: '(absent)' -> " in said and "`dna.long_records=first` reuses it" in said
    assert _what_differs(cfg.model_dump(mode="json"), StageOutput("embed", cfg, Path("o.h5ad"))).startswith(
        " (the same settings"
    )
    assert (
        _what_differs(None, StageOutput("embed", cfg, Path("o.h5ad"))) == ""
    )  # nothing recorded: nothing named
    # another setting changed too: the hint would not reuse it, so it is not given
    earlier["layer"] = -2
    said = _what_differs(earlier, StageOutput("embed", cfg, Path("o.h5ad")))
    assert "layer: -2 -> -1" in said and "reuses it" not in said
    # a result-free key of the stage (here dna.long_records, for a cells embedding) is not a change
    cells = StageOutput(
        "embed", cfg, Path("o.h5ad"), non_semantic=("output", "dna.long_records", "batch_size")
    )
    earlier["layer"] = -1
    assert _what_differs({**earlier, "batch_size": 7}, cells).startswith(" (the same settings")


def test_an_interrupted_run_resumes_with_its_paths_spelled_otherwise(project, monkeypatch, cli):
    """A requeued job's script, or a user at another prompt, gives the same store and output as
    ./runs/..., an absolute path, or from another working directory: the interrupted run resumes
    from its checkpoint instead of being refused as a changed config; another store still is."""
    import signal
    import subprocess

    from tests.test_pretrain import _wait_for, biomask_cmd, subprocess_env

    monkeypatch.chdir(project)
    out = project / "runs" / "pretrain" / "r"
    long = ["train.steps=1200", "train.log_every=5", "train.eval_batches=1", "optim.warmup_steps=1"]
    args = ["pretrain", "--config", str(MLP), "data.store=runs/prep/p", "output=runs/pretrain/r", *long]
    proc = subprocess.Popen(
        biomask_cmd(*args),
        cwd=project,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for(lambda: (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").stat().st_size > 0, proc)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    (ckpt,) = list((out / "checkpoints").glob("step*"))
    step = int(ckpt.name[4:])
    assert step < 1200 and not (out / "run.json").exists()

    # a changed setting still cannot resume it
    code, _, err = cli(
        "pretrain", "--config", MLP, "data.store=./runs/prep/p", f"output={out}", *long, "model.d_model=32"
    )
    assert code == 2 and "interrupted run" in err and "model.d_model" in err, err
    assert ckpt.is_dir()
    # another store (the same cells split otherwise): refused, naming the input and both stores, for
    # the interrupted run and for a finished one (data.store is a path, so no config key changed)
    from biomask.cells.config import CellsPrepConfig
    from biomask.cells.prep import prep_cells
    from biomask.config import load_config

    prep_cells(load_config(CellsPrepConfig, PANEL, ["output=runs/prep/resplit", "split.seed=1"]))
    code, _, err = cli("pretrain", "--config", MLP, "data.store=runs/prep/resplit", f"output={out}", *long)
    assert code == 2 and "interrupted run" in err, err
    assert (
        "the same config keys, other input data:\n  token-store: runs/prep/p -> runs/prep/resplit (" in err
    ), err
    code, _, err = cli(
        "pretrain",
        "--config",
        MLP,
        "data.store=runs/prep/resplit",
        "output=runs/pretrain/y",
        "deepspeed.config=ds.json",
        *TINY,
    )
    assert code == 2 and "finished run" in err and "token-store: " in err and "runs/prep/resplit" in err, err
    # the same files spelled otherwise, from another folder: resumed, to the end
    monkeypatch.chdir(project / "runs")
    code, _, err = cli("pretrain", "--config", MLP, "data.store=./prep/p", f"output={out}/", *long)
    assert code == 0, err[-3000:]
    assert "resumed from" in err, err[-3000:]
    info = json.loads((out / "run.json").read_text())
    assert info["resumed_from_steps"] == [step]
    assert json.loads((out / "model" / "config.json").read_text())["training"]["steps"] == 1200


def test_a_refusal_names_the_input_whose_data_changed():
    """Matched by name and order: a respelled path with the same digest is the same input; a digest
    that moved is named with both paths (or 'changed since' where the path is the same)."""
    from biomask.outputs import describe_input_changes, input_changes

    old = [
        {"name": "token-store", "path": "/p/runs/prep/p", "sha256": "a" * 64},
        {"name": "checkpoint", "path": "/p/c1", "fingerprint": "1" * 16},
        {"name": "checkpoint", "path": "/p/c2", "fingerprint": "2" * 16},
    ]
    new = [
        {"name": "token-store", "path": "runs/prep/p", "sha256": "a" * 64},  # respelled, same data
        {"name": "checkpoint", "path": "/p/c1", "fingerprint": "1" * 16},
        {"name": "checkpoint", "path": "/p/c2", "fingerprint": "3" * 16},  # retrained in place
    ]
    assert input_changes(old, new) == [f"checkpoint: /p/c2, changed since ({'2' * 12} -> {'3' * 12})"]
    moved = [{"name": "token-store", "path": "/p/runs/prep/resplit", "sha256": "b" * 64}]
    assert input_changes(old, moved) == [
        f"token-store: /p/runs/prep/p -> /p/runs/prep/resplit ({'a' * 12} -> {'b' * 12})"
    ]
    # nothing recorded to compare with (an output of older code, or none): no claim made
    assert input_changes(None, new) == [] and describe_input_changes([{"name": "token-store"}], moved) == ""


def test_an_evaluations_checkpoints_are_found_in_its_moved_run_folder_without_a_run_dir(
    tmp_path, monkeypatch
):
    """`mv runs/small runs/moved`, then `biomask report` by hand (no pipeline, no BIOMASK_RUN_DIR):
    the evaluation's recorded checkpoints under the old folder are found at the same place in the
    new one, so the report can still read their masking; a recorded path that exists is kept, and
    one with no twin either is left as recorded."""
    import yaml

    from biomask.relocation import RUN_DIR_ENV, where_now

    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    old, new = tmp_path / "runs" / "small", tmp_path / "runs" / "moved"
    (new / "evaluate").mkdir(parents=True)
    (new / "pretrain" / "r2mae" / "model").mkdir(parents=True)
    (new / "evaluate" / "config.yaml").write_text(yaml.safe_dump({"output": str(old / "evaluate")}))
    recorded = str(old / "pretrain" / "r2mae" / "model")
    assert where_now(new / "evaluate", recorded) == str(new / "pretrain" / "r2mae" / "model")
    elsewhere = tmp_path / "kept" / "model"
    elsewhere.mkdir(parents=True)
    assert where_now(new / "evaluate", str(elsewhere)) == str(elsewhere)  # exists: as recorded
    gone = str(old / "pretrain" / "gone" / "model")
    assert where_now(new / "evaluate", gone) == gone  # no twin: as recorded
