"""Several samples in one AnnData: prep keeps each cell's batch (`batch_column`), and the profile
autoencoder's decoder reads it (`model.batch_covariate`; `fit_cells(batch_key=...)`), while the
encoder — the embedding — never does. Bad settings are refused before anything trains. Real counts
(pbmc3k's first cells), split into two samples by us."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

import biomask
from biomask import datasets
from biomask.errors import InputError

pytestmark = [
    pytest.mark.network,
    pytest.mark.filterwarnings("ignore::anndata.OldFormatWarning", "ignore::FutureWarning:anndata"),
]

STEPS = {"train.steps": 20, "train.progress": False}


def _two_samples(n: int = 600, names=("s1", "s2")):
    import anndata as ad

    adata = ad.read_h5ad(datasets.fetch("pbmc3k"))[:n].copy()
    adata.var_names_make_unique()
    adata.obs["sample"] = np.where(np.arange(n) % 3 == 0, names[0], names[1])
    return adata


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    adata = _two_samples()
    out = tmp_path_factory.mktemp("fit") / "batch"
    checkpoint = biomask.fit_cells(adata, out, batch_key="sample", overrides=STEPS)
    return adata, out, checkpoint


def test_the_store_keeps_each_cells_batch(fitted):
    from biomask.store import TokenStore

    adata, out, _ = fitted
    store = TokenStore(out / "store")
    assert store.manifest["batch"] == {"column": "sample", "names": ["s1", "s2"]}
    split = store.split("train")
    ids = split.meta()["id"].to_numpy()
    stored = np.array([int(split[i]["batch"]) for i in range(len(split))])
    expected = (adata.obs.loc[ids, "sample"] == "s2").to_numpy().astype(int)  # names sorted: s1=0, s2=1
    assert len(ids) > 500 and np.array_equal(stored, expected)


def test_the_decoder_reads_the_batch_and_the_embedding_does_not(fitted):
    from biomask.batch import collate
    from biomask.models import load_pretrained
    from biomask.store import TokenStore

    adata, out, checkpoint = fitted
    assert adata.obsm["X_biomask"].shape == (adata.n_obs, 64)
    model = load_pretrained(checkpoint)
    assert model.config.batches == ["s1", "s2"]
    split = TokenStore(out / "store").split("train")
    batch = collate([split[i] for i in range(16)], modality="cells")
    with torch.no_grad():
        latent = torch.randn(16, 64)
        as_s1 = model._decode(latent, {"batch": torch.zeros(16, dtype=torch.int64)})
        as_s2 = model._decode(latent, {"batch": torch.ones(16, dtype=torch.int64)})
        assert not torch.allclose(as_s1, as_s2)  # the batch changes the reconstruction
        relabelled = dict(batch, batch=1 - batch["batch"])
        assert torch.equal(model.embed(batch), model.embed(relabelled))  # and not the embedding
    # cells of a batch the model never saw embed like any others (the encoder has no batch input)
    other = _two_samples(names=("s3", "s4"))
    biomask.embed(other, checkpoint)
    assert np.allclose(other.obsm["X_biomask"], adata.obsm["X_biomask"], atol=1e-5)


def test_the_hub_export_leaves_the_batch_names_out(fitted, tmp_path):
    """The batch names (a store's batch_column: donors, patients) went into the Hugging Face export's
    config.json, the folder meant for a model hub, which has no decoder to read them."""
    from biomask.export.hf import export_hf

    _, _, checkpoint = fitted
    hub = export_hf(checkpoint, tmp_path / "hf")
    config = json.loads((hub / "config.json").read_text(encoding="utf-8"))
    arch = config["biomask"]["source_checkpoint"]["architecture"]
    assert "batches" not in arch and arch["batches_left_out"] == 2
    assert not re.search(r'"s[12]"', (hub / "config.json").read_text(encoding="utf-8"))
    assert export_hf(checkpoint, tmp_path / "hf") == hub  # a rerun reuses it, as before


def test_bad_batch_settings_are_refused_before_training(fitted, tmp_path, cli, repo):
    _, _, checkpoint = fitted
    with pytest.raises(InputError, match=r"obs has no column 'donor' \(batch_key="):
        biomask.fit_cells(_two_samples(), tmp_path / "a", batch_key="donor", overrides=STEPS)
    missing = _two_samples()
    missing.obs.loc[missing.obs_names[5], "sample"] = np.nan
    with pytest.raises(InputError, match=r"1 cells have no 'sample' value .*first: '" + missing.obs_names[5]):
        biomask.fit_cells(missing, tmp_path / "b", batch_key="sample", overrides=STEPS)
    assert not (tmp_path / "a" / "pretrain").exists() and not (tmp_path / "b" / "pretrain").exists()
    # a store without batches: the covariate is refused, naming the prep key
    plain = biomask.fit_cells(_two_samples(), tmp_path / "plain", overrides=STEPS)
    code, _, err = cli("pretrain", "-c", repo / "configs/pretrain/cells-mlp.yaml",
                       f"data.store={plain.parent.parent / 'store'}", "model.batch_covariate=true",
                       f"output={tmp_path / 'p'}", "train.steps=2")  # fmt: skip
    assert code == 2 and "prepared without one" in err and "batch_column=" in err, err
    # continuing a batch-conditioned model on cells of other batches: its decoder has no input for them
    with pytest.raises(InputError, match=r"conditioned on batches \[s1, s2\], this run's on \[s3, s4\]"):
        biomask.fit_cells(
            _two_samples(names=("s3", "s4")), tmp_path / "c", batch_key="sample", init_from=checkpoint,
            overrides=STEPS,
        )  # fmt: skip


def test_batch_scores_tell_mixed_batches_from_separated_ones():
    """Constructed points (not data): two labels, each in two batches. Batches that overlap within a
    label score mixing near 1 and read each other's labels; batches shifted apart score near 0 and,
    shifted further than the labels lie apart, read the wrong label."""
    from biomask.evaluation.clustering import batch_scores

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 200)
    batches = np.tile(np.repeat([0, 1], 100), 2)
    centres = np.where(labels[:, None] == 0, 0.0, 5.0) + rng.normal(0, 1, (400, 2))
    mixed = batch_scores(centres, labels, batches)
    assert mixed["batch_mixing"] > 0.8 and mixed["cross_batch_accuracy"] > 0.95
    # label centres (0, 0) and (5, 5); batch 1 moved along the other diagonal keeps each label nearest its own
    apart = centres + np.where(batches[:, None] == 1, [-8.0, 8.0], 0.0)
    separated = batch_scores(apart, labels, batches)
    assert separated["batch_mixing"] < 0.05 and separated["cross_batch_accuracy"] > 0.95
    crossed = centres + np.where(batches[:, None] == 1, [5.0, 5.0], 0.0)  # batch 1's label 0 lands on label 1
    assert batch_scores(crossed, labels, batches)["cross_batch_accuracy"] < 0.6
    assert batch_scores(centres, labels, np.repeat([0, 1], 200)) == {}  # no label in two batches


def test_evaluate_reports_batches_for_a_store_with_a_batch_column(tmp_path, cli, repo):
    """pbmc68k_reduced with its cell-cycle phase as the batch column (a real obs column): the baselines'
    knn rows get batch mixing and cross-batch accuracy, in metrics.json and a Batches table."""
    import json

    store = tmp_path / "store"
    code, _, err = cli("prep", "cells", "-c", repo / "configs/cells/pbmc68k_reduced-panel.yaml", f"output={store}",
                       "tokenizer.path=null", "batch_column=phase")  # fmt: skip
    assert code == 0, err
    code, _, err = cli("evaluate", "-c", repo / "configs/evaluate/pbmc68k_reduced.yaml", f"store={store}",
                       f"output={tmp_path / 'eval'}", "protocols=[knn]", "seeds=[0]", "random_init=false")  # fmt: skip
    assert code == 0, err
    summary = json.loads((tmp_path / "eval" / "metrics.json").read_text())["summary"]
    knn_rows = [name for name in summary if "kNN" in name]
    assert knn_rows and all(0 < summary[n]["batch_mixing"]["mean"] <= 2 for n in knn_rows)
    assert all(0 < summary[n]["cross_batch_accuracy"]["mean"] <= 1 for n in knn_rows)
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "## Batches (the store's batch_column; knn protocol)" in report
