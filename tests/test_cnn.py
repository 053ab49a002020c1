"""The dilated CNN DNA encoder (model.kind cnn) end to end on real data: pretrains through DeepSpeed
ZeRO-2 on C. elegans chrX, resumes after SIGUSR1 to the same weights, loads without DeepSpeed, embeds
real splice sequences with `biomask embed`, and is evaluated on them with `pooling: auto` (the choice is
recorded), and exported to Hugging Face (AutoModel gives the same vectors); MAE corruption and cls
pooling are refused with exit 2."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from biomask.dna.tokenizers import load_tokenizer
from biomask.embedding.inference import embed_records
from biomask.models import load_pretrained
from biomask.store import TokenStore

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "pretrain" / "dna-cnn-quick.yaml"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pretrain_args(store: Path, output: Path, steps: int = 60) -> list[str]:
    """A small CNN (4 blocks, 32 wide) on 128-base crops, ZeRO-2, a checkpoint every 20 steps."""
    keys = {
        "data.store": store,
        "output": output,
        "model.d_model": 32,
        "model.d_ff": 32,
        "model.n_layers": 4,
        "optim.warmup_steps": 5,
        "train.steps": steps,
        "train.micro_batch_size": 8,
        "train.log_every": 5,
        "train.eval_every": 0,
        "train.eval_batches": 2,
        "train.eval_ratios": "[0.15,0.5]",
        "train.checkpoint_every": 20,
    }
    return ["-c", str(CONFIG), *(f"{k}={v}" for k, v in keys.items())]


def send_usr1_once_training(output: Path) -> threading.Thread:
    """SIGUSR1 to this process once the run has logged a training step (the trainer then checkpoints
    and exits 75)."""

    def wait_and_signal() -> None:
        deadline = time.monotonic() + 120
        metrics = output / "metrics.jsonl"
        while time.monotonic() < deadline:
            if metrics.is_file() and metrics.stat().st_size > 0:
                os.kill(os.getpid(), signal.SIGUSR1)
                return
            time.sleep(0.01)

    thread = threading.Thread(target=wait_and_signal, daemon=True)
    thread.start()
    return thread


def test_cnn_pretrains_resumes_embeds_and_is_evaluated(genome_store, splice_store, tmp_path, cli):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    code, _, err = cli("pretrain", *pretrain_args(genome_store, straight))
    assert code == 0, err
    meta = json.loads((straight / "model" / "config.json").read_text())
    assert meta["architecture"]["kind"] == "cnn" and meta["training"]["zero_stage"] == 2
    # it learned: the held-out masked loss sits below the base-composition predictor's
    assert meta["eval"]["mean_loss"] < 1.40

    # interrupted by SIGUSR1 (exit 75, checkpointed), then resumed to the same final weights
    previous = signal.signal(signal.SIGUSR1, lambda *_: None)  # a late signal must not end pytest
    try:
        thread = send_usr1_once_training(resumed)
        code, _, err = cli("pretrain", *pretrain_args(genome_store, resumed))
        thread.join()
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert code == 75, err
    assert not (resumed / "run.json").exists()
    code, _, err = cli("pretrain", *pretrain_args(genome_store, resumed))
    assert code == 0 and "resumed from" in err, err
    a = load_file(str(straight / "model" / "model.safetensors"))
    b = load_file(str(resumed / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # loads without DeepSpeed; a record's vector does not depend on its batch-mates (padding)
    model = load_pretrained(straight / "model")
    split = TokenStore(splice_store).split("test")  # 601 real splice records: a quick labelled set
    records = [{**split[i], "tokens": split[i]["tokens"][: 20 + 3 * i]} for i in range(12)]
    one = embed_records(model, records, pooling="mean", batch_size=1)
    many = embed_records(model, records, pooling="mean", batch_size=12)
    np.testing.assert_allclose(one, many, atol=1e-5)

    # `biomask embed` on DNA sequences: one vector per record
    tokenizer, names = load_tokenizer(splice_store), TokenStore(splice_store).label_names
    table = pd.DataFrame(
        {
            "sequence": [tokenizer.decode(r["tokens"]) for r in split],
            "label": [names[i] for i in split.record_field("labels")],
        }
    )
    table.to_csv(tmp_path / "splice.csv", index=False)
    code, _, err = cli(
        "embed", "--checkpoint", straight / "model", "--input", tmp_path / "splice.csv",
        "--output", tmp_path / "e.h5ad",
    )  # fmt: skip
    assert code == 0, err
    embedded = ad.read_h5ad(tmp_path / "e.h5ad").obsm["X_biomask"]
    assert embedded.shape == (len(split), 32) and np.isfinite(embedded).all()
    # every block's mean (a block's index makes no sense with it: exit 2, nothing written)
    code, _, err = cli(
        "embed", "--checkpoint", straight / "model", "--input", tmp_path / "splice.csv",
        "--output", tmp_path / "layers.h5ad", "pooling=mean_layers",
    )  # fmt: skip
    assert code == 0, err
    layers = ad.read_h5ad(tmp_path / "layers.h5ad").obsm["X_biomask"]
    assert layers.shape == (len(split), 32 * model.config.n_layers)
    np.testing.assert_allclose(layers[:, -32:], embedded, atol=1e-5)  # the last block's mean is the default
    code, _, err = cli(
        "embed", "--checkpoint", straight / "model", "--input", tmp_path / "splice.csv",
        "--output", tmp_path / "bad.h5ad", "pooling=mean_layers", "layer=1",
    )  # fmt: skip
    assert code == 2 and "mean_layers" in err and not (tmp_path / "bad.h5ad").exists()
    # a CNN has no [CLS]: the refusal lists what embed can give (not evaluate's concat)
    code, _, err = cli(
        "embed", "--checkpoint", straight / "model", "--input", tmp_path / "splice.csv",
        "--output", tmp_path / "bad.h5ad", "--pooling", "cls",
    )  # fmt: skip
    assert code == 2 and "offers mean, max, mean_layers;" in err, err

    # evaluate: linear probe and LP-FT, pooling chosen on validation among what a CNN offers
    store = tmp_path / "labelled"
    code, _, err = cli(
        "prep", "dna", "-c", REPO / "configs/dna/splice.yaml", f"output={store}",
        f"inputs=[{{path: {tmp_path / 'splice.csv'}, format: table}}]", f"tokenizer.path={genome_store}",
    )  # fmt: skip
    assert code == 0, err
    code, _, err = cli(
        "evaluate", "-c", REPO / "configs/evaluate/position-task.yaml", f"store={store}",
        f"output={tmp_path / 'eval'}", f"checkpoints.cnn={straight / 'model'}", "seeds=[0]",
        "baselines=[]", "random_init=false", "pooling=auto", "finetune.max_steps=6", "finetune.lr=[1.0e-4]",
        "finetune.eval_every=3",
    )  # fmt: skip
    assert code == 0, err
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for name in ("cnn (linear probe)", "cnn (fine-tune)"):
        (row,) = metrics["per_seed"][name]
        assert row["pooling"] in ("mean", "max", "mean_layers", "concat")
        assert set(row["pooling_val_mcc"]) == {"mean", "max", "mean_layers", "concat"}  # no cls for a CNN
        assert row["pooling_val_mcc"][row["pooling"]] == max(row["pooling_val_mcc"].values())
    assert metrics["summary"]["cnn (linear probe)"]["mcc"]["mean"] > 0.3  # 3 classes: chance is 0
    assert "pooling per seed" in (tmp_path / "eval" / "report.md").read_text()

    # cls pooling has no meaning for a CNN: exit 2 naming the key, nothing written
    code, _, err = cli(
        "evaluate", "-c", REPO / "configs/evaluate/position-task.yaml", f"store={store}",
        f"output={tmp_path / 'cls'}", f"checkpoints.cnn={straight / 'model'}", "seeds=[0]", "pooling=cls",
    )  # fmt: skip
    assert code == 2 and "pooling=cls" in err and not (tmp_path / "cls").exists()
    # continuing a CNN checkpoint with MAE corruption: refused too, nothing written
    code, _, err = cli(
        "pretrain", *pretrain_args(genome_store, tmp_path / "mae"), "model.kind=transformer",
        f"model.init_from={straight / 'model'}", "masking.corruption.kind=mae",
    )  # fmt: skip
    assert code == 2 and "masking.corruption.kind" in err and not (tmp_path / "mae").exists()

    # the Hugging Face export: AutoModel gives biomask's vectors (mean over records of any length,
    # concat, an inner block), and cls pooling is refused there too
    from transformers import AutoModel, AutoTokenizer

    code, out, err = cli("export-hf", "--checkpoint", straight / "model", "--output", tmp_path / "hf")
    assert code == 0, err
    hf = AutoModel.from_pretrained(out.strip(), trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained(out.strip())
    assert hf.config.kind == "cnn" and hf.config.kernel_size == model.config.kernel_size
    sequences = [tokenizer.decode(r["tokens"]) for r in records]
    batch = tok(sequences, padding=True, return_tensors="pt")
    with torch.no_grad():
        pooled = hf(**batch).pooler_output.numpy()
    np.testing.assert_allclose(pooled, one, atol=1e-5)
    same_length = tok(sequences[-1:] * 2, return_tensors="pt")
    np.testing.assert_allclose(
        hf.embed(**same_length, pooling="concat").numpy(),
        embed_records(model, records[-1:] * 2, pooling="concat"),
        atol=1e-5,
    )
    np.testing.assert_allclose(
        hf.embed(**batch, layer=2).numpy(), embed_records(model, records, pooling="mean", layer=2), atol=1e-5
    )
    np.testing.assert_allclose(  # max over the content tokens, padding excluded
        hf.embed(**batch, pooling="max").numpy(), embed_records(model, records, pooling="max"), atol=1e-5
    )
    np.testing.assert_allclose(  # every block's mean, side by side
        hf.embed(**batch, pooling="mean_layers").numpy(),
        embed_records(model, records, pooling="mean_layers"),
        atol=1e-5,
    )
    with pytest.raises(ValueError, match="no \\[CLS\\] summary"):
        hf.embed(**batch, pooling="cls")


def test_mae_corruption_with_the_cnn_exits_2_naming_the_key(genome_store, tmp_path, cli):
    out = tmp_path / "mae"
    code, _, err = cli("pretrain", *pretrain_args(genome_store, out), "masking.corruption.kind=mae")
    assert code == 2 and "masking.corruption.kind" in err and "cnn" in err
    assert not out.exists()
    # the scheme that asks for it, named (a user sets masking.scheme, not the corruption key)
    code, _, err = cli("pretrain", *pretrain_args(genome_store, out), "masking.scheme=mae75")
    assert code == 2 and "masking.scheme=mae75 sets it" in err and "masking.corruption.kind=mlm" in err
    assert not out.exists()
