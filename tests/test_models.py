"""The encoder without DeepSpeed: embeddings independent of the batch, the MAE path's compute, the
cells embedders on a real expression matrix, the portable checkpoint round trip, the size presets."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from biomask.errors import InputError
from biomask.masking import Masker, MaskingConfig
from biomask.models import (
    MODEL_KINDS,
    PRESETS,
    EncoderConfig,
    MaskedEncoder,
    build_model,
    check_tokenizer,
    load_pretrained,
    save_pretrained,
)
from biomask.store import TokenStore
from biomask.training.data import DataSpec, collate
from biomask.vocab import MASK_ID
from tests.cells_store import prep_pbmc


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared machine: threads only wait for each other
    yield
    torch.set_num_threads(before)


def masking(**data) -> MaskingConfig:
    return MaskingConfig.model_validate(data)


@pytest.fixture(scope="module")
def splice_records(splice_store):
    split = TokenStore(splice_store).split("train")
    return [split[i] for i in range(12)]


@pytest.fixture(scope="module", params=["binned", "rank", "panel"])
def cells_store(request, tmp_path_factory):
    return prep_pbmc(tmp_path_factory.mktemp("cells") / request.param, request.param)


@pytest.fixture(scope="module")
def binned_store(tmp_path_factory):
    return prep_pbmc(tmp_path_factory.mktemp("cells") / "binned", "binned")


# The kinds that read token sequences (every family but the cell profiles'): each offers the
# sequence poolings, so a kind registered later is tested here without being named.
SEQUENCE_KINDS = [kind for kind, cls in MODEL_KINDS.items() if cls.family != "profile"]


def tiny(**kw) -> EncoderConfig:
    return EncoderConfig(
        **{"vocab_size": 10, "d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 64, "max_len": 80, **kw}
    )


def test_embeddings_do_not_depend_on_the_rest_of_the_batch(splice_records):
    torch.manual_seed(0)
    model = MaskedEncoder(tiny()).eval()
    records = [dict(r, tokens=r["tokens"][: 10 + 4 * i]) for i, r in enumerate(splice_records)]  # padding
    batch = collate(records, modality="dna")
    for pooling in ("cls", "mean", "max"):  # padding enters none of them
        for layer in (-1, 0, 1):
            together = model.embed(batch, pooling=pooling, layer=layer)
            alone = torch.cat(
                [model.embed(collate([r], modality="dna"), pooling=pooling, layer=layer) for r in records]
            )
            assert together.shape == (len(records), 32)
            torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_concat_pooling_keeps_every_position_in_order(splice_records):
    torch.manual_seed(0)
    model = MaskedEncoder(tiny()).eval()
    batch = collate(splice_records[:3], modality="dna")  # the splice set: one length (60 bases)
    length = len(splice_records[0]["tokens"])
    concat = model.embed(batch, pooling="concat")
    with torch.no_grad():
        states = model.encoder(model.embedder(batch), batch["attention_mask"])
    assert concat.shape == (3, length * 32)
    torch.testing.assert_close(concat, states[:, 1 : 1 + length].reshape(3, -1))  # [CLS], [SEP] left out
    mean = model.embed(batch, pooling="mean")
    torch.testing.assert_close(concat.view(3, length, 32).mean(1), mean, atol=1e-6, rtol=1e-5)
    # max: each feature's largest value over the same content positions (a motif anywhere)
    torch.testing.assert_close(concat.view(3, length, 32).amax(1), model.embed(batch, pooling="max"))
    ragged = collate(
        [dict(splice_records[0], tokens=splice_records[0]["tokens"][:20]), splice_records[1]], modality="dna"
    )
    with pytest.raises(ValueError, match="one length"):
        model.embed(ragged, pooling="concat")


@pytest.mark.parametrize("kind", SEQUENCE_KINDS)
def test_mean_layers_pooling_is_every_blocks_mean_in_order(splice_records, kind):
    torch.manual_seed(0)
    model = build_model(tiny(kind=kind, n_layers=3)).eval()
    records = [dict(r, tokens=r["tokens"][: 10 + 4 * i]) for i, r in enumerate(splice_records)]  # padding
    batch = collate(records, modality="dna")
    every = model.embed(batch, pooling="mean_layers")
    assert every.shape == (len(records), 3 * 32)
    blocks = [model.embed(batch, pooling="mean", layer=i) for i in (1, 2, 3)]  # the embeddings left out
    torch.testing.assert_close(every, torch.cat(blocks, dim=1), atol=1e-5, rtol=1e-5)
    alone = torch.cat([model.embed(collate([r], modality="dna"), pooling="mean_layers") for r in records])
    torch.testing.assert_close(every, alone, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="layer must be -1"):
        model.embed(batch, pooling="mean_layers", layer=1)


@pytest.mark.parametrize("kind", SEQUENCE_KINDS)
def test_several_poolings_from_one_pass_equal_each_pooling_alone(splice_records, kind):
    # evaluate chooses a pooling on val by embedding every candidate together: the vectors must be
    # those each pooling gives alone, windows of long records included
    from biomask.embedding.inference import embed_records, embed_records_pooled

    torch.manual_seed(0)
    model = build_model(tiny(kind=kind, n_layers=3)).eval()
    poolings = ["mean", "max", "mean_layers"] + (["cls"] if "cls" in MODEL_KINDS[kind].poolings else [])
    records = [dict(r, tokens=r["tokens"][: 30 + 2 * i]) for i, r in enumerate(splice_records)]
    together = embed_records_pooled(
        model, records, poolings=poolings, batch_size=5, max_length=34, long_records="window"
    )
    assert list(together) == poolings
    for pooling in poolings:
        alone = embed_records(
            model, records, pooling=pooling, batch_size=5, max_length=34, long_records="window"
        )
        np.testing.assert_allclose(together[pooling], alone, atol=1e-6, rtol=1e-6)
    last = embed_records_pooled(model, records, poolings=["mean", "max"])  # the last layer's states only
    np.testing.assert_allclose(last["mean"], embed_records(model, records, pooling="mean"), atol=1e-6)
    inner = embed_records_pooled(model, records, poolings=["mean", "max"], layer=1)
    np.testing.assert_allclose(inner["max"], embed_records(model, records, pooling="max", layer=1), atol=1e-6)
    if "cls" not in MODEL_KINDS[kind].poolings:
        with pytest.raises(InputError, match="no \\[CLS\\] summary"):
            embed_records_pooled(model, records, poolings=["mean", "cls"])


def test_a_cnn_reads_records_whole_beyond_its_training_crops(splice_records):
    """A CNN has no position embeddings: records up to four receptive fields are embedded in one
    piece (not cut into windows of the crop length it was trained on); longer ones in windows."""
    from biomask.embedding.inference import embed_records, inference_max_length
    from biomask.models.cnn import receptive_field

    torch.manual_seed(0)
    model = build_model(tiny(kind="cnn", n_layers=3, kernel_size=5)).eval()
    model.checkpoint_info = {"training": {"max_length": 32}}  # pretrained on 30-base crops
    limit = inference_max_length(model)
    assert limit == 4 * receptive_field(model.config) + 2 == 4 * 29 + 2
    bases = np.concatenate([r["tokens"] for r in splice_records[:3]])  # 180 real bases
    record = {"tokens": bases[: limit - 2]}
    whole = model.embed(collate([record], modality="dna"), pooling="mean").numpy()
    np.testing.assert_allclose(embed_records(model, [record], long_records="refuse"), whole, atol=1e-6)
    longer = {"tokens": bases[: limit + 10]}
    assert not np.allclose(  # beyond the limit: windows, averaged
        embed_records(model, [longer], long_records="window"),
        model.embed(collate([longer], modality="dna"), pooling="mean").numpy(),
        atol=1e-4,
    )
    transformer = MaskedEncoder(tiny()).eval()
    transformer.checkpoint_info = {"training": {"max_length": 32}}
    assert inference_max_length(transformer) == 32  # position embeddings: its training length


def test_embed_rejects_bad_arguments(splice_records):
    model = MaskedEncoder(tiny()).eval()
    batch = collate(splice_records[:2], modality="dna")
    with pytest.raises(ValueError, match="pooling"):
        model.embed(batch, pooling="sum")
    with pytest.raises(ValueError, match="layer"):
        model.embed(batch, layer=3)


@pytest.mark.parametrize("decoder_layers", [0, 1])
def test_last_block_computes_only_masked_positions_with_the_same_loss_and_gradients(
    splice_records, decoder_layers
):
    """Training asks the last block (of the encoder, or of the MAE decoder) for the masked positions'
    states only; loss and gradients equal those of the whole output read at the masked positions."""
    torch.manual_seed(0)
    model = MaskedEncoder(tiny(n_layers=3, decoder_layers=decoder_layers))
    last = model.decoder if decoder_layers else model.encoder
    rows, query_rows = [], []
    last.blocks[-1].mlp.register_forward_hook(lambda m, args, out: rows.append(out.shape[:2]))
    # QKVProjection returns (q, k, v), each (B, heads, positions, head_dim): queries of masked rows only
    last.blocks[-1].attn.qkv.register_forward_hook(
        lambda m, args, out: query_rows.append((out[0].shape[2], out[1].shape[2]))
    )
    records = [{**r, "tokens": r["tokens"][: 20 + 3 * i]} for i, r in enumerate(splice_records)]  # padding
    batch = Masker(masking(scheme="bert15"), target="tokens", vocab_size=10, seed=0)(
        collate(records, modality="dna"), 0
    )
    masked = batch["masked"]
    fast = model(batch)["loss"]
    fast.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    x, attention_mask = model.embedder(batch), batch["attention_mask"]
    if decoder_layers:
        states = model._mae(x, attention_mask, masked, outputs=None)[masked]
    else:
        states = model.encoder(x, attention_mask)[masked]
    full = torch.nn.functional.cross_entropy(model.head(states), batch["target_ids"][masked])
    full.backward()
    assert rows[0] == (masked.shape[0], int(masked.sum(1).max())) and rows[1] == masked.shape
    assert query_rows[0] == (int(masked.sum(1).max()), masked.shape[1])  # keys, values: every position
    assert query_rows[1] == (masked.shape[1], masked.shape[1])
    assert torch.allclose(fast, full, atol=1e-6)
    for name, p in model.named_parameters():
        assert torch.allclose(grads[name], p.grad, atol=1e-6), name


def test_mae_encoder_sees_only_the_kept_tokens(splice_records):
    """MAE: the encoder input shrinks with the ratio (compute falls); masked content never enters it."""
    torch.manual_seed(0)
    model = MaskedEncoder(tiny(decoder_layers=1))
    widths = []
    model.encoder.register_forward_pre_hook(lambda m, args: widths.append(args[0].shape[1]))
    batch = collate(splice_records, modality="dna")  # all 60 bases: no padding
    for ratio in (0.25, 0.5, 0.75):
        masker = Masker(masking(scheme="mae75"), target="tokens", vocab_size=10, seed=0)
        out = masker.apply(batch, torch.full((len(splice_records),), ratio))
        assert (out["input_ids"][out["masked"]] == MASK_ID).all()  # MAE: no 80/10/10
        loss = model(out)["loss"]
        loss.backward()
        assert torch.isfinite(loss)
    assert widths == [62 - round(60 * r) for r in (0.25, 0.5, 0.75)]  # [CLS] [SEP] + kept tokens


def test_mae_handles_records_of_different_lengths(splice_records):
    torch.manual_seed(0)
    model = MaskedEncoder(tiny(decoder_layers=1))
    records = [dict(r, tokens=r["tokens"][: 15 + 3 * i]) for i, r in enumerate(splice_records)]
    batch = collate(records, modality="dna")
    masker = Masker(
        masking(scheme="mae75", ratio={"granularity": "sample"}), target="tokens", vocab_size=10, seed=1
    )
    out = model(masker(batch, 0))
    assert torch.isfinite(out["loss"]) and int(out["n_masked"]) > 0


def test_cells_models_train_on_a_real_matrix(cells_store):
    """Each scheme's default target and value embedding; masked values never reach the input."""
    store = TokenStore(cells_store)
    spec = DataSpec.from_store(store)
    split = store.split("train")
    batch = collate([split[i] for i in range(16)], modality="cells", max_length=200)
    target = {"binned": "bins", "rank": "tokens", "panel": "values"}[spec.scheme]
    value_embedding = {"binned": "bins", "rank": "none", "panel": "mlp"}[spec.scheme]
    cfg = tiny(
        vocab_size=spec.vocab_size,
        modality="cells",
        positions=spec.scheme == "rank",
        value_embedding=value_embedding,
        n_bins=spec.n_bins,
        scheme=spec.scheme,
        target=target,
        max_len=200,
    )
    torch.manual_seed(0)
    model = MaskedEncoder(cfg)
    masker = Masker(
        masking(scheme="r2mae"), target=target, vocab_size=spec.vocab_size, n_bins=spec.n_bins, seed=0
    )
    out = masker(batch, 0)
    if target == "bins":
        assert (out["bins"][out["masked"]] != batch["bins"][out["masked"]]).float().mean() > 0.75
    if target == "values":
        assert out["value_hidden"].equal(out["masked"])
        assert not torch.equal(model.embedder(out), model.embedder(batch))
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        loss = model(out)["loss"]
        optim.zero_grad()
        loss.backward()
        optim.step()
        first = first if first is not None else loss.item()
    assert loss.item() < first  # it can fit a real batch
    emb = model.eval().embed(batch)
    assert emb.shape == (16, 32) and torch.isfinite(emb).all()


def test_portable_checkpoint_round_trip_and_tokenizer_checks(
    tmp_path, splice_store, genome_store, binned_store
):
    torch.manual_seed(0)
    model = MaskedEncoder(tiny()).eval()
    out = save_pretrained(
        model.state_dict(),
        model.config,
        tmp_path / "model",
        tokenizer_dir=splice_store / "tokenizer",
        info={},
    )
    loaded = load_pretrained(out)
    batch = collate([TokenStore(splice_store).split("val")[i] for i in range(4)], modality="dna")
    assert torch.equal(loaded.embed(batch), model.embed(batch))
    assert not loaded.training
    check_tokenizer(loaded, genome_store)  # both char tokenizers: the same vocabulary
    with pytest.raises(InputError, match="different tokenizer"):
        check_tokenizer(out, binned_store)
    # a tokenizer swapped inside the checkpoint is refused
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    shutil.copy(binned_store / "tokenizer" / "tokenizer.json", broken / "tokenizer" / "tokenizer.json")
    with pytest.raises(InputError, match="does not match the tokenizer"):
        load_pretrained(broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(InputError, match="corrupt"):
        load_pretrained(broken)
    with pytest.raises(InputError, match="does not exist"):
        load_pretrained(tmp_path / "nowhere")
    assert json.loads((out / "config.json").read_text())["architecture"]["d_model"] == 32
    # an edited config.json (another architecture, or another preprocessing setting that would embed
    # differently without a word) is refused, naming the file; its layout and key order do not count
    edited = tmp_path / "edited"
    shutil.copytree(out, edited)
    config = json.loads((edited / "config.json").read_text())
    (edited / "config.json").write_text(json.dumps(dict(reversed(config.items()))))
    assert torch.equal(load_pretrained(edited).embed(batch), model.embed(batch))
    config["architecture"]["d_ff"] += 1
    (edited / "config.json").write_text(json.dumps(config, indent=2))
    with pytest.raises(InputError, match=r"edited/config.json was changed after the model was written"):
        load_pretrained(edited)
    # a digest removed from a checkpoint written with one (it records its store's input files) is no
    # way round the check
    config["data"] = {"sources": []}
    (edited / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "config_sha256"}))
    with pytest.raises(InputError, match="lacks the config_sha256"):
        load_pretrained(edited)
    # one written before config.json held its digest: the weights still have to fit the architecture
    del config["config_sha256"], config["data"]
    (edited / "config.json").write_text(json.dumps(config, indent=2))
    with pytest.raises(
        InputError, match=r"model.safetensors does not fit the architecture in its config.json"
    ):
        load_pretrained(edited)


@pytest.mark.parametrize(
    ("preset", "millions"), [("tiny", 0.17), ("small", 3.5), ("base", 86), ("large", 304), ("1b", 1014)]
)
def test_size_presets(preset, millions):
    with torch.device("meta"):
        model = MaskedEncoder(EncoderConfig(vocab_size=10, **PRESETS[preset]))
    assert model.num_parameters() / 1e6 == pytest.approx(millions, rel=0.02)
