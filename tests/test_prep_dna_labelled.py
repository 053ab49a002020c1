"""`biomask prep dna` on labelled tables: streamed in two passes (biomask/dna/labelled.py).

No network: the tables are generated here.
"""

from __future__ import annotations

import collections
import csv
import tracemalloc

import numpy as np
import pytest

from biomask.dna.config import DNAPrepConfig
from biomask.dna.prep import prep_dna
from biomask.dna.tokenizers import load_tokenizer
from biomask.store import TokenStore
from tests.conftest import REPO, leftovers

LABELS = ("enhancer", "promoter", "silencer")


def _table(path, rows: int, length: int = 200, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    bases = np.frombuffer(b"ACGT", dtype=np.uint8)[rng.integers(0, 4, size=(rows, length))]
    labels = rng.integers(0, len(LABELS), size=rows)
    lines = [b"%s,%s\n" % (bases[i].tobytes(), LABELS[labels[i]].encode()) for i in range(rows)]
    path.write_bytes(b"sequence,label\n" + b"".join(lines))


def _prep(table, out, **settings) -> None:
    cfg = {"inputs": [{"path": str(table)}], "output": str(out), **settings}
    prep_dna(DNAPrepConfig.model_validate(cfg))


def _traced_peak(table, out) -> int:
    tracemalloc.start()
    try:
        _prep(table, out, shard_tokens=1 << 16)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_labelled_table_costs_a_compact_record_per_row(tmp_path):
    """Rows are not held: pass 1 keeps a few numbers and a digest per row and spills the bases, so the
    stage's memory grows by far less than a row's own size. Holding every row (sequence, label, id,
    source and line as Python objects, and the cleaned text) cost ~1 kB per 200-base row here."""
    small, large = tmp_path / "small.csv", tmp_path / "large.csv"
    _table(small, 2_000, seed=1)
    _table(large, 20_000, seed=2)
    _prep(small, tmp_path / "warm")  # imports and first-call caches are not the stage's per-row cost
    peaks = {n: _traced_peak(path, tmp_path / f"out-{n}") for n, path in ((2_000, small), (20_000, large))}
    per_row = (peaks[20_000] - peaks[2_000]) / 18_000
    assert per_row < 500, f"{per_row:.0f} bytes per 200-base row ({peaks})"


def _reference(
    path, seed: int, val: float, test: float
) -> tuple[dict[str, list[tuple]], collections.Counter]:
    """What the stage must write, computed the plain way, every row in memory: rows with > 10 % N
    dropped, exact duplicates dropped but the first, sequences seen under two labels dropped whole,
    then per label (in name order) a seeded permutation: test first, then val."""
    with open(path, newline="") as handle:
        rows = [(r["sequence"].upper(), r["label"], i) for i, r in enumerate(csv.DictReader(handle), start=2)]
    counts = collections.Counter(rows_read=len(rows))
    clean = []
    for seq, label, line in rows:
        if seq.count("N") / len(seq) > 0.1:
            counts["dropped_ambiguous"] += 1
        else:
            clean.append((seq, label, line))
    groups: dict[str, list[int]] = collections.defaultdict(list)
    for i, (seq, _, _) in enumerate(clean):
        groups[seq].append(i)
    survivors = []
    for members in groups.values():
        if len({clean[i][1] for i in members}) > 1:
            counts["dropped_conflicting_labels"] += len(members)
        else:
            counts["dropped_duplicate"] += len(members) - 1
            survivors.append(members[0])
    kept = [clean[i] for i in sorted(survivors)]
    rng = np.random.default_rng(seed)
    split = ["train"] * len(kept)
    for label in sorted({row[1] for row in kept}):
        members = np.array([i for i, row in enumerate(kept) if row[1] == label])[rng.permutation(
            sum(row[1] == label for row in kept))]  # fmt: skip
        n_test, n_val = round(len(members) * test), round(len(members) * val)
        for i in members[:n_test]:
            split[i] = "test"
        for i in members[n_test : n_test + n_val]:
            split[i] = "val"
    counts["kept"] = len(kept)
    return {s: [row for row, t in zip(kept, split) if t == s] for s in ("train", "val", "test")}, counts


def _records(root) -> dict[str, list[tuple]]:
    store, tok = TokenStore(root), load_tokenizer(root)
    found = {}
    for split in store.splits:
        part = store.split(split)
        meta = part.meta()
        labels = [store.label_names[y] for y in part.record_field("labels")]
        assert meta["label"].tolist() == labels and set(meta["source"]) <= {"t.csv"}
        assert meta["id"].tolist() == [f"t.csv:{line}" for line in meta["line"]]
        found[split] = [(tok.decode(r["tokens"]), y, line) for r, y, line in zip(part, labels, meta["line"])]
    return found


def test_duplicates_conflicts_and_ns_give_the_plainly_computed_store_in_any_shard_size(tmp_path, monkeypatch):
    """Deciding duplicates, conflicting labels and the split from digests and row numbers, then
    reading the rows back from the spill (and encoding them in slices), writes what holding every row
    would: the same records in the same order and split, whatever the shard size, and the same counts."""
    rng = np.random.default_rng(5)
    seqs = ["".join(rng.choice(list("ACGT"), 40)) for _ in range(300)]
    rows = [(s, LABELS[i % 3]) for i, s in enumerate(seqs)]
    rows += [(seqs[3], LABELS[0]), (seqs[3].lower(), LABELS[0])]  # duplicates (one soft-masked) of row 4
    rows += [(seqs[7], LABELS[2]), (seqs[7], LABELS[1])]  # row 8 under two more labels: all three dropped
    rows += [("N" + seqs[20][1:], LABELS[1]), ("NNNNNACGT" * 4, LABELS[2])]  # 2.5 % N: kept; 56 %: dropped
    rows.insert(0, (seqs[10], LABELS[0]))  # the first row has a later duplicate
    order = rng.permutation(len(rows) - 1) + 1
    rows = [rows[0]] + [rows[i] for i in order]
    table = tmp_path / "t.csv"
    table.write_text("sequence,label\n" + "".join(f"{s},{y}\n" for s, y in rows))

    expected, counts = _reference(table, seed=3, val=0.2, test=0.2)
    split = {"seed": 3, "val": 0.2, "test": 0.2}
    _prep(table, tmp_path / "one", split=split)
    monkeypatch.setattr("biomask.dna.prep._ENCODE_SLICE", 100)
    _prep(table, tmp_path / "many", split=split, shard_tokens=200)
    assert any("N" in seq for seqs in expected.values() for seq, _, _ in seqs)
    for out in ("one", "many"):
        store = TokenStore(tmp_path / out)
        assert _records(tmp_path / out) == expected
        assert store.manifest["stats"] == dict(counts) and list(store.manifest["stats"]) == list(counts)
        assert not any(p.name.endswith(".spill") for p in (tmp_path / out).rglob("*"))
    assert len(TokenStore(tmp_path / "many").split("train").shards) > 10
    assert len(TokenStore(tmp_path / "one").split("train").shards) == 1
    assert leftovers(tmp_path) == []


def test_a_readers_error_wins_over_an_earlier_refused_letter(tmp_path, cli):
    """The first pass cleans as it reads; a refused letter is reported after the reading, so a damaged
    row later in the file is what is named, as when every row was read before any was cleaned."""
    table = tmp_path / "set.csv"
    table.write_text("sequence,label\nAC1T,a\nACGT,b\nACGT\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"inputs:\n  - path: {table}\noutput: {tmp_path / 'out'}\n")
    code, _, err = cli("prep", "dna", "-c", cfg)
    assert code == 2 and "set.csv, line 4: 1 field, the header has 2" in err
    table.write_text("sequence,label\nAC1T,a\nACGT,b\n")
    code, _, err = cli("prep", "dna", "-c", cfg)
    assert code == 2 and "set.csv, line 2: letter '1' at position 3" in err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_a_label_written_as_a_missing_value_is_refused_not_made_a_class(tmp_path, cli):
    """R's write.csv writes a missing label as NA, pandas' to_csv as an empty field or NaN: NA and nan
    became classes of their own (cells prep treats them as missing, as an empty DNA label is)."""
    table = tmp_path / "set.csv"
    table.write_text("sequence,label\nACGTACGT,a\nACGTTTGT,NA\nACGTAAGT,b\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"inputs:\n  - path: {table}\noutput: {tmp_path / 'out'}\n")
    code, _, err = cli("prep", "dna", "-c", cfg)
    assert code == 2 and "set.csv, line 3: label 'NA' in column 'label' is how R and pandas" in err, err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_a_table_that_is_not_utf8_is_refused_not_read_garbled(tmp_path, cli):
    """Excel's 'CSV (Comma delimited)' on Windows writes cp1252: its bytes were read as U+FFFD, so
    `exón` and `exòn` became one class stored as `ex\ufffdn`, without a word. A UTF-16 table
    (Excel's 'Unicode Text', PowerShell's '>') was refused as lacking a column of garbled letters."""
    table = tmp_path / "set.csv"
    rows = "".join(
        f"{format(i, '08b').translate(str.maketrans('01', 'AC'))}GT,{['exón', 'exòn', 'intron'][i % 3]}\n"
        for i in range(12)
    )
    table.write_bytes(("sequence,label\n" + rows).encode("cp1252"))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"inputs:\n  - path: {table}\noutput: {tmp_path / 'out'}\n")
    code, _, err = cli("prep", "dna", "-c", cfg)
    assert (
        code == 2 and "set.csv, line 2: column 'label'" in err and "not UTF-8" in err and "CSV UTF-8" in err
    ), err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    table.write_bytes(("sequence,label\n" + rows).encode("utf-8"))  # saved as UTF-8: three classes
    code, _, err = cli("prep", "dna", "-c", cfg)
    assert code == 0, err
    assert sorted(TokenStore(tmp_path / "out").label_names) == ["exòn", "exón", "intron"]
    wide = tmp_path / "wide.txt"
    wide.write_bytes(("sequence\tlabel\r\n" + rows.replace(",", "\t")).encode("utf-16"))
    cfg.write_text(f"inputs:\n  - path: {wide}\n    format: table\noutput: {tmp_path / 'out2'}\n")
    code, _, err = cli("prep", "dna", "-c", cfg)
    assert code == 2 and "UTF-16" in err and "save it as UTF-8" in err, err
    wide.write_bytes(("sequence\tlabel\r\n" + rows.replace(",", "\t")).encode("utf-16-le"))  # no BOM
    code, _, err = cli("prep", "dna", "-c", cfg)
    assert code == 2 and "UTF-16" in err, err
    # the split and id columns too, and a header that is not UTF-8
    split = tmp_path / "split.csv"
    ascii_rows = rows.replace("exón", "exon").replace("exòn", "exon2")
    split.write_bytes(("sequence,label,split\n" + ascii_rows.replace("\n", ",tést\n")).encode("cp1252"))
    cfg.write_text(f"inputs:\n  - path: {split}\n    split_column: split\noutput: {tmp_path / 'out3'}\n")
    code, _, err = cli("prep", "dna", "-c", cfg)
    assert code == 2 and "line 2: column 'split'" in err and "not UTF-8" in err, err
    header = tmp_path / "header.csv"
    header.write_bytes(("séquence,label\n" + rows).encode("cp1252"))
    cfg.write_text(f"inputs:\n  - path: {header}\noutput: {tmp_path / 'out4'}\n")
    code, _, err = cli("prep", "dna", "-c", cfg)
    assert code == 2 and "not UTF-8" in err, err
    # a U+FFFD the UTF-8 file itself holds is text like any other, not an encoding error
    valid = tmp_path / "valid.csv"
    valid.write_text("sequence,label\n" + rows.replace("exón", "ex\ufffdn"), encoding="utf-8")
    cfg.write_text(f"inputs:\n  - path: {valid}\noutput: {tmp_path / 'out5'}\n")
    code, _, err = cli("prep", "dna", "-c", cfg)
    assert code == 0 and "ex\ufffdn" in TokenStore(tmp_path / "out5").label_names, err
    # embed reads tables with the same check
    from biomask.dna.cleaning import Cleaner
    from biomask.embedding.dna import read_sequence_table
    from biomask.errors import InputError

    table.write_bytes(("sequence,label\n" + rows).encode("cp1252"))
    chunks = read_sequence_table(
        table,
        load_tokenizer(tmp_path / "out"),
        Cleaner(),
        sequence_column="sequence",
        label_column="label",
        id_column=None,
        chunk_size=100,
    )
    with pytest.raises(InputError, match="column 'label' holds .* not UTF-8"):
        list(chunks)
    # FASTA: a record name that is not UTF-8 is said once (names are not results; the bases are read)
    fasta = tmp_path / "g.fa"
    fasta.write_bytes(b">ex\xf3n_1\n" + b"ACGT" * 300 + b"\n>ex\xe9n_2\n" + b"ACGT" * 300 + b"\n")
    import logging

    from biomask.dna.readers import log, read_fasta_blocks

    said = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    log.addHandler(handler)
    try:
        assert [name for name, _, _ in read_fasta_blocks(fasta, block_size=1 << 20)] == [
            "ex\ufffdn_1",
            "ex\ufffdn_2",
        ]
    finally:
        log.removeHandler(handler)
    assert len(said) == 1 and "holds bytes that are not UTF-8" in said[0]


def test_one_number_written_several_ways_is_refused_not_made_several_classes(tmp_path, cli):
    """Tables joined from files of different tools write a class `1` as `1.0` or `01`: as text they
    were three classes, and every classifier was scored against a split of one."""
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    first.write_text("sequence,label\nACGTACGT,0\nACGTTTGT,1\n")
    second.write_text("sequence,label\nACGTAAGT,0\nACGGAAGT,1.0\nACGGAAGA,01\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"inputs:\n  - path: {first}\n  - path: {second}\noutput: {tmp_path / 'out'}\n")
    code, _, err = cli("prep", "dna", "-c", cfg)
    assert code == 2 and "writes one number in several ways: '01' (" in err, err
    assert f"'1' ({first}:3)" in err and f"'1.0' ({second}:3)" in err and "b.csv:4" in err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    # 1 and 10 stay apart; `1_0` is a name, not ten; 17-digit ids that one float would merge are two
    second.write_text(
        "sequence,label\nACGTAAGT,0\nACGGAAGT,1\nACGGAAGA,10\nACGGTAGA,1_0\n"
        "ACTGTAGA,12345678901234567\nACTGTAGC,12345678901234568\n"
    )
    code, _, err = cli("prep", "dna", "-c", cfg)
    assert code == 0, err
    assert len(TokenStore(tmp_path / "out").label_names) == 6


def test_the_same_data_prepared_elsewhere_has_the_same_content_digest(tmp_path, cli):
    """The manifest holds the output path, the inputs' paths and the code version, so its own sha256
    (what reuse compares) differs between two machines' preps of one table; `content_sha256`, which
    `store info` prints and every stage records beside it, is the data's and does not."""
    import json

    from biomask.provenance import input_entry

    rows = "sequence,label\n" + "".join(
        f"{'ACGT'[i % 4] * 3}TTGCA{'ACGT'[i // 4 % 4] * 2},{i % 2}\n" for i in range(40)
    )
    digests = []
    for place in ("here", "there"):
        (tmp_path / place).mkdir()
        table = tmp_path / place / "set.csv"
        table.write_text(rows)
        out = tmp_path / place / "store"
        code, _, err = cli("prep", "dna", "-c", REPO / "configs/dna/splice.yaml", f"inputs=[{{path: {table}}}]",
                           f"output={out}", "tokenizer.kind=char")  # fmt: skip
        assert code == 0, err
        code, shown, _ = cli("store", "info", str(out))
        info = json.loads(shown)
        entry = input_entry("store", out)
        assert entry["content_sha256"] == info["content_sha256"]
        digests.append((entry["sha256"], entry["content_sha256"]))
    assert digests[0][0] != digests[1][0] and digests[0][1] == digests[1][1]
    rows = rows.replace("TTGCA", "TTGCC", 1)  # one base of one record: other data
    (tmp_path / "there" / "set.csv").write_text(rows)
    code, _, err = cli("prep", "dna", "-c", REPO / "configs/dna/splice.yaml",
                       f"inputs=[{{path: {tmp_path / 'there' / 'set.csv'}}}]", f"output={tmp_path / 'there' / 'store'}",
                       "tokenizer.kind=char", "--overwrite")  # fmt: skip
    assert code == 0, err
    assert input_entry("store", tmp_path / "there" / "store")["content_sha256"] != digests[0][1]


def test_labels_are_read_under_pandas_copy_on_write():
    """pandas 3 makes copy-on-write the default, and its arrays read-only: the labels' missing-value
    mask was updated in place, and every prep with labels failed ("output array is read-only")."""
    import pandas as pd

    from biomask.store import label_strings

    with pd.option_context("mode.copy_on_write", True):
        strings, missing = label_strings(pd.Series(["B", None, "NA", "T", 3.0], dtype=object))
    assert list(strings) == ["B", "", "NA", "T", "3.0"] and list(missing) == [False, True, True, False, False]
