"""Count likelihoods for the cell models (model.loss poisson | nb) and the panel transformer (model.kind
panel_transformer): what their users rely on.

- the losses are the Poisson / negative binomial log-likelihoods (checked against scipy);
- a panel store prepared from counts keeps each cell's library size, so the true counts come back;
- trained a few steps on real cells, the NB model's held-out loss is below its gene-mean reference;
- asking for a count likelihood on normalised (non-count) input: exit 2 naming the file and key,
  nothing written;
- the panel transformer embeds one vector per cell whatever the batch, trains through the trainer,
  resumes after SIGUSR1 to the same weights as an uninterrupted run, embeds an AnnData, and
  `export-hf` refuses it with a clear message.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import numpy as np
import pytest
import torch

from biomask.batch import collate
from biomask.models import EncoderConfig, build_model, likelihood
from biomask.vocab import NUM_SPECIAL

TINY = {
    "model.d_model": 32,
    "model.d_ff": 64,
    "train.micro_batch_size": 32,
    "train.log_every": 2,
    "train.eval_batches": 1,
    "train.eval_ratios": "[0.3,0.6]",
    "optim.warmup_steps": 2,
    "train.progress": "false",
}


def _args(config: str, store, out, **keys) -> list[str]:
    return ["pretrain", "-c", config, f"data.store={store}", f"output={out}"] + [
        f"{k}={v}" for k, v in {**TINY, **keys}.items()
    ]


# ------------------------------------------------------------------------------------------ units


def test_likelihoods_match_scipy():
    from scipy import stats

    y = torch.tensor([0.0, 1.0, 3.0, 17.0, 250.0], dtype=torch.float64)
    mu = torch.tensor([0.2, 1.5, 2.0, 30.0, 180.0], dtype=torch.float64)
    theta = torch.tensor([0.3, 2.0, 10.0, 1.0, 50.0], dtype=torch.float64)
    poisson = likelihood.poisson_nll(mu.log(), y).numpy()
    np.testing.assert_allclose(poisson, -stats.poisson.logpmf(y.numpy(), mu.numpy()), rtol=1e-10)
    nb = likelihood.nb_nll(mu.log(), theta.log(), y).numpy()
    p = (theta / (theta + mu)).numpy()  # scipy's nbinom(n=theta, p): mean theta (1 - p) / p = mu
    np.testing.assert_allclose(nb, -stats.nbinom.logpmf(y.numpy(), theta.numpy(), p), rtol=1e-10)


def test_panel_transformer_embeds_one_vector_per_cell_whatever_the_batch():
    torch.manual_seed(0)
    cfg = EncoderConfig(
        vocab_size=14, modality="cells", kind="panel_transformer", d_model=16, n_layers=2, n_heads=2,
        d_ff=32, positions=False, scheme="panel", target="values", max_visible=4,
    )  # fmt: skip
    model = build_model(cfg).eval()
    rng = np.random.default_rng(0)
    genes = np.arange(NUM_SPECIAL, 14)
    records = [{"tokens": genes, "values": rng.random(genes.size).astype(np.float32)} for _ in range(3)]
    records[1] = {"tokens": genes[:5], "values": records[1]["values"][:5]}  # measures fewer genes
    together = model.embed(collate(records, modality="cells"))
    for i, record in enumerate(records):
        alone = model.embed(collate([record], modality="cells"))
        torch.testing.assert_close(together[i : i + 1], alone, atol=1e-5, rtol=1e-5)
    # the embedding is the cell token's state, not a function of one gene: cells differ
    assert not torch.allclose(together[0], together[2])


# ------------------------------------------------------------------------------------------ real data


@pytest.fixture(scope="module")
def count_store(tmp_path_factory):
    """pbmc68k_reduced over its own panel, counts rebuilt from raw and n_counts (the shipped config)."""
    from biomask.cells.config import CellsPrepConfig
    from biomask.cells.prep import prep_cells
    from biomask.config import load_config
    from tests.cells_store import REPO

    out = tmp_path_factory.mktemp("stores") / "pbmc68k-panel"
    cfg = load_config(CellsPrepConfig, REPO / "configs/cells/pbmc68k_reduced-panel.yaml", [f"output={out}"])
    return prep_cells(cfg)


@pytest.mark.network
def test_panel_store_keeps_the_library_size_and_the_true_counts(count_store):
    import anndata as ad

    from biomask.datasets import fetch
    from biomask.store import TokenStore

    adata = ad.read_h5ad(fetch("pbmc68k_reduced"))
    train = TokenStore(count_store).split("train")
    ids = train.meta()["id"].to_numpy()[:20]
    library = np.array([train[i]["library_size"] for i in range(20)])
    np.testing.assert_allclose(library, adata.obs.loc[ids, "n_counts"].to_numpy())
    for i in range(20):
        record = train[i]
        values = torch.tensor(record["values"])[None]
        counts = likelihood.counts_of(values, torch.tensor([record["library_size"] / 1e4]))[0].numpy()
        rebuilt = np.expm1(record["values"].astype(np.float64)) * record["library_size"] / 1e4
        assert np.abs(counts - rebuilt).max() < 1e-3  # integers, as the raw counts were
        assert counts.min() >= 0 and counts.sum() > 0


@pytest.mark.network
def test_nb_model_learns_below_its_reference_and_normalised_input_is_refused(count_store, tmp_path, cli):
    out = tmp_path / "nb"
    code, _, err = cli(*_args("configs/pretrain/cells-mlp.yaml", count_store, out, **{
        "model.loss": "nb", "train.steps": 60, "train.checkpoint_every": 60}))  # fmt: skip
    assert code == 0, err
    final = json.loads((out / "run.json").read_text())["final_eval"]
    # the held-out NLL of the masked genes' counts beats each gene's mean proportion (same likelihood)
    assert np.isfinite(final["mean_loss"]) and final["mean_loss"] < final["mean_reference_loss"]
    assert json.loads((out / "model" / "config.json").read_text())["architecture"]["loss"] == "nb"

    # the same cells as normalised values (no counts): a count likelihood is refused, nothing written
    from biomask.cells.config import CellsPrepConfig
    from biomask.cells.prep import prep_cells
    from biomask.config import load_config
    from tests.cells_store import REPO

    normalised = tmp_path / "normalised"
    keys = [f"output={normalised}", "counts.mode=log1p", "counts.total_counts_column=null"]
    prep_cells(load_config(CellsPrepConfig, REPO / "configs/cells/pbmc68k_reduced-panel.yaml", keys))
    refused = tmp_path / "refused"
    code, _, err = cli(*_args("configs/pretrain/cells-mlp.yaml", normalised, refused, **{
        "model.loss": "poisson", "train.steps": 5}))  # fmt: skip
    assert code == 2
    assert f"{normalised}/manifest.json" in err and "model.loss=poisson" in err and "counts.mode=log1p" in err
    assert not refused.exists()
    # continuing the NB checkpoint there (the same panel): its loss, not the run's mse, is what counts
    same_panel = tmp_path / "normalised-same-panel"
    prep_cells(load_config(CellsPrepConfig, REPO / "configs/cells/pbmc68k_reduced-panel.yaml",
                           [*keys[1:], f"output={same_panel}", f"tokenizer.path={count_store}"]))  # fmt: skip
    code, _, err = cli(*_args("configs/pretrain/cells-mlp.yaml", same_panel, refused, **{
        "model.init_from": out / "model", "train.steps": 5}))  # fmt: skip
    assert code == 2 and "model.loss=nb (model.init_from's) needs raw counts" in err, err
    assert "Continue a checkpoint trained with model.loss=mse" in err and not refused.exists()


@pytest.mark.network
def test_panel_transformer_trains_resumes_embeds_and_export_is_refused(count_store, tmp_path, cli):
    config = "configs/pretrain/cells-panel-transformer.yaml"
    keys = {"model.max_visible": 48, "train.steps": 24, "optim.lr": 3e-3, "train.checkpoint_every": 1000}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    code, _, err = cli(*_args(config, count_store, straight, **keys))
    assert code == 0, err

    def interrupt() -> None:  # SIGUSR1 once training has logged: checkpoint, exit 75
        deadline = time.monotonic() + 120
        metrics = resumed / "metrics.jsonl"
        while time.monotonic() < deadline and not (metrics.is_file() and metrics.stat().st_size):
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGUSR1)

    thread = threading.Thread(target=interrupt)
    thread.start()
    code, _, err = cli(*_args(config, count_store, resumed, **keys))
    thread.join()
    assert code == 75, err
    code, _, err = cli(*_args(config, count_store, resumed, **keys))
    assert code == 0 and "resumed from" in err, err
    from safetensors.torch import load_file

    a = load_file(str(straight / "model" / "model.safetensors"))
    b = load_file(str(resumed / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:  # the random visible-gene subsets were resumed too: the same run
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    # finite, and no worse than each gene's mean: 30 tiny steps are too few to beat it (the full-size
    # model does: README, "Single-cell models"), but a broken model or a diverging one is caught here
    logged = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert np.isfinite([r["loss"] for r in logged if r["kind"] == "train"]).all()
    final = json.loads((resumed / "run.json").read_text())["final_eval"]
    assert final["mean_loss"] < 1.02 * final["mean_reference_loss"]

    # embed: one cell-token vector per cell of the user's AnnData
    import anndata as ad

    emb = tmp_path / "emb.h5ad"
    code, _, err = cli(
        "embed", "-c", "configs/embed/pbmc68k_reduced.yaml", f"checkpoint={resumed / 'model'}",
        f"output={emb}", "umap.color=null",
    )  # fmt: skip
    assert code == 0, err
    adata = ad.read_h5ad(emb)
    vectors = adata.obsm["X_biomask"]
    assert vectors.shape == (adata.n_obs, 32) and np.isfinite(vectors).all()
    assert np.linalg.matrix_rank(vectors[:200]) > 8  # cells differ along many directions

    code, _, err = cli("export-hf", "--checkpoint", resumed / "model", "--output", tmp_path / "hf")
    assert code == 2 and "panel_transformer" in err
    assert not (tmp_path / "hf").exists()
