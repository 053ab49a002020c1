"""The expression-profile masked autoencoder (model.kind: mlp): what its users rely on.

- the masked genes are the only targets, a gene the data lacks is hidden (never a target, never a 0);
- one vector per cell, independent of the batch; the checkpoint round-trips with its standardisation;
- trained on real cells (pbmc68k_reduced, labels unused), its embedding carries cell identity: a linear
  probe on it beats the same network left random, through `biomask evaluate` itself.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from biomask.models import EncoderConfig, ProfileAutoencoder, build_model, load_pretrained
from biomask.models.profile import gene_statistics
from biomask.training.data import collate
from biomask.vocab import NUM_SPECIAL


def _model(vocab_size: int = 12, scheme: str = "panel") -> ProfileAutoencoder:
    torch.manual_seed(0)
    cfg = EncoderConfig(
        vocab_size=vocab_size, modality="cells", kind="mlp", d_model=4, n_layers=2, n_heads=1, d_ff=8,
        positions=False, scheme=scheme, target="values",
    )  # fmt: skip
    return build_model(cfg)


def _records() -> list[dict]:
    rng = np.random.default_rng(0)
    genes = np.arange(NUM_SPECIAL, 12)
    return [{"tokens": genes, "values": rng.random(genes.size).astype(np.float32)} for _ in range(6)]


def test_loss_is_on_the_masked_genes_only():
    model = _model()
    batch = collate(_records(), modality="cells")
    masked = torch.zeros_like(batch["attention_mask"])
    masked[:, 2] = True  # one gene per cell
    out = model({**batch, "masked": masked})
    assert int(out["n_masked"]) == 6 and torch.isfinite(out["loss"])
    # the masked gene's true value enters the loss, never the input: changing it moves the loss only
    changed = batch["values"].clone()
    changed[:, 2] += 5.0
    assert not torch.allclose(model({**batch, "values": changed, "masked": masked})["loss"], out["loss"])
    hidden_input = model._encode(model._standardised({**batch, "values": changed}), masked[:, :0].new_zeros(6, 12))
    assert hidden_input[0].shape == (6, 12)
    masked_dense = model._dense(batch, masked) > 0
    latent_a = model._encode(model._standardised(batch), masked_dense)[-1]
    latent_b = model._encode(model._standardised({**batch, "values": changed}), masked_dense)[-1]
    torch.testing.assert_close(latent_a, latent_b)


def test_a_gene_the_data_lacks_is_hidden_not_zero():
    model = _model()
    full = _records()[:1]
    listed_zero = [{"tokens": full[0]["tokens"], "values": np.where(full[0]["tokens"] == 7, 0.0, full[0]["values"])}]
    lacking = [{k: v[full[0]["tokens"] != 7] for k, v in full[0].items()}]
    a = model.embed(collate(listed_zero, modality="cells"))
    b = model.embed(collate(lacking, modality="cells"))
    assert not torch.allclose(a, b)  # "not measured" enters as hidden, not as an observed zero
    # a store of expressed genes only (binned): a gene left out is a zero, the same as listing it at 0
    binned = _model(scheme="binned")
    binned.set_gene_stats(np.zeros(12), np.ones(12))
    np.testing.assert_allclose(
        binned.embed(collate(listed_zero, modality="cells")), binned.embed(collate(lacking, modality="cells")), atol=1e-6
    )


def test_one_vector_per_cell_whatever_the_batch():
    model = _model().eval()
    records = _records()
    together = model.embed(collate(records, modality="cells"))
    alone = torch.cat([model.embed(collate([r], modality="cells")) for r in records])
    assert together.shape == (6, 4)
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=1e-5)
    assert torch.equal(model.embed(collate(records, modality="cells"), pooling="cls"), together)
    with pytest.raises(ValueError, match="concat"):
        model.embed(collate(records, modality="cells"), pooling="concat")


def test_gene_statistics_count_only_the_cells_that_measure_a_gene():
    records = [
        {"tokens": np.array([5, 6]), "values": np.array([1.0, 2.0])},
        {"tokens": np.array([5]), "values": np.array([3.0])},
    ]
    mean, std = gene_statistics(records, 7, panel=True)
    assert mean[5] == 2.0 and mean[6] == 2.0 and std[6] == 1.0  # gene 6: one cell, sd 0 -> 1
    mean, _ = gene_statistics(records, 7, panel=False)
    assert mean[6] == 1.0  # expressed-genes-only stores: a gene left out is a zero


# ------------------------------------------------------------------------------------------ real data


@pytest.fixture(scope="module")
def panel_store(tmp_path_factory):
    from tests.cells_store import prep_pbmc

    return prep_pbmc(tmp_path_factory.mktemp("stores") / "pbmc68k-panel", scheme="panel")


@pytest.fixture(scope="module")
def profile_checkpoint(panel_store, tmp_path_factory):
    from tests.conftest import _pretrain

    out = tmp_path_factory.mktemp("checkpoints") / "profile"
    return _pretrain(
        "configs/pretrain/cells-mlp.yaml",
        out,
        **{"data.store": panel_store, "model.d_model": 32, "model.d_ff": 128, "train.steps": 400,
           "optim.lr": 1e-3, "train.micro_batch_size": 64, "optim.warmup_steps": 20},
    )  # fmt: skip


@pytest.mark.network
def test_checkpoint_round_trips_with_its_standardisation(profile_checkpoint, panel_store):
    from biomask.store import TokenStore

    model = load_pretrained(profile_checkpoint)
    info = json.loads((profile_checkpoint / "config.json").read_text())
    assert info["architecture"]["kind"] == "mlp" and isinstance(model, ProfileAutoencoder)
    train = TokenStore(panel_store).split("train")
    mean, std = gene_statistics(train, model.config.vocab_size)
    np.testing.assert_allclose(model.gene_mean.numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.gene_std.numpy(), np.maximum(std, 1e-3), rtol=1e-5, atol=1e-6)
    # the held-out masked loss (standardised MSE) fell below predicting each gene's mean (= 1.0)
    assert info["eval"]["mean_loss"] < 0.95


@pytest.mark.network
def test_pretrained_profile_embedding_beats_the_random_network(profile_checkpoint, panel_store, tmp_path, cli):
    code, out, err = cli(
        "evaluate", "-c", "configs/evaluate/pbmc68k_reduced.yaml", f"store={panel_store}",
        f"output={tmp_path / 'eval'}", f"checkpoints.mlp={profile_checkpoint}", "seeds=[0,1,2]",
        "protocols=[linear_probe,knn]", "baselines=[pca_lr,hvg_lr]",
    )  # fmt: skip
    assert code == 0, err
    results = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    summary = results["summary"]
    pretrained = summary["mlp (linear probe)"]["macro_f1"]["mean"]
    random = summary["random-init (linear probe)"]["macro_f1"]["mean"]
    assert pretrained > random + 0.05, (pretrained, random)
    # the scanpy-side numbers are there for every representation, baselines included
    for name in ("mlp (kNN)", "random-init (kNN)", "PCA(50) + kNN", "all genes + kNN"):
        assert -1.0 <= summary[name]["cluster_ari"]["mean"] <= 1.0
    assert "all genes + LR" in summary
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "Leiden clusters" in report and "all genes + kNN" in report
