"""A labelled DNA task derived from a real annotated genome (`biomask datasets task gene-starts`): E. coli
K-12 (and B. japonicum, M. acetivorans) windows holding an annotated CDS start vs others, as a CSV
that `biomask prep dna` reads."""

from __future__ import annotations

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

    # the table is a labelled DNA set for prep dna
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
def test_bad_genome_files_exit_2_naming_the_file_and_write_nothing(text, expected, tmp_path, cli):
    genome = tmp_path / "genome.gbk"
    genome.write_text(text)
    out = tmp_path / "task.csv"
    code, _, err = cli("datasets", "task", "gene-starts", "--genome", genome, "--output", out)
    assert code == 2 and expected in err and str(genome) in err
    assert not out.exists() and list(tmp_path.iterdir()) == [genome]


@pytest.mark.network
def test_prep_reads_a_task_from_a_registered_genome_like_its_csv(tmp_path, cli):
    """`inputs: [{dataset: GENOME, task: {name: gene-starts, ...}}]` in `prep dna` gives the store the
    CSV of `biomask datasets task` gives — what lets a pipeline stage build a real labelled set."""
    import json

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
