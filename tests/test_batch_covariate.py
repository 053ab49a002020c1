"""Several samples in one AnnData: prep keeps each cell's batch (`batch_column`), and the profile
autoencoder's decoder reads it (`model.batch_covariate`; `fit_cells(batch_key=...)`), while the
encoder — the embedding — never does. Bad settings are refused before anything trains. Real counts
(pbmc3k's first cells), split into two samples by us."""

from __future__ import annotations

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
