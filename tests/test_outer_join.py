"""A sample an outer join filled with zeros (genes it never measured, written as 0 by
`anndata.concat(join="outer")`) is named in a warning by prep and by embed — the obs column, the
sample, how many genes — while real zeros (cell types that do not express a gene, an inner join)
raise nothing. The data is pbmc3k split at random into three samples, one of them missing 30 % of
the genes, as the README measures it."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from biomask import datasets

pytestmark = [
    pytest.mark.network,
    pytest.mark.filterwarnings("ignore::anndata.OldFormatWarning", "ignore::FutureWarning:anndata"),
]


def _samples(join: str):
    import anndata as ad

    adata = ad.read_h5ad(datasets.fetch("pbmc3k"))
    adata.var_names_make_unique()
    rng = np.random.default_rng(0)
    adata.obs["sample"] = rng.choice(["s1", "s2", "s3"], adata.n_obs)
    parts = [adata[adata.obs["sample"] == s].copy() for s in ("s1", "s2", "s3")]
    parts[2] = parts[2][:, rng.random(adata.n_vars) > 0.3].copy()  # s3 measured 70 % of the genes
    return ad.concat(parts, join=join)


def _findings(adata) -> list[str]:
    from biomask.cells.readers import from_anndata
    from biomask.cells.samples import MissingGenes

    source = from_anndata(adata)
    check = MissingGenes(source)
    for start, block in source.blocks(500):
        check.add(start, block)
    return check.findings(np.asarray(adata.var_names))


def test_the_outer_joined_sample_is_found_and_no_other():
    found = _findings(_samples("outer"))
    assert len(found) == 1, found
    assert found[0].startswith("obs column 'sample' = 's3' (")
    assert _findings(_samples("inner")) == []


def test_cell_types_that_lack_genes_for_real_are_not_taken_for_samples():
    """pbmc68k_reduced's log-normalised values with its cell-type and cluster columns: each type lacks
    genes the others express, but not in the way a sample that never measured them does."""
    import anndata as ad

    adata = ad.read_h5ad(datasets.fetch("pbmc68k_reduced"))
    values = adata.raw.to_adata()
    values.obs = adata.obs
    assert {"bulk_labels", "louvain"} <= set(values.obs.columns)
    assert _findings(values) == []


def test_prep_warns_naming_the_file_sample_and_what_to_do(tmp_path, cli, repo):
    data = tmp_path / "three-samples.h5ad"
    _samples("outer").write_h5ad(data)
    config = yaml.safe_load((repo / "configs/cells/pbmc3k.yaml").read_text())
    config["inputs"] = [{"path": str(data), "matrix": "X"}]
    config["output"] = str(tmp_path / "store")
    (tmp_path / "prep.yaml").write_text(yaml.safe_dump(config))
    code, _, err = cli("prep", "cells", "-c", tmp_path / "prep.yaml")
    assert code == 0, err
    warned = [line for line in err.splitlines() if "outer join" in line]
    assert len(warned) == 1, err[-3000:]  # once, for the one sample
    assert str(data) in warned[0] and "obs column 'sample' = 's3'" in warned[0]
    assert "join='inner'" in warned[0]  # what to do
    assert (tmp_path / "store" / "manifest.json").exists()  # a warning: the store is still written


def test_embed_warns_on_the_genes_the_model_reads(tmp_path, caplog):
    """biomask.embed (here through fit_cells, which prepares a copy with only the obs columns it needs):
    the warning comes from the embedding, on the panel genes the model reads."""
    import biomask

    adata = _samples("outer")
    with caplog.at_level("WARNING", logger="biomask"):
        biomask.fit_cells(adata, tmp_path / "fit", overrides={"train.steps": 20})
    warned = [r.getMessage() for r in caplog.records if "outer join" in r.getMessage()]
    assert len(warned) == 1 and "obs column 'sample' = 's3'" in warned[0], warned
    assert adata.obsm["X_biomask"].shape == (adata.n_obs, 64)  # a warning, not a refusal
