"""Nothing in a run folder runs code, and nothing corrupt is used: pickle payloads in a checkpoint's
RNG, model-state or optimizer file never execute (resume exits 2 naming the file); a changed
`model.safetensors` is refused by embed and evaluate; a corrupt latest training checkpoint is set aside
and the run resumes from the previous one, ending at the same weights; outputs follow the umask; a
diverging run stops (exit 2) before a checkpoint with non-finite weights or a NaN metric is written.

Real DeepSpeed (ZeRO-2, CPU) on the C. elegans chrX store, a few steps per run."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from biomask.errors import InputError
from biomask.provenance import sha256_file
from biomask.training import checkpoint, rundir
from tests.test_pretrain import CONFIG, overrides

REPO = Path(__file__).resolve().parent.parent
UMASK = 0o027  # the run fixture's umask: files must come out 0640, not safetensors' private 0600
RUN = {"train.steps": 12, "train.checkpoint_every": 4, "train.keep_last": 3, "deepspeed.stage": 2}
MODEL_STATES = "mp_rank_00_model_states.pt"
OPTIM_STATES = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Payload:
    """Unpickling this creates `marker`: proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def finished(genome_store, tmp_path_factory) -> Path:
    """A finished 12-step ZeRO-2 run with checkpoints at steps 4, 8 and 12, written under umask 027."""
    from biomask.config import load_config
    from biomask.training.config import PretrainConfig
    from biomask.training.trainer import pretrain

    out = tmp_path_factory.mktemp("security") / "run"
    before = os.umask(UMASK)
    try:
        pretrain(load_config(PretrainConfig, CONFIG, overrides(genome_store, out, **RUN)))
    finally:
        os.umask(before)
    return out


def interrupted(finished: Path, where: Path) -> Path:
    """A copy of the run as if killed after its last checkpoint: no model/, no run.json, in progress."""
    out = shutil.copytree(finished, where)
    info = json.loads((out / "run.json").read_text())
    (out / "run.json").unlink()
    shutil.rmtree(out / "model")
    rundir.mark_in_progress(out, info["fingerprint"], info["world_size"])
    return out


def reseal(ckpt: Path) -> None:
    """Record the files' current sizes and sha256 in meta.json, as a careful forger would."""
    meta = json.loads((ckpt / "meta.json").read_text())
    names = [p.name for p in ckpt.iterdir() if p.is_file() and p.name != "meta.json"]
    meta["files"] = {n: (ckpt / n).stat().st_size for n in names}
    meta["sha256"] = {n: sha256_file(ckpt / n) for n in names}
    (ckpt / "meta.json").write_text(json.dumps(meta))


def flip(path: Path, n: int, offset: int | None = None) -> None:
    """Flip `n` bytes in the middle of a file (same size, different content)."""
    data = bytearray(path.read_bytes())
    start = len(data) // 2 if offset is None else offset
    for i in range(start, start + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def load_state(path: Path) -> dict:
    """A DeepSpeed file of our own run, read (weights only) to be re-written with a payload."""
    with torch.serialization.safe_globals(checkpoint.allowed_globals()):
        return torch.load(path, weights_only=True, map_location="cpu")


def resume(cli, genome_store, out: Path) -> tuple[int, str]:
    code, _, err = cli("pretrain", "-c", CONFIG, *overrides(genome_store, out, **RUN))
    return code, err


def test_no_pickle_load_in_biomask():
    offenders = [
        f"{path}:{i}"
        for path in (REPO / "biomask").rglob("*.py")
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if "weights_only=False" in line or "pickle.load" in line or "allow_pickle=True" in line
    ]
    assert offenders == []


@pytest.mark.parametrize("name", ["rng-rank0.safetensors", MODEL_STATES, OPTIM_STATES])
def test_a_pickle_payload_in_a_checkpoint_never_runs(name, finished, genome_store, tmp_path, cli):
    out = interrupted(finished, tmp_path / "run")
    ckpt = out / "checkpoints" / "step00000012"
    marker = tmp_path / "payload-ran"
    target = ckpt / name
    if name.endswith(".pt"):  # the real state with one more entry, as an attacker would keep it loadable
        state = load_state(target)
        state["extra"] = Payload(marker)
        torch.save(state, target)
    else:
        torch.save({"torch": Payload(marker)}, target)
    # an RNG file in the old pickle format, listed in meta.json, is never opened either
    torch.save({"python": Payload(marker)}, ckpt / "rng-rank0.pt")
    reseal(ckpt)  # the checksums match: only the loader stands between the payload and the user

    code, err = resume(cli, genome_store, out)
    assert code == 2, err
    assert not marker.exists()
    assert str(target) in err and "Traceback" not in err
    assert not (out / "run.json").exists() and not (out / "model").exists()


def test_zero_to_fp32_consolidation_loads_weights_only(finished, tmp_path):
    from biomask.training.checkpoint import consolidated_state_dict

    ckpt = shutil.copytree(finished / "checkpoints" / "step00000012", tmp_path / "ckpts" / "step00000012")
    state = consolidated_state_dict(None, ckpt, 2)
    assert state.keys() == load_file(finished / "model" / "model.safetensors").keys()
    marker = tmp_path / "payload-ran"
    optim = load_state(ckpt / OPTIM_STATES)
    optim["extra"] = Payload(marker)
    torch.save(optim, ckpt / OPTIM_STATES)
    with pytest.raises(checkpoint.CheckpointError, match="refusing to load"):
        consolidated_state_dict(None, ckpt, 2)
    assert not marker.exists()


def test_changed_portable_weights_are_refused_by_embed_and_evaluate(finished, splice_store, tmp_path, cli):
    model = shutil.copytree(finished / "model", tmp_path / "model")
    weights = model / "model.safetensors"
    flip(weights, 16)
    (tmp_path / "two.fa").write_text(">a\nACGTACGTACGTACGTACGTAAAACCCGGT\n>b\nTTTTGGGGCCCCAAAA\n")
    code, _, err = cli(
        "embed", "--checkpoint", model, "--input", tmp_path / "two.fa", "--output", tmp_path / "e.h5ad"
    )
    assert code == 2 and str(weights) in err and "sha256" in err, err
    assert not (tmp_path / "e.h5ad").exists()

    args = ["evaluate", "-c", REPO / "configs/evaluate/splice.yaml", f"store={splice_store}"]
    args += [f"output={tmp_path / 'eval'}", f"checkpoints.tiny={model}", "seeds=[0]"]
    code, _, err = cli(*args)
    assert code == 2 and str(weights) in err and "sha256" in err, err
    assert not (tmp_path / "eval").exists()


def test_every_tokenizer_file_is_checked_against_its_recorded_hash(finished, tmp_path, cli):
    """Not only tokenizer.json: a changed file beside it (cells: genes.tsv, the panel's gene order)
    would re-map the input silently, so each one's sha256 is recorded and checked on load."""
    model = shutil.copytree(finished / "model", tmp_path / "model")
    recorded = json.loads((model / "config.json").read_text())["tokenizer"]["files"]
    assert "tokenizer.json" in recorded and len(recorded) == sum(1 for _ in (model / "tokenizer").iterdir())
    other = next(name for name in recorded if name != "tokenizer.json")
    (model / "tokenizer" / other).write_text((model / "tokenizer" / other).read_text() + " ")
    (tmp_path / "one.fa").write_text(">a\nACGTACGTACGTACGTACGTAAAACCCGGT\n")
    code, _, err = cli(
        "embed", "--checkpoint", model, "--input", tmp_path / "one.fa", "--output", tmp_path / "e.h5ad"
    )
    assert code == 2 and str(model / "tokenizer" / other) in err and "sha256" in err, err
    assert not (tmp_path / "e.h5ad").exists()
    (model / "tokenizer" / other).unlink()  # deleted, not changed: said so
    code, _, err = cli(
        "embed", "--checkpoint", model, "--input", tmp_path / "one.fa", "--output", tmp_path / "e.h5ad"
    )
    assert code == 2 and f"{model / 'tokenizer' / other} is missing" in err and "does not match" not in err, (
        err
    )


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(finished, genome_store, tmp_path, cli):
    out = interrupted(finished, tmp_path / "run")
    ckpts = out / "checkpoints"
    flip(ckpts / "step00000012" / MODEL_STATES, 64)  # same size: only the sha256 tells

    code, err = resume(cli, genome_store, out)
    assert code == 0, err
    assert "fails verification" in err and "falling back" in err and "step00000008" in err
    assert "resumed from" in err and "step 8 of 12" in err
    assert (ckpts / "corrupt-step00000012").is_dir()  # kept as evidence, out of the way
    a = load_file(finished / "model" / "model.safetensors")
    b = load_file(out / "model" / "model.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), name  # the same run, resumed exactly from step 8

    # every checkpoint corrupt: refused, nothing moved, nothing trained
    out = interrupted(finished, tmp_path / "all-bad")
    for ckpt in (out / "checkpoints").glob("step*"):
        flip(ckpt / OPTIM_STATES, 4096, offset=1024)
    code, err = resume(cli, genome_store, out)
    assert code == 2 and "no checkpoint" in err and "--overwrite" in err and OPTIM_STATES in err, err
    assert sorted(p.name for p in (out / "checkpoints").glob("*step*")) == [
        "step00000004",
        "step00000008",
        "step00000012",
    ]


def test_outputs_follow_the_umask(finished):
    expected = 0o666 & ~UMASK
    for path in [
        finished / "model" / "model.safetensors",
        finished / "model" / "config.json",
        finished / "checkpoints" / "step00000012" / "rng-rank0.safetensors",
        finished / "checkpoints" / "step00000012" / "meta.json",
        finished / "checkpoints" / "step00000012" / MODEL_STATES,
    ]:
        assert path.stat().st_mode & 0o777 == expected, (path, oct(path.stat().st_mode))


def strict_json(line: str) -> dict:
    def refuse(constant: str):
        raise ValueError(f"{constant} in metrics.jsonl")

    return json.loads(line, parse_constant=refuse)


def test_a_diverging_run_stops_before_a_nan_checkpoint(genome_store, tmp_path, cli):
    out = tmp_path / "run"
    extra = {
        "optim.lr": 1e30,
        "optim.grad_clip": 0,
        "train.steps": 12,
        "train.log_every": 1,
        "train.checkpoint_every": 1,
        "train.eval_every": 1,
    }
    code, _, err = cli("pretrain", "-c", CONFIG, *overrides(genome_store, out, **extra))
    assert code == 2, err
    assert "not finite at step" in err and "optim.lr" in err and "optim.grad_clip" in err
    assert "Traceback" not in err
    assert not (out / "model").exists() and not (out / "run.json").exists()
    records = [strict_json(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in records if r["kind"] == "train")
    for ckpt in (out / "checkpoints").glob("step*"):  # whatever was saved holds finite weights only
        state = load_state(ckpt / MODEL_STATES)
        assert all(torch.isfinite(v).all() for v in state["module"].values()), ckpt
    # logged every 50 steps, the run still stops at the step that diverged: ZeRO skipped 49 steps
    # on overflows before the window was read, and the message named step 50
    sparse = {
        **extra,
        "train.steps": 60,
        "train.log_every": 50,
        "train.checkpoint_every": 50,
        "train.eval_every": 0,
    }
    code, _, err = cli("pretrain", "-c", CONFIG, *overrides(genome_store, tmp_path / "sparse", **sparse))
    stopped_at = int(err.split("not finite at step ")[1].split()[0])
    assert code == 2 and stopped_at <= 2 and "Skipping step" not in err, err

    # an infinite learning rate is a config error: exit 2, nothing written
    code, _, err = cli("pretrain", "-c", CONFIG, *overrides(genome_store, tmp_path / "inf"), "optim.lr=.inf")
    assert code == 2 and "optim.lr" in err and not (tmp_path / "inf").exists()


def test_a_diverging_replacement_gives_back_the_run_it_was_to_replace(finished, genome_store, tmp_path, cli):
    """--overwrite cleared the finished run first: a replacement that diverged at step 2 left neither
    run, while the message said the earlier checkpoints were kept."""
    from biomask.provenance import sha256_file

    good = shutil.copytree(finished, tmp_path / "good")
    before = {p.relative_to(good): sha256_file(p) for p in good.rglob("*") if p.is_file()}
    bad = {"optim.lr": 1e30, "optim.grad_clip": 0, "train.steps": 12, "train.log_every": 1,
           "train.checkpoint_every": 12, "train.eval_every": 0}  # fmt: skip
    code, _, err = cli("pretrain", "-c", CONFIG, *overrides(genome_store, good, **bad), "--overwrite")
    assert code == 2 and "not finite at step" in err and "back in" in err, err
    assert {p.relative_to(good): sha256_file(p) for p in good.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["good"]  # nothing left beside it
    # a replacement that finishes takes its place, keeping nothing of the old one
    code, _, err = cli(
        "pretrain", "-c", CONFIG, *overrides(genome_store, good, **{"train.steps": 4}), "--overwrite"
    )
    assert code == 0, err
    assert json.loads((good / "run.json").read_text())["final_eval"] and not (good / ".replaced-run").exists()
    assert json.loads((good / "model" / "config.json").read_text())["training"]["steps"] == 4


def test_an_edited_result_is_neither_reused_nor_reported(finished, splice_store, tmp_path, cli):
    """run.json listed an output's file names only: metrics.json edited to MCC 0.999 was "reused as
    it is" and printed in the report."""
    from biomask.outputs import OUTPUT_DIGESTS_KEY
    from biomask.report.collect import load_evaluation

    out = tmp_path / "eval"
    args = ["evaluate", "-c", REPO / "configs/evaluate/splice.yaml", f"store={splice_store}", f"output={out}",
            f"checkpoints.tiny={finished / 'model'}", "seeds=[0]", "protocols=[linear_probe]",
            "baselines=[onehot_lr]", "random_init=false"]  # fmt: skip
    code, _, err = cli(*args)
    assert code == 0, err
    assert "metrics.json" in json.loads((out / "run.json").read_text())[OUTPUT_DIGESTS_KEY]
    results = json.loads((out / "metrics.json").read_text())
    for summary in results["summary"].values():
        summary["mcc"]["mean"] = 0.999
    (out / "metrics.json").write_text(json.dumps(results))
    with pytest.raises(InputError, match="metrics.json changed since biomask evaluate wrote it"):
        load_evaluation("splice", str(out), "mcc", None)
    code, _, err = cli(*args)
    assert (
        code == 2
        and "metrics.json changed or went missing since biomask wrote it" in err
        and "--overwrite" in err
    ), err
    code, _, err = cli(*args, "--overwrite")  # computed again: the figures are biomask's once more
    assert code == 0, err
    assert all(
        s["mcc"]["mean"] != 0.999 for s in json.loads((out / "metrics.json").read_text())["summary"].values()
    )
    load_evaluation("splice", str(out), "mcc", None)


def test_a_changed_store_is_refused_by_evaluate_embed_and_prep(finished, splice_store, tmp_path, cli):
    """A store's shards and tokenizer files are checked against its manifest wherever they are read,
    not only by pretrain and `store verify`: a flipped label would change a result silently, a
    changed tokenizer.json re-map every token, a changed genes.tsv a cell's panel."""
    labels = shutil.copytree(splice_store, tmp_path / "labels")
    shard = labels / "train" / "shard-00000.labels.npy"
    flip(shard, 1, offset=shard.stat().st_size - 1)
    args = ["evaluate", "-c", REPO / "configs/evaluate/splice.yaml", f"store={labels}", "seeds=[0]"]
    code, _, err = cli(*args, f"output={tmp_path / 'eval'}", f"checkpoints.tiny={finished / 'model'}")
    assert code == 2 and str(shard) in err and "sha256" in err, err
    assert not (tmp_path / "eval").exists()
    code, _, err = cli(
        "embed", "--checkpoint", finished / "model", "--input", labels, "--output", tmp_path / "e.h5ad"
    )
    assert code == 2 and str(shard) in err and "sha256" in err, err
    assert not (tmp_path / "e.h5ad").exists()

    # the tokenizer: A and N swapped keeps a valid file and the same size
    store = shutil.copytree(splice_store, tmp_path / "tok")
    tokenizer = store / "tokenizer" / "tokenizer.json"
    text = tokenizer.read_text()
    assert '"A": 5' in text and '"N": 9' in text
    tokenizer.write_text(
        text.replace('"A": 5', '"A": X').replace('"N": 9', '"N": 5').replace('"A": X', '"A": 9')
    )
    code, _, err = cli("store", "verify", store)
    assert code == 2 and str(tokenizer) in err, err
    # every damaged file of a store is named at once (a digest and a size), so one repair is enough
    both = shutil.copytree(splice_store, tmp_path / "both")
    flipped = both / "train" / "shard-00000.labels.npy"
    flip(flipped, 1, offset=flipped.stat().st_size - 1)
    longer = next((both / "test").glob("shard-00000.*.npy"))
    longer.write_bytes(longer.read_bytes() + b"\0")
    code, _, err = cli("store", "verify", both)
    assert code == 2 and str(flipped) in err and "sha256" in err and str(longer) in err and "bytes" in err, (
        err
    )
    # several stores: each is checked and named, the damaged one does not hide the next
    code, out, err = cli("store", "verify", store, splice_store)
    assert code == 2 and str(tokenizer) in err and f"{splice_store}: " in out and "1 of 2 stores" in err
    prep = ["prep", "dna", "-c", REPO / "configs/dna/splice.yaml", f"tokenizer.path={store}"]
    code, _, err = cli(*prep, f"output={tmp_path / 'again'}")
    assert code == 2 and str(tokenizer) in err and "sha256" in err, err
    assert not (tmp_path / "again").exists()


def test_tokenizer_path_of_the_other_modality_says_so(splice_store, pbmc_store, tmp_path, cli):
    code, _, err = cli(
        "prep", "cells", "-c", REPO / "configs/cells/pbmc68k_reduced.yaml", f"tokenizer.path={splice_store}",
        f"output={tmp_path / 'cells'}",
    )  # fmt: skip
    assert code == 2 and "holds a dna tokenizer, not a gene vocabulary" in err, err
    code, _, err = cli(
        "prep", "dna", "-c", REPO / "configs/dna/splice.yaml", f"tokenizer.path={pbmc_store}",
        f"output={tmp_path / 'dna'}",
    )  # fmt: skip
    assert code == 2 and "holds a cells tokenizer" in err and "not a DNA one" in err, err
    # a cells store's genes.tsv (the panel's gene order and medians) is checked like tokenizer.json
    store = shutil.copytree(pbmc_store, tmp_path / "genes")
    genes = store / "tokenizer" / "genes.tsv"
    genes.write_text(genes.read_text() + "\n")
    code, _, err = cli(
        "prep", "cells", "-c", REPO / "configs/cells/pbmc68k_reduced.yaml", f"tokenizer.path={store}",
        f"output={tmp_path / 'cells2'}",
    )  # fmt: skip
    assert code == 2 and str(genes) in err, err
    assert not (tmp_path / "cells").exists() and not (tmp_path / "dna").exists()
    assert not (tmp_path / "cells2").exists()


def test_a_checkpoint_whose_meta_json_names_another_step_is_not_resumed_from(
    finished, genome_store, tmp_path, cli
):
    """meta.json is the one file no digest covers: its step 12 -> 600 made a resume "finish" at step
    600 with step 12's weights, and 12 -> 3 trained nine steps more than the run has."""
    for wrong in (600, 3):
        out = interrupted(finished, tmp_path / str(wrong))
        meta = out / "checkpoints" / "step00000012" / "meta.json"
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "step": wrong}))
        code, err = resume(cli, genome_store, out)
        assert code == 0 and f"meta.json says step {wrong}, its folder step00000012" in err, err
        assert "step 8 of 12" in err  # fell back to the previous checkpoint, as for any corrupt one


def test_a_resume_with_another_thread_count_says_it_will_not_be_exact(
    finished, genome_store, tmp_path, cli, monkeypatch
):
    out = interrupted(finished, tmp_path / "run")  # in_progress.json records this process's threads
    started = json.loads((out / "in_progress.json").read_text())["torch_threads"]
    monkeypatch.setattr(rundir, "_threads", lambda: started + 1)
    code, err = resume(cli, genome_store, out)
    assert code == 0 and f"resumes with {started + 1} CPU threads where it started with {started}" in err, err


def test_pruning_keeps_a_checkpoint_holding_files_of_the_users(finished, genome_store, tmp_path, cli):
    out = interrupted(finished, tmp_path / "run")
    notes = out / "checkpoints" / "step00000004" / "my-notes.txt"
    notes.write_text("mine")
    code, _, err = cli(
        "pretrain", "-c", CONFIG, *overrides(genome_store, out, **{**RUN, "train.keep_last": 1})
    )
    assert code == 0, err
    assert notes.read_text() == "mine" and "kept" in err and "my-notes.txt" in err
    assert not (out / "checkpoints" / "step00000008").exists()  # pruned as keep_last says
    # the finished run does not list the note as its own, so --overwrite still refuses to delete it
    info = json.loads((out / "run.json").read_text())
    assert "checkpoints/step00000004/my-notes.txt" not in info["file_tree"]
    assert "in_progress.json" not in info["output_sha256"]  # removed as the run finishes: never checked
    code, _, err = cli(
        "pretrain", "-c", CONFIG, *overrides(genome_store, out, **{**RUN, "train.steps": 4}), "--overwrite"
    )
    assert code == 2 and "checkpoints/step00000004/my-notes.txt" in err and notes.read_text() == "mine", err


def test_a_finished_run_with_an_edited_log_is_stale_not_reused(finished, genome_store, tmp_path, cli):
    """A report refused the edited metrics.jsonl while pretrain reused the run: nothing mended it."""
    out = shutil.copytree(finished, tmp_path / "run")
    metrics = out / "metrics.jsonl"
    metrics.write_text(metrics.read_text().replace('"kind": "train"', '"kind":  "train"', 1))
    code, err = resume(cli, genome_store, out)
    assert code == 2 and "metrics.jsonl changed or went missing since biomask wrote it" in err, err
    assert "--overwrite" in err


def test_an_unfinished_replacement_gives_the_finished_run_of_this_config_back(
    finished, genome_store, tmp_path, cli
):
    """A replacement stopped before it finished keeps the run it replaces in .replaced-run/; the
    command that wrote that run, with --overwrite, trained it again from scratch."""
    from biomask.training.rundir import REPLACED

    out = shutil.copytree(finished, tmp_path / "run")
    before = {p.relative_to(out): sha256_file(p) for p in out.rglob("*") if p.is_file()}
    rundir.start_fresh(out, "another config", 1, "train: {steps: 300}\n")  # as --overwrite starts one
    assert (out / REPLACED / "run.json").is_file() and (out / "in_progress.json").is_file()
    (out / REPLACED / "notes.txt").write_text("mine")
    assert f"{REPLACED}/notes.txt" in rundir.foreign(out, None)  # the user's files in it are theirs
    (out / REPLACED / "notes.txt").unlink()
    code, err = resume(cli, genome_store, out)
    assert code == 2 and "put the finished one back" in err and str(out / REPLACED) in err, err
    code, _, err = cli("pretrain", "-c", CONFIG, *overrides(genome_store, out, **RUN), "--overwrite")
    assert code == 0 and "up to date" in err, err
    assert {p.relative_to(out): sha256_file(p) for p in out.rglob("*") if p.is_file()} == before


def test_a_write_protected_run_is_not_replaced_and_a_refused_swap_is_undone(finished, tmp_path, monkeypatch):
    """--overwrite of a run the user cannot write (chmod -R a-w; a colleague's under umask 022) set it
    aside, then the move into the new folder was refused: the finished run stayed hidden beside an
    empty one, and every later command failed. Now it is refused first, naming the folder, and a swap
    the file system refuses half-way is undone."""
    import errno

    from biomask.errors import EnvironmentIOError

    out = shutil.copytree(finished, tmp_path / "run")
    before = {p.relative_to(out): sha256_file(p) for p in out.rglob("*") if p.is_file()}
    real_access = os.access
    # not writable, though it may be entered: a check of X_OK alone would pass it
    monkeypatch.setattr(
        rundir.os, "access", lambda p, mode: not (Path(p) == out and mode & os.W_OK) and real_access(p, mode)
    )
    with pytest.raises(
        EnvironmentIOError, match=r"run.* is not writable.*chmod -R u\+w.*Nothing was changed"
    ):
        rundir.start_fresh(out, "another config", 1, "train: {steps: 300}\n")
    monkeypatch.setattr(rundir.os, "access", real_access)
    real_rename = Path.rename

    def refused(self, target):
        if Path(target).name == rundir.REPLACED:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", refused)
    with pytest.raises(
        EnvironmentIOError, match="cannot replace the run in .*Permission denied.*left as it was"
    ):
        rundir.start_fresh(out, "another config", 1, "train: {steps: 300}\n")
    assert {p.relative_to(out): sha256_file(p) for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing set aside


def test_a_run_a_kill_left_set_aside_mid_swap_is_put_back(finished, genome_store, tmp_path, cli):
    """start_fresh (--overwrite) and the put-back of a replaced run each make two or three renames in
    a row; a kill between them left the finished run under a hidden sibling name nothing looked at."""
    from biomask.training.rundir import REPLACED

    def digests(root):
        return {p.relative_to(root): sha256_file(p) for p in root.rglob("*") if p.is_file()}

    before = digests(finished)
    cuts = {
        "start_fresh, after its first rename": lambda out: out.rename(out.parent / ".run.old-0123abcd"),
        "start_fresh, after its mkdir": lambda out: (
            out.rename(out.parent / ".run.old-0123abcd"),
            out.mkdir(),
        ),
        "start_fresh, before the kept run moved in": lambda out: (
            out.rename(out.parent / ".run.old-0123abcd"),
            out.mkdir(),
            (out / "config.yaml").write_text("train: {steps: 300}\n"),
            rundir.mark_in_progress(out, "another config", 1),
        ),
        "the put-back, after its first rename": lambda out: (
            rundir.start_fresh(out, "another config", 1, "train: {steps: 300}\n"),
            (out / REPLACED).rename(out.parent / ".run.old-89abcdef"),
        ),
        "the put-back, after its second rename": lambda out: (
            rundir.start_fresh(out, "another config", 1, "train: {steps: 300}\n"),
            (out / REPLACED).rename(out.parent / ".run.old-89abcdef"),
            out.rename(out.parent / ".run.failed-01234567"),
        ),
    }
    for name, cut in cuts.items():
        where = tmp_path / name.replace(" ", "-").replace(",", "")
        out = shutil.copytree(finished, where / "run")
        cut(out)
        code, err = resume(cli, genome_store, out)
        if REPLACED in str(err):  # an unfinished replacement is back as it was: --overwrite puts the run back
            assert code == 2 and "put the finished one back" in err, (name, err)
            code, _, err = cli("pretrain", "-c", CONFIG, *overrides(genome_store, out, **RUN), "--overwrite")
        assert code == 0 and "up to date" in err, (name, err)
        assert digests(out) == before, name
        assert [p.name for p in where.iterdir() if p.name != ".run.lock"] == ["run"], (
            name,
            list(where.iterdir()),
        )
    # an unfinished run set aside is its checkpoints: moved back and resumed, never removed
    out = interrupted(finished, tmp_path / "unfinished" / "run")
    out.rename(out.parent / ".run.old-0123abcd")
    code, err = resume(cli, genome_store, out)
    assert code == 0 and "is back at" in err and (out / "run.json").is_file(), err
    assert [p.name for p in out.parent.iterdir() if p.name != ".run.lock"] == ["run"]
    # start_fresh cut after the kept run went in: the unfinished run it was discarding goes, said
    out = shutil.copytree(finished, tmp_path / "late" / "run")
    aside = out.parent / ".run.old-0badcafe"
    (aside / "checkpoints").mkdir(parents=True)
    (aside / "in_progress.json").write_text("{}")
    rundir.start_fresh(out, "another config", 1, "train: {steps: 300}\n")
    rundir.recover_swap(out)
    assert not aside.exists() and (out / ".replaced-run" / "run.json").is_file()
    # two runs set aside (a swap left one, a later swap another): neither is guessed at, both stay
    first, second = out.parent / ".run.old-00000001", out.parent / ".run.old-ffffffff"
    shutil.copytree(finished, first)
    shutil.copytree(finished, second)
    rundir.recover_swap(out)
    assert first.is_dir() and second.is_dir() and (out / ".replaced-run" / "run.json").is_file()


def test_resealed_but_corrupt_checkpoint_state_is_a_message_not_a_traceback(
    finished, genome_store, tmp_path, cli
):
    """Files altered and meta.json's digests rewritten to match: a truncated DeepSpeed file, bytes
    that are no torch file, an RNG state of the wrong shape. Each is named, exit 2."""
    cases = {
        "truncated": lambda ckpt: (ckpt / MODEL_STATES).write_bytes(
            (ckpt / MODEL_STATES).read_bytes()[:1000]
        ),
        "garbage": lambda ckpt: (ckpt / MODEL_STATES).write_bytes(random.Random(0).randbytes(5000)),
        "masker": lambda ckpt: (ckpt / "rng-rank0.json").write_text(
            json.dumps({**json.loads((ckpt / "rng-rank0.json").read_text()), "masker": {"x": 1}})
        ),
    }
    for name, damage in cases.items():
        out = interrupted(finished, tmp_path / name)
        for ckpt in (out / "checkpoints").glob("step*"):  # every one: no good checkpoint to fall back to
            damage(ckpt)
            reseal(ckpt)
        code, err = resume(cli, genome_store, out)
        assert code == 2 and "Traceback" not in err and "corrupt" in err, (name, err)
        assert "weights_only" not in err and "could run code" not in err, (name, err)  # not a payload


def test_a_symlink_in_a_checkpoint_is_not_read(finished, genome_store, tmp_path, cli):
    out = interrupted(finished, tmp_path / "run")
    latest = out / "checkpoints" / "step00000012"
    (tmp_path / "elsewhere.json").write_text((latest / "rng-rank0.json").read_text())
    (latest / "rng-rank0.json").unlink()
    (latest / "rng-rank0.json").symlink_to(tmp_path / "elsewhere.json")
    reseal(latest)
    assert "symbolic link" in checkpoint.verify(latest)
    code, err = resume(cli, genome_store, out)
    assert code == 0 and "falling back" in err and "step 8 of 12" in err, err


def test_overwrite_of_an_unfinished_run_never_deletes_files_added_inside_it(
    finished, genome_store, tmp_path, cli
):
    out = interrupted(finished, tmp_path / "run")
    (out / "checkpoints" / "notes.txt").write_text("mine")
    (out / "checkpoints" / "step00000008" / "plot.png").write_text("mine")
    code, _, err = cli("pretrain", "-c", CONFIG, *overrides(genome_store, out, **RUN), "--overwrite")
    assert code == 2 and "checkpoints/notes.txt" in err and "checkpoints/step00000008/plot.png" in err, err
    assert (out / "checkpoints" / "notes.txt").read_text() == "mine"
    (out / "checkpoints" / "notes.txt").unlink()
    (out / "checkpoints" / "step00000008" / "plot.png").unlink()
    assert rundir.foreign(out, None) == []  # what the run itself wrote is all its own


def test_a_checkpoint_config_naming_files_outside_or_a_huge_model_is_refused_before_use(
    finished, tmp_path, cli
):
    from biomask.models.pretrained import CONFIG_SHA256, config_digest

    (tmp_path / "one.fa").write_text(">a\nACGTACGTACGTACGTACGTAAAACCCGGT\n")

    def edited(name, change):
        model = shutil.copytree(finished / "model", tmp_path / name)
        config = json.loads((model / "config.json").read_text())
        change(config)
        config[CONFIG_SHA256] = config_digest(config)  # resealed: only the checks after it stand
        (model / "config.json").write_text(json.dumps(config))
        return cli(
            "embed",
            "--checkpoint",
            model,
            "--input",
            tmp_path / "one.fa",
            "--output",
            tmp_path / f"{name}.h5ad",
        )

    code, _, err = edited("outside", lambda c: c["tokenizer"]["files"].update({"../../secret": "00"}))
    assert code == 2 and "not a file of tokenizer/" in err, err
    code, _, err = edited("huge", lambda c: c["architecture"].update(d_model=65536, d_ff=262144))
    assert code == 2 and "does not fit the architecture" in err and "65536" in err, err
    # values of the wrong kind are named, never a ZeroDivisionError or AttributeError deep inside
    for name, change, said in (
        ("heads", lambda c: c["architecture"].update(n_heads=0), "n_heads 0"),
        ("eps", lambda c: c["architecture"].update(norm_eps=-1), "norm_eps -1"),  # NaN embeddings, exit 0
        ("quoted", lambda c: c["architecture"].update(d_model="64"), "d_model: a string where"),
        ("kind", lambda c: c["architecture"].update(scheme=["panel"]), "scheme: Input should be a valid string"),
        ("tokenizer", lambda c: c.update(tokenizer=["tokenizer.json"]), "tokenizer record is not as biomask writes"),
        ("modality", lambda c: c["architecture"].update(modality="cells"), "modality 'cells' in the architecture, 'dna' beside it"),
    ):  # fmt: skip
        code, _, err = edited(name, change)
        assert code == 2 and said in err and "Traceback" not in err, (name, err)
    from biomask.models import load_pretrained

    edited("both", lambda c: c["architecture"].update(modality="cells") or c.update(modality="cells"))
    with pytest.raises(InputError, match="a cells model with cell scheme None"):
        load_pretrained(tmp_path / "both")
    # weights relabelled as another dtype (their digest resealed): load_state_dict would cast them
    from safetensors.torch import load_file as read_weights
    from safetensors.torch import save_file

    from biomask.provenance import sha256_file

    relabelled = shutil.copytree(finished / "model", tmp_path / "dtype")
    weights = read_weights(relabelled / "model.safetensors")
    save_file({k: v.view(torch.int32) for k, v in weights.items()}, relabelled / "model.safetensors")
    config = json.loads((relabelled / "config.json").read_text())
    config["weights_sha256"] = sha256_file(relabelled / "model.safetensors")
    config[CONFIG_SHA256] = config_digest(config)
    (relabelled / "config.json").write_text(json.dumps(config))
    code, _, err = cli("embed", "--checkpoint", relabelled, "--input", tmp_path / "one.fa",
                       "--output", tmp_path / "dtype.h5ad")  # fmt: skip
    assert code == 2 and "stored as torch.int32, not the model's torch.float32" in err, err
    assert not (tmp_path / "dtype.h5ad").exists()
    model = shutil.copytree(finished / "model", tmp_path / "shape")
    (model / "config.json").write_text("[1, 2]")
    code, _, err = cli(
        "embed", "--checkpoint", model, "--input", tmp_path / "one.fa", "--output", tmp_path / "s.h5ad"
    )
    assert code == 2 and "a JSON object is expected" in err, err


def test_a_weights_file_leaving_out_the_tensors_of_a_huge_config_is_refused_before_allocation(
    finished, tmp_path, monkeypatch
):
    """The shape check compared only the tensors the file holds: a file with none, its config
    resealed to a width of 16,384, had the loader allocate the model (22 GB) before refusing it."""
    from safetensors.torch import save_file

    from biomask.models import pretrained
    from biomask.models.pretrained import CONFIG_SHA256, config_digest

    model = shutil.copytree(finished / "model", tmp_path / "empty")
    save_file({}, model / "model.safetensors", metadata={"format": "biomask-pretrained"})
    config = json.loads((model / "config.json").read_text())
    config["architecture"].update(d_model=16384, d_ff=65536, n_heads=16)
    config["weights_sha256"] = sha256_file(model / "model.safetensors")
    config[CONFIG_SHA256] = config_digest(config)
    (model / "config.json").write_text(json.dumps(config))
    built_on = []
    build = pretrained.build_model

    def spy(architecture):
        built_on.append(torch.empty(0).device.type)  # meta inside the shape check
        return build(architecture)

    monkeypatch.setattr(pretrained, "build_model", spy)
    with pytest.raises(InputError, match="does not fit its config.json \\(missing \\['embedder"):
        pretrained.load_pretrained(model)
    assert built_on == ["meta"]


def resealed(store: Path, manifest: str) -> None:
    """A store manifest edited and its digest in the store's run.json recomputed: what an edit that
    also rewrites the record looks like (an edit alone is refused as changed, before these checks)."""
    (store / "manifest.json").write_text(manifest)
    info = json.loads((store / "run.json").read_text())
    info["output_sha256"]["manifest.json"] = sha256_file(store / "manifest.json")
    (store / "run.json").write_text(json.dumps(info))


def test_a_store_manifest_naming_a_folder_outside_the_store_is_refused(splice_store, tmp_path, cli):
    """A manifest is data: a tokenizer dir or shard name that is a path elsewhere would make a reader
    (and pretrain, which copies the tokenizer into its checkpoint) read outside the store."""
    for key, edit in {
        "tokenizer": lambda m: m["tokenizer"].update(dir=str(tmp_path)),
        "shard": lambda m: next(iter(m["splits"].values()))["shards"][0]["files"]["offsets"].update(
            name="../../x.npy"
        ),
    }.items():
        store = shutil.copytree(splice_store, tmp_path / key)
        manifest = json.loads((store / "manifest.json").read_text())
        edit(manifest)
        resealed(store, json.dumps(manifest))
        code, _, err = cli("store", "verify", store)
        assert code == 2 and "not a plain name inside the store" in err, (key, err)
    # an edit the record does not vouch for: swapped label names mislabelled every per-class result
    store = shutil.copytree(splice_store, tmp_path / "labels")
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["label_names"] = manifest["label_names"][::-1]
    (store / "manifest.json").write_text(json.dumps(manifest))
    for args in (["store", "verify", store], ["store", "info", store]):
        code, _, err = cli(*args)
        assert code == 2 and f"{store / 'manifest.json'} changed since the prep stage wrote it" in err, err
    (store / "run.json").unlink()  # a store written before, or by a library call: nothing to check against
    assert cli("store", "verify", store)[0] == 0


def test_a_resealed_store_whose_records_do_not_fit_is_refused_naming_the_shard(splice_store, tmp_path, cli):
    """Digests recomputed after an edit vouch for nothing: token ids beyond the vocabulary and labels
    beyond the label names were IndexErrors inside a model, offsets out of order records silently
    cut short; `store verify` (and evaluate and embed, which run it) said every file matched."""
    import numpy as np

    def edited(name, field, change):
        store = shutil.copytree(splice_store, tmp_path / name)
        manifest = json.loads((store / "manifest.json").read_text())
        entry = manifest["splits"]["train"]["shards"][0]["files"][field]
        path = store / "train" / entry["name"]
        values = np.load(path)
        change(values)
        np.save(path, values)
        entry.update(sha256=sha256_file(path), bytes=path.stat().st_size)
        resealed(store, json.dumps(manifest))
        code, _, err = cli("store", "verify", store)
        return code, err, path

    vocab = json.loads((splice_store / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    code, err, path = edited("tokens", "tokens", lambda v: v.__setitem__(3, vocab))
    assert code == 2 and f"{path} holds token ids outside the vocabulary (0..{vocab - 1}): {vocab}" in err, (
        err
    )
    code, err, path = edited("offsets", "offsets", lambda v: v.__setitem__(2, v[1] - 1))
    assert code == 2 and f"{path} does not delimit the shard's records" in err, err
    code, err, path = edited("labels", "labels", lambda v: v.__setitem__(0, 99))
    assert code == 2 and f"{path} holds label 99, not one of the 3 label names" in err, err
    code, err, path = edited("unlabelled", "labels", lambda v: v.__setitem__(0, -1))  # no prep writes -1
    assert code == 2 and f"{path} holds label -1" in err, err

    def rewritten(name, field, change):  # the file replaced by another array, its digest resealed
        store = shutil.copytree(splice_store, tmp_path / name)
        manifest = json.loads((store / "manifest.json").read_text())
        entry = manifest["splits"]["train"]["shards"][0]["files"][field]
        path = store / "train" / entry["name"]
        np.save(path, change(np.load(path)))
        entry.update(sha256=sha256_file(path), bytes=path.stat().st_size)
        resealed(store, json.dumps(manifest))
        return cli("store", "verify", store)[2], path

    err, path = rewritten("short", "labels", lambda v: v[:-1])  # an IndexError at the last record
    assert f"{path} holds" in err and "values, the manifest" in err and "(labels)" in err, err
    err, path = rewritten("dtype", "tokens", lambda v: v.astype(np.float32))  # tokens came back as 85.5
    assert f"{path} holds" in err and "float32 values, the manifest" in err and "uint16 (tokens)" in err, err
    assert cli("store", "verify", splice_store)[0] == 0


def test_an_export_never_hands_transformers_a_foreign_auto_map(finished, tmp_path, cli):
    from biomask.models.pretrained import CONFIG_SHA256, config_digest

    model = shutil.copytree(finished / "model", tmp_path / "model")
    tok = model / "tokenizer" / "tokenizer_config.json"
    tok.write_text(
        json.dumps({**json.loads(tok.read_text()), "auto_map": {"AutoTokenizer": ["evil/repo--x.X", None]}})
    )
    config = json.loads((model / "config.json").read_text())
    config["tokenizer"]["files"]["tokenizer_config.json"] = sha256_file(tok)
    config[CONFIG_SHA256] = config_digest(config)
    (model / "config.json").write_text(json.dumps(config))
    code, _, err = cli("export-hf", "--checkpoint", model, "--output", tmp_path / "hf")
    assert code == 2 and "auto_map" in err and not (tmp_path / "hf").exists(), err


def test_a_registry_cannot_name_a_folder_outside_the_cache_or_a_file_url(tmp_path, cli, monkeypatch):
    import importlib

    registry = importlib.import_module("biomask.datasets.registry")
    entry = "{description: x, modality: dna, kind: genome, format: fasta, licence: x, sha256: %s, source: %s}"
    for name, source in [
        ("../../escaped", "{type: url, url: 'https://example.org/x.fa'}"),
        ("ok", "{type: url, url: 'file:///etc/passwd'}"),
    ]:
        (tmp_path / "reg.yaml").write_text(f"datasets:\n  '{name}': " + entry % ("a" * 64, source) + "\n")
        monkeypatch.setenv("BIOMASK_REGISTRY", str(tmp_path / "reg.yaml"))
        registry._load.cache_clear()
        code, _, err = cli("datasets", "fetch", name)
        assert code == 2 and ("must be letters" in err or "only http(s)" in err), err
    registry._load.cache_clear()


def test_overwrite_through_a_symlink_replaces_only_biomasks_folder_it_points_at(finished, tmp_path, cli):
    """--overwrite of an output named by a link (a workflow engine's staged folder) replaces the
    folder the link points at when biomask wrote it, and keeps the link; a link to a folder holding
    anyone else's files is refused, and those files are left as they were."""
    (tmp_path / "one.fa").write_text(">a\nACGTACGTACGTACGTACGTAAAACCCGGT\n")
    real = tmp_path / "real"
    embed = ["embed", "--checkpoint", finished / "model", "--input", tmp_path / "one.fa", "--output"]
    assert cli(*embed, real)[0] == 0
    (tmp_path / "link").symlink_to(real)
    code, _, err = cli(*embed, tmp_path / "link", "--pooling", "max", "--overwrite")
    assert code == 0 and (tmp_path / "link").is_symlink(), err
    assert json.loads((real / "run.json").read_text())["stage"] == "embed"
    assert "max" in (real / "config.yaml").read_text()
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("theirs")
    (tmp_path / "planted").symlink_to(victim)
    code, _, err = cli(*embed, tmp_path / "planted", "--overwrite")
    assert code == 2 and "not written by biomask" in err, err
    assert (victim / "precious.txt").read_text() == "theirs" and (tmp_path / "planted").is_symlink()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's, on random protocol bytes
def test_any_bytes_that_are_no_torch_file_are_reported_as_corrupt(tmp_path):
    """Arbitrary bytes reach the unpickler's internals and fail in many ways (CI once met an
    IndexError); every one is the same message naming the file, never a traceback."""
    rng = random.Random(1)
    path = tmp_path / "mp_rank_00_model_states.pt"
    for trial in range(300):
        path.write_bytes(rng.randbytes(rng.choice([1, 7, 64, 5000])))
        with (
            pytest.raises(checkpoint.CheckpointError, match="is corrupt") as err,
            checkpoint.weights_only_loads(),
        ):
            torch.load(path)
        assert str(path) in str(err.value), trial


def test_a_finished_runs_digests_leave_out_what_finishing_removes(finished, tmp_path):
    """A temporary a killed export left, and in_progress.json, are removed as the run finishes: hashed,
    they made every such run stale at its next reuse."""
    out = interrupted(finished, tmp_path / "run")
    (out / ".model.tmp-0123abcd").mkdir()
    (out / ".model.tmp-0123abcd" / "model.safetensors").write_text("half")
    tree, digests = rundir.finished_files(out)
    assert "in_progress.json" not in digests and not any(".model.tmp-" in name for name in digests)
    assert "metrics.jsonl" in digests and "config.yaml" in digests
    assert "checkpoints/step00000012/meta.json" in tree
