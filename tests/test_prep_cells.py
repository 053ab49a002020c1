"""`biomask prep cells`: tokenization schemes checked by hand, then the stage on real registry data
(pbmc3k raw counts, pbmc68k_reduced, the scvelo pancreas subset) and its behaviour on bad input."""

from __future__ import annotations

import gzip
import json
import re
import shutil

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp
import yaml

from biomask import datasets
from biomask.cells.config import CountsConfig, HVGConfig
from biomask.cells.counts import CountConverter, detect
from biomask.cells.genes import ColumnMap, GeneSpace, GeneVocabulary, gene_names, remap_columns
from biomask.cells.qc import select_hvg
from biomask.cells.readers import open_matrix
from biomask.cells.tokenize import BinnedScheme, PanelScheme, RankScheme
from biomask.store import TokenStore
from tests.conftest import leftovers

CFG_3K = "configs/cells/pbmc3k.yaml"
CFG_68K = "configs/cells/pbmc68k_reduced.yaml"


def csr(rows: list[list[tuple[int, int]]], n_cols: int = 20) -> sp.csr_matrix:
    """A tiny counts matrix from [(token id, count), ...] per cell."""
    data, indices, indptr = [], [], [0]
    for row in rows:
        for token, count in sorted(row):
            indices.append(token)
            data.append(count)
        indptr.append(len(indices))
    return sp.csr_matrix(
        (np.array(data, np.float32), np.array(indices), np.array(indptr)), shape=(len(rows), n_cols)
    )


def records(encoded) -> list[dict[str, list]]:
    out, start = [], 0
    for n in encoded.lengths:
        stop = start + n
        rec = {"tokens": encoded.tokens[start:stop].tolist(), "values": encoded.values[start:stop].tolist()}
        if encoded.bins is not None:
            rec["bins"] = encoded.bins[start:stop].tolist()
        out.append(rec)
        start = stop
    return out


# ------------------------------------------------------------------------------------------ schemes by hand


def test_binned_scheme_by_hand():
    # cell 0: counts 1, 3, 1, 2 (library 7). F(1) = 2/4, F(2) = 3/4, F(3) = 4/4 -> with 4 bins: 2, 3, 4.
    # cell 1: one gene -> the top bin. cell 2: counts above the table size (64) take the sorted path:
    # 100, 1, 70, 100 -> F = 4/4, 1/4, 2/4, 4/4 -> bins 4, 1, 2, 4 (ties share a bin).
    block = csr([[(5, 1), (7, 3), (9, 1), (12, 2)], [(6, 4)], [(5, 100), (8, 1), (10, 70), (11, 100)]])
    scale = np.array([1e4 / 7, 1e4 / 4, 1e4 / 271], dtype=np.float32)
    got = records(BinnedScheme(n_bins=4, max_length=10).encode(block, scale, np.arange(3)))
    assert [r["tokens"] for r in got] == [[5, 7, 9, 12], [6], [5, 8, 10, 11]]
    assert [r["bins"] for r in got] == [[2, 4, 2, 3], [4], [4, 1, 2, 4]]
    expected = np.log1p(np.array([1, 3, 1, 2]) * 1e4 / 7)
    np.testing.assert_allclose(got[0]["values"], expected, rtol=1e-6)
    np.testing.assert_allclose(got[2]["values"], np.log1p(np.array([100, 1, 70, 100]) * 1e4 / 271), rtol=1e-6)


def test_binned_truncation_keeps_top_expressed_or_a_seeded_sample():
    # counts 2, 2, 2, 1, 5 -> top 3: the 5 (token 9) and two of the three 2s, ties to the lower token ids
    # (5, 6); the record stays in token order, bins are those of the whole cell (computed before truncation)
    block = csr([[(5, 2), (6, 2), (7, 2), (8, 1), (9, 5)]])
    scale = np.array([1e4 / 12], dtype=np.float32)
    top = records(BinnedScheme(n_bins=5, max_length=3).encode(block, scale, np.array([0])))[0]
    assert top["tokens"] == [5, 6, 9]
    assert top["bins"] == [4, 4, 5]  # F(2) = 4/5 -> ceil(4) = 4; F(5) = 1 -> 5
    # the table path (small counts) and the sorting path (a count >= 64 forces it) choose alike
    big = csr([[(5, 2), (6, 2), (7, 2), (8, 1), (9, 500)]])
    assert records(BinnedScheme(5, 3).encode(big, scale, np.array([0])))[0]["tokens"] == [5, 6, 9]
    # a seeded sample: max_length genes of the cell, the same whatever block the cell is read in
    scheme = BinnedScheme(n_bins=5, max_length=3, truncate="sample", seed=7)
    wide = csr([[(t, 1 + t % 3) for t in range(5, 15)], [(t, 1) for t in range(5, 10)]])
    both = records(scheme.encode(wide, np.ones(2, np.float32), np.array([41, 42])))
    alone = records(scheme.encode(wide[:1], np.ones(1, np.float32), np.array([41])))
    assert both[0]["tokens"] == alone[0]["tokens"] and len(alone[0]["tokens"]) == 3
    assert set(alone[0]["tokens"]) <= set(range(5, 15)) and alone[0]["tokens"] == sorted(alone[0]["tokens"])
    other_seed = records(
        BinnedScheme(5, 3, "sample", seed=8).encode(wide[:1], np.ones(1, np.float32), np.array([41]))
    )
    other_cell = records(scheme.encode(wide[:1], np.ones(1, np.float32), np.array([40])))
    assert alone[0]["tokens"] != other_seed[0]["tokens"] or alone[0]["tokens"] != other_cell[0]["tokens"]


def test_rank_scheme_by_hand():
    # medians by token id (ids 0-4 are specials): token 5 -> 2.0, 6 -> 0.5, 7 -> 1.0, 8 -> 4.0
    medians = np.array([1, 1, 1, 1, 1, 2.0, 0.5, 1.0, 4.0], dtype=np.float32)
    # counts 4, 1, 2, 4 with scale 0.5: normalised 2, 0.5, 1, 2 -> / median: 1, 1, 1, 0.5
    block = csr([[(5, 4), (6, 1), (7, 2), (8, 4)]], n_cols=9)
    got = records(
        RankScheme(medians, max_length=10).encode(block, np.array([0.5], np.float32), np.array([0]))
    )
    assert got[0]["tokens"] == [5, 6, 7, 8]  # three-way tie at 1.0 broken by token id, then 0.5
    np.testing.assert_allclose(got[0]["values"], [1.0, 1.0, 1.0, 0.5])
    block = csr([[(5, 1), (6, 3), (7, 8), (8, 4)]], n_cols=9)  # / median: 0.5 6 8 1 -> order 7, 6, 8, 5
    got = records(RankScheme(medians, max_length=2).encode(block, np.array([1.0], np.float32), np.array([0])))
    assert got[0]["tokens"] == [7, 6] and got[0]["values"] == [8.0, 6.0]


def test_panel_scheme_by_hand():
    block = csr([[(6, 3), (8, 1)], [(5, 2)]], n_cols=9)
    got = records(PanelScheme(vocab_size=9).encode(block, np.array([1.0, 0.5], np.float32), np.arange(2)))
    assert [r["tokens"] for r in got] == [[5, 6, 7, 8], [5, 6, 7, 8]]  # every panel gene, in id order
    np.testing.assert_allclose(got[0]["values"], [0, np.log1p(3), 0, np.log1p(1)], rtol=1e-6)
    np.testing.assert_allclose(got[1]["values"], [np.log1p(1), 0, 0, 0], rtol=1e-6)
    # an input that lacks gene 7: its records leave it out (unmeasured is not unexpressed)
    scheme = PanelScheme(vocab_size=9).for_input(np.array([5, 6, -1, 8]))
    got = records(scheme.encode(block, np.array([1.0, 0.5], np.float32), np.arange(2)))
    assert [r["tokens"] for r in got] == [[5, 6, 8], [5, 6, 8]]
    np.testing.assert_allclose(got[0]["values"], [0, np.log1p(3), np.log1p(1)], rtol=1e-6)


# ------------------------------------------------------------------------------------------ real data


def prep(cli, config, *overrides):
    return cli("prep", "cells", "-c", config, *overrides)


@pytest.fixture(scope="session")
def pbmc3k_store(tmp_path_factory, repo):
    from biomask.cells.config import CellsPrepConfig
    from biomask.cells.prep import prep_cells
    from biomask.config import load_config

    out = tmp_path_factory.mktemp("cells") / "pbmc3k"
    return prep_cells(load_config(CellsPrepConfig, repo / CFG_3K, [f"output={out}"]))


@pytest.fixture(scope="session")
def pbmc68k_store(tmp_path_factory, repo, pbmc3k_store):
    from biomask.cells.config import CellsPrepConfig
    from biomask.cells.prep import prep_cells
    from biomask.config import load_config

    out = tmp_path_factory.mktemp("cells") / "pbmc68k"
    overrides = [f"output={out}", f"tokenizer.path={pbmc3k_store}"]
    return prep_cells(load_config(CellsPrepConfig, repo / CFG_68K, overrides))


@pytest.fixture(scope="session")
def pbmc3k():
    import anndata

    return anndata.read_h5ad(datasets.fetch("pbmc3k"))


pytestmark = [
    pytest.mark.network,
    pytest.mark.filterwarnings(
        "ignore::anndata.OldFormatWarning",
        "ignore::FutureWarning:anndata",
        "ignore:Variable names are not unique",
    ),
]


def test_a_panel_has_exactly_the_genes_asked_for_when_dispersions_tie():
    # scanpy keeps every gene tied with the last one's dispersion (a duplicated gene, or the genes alone
    # in their mean bin, which all get the same normalised dispersion): n_top_genes=2000 gave 2,001.
    rng = np.random.default_rng(0)
    counts = np.round(rng.negative_binomial(2, 0.3, size=(300, 40)) * rng.uniform(0.2, 3, size=40))
    counts = np.concatenate([counts, counts[:, [7]]], axis=1)
    matrix = sp.csr_matrix(counts.astype(np.float32))
    scale = 1e4 / counts.sum(axis=1)
    for n in range(1, counts.shape[1]):
        chosen = select_hvg(matrix, scale, HVGConfig(n_top_genes=n))
        assert chosen.sum() == n, n
        assert chosen[7] or not chosen[40], "of two tied genes the first in the vocabulary is kept"
    ranked = [select_hvg(matrix, scale, HVGConfig(n_top_genes=n)) for n in (10, 20)]
    assert (ranked[0] <= ranked[1]).all(), "a smaller panel is the top of a larger one"


def test_running_out_of_memory_in_hvg_selection_names_the_setting_that_sets_it(monkeypatch, tmp_path, cli):
    """Under a memory cap the panel prep died in a numpy traceback ("Unable to allocate 117. MiB") at
    HVG selection, its peak; and any other MemoryError of a stage was a traceback too."""
    import scanpy as sc

    from biomask.errors import BiomaskError

    def short_of_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate 117. MiB for an array with shape (30686516,)")

    monkeypatch.setattr(sc.pp, "highly_variable_genes", short_of_memory)
    matrix = sp.csr_matrix(np.ones((20, 30), dtype=np.float32))
    with pytest.raises(
        BiomaskError, match=r"out of memory selecting the 10 most variable genes .* lower hvg.max_cells"
    ):
        select_hvg(matrix, np.ones(20), HVGConfig(n_top_genes=10))
    monkeypatch.setattr("biomask.dna.prep.resolve_inputs", short_of_memory)
    code, _, err = cli("prep", "dna", "-c", "configs/dna/ce2-chrX.yaml", f"output={tmp_path / 'out'}")
    assert code == 1 and err.startswith("biomask: error: out of memory (Unable to allocate 117. MiB"), err
    # the settings this command takes, not every command's
    assert "Traceback" not in err and "lower what sets it: shard_tokens" in err and "micro_batch" not in err

    def torch_short_of_memory(*args, **kwargs):  # torch's CPU allocator raises a RuntimeError
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr("biomask.dna.prep.resolve_inputs", torch_short_of_memory)
    code, _, err = cli("prep", "dna", "-c", "configs/dna/ce2-chrX.yaml", f"output={tmp_path / 'out'}")
    assert code == 1 and "out of memory ([enforce fail" in err and "Traceback" not in err, err
    # a command that takes no such setting names none of another command's
    from biomask import cli as cli_module

    monkeypatch.setattr(cli_module, "cmd_report", short_of_memory)
    code, _, err = cli("report", "-c", "configs/report/study.yaml")
    assert code == 1 and err.rstrip().endswith("Give it more memory"), err
    monkeypatch.setattr(cli_module, "cmd_pretrain", short_of_memory)  # a one-word command
    code, _, err = cli("pretrain", "-c", "configs/pretrain/dna-tiny.yaml")
    assert code == 1 and "lower what sets it: train.micro_batch_size" in err, err
    # every entry names a command the parser has (a misspelt one would drop its advice unseen)
    import argparse

    def paths(parser: argparse.ArgumentParser, prefix: str = "") -> set[str]:
        found = set()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    found |= {f"{prefix}{name}"} | paths(sub, f"{prefix}{name} ")
        return found

    assert set(cli_module._MEMORY_SETTINGS) <= paths(cli_module.build_parser())


def test_count_detection_on_the_real_sets():
    cfg = CountsConfig()
    found = {}
    for name, matrix in [
        ("pbmc3k", "X"),
        ("pbmc68k_reduced", "X"),
        ("pbmc68k_reduced", "raw"),
        ("pancreas-100", "layers/spliced"),
    ]:
        source = open_matrix(datasets.fetch(name), "h5ad", matrix)
        try:
            found[(name, matrix)] = detect(source, cfg, block_size=512)
        finally:
            source.close()
    assert found[("pbmc3k", "X")].kind == "integer_floats"
    assert found[("pbmc68k_reduced", "X")].kind == "scaled" and found[("pbmc68k_reduced", "X")].min < 0
    raw = found[("pbmc68k_reduced", "raw")]
    assert raw.kind == "log_normalised" and raw.max < 10 and raw.integral_fraction < 0.1
    assert found[("pancreas-100", "layers/spliced")].kind == "integer_floats"


def test_non_counts_are_refused_with_what_was_found_and_what_to_set(tmp_path, cli, repo, pbmc3k_store):
    out = tmp_path / "out"
    args = [f"output={out}", f"tokenizer.path={pbmc3k_store}"]
    code, _, err = prep(cli, repo / CFG_68K, *args, "inputs=[{dataset: pbmc68k_reduced}]")
    assert code == 2 and "10x_pbmc68k_reduced.h5ad [X]" in err
    assert "scaled values (negative values" in err and "point `matrix` at it" in err and "raw" in err
    code, _, err = prep(cli, repo / CFG_68K, *args, "counts.mode=require", "counts.total_counts_column=null")
    assert (
        code == 2 and "[raw]: expected raw counts, found non-integer values that look log-transformed" in err
    )
    assert "counts.mode: from_log1p" in err and "counts.total_counts_column: n_counts" in err
    assert not out.exists() and leftovers(tmp_path) == []


def test_pbmc68k_counts_are_rebuilt_from_log1p_and_checked():
    import anndata

    path = datasets.fetch("pbmc68k_reduced")
    source = open_matrix(path, "h5ad", "raw")
    try:
        cfg = CountsConfig(mode="from_log1p", total_counts_column="n_counts")
        counts = CountConverter(source, cfg)(0, source.rows(0, source.n_obs))
        raw = anndata.read_h5ad(path).raw.X.toarray()
        n_counts = source.obs["n_counts"].to_numpy()
        rebuilt = counts.toarray()
        assert (
            rebuilt.dtype == np.float32 and np.array_equal(rebuilt, np.rint(rebuilt)) and rebuilt.max() > 50
        )
        assert ((rebuilt > 0) == (raw > 0)).all()  # every stored value became a count >= 1
        # round trip: the counts, normalised the way the file was, give back its values (stored to 3 decimals)
        again = np.log1p(rebuilt / n_counts[:, None] * 1e4)
        assert np.abs(again - raw).max() < 6e-4
        assert (rebuilt.sum(axis=1) < n_counts).all()  # 765 of the genes: part of each cell's total
        # the wrong totals column gives non-integers: refused, naming the cell
        with pytest.raises(
            Exception, match=r"cell 'AAAGCCTGGCTAAC-1' \(row 0\) has the non-integral rebuilt count"
        ):
            wrong = CountsConfig(mode="from_log1p", total_counts_column="n_genes")
            CountConverter(source, wrong)(0, source.rows(0, 10))
    finally:
        source.close()


def test_pbmc3k_store_end_to_end(pbmc3k_store, pbmc3k):
    import scanpy as sc

    store = TokenStore(pbmc3k_store)
    m = store.manifest
    assert store.verify() > 0
    assert m["modality"] == "cells" and m["kind"] == "expression" and m["scheme"] == "binned"
    assert m["n_bins"] == 51 and m["label_names"] is None and m["gene_id_column"] is None
    assert m["token_fields"] == {"tokens": "uint16", "values": "float32", "bins": "uint8"}
    # QC keeps exactly the cells scanpy's tutorial filters keep (min 200 genes, < 2500 genes, < 5 % MT)
    ref = pbmc3k.copy()
    ref.var["mt"] = ref.var_names.str.startswith("MT-")
    sc.pp.calculate_qc_metrics(ref, qc_vars=["mt"], inplace=True, percent_top=None)
    passing = ref.obs_names[
        (ref.obs.n_genes_by_counts >= 200)
        & (ref.obs.n_genes_by_counts <= 2500)
        & (ref.obs.pct_counts_mt <= 5)
    ]
    ids = pd.concat([store.split(s).meta() for s in store.splits])["id"]
    assert len(passing) == 2638 and sorted(ids) == sorted(passing)
    assert {s: len(store.split(s)) for s in store.splits} == {"train": 2374, "val": 132, "test": 132}
    # the vocabulary: genes detected in >= 3 kept cells, saved for the trainer (HF tokenizer + genes.tsv)
    genes = pd.read_csv(pbmc3k_store / "tokenizer" / "genes.tsv", sep="\t", keep_default_na=False)
    assert (genes["n_cells"] >= 3).all() and genes["id"].iloc[0] == 5
    config = json.loads((pbmc3k_store / "tokenizer" / "tokenizer_config.json").read_text())
    assert config["biomask"]["modality"] == "cells" and config["biomask"]["kind"] == "genes"
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(pbmc3k_store / "tokenizer" / "tokenizer.json"))
    assert hf.encode("CD3D MS4A1 NOT-A-GENE").ids == [1, int(genes.id[genes.gene == "CD3D"].iloc[0]),
                                                     int(genes.id[genes.gene == "MS4A1"].iloc[0]), 4]  # fmt: skip
    # exact medians: numpy's median of each gene's non-zero normalised values over the kept cells
    kept = pbmc3k[passing]
    lib = np.asarray(kept.X.sum(axis=1)).ravel()
    for gene in ("CD3D", "LYZ", "MS4A1"):
        column = kept[:, gene].X.toarray().ravel()
        expressed = column > 0
        expected = np.median(column[expressed].astype(np.float32) * (1e4 / lib[expressed]).astype(np.float32))
        assert genes.set_index("gene").loc[gene, "median"] == pytest.approx(expected, rel=1e-6)
    # provenance beside the outputs
    run = json.loads((pbmc3k_store / "run.json").read_text())
    assert run["inputs"][0]["sha256"] == datasets.get("pbmc3k").sha256 and run["seeds"]["split"] == 0
    assert yaml.safe_load((pbmc3k_store / "config.yaml").read_text())["tokenizer"]["scheme"] == "binned"


def test_binned_tokens_match_a_per_cell_reference(pbmc3k_store, pbmc3k):
    """Every token, value and bin of 150 cells against the definition written as a plain per-cell loop."""
    store = TokenStore(pbmc3k_store)
    genes = pd.read_csv(pbmc3k_store / "tokenizer" / "genes.tsv", sep="\t", keep_default_na=False)
    token_of = dict(zip(genes.gene, genes.id))
    train = store.split("train")
    meta = train.meta()
    names = pbmc3k.var_names.to_numpy()
    truncated = 0
    for i in range(0, len(train), len(train) // 150):
        row = pbmc3k[meta.id[i]].X
        lib = row.data.sum()
        tokens = np.array([token_of.get(n, -1) for n in names[row.indices]])
        counts = row.data[tokens >= 0]
        tokens = tokens[tokens >= 0]
        order = np.argsort(tokens)
        tokens, counts = tokens[order], counts[order]
        values = np.log1p(counts * np.float32(1e4 / lib))
        bins = np.array([int(np.ceil(51 * (counts <= c).sum() / counts.size)) for c in counts])
        if tokens.size > 1200:  # top-expressed 1200, ties to the lower token id, kept in token order
            truncated += 1
            chosen = np.sort(np.lexsort((tokens, -counts))[:1200])
            tokens, values, bins = tokens[chosen], values[chosen], bins[chosen]
        record = train[i]
        assert record["tokens"].tolist() == tokens.tolist()
        assert record["bins"].tolist() == bins.tolist()
        np.testing.assert_allclose(record["values"], values, rtol=2e-6)
    assert truncated > 0  # the check covered truncated cells too


def test_evaluation_set_with_the_frozen_vocabulary(pbmc68k_store, pbmc3k_store):
    import anndata

    store = TokenStore(pbmc68k_store)
    m = store.manifest
    # the pretraining corpus's vocabulary, byte for byte
    assert m["tokenizer"]["sha256"] == TokenStore(pbmc3k_store).manifest["tokenizer"]["sha256"]
    assert m["tokenizer"]["frozen_from"] == str(pbmc3k_store)
    assert m["coverage"]["pbmc68k_reduced"]["fraction_of_dataset_genes"] > 0.99
    assert len(m["label_names"]) == 10 and m["label_names"][0] == "CD14+ Monocyte"
    assert sum(len(store.split(s)) for s in store.splits) == 700
    # stratified: every cell type is in train, and its share in test follows its share overall
    adata = anndata.read_h5ad(datasets.fetch("pbmc68k_reduced"))
    overall = adata.obs.bulk_labels.value_counts(normalize=True)
    for split in ("val", "test"):
        labels = store.split(split).record_field("labels")
        shares = pd.Series(np.array(m["label_names"])[labels]).value_counts(normalize=True)
        assert (shares.reindex(overall.index).fillna(0) - overall).abs().max() < 0.03
    assert set(store.split("train").record_field("labels")) == set(range(10))
    # evaluation joins labels on the cell id: meta and labels agree with the file's obs
    meta = pd.concat([store.split(s).meta() for s in store.splits])
    labels = np.concatenate([store.split(s).record_field("labels") for s in store.splits])
    assert set(meta.columns) == {"id", "source", "bulk_labels", "louvain", "phase"}
    assert (np.array(m["label_names"])[labels] == adata.obs.loc[meta.id, "bulk_labels"].to_numpy()).all()
    assert not (set(store.split("train").meta().id) & set(store.split("test").meta().id))


def test_coverage_warning_and_zero_overlap(tmp_path, cli, repo, pbmc3k_store):
    out = tmp_path / "out"
    code, _, err = prep(cli, repo / CFG_68K, f"output={out}", f"tokenizer.path={pbmc3k_store}",
                        "tokenizer.min_coverage=1.0")  # fmt: skip
    # what matters is the vocabulary's side (which of its genes the data lacks, named), the dataset's is
    # information; never "100.0%" for a share below one
    assert (
        code == 0
        and "of the frozen vocabulary's" in err
        and "are in the data (tokenizer.min_coverage=100%)" in err
        and "the model sees the other" in err
        and "as not expressed" in err  # binned records leave out zeros: a missing gene reads as one
    )
    assert "99.9% of its 765 genes are in the vocabulary" in err, err
    # Ensembl IDs against a vocabulary of symbols: nothing in common -> refused before reading values
    code, _, err = prep(cli, repo / CFG_3K, f"output={tmp_path / 'ens'}", f"tokenizer.path={pbmc3k_store}",
                        "genes.column=gene_ids")  # fmt: skip
    assert code == 2 and "none of its 32,738 genes (e.g. ENSG00000243485" in err and "genes.column" in err
    assert not (tmp_path / "ens").exists() and leftovers(tmp_path) == []


def test_chunked_output_is_identical_to_in_memory_output(tmp_path, cli, repo):
    def checksums(root):
        m = json.loads((root / "manifest.json").read_text())
        files = {
            (split, f["name"]): f["sha256"]
            for split, entry in m["splits"].items()
            for shard in entry["shards"]
            for f in shard["files"].values()
        }
        return files, m["tokenizer"]["sha256"]

    for scheme in ("binned", "rank"):
        common = [f"tokenizer.scheme={scheme}", "tokenizer.truncate=sample", "tokenizer.max_length=600",
                  "hvg.n_top_genes=2000", "hvg.max_cells=1000", "tokenizer.median_max_values=1000000"]  # fmt: skip
        whole = tmp_path / f"{scheme}-whole"
        assert prep(cli, repo / CFG_3K, f"output={whole}", "block_size=65536", *common)[0] == 0
        blocks = tmp_path / f"{scheme}-blocks"
        assert prep(cli, repo / CFG_3K, f"output={blocks}", "block_size=97", *common)[0] == 0
        assert checksums(whole) == checksums(blocks)
        m = json.loads((whole / "manifest.json").read_text())
        assert m["tokenizer"]["vocab_size"] == 2005  # the HVGs
        assert m["tokenizer"]["medians"]["method"].startswith("exact over a seeded subset")
    # block size does not change results, so a rerun with another one reuses the output
    code, _, err = prep(cli, repo / CFG_3K, f"output={whole}", "block_size=500", *common)
    assert code == 0 and "up to date" in err


def _store_files(root):
    """sha256 of every shard and tokenizer file (not the manifest, which names paths and settings)."""
    import hashlib

    return {
        str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(root.rglob("*"))
        if f.is_file() and f.parent != root
    }


def test_10x_mtx_and_csc_h5ad_give_the_same_store_at_any_block_size(tmp_path, cli, repo, pbmc3k, monkeypatch):
    """The test above, for the inputs converted on disk before they are read in blocks: a 10x matrix.mtx
    with entries in Cell Ranger's order (one pass) or shuffled (bucketed), and a CSC h5ad. Buckets and
    text blocks are made tiny so that every boundary is crossed; the stores equal those of the same
    cells as a CSR h5ad, at block sizes 7 and 4096 (the 10x stores file for file among themselves, the
    tokens and values with the h5ad's)."""
    import biomask.cells.mtx
    import biomask.cells.spill

    monkeypatch.setattr(biomask.cells.spill, "BUCKET_ENTRIES", 5_000)
    monkeypatch.setattr(biomask.cells.mtx, "BLOCK_BYTES", 20_000)
    files, sub, _ = _write_10x(tmp_path, pbmc3k)
    coo = sp.coo_matrix(sp.csr_matrix(sub.X, dtype=np.int32).T)
    order = np.random.default_rng(0).permutation(coo.nnz)
    shuffled = tmp_path / "shuffled"  # uncompressed: the other table reader
    shuffled.mkdir()
    with open(shuffled / "matrix.mtx", "wb") as handle:
        scipy.io.mmwrite(
            handle, sp.coo_matrix((coo.data[order], (coo.row[order], coo.col[order])), shape=coo.shape)
        )
    for name in ("features.tsv", "barcodes.tsv"):
        (shuffled / name).write_bytes(gzip.decompress((files["10x_mtx"] / f"{name}.gz").read_bytes()))
    csc = sub.copy()
    csc.X = sp.csc_matrix(csc.X)
    csc.write_h5ad(tmp_path / "csc.h5ad")
    # each named `cells` (an input's name is its file's), so that the record metadata match too
    inputs = {}
    for name, path in {"mtx": files["10x_mtx"], "shuffled": shuffled, "csc": tmp_path / "csc.h5ad",
                       "csr": files["h5ad"]}.items():  # fmt: skip
        (tmp_path / "inputs" / name).mkdir(parents=True)
        inputs[name] = path.rename(tmp_path / "inputs" / name / ("cells" + path.suffix))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    found = {}
    for name, block_size in (("mtx", 7), ("mtx", 4096), ("shuffled", 7), ("csc", 7), ("csr", 4096)):
        out = tmp_path / f"{name}-{block_size}"
        code, _, err = prep(cli, repo / CFG_3K, f"output={out}", f"inputs=[{{path: {inputs[name]}}}]",
                            f"block_size={block_size}", "genes.column=gene_ids", "qc.min_genes=100")  # fmt: skip
        assert code == 0, err
        found[name, block_size] = _store_files(out)
    assert found["mtx", 7] == found["mtx", 4096] == found["shuffled", 7]
    assert found["csc", 7] == found["csr", 4096] and len(found["csr", 4096]) > 5
    # the 10x files hold no obs columns and another format: only the record metadata differ
    arrays = [{k: v for k, v in f.items() if k.endswith(".npy")} for f in found.values()]
    assert all(a == arrays[0] for a in arrays) and len(arrays[0]) >= 6
    assert list(scratch.iterdir()) == []  # every temporary CSR copy removed


def test_streamed_10x_mtx_equals_the_whole_file_read(tmp_path, monkeypatch):
    """Repeated entries (summed), explicit zeros (kept), blank lines, other feature types (dropped) and
    any entry order: every block is what scanpy's whole-file read gives, array for array."""
    import scanpy as sc

    import biomask.cells.mtx
    import biomask.cells.spill

    monkeypatch.setattr(biomask.cells.spill, "BUCKET_ENTRIES", 300)
    monkeypatch.setattr(biomask.cells.mtx, "BLOCK_BYTES", 1_000)
    rng = np.random.default_rng(1)
    n_genes, n_cells, n = 40, 150, 2_000
    genes, cells = rng.integers(1, n_genes + 1, n), rng.integers(1, n_cells + 1, n)
    values = rng.integers(0, 30, n)  # zeros among them, and repeated (gene, cell) pairs
    types = np.where(np.arange(n_genes) % 7 == 3, "Antibody Capture", "Gene Expression")
    for name, order in (("sorted", np.argsort(cells, kind="stable")), ("shuffled", rng.permutation(n))):
        folder = tmp_path / name
        folder.mkdir()
        lines = [f"{g} {c} {v}" for g, c, v in zip(genes[order], cells[order], values[order])]
        lines[500:500] = ["", "  "]  # blank lines, which the whole-file read skips
        text = f"%%MatrixMarket matrix coordinate integer general\n%\n{n_genes} {n_cells} {n}\n" + "\n".join(
            lines
        )
        (folder / "matrix.mtx.gz").write_bytes(gzip.compress(text.encode()))
        table = pd.DataFrame({"id": [f"G{i}" for i in range(n_genes)], "name": [f"g{i}" for i in range(n_genes)],
                              "type": types})  # fmt: skip
        table.to_csv(folder / "features.tsv.gz", sep="\t", header=False, index=False)
        pd.Series([f"c{i}" for i in range(n_cells)]).to_csv(
            folder / "barcodes.tsv.gz", header=False, index=False
        )
        whole = sp.csr_matrix(sc.read_10x_mtx(folder, make_unique=False).X)
        expected = sc.read_10x_mtx(folder, make_unique=False)
        source = open_matrix(folder)
        try:
            assert source.stored_values == whole.nnz and source.dtype == np.float32
            pd.testing.assert_frame_equal(source.var, expected.var)
            assert list(source.obs.index) == list(expected.obs_names)
            for block_size in (1, 13, 1000):
                got = sp.vstack([b for _, b in source.blocks(block_size)], format="csr")
                for part in ("data", "indices", "indptr"):
                    assert np.array_equal(getattr(got, part), getattr(whole, part)), (name, block_size, part)
            assert (whole.data == 0).any() and whole.shape == (n_cells, (types == "Gene Expression").sum())
        finally:
            source.close()


def test_csc_h5ad_is_converted_the_way_scipy_converts_it(tmp_path, monkeypatch):
    """Unsorted row indices, a repeated entry and integer values in a CSC h5ad: the same arrays as
    csc.tocsr() (which the reader called on the whole matrix before), read a few columns at a time."""
    import anndata

    import biomask.cells.readers
    import biomask.cells.spill

    monkeypatch.setattr(biomask.cells.spill, "BUCKET_ENTRIES", 50)
    monkeypatch.setattr(biomask.cells.readers, "CSC_CHUNK", 37)
    rng = np.random.default_rng(2)
    csc = sp.random(120, 30, density=0.2, format="csc", random_state=3, dtype=np.float64)
    csc.data = rng.integers(1, 9, csc.nnz).astype(np.int64)
    for j in range(csc.shape[1]):  # rows out of order within each column
        lo, hi = csc.indptr[j], csc.indptr[j + 1]
        csc.indices[lo:hi] = csc.indices[lo:hi][::-1].copy()
    csc.indices[csc.indptr[4] + 1] = csc.indices[csc.indptr[4]]  # a repeated (row, column)
    csc.has_sorted_indices = False
    adata = anndata.AnnData(csc, obs=pd.DataFrame(index=[f"c{i}" for i in range(120)]),
                            var=pd.DataFrame(index=[f"g{i}" for i in range(30)]))  # fmt: skip
    adata.write_h5ad(tmp_path / "csc.h5ad")
    whole = csc.tocsr()
    source = open_matrix(tmp_path / "csc.h5ad")
    try:
        assert source.dtype == np.int64 and source.stored_values == csc.nnz
        got = sp.vstack([b for _, b in source.blocks(11)], format="csr")
        for part in ("data", "indices", "indptr"):
            assert np.array_equal(getattr(got, part), getattr(whole, part)), part
        scratch = source.scratch.path
    finally:
        source.close()
    assert not scratch.exists()


def test_medians_from_a_subset_of_cells_track_the_exact_ones(tmp_path, repo):
    from biomask.cells.config import CellsPrepConfig
    from biomask.cells.prep import prep_cells
    from biomask.config import load_config

    medians = {}
    runs = (
        ("exact", 10_000_000, "binned"),
        ("subset", 1_000_000, "binned"),
        ("subset-rank", 1_000_000, "rank"),
    )
    for name, budget, scheme in runs:
        cfg = load_config(
            CellsPrepConfig,
            repo / CFG_3K,
            [
                f"output={tmp_path / name}",
                f"tokenizer.median_max_values={budget}",
                f"tokenizer.scheme={scheme}",
            ],
        )
        genes = pd.read_csv(prep_cells(cfg) / "tokenizer" / "genes.tsv", sep="\t", keep_default_na=False)
        medians[name] = genes.set_index("gene")
    exact, subset = medians["exact"], medians["subset"]
    assert list(exact.index) == list(subset.index) and subset["median"].notna().all()
    # genes with few values (which the subset may miss) get exact medians from all of them
    settings = json.loads((tmp_path / "subset" / "manifest.json").read_text())["tokenizer"]["medians"]
    few = exact.n_cells <= settings["exact_for_genes_with_at_most"]
    assert few.sum() > 1000 and np.array_equal(subset.loc[few, "median"], exact.loc[few, "median"])
    assert medians["subset-rank"]["median"].equals(subset["median"])  # whatever the scheme
    common = exact.n_cells >= 500  # well-observed genes: ~250 values behind each subset median
    ratio = subset.loc[common, "median"] / exact.loc[common, "median"]
    assert common.sum() > 500 and ratio.between(0.9, 1.1).mean() > 0.97


def test_a_named_layer_and_obs_columns(tmp_path, cli, repo):
    out = tmp_path / "spliced"
    code, _, _ = prep(cli, repo / CFG_3K, f"output={out}", "inputs=[{dataset: pancreas-100, matrix: layers/spliced}]",
                      "qc.max_mito_fraction=null", "qc.max_genes=null", "qc.min_genes=100")  # fmt: skip
    assert code == 0
    store = TokenStore(out)
    assert store.manifest["sources"][0]["matrix"] == "layers/spliced"
    assert sum(len(store.split(s)) for s in store.splits) > 50
    code, _, err = prep(cli, repo / CFG_3K, f"output={tmp_path / 'x'}",
                        "inputs=[{dataset: pancreas-100, matrix: layers/ambiguous}]")  # fmt: skip
    assert (
        code == 2 and "has no matrix 'layers/ambiguous'; it has: X, layers/spliced, layers/unspliced" in err
    )


# ------------------------------------------------------------------------------------------ other formats


def _pbmc3k_cells(pbmc3k, n=300):
    """The first n cells of pbmc3k, with the gene symbols as 10x wrote them: anndata made 95 of them
    unique by adding -1 (EFNA3 and EFNA3-1); the 10x files below get the original, duplicated names."""
    sub = pbmc3k[:n].copy()
    names = sub.var_names.to_numpy()
    present = set(names)
    suffixed = re.compile(r"^(.+)-(\d+)$")

    def original(name: str) -> str:
        match = suffixed.match(name)
        return match.group(1) if match and match.group(1) in present else name

    return sub, np.array([original(n) for n in names])


def _write_10x(tmp_path, pbmc3k):
    sub, symbols = _pbmc3k_cells(pbmc3k)
    counts = sp.csr_matrix(sub.X, dtype=np.int32)
    directory = tmp_path / "filtered_feature_bc_matrix"
    directory.mkdir()
    with gzip.open(directory / "matrix.mtx.gz", "wb") as handle:
        scipy.io.mmwrite(handle, counts.T.tocoo(), field="integer")
    features = pd.DataFrame({"id": sub.var["gene_ids"], "name": symbols, "type": "Gene Expression"})
    features.to_csv(directory / "features.tsv.gz", sep="\t", header=False, index=False)
    pd.Series(sub.obs_names).to_csv(directory / "barcodes.tsv.gz", header=False, index=False)
    h5 = tmp_path / "filtered_feature_bc_matrix.h5"
    csc = counts.T.tocsc()  # genes x cells, one column per cell
    with h5py.File(h5, "w") as f:
        g = f.create_group("matrix")
        g["data"], g["indices"], g["indptr"] = (
            csc.data,
            csc.indices.astype(np.int64),
            csc.indptr.astype(np.int64),
        )
        g["shape"] = np.array(csc.shape, dtype=np.int32)
        g["barcodes"] = sub.obs_names.to_numpy().astype("S")
        feats = g.create_group("features")
        feats["id"] = sub.var["gene_ids"].to_numpy().astype("S")
        feats["name"] = symbols.astype("S")
        feats["feature_type"] = np.full(symbols.size, b"Gene Expression")
        feats["genome"] = np.full(symbols.size, b"GRCh38")
        feats["_all_tag_keys"] = np.array([b"genome"])
    v2 = tmp_path / "cellranger2.h5"  # Cell Ranger 2: one group per genome, genes / gene_names
    with h5py.File(v2, "w") as f:
        g = f.create_group("hg19")
        g["data"], g["indices"], g["indptr"] = (
            csc.data,
            csc.indices.astype(np.int64),
            csc.indptr.astype(np.int64),
        )
        g["shape"] = np.array(csc.shape, dtype=np.int32)
        g["barcodes"] = sub.obs_names.to_numpy().astype("S")
        g["genes"] = sub.var["gene_ids"].to_numpy().astype("S")
        g["gene_names"] = symbols.astype("S")
    loom = tmp_path / "cells.loom"
    with h5py.File(loom, "w") as f:
        f["matrix"] = counts.T.toarray().astype(np.float32)
        f.create_group("layers")
        f["row_attrs/Gene"] = symbols.astype("S")
        f["row_attrs/Accession"] = sub.var["gene_ids"].to_numpy().astype("S")
        f["col_attrs/CellID"] = sub.obs_names.to_numpy().astype("S")
        f.attrs["LOOM_SPEC_VERSION"] = "3.0.0"
    h5ad = tmp_path / "cells.h5ad"
    sub.write_h5ad(h5ad)
    return {"10x_mtx": directory, "10x_h5": h5, "10x_h5_v2": v2, "loom": loom, "h5ad": h5ad}, sub, symbols


def test_10x_and_loom_readers_give_the_same_cells_as_scanpy(tmp_path, pbmc3k):
    import scanpy as sc

    files, sub, symbols = _write_10x(tmp_path, pbmc3k)
    expected = {
        "10x_mtx": sc.read_10x_mtx(files["10x_mtx"], make_unique=False),
        "10x_h5": sc.read_10x_h5(files["10x_h5"]),
        "10x_h5_v2": sc.read_10x_h5(files["10x_h5_v2"], genome="hg19"),
    }
    for fmt, path in files.items():
        source = open_matrix(path)
        try:
            blocks = sp.vstack([b for _, b in source.blocks(128)], format="csr")
            assert (blocks != sp.csr_matrix(sub.X)).nnz == 0, fmt
            assert list(source.obs.index) == list(sub.obs_names), fmt
            names = source.var.index.to_numpy()
            assert list(names) == (list(sub.var_names) if fmt == "h5ad" else list(symbols)), fmt
            if fmt in expected:
                assert (sp.csr_matrix(expected[fmt].X) != blocks).nnz == 0, fmt
                assert list(expected[fmt].var["gene_ids"]) == list(source.var["gene_ids"]), fmt
        finally:
            source.close()


def test_h5ad_read_directly_from_the_file_whatever_its_layout(tmp_path, pbmc3k):
    """Blocks read by mapping the file's bytes equal anndata's, for contiguous, chunked and appended
    (interleaved) storage; compressed storage falls back to h5py."""
    from anndata.io import sparse_dataset, write_elem

    matrix = sp.csr_matrix(pbmc3k.X, dtype=np.float32)
    layouts = {"contiguous": {}, "chunked": {"chunks": (1000,)}, "gzip": {"compression": "gzip"}}
    paths = {}
    for name, options in layouts.items():
        paths[name] = tmp_path / f"{name}.h5ad"
        pbmc3k.write_h5ad(paths[name])
        with h5py.File(paths[name], "r+") as f:
            del f["X"]
            group = f.create_group("X")
            group.attrs.update(
                {"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": matrix.shape}
            )
            for key in ("data", "indices", "indptr"):
                group.create_dataset(key, data=getattr(matrix, key), **options)
    paths["appended"] = tmp_path / "appended.h5ad"
    pbmc3k.write_h5ad(paths["appended"])
    with h5py.File(paths["appended"], "r+") as f:
        del f["X"]
        write_elem(f, "X", matrix[:500])
        stored = sparse_dataset(f["X"])
        for lo in range(500, matrix.shape[0], 500):  # data and indices chunks interleave in the file
            stored.append(matrix[lo : lo + 500])
    for name, path in paths.items():
        source = open_matrix(path)
        try:
            assert (source._data._fd is None) == (name == "gzip"), name
            if name == "appended":
                assert len(source._data._starts) > 1  # blocks cross from one run of chunks to the next
            blocks = [b for _, b in source.blocks(97)]
            assert (sp.vstack(blocks, format="csr") != matrix).nnz == 0, name
        finally:
            source.close()


def test_remapping_columns_in_order_equals_selecting_them():
    rng = np.random.default_rng(0)
    block = sp.random(300, 1000, density=0.05, format="csr", random_state=1, dtype=np.float32)
    kept = np.sort(rng.choice(1000, 600, replace=False))
    targets = np.full(1000, -1)
    targets[kept] = np.arange(kept.size)
    mapping = ColumnMap(targets, kept.size)
    assert mapping.increasing and not mapping.identity
    got = remap_columns(block, mapping)
    assert got.has_canonical_format and (got != block[:, kept]).nnz == 0
    rows = rng.permutation(300)[:200]  # a selection of rows, in any order, in the same pass
    assert (remap_columns(block, mapping, rows=rows) != block[rows][:, kept]).nnz == 0
    swapped = targets.copy()
    swapped[kept[:2]] = [1, 0]  # out of order: the general path, same result
    assert not ColumnMap(swapped, kept.size).increasing
    assert (
        remap_columns(block, ColumnMap(swapped, kept.size)) != block[:, kept[[1, 0, *range(2, 600)]]]
    ).nnz == 0


def test_duplicate_gene_names_are_summed_kept_first_or_refused(tmp_path, cli, repo, pbmc3k, caplog):
    files, sub, _ = _write_10x(tmp_path, pbmc3k)
    source = open_matrix(files["10x_h5"])
    try:
        names = gene_names(source, None)
        n_dups = int(pd.Series(names).duplicated().sum())
        assert n_dups == int((names != sub.var_names.to_numpy()).sum()) > 50
        counts = sp.csr_matrix(sub.X)
        for policy, said in (("sum", "added up"), ("first", "left out but the first")):
            space = GeneSpace()
            with caplog.at_level("WARNING", logger="biomask"):
                targets, stats = space.add(source, names, policy)
            assert stats["duplicate_columns"] == n_dups and len(space) == names.size - n_dups
            # never silent: how many, which, and what became of them
            repeated = pd.Series(names)[pd.Series(names).duplicated()].nunique()
            assert f"{repeated} gene names occur more than once (" in caplog.text and said in caplog.text
            merged = remap_columns(
                source.rows(0, source.n_obs).astype(np.float32), ColumnMap(targets, len(space))
            )
            for gene in ("EFNA3", "PSMA2", "CFB"):
                columns = np.flatnonzero(names == gene)
                assert columns.size == 2
                want = counts[:, columns].sum(axis=1) if policy == "sum" else counts[:, columns[0]].toarray()
                got = merged[:, space.index[gene]].toarray()
                assert np.array_equal(np.asarray(want).ravel(), got.ravel()), (policy, gene)
    finally:
        source.close()
    code, _, err = prep(cli, repo / CFG_3K, f"output={tmp_path / 'dup'}", f"inputs=[{{path: {files['10x_h5']}}}]",
                        "genes.duplicates=error")  # fmt: skip
    assert code == 2 and "gene names occur more than once (" in err and "genes.duplicates: sum" in err


def test_every_format_gives_the_same_tokens(tmp_path, cli, repo, pbmc3k):
    files, _, _ = _write_10x(tmp_path, pbmc3k)
    # Ensembl IDs are unique in every format (the symbols are not, in the 10x ones); loom calls them Accession
    id_column = {"h5ad": "gene_ids", "10x_mtx": "gene_ids", "10x_h5": "gene_ids", "10x_h5_v2": "gene_ids",
                 "loom": "Accession"}  # fmt: skip
    stores = {}
    for fmt, path in files.items():
        out = tmp_path / f"store-{fmt}"
        code, _, err = prep(cli, repo / CFG_3K, f"output={out}", f"inputs=[{{path: {path}}}]",
                            f"genes.column={id_column[fmt]}")  # fmt: skip
        assert code == 0, err
        store = TokenStore(out)
        assert store.manifest["sources"][0]["format"] == fmt.removesuffix("_v2")
        stores[fmt] = {
            s: [r["tokens"].tolist() + r["values"].tolist() for r in store.split(s)] for s in store.splits
        }
    assert stores["10x_mtx"] == stores["h5ad"] == stores["10x_h5"] == stores["10x_h5_v2"] == stores["loom"]
    assert sum(len(v) for v in stores["h5ad"].values()) > 250
    # rank tokens divide by each gene's median: with a median budget below the dense matrix's entries
    # but above its non-zeros, the dense loom gets the sparse files' exact medians, not a subset's
    source = open_matrix(files["h5ad"])
    nnz, entries = source.stored_values, source.n_obs * source.n_vars
    source.close()
    medians = {}
    for fmt in ("h5ad", "loom"):
        out = tmp_path / f"rank-{fmt}"
        code, _, err = prep(cli, repo / CFG_3K, f"output={out}", f"inputs=[{{path: {files[fmt]}}}]",
                            f"genes.column={id_column[fmt]}", "tokenizer.scheme=rank",
                            f"tokenizer.median_max_values={(nnz + entries) // 2}")  # fmt: skip
        assert code == 0, err
        medians[fmt] = (out / "tokenizer" / "genes.tsv").read_text()
        assert json.loads((out / "manifest.json").read_text())["tokenizer"]["medians"]["method"] == "exact"
    assert medians["h5ad"] == medians["loom"]


def test_a_pattern_in_path_reads_every_matrix_it_matches(tmp_path, cli, repo, pbmc3k):
    """One h5ad per sample needs no input entry each: `path: samples/*.h5ad` reads every match in
    sorted order, the cells the same as one file holding them all gives; a pattern that matches
    nothing is refused naming it."""
    sub, _ = _pbmc3k_cells(pbmc3k)
    (samples := tmp_path / "samples").mkdir()
    sub[:150].copy().write_h5ad(samples / "a.h5ad")
    sub[150:].copy().write_h5ad(samples / "b.h5ad")
    sub.write_h5ad(tmp_path / "all.h5ad")
    tokens = {}
    for name, path in (("pattern", samples / "*.h5ad"), ("whole", tmp_path / "all.h5ad")):
        code, _, err = prep(cli, repo / CFG_3K, f"output={tmp_path / name}", f"inputs=[{{path: {path}}}]")
        assert code == 0, err
        store = TokenStore(tmp_path / name)
        tokens[name] = {s: [r["tokens"].tolist() for r in store.split(s)] for s in store.splits}
    assert [s["name"] for s in TokenStore(tmp_path / "pattern").manifest["sources"]] == ["a.h5ad", "b.h5ad"]
    assert tokens["pattern"] == tokens["whole"] and sum(map(len, tokens["whole"].values())) > 250
    code, _, err = prep(
        cli, repo / CFG_3K, f"output={tmp_path / 'none'}", f"inputs=[{{path: {samples}/*.loom}}]"
    )
    assert code == 2 and "matches no file" in err and not (tmp_path / "none").exists()


def test_samples_whose_files_share_a_name_stay_apart(tmp_path, cli, repo, pbmc3k):
    """Cell Ranger names every sample's matrix alike (`sampleA/.../filtered_feature_bc_matrix`): each
    cell's source, and each input's entry in the manifest, says which sample it came from (the
    folder name alone named every cell alike, and the manifest kept one entry for all)."""
    sub, _ = _pbmc3k_cells(pbmc3k)
    for sample, cells in (("A", sub[:150]), ("B", sub[150:])):
        (tmp_path / sample).mkdir()
        cells.copy().write_h5ad(tmp_path / sample / "cells.h5ad")
    code, _, err = prep(
        cli, repo / CFG_3K, f"output={tmp_path / 'out'}", f"inputs=[{{path: {tmp_path}/*/cells.h5ad}}]"
    )
    assert code == 0, err
    store = TokenStore(tmp_path / "out")
    assert [s["name"] for s in store.manifest["sources"]] == ["A/cells.h5ad", "B/cells.h5ad"]
    assert sorted(store.manifest["coverage"]) == ["A/cells.h5ad", "B/cells.h5ad"]
    sources = pd.concat([store.split(s).meta() for s in store.splits])["source"]
    assert set(sources) == {"A/cells.h5ad", "B/cells.h5ad"}


def test_too_many_inputs_open_at_once_says_so_not_that_a_file_is_unreadable(tmp_path, repo, capfd):
    """prep holds every input open while it reads them (an h5ad: 3 descriptors): a pattern matching
    more files than the open-file limit allows used to call one "not a readable HDF5 file; is it
    really this format?", or say "check the path". The stage runs in a child with a low limit."""
    import os
    import resource
    import sys

    import anndata

    for i in range(16):
        anndata.AnnData(sp.csr_matrix(np.eye(3, dtype=np.float32))).write_h5ad(tmp_path / f"s{i:02d}.h5ad")
    pid = os.fork()
    if pid == 0:  # the child runs the stage and never returns into pytest
        code = 1
        try:
            from biomask.cli import main

            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 20, hard))
            code = main(["prep", "cells", "-c", str(repo / CFG_3K), f"output={tmp_path / 'out'}",
                         f"inputs=[{{path: {tmp_path}/*.h5ad}}]"])  # fmt: skip
        finally:
            sys.stderr.flush()
            os._exit(code)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    err = capfd.readouterr().err
    assert code == 2, err
    assert "Too many open files" in err and "ulimit -n" in err and "fewer files" in err
    assert "not a readable HDF5" not in err and "check the path" not in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ bad input


def _broken_h5ad(tmp_path, pbmc3k, name, change):
    sub = pbmc3k[:60].copy()
    sub.X = sp.csr_matrix(sub.X)
    change(sub)
    path = tmp_path / name
    sub.write_h5ad(path)
    return path


def _fails(cli, repo, tmp_path, path, *overrides):
    out = tmp_path / "out"
    code, _, err = prep(cli, repo / CFG_3K, f"output={out}", f"inputs=[{{path: {path}}}]", *overrides)
    assert code == 2, err
    assert not out.exists() and leftovers(tmp_path) == [], "a failed prep must leave nothing behind"
    return err


def _set_value(value, row=7):
    def change(adata):
        X = adata.X.tolil()
        X[row, int(adata.X[row].indices[0])] = value
        adata.X = sp.csr_matrix(X)

    return change


def test_nan_and_negative_values_are_refused_naming_the_cell(tmp_path, cli, repo, pbmc3k):
    path = _broken_h5ad(tmp_path, pbmc3k, "nan.h5ad", _set_value(np.nan))
    err = _fails(cli, repo, tmp_path, path)
    assert f"nan.h5ad [X]: cell '{pbmc3k.obs_names[7]}' (row 7) has a value nan" in err
    path = _broken_h5ad(tmp_path, pbmc3k, "negative.h5ad", _set_value(-3.0, row=40))
    err = _fails(
        cli, repo, tmp_path, path, "counts.detect_cells=20"
    )  # found after detection, while streaming
    assert f"negative.h5ad [X]: cell '{pbmc3k.obs_names[40]}' (row 40) has a negative value (-3)" in err


def test_a_damaged_sparse_matrix_is_refused_not_a_crash(tmp_path, cli, repo, pbmc3k):
    """A gene index past the last gene (h5ad, 10x .h5, an AnnData in memory) or a compressed chunk
    that fails to decompress: exit 2 naming the file and cell, never a segfault or a traceback."""
    path = _broken_h5ad(tmp_path, pbmc3k, "index.h5ad", lambda a: None)
    with h5py.File(path, "r+") as f:
        start = int(f["X/indptr"][12])
        f["X/indices"][start] = 10**6
    err = _fails(cli, repo, tmp_path, path)
    assert f"index.h5ad [X]: cell 13 stores a gene index 1,000,000 outside 0..{pbmc3k.n_vars - 1:,}" in err
    import anndata

    from biomask.cells.readers import from_anndata
    from biomask.errors import InputError

    source = from_anndata(anndata.read_h5ad(path))  # a notebook's AnnData (biomask.embed, fit_cells)
    with pytest.raises(InputError, match="cell 13 stores a gene index 1,000,000"):
        list(source.blocks(128))

    (tmp_path / "tenx").mkdir()
    files, _, _ = _write_10x(tmp_path / "tenx", pbmc3k)
    with h5py.File(files["10x_h5"], "r+") as f:
        f["matrix/indices"][5] = 10**6
    err = _fails(cli, repo, tmp_path, files["10x_h5"])
    assert "filtered_feature_bc_matrix.h5 [matrix]: cell 1 stores a gene index 1,000,000" in err

    sub = pbmc3k[:60].copy()
    sub.X = sp.csr_matrix(sub.X)
    packed = tmp_path / "packed.h5ad"
    sub.write_h5ad(packed, compression="gzip")
    with h5py.File(packed, "r") as f:
        offset = f["X/data"].id.get_chunk_info(0).byte_offset
    with open(packed, "r+b") as handle:
        handle.seek(offset + 16)
        handle.write(b"\xff" * 64)
    err = _fails(cli, repo, tmp_path, packed)
    assert "packed.h5ad [X]: cells 1-60 cannot be read" in err and "the file is damaged" in err


def test_non_numeric_values_are_refused(tmp_path, cli, repo, pbmc3k):
    path = _broken_h5ad(tmp_path, pbmc3k, "text.h5ad", lambda a: None)
    with h5py.File(path, "r+") as f:
        del f["X"]
        f["X"] = np.full((60, pbmc3k.n_vars), b"1", dtype="S1")
    err = _fails(cli, repo, tmp_path, path)
    assert "text.h5ad [X]: the values are not numbers (stored as |S1)" in err


def test_empty_matrix_and_zero_count_cells(tmp_path, cli, repo, pbmc3k):
    path = _broken_h5ad(tmp_path, pbmc3k, "empty.h5ad", lambda a: None)
    empty = pbmc3k[:0].copy()
    empty.write_h5ad(path)
    assert "empty.h5ad [X]: the matrix is empty (0 cells x 32738 genes)" in _fails(cli, repo, tmp_path, path)
    empty.obs["cell_type"] = np.array([], dtype=object)  # with a label column: still the empty matrix
    empty.write_h5ad(path)
    err = _fails(cli, repo, tmp_path, path, "labels.column=cell_type")
    assert "the matrix is empty (0 cells" in err and "no cell has a 'cell_type' label" not in err, err

    def zero_cells(adata):
        X = adata.X.tolil()
        X[[3, 11], :] = 0
        adata.X = sp.csr_matrix(X)

    path = _broken_h5ad(tmp_path, pbmc3k, "zeros.h5ad", zero_cells)
    err = _fails(cli, repo, tmp_path, path)
    assert (
        f"zeros.h5ad [X]: 2 cells in rows 0-59 have zero counts (first: '{pbmc3k.obs_names[3]}', row 3)"
        in err
    )
    assert "qc.zero_count_cells: drop" in err
    out = tmp_path / "dropped"
    code, _, _ = prep(
        cli, repo / CFG_3K, f"output={out}", f"inputs=[{{path: {path}}}]", "qc.zero_count_cells=drop"
    )
    assert code == 0 and TokenStore(out).manifest["stats"]["cells_dropped_zero_counts"] == 2


def test_missing_label_column_and_missing_labels(tmp_path, cli, repo, pbmc3k_store):
    import anndata

    out = tmp_path / "out"
    args = [f"output={out}", f"tokenizer.path={pbmc3k_store}"]
    code, _, err = prep(cli, repo / CFG_68K, *args, "labels.column=cell_type")
    assert (
        code == 2 and "[raw]: obs has no column 'cell_type' (labels.column); obs columns: bulk_labels" in err
    )
    assert not out.exists() and leftovers(tmp_path) == []
    # cells without a label: refused by default, left out on request
    adata = anndata.read_h5ad(datasets.fetch("pbmc68k_reduced"))
    adata.obs["bulk_labels"] = adata.obs["bulk_labels"].astype(object)
    adata.obs.iloc[[5, 9, 300], adata.obs.columns.get_loc("bulk_labels")] = None
    path = tmp_path / "unlabelled.h5ad"
    adata.write_h5ad(path)
    code, _, err = prep(cli, repo / CFG_68K, *args, f"inputs=[{{path: {path}, matrix: raw}}]")
    assert code == 2 and f"3 cells have no 'bulk_labels' label (first: '{adata.obs_names[5]}')" in err
    assert "labels.missing: drop" in err and not out.exists()
    code, _, _ = prep(
        cli, repo / CFG_68K, *args, f"inputs=[{{path: {path}, matrix: raw}}]", "labels.missing=drop"
    )
    store = TokenStore(out)
    assert code == 0 and store.manifest["stats"]["cells_dropped_missing_label"] == 3
    assert sum(len(store.split(s)) for s in store.splits) == 697
    # a QC filter besides: each cell left out is counted once, under one reason (the unlabelled cells
    # were counted again under the filters they also fail)
    shutil.rmtree(out)
    code, _, err = prep(
        cli, repo / CFG_68K, *args, f"inputs=[{{path: {path}, matrix: raw}}]", "labels.missing=drop",
        "qc.min_genes=300", "labels.min_cells=30", "qc.zero_count_cells=drop",
    )  # fmt: skip
    stats = TokenStore(out).manifest["stats"]
    written = sum(stats[f"cells_{s}"] for s in ("train", "val", "test"))
    left_out = {k: n for k, n in stats.items() if k.startswith("cells_dropped_") and n}
    assert code == 0 and sum(left_out.values()) + written == stats["cells_read"] == 700, (left_out, written)
    assert stats["cells_dropped_missing_label"] == 3 and stats["cells_dropped_min_genes"] > 0
    # a cell left out for its label is not checked either: one with no counts stops nothing under the
    # default qc.zero_count_cells=error
    raw = adata.raw.to_adata()
    values = raw.X.tolil()
    values[5, :] = 0  # cell 5 has no label
    raw.X = sp.csr_matrix(values)
    zeroed = adata.copy()
    zeroed.raw = raw
    zeroed.write_h5ad(tmp_path / "zeroed.h5ad")
    shutil.rmtree(out)
    code, _, err = prep(
        cli, repo / CFG_68K, *args, f"inputs=[{{path: {tmp_path / 'zeroed.h5ad'}, matrix: raw}}]",
        "labels.missing=drop",
    )  # fmt: skip
    stats = TokenStore(out).manifest["stats"]
    assert code == 0 and "zero counts" not in err, err
    assert stats["cells_dropped_missing_label"] == 3 and stats["cells_dropped_zero_counts"] == 0
    # cluster ids stored as floats (a NaN among them), a "nan" string, one cell in a class of its own
    ids = adata.obs["louvain"].cat.codes.astype(float).to_numpy()
    ids[[1, 2]] = np.nan
    adata.obs["cluster"] = ids
    adata.obs.loc[adata.obs_names[3], "cluster"] = 11.0  # a class of one cell
    adata.obs["named"] = adata.obs["bulk_labels"].astype(str).replace({"None": "nan"})
    adata.obs["empty"] = np.nan
    adata.write_h5ad(path)
    shutil.rmtree(out)
    code, _, err = prep(
        cli, repo / CFG_68K, *args, f"inputs=[{{path: {path}, matrix: raw}}]", "labels.column=cluster",
        "labels.missing=drop",
    )  # fmt: skip
    store = TokenStore(out)
    assert code == 0 and store.manifest["stats"]["cells_dropped_missing_label"] == 2
    assert store.manifest["label_names"] == [str(i) for i in range(12)]  # "2" before "10", no "3.0"
    assert "class '11' (1) has fewer than 3 records" in err
    shutil.rmtree(out)
    code, _, _ = prep(
        cli, repo / CFG_68K, *args, f"inputs=[{{path: {path}, matrix: raw}}]", "labels.column=named",
        "labels.missing=drop",
    )  # fmt: skip
    assert code == 0 and "nan" not in TokenStore(out).manifest["label_names"]  # the written NaN is no class
    shutil.rmtree(out)
    empty = [*args, f"inputs=[{{path: {path}, matrix: raw}}]", "labels.column=empty"]
    code, _, err = prep(cli, repo / CFG_68K, *empty)
    assert code == 2 and "no cell has a 'empty' label" in err and "is it the right column" in err
    code, _, err = prep(cli, repo / CFG_68K, *empty, "labels.missing=drop")
    assert code == 2 and "no cell has a 'empty' label; all 700 are left out" in err
    assert "no cell is left to write (no label: 700)" in err
    assert not out.exists()
    # one cluster id written as text two ways (a column joined from two tools): not two classes
    adata.obs["joined"] = adata.obs["louvain"].astype(str).replace({"3": "3.0"})
    adata.obs.loc[adata.obs_names[:5], "joined"] = "3"
    adata.write_h5ad(path)
    code, _, err = prep(
        cli, repo / CFG_68K, *args, f"inputs=[{{path: {path}, matrix: raw}}]", "labels.column=joined"
    )
    assert code == 2 and "obs['joined'] writes one number in several ways: '3' (" in err, err
    assert "'3.0' (" in err and "replace({'3.0': '3'})" in err and not out.exists()


def test_a_registered_datasets_origin_is_in_run_json_not_in_the_manifest(pbmc3k_store):
    """What a methods section cites (package and version, licence, citation), beside the checksum."""
    source = json.loads((pbmc3k_store / "run.json").read_text())["inputs"][0]
    assert source["name"] == "pbmc3k" and source["dataset"]["source"]["package"] == "desc"
    assert source["dataset"]["licence"] and "dataset" not in TokenStore(pbmc3k_store).manifest["sources"][0]


def test_vocabulary_loaded_back_is_the_saved_one(pbmc3k_store):
    vocab = GeneVocabulary.load(pbmc3k_store)
    again = GeneVocabulary.load(pbmc3k_store / "tokenizer" / "tokenizer.json")
    assert (
        vocab.genes == again.genes
        and vocab.vocab_size == TokenStore(pbmc3k_store).manifest["tokenizer"]["vocab_size"]
    )
    table = pd.read_csv(pbmc3k_store / "tokenizer" / "genes.tsv", sep="\t", keep_default_na=False)
    assert np.array_equal(vocab.medians, table["median"].to_numpy(np.float32))


def test_the_script_runs_the_stage(tmp_path, repo, pbmc3k_store):
    import subprocess
    import sys

    out = tmp_path / "script"
    run = subprocess.run(
        [sys.executable, repo / "data_prep/prep_cells.py", "-c", repo / CFG_68K, f"output={out}",
         f"tokenizer.path={pbmc3k_store}", "tokenizer.scheme=panel"],
        capture_output=True, text=True, cwd=repo,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    store = TokenStore(out)
    # a panel record lists every vocabulary gene the data measures (zeros included), not the others
    found = store.manifest["coverage"]["pbmc68k_reduced"]["dataset_genes_in_vocab"]
    assert store.manifest["scheme"] == "panel" and store.split("train").fixed_length == found < 13656


def test_an_h5ad_named_loom_is_told_apart(tmp_path):
    """A renamed file (an h5ad saved as .loom) gets the cause and the fix, not "no matrix 'X'; it has: X"."""
    import anndata as ad

    from biomask.cells.readers import open_matrix
    from biomask.errors import InputError

    fake = tmp_path / "cells.loom"
    ad.AnnData(np.ones((3, 4), dtype=np.float32)).write_h5ad(fake)
    with pytest.raises(
        InputError, match=r"cells.loom is not a loom file .* looks like an h5ad .* format: h5ad"
    ):
        open_matrix(fake)
    source = open_matrix(fake, "h5ad")  # the fix it names works
    try:
        assert (source.n_obs, source.n_vars) == (3, 4)
    finally:
        source.close()


def test_a_few_stray_values_in_counts_are_named_not_called_log_data(tmp_path):
    """One non-integer among integer counts is a damaged matrix: the message names the cell and gene;
    rescaled counts (not log values) are pointed at counts.mode: normalised."""
    import anndata as ad
    import pandas as pd

    from biomask.cells.config import CountsConfig
    from biomask.cells.counts import check_policy, detect
    from biomask.errors import InputError

    rng = np.random.default_rng(0)
    counts = rng.poisson(1.5, (300, 100)).astype(np.float32)
    counts[5, 7] = 2.5
    obs = pd.DataFrame(index=[f"c{i}" for i in range(300)])
    var = pd.DataFrame(index=[f"G{i}" for i in range(100)])
    ad.AnnData(counts, obs=obs, var=var).write_h5ad(tmp_path / "stray.h5ad")
    ad.AnnData(counts.round() * 0.93, obs=obs, var=var).write_h5ad(tmp_path / "rescaled.h5ad")
    cfg = CountsConfig()
    found = {}
    for name in ("stray", "rescaled"):
        source = open_matrix(tmp_path / f"{name}.h5ad")
        try:
            found[name] = detect(source, cfg, 64)
            with pytest.raises(InputError) as err:
                check_policy(source, found[name], cfg)
            found[name + " message"] = str(err.value)
        finally:
            source.close()
    assert (
        found["stray"].kind == "stray_values"
        and "integer counts but for 1 non-integer value" in found["stray message"]
    )
    assert (
        "cell 'c5' (row 5), gene 'G7': 2.5" in found["stray message"] and "log" not in found["stray message"]
    )
    assert found["rescaled"].kind == "log_normalised"  # small non-integers: log-like by value alone ...
    assert "`counts.mode: normalised` takes them as linear-scale expression" in found["rescaled message"]
    # the share and the stray are measured alike: a value at the tolerance (float32-rounded) is
    # one or the other in both, never an IndexError
    from biomask.cells.counts import summarise

    for tol in (0.001, 0.05, 0.1, 0.3):
        ones = np.ones((200, 50), dtype=np.float32)
        ones[0, 0] = np.float32(tol)
        assert summarise(sp.csr_matrix(ones), ones.dtype, tol).kind in ("integer_floats", "stray_values")


def test_a_current_store_is_reused_before_the_readers_are_imported(tmp_path, cli, repo, pbmc3k_store):
    """A pipeline rerun starts each prep in a process of its own: one that finds its store current
    says so without opening the matrix or importing what reads it (anndata, h5py, pandas, scipy,
    numba); a changed key or input is still refused."""
    from tests.conftest import HEAVY_MODULES, fresh_cli

    cells = tmp_path / "cells.h5ad"
    shutil.copy(datasets.fetch("pbmc68k_reduced"), cells)
    args = ["prep", "cells", "-c", repo / CFG_68K, f"inputs=[{{path: {cells}, matrix: raw}}]",
            f"tokenizer.path={pbmc3k_store}", f"output={tmp_path / 'store'}"]  # fmt: skip
    assert cli(*args)[0] == 0
    readers = (*HEAVY_MODULES, "h5py", "pandas", "scipy")
    code, out, err, heavy = fresh_cli(*args, modules=readers)
    assert (code, out, heavy) == (0, str(tmp_path / "store"), []), err
    assert "up to date" in err
    code, _, err, _ = fresh_cli(*args, "split.seed=7")
    assert code == 2 and "split.seed: " in err and "--overwrite" in err, err
    with h5py.File(cells, "a") as handle:  # other bytes, the same cells: still another input
        handle.attrs["edited"] = 1
    code, _, err, _ = fresh_cli(*args)
    assert code == 2 and "--overwrite" in err, err


def test_a_kernel_numba_cannot_cache_is_compiled_for_the_run(monkeypatch, caplog):
    """A read-only install with a read-only home: numba's cache=True refused at decoration, and every
    prep cells and embed ended in a traceback. The kernel is compiled uncached, said once."""
    import numba

    from biomask.cells import kernels

    real, calls = numba.njit, []
    real(lambda a: a)(1)  # numba's own modules, loaded by a first compile, decorate with njit too

    def njit(*args, cache=False, **kwargs):
        calls.append(cache)
        if cache:
            raise RuntimeError("cannot cache function 'f': no locator available for file '/ro/f.py'")
        return real(*args, cache=cache, **kwargs)

    monkeypatch.setattr(numba, "njit", njit)
    monkeypatch.setattr(kernels, "_said", False)
    compiled = kernels.njit(lambda a, b: a + b)
    assert compiled(2, 3) == 5 and calls == [True, False]
    assert "numba cannot write its cache" in caplog.text and "NUMBA_CACHE_DIR" in caplog.text


_FULL_DISK = """
import os, resource, signal, sys
from pathlib import Path
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
root = Path(sys.argv[1])
"""


def test_a_full_home_is_named_as_numbas_cache_not_as_the_output(tmp_path):
    """A full or over-quota home passed the permission check, then numba's save of its cache failed
    mid-command (after `embed` had embedded every cell) and was reported as the output's failure:
    "writing the output X failed ... free some space (or choose an output on another file system)",
    which changes nothing. The start-up check now writes a file there, and an error numba raises
    names numba's cache and NUMBA_CACHE_DIR."""
    import os
    import subprocess
    import sys

    probe = (
        _FULL_DISK
        + """
os.environ["XDG_CACHE_HOME"] = str(root / "home-cache")
os.environ.pop("NUMBA_CACHE_DIR", None)
import tempfile
tempfile.tempdir = str(root / "tmp")
os.makedirs(tempfile.tempdir)
from biomask.cells import kernels
print(kernels.use_writable_cache())
"""
    )
    (tmp_path / "a").mkdir()
    run = subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path / "a"), "4096"], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(tmp_path / "a" / "tmp" / f"biomask-numba-{os.getuid()}"), run.stdout
    assert "cannot be written: compiling into" in run.stderr
    assert not list((tmp_path / "a" / "home-cache" / "numba").iterdir())  # the probe file is gone
    # a probe a killed run left (the next container has its PID) does not send later runs elsewhere
    from biomask.cells import kernels

    home = tmp_path / "home-numba"
    home.mkdir()
    stale = home / f".biomask-probe-{os.getpid()}"
    stale.write_bytes(b"left by a kill")
    os.utime(stale, (0, 0))
    assert kernels._room_for_a_cache(home) and not stale.exists() and not list(home.iterdir())
    (tmp_path / "b").mkdir()  # room enough: numba's own place is kept
    run = subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path / "b"), str(8 << 20)], capture_output=True, text=True
    )
    assert run.returncode == 0 and run.stdout.strip() == "None", run.stderr
    save = (
        _FULL_DISK
        + """
os.environ["NUMBA_CACHE_DIR"] = str(root / "numba")
(root / "kernel_mod.py").write_text("import numba\\n@numba.njit(cache=True)\\ndef f(x):\\n    return x * x\\n")
sys.path.insert(0, str(root))
from biomask.errors import EnvironmentIOError
from biomask.outputs import atomic_output_dir
try:
    with atomic_output_dir(root / "out"):
        import kernel_mod
        kernel_mod.f(3)
except EnvironmentIOError as exc:
    print(exc)
# outside an output too (the command line's handler of file-system errors): named as numba's
sys.path.remove(str(root))
sys.modules.pop("kernel_mod", None)
(root / "kernel_mod.py").write_text("import numba\\n@numba.njit(cache=True)\\ndef g(x):\\n    return x + 1\\n")
from biomask.errors import describe_os_error
sys.path.insert(0, str(root))
try:
    import kernel_mod
    kernel_mod.g(3)
except OSError as exc:
    print("HANDLER", describe_os_error(exc))
"""
    )
    (tmp_path / "c").mkdir()
    run = subprocess.run(
        [sys.executable, "-c", save, str(tmp_path / "c"), "1024"], capture_output=True, text=True
    )
    said, handler = run.stdout.strip().split("\nHANDLER ")
    assert handler.startswith("numba could not save its compiled code"), (handler, run.stderr)
    assert said.startswith(f"nothing was written to {tmp_path / 'c' / 'out'}: numba could not save"), (
        said,
        run.stderr,
    )
    assert str(tmp_path / "c" / "numba") in said and "NUMBA_CACHE_DIR" in said
    assert "choose an output on another file system" not in said and not (tmp_path / "c" / "out").exists()


def test_a_home_whose_cache_cannot_be_written_gets_a_private_numba_cache(tmp_path, monkeypatch, caplog):
    """scanpy, umap and pynndescent cache their numba functions when imported: with a read-only install
    and a home that cannot be written, `embed` failed with a traceback after embedding every cell, as
    did knn evaluation and HVG selection. The command line points numba at this user's temporary
    folder first (not another user's of that name), and leaves a NUMBA_CACHE_DIR the user set alone."""
    import os
    from pathlib import Path

    import numba

    from biomask.cells import kernels

    (tmp_path / "home-file").write_text("")  # a home where nothing can be made, even by root
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home-file" / "cache"))
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.delenv(kernels._SET_HERE, raising=False)  # restored after the test
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    monkeypatch.setattr(numba.core.config, "CACHE_DIR", "")
    folder = kernels.use_writable_cache()
    assert folder == tmp_path / f"biomask-numba-{os.getuid()}" and folder.stat().st_mode & 0o777 == 0o700
    assert os.environ["NUMBA_CACHE_DIR"] == str(folder) == numba.core.config.CACHE_DIR
    assert "cannot be written: compiling into" in caplog.text
    assert kernels.use_writable_cache() is None  # set now (or by the user): left as it is
    monkeypatch.delenv("NUMBA_CACHE_DIR")
    folder.rmdir()
    folder.symlink_to(tmp_path)  # someone else's link under that name
    assert kernels.use_writable_cache() is None and "NUMBA_CACHE_DIR" not in os.environ
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # a writable home: numba's own place
    assert kernels.use_writable_cache() is None and "NUMBA_CACHE_DIR" not in os.environ
    folder.unlink()
    real_access = os.access  # an existing cache folder this user may not write (root writes anywhere)
    monkeypatch.setattr(
        kernels.os, "access", lambda p, mode: Path(p) != tmp_path / "cache" / "numba" and real_access(p, mode)
    )
    assert kernels.use_writable_cache() == tmp_path / f"biomask-numba-{os.getuid()}"
    monkeypatch.delenv("NUMBA_CACHE_DIR")
    from biomask.cli import main  # the command line does it before any command runs

    assert main(["datasets", "list"]) == 0 and os.environ["NUMBA_CACHE_DIR"] == str(
        tmp_path / f"biomask-numba-{os.getuid()}"
    )
    # jobs on other machines (sbatch passes the environment on) do not get this machine's folder; a
    # NUMBA_CACHE_DIR the user set is theirs to keep
    assert "NUMBA_CACHE_DIR" not in kernels.environment_for_jobs()
    monkeypatch.setenv("NUMBA_CACHE_DIR", "/scratch/me/numba")
    assert kernels.environment_for_jobs()["NUMBA_CACHE_DIR"] == "/scratch/me/numba"
