"""The token store: ragged and fixed-length records, memory-mapped reading, checksums."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from biomask.errors import InputError, IntegrityError
from biomask.store import TokenStore, TokenStoreWriter


def build(tmp_path, lengths, shard_tokens=50, fields=None):
    rng = np.random.default_rng(0)
    writer = TokenStoreWriter(
        tmp_path / "store",
        token_fields={"tokens": np.uint16, "values": np.float32},
        record_fields={"labels": np.int64},
        meta_columns=["id"],
        shard_tokens=shard_tokens,
    )
    records = []
    for i, n in enumerate(lengths):
        tokens = rng.integers(5, 1000, n)
        values = rng.random(n).astype(np.float32)
        records.append((tokens, values, i % 3))
        writer.split("train").add(tokens=tokens, values=values, labels=i % 3, meta={"id": f"r{i}"})
    writer.finish(modality="test")
    return TokenStore(tmp_path / "store"), records


def test_random_access_and_streaming_agree(tmp_path):
    lengths = [3, 0, 17, 40, 1, 25, 25, 9]
    store, records = build(tmp_path, lengths)
    split = store.split("train")
    assert len(split) == len(lengths) and split.num_tokens == sum(lengths)
    assert len(split.shards) > 1  # small shards force several files
    for i, (tokens, values, label) in enumerate(records):
        rec = split[i]
        assert rec["tokens"].tolist() == tokens.tolist()
        np.testing.assert_array_equal(rec["values"], values)
        assert rec["labels"] == label
    streamed = [rec["tokens"].tolist() for rec in split]
    assert streamed == [r[0].tolist() for r in records]
    assert split.lengths().tolist() == lengths
    assert split.meta()["id"].tolist() == [f"r{i}" for i in range(len(lengths))]
    assert split.record_field("labels").tolist() == [i % 3 for i in range(len(lengths))]
    assert split[-1]["tokens"].tolist() == records[-1][0].tolist()
    with pytest.raises(IndexError):
        split[len(lengths)]


def test_arrays_are_memory_mapped_not_loaded(tmp_path):
    store, _ = build(tmp_path, [10] * 20, shard_tokens=1000)
    shard = store.split("train").shards[0]
    assert isinstance(shard.array("tokens"), np.memmap)
    assert store.split("train").fixed_length == 10
    matrix = shard.matrix()
    assert matrix.shape == (20, 10) and np.shares_memory(matrix, shard.array("tokens"))


def test_a_split_training_reads_in_no_order_asks_the_kernel_for_no_readahead(tmp_path, monkeypatch):
    """Under a memory cap below the store's size the kernel's readahead around every record a batch
    touched was read, reclaimed and read again (a capped cells run 12x slower). A split training
    reads tells the kernel so (MADV_RANDOM), whether its arrays were opened before or after; a split
    read in order (evaluation, embedding, gene statistics) keeps readahead."""
    from biomask import store as store_module

    advised = []
    real = store_module._random_access
    monkeypatch.setattr(store_module, "_random_access", lambda arr: (advised.append(arr), real(arr)))
    store, records = build(tmp_path, [30] * 10, shard_tokens=100)
    in_order = store.split("train")
    assert [r["tokens"].tolist() for r in in_order] == [r[0].tolist() for r in records] and advised == []
    split = store.split("train")
    split[0]  # opened before it is told
    assert split.read_randomly() is split and len(advised) == 4  # shard 0: offsets, tokens, values, labels
    assert split[9]["tokens"].tolist() == records[9][0].tolist()  # a later shard: advised as it opens
    last = split.shards[-1]
    assert last is not split.shards[0] and any(a is last.array("tokens") for a in advised)
    assert all(isinstance(a, np.memmap) for a in advised)


def test_one_flipped_byte_is_caught(tmp_path):
    store, _ = build(tmp_path, [30, 30, 30])
    assert store.verify() > 0
    shard_file = next((tmp_path / "store" / "train").glob("shard-00000.tokens.npy"))
    data = bytearray(shard_file.read_bytes())
    data[-5] ^= 0x01
    shard_file.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="shard-00000.tokens.npy"):
        TokenStore(tmp_path / "store").verify()


def test_truncated_or_missing_files_are_caught_on_open(tmp_path):
    build(tmp_path, [30, 30])
    shard_file = next((tmp_path / "store" / "train").glob("*.tokens.npy"))
    shard_file.write_bytes(shard_file.read_bytes()[:-10])
    with pytest.raises(IntegrityError, match="truncated"):
        TokenStore(tmp_path / "store")
    shard_file.unlink()
    with pytest.raises(IntegrityError, match="missing"):
        TokenStore(tmp_path / "store")


def test_not_a_store(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        TokenStore(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no manifest.json"):
        TokenStore(tmp_path / "empty")
    store, _ = build(tmp_path, [4])
    with pytest.raises(InputError, match="no split 'test'"):
        store.split("test")
    with pytest.raises(InputError, match=f"a token store is a folder .*: give {tmp_path / 'store'}$"):
        TokenStore(tmp_path / "store" / "manifest.json")


def test_a_manifest_of_the_wrong_shape_is_an_integrity_error_not_a_crash(tmp_path):
    import json

    build(tmp_path, [4])
    manifest = tmp_path / "store" / "manifest.json"
    good = json.loads(manifest.read_text())
    for damaged in ([], {**good, "splits": None}, {k: v for k, v in good.items() if k != "splits"}):
        manifest.write_text(json.dumps(damaged))
        with pytest.raises(InputError, match="manifest|--overwrite"):
            TokenStore(tmp_path / "store")


def test_a_damaged_store_is_not_reused_by_rerunning_its_prep(tmp_path, cli, repo):
    """The message says to re-run prep: the same command must not then reuse the store as it is."""
    out = tmp_path / "splice"
    args = ("prep", "dna", "-c", repo / "configs/dna/splice.yaml", f"output={out}", "tokenizer.kind=char")
    assert cli(*args)[0] == 0
    next((out / "test").glob("shard-*.tokens.npy")).unlink()
    code, _, err = cli(*args)
    assert code == 2 and "shard-00000.tokens.npy changed or went missing since biomask wrote it" in err, err
    assert "--overwrite" in err
    assert cli(*args, "--overwrite")[0] == 0 and TokenStore(out).verify() > 0


def test_batch_and_single_appends_give_the_same_store(tmp_path):
    lengths = np.array([2, 5, 3])
    tokens = np.arange(10, dtype=np.uint16) + 5
    a = TokenStoreWriter(tmp_path / "a", token_fields={"tokens": np.uint16})
    a.split("train").add_batch(lengths, tokens=tokens, meta=pd.DataFrame({"id": ["x", "y", "z"]}))
    a.finish()
    b = TokenStoreWriter(tmp_path / "b", token_fields={"tokens": np.uint16})
    for rid, chunk in zip("xyz", np.split(tokens, np.cumsum(lengths)[:-1])):
        b.split("train").add(tokens=chunk, meta={"id": rid})
    b.finish()
    sa, sb = TokenStore(tmp_path / "a"), TokenStore(tmp_path / "b")
    shard_a, shard_b = (
        sa.manifest["splits"]["train"]["shards"][0],
        sb.manifest["splits"]["train"]["shards"][0],
    )
    assert shard_a["files"]["tokens"]["sha256"] == shard_b["files"]["tokens"]["sha256"]
    assert shard_a["files"]["offsets"]["sha256"] == shard_b["files"]["offsets"]["sha256"]


def test_class_order_is_numeric_for_integer_ids_and_stable():
    from biomask.store import label_order

    assert label_order({"10", "2", "1"}) == ["1", "2", "10"]
    assert label_order({"007", "7", "1"}) == ["1", "007", "7"]  # ties broken by text, whatever the hash seed
    assert label_order({"b", "A", "10"}) == ["10", "A", "b"]


def test_a_stores_tokenizer_is_checked_and_a_bare_one_is_left_alone(tmp_path, splice_store):
    import json
    import shutil

    from biomask.store import check_store_tokenizer

    store = shutil.copytree(splice_store, tmp_path / "splice")
    recorded = json.loads((store / "manifest.json").read_text())["tokenizer"]
    assert set(recorded["files"]) == {p.name for p in (store / "tokenizer").iterdir()}
    assert check_store_tokenizer(store / "tokenizer") == len(recorded["files"]) == 2  # .json, _config.json
    (store / "tokenizer" / "tokenizer.json").unlink()  # removed, not only changed: still caught
    with pytest.raises(IntegrityError, match="tokenizer.json was modified or removed"):
        TokenStore(store).verify()
    # a tokenizer folder beside someone else's manifest.json is not a store's: nothing to check
    bare = shutil.copytree(splice_store / "tokenizer", tmp_path / "mine" / "tokenizer")
    for text in ("[1, 2]", '{"tokenizer": "bpe"}', "not json"):
        (tmp_path / "mine" / "manifest.json").write_text(text)
        assert check_store_tokenizer(bare) == 0


def test_a_store_reads_as_developers_md_lays_it_out_without_biomask(splice_store):
    """A downstream tool (a Rust or Julia loader, a colleague's script) reads a store from the layout
    DEVELOPERS.md gives — manifest, per-split shards, int64 offsets local to a shard, labels as
    indices into label_names, meta rows, files by their sha256 — with numpy, json and gzip alone. The
    layout had been written down only in a docstring the docs never pointed at."""
    import gzip
    import hashlib
    import itertools
    import json

    from tokenizers import Tokenizer

    manifest = json.loads((splice_store / "manifest.json").read_text(encoding="utf-8"))
    assert (manifest["format"], manifest["version"]) == ("biomask-token-store", 1)
    vocab = Tokenizer.from_file(str(splice_store / manifest["tokenizer"]["dir"] / "tokenizer.json"))
    ours = TokenStore(splice_store)
    for split, info in manifest["splits"].items():
        records, labels, ids = [], [], []
        for shard in info["shards"]:
            files = shard["files"]
            for entry in files.values():
                data = (splice_store / split / entry["name"]).read_bytes()
                assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["bytes"]
            offsets = np.load(splice_store / split / files["offsets"]["name"])
            tokens = np.load(splice_store / split / files["tokens"]["name"])
            assert offsets.dtype == np.int64 and offsets[0] == 0 and offsets[-1] == tokens.size
            records += [tokens[a:b] for a, b in itertools.pairwise(offsets)]
            labels += list(np.load(splice_store / split / files["labels"]["name"]))
            with gzip.open(splice_store / split / files["meta"]["name"], "rt", encoding="utf-8") as meta:
                ids += list(pd.read_csv(meta)["id"])
        assert len(records) == info["num_records"] == len(ours.split(split))
        for i in (0, len(records) - 1):
            record = ours.split(split)[i]
            assert np.array_equal(records[i], record["tokens"]) and labels[i] == record["labels"]
            bases = vocab.decode(records[i].tolist()).replace(" ", "")
            assert len(bases) == info["fixed_length"] and set(bases) <= set("ACGTN")
        assert {manifest["label_names"][j] for j in labels} <= set(manifest["label_names"])
        assert len(set(ids)) == len(ids)
