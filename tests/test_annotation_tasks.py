"""Labelled DNA tasks derived from a real annotated genome (`biomask datasets task gene-starts|coding`):
E. coli K-12 (and B. japonicum, M. acetivorans) windows holding an annotated CDS start vs others, or
windows inside / against / outside the annotated CDS, as a CSV that `biomask prep dna` reads."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

START_CODONS = ("ATG", "GTG", "TTG")


@pytest.mark.network
def test_gene_start_windows_from_the_ecoli_annotation(tmp_path, cli):
    centre, spread = tmp_path / "centre.csv", tmp_path / "random.csv"
    for placement, path in (("centre", centre), ("random", spread)):
        code, out, err = cli("datasets", "task", "gene-starts", "--genome", "ecoli-k12", "--output", path,
                             "--placement", placement, "--max-per-class", "400", "--length", "120")  # fmt: skip
        assert code == 0, err
        assert out.strip() == str(path)
        # what was written, said on stderr (stdout stays the path a script reads)
        assert "gene-starts of ecoli-k12: 800 windows of 120 bases (other 400, start 400)" in err, err
    table = pd.read_csv(centre)
    assert table["label"].value_counts().to_dict() == {"start": 400, "other": 400}
    assert table["sequence"].str.len().eq(120).all() and table["sequence"].str.fullmatch("[ACGT]+").all()
    assert not table["sequence"].duplicated().any()
    assert table["source"].str.fullmatch(r"NC_000913\.2:\d+-\d+\([+-]\)").all()
    starts, others = table[table["label"] == "start"], table[table["label"] == "other"]
    assert set(starts["source"].str[-2]) == {"+", "-"}  # both strands, read in the gene's direction
    # centre: every start window holds a start codon at its middle (minus-strand genes reverse-
    # complemented correctly), a random window rarely does; a Shine-Dalgarno core upstream is common
    at_centre = starts["sequence"].str[60:63]
    assert at_centre.isin(START_CODONS).mean() > 0.99
    assert others["sequence"].str[60:63].isin(START_CODONS).mean() < 0.2
    assert starts["sequence"].str[40:56].str.contains("GGAG").mean() > 3 * max(
        others["sequence"].str[40:56].str.contains("GGAG").mean(), 0.01
    )
    # random placement: the codon moves (a motif task); mostly not at the middle
    moved = pd.read_csv(spread)
    assert moved.loc[moved["label"] == "start", "sequence"].str[60:63].isin(START_CODONS).mean() < 0.5

    # how each CSV was made, beside it (a store prepared from it records only its path and sha256)
    from biomask import datasets
    from biomask.provenance import sha256_file

    record = json.loads((tmp_path / ".centre.csv.biomask.json").read_text())
    assert record["csv_sha256"] == sha256_file(centre) and record["task"] == "gene-starts"
    assert (record["genome"], record["genome_sha256"]) == (
        "ecoli-k12",
        sha256_file(datasets.fetch("ecoli-k12")),
    )
    assert (record["length"], record["placement"], record["max_per_class"], record["seed"]) == (
        120,
        "centre",
        400,
        0,
    )
    assert record["rows"] == 800 and record["code"]["biomask"]
    # the table is a labelled DNA set for prep dna, and a pattern over the folder names the CSVs alone
    code, _, err = cli("prep", "dna", "-c", "configs/dna/splice.yaml", f"output={tmp_path / 'both'}",
                       f"inputs=[{{path: '{tmp_path}/*', format: table}}]", "tokenizer.kind=char")  # fmt: skip
    assert code == 0, err
    code, _, err = cli("prep", "dna", "-c", "configs/dna/splice.yaml", f"output={tmp_path / 'store'}",
                       f"inputs=[{{path: {centre}, format: table}}]", "tokenizer.kind=char")  # fmt: skip
    assert code == 0, err

    # an existing output is kept unless --overwrite; an unknown genome is a clear exit 2
    before = centre.read_bytes()
    code, _, err = cli("datasets", "task", "gene-starts", "--genome", "ecoli-k12", "--output", centre)
    assert code == 2 and "--overwrite" in err and centre.read_bytes() == before
    code, _, err = cli(
        "datasets", "task", "gene-starts", "--genome", "no-such", "--output", tmp_path / "x.csv"
    )
    assert code == 2 and "no-such" in err and not (tmp_path / "x.csv").exists()
    # --overwrite replaces only a task CSV of its own, never a user's file (nor the genome itself)
    mine = tmp_path / "mine.csv"
    mine.write_text("id,notes\n1,precious\n")
    args = ("datasets", "task", "gene-starts", "--genome", "ecoli-k12", "--overwrite", "--output", mine)
    code, _, err = cli(*args)
    assert code == 2 and "not a task CSV" in err and mine.read_text() == "id,notes\n1,precious\n"
    # nor a file of the user's where the record would go
    theirs = tmp_path / ".new.csv.biomask.json"
    theirs.write_text("{}")
    code, _, err = cli(
        "datasets", "task", "gene-starts", "--genome", "ecoli-k12", "--output", tmp_path / "new.csv"
    )
    assert code == 2 and "is not the record of a task CSV" in err and theirs.read_text() == "{}"
    assert not (tmp_path / "new.csv").exists()


@pytest.mark.network
@pytest.mark.parametrize(
    "genome, accession",
    [("bjaponicum", "NC_004463.1"), ("macetivorans", "NC_003552.1")],  # GC 64 %; an archaeon
)
def test_gene_starts_from_other_registered_genomes(genome, accession, tmp_path, cli):
    """Motif tasks from organisms nothing in biomask was tuned on: the same windows, other genomes."""
    path = tmp_path / "task.csv"
    code, _, err = cli("datasets", "task", "gene-starts", "--genome", genome, "--output", path,
                       "--placement", "centre", "--max-per-class", "200", "--length", "120")  # fmt: skip
    assert code == 0, err
    table = pd.read_csv(path)
    assert table["label"].value_counts().to_dict() == {"start": 200, "other": 200}
    assert table["source"].str.startswith(f"{accession}:").all()
    starts, others = table[table["label"] == "start"], table[table["label"] == "other"]
    assert starts["sequence"].str[60:63].isin(START_CODONS).mean() > 0.9
    assert others["sequence"].str[60:63].isin(START_CODONS).mean() < 0.2


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", "is not GenBank"),
        (">fasta\nACGT\n", "is not GenBank"),
        (
            "LOCUS       X  10 bp    DNA\nFEATURES   garbage\nORIGIN\n  1 acgt\n//\n",
            "record 1 cannot be read",
        ),
    ],
)
@pytest.mark.parametrize("task", ["gene-starts", "coding"])
def test_bad_genome_files_exit_2_naming_the_file_and_write_nothing(task, text, expected, tmp_path, cli):
    genome = tmp_path / "genome.gbk"
    genome.write_text(text)
    out = tmp_path / "task.csv"
    code, _, err = cli("datasets", "task", task, "--genome", genome, "--output", out)
    assert code == 2 and expected in err and str(genome) in err
    assert not out.exists() and list(tmp_path.iterdir()) == [genome]


def test_a_genome_without_cds_or_too_short_for_the_windows_is_refused(tmp_path, cli):
    """An annotated record with no CDS, or none long enough: exit 2 naming the file, nothing written."""
    bases = "ACGT" * 50
    origin = "".join(f"{i + 1:>9} {bases[i : i + 60].lower()}\n" for i in range(0, len(bases), 60))
    head = f"LOCUS       X  {len(bases)} bp    DNA     linear   BCT 01-JAN-2000\n"
    cases = {
        "no CDS": head + "FEATURES             Location/Qualifiers\n     source          1..200\nORIGIN\n" + origin + "//\n",
        "too short": head + "FEATURES             Location/Qualifiers\n     CDS             11..190\nORIGIN\n" + origin + "//\n",
    }  # fmt: skip
    for name, text in cases.items():
        genome = tmp_path / f"{name.replace(' ', '-')}.gbk"
        genome.write_text(text)
        out = tmp_path / "task.csv"
        code, _, err = cli(
            "datasets", "task", "coding", "--genome", genome, "--output", out, "--length", "300"
        )
        assert code == 2 and str(genome) in err, (name, err)
        assert ("no annotated CDS" if name == "no CDS" else "300-base window") in err, (name, err)
        assert not out.exists()
        # gene starts: a CDS there is, but its start's window would run off the contig
        code, _, err = cli(
            "datasets", "task", "gene-starts", "--genome", genome, "--output", out, "--length", "300"
        )  # fmt: skip
        expected = (
            "no annotated CDS"
            if name == "no CDS"
            else "none of its 1 annotated CDS starts has a 300-base window"
        )
        assert code == 2 and str(genome) in err and expected in err, (name, err)
        assert not out.exists()
    # options every task shares: a window too short, no windows asked for
    for task in ("coding", "gene-starts"):
        for option, expected in (("--length=10", "too short"), ("--max-per-class=0", "at least 1")):
            code, _, err = cli("datasets", "task", task, "--genome", genome, "--output", out, option)
            assert code == 2 and expected in err, (task, option, err)
            assert not out.exists()


@pytest.mark.network
def test_prep_reads_a_task_from_a_registered_genome_like_its_csv(tmp_path, cli):
    """`inputs: [{dataset: GENOME, task: {name: gene-starts, ...}}]` in `prep dna` gives the store the
    CSV of `biomask datasets task` gives — what lets a pipeline stage build a real labelled set."""
    csv_path = tmp_path / "task.csv"
    code, _, err = cli("datasets", "task", "gene-starts", "--genome", "macetivorans", "--output", csv_path,
                       "--max-per-class", "150", "--seed", "3")  # fmt: skip
    assert code == 0, err
    stores = {"csv": f"[{{path: {csv_path}, format: table}}]",
              "task": "[{dataset: macetivorans, task: {name: gene-starts, max_per_class: 150, seed: 3}}]"}  # fmt: skip
    for name, inputs in stores.items():
        code, _, err = cli("prep", "dna", "-c", "configs/dna/splice.yaml", f"output={tmp_path / name}",
                           f"inputs={inputs}", "tokenizer.kind=char")  # fmt: skip
        assert code == 0, err
    manifests = [json.loads((tmp_path / n / "manifest.json").read_text()) for n in stores]
    assert manifests[0]["class_counts"] == manifests[1]["class_counts"]
    assert sum(manifests[1]["class_counts"]["train"].values()) > 150
    for split in ("train", "val", "test"):
        for shard in sorted((tmp_path / "csv" / split).glob("*.npy")):
            assert shard.read_bytes() == (tmp_path / "task" / split / shard.name).read_bytes(), shard

    # a task needs an annotated genome: a FASTA input is refused, naming it, and nothing is written
    fasta = tmp_path / "genome.fa"
    fasta.write_text(">chr\n" + "ACGT" * 100 + "\n")
    code, _, err = cli("prep", "dna", "-c", "configs/dna/splice.yaml", f"output={tmp_path / 'bad'}",
                       f"inputs=[{{path: {fasta}, task: {{name: gene-starts}}}}]")  # fmt: skip
    assert code == 2 and "GenBank" in err and str(fasta) in err
    assert not (tmp_path / "bad").exists()


@pytest.mark.network
def test_coding_windows_are_labelled_by_every_base_and_never_overlap(tmp_path, cli):
    """`coding`: a composition task of 3 classes (inside CDS read with the gene, against it, outside any
    CDS), checked against the annotation itself, with no window sharing a base with another."""
    from Bio import SeqIO

    from biomask import datasets
    from biomask.dna.readers import open_text

    path = tmp_path / "coding.csv"
    code, out, err = cli("datasets", "task", "coding", "--genome", "macetivorans", "--output", path,
                         "--max-per-class", "300", "--length", "150", "--seed", "1")  # fmt: skip
    assert code == 0, err
    assert out.strip() == str(path)
    table = pd.read_csv(path)
    assert table["label"].value_counts().to_dict() == {"coding": 300, "antisense": 300, "noncoding": 300}
    assert table["sequence"].str.len().eq(150).all() and table["sequence"].str.fullmatch("[ACGT]+").all()
    assert not table["sequence"].duplicated().any()
    assert set(table["source"].str[-2]) == {"+", "-"}

    with open_text(datasets.fetch("macetivorans")) as handle:
        record = next(SeqIO.parse(handle, "genbank"))
    genome = str(record.seq).upper()
    cds = {1: np.zeros(len(genome), bool), -1: np.zeros(len(genome), bool)}
    for feature in record.features:
        if feature.type == "CDS" and len(feature.location.parts) == 1 and "pseudo" not in feature.qualifiers:
            cds[feature.location.strand][int(feature.location.start) : int(feature.location.end)] = True
    taken = np.zeros(len(genome), int)
    complement = str.maketrans("ACGT", "TGCA")
    for row in table.itertuples():
        contig, span = row.source.rsplit(":", 1)
        assert contig == record.id
        first, last = (int(v) for v in span[:-3].split("-"))
        strand = 1 if span[-2] == "+" else -1
        left, right = first - 1, last
        piece = genome[left:right]
        assert row.sequence == (piece if strand == 1 else piece.translate(complement)[::-1])
        same, other = cds[strand][left:right], cds[-strand][left:right]
        expected = {"coding": (True, False), "antisense": (False, True), "noncoding": (False, False)}
        want_same, want_other = expected[row.label]
        assert (same.all() if want_same else not same.any()) and (
            other.all() if want_other else not other.any()
        )
        taken[left:right] += 1
    assert taken.max() == 1  # no base in two windows: nothing of a test window was seen in training

    # the same rows through prep dna's task input; placement is gene-starts' option, refused here
    code, _, err = cli("prep", "dna", "-c", "configs/dna/splice.yaml", f"output={tmp_path / 'store'}",
                       "inputs=[{dataset: macetivorans, task: {name: coding, max_per_class: 300, length: 150, seed: 1}}]",
                       "tokenizer.kind=char")  # fmt: skip
    assert code == 0, err
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert sum(sum(c.values()) for c in manifest["class_counts"].values()) == 900
    code, _, err = cli("datasets", "task", "coding", "--genome", "macetivorans", "--output", tmp_path / "c.csv",
                       "--placement", "centre")  # fmt: skip
    assert code == 2 and "placement" in err and not (tmp_path / "c.csv").exists()


def test_every_registered_task_is_offered_by_the_command_line_and_by_prep():
    """A task is a function plus its entry in TASKS; the CLI's choices and prep's config must list it."""
    import typing

    from biomask.cli import build_parser
    from biomask.datasets.annotation_tasks import TASKS
    from biomask.dna.config import TaskSpec

    assert set(typing.get_args(TaskSpec.model_fields["name"].annotation)) == set(TASKS)
    parser = build_parser()
    task_parser = parser._subparsers._group_actions[0].choices["datasets"]
    task_parser = task_parser._subparsers._group_actions[0].choices["task"]
    choices = next(a.choices for a in task_parser._actions if a.dest == "task")
    assert set(choices) == set(TASKS)


def test_planted_motif_task_plants_one_motif_in_every_other_window_and_nothing_else():
    """benchmarks/planted_motif_task.py (the SYNTHETIC check of the motif template): on a background
    of A's, every `unbound` window is untouched background and every `bound` one differs from it only
    within one 12-base span, which matches the consensus on one strand better than chance; windows
    holding an N are skipped; the same seed gives the same rows."""
    from benchmarks.planted_motif_task import CONSENSUS, LENGTH, planted_motif_rows

    genome = "A" * 3000 + "N" * 10 + "A" * 3000
    rows = planted_motif_rows(genome, 40, seed=3)
    assert rows == planted_motif_rows(genome, 40, seed=3)
    assert [label for _, label in rows] == ["unbound", "bound"] * 20
    reverse = CONSENSUS[::-1].translate(str.maketrans("ACGT", "TGCA"))
    matches = []
    for window, label in rows:
        assert len(window) == LENGTH and "N" not in window
        changed = [i for i, base in enumerate(window) if base != "A"]
        if label == "unbound":
            assert not changed
            continue
        assert changed and changed[-1] - changed[0] < len(CONSENSUS)
        offsets = range(
            max(0, changed[-1] - len(CONSENSUS) + 1), min(changed[0], LENGTH - len(CONSENSUS)) + 1
        )
        matches.append(
            max(
                sum(a == b for a, b in zip(window[o : o + len(CONSENSUS)], motif, strict=True))
                for motif in (CONSENSUS, reverse)
                for o in offsets
            )
        )
    # each position keeps the consensus base with probability 0.55-0.9: about 8.7 of 12 on average;
    # an all-A stretch matches about 2 (the consensus holds two A's)
    assert np.mean(matches) > 7


def test_planted_motif_task_refuses_fewer_than_two_windows_and_writes_nothing(tmp_path):
    from benchmarks.planted_motif_task import main

    with pytest.raises(SystemExit) as stop:
        main(["--n", "0", "--output", str(tmp_path / "planted.csv")])
    assert stop.value.code == 2
    assert not list(tmp_path.iterdir())
    mine = tmp_path / "mine.csv"  # an existing file is kept unless --overwrite
    mine.write_text("precious")
    with pytest.raises(SystemExit) as stop:
        main(["--n", "4", "--output", str(mine)])
    assert stop.value.code == 2 and mine.read_text() == "precious"


def test_a_joined_cds_is_coding_and_its_start_no_other_window(tmp_path):
    """A CDS joined across the origin (or split by introns) was left out whole: its bases were
    labelled noncoding, and its start codon could sit in an `other` window. Its parts are coding now,
    its start no other window's; it gives no start window of its own (its span is not one interval)."""
    from Bio.Seq import Seq
    from Bio.SeqFeature import CompoundLocation, FeatureLocation, SeqFeature
    from Bio.SeqIO import write
    from Bio.SeqRecord import SeqRecord

    from biomask.datasets.annotation_tasks import coding_windows, gene_start_windows

    rng = np.random.default_rng(0)
    genome = "".join(rng.choice(list("ACGT"), 20_000))
    features = [
        SeqFeature(FeatureLocation(s, s + 900, strand=1), type="CDS") for s in range(4_500, 12_000, 1_500)
    ]
    features.append(SeqFeature(FeatureLocation(12_500, 14_000, strand=-1), type="CDS"))
    wrap = CompoundLocation([FeatureLocation(16_000, 20_000, strand=1), FeatureLocation(0, 4_000, strand=1)])
    features.append(SeqFeature(wrap, type="CDS"))
    record = SeqRecord(Seq(genome), id="wrap", name="wrap", features=features,
                       annotations={"molecule_type": "DNA", "topology": "circular"})  # fmt: skip
    path = tmp_path / "wrap.gbk"
    write(record, path, "genbank")

    joined = np.zeros(len(genome), bool)
    joined[16_000:] = joined[:4_000] = True
    rows = coding_windows(path, length=100, max_per_class=15, seed=0)
    spans = [(r["label"], *(int(v) for v in r["source"].split(":")[1][:-3].split("-"))) for r in rows]
    assert spans and not [s for s in spans if s[0] == "noncoding" and joined[s[1] - 1 : s[2]].any()]
    starts = gene_start_windows(path, length=60, max_per_class=None, seed=0)
    windows = [
        (r["label"], *(int(v) for v in r["source"].split(":")[1][:-3].split("-")), r["source"][-2])
        for r in starts
    ]
    assert sum(label == "start" for label, *_ in windows) == 6  # the five plus-strand genes and the minus one
    assert not [w for w in windows if w[0] == "other" and w[3] == "+" and w[1] - 1 <= 16_000 < w[2]]


def test_overwrite_of_a_task_csv_replaces_it_and_its_record(tmp_path, cli):
    """--overwrite of a task CSV this command wrote (its record beside it) replaces both: a record
    check that failed would refuse every rerun."""
    out = tmp_path / "c.csv"
    args = (
        "datasets",
        "task",
        "gene-starts",
        "--genome",
        "ecoli-k12",
        "--max-per-class",
        "20",
        "--output",
        out,
    )
    assert cli(*args)[0] == 0
    code, _, err = cli(*args, "--seed", "1", "--overwrite")
    assert code == 0, err
    record = json.loads((tmp_path / ".c.csv.biomask.json").read_text())
    assert record["made_by"] == "biomask datasets task" and record["seed"] == 1


def test_no_other_window_holds_an_annotated_start_on_its_strand(tmp_path):
    """An `other` window must hold no annotated CDS start on its strand: that is the label. Checked
    against every start of a dense SYNTHETIC annotation (hundreds of genes on both strands, far from
    position 0, so a set's order is not the coordinates'): the search over starts, once a scan of
    all of them per try (quadratic), is a bisection now, and an off-by-one or unsorted list there
    would mislabel windows silently."""
    from Bio.Seq import Seq
    from Bio.SeqFeature import FeatureLocation, SeqFeature
    from Bio.SeqIO import write
    from Bio.SeqRecord import SeqRecord

    from biomask.datasets.annotation_tasks import gene_start_windows

    rng = np.random.default_rng(1)
    size, length = 400_000, 60
    genome = "".join(rng.choice(list("ACGT"), size))
    lefts = np.sort(rng.choice(np.arange(200_000, size - 2_000, 7), 600, replace=False))
    strands = rng.choice([1, -1], lefts.size)
    features = [
        SeqFeature(
            FeatureLocation(int(a), int(a) + 300 + 3 * int(rng.integers(0, 50)), strand=int(s)), type="CDS"
        )
        for a, s in zip(lefts, strands)
    ]
    record = SeqRecord(Seq(genome), id="dense", name="dense", features=features,
                       annotations={"molecule_type": "DNA"})  # fmt: skip
    path = tmp_path / "dense.gbk"
    write(record, path, "genbank")
    starts = {1: [], -1: []}
    for f in features:
        starts[f.location.strand].append(
            int(f.location.start) if f.location.strand == 1 else int(f.location.end) - 1
        )
    rows = gene_start_windows(path, length=length, max_per_class=None, seed=3)
    others = [r for r in rows if r["label"] == "other"]
    assert len(others) > 300
    for row in others:
        span, strand = row["source"].split(":")[1][:-3], 1 if row["source"][-2] == "+" else -1
        first = int(span.split("-")[0]) - 1  # the source is 1-based, inclusive
        assert not [s for s in starts[strand] if first <= s < first + length], row["source"]


def _synthetic_genbank(path, length: int, features: list) -> None:
    """A SYNTHETIC genome (random bases) with the given CDS features, as GenBank."""
    from Bio.Seq import Seq
    from Bio.SeqIO import write
    from Bio.SeqRecord import SeqRecord

    genome = "".join(np.random.default_rng(1).choice(list("ACGT"), length))
    record = SeqRecord(Seq(genome), id="syn", name="syn", features=features,
                       annotations={"molecule_type": "DNA", "topology": "linear"})  # fmt: skip
    write(record, path, "genbank")


@pytest.mark.parametrize(("gene", "every"), [(1_002, 2_500), (3_000, 5_700)], ids=["40%", "53%"])
def test_a_sparsely_coding_genome_gives_every_coding_class(tmp_path, gene, every):
    """SYNTHETIC genomes, 40 % and 53 % coding (a eukaryote's or a user's annotation may hold less than
    a bacterium's): coding and antisense are the same windows read on either strand, and drawn one
    after the other the first took them all — "no 200-base window is antisense; try a shorter
    --length" — whether they were drawn first (40 %) or after noncoding set the number (53 %)."""
    from Bio.SeqFeature import FeatureLocation, SeqFeature

    from biomask.datasets.annotation_tasks import coding_windows

    genes = [
        SeqFeature(FeatureLocation(at, at + gene, strand=1 if i % 2 else -1), type="CDS")
        for i, at in enumerate(range(1_000, 196_000, every))
    ]
    _synthetic_genbank(tmp_path / "sparse.gbk", 200_000, genes)
    rows = coding_windows(tmp_path / "sparse.gbk", length=200, max_per_class=None, seed=0)
    counts = pd.Series([r["label"] for r in rows]).value_counts().to_dict()
    assert set(counts) == {"coding", "antisense", "noncoding"} and len(set(counts.values())) == 1, counts
    assert counts["coding"] > 100


def _trans_spliced_cds():
    """SYNTHETIC: a CDS of two parts on opposite strands (8,000-8,900 forward, 10,000-10,900 reverse)."""
    from Bio.SeqFeature import CompoundLocation, FeatureLocation, SeqFeature

    parts = [FeatureLocation(8_000, 8_900, strand=1), FeatureLocation(10_000, 10_900, strand=-1)]
    return SeqFeature(CompoundLocation(parts), type="CDS")


def _starts_and_coding_rows(path, length: int, features: list) -> tuple[list[str], list[dict]]:
    """A SYNTHETIC genome of these features: its `start` windows' sources (centred, 100 bases) and its
    coding-task rows over 10 seeds."""
    from biomask.datasets.annotation_tasks import coding_windows, gene_start_windows

    _synthetic_genbank(path, length, features)
    starts = gene_start_windows(path, length=100, max_per_class=None, seed=0, placement="centre")
    rows = [r for seed in range(10) for r in coding_windows(path, length=100, max_per_class=None, seed=seed)]
    return [r["source"] for r in starts if r["label"] == "start"], rows


def test_pseudogenes_partial_and_trans_spliced_cds_are_labelled_as_annotated(tmp_path):
    """SYNTHETIC annotations: a CDS marked by /pseudogene="..." alone (INSDC's qualifier, as ENA
    writes it) was a gene; a 5'-partial CDS (<start) gave a `start` window with no start codon
    annotated there; a CDS with parts on both strands (trans-spliced) was dropped whole, its bases
    labelled noncoding."""
    from Bio.SeqFeature import BeforePosition, FeatureLocation, SeqFeature

    features = [
        SeqFeature(FeatureLocation(2_000, 2_900, strand=1), type="CDS"),  # a plain gene
        SeqFeature(
            FeatureLocation(4_000, 4_900, strand=1), type="CDS", qualifiers={"pseudogene": ["unprocessed"]}
        ),
        SeqFeature(FeatureLocation(BeforePosition(6_000), 6_900, strand=1), type="CDS"),
        _trans_spliced_cds(),
    ]
    starts, rows = _starts_and_coding_rows(tmp_path / "odd.gbk", 13_000, features)
    assert starts == ["syn:1951-2050(+)"]
    spans = [(r["label"], *(int(v) for v in r["source"].split(":")[1][:-3].split("-"))) for r in rows]
    pseudo = [s for s in spans if s[1] > 4_000 and s[2] <= 4_900]
    assert pseudo and {s[0] for s in pseudo} == {"noncoding"}  # not a gene's bases
    trans = [s for s in spans if s[1] > 10_000 and s[2] <= 10_900]
    assert trans and "noncoding" not in {s[0] for s in trans}  # its minus-strand part is coding there


def _rc(s):
    return s.translate(str.maketrans("ACGT", "TGCA"))[::-1]


@pytest.mark.parametrize(("gene", "every"), [(1_002, 2_500), (3_000, 5_700)], ids=["40%", "53%"])
@pytest.mark.parametrize("cap", [None, 100, 200, 400])
def test_sparse_genomes_rows_are_what_they_say(tmp_path, gene, every, cap):
    """SYNTHETIC genomes: every row's sequence is the genome's at its source span and strand, coding
    is read on its gene's strand and antisense against it, and no locus gives two rows (a window read
    both ways, on either side of a split, would leak)."""
    from Bio import SeqIO
    from Bio.SeqFeature import FeatureLocation, SeqFeature

    from biomask.datasets.annotation_tasks import coding_windows

    genes = [
        SeqFeature(FeatureLocation(at, at + gene, strand=1 if i % 2 else -1), type="CDS")
        for i, at in enumerate(range(1_000, 196_000, every))
    ]
    _synthetic_genbank(tmp_path / "sparse.gbk", 200_000, genes)
    genome = str(next(SeqIO.parse(tmp_path / "sparse.gbk", "genbank")).seq)
    strand_at = np.zeros(200_000, dtype=int)
    for g in genes:
        strand_at[int(g.location.start) : int(g.location.end)] = g.location.strand
    rows = coding_windows(tmp_path / "sparse.gbk", length=200, max_per_class=cap, seed=0)
    loci = set()
    for r in rows:
        span, s = r["source"].split(":")[1][:-3], 1 if r["source"][-2] == "+" else -1
        first, last = (int(v) for v in span.split("-"))
        left = first - 1
        seq = genome[left:last] if s == 1 else _rc(genome[left:last])
        assert seq == r["sequence"], r["source"]
        if r["label"] != "noncoding":
            gstrand = strand_at[left]
            assert (gstrand == s) == (r["label"] == "coding"), (r["label"], r["source"], gstrand)
        assert (left, last) not in loci, r["source"]  # one locus, one row
        loci.add((left, last))


def test_reverse_strand_partial_cds_and_both_parts_of_a_trans_spliced_one(tmp_path):
    """SYNTHETIC: a 5'-partial CDS on the reverse strand (`>` on its end) gives no start window, a
    3'-partial one keeps its start; a trans-spliced CDS's parts are coding on their own strands."""
    from Bio.SeqFeature import AfterPosition, BeforePosition, FeatureLocation, SeqFeature

    features = [
        SeqFeature(FeatureLocation(2_000, AfterPosition(2_900), strand=-1), type="CDS"),  # 5'-partial on -
        SeqFeature(FeatureLocation(BeforePosition(4_000), 4_900, strand=-1), type="CDS"),  # 3'-partial on -
        _trans_spliced_cds(),
    ]
    starts, rows = _starts_and_coding_rows(tmp_path / "odd.gbk", 13_000, features)
    assert starts == ["syn:4851-4950(-)"]
    for lo, hi, strand in ((8_000, 8_900, "+"), (10_000, 10_900, "-")):
        inside = [
            r
            for r in rows
            if lo < int(r["source"].split(":")[1][:-3].split("-")[0])
            and int(r["source"].split(":")[1][:-3].split("-")[1]) <= hi
        ]
        assert inside and all((r["label"] == "coding") == (r["source"][-2] == strand) for r in inside), (
            inside[:3]
        )
        assert "noncoding" not in {r["label"] for r in inside}
