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
