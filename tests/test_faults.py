"""Faults and bad input through the CLI (issue 18): every case asserts the exit code, that the message
names the file, line, record or key, and that nothing half-written is left beside the output.

Inputs are small cuts of real registry data (the UCI splice set, C. elegans chrX, pbmc68k_reduced),
damaged the way users' files get damaged. Disk full, read-only outputs and mount points use small
tmpfs mounts (root only; skipped with the reason otherwise); an unreadable input drops the effective
uid to nobody for the read (root ignores permission bits).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

import biomask
from biomask import datasets
from tests.conftest import leftovers

pytestmark = pytest.mark.network  # the inputs are cut from registry data (cached after the first fetch)


# ------------------------------------------------------------------------------------------ inputs


@pytest.fixture(scope="module")
def splice_rows() -> list[tuple[str, str]]:
    """(sequence, label) of 160 rows of the UCI splice set, every 20th (the file is sorted by class)."""
    rows = []
    for line in datasets.fetch("uci-splice").read_text().splitlines():
        if line.strip() and not line.startswith(("@", "%")):
            fields = [f.strip() for f in line.split(",")]
            rows.append(("".join(fields[:-1]), fields[-1]))
    return rows[::20][:160]


def write_table(path: Path, rows: list[tuple[str, str]], *, bom: bool = False, header="id,sequence,label"):
    lines = [header] + [f"r{i},{seq},{label}" for i, (seq, label) in enumerate(rows)]
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + ("\n".join(lines) + "\n").encode())
    return path


@pytest.fixture(scope="module")
def chrx_bases() -> bytes:
    """The first 30 kb of C. elegans chrX (soft-masking uppercased)."""
    with gzip.open(datasets.fetch("ce2-chrX"), "rb") as handle:
        text = handle.read(40_000).split(b"\n", 1)[1]
    return text.replace(b"\n", b"").upper()[:30_000]


def dna(tmp_path: Path, cli, input_path: Path, *extra: str, output: Path | None = None):
    out = output or tmp_path / "store"
    return cli("prep", "dna", "-c", "configs/dna/splice.yaml", f"inputs=[{{path: {input_path}}}]",
               f"output={out}", "tokenizer.kind=char", *extra)  # fmt: skip


@pytest.fixture(autouse=True)
def _repo_cwd(repo, monkeypatch):
    monkeypatch.chdir(repo)


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A small tmpfs at `path` (root only); skips the test with the reason when it cannot be mounted."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'not root'})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount_ro(path: Path) -> None:
    done = subprocess.run(["mount", "-o", "remount,ro", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot remount {path} read-only ({done.stderr.strip()})")


def no_traceback(err: str) -> None:
    assert "Traceback" not in err, err


# ------------------------------------------------------------------------------------------ outputs


def test_overwrite_refuses_an_output_that_holds_the_input(tmp_path, cli, splice_rows):
    out = tmp_path / "store"
    out.mkdir()
    table = write_table(out / "mine.csv", splice_rows)
    (out / "notes.txt").write_text("not biomask's")
    code, _, err = dna(tmp_path, cli, table, "--overwrite", output=out)
    assert code == 2 and str(table) in err and "contains the run's input" in err
    assert table.exists() and (out / "notes.txt").exists()  # nothing deleted
    # an output inside the input's directory is refused the same way (embed/prep inputs can be folders)
    code, _, err = cli("prep", "dna", "-c", "configs/dna/splice.yaml", f"inputs=[{{path: {table}}}]",
                       f"output={table}", "tokenizer.kind=char")  # fmt: skip
    assert code == 2 and str(table) in err


def test_overwrite_never_deletes_files_biomask_did_not_write(tmp_path, cli, splice_rows):
    table = write_table(tmp_path / "in.csv", splice_rows)
    out = tmp_path / "store"
    assert dna(tmp_path, cli, table)[0] == 0
    (out / "my-notes.txt").write_text("keep me")
    code, _, err = dna(tmp_path, cli, table, "split.seed=3", "--overwrite")
    assert code == 2 and "my-notes.txt" in err and (out / "my-notes.txt").read_text() == "keep me"
    (out / "my-notes.txt").unlink()
    (out / "tokenizer" / "my-notes.txt").write_text("keep me")  # deeper down: refused the same way
    code, _, err = dna(tmp_path, cli, table, "split.seed=3", "--overwrite")
    assert code == 2 and "tokenizer/my-notes.txt" in err and (out / "tokenizer" / "my-notes.txt").exists()
    (out / "tokenizer" / "my-notes.txt").unlink()
    assert dna(tmp_path, cli, table, "split.seed=3", "--overwrite")[0] == 0  # only ours: replaced
    # a folder biomask never wrote is not replaced by --overwrite either
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("...")
    code, _, err = dna(tmp_path, cli, table, "--overwrite", output=foreign)
    assert code == 2 and "not written by biomask" in err and (foreign / "thesis.tex").exists()
    (foreign / "run.json").write_text('{"tool": "someone else"}')  # a run.json, but not biomask's
    code, _, err = dna(tmp_path, cli, table, "--overwrite", output=foreign)
    assert code == 2 and "not written by biomask" in err and (foreign / "thesis.tex").exists()
    # nor a user's file at the output path
    notes = tmp_path / "notes.txt"
    notes.write_text("precious")
    code, _, err = dna(tmp_path, cli, table, "--overwrite", output=notes)
    assert code == 2 and "file biomask did not write" in err and notes.read_text() == "precious"
    assert leftovers(tmp_path) == []


def test_pretrain_overwrite_replaces_only_its_own_runs_and_never_its_input(tmp_path, cli, splice_rows):
    """--overwrite on a folder pretrain did not write, or on the store it reads: refused, nothing lost."""
    table = write_table(tmp_path / "in.csv", splice_rows)
    store = tmp_path / "store"
    assert dna(tmp_path, cli, table)[0] == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("precious")
    base = ("pretrain", "-c", "configs/pretrain/dna-tiny.yaml", f"data.store={store}", "train.steps=2")
    code, _, err = cli(*base, f"output={mine}", "--overwrite")
    assert (
        code == 2
        and "not written by biomask pretrain" in err
        and (mine / "keep.txt").read_text() == "precious"
    )
    before = sorted(p.relative_to(store) for p in store.rglob("*"))
    for output in (store, store / "run"):  # the store itself, or a folder inside it
        code, _, err = cli(*base, f"output={output}", "--overwrite")
        assert code == 2 and str(store) in err and "input" in err
        assert sorted(p.relative_to(store) for p in store.rglob("*")) == before
    # another stage's output (a typo in output=) is never replaced: a second store, then a finished run
    other = tmp_path / "other-store"
    assert dna(tmp_path, cli, table, output=other)[0] == 0
    code, _, err = cli(*base, f"output={other}", "--overwrite")
    assert code == 2 and "another stage (prep-dna" in err and (other / "manifest.json").exists()
    run = tmp_path / "run"
    assert cli(*base, f"output={run}", "train.progress=false")[0] == 0
    weights = run / "model" / "model.safetensors"
    code, _, err = dna(tmp_path, cli, table, "--overwrite", output=run)
    assert code == 2 and "another stage (pretrain" in err and weights.exists()
    code, _, err = dna(tmp_path, cli, table, output=run)  # without --overwrite: the same reason
    assert code == 2 and "another stage (pretrain" in err
    # a file added to a finished run, at its top or inside it, is named and kept
    for added in (run / "NOTES.md", run / "model" / "my-plot.png"):
        added.write_text("mine")
        code, _, err = cli(*base, f"output={run}", "train.steps=3", "--overwrite")
        assert code == 2 and str(added.relative_to(run)) in err and added.read_text() == "mine", err
        added.unlink()
    assert cli(*base, f"output={run}", "train.steps=3", "train.progress=false", "--overwrite")[0] == 0


def test_export_overwrite_replaces_only_an_export_and_never_its_checkpoint(tmp_path, cli, dna_checkpoint):
    run = tmp_path / "run"  # a copy of a pretrain run: its checkpoint in run/model
    shutil.copytree(dna_checkpoint, run / "model")
    base = ("export-hf", "--checkpoint", run / "model", "--output")
    code, _, err = cli(*base, run, "--overwrite")  # the run holding the checkpoint
    assert code == 2 and "contains the run's input" in err and (run / "model" / "config.json").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("{}")  # a file of an export's name that biomask did not write
    code, _, err = cli(*base, mine, "--overwrite")
    assert code == 2 and "holds config.json, which an export would replace" in err
    assert (mine / "config.json").read_text() == "{}"
    # a Hub clone (a model card, git): the export goes beside them, and --overwrite of another
    # checkpoint later replaces the export's own files only
    hub = tmp_path / "hub"
    (hub / ".git").mkdir(parents=True)
    (hub / "README.md").write_text("my model card")
    assert cli(*base, hub)[0] == 0
    shutil.copytree(run / "model", tmp_path / "seed99")
    config = json.loads((tmp_path / "seed99" / "config.json").read_text())
    config["training"]["seed"] = 99
    del config["config_sha256"], config["data"]["sources"]  # as written before either was kept
    (tmp_path / "seed99" / "config.json").write_text(json.dumps(config))
    code, _, err = cli("export-hf", "--checkpoint", tmp_path / "seed99", "--output", hub, "--overwrite")
    assert code == 0 and "kept what biomask did not write" in err, err
    assert (hub / "README.md").read_text() == "my model card" and (hub / ".git").is_dir()
    exported = json.loads((hub / "config.json").read_text())["biomask"]["source_checkpoint"]
    assert exported["training"]["seed"] == 99 and not list(tmp_path.glob(".hub.export*"))
    assert cli(*base, tmp_path / "hf")[0] == 0
    stamp = (tmp_path / "hf" / "model.safetensors").stat().st_mtime_ns
    code, _, err = cli(*base, tmp_path / "hf")  # the same checkpoint again: reused, as other stages do
    assert code == 0 and "up to date" in err
    assert (tmp_path / "hf" / "model.safetensors").stat().st_mtime_ns == stamp
    card = (tmp_path / "hf" / "README.md").read_text()  # no card there: biomask wrote one
    assert "library_name: transformers" in card and "R²MAE" in card
    # what a Hub user needs: how it was measured, its inputs (truncation keeps the start), its terms
    assert "Held-out masked loss" in card and "strongest reference predictor" in card
    assert "`truncation=True` keeps the first" in card and "average\n  `[1:-1]`" in card
    assert "## Intended use and limitations" in card and "Apache-2.0" in card
    # a file missing is not reused, but nothing of anyone's is lost by writing it again
    (tmp_path / "hf" / "tokenizer_config.json").unlink()
    code, _, err = cli(*base, tmp_path / "hf")
    assert code == 2 and "changed or missing file" in err
    assert cli(*base, tmp_path / "hf", "--overwrite")[0] == 0
    assert (tmp_path / "hf" / "tokenizer_config.json").is_file()
    # weights changed since the export (fine-tuned and saved there): not reused, and not replaced
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"fine-tuned")
    assert cli(*base, tmp_path / "hf")[0] == 2
    code, _, err = cli(*base, tmp_path / "hf", "--overwrite")
    assert code == 2 and "model.safetensors changed since biomask exported them" in err
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == b"fine-tuned"
    (tmp_path / "hf" / "model.safetensors").unlink()
    # another checkpoint into the same folder: refused without --overwrite
    code, _, err = cli("export-hf", "--checkpoint", tmp_path / "seed99", "--output", tmp_path / "hf")
    assert code == 2 and "not this checkpoint's as it is now" in err and "--overwrite" in err
    (tmp_path / "hf" / "README.md").write_text(card + "\nMy notes.\n")  # the card, edited: now the user's
    code, _, err = cli(
        "export-hf", "--checkpoint", tmp_path / "seed99", "--output", tmp_path / "hf", "--overwrite"
    )
    assert code == 0 and "kept what biomask did not write in" in err and "README.md" in err
    assert (tmp_path / "hf" / "README.md").read_text().endswith("My notes.\n")
    assert (
        json.loads((tmp_path / "hf" / "config.json").read_text())["biomask"]["source_checkpoint"]["training"][
            "seed"
        ]
        == 99
    )
    # a sibling that merely looks like the export's staging folder is never touched
    (tmp_path / ".hf.export").mkdir()
    (tmp_path / ".hf.export" / "precious.txt").write_text("keep")
    assert cli(*base, tmp_path / "hf", "--overwrite")[0] == 0
    assert (tmp_path / ".hf.export" / "precious.txt").read_text() == "keep"
    # an export passed as the checkpoint: named as what it is
    code, _, err = cli("export-hf", "--checkpoint", tmp_path / "hf", "--output", tmp_path / "again")
    assert code == 2 and "is a Hugging Face export" in err and "model/ folder" in err


def test_embed_overwrite_replaces_only_an_h5ad_biomask_wrote(tmp_path, cli, splice_rows, dna_checkpoint):
    """An .h5ad output: a user's file is never replaced, even with --overwrite; biomask's own is."""
    import anndata

    table = write_table(tmp_path / "in.csv", splice_rows[:20])
    theirs = tmp_path / "theirs.h5ad"
    anndata.AnnData(np.ones((3, 2), dtype=np.float32)).write_h5ad(theirs)
    before = theirs.read_bytes()
    base = ("embed", "--checkpoint", dna_checkpoint, "--input", table)
    for extra in ((), ("--overwrite",)):
        code, _, err = cli(*base, "--output", theirs, *extra)
        assert code == 2 and "not written by biomask embed" in err and theirs.read_bytes() == before
    ours = tmp_path / "ours.h5ad"
    assert cli(*base, "--output", ours)[0] == 0
    code, _, err = cli(*base, "--output", ours, "--pooling", "max")
    assert code == 2 and "--overwrite" in err  # biomask's, another result: replaced only when asked
    assert cli(*base, "--output", ours, "--pooling", "max", "--overwrite")[0] == 0
    assert anndata.read_h5ad(ours).uns["X_biomask"]["pooling"] == "max"
    # the UMAP beside a new .h5ad would replace a user's PNG of that name: refused
    (tmp_path / "new.umap.png").write_bytes(b"my figure")
    code, _, err = cli(*base, "--output", tmp_path / "new.h5ad", "--umap-color", "label")
    assert code == 2 and "new.umap.png" in err and (tmp_path / "new.umap.png").read_bytes() == b"my figure"
    assert not (tmp_path / "new.h5ad").exists()


def test_embed_names_what_a_killed_embed_left_beside_its_h5ad(tmp_path, cli, splice_rows, dna_checkpoint):
    """A SIGKILLed embed leaves `.NAME.h5ad.tmp-XXXXXXXX` (a copy of the input, as large) that no
    run removes: the next embed of that output names it and says to delete it; it is not deleted
    (nothing tells a dead writer's file from a live one's), and nothing else is named."""
    table = write_table(tmp_path / "in.csv", splice_rows[:20])
    left = tmp_path / ".emb.h5ad.tmp-0badc0de"
    left.write_bytes(b"\0" * 2_000_000)
    (tmp_path / ".emb.h5ad.tmp-notours").write_bytes(b"x")
    code, _, err = cli(
        "embed", "--checkpoint", dna_checkpoint, "--input", table, "--output", tmp_path / "emb.h5ad"
    )
    assert code == 0, err
    assert ".emb.h5ad.tmp-0badc0de (2 MB)" in err and "delete it" in err
    assert "notours" not in err and left.exists()


def test_stale_temporaries_of_the_same_output_are_cleaned_and_nothing_else(tmp_path, cli, splice_rows):
    table = write_table(tmp_path / "in.csv", splice_rows)
    ours = [tmp_path / ".store.tmp-0123abcd", tmp_path / ".store.old-89abcdef"]
    for stale in ours:  # what a kill during `prep dna` leaves
        stale.mkdir()
        (stale / "shard-00000.tokens.npy").write_bytes(b"\0" * 1024)
    others = [
        tmp_path / ".store.tmp-notours",
        tmp_path / ".other.tmp-0123abcd",
        tmp_path / "store.tmp-0123abcd",
    ]
    for item in others:
        item.write_text("someone else's")
    code, _, err = dna(tmp_path, cli, table)
    assert code == 0, err
    assert not any(p.exists() for p in ours)
    assert all(p.exists() for p in others)


def test_pretrain_export_temporaries_are_cleaned_on_finish(tmp_path):
    from biomask.training import rundir

    (tmp_path / ".model.tmp-ab12cd34").mkdir()  # a kill during the final export
    (tmp_path / ".run.tmp-zz99yy88").mkdir()
    (tmp_path / ".model.tmp-keep").mkdir()  # not tempfile's naming: not ours to delete
    rundir.finish(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.tmp-keep"]


def test_output_on_a_mount_point_is_refused(tmp_path, cli, splice_rows):
    table = write_table(tmp_path / "in.csv", splice_rows)
    with tmpfs(tmp_path / "mnt", "4m") as mnt:
        code, _, err = dna(tmp_path, cli, table, output=mnt)
        assert code == 2 and str(mnt) in err and "mount point" in err
        no_traceback(err)


def test_disk_full_during_prep(tmp_path, cli, chrx_bases):
    fasta = tmp_path / "chrX-30kb.fa"
    fasta.write_bytes(b">chrX\n" + chrx_bases + b"\n")
    with tmpfs(tmp_path / "small", "64k") as small:
        code, _, err = dna(tmp_path, cli, fasta, "windows.length=64", "windows.stride=8",
                           output=small / "store")  # fmt: skip
        assert code == 2, err
        assert str(small / "store") in err and ("space" in err or "disk" in err)
        no_traceback(err)
        assert list(small.iterdir()) == []  # nothing half-written


def test_read_only_output_folder(tmp_path, cli, splice_rows):
    table = write_table(tmp_path / "in.csv", splice_rows)
    with tmpfs(tmp_path / "ro", "1m") as ro:
        remount_ro(ro)
        code, _, err = dna(tmp_path, cli, table, output=ro / "store")
        assert code == 2 and str(ro / "store") in err and "Read-only" in err
        no_traceback(err)


@pytest.fixture
def public_dir():
    """A folder under /tmp that other users may enter (pytest's own tree is root's alone, 0700), 0755:
    readable by all, writable by its owner only. Removed after the test."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="biomask-test-", dir="/tmp"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_unreadable_input(public_dir, cli, splice_rows):
    table = write_table(public_dir / "in.csv", splice_rows)
    table.chmod(0)
    import biomask.dna.prep  # noqa: F401 -- imported before the uid drops (the venv stays readable anyway)

    outputs = public_dir / "outputs"  # a folder anyone may write: the input is what is refused
    outputs.mkdir()
    outputs.chmod(0o777)
    with contextlib.ExitStack() as stack:
        if os.geteuid() == 0:  # root reads anything: read as nobody
            os.seteuid(65534)
            stack.callback(os.seteuid, 0)
        code, _, err = dna(public_dir, cli, table, output=outputs / "store")
    assert code == 2 and str(table) in err and "ermission denied" in err, err
    no_traceback(err)
    assert not (outputs / "store").exists()


def test_an_output_folder_the_user_cannot_write_is_refused_before_the_work(public_dir, cli, splice_rows):
    """As a user other than root (who writes anywhere): the lock beside the output could not be made,
    which was read as "no locks on this file system", and the stage did all its work before failing
    to write. Refused first, naming the folder."""
    table = write_table(public_dir / "in.csv", splice_rows)
    table.chmod(0o644)
    import biomask.dna.prep  # noqa: F401 -- imported before the uid drops

    with contextlib.ExitStack() as stack:
        if os.geteuid() == 0:
            os.seteuid(65534)
            stack.callback(os.seteuid, 0)
        elif os.access(public_dir, os.W_OK):
            pytest.skip("the folder is this user's own")
        code, _, err = dna(public_dir, cli, table)
    assert code == 2 and f"cannot write output {public_dir / 'store'}" in err and "ermission denied" in err, (
        err
    )
    assert "choose an output in a folder you can write" in err
    no_traceback(err)
    assert not (public_dir / "store").exists()


# ------------------------------------------------------------------------------------------ DNA inputs


def test_directory_given_as_a_fasta_file(tmp_path, cli):
    folder = tmp_path / "genome.fa"
    folder.mkdir()
    code, _, err = dna(tmp_path, cli, folder)
    assert code == 2 and f"{folder} is a directory" in err


def test_truncated_genbank_is_an_error_naming_the_record(tmp_path, cli, chrx_bases):
    from Bio import SeqIO
    from Bio.Seq import Seq
    from Bio.SeqRecord import SeqRecord

    records = [
        SeqRecord(Seq(chrx_bases[:12_000].decode()), id="chrXa", name="chrXa", annotations={"molecule_type": "DNA"}),
        SeqRecord(Seq(chrx_bases[12_000:].decode()), id="chrXb", name="chrXb", annotations={"molecule_type": "DNA"}),
    ]  # fmt: skip
    buffer = io.StringIO()
    SeqIO.write(records, buffer, "genbank")
    text = buffer.getvalue()
    whole = tmp_path / "whole.gb"
    whole.write_text(text)
    assert (
        dna(tmp_path, cli, whole, "windows.length=512", "split.block_size=2000", output=tmp_path / "ok")[0]
        == 0
    )
    cut = tmp_path / "cut.gb"
    cut.write_text(text[: int(len(text) * 0.75)])  # the second record loses its tail
    code, _, err = dna(tmp_path, cli, cut, "windows.length=512", "split.block_size=2000")
    assert code == 2 and str(cut) in err and "chrXb" in err and "truncated" in err
    assert leftovers(tmp_path) == [] and not (tmp_path / "store").exists()


def test_duplicate_record_names_are_reported(tmp_path, cli, chrx_bases):
    fasta = tmp_path / "dup.fa"
    fasta.write_bytes(b">chrX\n" + chrx_bases[:10_000] + b"\n>chrX\n" + chrx_bases[10_000:20_000] + b"\n")
    code, _, err = dna(tmp_path, cli, fasta, "windows.length=512", "split.block_size=2000")
    assert code == 0, err
    assert "duplicate record names" in err and "'chrX'" in err


def test_duplicate_table_ids_are_reported(tmp_path, cli, splice_rows):
    table = tmp_path / "dup.csv"
    rows = [
        f"same,{seq},{label}" if i < 2 else f"r{i},{seq},{label}"
        for i, (seq, label) in enumerate(splice_rows)
    ]
    table.write_text("id,sequence,label\n" + "\n".join(rows) + "\n")
    code, _, err = cli("prep", "dna", "-c", "configs/dna/splice.yaml", f"output={tmp_path / 's2'}",
                     f"inputs=[{{path: {table}, id_column: id}}]", "tokenizer.kind=char")  # fmt: skip
    assert code == 0 and "duplicate ids" in err and "'same' (2x)" in err


def test_csv_row_with_extra_fields_names_the_line(tmp_path, cli, splice_rows):
    table = write_table(tmp_path / "bad.csv", splice_rows)
    lines = table.read_text().splitlines()
    lines[7] += ",EXTRA"
    table.write_text("\n".join(lines) + "\n")
    code, _, err = dna(tmp_path, cli, table)
    assert code == 2 and f"{table}, line 8" in err and "4 fields" in err
    assert leftovers(tmp_path) == []


def test_header_quirks_are_named(tmp_path, cli):
    """A second column of one name was read silently (the last one won); spaces, case, a missing
    header line and a FASTA file got only the list of columns."""
    seq = "ACGTACGTACGTACGTACGTACGT"
    for name, text, said in (
        ("dup", f"id,sequence,label,sequence\na,{seq},x,TTTT\n", "names column 'sequence' more than once"),
        ("spaces", f"id, sequence ,label\na,{seq},x\n", "' sequence ' has spaces around it"),
        ("case", f"id,Sequence,label\na,{seq},x\n", "case-sensitive: the header has 'Sequence'"),
        ("none", f"a,{seq},x\n", "the table has no header line"),
        ("fasta", f">a|x\n{seq}\n", "looks like FASTA, not a table"),
        ("genbank", f"LOCUS       a  24 bp    DNA\nORIGIN\n        1 {seq.lower()}\n//\n", "looks like GenBank, not a table (set `format: genbank`"),
    ):  # fmt: skip
        table = tmp_path / f"{name}.csv"
        table.write_text(text)
        code, _, err = dna(tmp_path, cli, table, output=tmp_path / name)
        assert code == 2 and said in err, (name, err)
        no_traceback(err)
        assert not (tmp_path / name).exists()


def test_csv_with_a_byte_order_mark(tmp_path, cli, splice_rows):
    table = write_table(tmp_path / "excel.csv", splice_rows, bom=True)
    code, _, err = cli("prep", "dna", "-c", "configs/dna/splice.yaml", f"output={tmp_path / 'bom'}",
                       f"inputs=[{{path: {table}, id_column: id}}]", "tokenizer.kind=char")  # fmt: skip
    assert code == 0, err


# ------------------------------------------------------------------------------------------ labelled sets


def evaluate_config(tmp_path: Path, store: Path, **splits) -> Path:
    path = tmp_path / f"eval-{uuid.uuid4().hex[:6]}.yaml"
    cfg = {"store": str(store), "output": str(tmp_path / "eval"), "seeds": [0], "baselines": ["kmer_lr"],
           "baseline": {"kmer_k": [3]}, "splits": {"mode": "resample", "val": 0.2, "test": 0.2, **splits}}  # fmt: skip
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_label_column_of_identifiers_is_refused_not_fitted_for_minutes(tmp_path, cli, splice_rows):
    rows = [(seq, f"id{i}") for i, (seq, _) in enumerate(splice_rows)]
    table = write_table(tmp_path / "ids.csv", rows)
    code, _, err = dna(tmp_path, cli, table)
    assert code == 0, err
    code, _, err = cli("evaluate", "-c", evaluate_config(tmp_path, tmp_path / "store"))
    assert code == 2 and "is the label column an identifier?" in err and "with one record each" in err, err
    no_traceback(err)
    assert not (tmp_path / "eval").exists()


def test_single_class_set_warns_at_prep_and_evaluate_refuses(tmp_path, cli, splice_rows):
    rows = [(seq, "N") for seq, _ in splice_rows]
    table = write_table(tmp_path / "one-class.csv", rows)
    code, _, err = dna(tmp_path, cli, table)
    assert code == 0 and "same class (N)" in err
    code, _, err = cli("evaluate", "-c", evaluate_config(tmp_path, tmp_path / "store"))
    assert code == 2 and "one class only" in err and str(tmp_path / "store") in err
    no_traceback(err)
    assert not (tmp_path / "eval").exists() and leftovers(tmp_path) == []


def test_empty_validation_split_warns_and_store_mode_evaluate_says_so(tmp_path, cli, splice_rows):
    table = write_table(tmp_path / "in.csv", splice_rows)
    # a split asked for but too small to hold a record: a warning at prep ...
    code, _, err = dna(tmp_path, cli, table, "split.val=0.001")
    assert code == 0 and "the val split is empty" in err
    # ... one configured at 0 is empty on purpose (fit_cells' test split): no warning
    code, _, err = dna(tmp_path, cli, table, "split.val=0", output=tmp_path / "no-val")
    assert code == 0 and "split is empty" not in err and (tmp_path / "no-val" / "manifest.json").exists()
    code, _, err = cli("evaluate", "-c", evaluate_config(tmp_path, tmp_path / "store", mode="store"))
    assert code == 2 and "val split is empty" in err and "splits.mode=store" in err
    assert not (tmp_path / "eval").exists()  # no report whose header claims other fractions
    # the user's own split column marks no record val: nothing was drawn, so fractions, seeds and block
    # sizes cannot help; the column can
    lines = ["id,sequence,label,part"] + [
        f"r{i},{seq},{label},{'test' if i % 5 == 0 else 'train'}"
        for i, (seq, label) in enumerate(splice_rows)
    ]
    (tmp_path / "parts.csv").write_text("\n".join(lines) + "\n")
    code, _, err = cli("prep", "dna", "-c", "configs/dna/splice.yaml", "tokenizer.kind=char",
                       f"inputs=[{{path: {tmp_path / 'parts.csv'}, split_column: part}}]",
                       f"output={tmp_path / 'parts'}")  # fmt: skip
    assert code == 0 and "the val split is empty: the splits are the input's own (column part)" in err, err
    assert "split.block_size" not in err and "Mark some val there" in err
    code, _, err = cli("evaluate", "-c", evaluate_config(tmp_path, tmp_path / "parts", mode="store"))
    assert code == 2 and "mark some records val in the input's split column (part)" in err, err
    assert "larger split fractions" not in err


def test_output_piped_into_a_reader_that_stops_early(tmp_path, cli, splice_rows):
    """`biomask store info S | head -0`: the reader closes the pipe; no traceback, exit 141 (SIGPIPE's)."""
    import sys

    table = write_table(tmp_path / "in.csv", splice_rows)
    assert dna(tmp_path, cli, table)[0] == 0
    proc = subprocess.Popen(
        [sys.executable, "-m", "biomask", "store", "info", str(tmp_path / "store")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # the reader goes away before reading
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and "Traceback" not in err and "Error" not in err


def test_a_run_folder_or_a_dna_checkpoint_where_another_checkpoint_is_wanted(tmp_path, cli, dna_checkpoint):
    """The message says where the checkpoint is, or which kind is needed; nothing is written."""
    code, _, err = cli("export-hf", "--checkpoint", dna_checkpoint.parent, "--output", tmp_path / "hf")
    assert code == 2 and f"its checkpoint is {dna_checkpoint}" in err and not (tmp_path / "hf").exists()
    cells_file = tmp_path / "cells.h5ad"
    cells_file.write_bytes(b"")  # never read: the checkpoint is checked first
    args = ("--input", cells_file, "--output", tmp_path / "fit", "--init-from", dna_checkpoint)
    code, _, err = cli("fit-cells", *args)
    assert code == 2 and "a dna checkpoint" in err and "gene panel" in err
    assert not (tmp_path / "fit").exists()


# ------------------------------------------------------------------------------------------ cells inputs


@pytest.fixture(scope="module")
def pbmc_counts():
    """pbmc68k_reduced's raw counts (rebuilt from log1p CP10k with n_counts), first 200 cells."""
    import anndata

    adata = anndata.read_h5ad(datasets.fetch("pbmc68k_reduced"))[:200]
    raw = adata.raw.X.toarray() if hasattr(adata.raw.X, "toarray") else np.asarray(adata.raw.X)
    counts = np.rint(np.expm1(raw) * adata.obs["n_counts"].to_numpy()[:, None] / 1e4).astype(np.int32)
    return counts, adata.obs_names.to_numpy(), adata.raw.var_names.to_numpy()


def cells(tmp_path: Path, cli, input_path: Path, fmt: str = "auto", output: Path | None = None, **keys):
    cfg = {"inputs": [{"path": str(input_path), "format": fmt}], "output": str(output or tmp_path / "cells"),
           "qc": {"min_genes": 0, "min_cells": 1}, "tokenizer": {"scheme": "binned", "max_length": 128},
           "split": {"val": 0.1, "test": 0.1}, **keys}  # fmt: skip
    path = tmp_path / f"cells-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return cli("prep", "cells", "-c", path)


def write_mtx(directory: Path, counts, barcodes, genes, *, gz: bool) -> Path:
    import scipy.io
    import scipy.sparse as sp

    directory.mkdir()
    suffix = ".gz" if gz else ""
    opener = gzip.open if gz else open
    with opener(directory / f"matrix.mtx{suffix}", "wb") as handle:
        scipy.io.mmwrite(handle, sp.coo_matrix(counts.T), field="integer")
    features = pd.DataFrame({"id": [f"ENSG{i:08d}" for i in range(len(genes))], "name": genes,
                             "type": "Gene Expression"})  # fmt: skip
    features.to_csv(directory / f"features.tsv{suffix}", sep="\t", header=False, index=False)
    pd.Series(barcodes).to_csv(directory / f"barcodes.tsv{suffix}", header=False, index=False)
    return directory


def test_read_cells_gives_an_anndata_of_a_10x_folder_or_a_loom_without_loompy(tmp_path, cli, pbmc_counts):
    """The way the README gives into fit_cells / embed for files the CLI does not take: biomask's own
    readers (the environment has no loompy, so sc.read_loom would fail)."""
    import h5py

    counts, barcodes, genes = pbmc_counts
    folder = write_mtx(tmp_path / "tenx", counts, barcodes, genes, gz=True)
    loom = tmp_path / "cells.loom"
    with h5py.File(loom, "w") as f:
        f["matrix"] = counts.T.astype(np.float32)  # loom: genes x cells
        f["col_attrs/CellID"] = barcodes.astype("S")
        f["row_attrs/Gene"] = genes.astype("S")
    for path in (folder, loom):
        adata = biomask.read_cells(path)
        assert adata.shape == counts.shape and list(adata.obs_names) == list(barcodes)
        assert list(adata.var_names) == list(genes)
        np.testing.assert_array_equal(adata.X.toarray(), counts)
    # `biomask embed` on such a file names that way out
    from biomask.embedding.reuse import input_kind
    from biomask.errors import InputError

    for path in (folder, loom):
        with pytest.raises(InputError, match=r"biomask.read_cells\("):
            input_kind(path, "auto")


def test_uncompressed_10x_v3_folder_is_read_like_the_gzipped_one(tmp_path, cli, pbmc_counts):
    from biomask.cells.readers import open_matrix

    plain = write_mtx(tmp_path / "plain", *pbmc_counts, gz=False)
    packed = write_mtx(tmp_path / "packed", *pbmc_counts, gz=True)
    a, b = open_matrix(plain), open_matrix(packed)
    assert (a.rows(0, a.n_obs) != b.rows(0, b.n_obs)).nnz == 0
    assert list(a.var.index) == list(b.var.index) and list(a.obs.index) == list(b.obs.index)
    code, _, err = cells(tmp_path, cli, plain)
    assert code == 0, err


def test_truncated_matrix_mtx_gz(tmp_path, cli, pbmc_counts):
    folder = write_mtx(tmp_path / "cut", *pbmc_counts, gz=True)
    data = (folder / "matrix.mtx.gz").read_bytes()
    (folder / "matrix.mtx.gz").write_bytes(data[: len(data) // 2])
    code, _, err = cells(tmp_path, cli, folder)
    assert code == 2 and str(folder) in err and "truncated" in err
    no_traceback(err)
    assert leftovers(tmp_path) == [] and not (tmp_path / "cells").exists()


def _edit_mtx(folder: Path, edit) -> None:
    """Rewrite a plain matrix.mtx's lines with `edit(lines)` (lines[0] is the %%MatrixMarket header)."""
    path = folder / "matrix.mtx"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(edit(lines)) + "\n")


def _body(lines: list[str]) -> int:
    """Index of the first entry line (after the header, comments and the size line)."""
    return next(i for i, line in enumerate(lines) if not line.startswith("%")) + 1


def _set(lines: list[str], index: int, text: str) -> list[str]:
    lines[index] = text
    return lines


# (what is wrong, how to make it so, what the message must say): each names matrix.mtx and its line
_BAD_MTX = {
    "fewer entries than the header says": (
        lambda lines: lines[:-5],
        r"matrix.mtx: the header \(line \d+\) announces [\d,]+ entries but the file ends after [\d,]+, at line",
    ),
    "more entries than the header says": (
        lambda lines: [*lines, lines[-1]],
        r"matrix.mtx line [\d,]+: more entries than the [\d,]+ the header \(line \d+\) announces",
    ),
    "a gene index out of range": (
        lambda lines: _set(lines, _body(lines) + 3, "99999 1 5"),
        r"matrix.mtx line (?P<line>[\d,]+): row index 99,999 is outside 1\.\.765",
    ),
    "a barcode index of 0": (
        lambda lines: _set(lines, _body(lines) + 3, "1 0 5"),
        r"matrix.mtx line (?P<line>[\d,]+): column index 0 is outside 1\.\.200",
    ),
    "a value that is no number": (
        lambda lines: _set(lines, _body(lines) + 3, "1 1 many"),
        r"matrix.mtx line (?P<line>[\d,]+): '1 1 many' is not 'row column integer-value'",
    ),
    "a missing value": (
        lambda lines: _set(lines, _body(lines) + 3, "1 1"),
        r"matrix.mtx line (?P<line>[\d,]+): expected 'row column value', found '1 1'",
    ),
    "a header larger than the tables": (
        lambda lines: _set(lines, _body(lines) - 1, lines[_body(lines) - 1].replace(" 200 ", " 201 ", 1)),
        r"matrix.mtx line \d+: the header says 765 features x 201 barcodes, but features.tsv lists 765 "
        r"and barcodes.tsv 200",
    ),
    "a pattern matrix": (
        lambda lines: _set(lines, 0, "%%MatrixMarket matrix coordinate pattern general"),
        r"matrix.mtx line 1: a 'pattern' matrix \(no values, only positions\) cannot hold counts",
    ),
    "a symmetric matrix": (
        lambda lines: _set(lines, 0, "%%MatrixMarket matrix coordinate integer symmetric"),
        r"matrix.mtx line 1: a 'symmetric' matrix is not supported",
    ),
    "a dense matrix": (
        lambda lines: _set(lines, 0, "%%MatrixMarket matrix array integer general"),
        r"matrix.mtx line 1: a 'array' \(dense\) Matrix Market file",
    ),
    "no Matrix Market header": (
        lambda lines: lines[1:],
        r"matrix.mtx line 1: not a Matrix Market file",
    ),
}


@pytest.mark.parametrize("case", list(_BAD_MTX))
def test_a_damaged_matrix_mtx_is_refused_naming_the_file_and_line(
    tmp_path, cli, pbmc_counts, monkeypatch, case
):
    """Exit 2, the file and line named, no output and no temporary copy left (the matrix is converted,
    and so checked, before anything is written)."""
    import re

    edit, message = _BAD_MTX[case]
    folder = write_mtx(tmp_path / "bad", *pbmc_counts, gz=False)
    _edit_mtx(folder, edit)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    code, _, err = cells(tmp_path, cli, folder)
    assert code == 2, err
    found = re.search(message, " ".join(err.split()))
    assert found, err
    if "line" in found.groupdict():  # the line the edit touched: 1-based, after the header lines
        lines = (folder / "matrix.mtx").read_text().splitlines()
        assert int(found["line"].replace(",", "")) == _body(lines) + 4
    no_traceback(err)
    assert not (tmp_path / "cells").exists() and leftovers(tmp_path) == [] and list(scratch.iterdir()) == []


def test_a_full_temporary_disk_while_converting_a_matrix_mtx_names_tmpdir(
    tmp_path, cli, pbmc_counts, monkeypatch
):
    """The converted copy goes to TMPDIR, which may be a small disk: the refusal says so and what to set."""
    import errno

    import biomask.cells.spill

    def full(self, piece):
        raise OSError(errno.ENOSPC, "No space left on device")

    folder = write_mtx(tmp_path / "tenx", *pbmc_counts, gz=True)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    monkeypatch.setattr(biomask.cells.spill.RowWriter, "append", full)
    code, _, err = cells(tmp_path, cli, folder)
    assert code == 2 and "No space left on device" in err and "set TMPDIR" in err and str(scratch) in err
    no_traceback(err)
    assert not (tmp_path / "cells").exists() and list(scratch.iterdir()) == []


def test_a_converted_matrix_leaves_nothing_in_tmpdir_even_when_killed(tmp_path, pbmc_counts, monkeypatch):
    """A 10x matrix's CSR copy is unlinked once open (it lives as long as the reader, and a SIGKILL,
    say the OOM killer's, leaves no files), and a copy a killed process left while converting is swept
    by the next conversion: only this user's, of this host, whose process has ended."""
    from biomask.cells import readers, spill

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    host = spill._host()
    ended = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead = int(ended.stdout)
    orphan = scratch / f"biomask-mtx-{host}-{dead}-abcd1234"
    (orphan / "inner").mkdir(parents=True)
    (orphan / "inner" / "data.bin").write_bytes(b"x" * 100)
    kept = {
        "running": scratch / f"biomask-mtx-{host}-{os.getppid()}-abcd1234",
        "another host": scratch / f"biomask-mtx-{host}x-{dead}-abcd1234",
        "another prefix": scratch / f"biomask-csc-{host}-{dead}-abcd1234",
        "not biomask's": scratch / f"biomask-mtx-{host}-notapid-abcd1234",
    }
    kept["live in another PID namespace"] = scratch / f"biomask-mtx-{host}-{dead + 1_000_000}-abcd1234"
    for folder in kept.values():
        folder.mkdir()
    if os.geteuid() == 0:  # another user's folder of a process that ended: not this user's to remove
        kept["another user's"] = scratch / f"biomask-mtx-{host}-{dead + 2_000_000}-abcd1234"
        kept["another user's"].mkdir()
        os.chown(kept["another user's"], 65534, 65534)
    held = spill._lock_folder(kept["live in another PID namespace"])  # its process holds its lock
    live = spill.ScratchDir("biomask-live-")  # a live conversion holds its own folder's lock
    assert spill._lock_folder(live.path) is None
    live.cleanup()
    folder = write_mtx(tmp_path / "tenx", *pbmc_counts, gz=True)
    source = readers.open_10x_mtx(folder)
    try:
        assert not orphan.exists()
        assert sorted(scratch.iterdir()) == sorted(kept.values())  # its own copy already unlinked
        block = source.rows(0, 5)
        assert block.shape[0] == 5 and block.nnz > 0  # still read through the open descriptors
    finally:
        source.close()
        os.close(held)


def test_an_h5ad_whose_matrix_lives_in_another_file_is_refused(tmp_path, cli, pbmc_counts):
    """An HDF5 external link (or a virtual dataset) is followed on reading, but only the input file is
    hashed: a store built through one was reused, its provenance "unchanged", after the linked data
    changed. Refused naming the link and its target, exit 2, nothing written."""
    import anndata
    import h5py
    import pandas as pd

    counts, barcodes, genes = pbmc_counts
    adata = anndata.AnnData(
        counts.astype(np.float32), obs=pd.DataFrame(index=barcodes), var=pd.DataFrame(index=genes)
    )
    adata.var_names_make_unique()
    whole = tmp_path / "whole.h5ad"
    adata.write_h5ad(whole)
    elsewhere = tmp_path / "elsewhere.h5"
    with h5py.File(elsewhere, "w") as f:
        f["X"] = counts.astype(np.float32)
    linked, virtual, raw = tmp_path / "linked.h5ad", tmp_path / "virtual.h5ad", tmp_path / "raw.h5ad"
    for target in (linked, virtual, raw):
        shutil.copy(whole, target)
    with h5py.File(raw, "a") as f:  # the values as raw bytes in a file beside it (HDF5 external storage)
        del f["X"]
        values = counts.astype(np.float32)
        (tmp_path / "X.raw").write_bytes(values.tobytes())
        f.create_dataset(
            "X", shape=values.shape, dtype=np.float32, external=[(str(tmp_path / "X.raw"), 0, values.nbytes)]
        )
        f["X"].attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
    with h5py.File(linked, "a") as f:
        del f["X"]
        f["X"] = h5py.ExternalLink(str(elsewhere), "X")
    nested = tmp_path / "nested.h5ad"  # a link anywhere in the file, not only at /X
    shutil.copy(whole, nested)
    with h5py.File(nested, "a") as f:
        f.require_group("layers")["counts"] = h5py.ExternalLink(str(elsewhere), "X")
    with h5py.File(virtual, "a") as f:
        del f["X"]
        layout = h5py.VirtualLayout(shape=counts.shape, dtype=np.float32)
        layout[:] = h5py.VirtualSource(str(elsewhere), "X", shape=counts.shape)
        f.create_virtual_dataset("X", layout)
    for path, shown in (
        (linked, f"/X -> {elsewhere}:X"),
        (virtual, f"/X -> a virtual dataset of {elsewhere}"),
        (raw, f"/X -> its values stored in {tmp_path / 'X.raw'}"),
        (nested, f"/layers/counts -> {elsewhere}:X"),
    ):
        code, _, err = cells(tmp_path, cli, path)
        assert code == 2 and f"{path}: holds data kept in other files ({shown})" in err, err
        assert "copy the data into the file" in err
        no_traceback(err)
        assert not (tmp_path / "cells").exists()
    code, _, err = cells(tmp_path, cli, whole)  # the same data in the file itself
    assert code == 0, err


def test_loom_without_row_attrs(tmp_path, cli, pbmc_counts):
    import h5py

    counts, barcodes, _ = pbmc_counts
    loom = tmp_path / "no-genes.loom"
    with h5py.File(loom, "w") as f:
        f["matrix"] = counts.T.astype(np.float32)
        f["col_attrs/CellID"] = barcodes.astype("S")
    code, _, err = cells(tmp_path, cli, loom)
    assert code == 2 and str(loom) in err and "row_attrs" in err
    no_traceback(err)


def test_a_loom_anndata_wrote_is_read_and_one_naming_neither_says_what_it_has(tmp_path, cli, pbmc_counts):
    """anndata's write_loom names genes `var_names` and cells `obs_names`, not loompy's Gene / CellID:
    such files were refused with no way around it (genes.column is read after the index)."""
    import h5py

    counts, barcodes, genes = pbmc_counts

    def write_loom(path: Path, rows: dict, cols: dict) -> Path:
        with h5py.File(path, "w") as f:
            f["matrix"] = counts.T.astype(np.float32)  # loom: genes x cells
            for group, attrs in (("row_attrs", rows), ("col_attrs", cols)):
                for key, values in attrs.items():
                    f[f"{group}/{key}"] = np.asarray(values).astype("S")
        return path

    read = {}
    for name, (gene_key, cell_key) in {
        "loompy": ("Gene", "CellID"),
        "anndata": ("var_names", "obs_names"),
    }.items():
        loom = write_loom(tmp_path / f"{name}.loom", {gene_key: genes}, {cell_key: barcodes})
        adata = biomask.read_cells(loom)
        assert list(adata.var_names) == list(genes) and list(adata.obs_names) == list(barcodes)
        read[name] = adata.X.toarray()
    np.testing.assert_array_equal(read["loompy"], read["anndata"])
    odd = write_loom(tmp_path / "odd.loom", {"symbol": genes}, {"CellID": barcodes})
    code, _, err = cells(tmp_path, cli, odd)
    assert code == 2 and str(odd) in err and "symbol" in err and "anndata.read_loom" in err, err
    assert "gene names" in err
    no_cells = write_loom(tmp_path / "no-cells.loom", {"Gene": genes}, {"barcode": barcodes})
    code, _, err = cells(tmp_path, cli, no_cells)
    assert code == 2 and "cell ids" in err and "CellID" in err and "barcode" in err, err
    others = np.array([f"other{i}" for i in range(len(genes))])
    # loompy's name wins; the index is not also a column
    both = write_loom(tmp_path / "both.loom", {"Gene": genes, "var_names": others}, {"CellID": barcodes})
    adata = biomask.read_cells(both)
    assert list(adata.var_names) == list(genes) and "Gene" not in adata.var.columns
    no_traceback(err)
    assert not (tmp_path / "cells").exists()


def test_genes_scanpy_made_unique_are_said_when_the_vocabulary_leaves_them_out(tmp_path, cli, pbmc_counts):
    """sc.read_10x_mtx names a second gene of one symbol `G-1`. biomask reading the folder sums the two
    into `G`; the same data read through scanpy lost the copy's counts against a frozen vocabulary
    without a word (coverage still said 100 % of the vocabulary)."""
    import anndata
    import scipy.sparse

    counts, barcodes, genes = pbmc_counts
    vocab_run = tmp_path / "vocab"
    code, _, err = cells(
        tmp_path, cli, write_mtx(tmp_path / "tenx", counts, barcodes, genes, gz=True), output=vocab_run
    )
    assert code == 0, err
    assert "var_names_make_unique" not in err
    made_unique = genes.astype(object).copy()
    made_unique[7] = f"{genes[3]}-1"  # what scanpy names a second gene sharing genes[3]'s symbol
    adata = anndata.AnnData(scipy.sparse.csr_matrix(counts.astype(np.float32)))
    adata.obs_names, adata.var_names = list(barcodes), list(made_unique)
    path = tmp_path / "via-scanpy.h5ad"
    adata.write_h5ad(path)
    code, _, err = cells(
        tmp_path,
        cli,
        path,
        output=tmp_path / "frozen",
        tokenizer={"scheme": "binned", "max_length": 128, "path": str(vocab_run)},
    )
    assert code == 0, err
    assert f"{genes[3]}-1 beside {genes[3]}" in err and "their counts are left out" in err, err
    assert "sum them in the AnnData" in err
    from biomask.cells.genes import made_unique_note

    assert made_unique_note(np.array(["A", "A-1"], dtype=object), ["A", "A-1"]) is None  # a gene of its own
    assert made_unique_note(np.array(["A-1"], dtype=object), ["A"]) is None  # no A beside it
    assert made_unique_note(np.array(["B", "B-1"], dtype=object), ["A"]) is None  # B is not the model's


def test_duplicate_cell_ids_are_reported(tmp_path, cli, pbmc_counts):
    counts, barcodes, genes = pbmc_counts
    barcodes = barcodes.copy()
    barcodes[5] = barcodes[4]
    folder = write_mtx(tmp_path / "dup", counts, barcodes, genes, gz=True)
    code, _, err = cells(tmp_path, cli, folder)
    assert code == 0, err
    assert "duplicate cell ids (1)" in err and barcodes[4] in err


def test_tpm_input_is_refused_without_numpy_warnings(tmp_path, cli, pbmc_counts):
    import anndata

    counts, barcodes, genes = pbmc_counts
    tpm = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1) * 1e6 * 3.7  # TPM-like, not integral
    path = tmp_path / "tpm.h5ad"
    anndata.AnnData(tpm.astype(np.float32), obs=pd.DataFrame(index=barcodes), var=pd.DataFrame(index=genes)).write_h5ad(path)  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, _, err = cells(tmp_path, cli, path, counts={"mode": "require"})
    assert code == 2 and str(path) in err
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in caught]


def test_normalised_values_at_another_total_than_counts_scale_are_refused(tmp_path, cli, pbmc_counts):
    """TPM (every cell summing to 1e6) read at the default scale of 10,000 would be 100x off on the
    linear scale, silently: refused until counts.scale says 1e6; then it gives what CP10k gives."""
    import anndata

    from biomask.store import TokenStore

    counts, barcodes, genes = pbmc_counts
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    paths = {}
    for name, total in (("tpm", 1e6), ("cp10k", 1e4)):
        paths[name] = tmp_path / f"{name}.h5ad"
        anndata.AnnData((share * total).astype(np.float32), obs=pd.DataFrame(index=barcodes), var=pd.DataFrame(index=genes)).write_h5ad(paths[name])  # fmt: skip
    out = tmp_path / "tpm-store"
    code, _, err = cells(tmp_path, cli, paths["tpm"], output=out, counts={"mode": "normalised"})
    assert code == 2 and str(paths["tpm"]) in err and "sum to 1,000,000" in err, err
    assert "set counts.scale: 1e+06" in err and not out.exists()
    # a scale set on purpose (a model trained on such values at 10,000, before this check) is kept
    code, _, err = cells(tmp_path, cli, paths["tpm"], output=tmp_path / "as-set", counts={"mode": "normalised", "scale": 1e4})  # fmt: skip
    assert code == 0 and "using counts.scale=10000 as set" in err, err
    code, _, err = cells(tmp_path, cli, paths["tpm"], output=out, counts={"mode": "normalised", "scale": 1e6})
    assert code == 0, err
    code, _, err = cells(tmp_path, cli, paths["cp10k"], output=tmp_path / "cp10k-store", counts={"mode": "normalised"})  # fmt: skip
    assert code == 0, err
    a, b = TokenStore(out).split("train"), TokenStore(tmp_path / "cp10k-store").split("train")
    assert len(a) == len(b)
    for i in (0, len(a) - 1):
        np.testing.assert_array_equal(a[i]["tokens"], b[i]["tokens"])
        # within a bin (each store's bin edges come from its own values); 100x off would be ~4.6 away
        np.testing.assert_allclose(a[i]["values"], b[i]["values"], atol=0.05)


def test_a_log1p_config_on_counts_names_the_mode_not_the_missing_totals_column(tmp_path, cli, pbmc_counts):
    """A config copied from a log-normalised dataset (from_log1p with its n_counts column) on a counts
    file: the mode is the mistake, so that is what the first message says."""
    import anndata

    counts, barcodes, genes = pbmc_counts
    path = tmp_path / "counts.h5ad"
    anndata.AnnData(counts.astype(np.float32), obs=pd.DataFrame(index=barcodes), var=pd.DataFrame(index=genes)).write_h5ad(path)  # fmt: skip
    code, _, err = cells(
        tmp_path, cli, path, counts={"mode": "from_log1p", "total_counts_column": "n_counts"}
    )
    assert code == 2 and "already holds counts" in err and "set counts.mode: require" in err, err
    code, _, err = cells(tmp_path, cli, path, counts={"mode": "require", "total_counts_column": "n_counts"})
    assert code == 2 and "obs has no column 'n_counts'" in err and "null sums each cell's counts" in err, err


# ------------------------------------------------------------------------------------------ training


@pytest.mark.slow
def test_disk_full_during_a_checkpoint_save(tmp_path, cli, chrx_bases):
    fasta = tmp_path / "chrX-30kb.fa"
    fasta.write_bytes(b">chrX\n" + chrx_bases + b"\n")
    store = tmp_path / "store"
    code, _, err = dna(
        tmp_path, cli, fasta, "windows.length=128", "windows.stride=64", "split.block_size=1000"
    )
    assert code == 0, err
    with tmpfs(tmp_path / "small", "160k") as small:
        out = small / "run"
        keys = {"data.store": store, "data.max_length": 66, "model.max_len": 66, "model.d_model": 32,
                "model.d_ff": 64, "train.steps": 4, "train.checkpoint_every": 2, "train.eval_every": 4,
                "train.micro_batch_size": 8, "train.eval_batches": 1, "data.eval_split": "test", "train.progress": "false",
                "deepspeed.stage": 0, "output": out}  # fmt: skip
        code, _, err = cli(
            "pretrain", "-c", "configs/pretrain/dna-tiny.yaml", *[f"{k}={v}" for k, v in keys.items()]
        )
        assert code == 2, err
        no_traceback(err)
        assert str(out / "checkpoints") in err and "free" in err
        assert not list((out / "checkpoints").glob(".tmp-*"))  # the partial save was removed


# ------------------------------------------------------------------------------------------ signals
# A stage killed at a random point of its write (seeded: the same points every run) leaves either no
# output or the complete one, never a half-written one; the rerun succeeds, gives the same files as an
# undisturbed run, and no temporary of ours remains. The runs are forks of this process (already
# imported, so a run spends its time working, not importing); SIGTERM and SIGKILL are real signals.


def fork_stage(cli_args: list[str]) -> int:
    from biomask.cli import main

    pid = os.fork()
    if pid == 0:  # the child runs the stage and never returns into pytest
        code = 1
        try:
            code = main(cli_args)
        finally:
            os._exit(code)
    return pid


def wait_for_temporary(pid: int, parent: Path) -> int | None:
    """Until the stage's temporary output appears (None) or the stage ends (its exit code: the
    stage is reaped, a write quicker than one poll is missed)."""
    while not any(".tmp-" in p.name for p in parent.iterdir()):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.002)
    return None


def contents(directory: Path, skip: tuple[str, ...] = ("run.json", "config.yaml", "manifest.json")) -> dict:
    """sha256 of every file under `directory` (relative names), without the provenance files that name
    the output's own path or the time."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name not in skip
    }


def survives_kills(tmp_path: Path, cli, args, rerun_args=(), seed: int = 0) -> None:
    """`args(output)`: the stage's CLI arguments writing to `output`."""
    code, _, err = cli(*args(tmp_path / "reference"))  # in-process (and compiles numba kernels once)
    assert code == 0, err
    reference = contents(tmp_path / "reference")
    # how long the write takes: from the temporary's appearance to the end of an undisturbed run
    (timing := tmp_path / "timing").mkdir()
    forked = time.perf_counter()
    pid = fork_stage([str(a) for a in args(timing / "out")])
    code = wait_for_temporary(pid, timing)
    started = time.perf_counter() if code is None else forked  # a write too quick to see: the whole run
    if code is None:
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    assert code == 0
    writing = time.perf_counter() - started

    (parent := tmp_path / "killed").mkdir()
    out = parent / "out"
    rng = np.random.default_rng(seed)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pid = fork_stage([str(a) for a in args(out)])
        code = wait_for_temporary(pid, parent)
        assert code in (None, 0)  # a stage that ended before its write was seen must have succeeded
        if code is None:
            time.sleep(float(rng.uniform(0.0, 1.0)) * writing)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            os.waitpid(pid, 0)
        assert not out.exists() or contents(out) == reference  # nothing half-written under its name
    code, _, err = cli(*args(out), *rerun_args)
    assert code == 0, err
    assert contents(out) == reference
    assert leftovers(parent) == []


def test_prep_dna_killed_at_random_points(tmp_path, cli, chrx_bases):
    fasta = tmp_path / "chrX-30kb.fa"
    fasta.write_bytes(b">chrX\n" + chrx_bases + b"\n")

    def args(out: Path) -> list:
        return ["prep", "dna", "-c", "configs/dna/splice.yaml", f"inputs=[{{path: {fasta}}}]", f"output={out}",
                "tokenizer.kind=char", "windows.length=128", "windows.stride=64", "split.block_size=1000"]  # fmt: skip

    survives_kills(tmp_path, cli, args, seed=1)


def _prep_in_a_child(tmp_path, chrx_bases, capfd, before_finish) -> tuple[int, str, Path]:
    """`prep dna` of 30 kb of chrX in a forked child (it never returns into pytest), with
    `before_finish(cli)` called once the shards are written and before the manifest — where a
    signal lands mid-write every run. (exit code, stderr, the output path)."""
    fasta = tmp_path / "chrX-30kb.fa"
    fasta.write_bytes(b">chrX\n" + chrx_bases + b"\n")
    (tmp_path / "stores").mkdir()
    out = tmp_path / "stores" / "store"
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            from biomask import cli, store

            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as a new process starts, whatever ran before
            signal.signal(signal.SIGINT, signal.default_int_handler)
            finish = store.TokenStoreWriter.finish

            def finish_after(self, **manifest):
                before_finish(cli)
                return finish(self, **manifest)

            store.TokenStoreWriter.finish = finish_after
            code = cli.main(["prep", "dna", "-c", "configs/dna/splice.yaml", f"inputs=[{{path: {fasta}}}]",
                             f"output={out}", "tokenizer.kind=char", "windows.length=128", "split.block_size=1000"])  # fmt: skip
        finally:
            sys.stderr.flush()
            os._exit(code)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    return code, capfd.readouterr().err, out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR2, signal.SIGXCPU], ids=lambda s: s.name)
def test_sigterm_while_writing_removes_the_temporary(tmp_path, chrx_bases, capfd, sig):
    """SIGTERM (`kill`, `timeout`, scancel) while prep writes its store: the command removes the
    temporary it was writing (as large as the store would be), says so and exits 143 (128 + SIGTERM):
    no output under its name and nothing hidden beside it. Another scheduler's stop signal the same
    (SGE's -notify sends SIGUSR2, a CPU-time limit SIGXCPU: their default ended prep where it stood,
    its temporary and lock left, no word said)."""
    code, err, out = _prep_in_a_child(tmp_path, chrx_bases, capfd, lambda cli: os.kill(os.getpid(), sig))
    assert code == 143, err
    assert f"stopped by {sig.name}" in err
    assert not out.exists()
    assert leftovers(out.parent) == []


@pytest.mark.parametrize("repeat", [False, True])
def test_a_sigterm_something_swallowed_is_not_lost(tmp_path, chrx_bases, capfd, repeat):
    """A kill-fuzzer's find: `prep dna` sometimes ran on after SIGTERM, finished and exited 0 — the stop
    had been raised inside a call that dropped it — and the handler had set SIG_IGN, so no later
    SIGTERM stopped it either. Now such a run says so and exits 143 (its output complete), and a
    SIGTERM after the repeat grace stops it."""

    def swallowed(cli):
        from biomask.errors import Terminated

        with contextlib.suppress(Terminated):  # what a library that checks signals and drops errors does
            os.kill(os.getpid(), signal.SIGTERM)
        if repeat:
            cli._SigtermStop.REPEAT_GRACE_S = 0.0  # the repeat comes after the grace
            os.kill(os.getpid(), signal.SIGTERM)

    code, err, out = _prep_in_a_child(tmp_path, chrx_bases, capfd, swallowed)
    assert code == 143, err
    if repeat:  # stopped by the second: nothing written
        assert "stopped by SIGTERM" in err and not out.exists() and leftovers(out.parent) == []
    else:  # ran on to the end: a whole output, and the stop said
        assert "SIGTERM reached this command, which did not stop" in err and "its output is complete" in err
        assert (out / "manifest.json").is_file() and leftovers(out.parent) == []


def test_a_ctrl_c_something_swallowed_is_not_lost(tmp_path, chrx_bases, capfd):
    """An audit's find: Ctrl-C landing while numba compiled a kernel (a KeyboardInterrupt raised inside
    a ctypes callback, which Python prints and drops) let `evaluate` run every seed and exit 0. Such a
    run says so and exits 130, its output complete; a Ctrl-C that is not dropped stops it as before."""

    def swallowed(cli):
        with contextlib.suppress(KeyboardInterrupt):  # what the ctypes callback does with it
            os.kill(os.getpid(), signal.SIGINT)

    code, err, out = _prep_in_a_child(tmp_path, chrx_bases, capfd, swallowed)
    assert code == 130, err
    assert "Ctrl-C reached this command, which did not stop" in err and "exiting 130" in err
    assert (out / "manifest.json").is_file() and leftovers(out.parent) == []
    shutil.rmtree(tmp_path / "stores")
    code, err, out = _prep_in_a_child(
        tmp_path, chrx_bases, capfd, lambda cli: os.kill(os.getpid(), signal.SIGINT)
    )
    assert code == 130 and "biomask: interrupted" in err and "did not stop" not in err, err
    assert not out.exists() and leftovers(out.parent) == []


def test_ctrl_c_raises_at_every_press_and_main_gives_the_callers_handlers_back():
    """A second Ctrl-C is how a user insists after a first one a library dropped: no grace period
    swallows it (SIGTERM's has one, for a scheduler's repeat). A caller of main() (a notebook, a
    script) gets Python's own handlers back when it returns."""
    from biomask import cli

    guard = cli._SigintStop()
    for _ in range(2):
        with pytest.raises(KeyboardInterrupt):
            guard(signal.SIGINT, None)
    assert guard.raised
    assert cli.main(["datasets", "list"]) == 0
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_prep_cells_killed_at_random_points(tmp_path, cli, pbmc_counts):
    import anndata
    import scipy.sparse as sp

    counts, barcodes, genes = pbmc_counts
    h5ad = tmp_path / "pbmc200.h5ad"
    anndata.AnnData(sp.csr_matrix(counts), obs=pd.DataFrame(index=barcodes),
                    var=pd.DataFrame(index=genes)).write_h5ad(h5ad)  # fmt: skip
    config = {"inputs": [{"path": str(h5ad)}], "qc": {"min_genes": 0, "min_cells": 1},
              "tokenizer": {"scheme": "binned", "max_length": 128}, "split": {"val": 0.1, "test": 0.1}}  # fmt: skip
    path = tmp_path / "cells.yaml"
    path.write_text(yaml.safe_dump(config))

    def args(out: Path) -> list:
        return ["prep", "cells", "-c", path, f"output={out}"]

    survives_kills(tmp_path, cli, args, seed=2)


def test_export_hf_killed_at_random_points(tmp_path, cli, dna_checkpoint):
    def args(out: Path) -> list:
        return ["export-hf", "--checkpoint", dna_checkpoint, "--output", out]

    # a killed export that got as far as its rename is complete; the rerun replaces it (--overwrite)
    survives_kills(tmp_path, cli, args, rerun_args=("--overwrite",), seed=3)


def test_a_label_written_with_spaces_around_it_beside_the_plain_one_is_said(tmp_path, cli, splice_rows):
    """ "N " and "N" in one table: prep dna drops the spaces (one class, as a user means), silently before;
    prep cells warns of such variants, and so does this now."""
    rows = [(seq, f"{label} " if i == 3 else label) for i, (seq, label) in enumerate(splice_rows)]
    table = write_table(tmp_path / "spaced.csv", rows)
    code, _, err = dna(tmp_path, cli, table)
    assert code == 0, err
    spaced = rows[3][1]
    assert f"{spaced!r} (line 5) as {spaced.strip()!r}" in err and "read as one class" in err, err
    labels = json.loads((tmp_path / "store" / "manifest.json").read_text())["label_names"]
    assert spaced not in labels and spaced.strip() in labels
    code, _, err = dna(
        tmp_path, cli, write_table(tmp_path / "plain.csv", splice_rows), output=tmp_path / "plain"
    )
    assert code == 0 and "read as one class" not in err


def test_a_tensor_file_on_a_full_disk_is_a_file_system_error_naming_it(tmp_path):
    """safetensors reports a refused write (a full disk, a quota) as its own error type, which no
    handler of file-system errors took: export-hf, a checkpoint's RNG state and pretrain's portable
    model ended in a traceback (exit 1), the partial checkpoint left. It is the OSError it is now,
    naming the file; here a file-size limit refuses the write as a full disk does."""
    import subprocess
    import sys

    probe = (
        "import errno, resource, signal, sys, torch\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
        "from biomask.tensor_files import save_tensors\n"
        "try:\n"
        "    save_tensors({'w': torch.zeros(100_000)}, sys.argv[1])\n"
        "except OSError as exc:\n"
        "    print(errno.errorcode[exc.errno], exc.filename)\n"
    )
    target = tmp_path / "model.safetensors"
    run = subprocess.run([sys.executable, "-c", probe, str(target)], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.split() == ["EFBIG", str(target)], run.stdout + run.stderr


def test_a_portable_model_that_could_not_be_written_leaves_no_partial_folder(tmp_path, monkeypatch):
    """pretrain's last step, the portable `model/`, failing on a full disk left `.model.tmp-*` (as large
    as the model) beside the run's checkpoints."""
    import errno

    from biomask.training import checkpoint

    def full(state, arch, directory, **kwargs):
        directory.mkdir()
        (directory / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(directory / "model.safetensors"))

    monkeypatch.setattr(checkpoint, "save_pretrained", full)
    with pytest.raises(OSError):
        checkpoint.export_portable(tmp_path, {}, None, tokenizer_dir=tmp_path, info={})
    assert list(tmp_path.iterdir()) == []


def test_a_stage_whose_result_path_cannot_be_printed_says_it_finished(tmp_path, chrx_bases):
    """`biomask prep dna ... > run.log` with run.log on a full disk: the store was written, then
    printing its path failed with "cannot use: No space left on device", naming no file, as if the
    stage had failed. (/dev/full refuses every write as a full disk does.)"""
    import subprocess
    import sys

    fasta = tmp_path / "chrX-30kb.fa"
    fasta.write_bytes(b">chrX\n" + chrx_bases + b"\n")
    out = tmp_path / "store"
    with open("/dev/full", "w") as full:
        run = subprocess.run(
            [sys.executable, "-m", "biomask", "-q", "prep", "dna", "-c", "configs/dna/splice.yaml",
             f"inputs=[{{path: {fasta}}}]", f"output={out}", "tokenizer.kind=char", "windows.length=128",
             "split.block_size=1000"],
            stdout=full, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert (
        f"prep dna finished and wrote {out}, but its path could not be written to standard output"
        in run.stderr
    )
    assert "No space left on device" in run.stderr and (out / "manifest.json").is_file()
