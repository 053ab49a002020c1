"""What a user's own cells meet on the way in: matrices stored genes x cells, data of another species
than the model, a shipped config's QC thresholds on other cells, and a model that does worse than the
gene means. Found running fit_cells / prep / embed on real public sets (10x PBMC CITE-seq, celltypist's
sample, scvelo's mouse pancreas); the tests use SYNTHETIC counts: two Poisson "cell types" over gene
names written as human files write them (CD3E-like, with MT- genes), made here."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import yaml

from biomask.errors import InputError

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

MITO = ["MT-CO1", "MT-CO2", "MT-ND1", "MT-CYB"]
STEPS = {"train.steps": 20}


def synthetic_cells(n_cells: int = 80, n_genes: int = 60, seed: int = 0) -> ad.AnnData:
    """SYNTHETIC integer counts, cells x genes, 10x-like barcodes as cell names."""
    rng = np.random.default_rng(seed)
    kind = rng.integers(0, 2, n_cells)
    rates = rng.gamma(1.0, 2.0, (2, n_genes))
    counts = rng.poisson(rates[kind]).astype(np.float32)
    bases = np.array(list("ACGT"))
    cells = ["".join(rng.choice(bases, 16)) + "-1" for _ in range(n_cells)]
    genes = [f"GENE{i}" for i in range(n_genes - len(MITO))] + MITO
    return ad.AnnData(counts, obs=pd.DataFrame(index=cells), var=pd.DataFrame(index=genes))


def as_mouse(adata: ad.AnnData) -> ad.AnnData:
    """The same cells with gene names as mouse files write them (Gene1, mt-Co1)."""
    out = adata.copy()
    out.var_names = [
        g[:3].lower() + g[3:].capitalize() if g.startswith("MT-") else g.capitalize() for g in adata.var_names
    ]
    return out


def frozen_prep(adata: ad.AnnData, tmp_path, vocabulary, **settings):
    """A prep cells config for `adata` (written as tmp_path/cells.h5ad) against a frozen vocabulary."""
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    config = tmp_path / "prep.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "inputs": [{"path": str(path)}],
                "output": str(tmp_path / "store"),
                "tokenizer": {"scheme": "panel", "path": str(vocabulary)},
                **settings,
            }
        )
    )
    return config


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    import biomask

    adata = synthetic_cells()
    out = tmp_path_factory.mktemp("fit") / "run"
    checkpoint = biomask.fit_cells(adata, out, overrides=STEPS)
    return adata, out, checkpoint


def test_a_matrix_of_genes_by_cells_is_refused_not_trained_on(fitted, tmp_path, cli):
    """Read as it is, a CSV with a column per cell trained and embedded without a word: every gene
    taken for a cell (here 16,581 of them), every cell barcode for a gene."""
    import biomask

    adata, _, checkpoint = fitted
    transposed = adata.T.copy()  # var: barcodes, obs: genes with MT- among them
    with pytest.raises(InputError, match=r"looks transposed.*var names\) look like cell barcodes.*adata\.T"):
        biomask.fit_cells(transposed, tmp_path / "t", overrides=STEPS)
    assert not (tmp_path / "t").exists()
    # cells named without barcodes (celltypist's Cell_1, ...): the mitochondrial genes among the "cells" tell
    named = transposed.copy()
    named.var_names = [f"Cell_{i}" for i in range(named.n_vars)]
    with pytest.raises(InputError, match=r"obs names\) include mitochondrial genes \(MT-CO1"):
        biomask.embed(named, checkpoint)
    # ... and without mitochondrial genes either: the cell names are the checkpoint's genes
    plain = named[~named.obs_names.str.startswith("MT-")].copy()
    with pytest.raises(
        InputError, match=r"its cell names include \d+ of the vocabulary's genes .*looks transposed"
    ):
        biomask.embed(plain, checkpoint)
    mouse = as_mouse(adata).T.copy()
    mouse.var_names = named.var_names
    with pytest.raises(InputError, match=r"mitochondrial genes \(mt-Co1"):
        biomask.embed(mouse, checkpoint)
    # prep cells from the command line: exit 2, nothing written
    path = tmp_path / "genes_by_cells.h5ad"
    transposed.write_h5ad(path)
    config = tmp_path / "prep.yaml"
    config.write_text(yaml.safe_dump({"inputs": [{"path": str(path)}], "output": str(tmp_path / "store")}))
    code, _, err = cli("prep", "cells", "-c", config)
    assert code == 2 and "genes_by_cells.h5ad [X]: the matrix looks transposed" in err, err
    assert not (tmp_path / "store").exists()


def test_genes_of_another_species_are_named_as_such_not_as_a_column_to_set(fitted, tmp_path, cli):
    """Mouse cells against a human model share no identifier, and the message offered only a gene
    column and Ensembl version suffixes, neither of which can help."""
    import biomask

    adata, out, checkpoint = fitted
    mouse = as_mouse(adata)
    with pytest.raises(InputError) as err:
        biomask.embed(mouse, checkpoint)
    message = str(err.value)
    assert "match the vocabulary's when case is ignored (Gene0 ~ GENE0" in message, message
    assert "different species" in message and "biomask.fit_cells" in message
    assert "strip_version" not in message
    # the frozen vocabulary of prep cells says the same
    config = frozen_prep(mouse, tmp_path, out / "store")
    code, _, err = cli("prep", "cells", "-c", config)
    assert code == 2 and "different species" in err and "genes.column" not in err, err
    # a few symbols spelt alike in both species (F5, C1orf…) end the zero overlap, not the hint: the
    # low-coverage warning gives it when more genes match only once case is ignored
    alike = mouse.copy()
    alike.var_names = list(adata.var_names[:3]) + list(mouse.var_names[3:])
    import logging

    class Keep(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.WARNING)
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    keep = Keep()
    logging.getLogger("biomask").addHandler(keep)  # the CLI above stopped biomask's records propagating
    try:
        biomask.embed(alike, checkpoint, copy=True)
    finally:
        logging.getLogger("biomask").removeHandler(keep)
    warned = " ".join(keep.messages)
    assert (
        "when case is ignored" in warned and "(and 3 as written)" in warned and "different species" in warned
    ), warned
    # ... and where no cell expresses those few, every cell would get one vector: refused, nothing written
    silent = alike.copy()
    silent.X = silent.X.tolil() if hasattr(silent.X, "tolil") else silent.X
    silent.X[:, :3] = 0
    silent.obsm.pop("X_biomask", None)  # the fitted cells' own
    with pytest.raises(InputError, match="none of its .* cells expresses any of the 3 genes"):
        biomask.embed(silent, checkpoint)
    assert "X_biomask" not in silent.obsm
    path = tmp_path / "silent.h5ad"
    silent.write_h5ad(path)
    code, _, err = cli("embed", "--checkpoint", checkpoint, "--input", path, "--output", tmp_path / "e.h5ad")
    assert code == 2 and "one and the same vector" in err and not (tmp_path / "e.h5ad").exists(), err
    # identifiers that differ otherwise keep the hint they had
    other = adata.copy()
    other.var_names = [f"ENSG{i:011d}" for i in range(other.n_vars)]
    with pytest.raises(InputError, match="the identifiers differ, and no var column matches"):
        biomask.embed(other, checkpoint)


def test_genes_are_read_from_the_var_column_that_names_them_in_embed_prep_and_fit_cells(
    fitted, tmp_path, cli
):
    """CELLxGENE files keep Ensembl IDs in the index and symbols in `feature_name`. One whose index
    still held a few symbols was embedded from those few (exit 0, a warning that never named the
    column matching every gene); prep cells against the frozen vocabulary and fit_cells(init_from=)
    refused the file biomask.embed took, with a hint (strip_version) that could not help."""
    import json

    import biomask

    adata, out, checkpoint = fitted
    ids = [f"ENSG{i:011d}" for i in range(adata.n_vars)]
    cellxgene = adata.copy()
    cellxgene.var = pd.DataFrame(
        {"feature_name": pd.Categorical(adata.var_names)}, index=list(adata.var_names[:3]) + ids[3:]
    )
    reference = biomask.embed(adata, checkpoint, copy=True)
    got = biomask.embed(cellxgene, checkpoint, copy=True)
    assert got.uns["X_biomask"]["gene_id_column"] == "feature_name"
    np.testing.assert_array_equal(got.obsm["X_biomask"], reference.obsm["X_biomask"])
    config = frozen_prep(cellxgene, tmp_path, out / "store", qc={"min_genes": 0})
    path = tmp_path / "cells.h5ad"
    code, _, err = cli("prep", "cells", "-c", config)
    assert (
        code == 0
        and "the var index matches 3 of the" in err
        and "matched on var column 'feature_name'" in err
    ), err
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text(encoding="utf-8"))
    (found,) = manifest["coverage"].values()
    assert found["gene_column"] == "feature_name" and found["fraction_of_vocab_present"] == 1.0
    continued = cellxgene.copy()
    biomask.fit_cells(continued, tmp_path / "continued", init_from=checkpoint, overrides=STEPS)
    assert continued.uns["X_biomask"]["gene_id_column"] == "feature_name"
    assert continued.uns["X_biomask"]["gene_coverage"]["fraction_of_vocab_present"] == 1.0
    # from the command line, and a backed AnnData, the embedding reads the column prep trained on (it
    # read the var index: 3 of the genes, exit 0)
    code, _, err = cli(
        "fit-cells",
        "--input",
        path,
        "--output",
        tmp_path / "cli",
        "--init-from",
        checkpoint,
        "train.steps=20",
    )
    assert code == 0, err
    embedded = ad.read_h5ad(tmp_path / "cli" / "embed" / "embeddings.h5ad")
    assert embedded.uns["X_biomask"]["gene_id_column"] == "feature_name"
    assert embedded.uns["X_biomask"]["gene_coverage"]["fraction_of_vocab_present"] == 1.0
    backed = ad.read_h5ad(path, backed="r")
    try:
        biomask.fit_cells(backed, tmp_path / "backed", init_from=checkpoint, overrides=STEPS)
        assert backed.uns["X_biomask"]["gene_id_column"] == "feature_name"
    finally:
        backed.file.close()
    # two var columns of one label are left out of the search, not a traceback
    doubled = cellxgene.copy()
    doubled.var = pd.concat([doubled.var, doubled.var], axis=1)
    assert list(doubled.var.columns) == ["feature_name", "feature_name"]
    assert biomask.embed(doubled, checkpoint, copy=True).uns["X_biomask"]["gene_id_column"] == "var index"


def test_the_search_reads_text_columns_and_every_message_names_the_users_columns(
    fitted, tmp_path, cli, caplog
):
    """pandas' "string" dtype (pandas 3's default for text) is searched like object columns; a column
    the user names that covers too little gets the hint of the one that covers more (embed and prep);
    fit_cells(init_from=) names the AnnData's own var columns (it listed those of its copy: none),
    and a column labelled by a number is left out, not a config error of a key never set."""
    import biomask

    adata, out, checkpoint = fitted
    ids = [f"ENSG{i:011d}" for i in range(adata.n_vars)]
    text = adata.copy()
    text.var = pd.DataFrame({"symbol": pd.array(list(adata.var_names), dtype="string")}, index=ids)
    assert biomask.embed(text, checkpoint, copy=True).uns["X_biomask"]["gene_id_column"] == "symbol"
    # a named column covering 3 genes: embedded as asked, the warning names the one covering all
    named = adata.copy()
    named.var = pd.DataFrame(
        {
            "description": list(adata.var_names[:3]) + ["x"] * (adata.n_vars - 3),
            "feature_name": list(adata.var_names),
        },
        index=ids,
    )
    with caplog.at_level(logging.WARNING, logger="biomask"):
        biomask.embed(named, checkpoint, gene_column="description", copy=True)
    assert "To match more, set gene_column= to 'feature_name'" in caplog.text, caplog.text
    config = frozen_prep(named, tmp_path, out / "store", qc={"min_genes": 0}, genes={"column": "description"})
    code, _, err = cli("prep", "cells", "-c", config)
    assert code == 0 and "To match more, set genes.column to 'feature_name'" in " ".join(err.split()), err
    # no column matches: fit_cells names the AnnData's columns; a numbered one is not searched
    unmatched = adata.copy()
    unmatched.var = pd.DataFrame({"description": ["x"] * adata.n_vars, 0: list(adata.var_names)}, index=ids)
    with pytest.raises(
        InputError, match=r"no var column matches \(read: the var index; var columns: description, 0\)"
    ):
        biomask.fit_cells(unmatched, tmp_path / "none", init_from=checkpoint, overrides=STEPS)
    assert not (tmp_path / "none").exists()


def test_strip_version_matches_a_checkpoint_of_versioned_ensembl_ids_across_releases(fitted, tmp_path):
    """A model trained on a GENCODE file (ENSG….12) and cells of another release (ENSG….13): the
    message said strip_version=True, which stripped the data's suffixes only and failed again; no
    setting matched them. Now versions are dropped on both sides, and the hint is checked: it names
    strip_version only where that matches, and the column where another holds the identifiers."""
    import biomask

    adata = synthetic_cells()
    ids = [f"ENSG{i:011d}" for i in range(adata.n_vars)]
    release12, release13 = adata.copy(), adata.copy()
    release12.var_names = [f"{g}.12" for g in ids]
    release13.var_names = [f"{g}.13" for g in ids]
    checkpoint = biomask.fit_cells(release12, tmp_path / "fit", overrides=STEPS)
    with pytest.raises(
        InputError,
        match=r"the identifiers differ -- set strip_version=True: \d+ of the \d+ vocabulary genes match then",
    ):
        biomask.embed(release13, checkpoint)
    got = biomask.embed(release13, checkpoint, strip_version=True, copy=True)
    reference = biomask.embed(release12, checkpoint, copy=True)
    np.testing.assert_array_equal(got.obsm["X_biomask"], reference.obsm["X_biomask"])
    # symbols in the index, versioned IDs in a column: both settings named
    symbols = adata.copy()
    symbols.var["gene_ids"] = list(release13.var_names)
    with pytest.raises(InputError, match=r"set gene_column= to 'gene_ids' and strip_version=True"):
        biomask.embed(symbols, checkpoint)
    # against a vocabulary of symbols neither helps, and neither is named
    _, _, symbols_checkpoint = fitted
    with pytest.raises(InputError) as err:
        biomask.embed(release13, symbols_checkpoint)
    assert "no var column matches" in str(err.value) and "strip_version" not in str(err.value)


def test_qc_that_drops_most_cells_warns_naming_the_thresholds(tmp_path, cli):
    """pbmc3k-panel.yaml copied for a 10x v3 PBMC sample (its inputs changed, as the README says)
    kept 53 of 200 cells: its 5 % mitochondrial and 2,500-gene limits are pbmc3k's. That was one info
    line; most of the cells gone is a warning naming the keys."""
    adata = synthetic_cells(n_cells=100)
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    config = tmp_path / "prep.yaml"
    config.write_text(yaml.safe_dump({"inputs": [{"path": str(path)}], "output": str(tmp_path / "store")}))
    genes = (adata.X > 0).sum(1)
    limit = int(np.quantile(genes, 0.6))  # ~40 % of the cells detect more genes than this
    code, _, err = cli(
        "prep", "cells", "-c", config, f"qc.max_genes={limit}", "qc.min_genes=0", "tokenizer.scheme=panel"
    )
    dropped = int((genes > limit).sum())
    assert code == 0 and f"QC dropped {dropped} of the 100 cells read" in err, err
    assert f"{dropped} by qc.max_genes {limit}" in err and "qc.max_genes=null" in err
    code, _, err = cli(
        "prep",
        "cells",
        "-c",
        config,
        "qc.min_genes=0",
        "tokenizer.scheme=panel",
        f"output={tmp_path / 'kept'}",
    )
    assert code == 0 and "QC dropped" not in err
    # fit_cells takes no qc keys: its warning names none (its only QC drops cells with no values)
    empty = synthetic_cells(n_cells=60)
    empty.X[:20] = 0
    empty.write_h5ad(tmp_path / "empty.h5ad")
    code, _, err = cli(
        "fit-cells", "--input", tmp_path / "empty.h5ad", "--output", tmp_path / "fit", "train.steps=2"
    )
    assert (
        code == 0 and "QC dropped 20 of the 60 cells read" in err and "20 whose values are all zero" in err
    ), err
    assert "qc." not in err


def test_a_profile_model_worse_than_the_gene_means_is_warned_about(tmp_path, caplog):
    """The held-out loss above the reference predictor's (each gene's training mean) was an info
    line; here forced by a learning rate that throws the weights off."""
    import biomask

    with caplog.at_level(logging.WARNING, logger="biomask"):
        biomask.fit_cells(synthetic_cells(), tmp_path / "bad", overrides={**STEPS, "optim.lr": 1.0})
    warned = [r.getMessage() for r in caplog.records if "above the reference predictor's" in r.getMessage()]
    assert len(warned) == 1 and "training cells, ~" in warned[0], warned
    assert " held-out cells, at ratios " in warned[0] and "0.1" in warned[0], warned
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="biomask"):
        biomask.fit_cells(synthetic_cells(), tmp_path / "good", overrides={"train.steps": 300})
    assert not [r for r in caplog.records if "above the reference predictor's" in r.getMessage()]


def test_a_csv_of_counts_is_met_with_how_to_read_it(fitted, tmp_path, cli):
    """A CSV given to fit-cells was answered with a biomask.read_cells command that cannot read it,
    embed called it DNA sequences, and read_cells said to set a `format:` it does not take. Each now
    gives the anndata line, and that line, as given, reads the table (.T for a column per cell)."""
    import anndata

    import biomask

    adata, _, checkpoint = fitted
    path = tmp_path / "genes_by_cells.csv"  # a column per cell, as many public tables are
    adata.to_df().T.to_csv(path)
    code, _, err = cli("fit-cells", "--input", path, "--output", tmp_path / "fit")
    assert code == 2 and f"anndata.io.read_csv('{path}')" in err and "read_cells" not in err, err
    code, _, err = cli("embed", "--checkpoint", checkpoint, "--input", path, "--output", tmp_path / "e.h5ad")
    assert code == 2 and "If it is a table of cells" in err and "add .T when each cell is a column" in err, (
        err
    )
    with pytest.raises(InputError, match=r"anndata\.io\.read_csv") as refused:
        biomask.read_cells(path)
    assert "format:" not in str(refused.value)
    read = anndata.io.read_csv(path)
    with pytest.raises(InputError, match="looks transposed"):
        biomask.embed(read, checkpoint)
    cells = read.T
    biomask.embed(cells, checkpoint)
    np.testing.assert_allclose(
        cells.obsm["X_biomask"], biomask.embed(adata, checkpoint, copy=True).obsm["X_biomask"], atol=1e-5
    )


@pytest.mark.parametrize("sparse", [False, True])
def test_log1p_of_raw_counts_is_named_and_the_way_back_works(fitted, tmp_path, sparse):
    """`sc.pp.log1p` without `normalize_total`: the message offered from_log1p with a totals column
    (which then failed on non-integral counts), and counts.mode log1p and normalised took the values
    silently as normalised per cell -- none reads them rightly. expm1 gives the counts back, and the
    message says so; done as it says, the cells embed as their counts do."""
    import scipy.sparse as sp

    import biomask

    adata, _, checkpoint = fitted
    logged = adata.copy()
    logged.X = np.log1p(sp.csr_matrix(adata.X) if sparse else adata.X)
    for counts in (None, {"mode": "log1p"}, {"mode": "normalised"}):
        with pytest.raises(InputError, match=r"found log1p of raw counts, not normalised") as refused:
            biomask.embed(logged, checkpoint, counts=counts)
        assert "adata.layers['counts'] = np.expm1(adata.X), then matrix='layers/counts'" in str(refused.value)
    with pytest.raises(InputError, match="found log1p of raw counts"):
        biomask.fit_cells(logged, tmp_path / "f", counts={"mode": "log1p"}, overrides=STEPS)
    assert not (tmp_path / "f").exists()
    logged.layers["counts"] = np.expm1(logged.X)
    biomask.embed(logged, checkpoint, matrix="layers/counts")
    expected = biomask.embed(adata, checkpoint, copy=True).obsm["X_biomask"]
    np.testing.assert_allclose(logged.obsm["X_biomask"], expected, atol=1e-5)


def test_two_samples_concatenated_are_met_with_what_went_wrong(tmp_path):
    """Two samples in one AnnData: a batch_key the obs lacks was answered with the obs columns of
    fit_cells' internal copy ("none"), not the user's; an outer join of dense samples (NaN for the
    genes one lacks) with "fix or remove those cells", which would remove a whole sample."""
    import biomask

    first, second = synthetic_cells(seed=1), synthetic_cells(seed=2)
    second = second[:, 10:].copy()  # measured fewer genes
    pair = ad.concat({"s1": first, "s2": second}, label="sample", join="inner", index_unique="-")
    with pytest.raises(InputError, match=r"obs has no column 'batch' \(batch_key=\); obs columns: sample$"):
        biomask.fit_cells(pair, tmp_path / "b", batch_key="batch", overrides=STEPS)
    logged = pair.copy()  # log1p(CP10k), its totals column forgotten
    logged.X = np.log1p(logged.X / logged.X.sum(1, keepdims=True) * 1e4)
    with pytest.raises(InputError, match=r"obs has no column 'n_counts' .*obs columns: sample$"):
        biomask.fit_cells(
            logged,
            tmp_path / "b",
            counts={"mode": "from_log1p", "total_counts_column": "n_counts"},
            overrides=STEPS,
        )
    outer = ad.concat({"s1": first, "s2": second}, label="sample", join="outer", index_unique="-")
    assert np.isnan(outer.X).any()  # anndata fills what s2 lacks with NaN
    with pytest.raises(InputError, match=r"10 genes of this cell are NaN: .*join='outer'.*join='inner'"):
        biomask.fit_cells(outer, tmp_path / "o", batch_key="sample", overrides=STEPS)
    assert not (tmp_path / "o").exists() and not (tmp_path / "b").exists()


def test_a_per_cell_column_given_as_the_batch_is_warned_about(tmp_path, caplog):
    """batch_key naming a column of cell ids (one batch per cell) trained without a word."""
    import biomask

    adata = synthetic_cells()
    adata.obs["cell_id"] = [f"c{i}" for i in range(adata.n_obs)]
    adata.obs["sample"] = np.where(np.arange(adata.n_obs) < 40, "s1", "s2")
    with caplog.at_level(logging.WARNING, logger="biomask"):
        biomask.fit_cells(adata, tmp_path / "ids", batch_key="cell_id", overrides=STEPS)
    warned = [r.getMessage() for r in caplog.records if "is 'cell_id' a per-cell column" in r.getMessage()]
    assert len(warned) == 1 and "has 80 values for 80 cells" in warned[0], warned
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="biomask"):
        biomask.fit_cells(adata, tmp_path / "samples", batch_key="sample", overrides=STEPS)
    assert not [r for r in caplog.records if "per-cell column" in r.getMessage()]


def _outer_join_findings(adata: ad.AnnData) -> list[str]:
    from biomask.cells.readers import from_anndata
    from biomask.cells.samples import MissingGenes

    source = from_anndata(adata)
    check = MissingGenes(source)
    for start, block in source.blocks(50):
        check.add(start, block)
    return check.findings(np.asarray(adata.var_names))


def test_clusters_whose_cells_lack_another_types_markers_are_not_called_outer_joined():
    """A Leiden column kept in obs (clustering before fit_cells) drew the outer-join warning on a real
    400-cell PBMC pair: T cells have not one count of the monocytes' CX3CR1, CD302, CDA, ... -- as the
    B cells have none either. A gene a sample never measured is still measured in every other sample.
    SYNTHETIC: three cell types of 60 cells, 30 marker genes expressed by one type only."""
    rng = np.random.default_rng(0)
    n, shared, markers = 60, 100, 30
    types = np.repeat(["T", "mono", "B"], n)
    x = rng.poisson(1.0, (3 * n, shared + markers)).astype(np.float32)
    x[:, shared:] = rng.poisson(3.0, (3 * n, markers))
    x[types != "mono", shared:] = 0  # monocyte markers: no count in T or B cells
    obs = pd.DataFrame({"leiden": types}, index=[f"c{i}" for i in range(3 * n)])
    clusters = ad.AnnData(x, obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(x.shape[1])]))
    assert _outer_join_findings(clusters) == []
    # the same cells as three samples, the third outer-joined without 30 of the genes: still named
    samples = clusters.copy()
    samples.obs["sample"] = np.tile(["s1", "s2", "s3"], n)
    third = (samples.obs["sample"] == "s3").to_numpy()
    samples.X[np.ix_(third, np.arange(30))] = 0
    found = _outer_join_findings(samples)
    assert len(found) == 1 and found[0].startswith("obs column 'sample' = 's3'"), found


def test_fit_cells_on_a_file_of_too_few_cells_says_so_before_preparing_them(tmp_path, cli):
    """From a file, the 20-cell minimum was checked only after prep had written a store and warned
    that its val split was empty, with advice (split.block_size, split.seed) fit-cells does not take."""
    path = tmp_path / "ten.h5ad"
    synthetic_cells(n_cells=10).write_h5ad(path)
    code, _, err = cli("fit-cells", "--input", path, "--output", tmp_path / "out")
    assert code == 2 and f"fit_cells: {path} has 10 cells; at least 20 are needed" in err, err
    assert "split" not in err and not (tmp_path / "out").exists()


def test_a_layer_named_without_layers_slash_is_refused_naming_the_one_meant(fitted, tmp_path, cli):
    """matrix="spliced" (scvelo's layers): biomask.embed crashed with an IndexError, fit_cells named
    the prep config's key 'inputs.0.matrix'."""
    import biomask

    adata, _, checkpoint = fitted
    layered = adata.copy()
    layered.layers["spliced"] = layered.X.copy()
    meant = "for the layer 'spliced' write matrix='layers/spliced'"
    with pytest.raises(InputError, match=meant):
        biomask.embed(layered, checkpoint, matrix="spliced")
    with pytest.raises(InputError, match=meant):
        biomask.fit_cells(layered, tmp_path / "f", matrix="spliced", overrides=STEPS)
    path = tmp_path / "layered.h5ad"
    layered.write_h5ad(path)
    code, _, err = cli("fit-cells", "--input", path, "--output", tmp_path / "g", "--matrix", "spliced")
    assert code == 2 and "--matrix" in err and "inputs.0.matrix" not in err, err
    biomask.embed(layered, checkpoint, matrix="layers/spliced")
    assert not (tmp_path / "f").exists() and not (tmp_path / "g").exists()


def test_fit_cells_paths_starting_with_the_home_tilde_are_the_home_folder(tmp_path, monkeypatch):
    """fit_cells(adata, "~/out") wrote into a folder named `~` in the working directory."""
    import biomask

    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(), work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    synthetic_cells().write_h5ad(home / "cells.h5ad")
    checkpoint = biomask.fit_cells("~/cells.h5ad", "~/out", overrides=STEPS)
    assert checkpoint == home / "out" / "pretrain" / "model" and checkpoint.is_dir()
    assert list(work.iterdir()) == []


def test_fit_cells_embeds_on_omp_num_threads_and_gives_the_callers_thread_count_back(tmp_path, monkeypatch):
    """Prep's numba sets torch to every core; pretraining gave back the count it found (numba's), so
    the embedding ran on every core under OMP_NUM_THREADS=1 — and recorded it. The caller's own count
    comes back at the end."""
    import torch

    import biomask
    from biomask.embedding import api

    seen = []
    real = api.embed

    def embed(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "embed", embed)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        biomask.fit_cells(synthetic_cells(), tmp_path / "run", overrides=STEPS)
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_fit_cells_takes_scvi_tools_layer_argument(fitted, tmp_path):
    """scvi-tools users write setup_anndata(adata, layer="counts"); fit_cells(layer=...) was Python's
    TypeError. It is matrix='layers/NAME': the same cells give the same model."""
    import biomask

    adata, _, _ = fitted
    layered = adata.copy()
    layered.layers["counts"] = layered.X.copy()
    layered.X = layered.X * 0.5  # not counts: only the layer can be what trains
    del layered.obsm["X_biomask"], layered.uns["X_biomask"]  # the fixture's own fit
    with pytest.raises(InputError, match=r"layer='counts' and matrix='raw' both say where the counts are"):
        biomask.fit_cells(layered, tmp_path / "both", layer="counts", matrix="raw", overrides=STEPS)
    with pytest.raises(InputError, match=r"no layer 'spliced'; its matrices: X, layers/counts"):
        biomask.fit_cells(layered, tmp_path / "missing", layer="spliced", overrides=STEPS)
    with pytest.raises(InputError, match=r"layer names an AnnData layer \(a string"):
        biomask.fit_cells(layered, tmp_path / "int", layer=-1, overrides=STEPS)
    assert not any((tmp_path / name).exists() for name in ("both", "missing", "int"))
    by_layer = biomask.fit_cells(layered, tmp_path / "layer", layer="counts", overrides=STEPS, copy=True)
    by_matrix = biomask.fit_cells(
        layered, tmp_path / "matrix", matrix="layers/counts", overrides=STEPS, copy=True
    )
    assert "X_biomask" not in layered.obsm
    assert np.array_equal(by_layer.obsm["X_biomask"], by_matrix.obsm["X_biomask"])


def test_an_anndata_without_x_names_its_layers_and_repeated_entries_are_summed(fitted, tmp_path):
    """AnnData(X=None, layers={"counts": ...}) met scipy's "does not support dtype object"; a CSR storing
    one gene of a cell twice (0.5 + 0.5, which scipy and scanpy add up) was refused as non-integer,
    "row 0 ... but the first cells hold counts"."""
    import scipy.sparse as sp

    import biomask

    adata, _, checkpoint = fitted
    plain = biomask.embed(adata, checkpoint, copy=True).obsm["X_biomask"]
    bare = ad.AnnData(X=None, obs=adata.obs.copy(), var=adata.var.copy(), layers={"counts": adata.X.copy()})
    with pytest.raises(InputError, match=r"the AnnData has no X \(it is None\); its matrices: layers/counts"):
        biomask.embed(bare, checkpoint)
    with pytest.raises(InputError, match=r"has no X"):
        biomask.fit_cells(bare, tmp_path / "f", overrides=STEPS)
    assert not (tmp_path / "f").exists()
    assert np.array_equal(
        biomask.embed(bare, checkpoint, matrix="layers/counts", copy=True).obsm["X_biomask"], plain
    )
    x = sp.csr_matrix(adata.X)
    rows = [slice(x.indptr[i], x.indptr[i + 1]) for i in range(x.shape[0])]
    halves = sp.csr_matrix(  # every stored value as two halves at the same (cell, gene)
        (
            np.concatenate([np.tile(x.data[r] / 2, 2) for r in rows]),
            np.concatenate([np.tile(x.indices[r], 2) for r in rows]),
            2 * x.indptr,
        ),
        shape=x.shape,
    )
    assert not halves.has_canonical_format and np.array_equal(halves.toarray(), x.toarray())
    doubled = ad.AnnData(X=halves, obs=adata.obs.copy(), var=adata.var.copy())
    assert np.allclose(biomask.embed(doubled, checkpoint, copy=True).obsm["X_biomask"], plain, atol=1e-6)
    path = tmp_path / "doubled.h5ad"
    doubled.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    try:
        assert np.allclose(biomask.embed(backed, checkpoint, copy=True).obsm["X_biomask"], plain, atol=1e-6)
    finally:
        backed.file.close()


def test_a_totals_column_older_than_the_matrix_points_to_what_still_works(fitted, tmp_path):
    """scvi-tools' 10x PBMC subsets: n_counts counts every gene, X holds the genes kept. Normalised
    and log1p'd as scanpy users do, the counts cannot be rebuilt from n_counts; the message said to
    check the column and stopped there, not naming `counts.mode: log1p`, which works."""
    import biomask

    adata, _, checkpoint = fitted
    logged = adata.copy()
    totals = logged.X.sum(1)
    logged.obs["n_counts"] = totals + 100  # as if counted before 100 counts' genes were filtered out
    logged.X = np.log1p(logged.X / totals[:, None] * 1e4)
    with pytest.raises(InputError) as refused:
        biomask.embed(logged, checkpoint, counts={"mode": "from_log1p", "total_counts_column": "n_counts"})
    assert "computed before genes were removed" in str(refused.value)
    assert "`counts.mode: log1p` takes the values as they are" in str(refused.value)
    biomask.embed(logged, checkpoint, counts={"mode": "log1p"})
    assert logged.obsm["X_biomask"].shape == (adata.n_obs, 64)


def test_a_dense_anndata_is_copied_sparse_and_an_earlier_dense_copy_is_still_reused(
    fitted, tmp_path, monkeypatch
):
    """celltypist's 559-cell CSV read by anndata is dense: fit_cells' copy of it was 74.7 MB, against
    9.6 MB as CSR (an atlas read dense would cost its full size again on disk). The copy is now CSR
    with the same values; an output whose copy an earlier version wrote dense is reused as it is."""
    import h5py
    import scipy.sparse as sp

    import biomask
    from biomask.embedding import fit

    adata, out, _ = fitted
    assert isinstance(adata.X, np.ndarray)  # the user's matrix is dense
    with h5py.File(out / "cells.h5ad", "r") as handle:
        assert isinstance(handle["X"], h5py.Group) and handle["X"].attrs["encoding-type"] == "csr_matrix"
    copy = ad.read_h5ad(out / "cells.h5ad")
    assert sp.issparse(copy.X) and np.array_equal(copy.X.toarray(), adata.X)
    # an output of the earlier version: the copy dense, the store and model made from it
    monkeypatch.setattr(fit, "_as_csr", lambda values: values)
    legacy = tmp_path / "legacy"
    biomask.fit_cells(adata.copy(), legacy, overrides=STEPS)
    monkeypatch.undo()
    with h5py.File(legacy / "cells.h5ad", "r") as handle:
        assert isinstance(handle["X"], h5py.Dataset)
    kept = (legacy / "cells.h5ad").read_bytes()
    store = (legacy / "store" / "manifest.json").stat().st_mtime_ns
    again = adata.copy()
    biomask.fit_cells(again, legacy, overrides=STEPS)  # the same call: nothing prepared or trained again
    assert (legacy / "cells.h5ad").read_bytes() == kept
    assert (legacy / "store" / "manifest.json").stat().st_mtime_ns == store
    assert np.isfinite(again.obsm["X_biomask"]).all()


def test_a_gene_named_like_a_special_token_is_refused_by_prep_naming_the_file(tmp_path, cli):
    """A gene named [CLS] or [PAD] gave a tokenizer mapping one name to two ids: prep and pretrain
    passed, and only embed failed, blaming the checkpoint."""
    adata = synthetic_cells(n_cells=40)
    adata.var_names = ["[CLS]", "[PAD]", *adata.var_names[2:]]
    path = tmp_path / "specials.h5ad"
    adata.write_h5ad(path)
    config = tmp_path / "prep.yaml"
    config.write_text(yaml.safe_dump({"inputs": [{"path": str(path)}], "output": str(tmp_path / "store")}))
    code, _, err = cli("prep", "cells", "-c", config)
    assert code == 2 and f"{path}" in err and "[CLS], [PAD] are biomask's special tokens" in err, err
    assert not (tmp_path / "store").exists()


def test_a_damaged_sparse_index_is_named_not_a_scipy_traceback(tmp_path, cli):
    import h5py
    import scipy.sparse as sp

    adata = synthetic_cells(n_cells=40)
    adata.X = sp.csr_matrix(adata.X)
    path = tmp_path / "damaged.h5ad"
    adata.write_h5ad(path)
    with h5py.File(path, "r+") as f:
        f["X/indptr"][-1] = 2**31 - 1
    config = tmp_path / "prep.yaml"
    config.write_text(yaml.safe_dump({"inputs": [{"path": str(path)}], "output": str(tmp_path / "store")}))
    code, _, err = cli("prep", "cells", "-c", config)
    assert code == 2 and f"{path}" in err and "its indptr" in err and "Traceback" not in err, err
    assert not (tmp_path / "store").exists()
