"""`biomask embed` and `biomask.embed` on real data (pbmc68k_reduced, the UCI splice set) with briefly
pretrained tiny checkpoints: obsm/uns written and the rest of the file untouched, tokenization
identical to the prep stage, vectors independent of batch and chunk sizes, scanpy neighbors / UMAP /
Leiden on the result, DNA sequences and windows, and bad input refused with nothing written."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import biomask
from biomask import datasets
from biomask.cells.config import CountsConfig
from biomask.cells.encode import CellEncoder, checkpoint_prep
from biomask.cells.readers import open_matrix
from biomask.dna.tokenizers import load_tokenizer
from biomask.embedding.anndata_io import embedding_digest
from biomask.embedding.inference import embed_records
from biomask.models import load_pretrained, read_checkpoint_config
from biomask.store import TokenStore
from tests.conftest import fresh_cli, leftovers

pytestmark = [pytest.mark.network, pytest.mark.timeout(300)]

# pbmc68k_reduced's .raw holds log1p(counts / n_counts * 1e4): counts are rebuilt as in its prep config.
COUNTS = ["matrix=raw", "counts.mode=from_log1p", "counts.total_counts_column=n_counts"]


@pytest.fixture(scope="module")
def pbmc_h5ad():
    return datasets.fetch("pbmc68k_reduced")


def read(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy-layout notes
        return anndata.read_h5ad(path)


def dense(m):
    return m.toarray() if sp.issparse(m) else np.asarray(m)


@pytest.fixture(scope="module")
def embedded(pbmc_h5ad, cells_checkpoint, tmp_path_factory):
    """pbmc68k_reduced embedded by the CLI, with a UMAP coloured by cell type."""
    from biomask.cli import main

    out = tmp_path_factory.mktemp("embed") / "pbmc.emb.h5ad"
    args = ["-q", "embed", "--checkpoint", cells_checkpoint, "--input", pbmc_h5ad, "--output", out]
    # --matrix raw: the flag for COUNTS' matrix=raw
    assert main([str(a) for a in [*args, "--umap-color", "bulk_labels", "--matrix", "raw", *COUNTS[1:]]]) == 0
    return out


@pytest.mark.parametrize("layout", ["legacy", "current"])
def test_embed_on_a_full_disk_says_so_and_leaves_nothing(pbmc_h5ad, cells_checkpoint, tmp_path, layout):
    """A full disk while embed wrote its .h5ad (here a file-size limit, which fails a write as a full
    disk does): HDF5 failed in every object it freed, hundreds of lines of tracebacks, and its close
    crashed the interpreter (exit 139), the message never reached. One message, exit 2, nothing left."""
    import subprocess

    source = pbmc_h5ad  # anndata's legacy layout: read whole and written again
    limit = 2_000_000  # of its 4.6 MB
    if layout == "current":  # copied, then the vectors streamed into the copy
        source = tmp_path / "current.h5ad"
        read(pbmc_h5ad).write_h5ad(source)
        limit = source.stat().st_size + 50_000  # the copy fits, the vectors (179 kB) do not
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
        "from biomask.cli import entry\n"
        "entry()"
    )
    out = tmp_path / "out" / "pbmc.emb.h5ad"
    args = [
        "-q",
        "embed",
        "--checkpoint",
        cells_checkpoint,
        "--input",
        source,
        "--output",
        out,
        "--matrix",
        "raw",
    ]
    run = subprocess.run(
        [sys.executable, "-c", script, *map(str, [*args, *COUNTS[1:]])], capture_output=True, text=True
    )
    assert run.returncode == 2, run.stderr[-3000:]
    assert f"cannot use {out}" in run.stderr and "free some space" in run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.splitlines()) < 10, run.stderr[-3000:]
    assert not out.parent.exists() and leftovers(tmp_path) == []  # the folder it made for the output too


def test_embed_adds_obsm_and_uns_and_leaves_the_rest_of_the_file_as_it_was(
    embedded, pbmc_h5ad, cells_checkpoint, cli
):
    before, after = read(pbmc_h5ad), read(embedded)
    vectors = after.obsm["X_biomask"]
    assert vectors.shape == (700, 32) and vectors.dtype == np.float32 and np.isfinite(vectors).all()
    assert len(np.unique(vectors.round(5), axis=0)) > 650  # one vector per cell, not a collapse
    # everything else as it was
    assert np.array_equal(dense(before.X), dense(after.X))
    pd.testing.assert_frame_equal(before.obs, after.obs)
    pd.testing.assert_frame_equal(before.var, after.var)
    assert np.array_equal(dense(before.raw.X), dense(after.raw.X))
    pd.testing.assert_frame_equal(before.raw.var, after.raw.var)
    assert set(after.obsm) == set(before.obsm) | {"X_biomask"}
    for key in before.obsm:
        assert np.array_equal(before.obsm[key], after.obsm[key], equal_nan=True), key
    for key in before.varm:
        assert np.array_equal(before.varm[key], after.varm[key], equal_nan=True), key
    assert set(after.uns) == set(before.uns) | {"X_biomask"}
    assert list(after.uns["bulk_labels_colors"]) == list(before.uns["bulk_labels_colors"])
    # provenance
    info = after.uns["X_biomask"]
    ckpt = read_checkpoint_config(cells_checkpoint)
    assert info["checkpoint_weights_sha256"] == ckpt["weights_sha256"]
    assert (info["layer"], info["pooling"], info["key"]) == (-1, "mean", "X_biomask")
    assert info["masking_scheme"] == "r2mae" and json.loads(info["masking"])["scheme"] == "r2mae"
    assert info["code"]["biomask"] == biomask.__version__
    import torch

    environment = json.loads(info["environment"])  # what computed the vectors, for a methods section
    assert environment["packages"]["torch"] == torch.__version__
    assert environment["packages"]["anndata"] and environment["torch_threads"] >= 1
    assert environment["python"] == sys.version.split()[0] and "cuda_device" in environment
    assert info["gene_coverage"]["fraction_of_dataset_genes"] == pytest.approx(1.0)
    assert info["tokenization"]["scheme"] == "binned" and info["tokenization"]["n_bins"] == 51
    assert info["cells_without_vocabulary_genes"] == 0
    # the UMAP PNG beside it
    png = embedded.with_name("pbmc.emb.umap.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # rerun with the same inputs: reused
    code, _, err = cli("embed", "--checkpoint", cells_checkpoint, "--input", pbmc_h5ad, "--output", embedded,
                       "--umap-color", "bulk_labels", *COUNTS)  # fmt: skip
    assert code == 0 and "up to date" in err


def test_an_output_whose_vectors_were_edited_is_not_reused(
    pbmc_h5ad, cells_checkpoint, splice_store, dna_checkpoint, tmp_path, cli, monkeypatch
):
    """An .h5ad output has no run record, and a large folder output's file lies past its record's
    digest budget: an edited obsm was reused as this config's result, and the report drew its UMAP as
    biomask's. The vectors' sha256 is in uns[key]: a rerun refuses, the report says so."""
    from biomask import outputs

    def edit(h5ad: Path, key: str = "X_biomask") -> None:
        with h5py.File(h5ad, "r+") as handle:
            handle[f"obsm/{key}"][0, 0] += 1.0

    cells = ["embed", "--checkpoint", cells_checkpoint, "--input", pbmc_h5ad, *COUNTS]
    dna = ["embed", "--checkpoint", dna_checkpoint, "--input", splice_store]
    for args, out in ((cells, tmp_path / "cells.h5ad"), (dna, tmp_path / "dna.h5ad")):
        assert cli(*args, "--output", out)[0] == 0
        recorded = read(out).uns["X_biomask"]["embedding_sha256"]
        assert recorded == embedding_digest(read(out).obsm["X_biomask"])
        edit(out)
        code, _, err = cli(*args, "--output", out)
        assert code == 2 and "obsm['X_biomask'] changed since biomask embed wrote it" in err, err
        code, _, err = cli(*args, "--output", out, "--overwrite")
        assert code == 0 and read(out).uns["X_biomask"]["embedding_sha256"] == recorded, err
    # an input in anndata's current layout is written by streaming into a copy (pbmc68k_reduced's
    # legacy layout is read into memory): its digest too
    current = tmp_path / "current.h5ad"
    read(pbmc_h5ad).write_h5ad(current)
    streamed = [
        "embed",
        "--checkpoint",
        cells_checkpoint,
        "--input",
        current,
        *COUNTS,
        "--output",
        tmp_path / "s.h5ad",
    ]
    assert cli(*streamed)[0] == 0
    edit(tmp_path / "s.h5ad")
    code, _, err = cli(*streamed)
    assert code == 2 and "changed since biomask embed wrote it" in err, err
    # an output written before the digest was kept is reused as before; one whose vectors are gone is not
    assert cli(*streamed, "--overwrite")[0] == 0
    with h5py.File(tmp_path / "s.h5ad", "r+") as handle:
        del handle["uns/X_biomask/embedding_sha256"]
    code, _, err = cli(*streamed)
    assert code == 0 and "up to date" in err, err
    assert cli(*streamed, "--overwrite")[0] == 0
    with h5py.File(tmp_path / "s.h5ad", "r+") as handle:
        del handle["obsm/X_biomask"]
    code, _, err = cli(*streamed)
    assert "up to date" not in err, err
    monkeypatch.setattr(outputs, "DIGEST_BUDGET_BYTES", 0)  # the folder's h5ad as a large one's
    folder = tmp_path / "folder"
    assert cli(*cells, "--output", folder)[0] == 0
    edit(folder / "embeddings.h5ad")
    code, _, err = cli(*cells, "--output", folder)
    assert code == 2 and "changed since biomask embed wrote it" in err, err
    report = tmp_path / "report.yaml"
    report.write_text(
        f"output: {tmp_path / 'report'}\npretrain: {{cells: [{cells_checkpoint.parent}]}}\n"
        f"embedding: {{path: {folder / 'embeddings.h5ad'}, color: bulk_labels}}\n"
    )
    # the report draws the file as it is (a subset of the embedded cells is a usual thing to draw)
    # and says its vectors are not those biomask embed wrote
    code, _, err = cli("report", "-c", report)
    assert code == 0 and "is not what biomask embed wrote" in err, err
    text = (tmp_path / "report" / "report.md").read_text()
    assert "**Its vectors are not those biomask embed wrote**" in text
    from biomask.report.report import _vectors_note

    assert cli("embed", *cells[1:], "--output", folder, "--overwrite")[0] == 0
    assert _vectors_note(str(folder / "embeddings.h5ad"), "X_biomask") == ""
    # embed's `key` chose another obsm key: the report refused it ("run `biomask embed` on it first",
    # which had just been done) and had no setting to find it; the key biomask wrote is named
    keyed = tmp_path / "keyed"
    assert cli(*cells, "key=X_cells", "--output", keyed)[0] == 0
    report.write_text(report.read_text().replace(str(folder), str(keyed)))
    code, _, err = cli("report", "-c", report, "--overwrite")
    assert code == 2 and "no obsm['X_biomask']" in err and "set embedding.key=X_cells" in err, err
    code, _, err = cli("report", "-c", report, "--overwrite", "embedding.key=X_cells")
    assert code == 0, err
    text = (tmp_path / "report" / "report.md").read_text()
    assert "`obsm['X_cells']`" in text and "embedded by the checkpoint" in text
    assert "not those biomask embed wrote" not in text
    edit(keyed / "embeddings.h5ad", "X_cells")  # its vectors checked against uns['X_cells']'s sha256
    code, _, err = cli("report", "-c", report, "--overwrite", "embedding.key=X_cells")
    assert code == 0 and "obsm['X_cells'] is not what biomask embed wrote" in err, err
    assert "sha256 in `uns['X_cells']` differs" in (tmp_path / "report" / "report.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="torch sees a GPU here")
def test_a_device_is_checked_for_a_loaded_model_and_load_pretrained_takes_auto(cells_checkpoint, pbmc_h5ad):
    """load_pretrained(device="cuda") on a CPU node was torch's AssertionError and "auto" (which every
    other entry point takes) a RuntimeError; biomask.embed(adata, model, device="nonsense") embedded on
    the model's device without a word."""
    from biomask.errors import ConfigError

    model = load_pretrained(cells_checkpoint, device="auto")
    assert next(model.parameters()).device.type == "cpu"
    for device in ("cuda", "cuda:1", "mps", "nonsense"):
        with pytest.raises(ConfigError, match="device="):
            load_pretrained(cells_checkpoint, device=device)
        with pytest.raises(ConfigError, match="device="):
            biomask.embed(read(pbmc_h5ad), model, device=device, matrix="raw", counts=dict(zip(
                ("mode", "total_counts_column"), ("from_log1p", "n_counts"))))  # fmt: skip
    embedded = biomask.embed(read(pbmc_h5ad), model, device="cpu", matrix="raw", copy=True,
                             counts={"mode": "from_log1p", "total_counts_column": "n_counts"})  # fmt: skip
    assert embedded.obsm["X_biomask"].shape[0] == 700


def test_scanpy_neighbors_umap_and_leiden_run_on_the_embedding(embedded):
    import scanpy as sc

    adata = read(embedded)
    sc.pp.neighbors(adata, use_rep="X_biomask", random_state=0)
    sc.tl.umap(adata, random_state=0)
    sc.tl.leiden(adata, flavor="igraph", n_iterations=2, directed=False, random_state=0)
    assert adata.obsm["X_umap"].shape == (700, 2) and np.isfinite(adata.obsm["X_umap"]).all()
    assert adata.obs["leiden"].nunique() > 1


def test_current_layout_file_only_gains_the_embedding(pbmc_h5ad, cells_checkpoint, tmp_path, cli):
    """A file in anndata's current layout is copied: every other HDF5 object is byte-for-byte the input's."""
    adata = read(pbmc_h5ad)
    adata.layers["scaled"] = np.asarray(adata.X)
    source = tmp_path / "modern.h5ad"
    adata.write_h5ad(source)
    out = tmp_path / "out" / "modern.emb.h5ad"
    code, _, err = cli("embed", "--checkpoint", cells_checkpoint, "--input", source, "--output", out, *COUNTS)
    assert code == 0, err

    def objects(path):
        """Every group's attributes and every dataset's values and attributes."""
        found = {}
        with h5py.File(path, "r") as f:
            f.visititems(
                lambda name, obj: found.__setitem__(
                    name,
                    (obj[()], dict(obj.attrs)) if isinstance(obj, h5py.Dataset) else (None, dict(obj.attrs)),
                )
            )
        return found

    a, b = objects(source), objects(out)
    added = {k for k in b if k not in a}
    assert {"obsm/X_biomask", "uns/X_biomask"} <= added
    assert all(k.startswith(("obsm/X_biomask", "uns/X_biomask")) for k in added)
    for name, (values, attrs) in a.items():
        theirs = b[name][0]
        if values is not None:
            floats = getattr(values, "dtype", np.dtype(object)).kind == "f"
            assert np.array_equal(values, theirs, equal_nan=floats), name
        assert str(attrs) == str(b[name][1]), name
    assert np.array_equal(read(out).layers["scaled"], adata.layers["scaled"])


def test_cells_are_tokenized_exactly_as_the_prep_stage_did(pbmc_h5ad, pbmc_store, cells_checkpoint):
    """The checkpoint carries its corpus's tokenization: a new file's cells become the same records."""
    info = read_checkpoint_config(cells_checkpoint)
    assert (
        info["prep"]["tokenizer"]["scheme"] == "binned" and info["prep"]["normalise"]["target_sum"] == 10000
    )
    encoder = CellEncoder(
        checkpoint_prep(cells_checkpoint, info),
        counts=CountsConfig(mode="from_log1p", total_counts_column="n_counts"),
    )
    source = open_matrix(pbmc_h5ad, "h5ad", "raw")
    try:
        opened = encoder.open(source)
        records = [r for _, block, _ in encoder.blocks(opened, 256) for r in block]
        position = {cell: i for i, cell in enumerate(source.obs.index)}
    finally:
        source.close()
    store = TokenStore(pbmc_store)
    compared = 0
    for name in store.splits:
        split = store.split(name)
        for i, cell in enumerate(split.meta()["id"].astype(str)):
            ours, theirs = records[position[cell]], split[i]
            for field in ("tokens", "values", "bins"):
                assert np.array_equal(ours[field], np.asarray(theirs[field])), (cell, field)
            compared += 1
    assert compared == 700


def test_api_embeds_the_same_under_a_callers_float64_default(pbmc_h5ad, cells_checkpoint, embedded):
    """A notebook that set torch's default dtype to float64 (GPyTorch, BoTorch users) got "stored as
    torch.float32, not the model's torch.float64; export the checkpoint again" from a good checkpoint."""
    adata = read(pbmc_h5ad)
    counts = {"mode": "from_log1p", "total_counts_column": "n_counts"}
    torch.set_default_dtype(torch.float64)
    try:
        with torch.no_grad():
            biomask.embed(adata, cells_checkpoint, matrix="raw", counts=counts)
        assert torch.get_default_dtype() == torch.float64  # the caller's, back
    finally:
        torch.set_default_dtype(torch.float32)
    np.testing.assert_allclose(adata.obsm["X_biomask"], read(embedded).obsm["X_biomask"], rtol=0, atol=2e-5)


def test_api_fills_the_anndata_in_place_independent_of_batch_and_chunk_sizes(
    pbmc_h5ad, pbmc_store, cells_checkpoint, embedded
):
    import scanpy as sc

    adata = read(pbmc_h5ad)
    counts = {"mode": "from_log1p", "total_counts_column": "n_counts"}
    returned = biomask.embed(
        adata, cells_checkpoint, matrix="raw", counts=counts, batch_size=5, chunk_size=97
    )
    assert returned is None and adata.uns["X_biomask"]["pooling"] == "mean"  # in place, as scanpy
    reference = read(embedded).obsm["X_biomask"]  # the CLI: batch 64, one chunk
    np.testing.assert_allclose(adata.obsm["X_biomask"], reference, rtol=0, atol=2e-5)
    sc.pp.neighbors(adata, use_rep="X_biomask")
    sc.tl.umap(adata)
    assert adata.obsm["X_umap"].shape == (700, 2)
    # and at the level of records: batch sizes 1, 7, 700 give the same vector to every cell
    model = load_pretrained(cells_checkpoint)
    records = [r for r in TokenStore(pbmc_store).split("train")][:60]
    vectors = [
        embed_records(model, records, pooling=p, batch_size=b) for p in ("cls", "mean") for b in (1, 7, 60)
    ]
    for a in vectors[1:3]:
        np.testing.assert_allclose(a, vectors[0], rtol=0, atol=2e-5)
    for a in vectors[4:]:
        np.testing.assert_allclose(a, vectors[3], rtol=0, atol=2e-5)


def test_a_missing_totals_column_says_that_counts_need_none(pbmc_h5ad, cells_checkpoint):
    """Counts in X with a config that names a totals column obs lacks: `prep cells` said that None sums
    each cell's counts; `biomask.embed` named only the missing column."""
    from biomask.errors import InputError

    raw = read(pbmc_h5ad)
    x = raw.raw.X.toarray() if sp.issparse(raw.raw.X) else np.asarray(raw.raw.X)
    counts = np.rint(np.expm1(x) * raw.obs["n_counts"].to_numpy()[:, None] / 1e4)
    adata = anndata.AnnData(counts.astype(np.float32), var=raw.raw.var.copy())
    adata.obs_names = raw.obs_names
    with pytest.raises(InputError, match="obs has no column 'n_counts'") as err:
        biomask.embed(adata, cells_checkpoint, counts={"mode": "require", "total_counts_column": "n_counts"})
    assert "null sums each cell's counts (None in Python)" in str(err.value)
    assert "X_biomask" not in adata.obsm


def test_a_view_of_a_backed_anndata_is_embedded_with_copy_true(pbmc_h5ad, cells_checkpoint, tmp_path):
    """One sample of a backed multi-sample file (`backed[backed.obs[...] == ...]`): its own cells, in its
    order, with the vectors the whole file gives them; in place it cannot be (anndata writes nothing into
    a backed view), which is said with the way out, not as a cell-count mismatch."""
    from biomask.errors import InputError

    path = tmp_path / "pbmc.h5ad"
    read(pbmc_h5ad).write_h5ad(path)
    counts = {"mode": "from_log1p", "total_counts_column": "n_counts"}
    backed = anndata.read_h5ad(path, backed="r")
    mask = (backed.obs["bulk_labels"] == "CD14+ Monocyte").to_numpy()
    view = backed[mask]
    with pytest.raises(InputError, match=r"view of a backed AnnData .* Pass copy=True"):
        biomask.embed(view, cells_checkpoint, matrix="raw", counts=counts)
    out = biomask.embed(view, cells_checkpoint, matrix="raw", counts=counts, copy=True)
    whole = read(path)
    biomask.embed(whole, cells_checkpoint, matrix="raw", counts=counts)
    assert not out.isbacked and list(out.obs_names) == list(whole.obs_names[mask])
    np.testing.assert_allclose(out.obsm["X_biomask"], whole.obsm["X_biomask"][mask], rtol=0, atol=2e-5)
    assert "X_biomask" not in backed.obsm and backed.isbacked


def test_ensembl_ids_against_a_symbol_vocabulary_name_the_python_argument(
    pbmc_h5ad, cells_checkpoint, caplog
):
    """A sample whose var index holds Ensembl IDs (symbols in a var column), embedded from Python:
    gene_column="auto" finds the column that matches (and says so); the var index asked for by name
    gives a message pointing at `gene_column=` and the column to pass, not the config key genes.column."""
    from biomask.errors import InputError

    raw = read(pbmc_h5ad).raw
    var = pd.DataFrame(
        {"symbol": raw.var_names.to_numpy()}, index=[f"ENSG{i:011d}" for i in range(raw.n_vars)]
    )
    adata = anndata.AnnData(raw.X.copy(), obs=read(pbmc_h5ad).obs, var=var)
    with pytest.raises(InputError) as err:
        biomask.embed(adata, cells_checkpoint, counts={"mode": "log1p"}, gene_column=None)
    assert "set gene_column=" in str(err.value) and "symbol" in str(err.value)
    assert "genes.column" not in str(err.value) and "X_biomask" not in adata.obsm
    by_name = biomask.embed(
        adata, cells_checkpoint, counts={"mode": "log1p"}, gene_column="symbol", copy=True
    )
    with caplog.at_level("WARNING", logger="biomask"):
        biomask.embed(adata, cells_checkpoint, counts={"mode": "log1p"})
    assert "matched on var column 'symbol' instead" in caplog.text
    assert adata.uns["X_biomask"]["gene_id_column"] == "symbol"
    np.testing.assert_array_equal(adata.obsm["X_biomask"], by_name.obsm["X_biomask"])


@pytest.mark.parametrize(
    "case", ["dna_checkpoint", "zero_overlap", "missing_obs_column", "output_is_input", "no_such_layer"]
)
def test_bad_input_exits_2_naming_the_problem_and_writes_nothing(
    case, pbmc_h5ad, cells_checkpoint, dna_checkpoint, tmp_path, cli
):
    source, checkpoint, extra = pbmc_h5ad, cells_checkpoint, []
    out = tmp_path / "out" / "x.h5ad"
    if case == "dna_checkpoint":
        checkpoint, expected = dna_checkpoint, "is a dna model"
    elif case == "zero_overlap":
        adata = read(pbmc_h5ad)
        adata.raw = anndata.AnnData(
            adata.raw.X, var=pd.DataFrame(index=[f"ENSG{i:011d}" for i in range(adata.raw.n_vars)])
        )
        source = tmp_path / "ensembl.h5ad"
        adata.write_h5ad(source)
        expected = "none of its 765 genes"
    elif case == "no_such_layer":
        extra, expected = ["--layer", "3"], "layer 3 does not exist: the model has 2 blocks"
    elif case == "missing_obs_column":
        extra, expected = ["--umap-color", "cell_type"], "obs has no column 'cell_type'"
    else:
        source = tmp_path / "copy.h5ad"
        source.write_bytes(pbmc_h5ad.read_bytes())
        out, expected = source, "is the input file"
    before = source.read_bytes()
    code, _, err = cli(
        "embed", "--checkpoint", checkpoint, "--input", source, "--output", out, *COUNTS, *extra
    )
    assert code == 2, err
    assert expected in err
    if case != "no_such_layer":
        assert str(source if case != "dna_checkpoint" else checkpoint) in err
    assert source.read_bytes() == before
    if case != "output_is_input":
        assert not out.parent.exists() or not any(out.parent.iterdir())
    assert not leftovers(tmp_path)


def test_dna_sequences_windows_and_stores_embed_with_ids_and_labels(
    splice_store, dna_checkpoint, cells_checkpoint, tmp_path, cli
):
    """A table of splice sequences gets the vectors of the same records read from the token store; a
    FASTA (named .fas, which `biomask prep dna` also reads) is cut into windows that never cross records."""
    tokenizer = load_tokenizer(splice_store)
    split = TokenStore(splice_store).split("test")
    meta, names = split.meta(), TokenStore(splice_store).label_names
    labels = split.record_field("labels")
    table = pd.DataFrame(
        {
            "id": meta["id"],
            "sequence": [tokenizer.decode(r["tokens"]) for r in split],
            "label": [names[i] for i in labels],
        }
    )
    table.to_csv(tmp_path / "splice.csv", index=False)
    code, _, err = cli("embed", "--checkpoint", dna_checkpoint, "--input", tmp_path / "splice.csv",
                       "--output", tmp_path / "table.h5ad", "dna.id_column=id", "--umap-color", "label")  # fmt: skip
    assert code == 0, err
    from_table = read(tmp_path / "table.h5ad")
    assert list(from_table.obs["label"]) == list(table["label"]) and list(from_table.obs_names) == list(
        table["id"]
    )
    assert from_table.uns["X_biomask"]["modality"] == "dna" and (tmp_path / "table.umap.png").exists()
    assert f"embedded {len(table):,} records" in err  # progress, chunk by chunk
    # an .h5ad output inside the checkpoint's folder is refused, as a folder output there is
    inside = Path(dna_checkpoint) / "vectors.h5ad"
    code, _, err = cli("embed", "--checkpoint", dna_checkpoint, "--input", tmp_path / "splice.csv",
                       "--output", inside)  # fmt: skip
    assert code == 2 and "lies inside the run's input directory" in err and not inside.exists(), err
    # a label column the user names must exist (the default one is copied only when there)
    code, _, err = cli("embed", "--checkpoint", dna_checkpoint, "--input", tmp_path / "splice.csv",
                       "--output", tmp_path / "typo.h5ad", "dna.label_column=lable")  # fmt: skip
    assert (
        code == 2 and "splice.csv: no label column 'lable'" in err and not (tmp_path / "typo.h5ad").exists()
    )
    # a ragged row is refused as prep refuses it, and lines are counted as prep counts them (its
    # default ids are `file:line`): blank lines and a quoted line break included
    seq = table["sequence"][0]
    (tmp_path / "ragged.csv").write_text(f"sequence,label\n{seq},a,extra\n{seq}\n")
    code, _, err = cli("embed", "--checkpoint", dna_checkpoint, "--input", tmp_path / "ragged.csv",
                       "--output", tmp_path / "ragged.h5ad")  # fmt: skip
    assert code == 2 and "ragged.csv, line 2: 3 fields, the header has 2" in err, err
    (tmp_path / "lines.csv").write_text(f'sequence,label,note\n\n{seq},a,"two\nlines"\n{seq},b,x\n')
    code, _, err = cli("embed", "--checkpoint", dna_checkpoint, "--input", tmp_path / "lines.csv",
                       "--output", tmp_path / "lines.h5ad")  # fmt: skip
    assert code == 0, err
    assert list(read(tmp_path / "lines.h5ad").obs_names) == ["lines.csv:4", "lines.csv:5"]
    code, _, err = cli(
        "embed", "--checkpoint", dna_checkpoint, "--input", splice_store, "--output", tmp_path / "store.h5ad"
    )
    assert code == 0, err
    from_store = read(tmp_path / "store.h5ad")
    test_rows = from_store[from_store.obs["split"] == "test"]
    assert list(test_rows.obs_names) == list(table["id"])
    np.testing.assert_allclose(test_rows.obsm["X_biomask"], from_table.obsm["X_biomask"], rtol=0, atol=2e-5)

    seqs = list(table["sequence"][:5])
    (tmp_path / "two.fas").write_text(f">a\n{''.join(seqs[:3])}\n>b\n{seqs[3][:40]}\n")  # 180 and 40 bases
    code, _, err = cli("embed", "--checkpoint", dna_checkpoint, "--input", tmp_path / "two.fas",
                       "--output", tmp_path / "fasta.h5ad", "dna.window=60", "dna.stride=30")  # fmt: skip
    assert code == 0, err
    windows = read(tmp_path / "fasta.h5ad").obs
    assert list(windows.index) == ["a:0-60", "a:30-90", "a:60-120", "a:90-150", "a:120-180", "b:0-40"]
    # a sequence longer than the model (128 bases here) is embedded whole in windows by default, as
    # evaluate does; the warning names it; refuse stops with exit 2 and writes nothing
    long = pd.DataFrame({"id": ["long", "short"], "sequence": ["".join(seqs[:4]), seqs[4]]})
    long.to_csv(tmp_path / "long.csv", index=False)
    vectors = {}
    for policy in ("window", "first", "refuse"):
        code, _, err = cli("embed", "--checkpoint", dna_checkpoint, "--input", tmp_path / "long.csv",
                           "--output", tmp_path / f"long-{policy}.h5ad", "dna.id_column=id",
                           f"dna.long_records={policy}")  # fmt: skip
        if policy == "refuse":
            assert code == 2 and "long.csv: record 'long' is longer than the model's input of 128" in err, err
            assert not (tmp_path / f"long-{policy}.h5ad").exists()
            continue
        assert code == 0 and "1 record is longer than the model's 128 tokens (long)" in err, err
        out = read(tmp_path / f"long-{policy}.h5ad")
        assert out.uns["X_biomask"]["long_records"] == policy
        assert out.uns["X_biomask"]["records_longer_than_model"] == 1
        vectors[policy] = out.obsm["X_biomask"]
    assert not np.allclose(vectors["window"][0], vectors["first"][0])  # the whole sequence, not its start
    np.testing.assert_allclose(vectors["window"][1], vectors["first"][1], atol=2e-5)  # a short one alike
    # dna.strands=both: one vector whichever strand the file holds (the mean over the two)
    rc = seqs[0][::-1].translate(str.maketrans("ACGT", "TGCA"))
    pd.DataFrame({"id": ["fwd", "rev"], "sequence": [seqs[0], rc]}).to_csv(tmp_path / "rc.csv", index=False)
    for strands in ("forward", "both"):
        code, _, err = cli("embed", "--checkpoint", dna_checkpoint, "--input", tmp_path / "rc.csv",
                           "--output", tmp_path / f"rc-{strands}.h5ad", "dna.id_column=id",
                           f"dna.strands={strands}")  # fmt: skip
        assert code == 0, err
    one, both = (read(tmp_path / f"rc-{s}.h5ad") for s in ("forward", "both"))
    assert both.uns["X_biomask"]["strands"] == "both"
    np.testing.assert_allclose(both.obsm["X_biomask"][0], both.obsm["X_biomask"][1], atol=2e-5)
    assert not np.allclose(one.obsm["X_biomask"][0], one.obsm["X_biomask"][1], atol=1e-3)
    np.testing.assert_allclose(
        both.obsm["X_biomask"][0], one.obsm["X_biomask"].mean(axis=0), atol=2e-5
    )  # the forward strand's vector and the reverse complement's, averaged
    code, _, err = cli("embed", "--checkpoint", dna_checkpoint, "--input", tmp_path / "two.fas",
                       "--output", tmp_path / "s.h5ad", "dna.stride=30")  # fmt: skip
    assert code == 2 and "dna.stride applies to dna.window's windows" in err
    # a key this input does not read is refused, not recorded in uns as if it had been applied
    code, _, err = cli("embed", "--checkpoint", dna_checkpoint, "--input", tmp_path / "long.csv",
                       "--output", tmp_path / "w.h5ad", "dna.window=60")  # fmt: skip
    assert code == 2 and "dna.window: not read for" in err and "a table" in err and "dna.id_column" in err, (
        err
    )
    assert not (tmp_path / "w.h5ad").exists()
    # and so are the expression keys, which only a cells .h5ad reads
    code, _, err = cli("embed", "--checkpoint", dna_checkpoint, "--input", tmp_path / "long.csv",
                       "--output", tmp_path / "w.h5ad", "--matrix", "raw", "counts.mode=log1p")  # fmt: skip
    assert code == 2 and "matrix, counts: not read for" in err and "DNA sequences" in err, err
    code, _, err = cli("embed", "--checkpoint", dna_checkpoint, "--input", tmp_path / "long.csv",
                       "--output", tmp_path / "w.h5ad", "standardise=data")  # fmt: skip
    assert code == 2 and "standardise: not read for" in err, err
    assert not (tmp_path / "w.h5ad").exists()
    # records that share a name stay apart (never joined into one sequence), in a FASTA as in a table;
    # their rows are named as scanpy's make_unique names them
    (tmp_path / "dup.fa").write_text("".join(f">{n}\n{s}\n" for n, s in zip(["d", "d", "x", "d"], seqs[:4])))
    table.iloc[:4].assign(id=["d", "d", "x", "d"]).to_csv(tmp_path / "dup.csv", index=False)
    for name, extra in (("dup.fa", []), ("dup.csv", ["dna.id_column=id"])):
        code, _, err = cli("embed", "--checkpoint", dna_checkpoint, "--input", tmp_path / name,
                           "--output", tmp_path / f"{name}.h5ad", *extra)  # fmt: skip
        assert code == 0, err
        assert "2 sequence(s) share a name with an earlier one ('d')" in err
        dup = read(tmp_path / f"{name}.h5ad")
        assert list(dup.obs_names) == ["d", "d-1", "x", "d-2"] and list(dup.obs["id"]) == ["d", "d", "x", "d"]
        np.testing.assert_allclose(dup.obsm["X_biomask"], from_table.obsm["X_biomask"][:4], rtol=0, atol=2e-5)
    # a cells checkpoint refuses sequences
    code, _, err = cli(
        "embed",
        "--checkpoint",
        cells_checkpoint,
        "--input",
        tmp_path / "two.fas",
        "--output",
        tmp_path / "n.h5ad",
    )
    assert code == 2 and "is a cells model" in err and not (tmp_path / "n.h5ad").exists()


def test_a_config_file_and_a_directory_output_as_the_pipeline_runs_it(
    pbmc_h5ad, cells_checkpoint, embedded, tmp_path, cli, repo
):
    out = tmp_path / "stage"
    args = [
        "embed",
        "--config",
        repo / "configs/embed/pbmc68k_reduced.yaml",
        f"checkpoint={cells_checkpoint}",
    ]
    args += [f"input={pbmc_h5ad}", f"output={out}", "batch_size=17"]
    code, printed, err = cli(*args)
    assert code == 0, err
    assert printed.strip() == str(out / "embeddings.h5ad")
    assert {p.name for p in out.iterdir()} == {"embeddings.h5ad", "umap.png", "config.yaml", "run.json"}
    inputs = {i["name"]: i for i in json.loads((out / "run.json").read_text())["inputs"]}
    assert inputs["checkpoint"]["sha256"] == read_checkpoint_config(cells_checkpoint)["weights_sha256"]
    np.testing.assert_allclose(
        read(out / "embeddings.h5ad").obsm["X_biomask"], read(embedded).obsm["X_biomask"], rtol=0, atol=2e-5
    )
    code, _, err = cli(*args[:-1], "batch_size=64")  # batch size is not part of the result: reused
    assert code == 0 and "up to date" in err
    code, _, err = cli(*args, "pooling=cls")  # another result in the same place: refused
    assert code == 2 and "--overwrite" in err
    # as a pipeline starts it, a process of its own: reused before torch, anndata or matplotlib is
    # imported (most of a reused embed's time); another result is still refused, naming the key
    code, printed, err, heavy = fresh_cli(*args)
    assert (code, printed, heavy) == (0, str(out / "embeddings.h5ad"), []), err
    assert "up to date" in err
    code, _, err, _ = fresh_cli(*args, "pooling=cls")
    assert code == 2 and "pooling: 'mean' -> 'cls'" in err and "--overwrite" in err, err


def test_fasta_windows_hold_their_bases_across_blocks_whatever_the_stride(splice_store, tmp_path, caplog):
    """Windows are read from 1 MiB blocks: each window's id names the bases it holds, also when the
    stride is longer than the window and a skip runs past a block's end; the uncovered tails are
    counted (bases after the last window)."""
    from biomask.dna.cleaning import Cleaner
    from biomask.embedding.dna import read_fasta

    tokenizer = load_tokenizer(splice_store)
    rng = np.random.default_rng(0)
    seqs = {
        "a": "".join(rng.choice(list("ACGT"), 150)),
        "b": "".join(rng.choice(list("ACGT"), (1 << 20) + 3000)),
    }
    (tmp_path / "g.fa").write_text("".join(f">{n}\n{s}\n" for n, s in seqs.items()))
    for window, stride, tail in ((100, 1000, 50 + 476), (128, 64, 22 + 56)):
        caplog.clear()
        with caplog.at_level("INFO", logger="biomask"):
            chunks = list(read_fasta(tmp_path / "g.fa", tokenizer, Cleaner(), window=window, stride=stride,
                                     chunk_size=10**9))  # fmt: skip
        for frame, records in chunks:
            for (_, row), record in zip(frame.iterrows(), records):
                assert row["end"] - row["start"] == window and row["start"] % stride == 0
                assert tokenizer.decode(record["tokens"]) == seqs[row["record"]][row["start"] : row["end"]]
        assert f"2 records end in bases after the last window ({tail} bases in all" in caplog.text


def test_a_10x_folder_points_to_read_cells_and_both_strands_need_sequences(
    pbmc_h5ad, cells_checkpoint, tmp_path, cli
):
    folder = tmp_path / "tenx"
    folder.mkdir()
    (folder / "matrix.mtx.gz").write_bytes(b"")
    code, _, err = cli(
        "embed", "--checkpoint", cells_checkpoint, "--input", folder, "--output", tmp_path / "a.h5ad"
    )
    assert code == 2 and "is a 10x folder" in err and f"biomask.read_cells('{folder}').write_h5ad(" in err
    code, _, err = cli("embed", "--checkpoint", cells_checkpoint, "--input", pbmc_h5ad,
                       "--output", tmp_path / "b.h5ad", *COUNTS, "dna.strands=both")  # fmt: skip
    assert code == 2 and "dna.strands: not read for" in err and "no dna.* key" in err, err
    assert not (tmp_path / "a.h5ad").exists() and not (tmp_path / "b.h5ad").exists()


def test_a_store_of_another_tokenizer_is_embedded_from_its_sequences(
    splice_store, dna_checkpoint, tmp_path, cli
):
    """A k-mer store embedded with a character model: its records decoded and re-tokenized, as
    `biomask evaluate` reads them, giving the vectors of the same records in the model's own store."""
    code, _, err = cli("prep", "dna", "-c", "configs/dna/splice.yaml", f"output={tmp_path / 'kmer'}",
                       "tokenizer.kind=kmer", "tokenizer.k=3")  # fmt: skip
    assert code == 0, err
    for name, store in (("char", splice_store), ("kmer", tmp_path / "kmer")):
        code, _, err = cli("embed", "--checkpoint", dna_checkpoint, "--input", store,
                           "--output", tmp_path / f"{name}.h5ad", "-v")  # fmt: skip
        assert code == 0, err
    char, kmer = read(tmp_path / "char.h5ad"), read(tmp_path / "kmer.h5ad")
    assert "re-tokenized" in err and kmer.uns["X_biomask"]["retokenized"]
    assert list(kmer.obs_names) == list(char.obs_names) and list(kmer.obs["label"]) == list(char.obs["label"])
    np.testing.assert_allclose(kmer.obsm["X_biomask"], char.obsm["X_biomask"], rtol=0, atol=2e-5)


@pytest.mark.filterwarnings("ignore:Variable names are not unique")  # anndata's note: the case under test
def test_duplicate_gene_names_follow_the_duplicates_argument(pbmc_h5ad, cells_checkpoint, caplog):
    """Two columns of one gene name, embedded from Python: the warning named the config key
    genes.duplicates, which biomask.embed had no argument for (it always summed); `duplicates=` now
    chooses, and the messages name it."""
    import logging

    from biomask.errors import InputError

    raw = read(pbmc_h5ad).raw
    adata = anndata.AnnData(raw.X.copy(), obs=read(pbmc_h5ad).obs, var=pd.DataFrame(index=raw.var_names))
    genes = list(adata.var_names)
    genes[1] = genes[0]
    adata.var_names = genes
    counts = {"mode": "log1p"}
    with caplog.at_level(logging.WARNING, logger="biomask"):
        summed = biomask.embed(adata, cells_checkpoint, counts=counts, copy=True)
    warning = next(r.getMessage() for r in caplog.records if "occur more than once" in r.getMessage())
    assert "added up (duplicates=;" in warning and "genes." not in warning
    with pytest.raises(InputError, match=r"set duplicates=: sum") as err:
        biomask.embed(adata, cells_checkpoint, counts=counts, duplicates="error")
    assert "genes." not in str(err.value) and "X_biomask" not in adata.obsm
    with pytest.raises(InputError, match="duplicates must be one of"):
        biomask.embed(adata, cells_checkpoint, counts=counts, duplicates="add")
    # "first": as if the second column were not there
    first = biomask.embed(adata, cells_checkpoint, counts=counts, duplicates="first", copy=True)
    without = biomask.embed(
        adata[:, [0, *range(2, adata.n_vars)]].copy(), cells_checkpoint, counts=counts, copy=True
    )
    np.testing.assert_allclose(first.obsm["X_biomask"], without.obsm["X_biomask"], rtol=0, atol=2e-5)
    assert not np.allclose(summed.obsm["X_biomask"], first.obsm["X_biomask"], rtol=0, atol=1e-3)


def test_a_store_of_many_files_embeds_with_each_windows_file_and_place(dna_checkpoint, tmp_path, cli, repo):
    """A genome store prepared from one file per sample, each with a record `chr1`: every window's
    row carries the store's metadata -- its source file, record, start, end and strand -- so windows
    that share an id (`chr1:0-100(+)` in each file) still say where they came from. Only id and
    split (and label) used to come along: 2 of every 2 rows here were named alike."""
    rng = np.random.default_rng(2)
    for sample in ("A", "B"):
        (tmp_path / sample).mkdir()
        (tmp_path / sample / "g.fa").write_text(f">chr1\n{''.join(rng.choice(list('ACGT'), 300))}\n")
    store = tmp_path / "store"
    code, _, err = cli("prep", "dna", "-c", repo / "configs/dna/splice.yaml", f"inputs=[{{path: {tmp_path}/*/g.fa}}]",
                       f"output={store}", "tokenizer.kind=char", "windows.length=100", "split.block_size=100")  # fmt: skip
    assert code == 0, err
    code, _, err = cli(
        "embed", "--checkpoint", dna_checkpoint, "--input", store, "--output", tmp_path / "e.h5ad"
    )
    assert code == 0, err
    obs = read(tmp_path / "e.h5ad").obs
    assert {"source", "record", "start", "end", "strand"} <= set(obs.columns)
    rows = sorted(zip(obs["source"], obs["id"], obs["start"].astype(int)))
    assert rows == sorted((f"{s}/g.fa", f"chr1:{a}-{a + 100}(+)", a) for s in "AB" for a in (0, 100, 200))


def test_embed_says_when_genes_scanpy_made_unique_are_left_out(pbmc_h5ad, cells_checkpoint, caplog):
    """The made-unique note at embed's side (prep's has its test): an AnnData whose second copy of a
    gene scanpy renamed `G-1` loses that copy's counts against the checkpoint's vocabulary; said."""
    source = read(pbmc_h5ad)
    genes = list(source.raw.var_names)
    named = anndata.AnnData(X=source.raw.X.copy(), obs=source.obs.copy())
    named.var_names = [f"{genes[3]}-1" if i == 7 else g for i, g in enumerate(genes)]
    counts = {"mode": "from_log1p", "total_counts_column": "n_counts"}
    with caplog.at_level("WARNING", logger="biomask"):
        biomask.embed(named, cells_checkpoint, counts=counts)
    assert f"{genes[3]}-1 beside {genes[3]}" in caplog.text and "their counts are left out" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="biomask"):
        biomask.embed(
            named[:, [i for i in range(len(genes)) if i != 3]].copy(), cells_checkpoint, counts=counts
        )
    assert "beside" not in caplog.text  # no G beside the copy: a gene of its own, nothing said


def test_embed_refuses_a_loaded_model_on_another_device_than_asked(cells_checkpoint, pbmc_h5ad, monkeypatch):
    """A model loaded on one device, embed(device=another): refused, naming where the model is (it ran
    where the model was, without a word). The GPU is stood in for: pick_device says cuda."""
    from biomask.embedding import inference
    from biomask.errors import InputError

    model = load_pretrained(cells_checkpoint, device="cpu")
    monkeypatch.setattr(inference, "pick_device", lambda device="auto": torch.device("cuda", 0))
    with pytest.raises(InputError, match="but the model given is on cpu"):
        biomask.embed(read(pbmc_h5ad), model, device="cuda", matrix="raw",
                      counts={"mode": "from_log1p", "total_counts_column": "n_counts"})  # fmt: skip
