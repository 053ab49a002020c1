"""The expression-profile masked autoencoder (model.kind: mlp): what its users rely on.

- the masked genes are the only targets, a gene the data lacks is hidden (never a target, never a 0);
- one vector per cell, independent of the batch; the checkpoint round-trips with its standardisation;
- trained on real cells (pbmc68k_reduced, labels unused), its embedding carries cell identity: a linear
  probe on it beats the same network left random, through `biomask evaluate` itself.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from biomask.embedding.inference import check_pooling
from biomask.errors import InputError
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
    hidden_input = model._encode(
        model._standardised({**batch, "values": changed}), masked[:, :0].new_zeros(6, 12)
    )
    assert hidden_input[0].shape == (6, 12)
    masked_dense = model._dense(batch, masked) > 0
    latent_a = model._encode(model._standardised(batch), masked_dense)[-1]
    latent_b = model._encode(model._standardised({**batch, "values": changed}), masked_dense)[-1]
    torch.testing.assert_close(latent_a, latent_b)


def test_a_gene_the_data_lacks_is_hidden_not_zero():
    model = _model()
    full = _records()[:1]
    listed_zero = [
        {"tokens": full[0]["tokens"], "values": np.where(full[0]["tokens"] == 7, 0.0, full[0]["values"])}
    ]
    lacking = [{k: v[full[0]["tokens"] != 7] for k, v in full[0].items()}]
    a = model.embed(collate(listed_zero, modality="cells"))
    b = model.embed(collate(lacking, modality="cells"))
    assert not torch.allclose(a, b)  # "not measured" enters as hidden, not as an observed zero
    # a store of expressed genes only (binned): a gene left out is a zero, the same as listing it at 0
    binned = _model(scheme="binned")
    binned.set_gene_stats(np.zeros(12), np.ones(12))
    np.testing.assert_allclose(
        binned.embed(collate(listed_zero, modality="cells")),
        binned.embed(collate(lacking, modality="cells")),
        atol=1e-6,
    )


def test_one_vector_per_cell_whatever_the_batch():
    model = _model().eval()
    records = _records()
    together = model.embed(collate(records, modality="cells"))
    alone = torch.cat([model.embed(collate([r], modality="cells")) for r in records])
    assert together.shape == (6, 4)
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=1e-5)
    assert torch.equal(model.embed(collate(records, modality="cells"), pooling="cls"), together)
    for pooling in ("concat", "max"):  # over per-token vectors, which a profile model does not have
        with pytest.raises(ValueError, match=f"{pooling} pooling"):
            model.embed(collate(records, modality="cells"), pooling=pooling)
    with pytest.raises(InputError, match="offers mean, cls"):  # what `biomask embed` exits 2 with
        check_pooling(model, "max")


def test_every_layer_has_the_width_embed_writes():
    """The MLP's layers differ in width (input genes, hidden, latent): `biomask embed --layer` sizes
    its output by the layer asked for, not by d_model."""
    from biomask.embedding.inference import vector_width

    model = _model().eval()
    batch = collate(_records(), modality="cells")
    for layer in (-3, -2, -1, 0, 1, 2):
        assert model.embed(batch, layer=layer).shape == (6, vector_width(model, layer))
    assert [vector_width(model, layer) for layer in (0, 1, 2)] == [12, 8, 4]


def test_a_plot_title_names_the_latent_not_a_pooling():
    """The UMAP of a profile embedding was titled "mean pooling · layer -1": the autoencoder pools
    nothing, so a reader took the title for a token model's."""
    from biomask.embedding.stage import vector_title

    model = _model()
    assert vector_title(model, "mean", -1) == "latent" and "pooling" not in vector_title(model, "mean", -2)
    cfg = EncoderConfig(vocab_size=12, modality="dna", d_model=8, n_layers=1, n_heads=1, d_ff=16, max_len=16)
    assert vector_title(build_model(cfg), "mean", -1) == "mean pooling · layer -1"


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


def test_a_resealed_checkpoint_with_a_zero_gene_std_is_refused_not_embedded_as_nan(
    profile_checkpoint, tmp_path
):
    """The profile is divided by gene_std: zeros written into it (digests resealed) gave all-NaN
    embeddings with exit 0."""
    import shutil

    from safetensors.torch import load_file, save_file

    from biomask.errors import InputError
    from biomask.models.pretrained import CONFIG_SHA256, config_digest
    from biomask.provenance import sha256_file

    model = shutil.copytree(profile_checkpoint, tmp_path / "zero-std")
    state = load_file(model / "model.safetensors")
    state["gene_std"][:5] = 0.0
    save_file(state, model / "model.safetensors", metadata={"format": "biomask-pretrained"})
    config = json.loads((model / "config.json").read_text())
    config["weights_sha256"] = sha256_file(model / "model.safetensors")
    config[CONFIG_SHA256] = config_digest(config)
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="gene_std holds values below 0.001, which training never writes"):
        load_pretrained(model)


@pytest.mark.network
def test_pretrained_profile_embedding_beats_the_random_network(
    profile_checkpoint, panel_store, tmp_path, cli
):
    code, _out, err = cli(
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
        # scIB's best resolution: resolution 1 is in its grid, so it never scores below it
        assert summary[name]["cluster_nmi_best"]["mean"] >= summary[name]["cluster_nmi"]["mean"] - 1e-12
        assert -1.0 <= summary[name]["cluster_ari_best"]["mean"] <= 1.0
    assert "all genes + LR" in summary
    # a kNN row is paired with the strongest kNN baseline (the same classifier), a probe row with the
    # strongest baseline overall
    knn_base = max(("PCA(50) + kNN", "all genes + kNN"), key=lambda n: summary[n]["mcc"]["mean"])
    assert results["strongest_knn_baseline"] == knn_base
    against = {c["a"]: c["b"] for c in results["comparisons"] if c["b"] not in ("random-init (kNN)",
               "random-init (linear probe)")}  # fmt: skip
    assert against["mlp (kNN)"] == against["random-init (kNN)"] == knn_base
    assert against["mlp (linear probe)"] == results["strongest_baseline"] != knn_base
    report = (tmp_path / "eval" / "report.md").read_text()
    assert f"| mlp (kNN) | {knn_base} |" in report
    assert "Leiden clusters" in report and "all genes + kNN" in report and "best resolution" in report


@pytest.mark.network
def test_scmae_trains_through_the_trainer_and_switches_objective_on_continuing(
    profile_checkpoint, panel_store, tmp_path, caplog
):
    """model.objective is the run's choice: continuing an mae checkpoint with scmae starts a new swap
    detector on its encoder and decoder, and continuing that with mae drops the detector again."""
    from tests.conftest import _pretrain

    keys = {"data.store": panel_store, "model.d_model": 32, "model.d_ff": 128, "train.steps": 10}
    swapped = _pretrain(
        "configs/pretrain/cells-mlp.yaml", tmp_path / "scmae", **keys,
        **{"model.init_from": profile_checkpoint, "model.objective": "scmae"},
    )  # fmt: skip
    model = load_pretrained(swapped)
    start = load_pretrained(profile_checkpoint)
    assert model.config.objective == "scmae" and hasattr(model, "swap_head")
    assert not hasattr(start, "swap_head")
    torch.testing.assert_close(model.gene_mean, start.gene_mean)  # the corpus model's standardisation
    info = json.loads((swapped / "config.json").read_text())
    assert info["architecture"]["objective"] == "scmae"
    assert 0.0 < info["eval"]["mean_loss"] < 1.5  # the swapped genes' MSE, next to the gene mean's 1.0
    # the lineage: where the weights started and the steps behind them
    assert info["init_from"] == {"path": str(profile_checkpoint), "sha256": start.checkpoint_info["weights_sha256"],
                                 "steps": 400}  # fmt: skip
    # a size the checkpoint's weights contradict is not used, and the log says so
    with caplog.at_level("WARNING", logger="biomask"):
        back = load_pretrained(_pretrain("configs/pretrain/cells-mlp.yaml", tmp_path / "mae",
                                         **{**keys, "model.d_ff": 64}, **{"model.init_from": swapped}))  # fmt: skip
    assert back.config.objective == "mae" and not hasattr(back, "swap_head")
    assert back.config.d_ff == 128 and "not used: model.d_ff=64 (the checkpoint's: 128)" in caplog.text
    assert json.loads((tmp_path / "mae" / "model" / "config.json").read_text())["init_from"]["steps"] == 410
    # the latent penalty is a training choice too: this run's, as its resolved config records it
    penalised = _pretrain("configs/pretrain/cells-mlp.yaml", tmp_path / "dec", **keys,
                          **{"model.init_from": profile_checkpoint, "model.decorrelation": 0.1})  # fmt: skip
    assert load_pretrained(penalised).config.decorrelation == 0.1
    plain = _pretrain("configs/pretrain/cells-mlp.yaml", tmp_path / "plain", **keys,
                      **{"model.init_from": penalised})  # fmt: skip
    assert load_pretrained(plain).config.decorrelation == 0.0
    assert "decorrelation: 0.0" in (tmp_path / "plain" / "config.yaml").read_text()


@pytest.mark.network
def test_continuing_a_checkpoint_is_checked_as_its_own_kind(profile_checkpoint, panel_store, tmp_path, cli):
    """The checkpoint's kind is what trains, whatever model.kind says: a masking target the profile
    model cannot learn is refused (exit 2, nothing written), not recorded beside weights that
    reconstruct values (it was, unless model.kind named the checkpoint's kind)."""
    out = tmp_path / "tokens"
    code, _, err = cli(
        "pretrain", "-c", Path(__file__).parents[1] / "configs/pretrain/cells-mlp.yaml",
        f"data.store={panel_store}", "model.kind=transformer", f"model.init_from={profile_checkpoint}",
        "masking.target=tokens", "train.steps=2", f"output={out}",
    )  # fmt: skip
    assert code == 2 and "is a mlp model" in err and "masking.target=tokens is not possible" in err, err
    assert not out.exists()
    # bf16 weights (a traceback at the first step, in_progress.json left behind): refused, the
    # checkpoint's kind checked as well as the config's
    mlp = Path(__file__).parents[1] / "configs/pretrain/cells-mlp.yaml"
    for kind in (
        ["model.kind=panel_transformer"],
        ["model.kind=transformer", f"model.init_from={profile_checkpoint}"],
    ):
        code, _, err = cli(
            "pretrain", "-c", mlp, f"data.store={panel_store}", *kind, "train.precision=bf16-weights",
            "train.steps=2", f"output={out}",
        )  # fmt: skip
        assert code == 2 and "train.precision=bf16-weights (DeepSpeed's bf16 weights) is for the token" in err
        assert not out.exists()
    # a switch that changes nothing for the kind is refused as the others are
    from biomask.training.config import ModelConfig

    for kind in ("mlp", "cnn"):
        with pytest.raises(
            ValueError, match=f"activation_checkpointing recomputes .* model.kind {kind} has none"
        ):
            ModelConfig(kind=kind, activation_checkpointing=True)
    assert ModelConfig(kind="panel_transformer", activation_checkpointing=True).activation_checkpointing
    # the kind that trains is the checkpoint's: a transformer config continuing it is checked as such
    code, _, err = cli(
        "pretrain", "-c", mlp, f"data.store={panel_store}", "model.kind=transformer",
        f"model.init_from={profile_checkpoint}", "model.activation_checkpointing=true", "train.steps=2",
        f"output={out}",
    )  # fmt: skip
    assert code == 2 and "the model that trains (model.init_from's) is a mlp, which has none" in err, err
    assert not out.exists()


@pytest.mark.network
def test_settings_a_profile_model_never_reads_are_refused(profile_checkpoint, panel_store, tmp_path, cli):
    """data.max_length, data.crop, model.decoder_layers and the replacement shares of masked tokens ran
    on the expression models and changed no weight, the resolved config recording them as used."""
    mlp = Path(__file__).parents[1] / "configs/pretrain/cells-mlp.yaml"
    out = tmp_path / "run"
    for given, said in (
        ("data.max_length=20", "data.max_length=20 (it reads every gene of its panel)"),
        ("data.crop=start", "data.crop=start (it reads every gene"),
        ("model.decoder_layers=3", "model.decoder_layers=3 (the depth of the transformer's MAE decoder"),
        ("masking.corruption.kind=mae model.decoder_layers=3", "model.decoder_layers=3 (the depth of the"),
        ("masking.corruption.mask_token=0.5", "expression values are hidden, never replaced"),
    ):
        for kind in (
            ["model.kind=mlp"],
            ["model.kind=panel_transformer"],
            [f"model.init_from={profile_checkpoint}"],
        ):
            code, _, err = cli(
                "pretrain", "-c", mlp, f"data.store={panel_store}", *kind, *given.split(), "train.steps=2", f"output={out}"
            )  # fmt: skip
            assert code == 2 and said in err and "leave it out" in err, (given, kind, err)
            assert not out.exists()
    code, _, err = cli(
        "pretrain", "-c", mlp, f"data.store={panel_store}", "model.kind=panel_transformer",
        "model.mask_indicator=false", "train.steps=2", f"output={out}",
    )  # fmt: skip
    assert code == 2 and "model.mask_indicator=false (the mlp's input)" in err, err
    assert not out.exists()


@pytest.mark.network
def test_continuing_a_checkpoint_on_records_of_another_scheme_is_refused(profile_checkpoint, tmp_path, cli):
    """A store prepared with the checkpoint's tokenizer but another scheme (the same genes, other
    values) passed the tokenizer check: the model went on learning from values of another kind."""
    from biomask.cells.config import CellsPrepConfig
    from biomask.cells.prep import prep_cells
    from biomask.config import load_config
    from tests.cells_store import REPO

    binned = prep_cells(
        load_config(
            CellsPrepConfig,
            REPO / "configs" / "cells" / "pbmc68k_reduced.yaml",
            [
                f"output={tmp_path / 'binned'}",
                f"tokenizer.path={profile_checkpoint / 'tokenizer'}",
                "tokenizer.scheme=binned",
            ],
        )
    )
    out = tmp_path / "cont"
    code, _, err = cli(
        "pretrain", "-c", REPO / "configs/pretrain/cells-mlp.yaml", f"data.store={binned}",
        f"model.init_from={profile_checkpoint}", "train.steps=2", f"output={out}",
    )  # fmt: skip
    assert code == 2 and "was trained on panel records" in err and "tokenizer.scheme=panel" in err, err
    assert not out.exists()


@pytest.mark.network
def test_embed_is_redone_when_its_checkpoint_is_retrained_into_the_same_weights(panel_store, tmp_path, cli):
    """model.embed_norm changes what a checkpoint embeds, not its weights: retrained with another
    embed_norm, the same `biomask embed` was reused (the vectors of the other setting, with no word;
    in a pipeline too) since reuse compared the weights alone. Now the checkpoint's config.json counts:
    refused (exit 2, a pipeline reruns it), and --overwrite writes the new setting's vectors. An
    output written before config.json counted is still reused while its checkpoint is unchanged."""
    import anndata as ad

    from biomask import datasets
    from biomask.config import load_config
    from biomask.embedding.config import EmbedConfig, non_semantic
    from biomask.embedding.reuse import checkpoint_inputs
    from biomask.stage import CONFIG_SHA256, StageOutput

    repo = Path(__file__).parents[1]
    run, out = tmp_path / "run", tmp_path / "embedded"
    train = ("pretrain", "-c", repo / "configs/pretrain/cells-mlp.yaml", f"data.store={panel_store}",
             "model.d_model=16", "model.d_ff=32", "train.steps=3", "train.progress=false",
             "deepspeed.stage=0", f"output={run}")  # fmt: skip
    pbmc = datasets.fetch("pbmc68k_reduced")
    embed = ("embed", "--checkpoint", run / "model", "--input", pbmc, "--output", out, "matrix=raw",
             "counts.mode=from_log1p", "counts.total_counts_column=n_counts")  # fmt: skip

    def lengths():
        vectors = ad.read_h5ad(out / "embeddings.h5ad").obsm["X_biomask"]
        return np.linalg.norm(vectors, axis=1)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli(*train, "model.embed_norm=none")[0] == 0
        weights = (run / "model" / "model.safetensors").read_bytes()
        code, _, err = cli(*embed)
        assert code == 0, err
        assert not np.allclose(lengths(), 1.0, atol=1e-4)

        # what biomask wrote before the checkpoint's config.json counted: reused while it is unchanged
        info = json.loads((out / "run.json").read_text())
        cfg = load_config(EmbedConfig, out / "config.yaml", [])
        stage = StageOutput("embed", cfg, out, checkpoint_inputs(cfg, pbmc), non_semantic(cfg, "cells"))
        info["fingerprint"] = stage.legacy_fingerprint
        info["inputs"] = [{k: v for k, v in i.items() if k != CONFIG_SHA256} for i in info["inputs"]]
        (out / "run.json").write_text(json.dumps(info))
        code, _, err = cli(*embed)
        assert code == 0 and "up to date" in err, err

        assert cli(*train, "model.embed_norm=l2", "--overwrite")[0] == 0
        assert (run / "model" / "model.safetensors").read_bytes() == weights  # training is the same
        code, _, err = cli(*embed)
        assert code == 2 and "config.json is newer" in err and "--overwrite" in err, err
        assert cli(*embed, "--overwrite")[0] == 0
        np.testing.assert_allclose(lengths(), 1.0, atol=1e-4)

        # an output of this version records the config: back to embed_norm none, refused again
        assert cli(*train, "model.embed_norm=none", "--overwrite")[0] == 0
        code, _, err = cli(*embed)
        assert code == 2 and "different config or input" in err, err
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------- the user's own cells


@pytest.fixture(scope="module")
def pbmc68k_adata():
    import anndata as ad

    from biomask.datasets import fetch

    return ad.read_h5ad(fetch("pbmc68k_reduced"))


@pytest.mark.network
def test_fit_cells_trains_on_the_users_anndata_and_embeds_it_in_place(pbmc68k_adata, tmp_path, capsys):
    import biomask

    adata = pbmc68k_adata.copy()
    adata.obs["mixed"] = [1, "a"] * (adata.n_obs // 2)  # a column h5py cannot store: not fit_cells' concern
    before = set(adata.obsm)
    environment = dict(os.environ)
    import logging
    import sys
    import warnings

    # a library call leaves its host as it was: torch's excepthook, warnings filters, DeepSpeed's log
    # level, and no process group of its own (Lightning read one as a distributed run)
    host = (
        sys.excepthook,
        list(warnings.filters),
        logging.getLogger("DeepSpeed").level,
    )
    checkpoint = biomask.fit_cells(
        adata,
        tmp_path / "mine",
        matrix="raw",
        counts={"mode": "log1p"},  # the file's raw holds log1p(CP10k) values and no counts
        overrides={"train.steps": 60, "train.checkpoint_every": 60},
    )
    after = (
        sys.excepthook,
        list(warnings.filters),
        logging.getLogger("DeepSpeed").level,
    )
    assert after == host
    import torch.distributed as dist

    assert not dist.is_initialized()
    assert adata.obsm["X_biomask"].shape == (adata.n_obs, 64)
    assert set(adata.obsm) - before == {"X_biomask"}
    assert "pretrain step 60/60 (100.0%)" in capsys.readouterr().err  # a notebook sees training move
    added = set(os.environ) - set(environment)  # (library imports may set their own, e.g. KMP_*)
    assert not added & {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR"}
    assert np.isfinite(adata.obsm["X_biomask"]).all()
    # the shipped settings give unit-length cell embeddings, and the provenance says so
    np.testing.assert_allclose(np.linalg.norm(adata.obsm["X_biomask"], axis=1), 1.0, rtol=1e-5)
    assert adata.uns["X_biomask"]["normalisation"] == "l2"
    info = json.loads((checkpoint / "config.json").read_text())
    assert info["architecture"]["kind"] == "mlp" and info["training"]["steps"] == 60
    assert info["architecture"]["embed_norm"] == "l2"
    # copy=True, as scanpy users know it: theirs untouched, a copy with the embedding returned (the
    # same call: every stage reused)
    theirs = pbmc68k_adata.copy()
    returned = biomask.fit_cells(theirs, tmp_path / "mine", matrix="raw", counts={"mode": "log1p"},
                                 overrides={"train.steps": 60, "train.checkpoint_every": 60}, copy=True)  # fmt: skip
    assert "X_biomask" not in theirs.obsm and "X_biomask" not in theirs.uns
    np.testing.assert_array_equal(returned.obsm["X_biomask"], adata.obsm["X_biomask"])
    assert Path(returned.uns["X_biomask"]["checkpoint"]) == checkpoint.resolve()
    # the copy prep read holds the one matrix it needs, nothing else of the user's AnnData
    copy = ad.read_h5ad(tmp_path / "mine" / "cells.h5ad")
    assert copy.X is None and copy.raw.shape == pbmc68k_adata.raw.shape and not copy.layers
    assert not copy.obsm and list(copy.obs.columns) == [] and set(copy.uns) == {"biomask_fit_cells"}
    # other cells into the same output: refused, and the copy beside the store is still the one it holds
    from biomask.errors import StaleOutputError

    kept = (tmp_path / "mine" / "cells.h5ad").read_bytes()
    with pytest.raises(StaleOutputError, match="overwrite=True"):
        biomask.fit_cells(
            pbmc68k_adata[:300].copy(), tmp_path / "mine", matrix="raw", counts={"mode": "log1p"}
        )
    assert (tmp_path / "mine" / "cells.h5ad").read_bytes() == kept
    assert not list((tmp_path / "mine").glob(".*previous"))  # nothing of the refused call is left
    # labels were not used: the store has no label column
    store = json.loads((tmp_path / "mine" / "store" / "manifest.json").read_text())
    assert store["label_names"] is None and store["scheme"] == "panel"
    # the same call again reuses every stage (nothing retrained) and gives the same embedding
    weights = (checkpoint / "model.safetensors").stat().st_mtime_ns
    again = pbmc68k_adata.copy()
    biomask.fit_cells(
        again, tmp_path / "mine", matrix="raw", counts={"mode": "log1p"},
        overrides={"train.steps": 60, "train.checkpoint_every": 60},
    )  # fmt: skip
    assert (checkpoint / "model.safetensors").stat().st_mtime_ns == weights
    np.testing.assert_array_equal(again.obsm["X_biomask"], adata.obsm["X_biomask"])
    # a changed training setting: refused, saying how from Python too
    with pytest.raises(StaleOutputError, match=r"overwrite=True"):
        biomask.fit_cells(
            pbmc68k_adata.copy(), tmp_path / "mine", matrix="raw", counts={"mode": "log1p"},
            overrides={"train.steps": 61, "train.checkpoint_every": 60},
        )  # fmt: skip
    # a backed AnnData is read from its file and gets the same embedding, in place
    path = tmp_path / "cells.h5ad"
    pbmc68k_adata.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    biomask.fit_cells(
        backed, tmp_path / "backed", matrix="raw", counts={"mode": "log1p"},
        overrides={"train.steps": 60, "train.checkpoint_every": 60},
    )  # fmt: skip
    np.testing.assert_allclose(backed.obsm["X_biomask"], adata.obsm["X_biomask"], rtol=0, atol=1e-5)
    with pytest.raises(InputError, match="a view of a backed AnnData"):  # would train on every cell
        biomask.fit_cells(backed[:100], tmp_path / "view", matrix="raw", counts={"mode": "log1p"})
    assert not (tmp_path / "view").exists()
    backed.file.close()
    # scanpy's own obsm entries are never the embedding's key: refused before anything is written
    with pytest.raises(InputError, match=r"obsm\['X_pca'\] exists and biomask did not write it"):
        biomask.fit_cells(pbmc68k_adata.copy(), tmp_path / "clash", matrix="raw", counts={"mode": "log1p"}, key="X_pca")  # fmt: skip
    assert not (tmp_path / "clash").exists()
    # an inner layer (the 256-wide hidden one) embeds at its own width
    hidden = biomask.embed(
        pbmc68k_adata, checkpoint, layer=-2, key="X_hidden", matrix="raw", counts={"mode": "log1p"}, copy=True
    )
    assert hidden.obsm["X_hidden"].shape == (adata.n_obs, 256)
    assert np.isfinite(hidden.obsm["X_hidden"]).all()
    assert hidden.uns["X_hidden"]["normalisation"] == "none"  # inner layers are not rescaled
    # continuing a checkpoint written before unit-length embeddings (no embed_norm): the new run
    # embeds at unit length, as its config says, whatever the checkpoint it started from did
    older = tmp_path / "older"
    shutil.copytree(checkpoint, older)
    config = json.loads((older / "config.json").read_text())
    del config["architecture"]["embed_norm"]
    del config["config_sha256"]  # written before config.json recorded its own digest
    del config["data"]["sources"]  # (and its store's input files)
    (older / "config.json").write_text(json.dumps(config))
    assert load_pretrained(older).config.embed_norm == "none"
    cont = pbmc68k_adata.copy()
    continued = biomask.fit_cells(
        cont, tmp_path / "cont", matrix="raw", counts={"mode": "log1p"}, init_from=older,
        overrides={"train.steps": 20, "train.checkpoint_every": 20},
    )  # fmt: skip
    assert json.loads((continued / "config.json").read_text())["architecture"]["embed_norm"] == "l2"
    np.testing.assert_allclose(np.linalg.norm(cont.obsm["X_biomask"], axis=1), 1.0, rtol=1e-5)
    # an error only prep finds (a panel sharing no gene with the data) names the user's AnnData and
    # leaves nothing behind: the corrected call starts clean
    renamed = pbmc68k_adata.copy()
    renamed.raw = ad.AnnData(
        renamed.raw.X, var=pd.DataFrame(index=[f"g{i}" for i in range(renamed.raw.n_vars)])
    )
    with pytest.raises(InputError) as err:
        biomask.fit_cells(
            renamed, tmp_path / "none", matrix="raw", counts={"mode": "log1p"}, init_from=checkpoint
        )
    assert "AnnData" in str(err.value) and "cells.h5ad" not in str(err.value)
    # the way out by the names this call takes (genes.column is a prep key, unknown here)
    assert "gene_column=" in str(err.value) and "genes.column" not in str(err.value)
    assert not (tmp_path / "none").exists()
    # a panel size asked for beside init_from would be ignored (the checkpoint's panel is kept): refused
    with pytest.raises(
        InputError, match="n_top_genes=500 with init_from .* keeps its checkpoint's gene panel"
    ):
        biomask.fit_cells(cont, tmp_path / "n500", matrix="raw", counts={"mode": "log1p"}, init_from=older,
                          n_top_genes=500)  # fmt: skip
    assert not (tmp_path / "n500").exists()
    # an output written by fit_cells before the slim copy (the whole AnnData, unmarked, with its store)
    # is reused as it was: the same call does not meet "different input data"
    from biomask.cells.prep import prep_cells
    from biomask.embedding.fit import _prep_config

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    pbmc68k_adata.write_h5ad(legacy / "cells.h5ad")
    prep_cells(
        _prep_config(
            legacy / "cells.h5ad", legacy / "store", matrix="raw", counts={"mode": "log1p"}, gene_column=None,
            n_top_genes=2000, init_from=None,
        )
    )  # fmt: skip
    store_time = (legacy / "store" / "manifest.json").stat().st_mtime_ns
    biomask.fit_cells(
        pbmc68k_adata.copy(), legacy, matrix="raw", counts={"mode": "log1p"},
        overrides={"train.steps": 10, "train.checkpoint_every": 10},
    )  # fmt: skip
    assert (legacy / "store" / "manifest.json").stat().st_mtime_ns == store_time


@pytest.mark.network
def test_fit_cells_continues_an_unversioned_checkpoint_on_versioned_ensembl_ids(pbmc68k_adata, tmp_path):
    """ENSG….N against a checkpoint of ENSG… ids: the message names strip_version=True, which works."""
    import biomask

    raw = pbmc68k_adata.raw.to_adata()
    ids = [f"ENSG{i:011d}" for i in range(raw.n_vars)]
    plain, versioned = raw.copy(), raw.copy()
    plain.var_names = ids
    versioned.var_names = [f"{g}.{i % 7 + 1}" for i, g in enumerate(ids)]
    steps = {"train.steps": 30, "train.checkpoint_every": 30}
    corpus = biomask.fit_cells(plain, tmp_path / "corpus", counts={"mode": "log1p"}, overrides=steps)
    with pytest.raises(InputError, match=r"strip_version=True \(fit-cells: --strip-version\)"):
        biomask.fit_cells(versioned.copy(), tmp_path / "v", counts={"mode": "log1p"}, init_from=corpus, overrides=steps)  # fmt: skip
    assert not (tmp_path / "v").exists()
    biomask.fit_cells(
        versioned, tmp_path / "v", counts={"mode": "log1p"}, init_from=corpus, strip_version=True, overrides=steps
    )  # fmt: skip
    assert versioned.obsm["X_biomask"].shape[0] == raw.n_obs
    assert versioned.uns["X_biomask"]["gene_coverage"]["fraction_of_vocab_present"] == 1.0


@pytest.mark.network
def test_fit_cells_trains_the_panel_transformer_when_asked(pbmc68k_adata, tmp_path):
    """Any profile kind through the same call: overrides={"model.kind": "panel_transformer"}."""
    import biomask

    adata = pbmc68k_adata.copy()
    checkpoint = biomask.fit_cells(
        adata, tmp_path / "pt", matrix="raw", counts={"mode": "log1p"}, n_top_genes=200,
        overrides={"model.kind": "panel_transformer", "train.steps": 8, "train.micro_batch_size": 16},
    )  # fmt: skip
    info = json.loads((checkpoint / "config.json").read_text())
    assert info["architecture"]["kind"] == "panel_transformer" and info["training"]["steps"] == 8
    # the kind's own recipe (configs/pretrain/cells-panel-transformer.yaml), not the mlp's
    assert (info["masking"]["ratio"]["low"], info["masking"]["ratio"]["high"]) == (0.1, 0.75)
    assert info["masking"]["corruption"]["kind"] == "mae"
    vectors = adata.obsm["X_biomask"]
    assert vectors.shape == (adata.n_obs, info["architecture"]["d_model"]) and np.isfinite(vectors).all()
    assert float(vectors.std(0).mean()) > 0  # one vector per cell, not a constant
    assert adata.uns["X_biomask"]["pooling"] == "cls"  # what the vector is: the cell token, as recorded
    # continuing it needs no model.kind: the checkpoint's kind brings its recipe
    again = biomask.fit_cells(
        pbmc68k_adata.copy(), tmp_path / "pt-cont", matrix="raw", counts={"mode": "log1p"}, init_from=checkpoint,
        overrides={"train.steps": 4, "train.micro_batch_size": 16},
    )  # fmt: skip
    info = json.loads((again / "config.json").read_text())
    assert (
        info["architecture"]["kind"] == "panel_transformer" and info["masking"]["corruption"]["kind"] == "mae"
    )
    assert (info["masking"]["ratio"]["low"], info["masking"]["ratio"]["high"]) == (0.1, 0.75)


@pytest.mark.network
def test_fit_cells_refuses_too_few_cells_and_a_file_without_counts(
    pbmc68k_adata, profile_checkpoint, tmp_path, cli
):
    import biomask
    from biomask.errors import InputError, OutputExistsError

    with pytest.raises(InputError, match="at least 20"):
        biomask.fit_cells(pbmc68k_adata[:10].copy(), tmp_path / "few", matrix="raw", counts={"mode": "log1p"})
    # 21 cells of which 2 hold nothing: 19 kept, refused after the prep that finds them empty
    import anndata as ad

    values = np.asarray(
        pbmc68k_adata.raw.X[:21].todense()
        if hasattr(pbmc68k_adata.raw.X, "todense")
        else pbmc68k_adata.raw.X[:21]
    )
    values[[3, 9]] = 0
    emptied = ad.AnnData(values, obs=pbmc68k_adata.obs.iloc[:21].copy(), var=pbmc68k_adata.raw.var.copy())
    with pytest.raises(InputError, match="19 cells kept .* at least 20"):
        biomask.fit_cells(emptied, tmp_path / "emptied", counts={"mode": "log1p"})
    # what the AnnData lacks, and a setting that does not exist, are found before anything is written
    bad = tmp_path / "bad"
    with pytest.raises(InputError) as err:
        biomask.fit_cells(pbmc68k_adata, bad)  # X is scaled: no counts there
    assert "AnnData [X]" in str(err.value) and "It also has raw" in str(err.value)
    with pytest.raises(InputError, match="gene_column="):
        biomask.fit_cells(pbmc68k_adata, bad, matrix="raw", counts={"mode": "log1p"}, gene_column="symbols")
    with pytest.raises(InputError, match=r"masking='r2mea' \(fit-cells: --masking\) is not a masking scheme"):
        biomask.fit_cells(pbmc68k_adata, bad, matrix="raw", counts={"mode": "log1p"}, masking="r2mea")
    for key, value in (("data.store", str(tmp_path)), ("output", str(tmp_path / "elsewhere"))):
        with pytest.raises(InputError, match=f"fit_cells: {key} cannot be overridden"):
            biomask.fit_cells(
                pbmc68k_adata, bad, matrix="raw", counts={"mode": "log1p"}, overrides={key: value}
            )
    # however the key is written (a section, the CLI's quoted text), fit_cells reads it as pretrain will
    with pytest.raises(InputError, match="fit_cells: data.verify cannot be overridden"):
        biomask.fit_cells(
            pbmc68k_adata, bad, matrix="raw", counts={"mode": "log1p"}, overrides={"data": "{verify: false}"}
        )
    with pytest.raises(InputError, match="fit_cells: model.init_from cannot be overridden"):
        biomask.fit_cells(
            pbmc68k_adata, bad, matrix="raw", counts={"mode": "log1p"}, overrides={"model": "{init_from: x}"}
        )
    from biomask.embedding.fit import _pretrain_config

    for written in ("panel_transformer", "'panel_transformer'", '"panel_transformer"'):
        cfg = _pretrain_config(bad / "s", bad / "p", init_from=None, overrides={"model.kind": written})
        assert cfg.model.kind == "panel_transformer" and cfg.masking.ratio.low == 0.1, written  # its recipe
    # a section given whole adds to the recipe: it used to replace the model section, init_from with it
    for section in ({"dropout": 0.1}, {}):
        cfg = _pretrain_config(
            bad / "s", bad / "p", init_from=profile_checkpoint, overrides={"model": section}
        )
        assert cfg.model.init_from == str(profile_checkpoint) and cfg.model.embed_norm == "auto"
        assert cfg.model.dropout == section.get("dropout", 0.0)
    with pytest.raises(InputError, match="train.stepz"):
        biomask.fit_cells(
            pbmc68k_adata, bad, matrix="raw", counts={"mode": "log1p"}, overrides={"train.stepz": 3}
        )
    # a count likelihood on values taken as normalised, and a damaged checkpoint to continue: found
    # before the prep they would waste (and the store that would then block the corrected retry)
    with pytest.raises(InputError, match=r"model.loss=poisson needs raw counts .* counts.mode=log1p"):
        biomask.fit_cells(
            pbmc68k_adata, bad, matrix="raw", counts={"mode": "log1p"}, overrides={"model.loss": "poisson"}
        )
    damaged = tmp_path / "damaged"
    shutil.copytree(profile_checkpoint, damaged)
    weights = bytearray((damaged / "model.safetensors").read_bytes())
    weights[-1] ^= 1
    (damaged / "model.safetensors").write_bytes(bytes(weights))
    with pytest.raises(InputError, match=r"damaged/model.safetensors is corrupt or was changed"):
        biomask.fit_cells(pbmc68k_adata, bad, matrix="raw", counts={"mode": "log1p"}, init_from=damaged)
    # another kind cannot continue a checkpoint (its weights fix the kind): said, not trained anyway
    with pytest.raises(InputError, match="is a mlp model, and its weights fix the kind"):
        biomask.fit_cells(
            pbmc68k_adata, bad, matrix="raw", counts={"mode": "log1p"}, init_from=profile_checkpoint,
            overrides={"model.kind": "'panel_transformer'"},  # quoted, as a shell passes it through
        )  # fmt: skip
    assert not bad.exists()
    # a second call into a folder another call (kernel, script, thread) is fitting: refused before it
    # writes, naming the holder, never cleaning up the other call's store as a failed call of its own
    from biomask.errors import OutputBusyError
    from biomask.outputs import hold_output

    busy = tmp_path / "busy"
    refused = pytest.raises(OutputBusyError, match=f"output {busy} is being written .*pid {os.getpid()} on")
    with hold_output(busy, "fit_cells"), refused:
        biomask.fit_cells(pbmc68k_adata.copy(), busy, matrix="raw", counts={"mode": "log1p"})
    assert not busy.exists()
    # a file of 10 cells: the count is known only once prep has read it, and the store it wrote goes
    few = tmp_path / "few.h5ad"
    pbmc68k_adata[:10].copy().write_h5ad(few)
    args = ("--matrix", "raw", "counts.mode=log1p")
    code, _out, err = cli("fit-cells", "--input", few, "--output", tmp_path / "few-file", *args)
    assert code == 2 and "few.h5ad" in err and "at least 20" in err
    assert not (tmp_path / "few-file").exists()  # nothing half-written
    # a user's own cells.h5ad in the output folder is not fit_cells' copy: never replaced
    clash = tmp_path / "clash"
    clash.mkdir()
    (clash / "cells.h5ad").write_bytes(b"mine")
    with pytest.raises(OutputExistsError, match="not fit_cells' copy"):
        biomask.fit_cells(pbmc68k_adata.copy(), clash, matrix="raw", counts={"mode": "log1p"})
    assert (clash / "cells.h5ad").read_bytes() == b"mine"
    # a folder of the user's where fit_cells writes its store (or fit-cells its embedding): refused
    # before anything is prepared or trained, with no hint at overwrite (which never replaces it)
    (clash / "cells.h5ad").unlink()
    (clash / "store").mkdir()
    (clash / "store" / "mine.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="store exists and was not written by biomask") as err:
        biomask.fit_cells(pbmc68k_adata.copy(), clash, matrix="raw", counts={"mode": "log1p"}, overwrite=True)
    assert "overwrite=True" not in str(err.value)
    assert sorted(p.name for p in clash.iterdir()) == ["store"] and (clash / "store" / "mine.txt").exists()
    path = tmp_path / "cells.h5ad"
    pbmc68k_adata.write_h5ad(path)
    code, _out, err = cli("fit-cells", "--input", path, "--output", tmp_path / "fit", "--matrix", "raw")
    assert code == 2
    assert "cells.h5ad" in err and "counts.mode" in err  # says what the file holds and what to set
    assert not (tmp_path / "fit").exists()
    mine = tmp_path / "mine" / "embed" / "embeddings.h5ad"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"mine")
    code, _out, err = cli("fit-cells", "--input", path, "--output", tmp_path / "mine", *args)
    assert code == 2 and "embed exists and was not written by biomask" in err, err
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["embed"] and mine.read_bytes() == b"mine"
    # a UMAP colour the file lacks, or a file fit-cells does not read, before any training
    for input_, extra, expected in (
        (path, ["--umap-color", "celltype"], "no column 'celltype' to colour the UMAP by"),
        (tmp_path / "cells.loom", [], "biomask.read_cells("),
    ):
        if not Path(input_).exists():
            Path(input_).write_bytes(b"")
        code, _out, err = cli("fit-cells", "--input", input_, "--output", tmp_path / "fit", *args, *extra)
        assert code == 2 and expected in err, err
        assert not (tmp_path / "fit").exists()


@pytest.mark.network
def test_a_fit_cells_rerun_redoes_only_the_stages_its_settings_change(pbmc68k_adata, tmp_path, cli):
    """Another UMAP colour embeds again (no flag: the embedding is fit-cells' own) without training
    again; another training setting needs --overwrite and trains again on the same prepared cells."""
    path = tmp_path / "cells.h5ad"
    pbmc68k_adata.write_h5ad(path)
    out = tmp_path / "fit"
    args = ("fit-cells", "--input", path, "--output", out, "--matrix", "raw", "counts.mode=log1p",
            "train.checkpoint_every=20")  # fmt: skip
    code, _, err = cli(*args, "train.steps=20", "--umap-color", "bulk_labels")
    assert code == 0, err
    weights, manifest = out / "pretrain" / "model" / "model.safetensors", out / "store" / "manifest.json"
    trained, prepared = weights.stat().st_mtime_ns, manifest.stat().st_mtime_ns
    code, _, err = cli(*args, "train.steps=20", "--umap-color", "n_counts")
    assert code == 0, err
    assert weights.stat().st_mtime_ns == trained and manifest.stat().st_mtime_ns == prepared
    assert "color: n_counts" in (out / "embed" / "config.yaml").read_text()
    code, _, err = cli(*args, "train.steps=20", "--umap-color", "n_counts", "--key", "X_mine")
    assert code == 0, err
    assert (
        weights.stat().st_mtime_ns == trained and "key: X_mine" in (out / "embed" / "config.yaml").read_text()
    )
    import anndata as ad

    embedded = ad.read_h5ad(out / "embed" / "embeddings.h5ad", backed="r")
    assert "X_mine" in embedded.obsm and "X_mine" in embedded.uns
    embedded.file.close()
    code, _, err = cli(*args, "train.steps=30", "--umap-color", "n_counts")
    assert code == 2 and "different config" in err and "--overwrite" in err
    code, _, err = cli(*args, "train.steps=30", "--umap-color", "n_counts", "--overwrite")
    assert code == 0, err
    assert weights.stat().st_mtime_ns != trained and manifest.stat().st_mtime_ns == prepared
    assert json.loads((out / "pretrain" / "model" / "config.json").read_text())["training"]["steps"] == 30
    # on a small machine: the HVG sample and the cells read at a time, lowered as the out-of-memory
    # message says (fit-cells refused hvg.max_cells as an unknown pretrain key)
    small = tmp_path / "small"
    code, _, err = cli(*args[:4], small, *args[5:], "train.steps=5", "hvg.max_cells=300", "block_size=128")
    assert code == 0, err
    import yaml

    prep = yaml.safe_load((small / "store" / "config.yaml").read_text())
    assert prep["hvg"]["max_cells"] == 300 and prep["block_size"] == 128
    assert "selected from a sample of 300 cells" in err
    assert "hvg" not in yaml.safe_load((small / "pretrain" / "config.yaml").read_text())
    # written as a section it is the same setting (as model={kind: mlp} is model.kind): all reused
    code, _, err = cli(*args[:4], small, *args[5:], "train.steps=5", "hvg={max_cells: 300}", "block_size=128")
    assert code == 0 and "different config" not in err, err
    # near misses name what fit-cells takes; a continued checkpoint selects no genes, so no sample
    for wrong, said in (
        (
            "hvg.max_cell=300",
            "hvg.max_cell is not a setting fit_cells takes; of the prep's it takes hvg.max_cells",
        ),
        ("hvg={max_cell: 300}", "hvg.max_cell is not a setting fit_cells takes"),
        ("block_sizes=64", "(fit_cells also takes the prep's hvg.max_cells and block_size)"),
    ):
        code, _, err = cli(*args[:4], tmp_path / "wrong", *args[5:], wrong)
        assert code == 2 and said in err, (wrong, err)
    code, _, err = cli(*args[:4], tmp_path / "wrong", *args[5:], "train.steps=0")
    assert code == 2 and "train.steps" in err and "also takes the prep's" not in err  # no unknown key here
    for written in ("hvg.max_cells=300", "hvg={max_cells: 300}"):
        code, _, err = cli(*args[:4], tmp_path / "wrong", *args[5:], "--init-from", out / "pretrain" / "model",
                           written)  # fmt: skip
        said = "a continued model keeps its checkpoint's gene panel, so no genes are selected"
        assert code == 2 and said in err, (written, err)
    assert not (tmp_path / "wrong").exists()


@pytest.mark.network
def test_log_normalised_values_are_taken_as_they_are(pbmc68k_adata, tmp_path):
    """counts.mode=log1p (no totals needed) gives the values that rebuilding the counts gives."""
    from biomask.cells.config import CellsPrepConfig
    from biomask.cells.prep import prep_cells
    from biomask.config import load_config
    from biomask.store import TokenStore
    from tests.cells_store import REPO

    stores = {}
    for mode, extra in (("from_log1p", []), ("log1p", ["counts.total_counts_column=null"])):
        cfg = load_config(
            CellsPrepConfig,
            REPO / "configs/cells/pbmc68k_reduced-panel.yaml",
            [f"output={tmp_path / mode}", f"counts.mode={mode}", *extra],
        )
        stores[mode] = TokenStore(prep_cells(cfg)).split("train")
    a, b = stores["from_log1p"], stores["log1p"]
    assert len(a) == len(b)
    np.testing.assert_array_equal(a[0]["tokens"], b[0]["tokens"])
    np.testing.assert_allclose(a[0]["values"], b[0]["values"], atol=2e-3)


def test_without_the_mask_indicator_a_hidden_gene_looks_like_its_mean():
    """model.mask_indicator=false: the ablation of the model's knowledge of what (and how much) is hidden."""
    shown = _model()
    blind = ProfileAutoencoder(dataclasses.replace(shown.config, mask_indicator=False))
    blind.load_state_dict(shown.state_dict())
    batch = collate(_records(), modality="cells")
    masked = torch.zeros_like(batch["attention_mask"])
    masked[:, 2] = True
    hidden = blind._dense(batch, masked) > 0
    z = blind._standardised(batch)
    # blind: hiding a gene = setting it to its mean (0 once standardised); with the indicator it differs
    at_mean = z.masked_fill(hidden, 0.0)
    none = torch.zeros_like(hidden)
    torch.testing.assert_close(blind._encode(z, hidden)[-1], blind._encode(at_mean, none)[-1])
    assert not torch.allclose(shown._encode(z, hidden)[-1], shown._encode(at_mean, none)[-1])


def test_ratio_input_tells_the_encoder_the_share_of_the_panel_hidden():
    """model.ratio_input: the one extra input is the cell's mask ratio (issue 17: does knowing it help?)."""
    from biomask.training.config import ModelConfig

    told = ProfileAutoencoder(dataclasses.replace(_model().config, mask_indicator=False, ratio_input=True))
    assert told.encoder[0].in_features == 2 * 12 + 1
    seen: list[torch.Tensor] = []
    told.encoder[0].register_forward_hook(lambda module, args, out: seen.append(args[0]))
    batch = collate(_records(), modality="cells")
    masked = torch.zeros_like(batch["attention_mask"])
    masked[:, 1:3] = True  # 2 of the 7 panel genes
    out = told({**batch, "masked": masked})
    assert torch.isfinite(out["loss"])
    torch.testing.assert_close(seen[-1][:, -1], torch.full((6,), 2 / 7))
    told.embed(batch)  # nothing hidden when embedding a complete profile
    torch.testing.assert_close(seen[-1][:, -1], torch.zeros(6))
    with pytest.raises(ValueError, match="ratio_input is for model.kind mlp"):
        ModelConfig(kind="transformer", ratio_input=True)


def test_the_cell_embedding_is_at_unit_length_and_training_reads_the_raw_latent():
    """model.embed_norm l2 (pretrain's default for kind mlp): X_biomask rows have length 1, so a kNN
    graph compares directions (cosine), not how far a cell is from the mean; inner layers and the
    decoder's input are untouched, and checkpoints written without the key embed as before."""
    from biomask.training.config import ModelConfig

    raw = _model().eval()
    unit = ProfileAutoencoder(dataclasses.replace(raw.config, embed_norm="l2")).eval()
    unit.load_state_dict(raw.state_dict())
    batch = collate(_records(), modality="cells")
    vectors = unit.embed(batch)
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(6))
    torch.testing.assert_close(vectors, torch.nn.functional.normalize(raw.embed(batch), dim=1))
    assert not torch.allclose(raw.embed(batch).norm(dim=1), torch.ones(6))
    torch.testing.assert_close(unit.embed(batch, layer=-2), raw.embed(batch, layer=-2))
    assert unit.normalises(-1) and unit.normalises(2) and not unit.normalises(-2)
    masked = torch.zeros_like(batch["attention_mask"])
    masked[:, 1:4] = True
    torch.testing.assert_close(
        unit({**batch, "masked": masked})["loss"], raw({**batch, "masked": masked})["loss"]
    )
    # an older checkpoint's architecture has no embed_norm: it loads as "none"
    older = {k: v for k, v in unit.config.to_dict().items() if k != "embed_norm"}
    assert EncoderConfig.from_dict(older).embed_norm == "none"
    assert ModelConfig(kind="mlp").resolved_embed_norm() == "l2"
    assert ModelConfig(kind="mlp", embed_norm="none").resolved_embed_norm() == "none"
    assert ModelConfig(kind="transformer").resolved_embed_norm() == "none"
    with pytest.raises(ValueError, match="embed_norm l2 is for model.kind mlp"):
        ModelConfig(kind="panel_transformer", embed_norm="l2")


def test_scmae_swaps_masked_genes_with_other_cells_and_trains_on_every_gene():
    """model.objective scmae: a masked gene enters with the value that gene has in another cell of
    the batch (nothing marks it); the minimised objective covers every measured gene plus detecting
    the swapped ones, while `loss` stays the masked genes' MSE that held-out evaluation compares."""
    from biomask.models.profile import _donor_values
    from biomask.training.config import ModelConfig

    plain = _model()
    swap = ProfileAutoencoder(dataclasses.replace(plain.config, objective="scmae"))
    assert swap.swap_head[-1].out_features == 12 and not hasattr(plain, "swap_head")
    batch = collate(_records(), modality="cells")
    masked = torch.zeros_like(batch["attention_mask"])
    masked[:, 1:4] = True
    hidden = swap._dense(batch, masked) > 0
    z = swap._standardised(batch)
    donors = _donor_values(z, hidden)
    for i in range(6):  # each value is the same gene's in a different cell, never the cell's own
        for g in range(NUM_SPECIAL, 12):
            others = [j for j in range(6) if j != i]
            assert any(torch.equal(donors[i, g], z[j, g]) for j in others)
    torch.testing.assert_close(_donor_values(z, hidden), donors)  # no RNG: held-out losses are fixed
    seen: list[torch.Tensor] = []
    swap.encoder[0].register_forward_hook(lambda module, args, out: seen.append(args[0]))
    out = swap({**batch, "masked": masked})
    shown, indicator = seen[-1][:, :12], seen[-1][:, 12:]
    torch.testing.assert_close(shown, torch.where(hidden, donors, z))
    assert not indicator.any()  # a complete profile: no gene is marked, the swapped ones neither
    assert int(out["n_masked"]) == 18 and torch.isfinite(out["objective"])
    assert not torch.allclose(out["objective"], out["loss"])
    # loss = the masked genes' reconstruction, as for the mae objective
    pred = swap.decoder(swap._encode(shown, torch.zeros_like(hidden))[-1])
    torch.testing.assert_close(out["loss"], torch.nn.functional.mse_loss(pred[hidden], z[hidden]))
    # one step on the objective trains the swap detector too
    swap.zero_grad()
    out["objective"].backward()
    assert swap.swap_head[0].weight.grad.abs().sum() > 0
    # the embedding reads the full profile, as with mae (the same weights embed alike)
    plain.load_state_dict({k: v for k, v in swap.state_dict().items() if not k.startswith("swap_head.")})
    torch.testing.assert_close(swap.embed(batch), plain.embed(batch))
    # older checkpoints' architectures have no objective: they load as mae
    older = {k: v for k, v in swap.config.to_dict().items() if k != "objective"}
    assert EncoderConfig.from_dict(older).objective == "mae"
    with pytest.raises(ValueError, match="objective scmae is for model.kind mlp with model.loss mse"):
        ModelConfig(kind="mlp", objective="scmae", loss="nb")
    with pytest.raises(ValueError, match="objective scmae is for model.kind mlp"):
        ModelConfig(kind="panel_transformer", objective="scmae")


@pytest.mark.network
def test_cells_without_a_count_in_the_panel_are_named_not_embedded_silently(
    pbmc68k_adata, profile_checkpoint, caplog
):
    """Such cells all get the one vector of an empty profile, and would form a cluster of their own."""
    import biomask

    adata = pbmc68k_adata[:40].copy()
    values = adata.raw.X.toarray() if hasattr(adata.raw.X, "toarray") else np.array(adata.raw.X)
    values[[3, 7]] = 0
    adata.raw = ad.AnnData(X=values, obs=adata.obs, var=adata.raw.var)
    with caplog.at_level("WARNING", logger="biomask"):
        biomask.embed(adata, profile_checkpoint, matrix="raw", counts={"mode": "log1p"})
    assert adata.uns["X_biomask"]["cells_without_vocabulary_genes"] == 2
    # what to pass again for more cells of the kind: the counts policy, beside the gene column
    assert json.loads(adata.uns["X_biomask"]["counts_policy"])["mode"] == "log1p"
    assert adata.uns["X_biomask"]["gene_id_column"] == "var index"
    assert "2 of its 40 cells express no gene of the model's vocabulary" in caplog.text
    np.testing.assert_allclose(adata.obsm["X_biomask"][3], adata.obsm["X_biomask"][7])


def test_decorrelation_adds_the_latent_penalty_to_the_objective_in_training_only():
    """model.decorrelation: VICReg's variance and covariance terms on the batch's latents join the
    minimised objective; `loss` (what held-out evaluation and the logs read) stays the reconstruction,
    and embedding is unchanged."""
    from biomask.models.profile import decorrelation_penalty
    from biomask.training.config import ModelConfig

    white = torch.from_numpy(np.linalg.qr(np.random.default_rng(0).standard_normal((64, 8)))[0]).float()
    white = (white - white.mean(0)) * 8.0  # uncorrelated columns with sd ≈ 1 or more
    assert float(decorrelation_penalty(white)) < 0.05
    collapsed = torch.randn(64, 1).repeat(1, 8) * 0.1  # one direction, small: both terms bite
    assert float(decorrelation_penalty(collapsed)) > 0.8
    plain = _model()
    penalised = ProfileAutoencoder(dataclasses.replace(plain.config, decorrelation=0.5))
    penalised.load_state_dict(plain.state_dict())
    batch = collate(_records(), modality="cells")
    masked = torch.zeros_like(batch["attention_mask"])
    masked[:, 1:4] = True
    a, b = plain.train()({**batch, "masked": masked}), penalised.train()({**batch, "masked": masked})
    torch.testing.assert_close(a["loss"], b["loss"])
    assert "objective" not in a and float(b["objective"]) > float(b["loss"])
    assert "objective" not in penalised.eval()({**batch, "masked": masked})
    torch.testing.assert_close(plain.eval().embed(batch), penalised.embed(batch))
    with pytest.raises(ValueError, match="model.decorrelation is for model.kind mlp"):
        ModelConfig(kind="transformer", decorrelation=0.1)
    older = {k: v for k, v in plain.config.to_dict().items() if k != "decorrelation"}
    assert EncoderConfig.from_dict(older).decorrelation == 0.0


def test_input_scale_scales_the_visible_genes_by_how_much_of_the_cell_is_hidden():
    """model.input_scale=visible: in training the encoder reads each visible gene's value times
    panel genes / visible genes (inverted dropout), so a cell seen whole at embedding time is read as
    it was in training on average; with nothing hidden the scale is 1 and the embedding is the
    unscaled model's. A gene the data lacks counts as hidden."""
    from biomask.training.config import ModelConfig

    plain = _model()
    scaled = ProfileAutoencoder(dataclasses.replace(plain.config, input_scale="visible"))
    scaled.load_state_dict(plain.state_dict())
    batch = collate(_records(), modality="cells")
    z = plain._standardised(batch)
    genes = plain.config.vocab_size - NUM_SPECIAL  # the panel's genes
    hidden = torch.zeros_like(z, dtype=torch.bool)
    hidden[:, NUM_SPECIAL : NUM_SPECIAL + genes - 2] = True  # 2 visible: their values x genes / 2
    first = scaled.encoder[0]
    seen = torch.cat([torch.where(hidden, 0.0, z * genes / 2), hidden.float()], dim=1)
    torch.testing.assert_close(scaled._encode(z, hidden)[1], first(seen))
    assert not torch.allclose(plain._encode(z, hidden)[1], first(seen))
    torch.testing.assert_close(plain.eval().embed(batch), scaled.eval().embed(batch))
    lacking = [{"tokens": r["tokens"][:4], "values": r["values"][:4]} for r in _records()]  # 4 listed
    short = collate(lacking, modality="cells")
    zs, missing = scaled._standardised(short), scaled._missing(short)
    seen = torch.cat([torch.where(missing, 0.0, zs * genes / 4), missing.float()], dim=1)
    torch.testing.assert_close(scaled._encode(zs, missing)[1], first(seen))
    with pytest.raises(ValueError, match="model.input_scale is for model.kind mlp"):
        ModelConfig(kind="transformer", input_scale="visible")
    older = {k: v for k, v in plain.config.to_dict().items() if k != "input_scale"}
    assert EncoderConfig.from_dict(older).input_scale == "none"


@pytest.mark.network
@pytest.mark.filterwarnings("ignore:(Variable|Observation) names are not unique")  # the case under test
def test_fit_cells_warnings_name_the_anndata_and_its_arguments(pbmc68k_adata, tmp_path, caplog, cli):
    """Repeated gene names and cell ids in an in-memory AnnData: prep's warnings named fit_cells' own
    copy (<output>/cells.h5ad [X]) and the prep keys genes.duplicates / genes.column, which fit_cells has
    no argument for; `duplicates=` (fit-cells: --duplicates) now chooses what prep does with them."""
    import logging

    import biomask

    adata = pbmc68k_adata.raw.to_adata()
    genes = list(adata.var_names)
    genes[1] = genes[0]
    adata.var_names = genes
    adata.obs_names = [*adata.obs_names[:-1], adata.obs_names[0]]
    counts = {"mode": "log1p"}
    with pytest.raises(InputError) as err:
        biomask.fit_cells(adata, tmp_path / "refused", counts=counts, duplicates="error")
    message = str(err.value)
    assert (
        message.startswith("AnnData [X]: 1 gene names occur more than once") and "cells.h5ad" not in message
    )
    assert "set duplicates= (fit-cells: --duplicates): sum" in message and "genes." not in message
    assert not (tmp_path / "refused").exists()
    with pytest.raises(InputError, match=r"duplicates='add' \(fit-cells: --duplicates\) is not one of sum"):
        biomask.fit_cells(adata, tmp_path / "refused", counts=counts, duplicates="add")
    steps = {"train.steps": 2, "train.checkpoint_every": 2}
    with caplog.at_level(logging.WARNING, logger="biomask"):
        biomask.fit_cells(adata, tmp_path / "first", counts=counts, duplicates="first", overrides=steps)
    warned = [r.getMessage() for r in caplog.records if r.name.startswith("biomask.cells")]
    assert any(w.startswith("AnnData [X]: duplicate cell ids (1)") for w in warned), warned
    gene_warnings = [w for w in warned if "occur more than once" in w]
    assert len(gene_warnings) == 1, "prep and embed each read the genes; the warning is said once"
    gene_warning = gene_warnings[0]
    assert gene_warning.startswith("AnnData [X]") and "left out but the first" in gene_warning
    assert "duplicates= (fit-cells: --duplicates)" in gene_warning
    assert not any("cells.h5ad" in w or "genes." in w for w in warned), warned
    # the store holds one column of the repeated name: the first
    vocab = json.loads((tmp_path / "first" / "store" / "manifest.json").read_text())
    assert vocab["scheme"] == "panel" and adata.obsm["X_biomask"].shape[0] == adata.n_obs
    # outputs an older biomask wrote are reused with a warning, which said "pass --overwrite": fit_cells
    # has no such flag, and its overwrite=True replaces only outputs of other settings
    for part in ("store", "pretrain"):
        info = json.loads((tmp_path / "first" / part / "run.json").read_text())
        info["code"]["source_sha256"] = "0" * 64
        (tmp_path / "first" / part / "run.json").write_text(json.dumps(info))
    caplog.clear()
    del adata.obsm["X_biomask"], adata.uns["X_biomask"]
    with caplog.at_level(logging.WARNING, logger="biomask"):
        biomask.fit_cells(adata, tmp_path / "first", counts=counts, duplicates="first", overrides=steps)
    other_code = [r.getMessage() for r in caplog.records if "written by other code" in r.getMessage()]
    assert len(other_code) == 2 and not any("--overwrite" in w for w in other_code), other_code
    assert all(f"remove {tmp_path / 'first'} (or choose another output)" in w for w in other_code)
    # the shell's fit-cells takes it as a flag (a file's own path is named as it is)
    path = tmp_path / "dups.h5ad"
    adata.obs_names_make_unique()
    del adata.obsm["X_biomask"], adata.uns["X_biomask"]
    adata.write_h5ad(path)
    code, _, err = cli("fit-cells", "--input", path, "--output", tmp_path / "cli", "--duplicates", "error",
                       "counts.mode=log1p")  # fmt: skip
    assert code == 2 and f"{path} [X]: 1 gene names occur more than once" in err and "--duplicates" in err
    assert not (tmp_path / "cli").exists()


@pytest.mark.network
def test_standardise_data_centres_and_scales_each_gene_over_the_cells_embedded(
    profile_checkpoint, pbmc68k_adata
):
    import biomask

    counts = {"mode": "from_log1p", "total_counts_column": "n_counts"}
    # one cell type: its genes' means are far from those of the pretraining cells (all types)
    monocytes = pbmc68k_adata[pbmc68k_adata.obs["bulk_labels"] == "CD14+ Monocyte"].copy()
    model = load_pretrained(profile_checkpoint)
    before = {name: b.clone() for name, b in model.named_buffers()}

    def standardised_input(model_or_dir, standardise):  # layer 0: the encoder's standardised input
        out = biomask.embed(
            monocytes, model_or_dir, matrix="raw", counts=counts, layer=0, standardise=standardise, copy=True
        )
        return out.obsm["X_biomask"][:, NUM_SPECIAL:]

    own = standardised_input(model, "data")
    assert all(torch.equal(b, before[name]) for name, b in model.named_buffers())  # the caller's model
    measured = own.std(0) > 0
    assert measured.sum() > 500
    mean, sd = own.mean(0)[measured], own.std(0)[measured]
    # as sc.pp.scale does to these cells: mean 0, sd 1 per gene (but for the few clipped at ±10)
    assert np.median(np.abs(mean)) < 1e-4 and np.mean(np.abs(sd - 1) < 0.05) > 0.9
    theirs = standardised_input(model, "checkpoint")
    assert np.median(np.abs(theirs.mean(0)[measured])) > 0.1  # by the pretraining cells': off centre

    # the checkpoint's statistics play no part: the same embedding from a model with other ones
    shifted = load_pretrained(profile_checkpoint)
    shifted.set_gene_stats(shifted.gene_mean.numpy() + 1.0, shifted.gene_std.numpy() * 2.0)
    embedded = [
        biomask.embed(monocytes, m, matrix="raw", counts=counts, standardise="data", copy=True)
        for m in (model, shifted)
    ]
    vectors = [a.obsm["X_biomask"] for a in embedded]
    np.testing.assert_allclose(vectors[0], vectors[1], atol=1e-6)
    assert embedded[0].uns["X_biomask"]["standardise"] == "data"

    with pytest.raises(InputError, match="too few"):
        biomask.embed(monocytes[:10].copy(), model, matrix="raw", counts=counts, standardise="data")
    assert "X_biomask" not in monocytes.obsm


def test_standardise_data_is_refused_for_a_model_without_gene_statistics():
    from biomask.models.profile import check_standardise

    cfg = EncoderConfig(vocab_size=12, modality="cells", d_model=8, n_layers=1, n_heads=1, d_ff=16)
    tokens = build_model(cfg)
    with pytest.raises(InputError, match="standardise=checkpoint"):
        check_standardise(tokens, "data", "checkpoint runs/x/model")
    check_standardise(tokens, "checkpoint", "checkpoint runs/x/model")  # the default applies to every model
    check_standardise(_model(), "data", "checkpoint runs/x/model")


@pytest.mark.network
def test_evaluate_standardises_by_the_stores_cells_when_asked(profile_checkpoint, panel_store, tmp_path, cli):
    out = tmp_path / "eval"
    code, _out, err = cli(
        "evaluate", "-c", "configs/evaluate/pbmc68k_reduced.yaml", f"store={panel_store}", f"output={out}",
        f"checkpoints.mlp={profile_checkpoint}", "seeds=[0,1]", "protocols=[linear_probe]", "baselines=[]",
        "standardise=data",
    )  # fmt: skip
    assert code == 0, err
    results = json.loads((out / "metrics.json").read_text())
    assert results["standardise"] == "data"
    assert any("standardise=data" in note for note in results["notes"])
    assert "standardise=data" in (out / "report.md").read_text()
    summary = results["summary"]
    pretrained = summary["mlp (linear probe)"]["macro_f1"]["mean"]
    random = summary["random-init (linear probe)"]["macro_f1"]["mean"]
    assert pretrained > random + 0.05, (pretrained, random)


@pytest.mark.network
def test_a_diverged_fit_keeps_its_checkpoints_and_says_the_way_on_in_python(pbmc68k_adata, tmp_path):
    """fit_cells took a divergence for bad input: it removed the checkpoints its message said were
    kept (the whole folder), and told a Python caller to rerun "with --overwrite"."""
    import biomask
    from biomask.training.finite import DivergedError

    out = tmp_path / "diverged"
    with pytest.raises(DivergedError) as failed:
        biomask.fit_cells(
            pbmc68k_adata.copy(), out, matrix="raw", counts={"mode": "log1p"},
            overrides={"train.steps": 300, "optim.lr": 1e6, "train.checkpoint_every": 1},
        )  # fmt: skip
    assert "call again with overwrite=True" in str(failed.value) and "rerun with --overwrite" not in str(
        failed.value
    )
    assert (out / "store").is_dir() and list((out / "pretrain" / "checkpoints").glob("step*"))


def test_a_count_loss_is_the_panel_transformers_own_setting(tmp_path):
    """model.loss nb / poisson is refused on token models only: the panel transformer reads it."""
    from types import SimpleNamespace

    from biomask.config import load_config
    from biomask.training.config import PretrainConfig
    from biomask.training.trainer import _inert_settings

    for loss in ("nb", "poisson"):
        cfg = load_config(PretrainConfig, Path(__file__).parents[1] / "configs/pretrain/cells-panel-transformer.yaml",
                          [f"output={tmp_path / 'o'}", f"data.store={tmp_path / 's'}", f"model.loss={loss}"])  # fmt: skip
        assert _inert_settings(SimpleNamespace(kind="panel_transformer", target="values"), cfg) == []
        assert _inert_settings(SimpleNamespace(kind="transformer", target="tokens"), cfg) != []
