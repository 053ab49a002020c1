"""FASTA and GenBank readers: the block reader agrees with Biopython's parser on tricky files."""

from __future__ import annotations

import gzip
import io

import pytest
from Bio.SeqIO.FastaIO import SimpleFastaParser

from biomask.dna.readers import read_fasta_blocks, read_genbank_blocks
from biomask.errors import InputError

TRICKY = [
    ">r1 desc\nACGT\nacgtNN\n\n>r2\nGGGG\r\nCCCC\r\n>r3\nA",  # lowercase, blank line, CRLF, no final newline
    "\n\n>only\n" + "ACGTACGTAC\n" * 50,  # leading blank lines, record longer than a block
    ">a\nAC GT\n>b\nT\n",  # spaces inside sequence lines
]


def blocks_to_records(blocks):
    records: dict[str, bytearray] = {}
    for name, start, bases in blocks:
        seq = records.setdefault(name, bytearray())
        assert start == len(seq)  # blocks are consecutive
        seq += bases
    return [(name, bytes(seq).decode()) for name, seq in records.items()]


@pytest.mark.parametrize("text", TRICKY)
@pytest.mark.parametrize("block_size", [1, 3, 7, 1000])
def test_blocks_agree_with_biopython(tmp_path, text, block_size):
    path = tmp_path / "x.fa"
    path.write_text(text)
    ours = blocks_to_records(read_fasta_blocks(path, block_size))
    reference = [(t.split()[0], s.replace(" ", "")) for t, s in SimpleFastaParser(io.StringIO(text))]
    assert ours == reference
    for _, _, bases in read_fasta_blocks(path, block_size):
        assert len(bases) <= block_size


def test_gzip_and_plain_read_the_same(tmp_path):
    text = TRICKY[0]
    (tmp_path / "p.fa").write_text(text)
    (tmp_path / "g.fa.gz").write_bytes(gzip.compress(text.encode()))
    assert list(read_fasta_blocks(tmp_path / "p.fa", 5)) == list(read_fasta_blocks(tmp_path / "g.fa.gz", 5))


def test_bzip2_and_xz_read_as_plain_and_zstd_or_zip_are_named(tmp_path):
    """Genomes come as .fa.bz2 and .fa.xz too: read like .fa.gz, the format told from the name under
    the suffix. A .zst or .zip (no streaming reader in Python's library) is refused saying what it
    is and what to do -- it used to be "cannot tell the format", then, with `format: fasta`, "is not
    FASTA: its first line is" binary."""
    import bz2
    import lzma

    from biomask.dna.formats import guess_format

    text = TRICKY[0]
    (tmp_path / "p.fa").write_text(text)
    plain = list(read_fasta_blocks(tmp_path / "p.fa", 5))
    for name, compress in (
        ("g.fa.bz2", bz2.compress),
        ("g.fasta.xz", lzma.compress),
        ("g.fa.bgz", gzip.compress),
    ):
        (tmp_path / name).write_bytes(compress(text.encode()))
        assert guess_format(tmp_path / name) == "fasta"
        assert list(read_fasta_blocks(tmp_path / name, 5)) == plain
    (tmp_path / "cut.fa.xz").write_bytes(lzma.compress(text.encode())[:-8])
    with pytest.raises(InputError, match="cut.fa.xz: corrupt or truncated xz file"):
        list(read_fasta_blocks(tmp_path / "cut.fa.xz", 5))
    for name, head, what in (
        ("g.fa.zst", b"\x28\xb5\x2f\xfd", "zstd-compressed"),
        ("g.fa.zip", b"PK\x03\x04", "a zip archive \\(an .xlsx workbook is one too\\)"),
        ("g.fa.lz4", b"\x04\x22\x4d\x18", "lz4-compressed"),
    ):
        (tmp_path / name).write_bytes(head + b"\0" * 64)
        assert guess_format(tmp_path / name) == "fasta"
        with pytest.raises(InputError, match=f"{name} is {what}; biomask reads plain, gzip, bzip2 and xz"):
            list(read_fasta_blocks(tmp_path / name, 5))


def test_header_split_across_read_chunks(tmp_path, monkeypatch):
    import biomask.dna.readers as readers

    monkeypatch.setattr(readers, "_READ_CHUNK", 7)  # force chunk edges inside headers and lines
    text = ">first record\nACGTACGTACGT\nAC\n>second\nGGGGCCCCAAAA\n"
    path = tmp_path / "c.fa"
    path.write_text(text)
    assert blocks_to_records(read_fasta_blocks(path, 4)) == [
        ("first", "ACGTACGTACGTAC"),
        ("second", "GGGGCCCCAAAA"),
    ]


@pytest.mark.parametrize("chunk", [1, 2, 5, 7])
@pytest.mark.parametrize("text", [*TRICKY, ">one line\n" + "ACGTN" * 40 + "\n>next\n" + "GC" * 30])
def test_every_chunk_edge_agrees_with_biopython(tmp_path, monkeypatch, text, chunk):
    """Chunk edges anywhere: in a header, in a sequence line longer than a chunk, at a line break."""
    import biomask.dna.readers as readers

    monkeypatch.setattr(readers, "_READ_CHUNK", chunk)
    path = tmp_path / "x.fa"
    path.write_text(text)
    reference = [(t.split()[0], s.replace(" ", "")) for t, s in SimpleFastaParser(io.StringIO(text))]
    assert blocks_to_records(read_fasta_blocks(path, 3)) == reference


def test_a_chromosome_on_one_line_is_streamed(tmp_path, monkeypatch):
    """A FASTA written unwrapped (`seqkit seq -w 0`: a 250 Mb chromosome on one line) streams like a
    wrapped one: its first blocks come before the file is read to the end. The line used to be
    gathered whole (and copied at every chunk) before any block came out."""
    import random

    import biomask.dna.readers as readers

    monkeypatch.setattr(readers, "_READ_CHUNK", 1 << 16)
    rng = random.Random(0)
    bases = "".join(rng.choice("ACGT") for _ in range(3_000_000))
    path = tmp_path / "unwrapped.fa"
    path.write_text(f">chr1\n{bases}\n")
    read = [0]
    blocks = read_fasta_blocks(path, 10_000, on_read=lambda n: read.__setitem__(0, read[0] + n))
    name, start, first = next(blocks)
    assert (name, start, first) == ("chr1", 0, bases[:10_000].encode())
    assert read[0] < path.stat().st_size  # streamed: the rest of the line is still unread
    assert b"".join([first, *(b for _, _, b in blocks)]) == bases.encode()


def test_not_genbank(tmp_path):
    path = tmp_path / "x.gbk"
    path.write_text(">fasta\nACGT\n")
    with pytest.raises(InputError, match="is not GenBank"):
        list(read_genbank_blocks(path, 10))


@pytest.mark.network
def test_genbank_genome_prepared_end_to_end(tmp_path, cli):
    from biomask.store import TokenStore

    cfg = tmp_path / "ecoli.yaml"
    cfg.write_text(
        f"inputs: [{{dataset: ecoli-k12}}]\noutput: {tmp_path / 'out'}\nwindows: {{length: 1000}}\n"
    )
    code, _, err = cli("prep", "dna", "-c", cfg)
    assert code == 0, err
    store = TokenStore(tmp_path / "out")
    assert store.manifest["stats"]["bases"] == 4_639_675
    assert sum(len(store.split(s)) for s in store.splits) == 4_639_675 // 1000
    assert store.split("train").meta()["record"].iloc[0] == "NC_000913.2"


def test_fasta_as_other_editors_save_it(tmp_path):
    """A UTF-8 byte-order mark (Notepad) is skipped; non-ASCII names stay distinct (they were both
    '��_chr'); UTF-16 (PowerShell's '>') and CR-only line ends (classic Mac) are named as such."""
    from biomask.dna.readers import read_fasta_blocks
    from biomask.errors import InputError

    def blocks(name: str, data: bytes) -> list:
        (tmp_path / name).write_bytes(data)
        return [(n, s, bytes(b)) for n, s, b in read_fasta_blocks(tmp_path / name, 1000)]

    assert blocks("bom.fa", b"\xef\xbb\xbf>r1\nACGTACGTAC\n") == [("r1", 0, b"ACGTACGTAC")]
    names = [n for n, _, _ in blocks("utf.fa", ">α_chr\nACGT\n>β_chr\nACGT\n".encode())]
    assert names == ["α_chr", "β_chr"]
    with pytest.raises(InputError, match="UTF-16 text"):
        blocks("u16.fa", ">r1\nACGT\n".encode("utf-16"))
    with pytest.raises(InputError, match="has no sequence \\(its lines end in CR alone"):
        blocks("cr.fa", b">r1\rACGTACGT\rACGT\r")
