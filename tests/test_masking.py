"""Masking samplers: the statistics users rely on (mean ratio, one ratio per batch, exact counts,
specials never masked, span lengths), on real DNA batches from a prepared token store."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from biomask.config import validate_config
from biomask.masking import Masker, MaskingConfig, RatioSampler, span_positions, uniform_positions
from biomask.masking.config import RatioConfig
from biomask.store import TokenStore
from biomask.training.data import collate
from biomask.vocab import CLS_ID, MASK_ID, NUM_SPECIAL, PAD_ID, SEP_ID


def masking(**data) -> MaskingConfig:
    return validate_config(MaskingConfig, data, "test")


@pytest.fixture(scope="module")
def dna_batch(splice_store) -> dict[str, torch.Tensor]:
    """64 real splice-junction sequences, with records cut to different lengths to create padding."""
    split = TokenStore(splice_store).split("train")
    records = []
    for i in range(64):
        r = dict(split[i])
        r["tokens"] = r["tokens"][: 20 + (i * 7) % 41]
        records.append(r)
    return collate(records, modality="dna")


@pytest.mark.parametrize(
    ("ratio", "mean"),
    [
        ({"kind": "fixed", "value": 0.3}, 0.3),
        ({"kind": "uniform", "low": 0.1, "high": 0.7}, 0.4),
        ({"kind": "beta", "a": 2.0, "b": 6.0, "low": 0.1, "high": 0.9}, 0.1 + 0.8 * 2 / 8),
        ({"kind": "discrete", "values": [0.25, 0.5, 0.75]}, 0.5),
    ],
)
def test_ratio_samplers_have_the_right_mean(ratio, mean):
    sampler = RatioSampler(validate_config(RatioConfig, ratio, "t"), total_steps=1, seed=1)
    draws = np.concatenate([sampler.sample(step, 1) for step in range(4000)])
    assert sampler.expected() == pytest.approx(mean)
    assert draws.mean() == pytest.approx(mean, abs=0.01)
    if ratio["kind"] == "uniform":
        assert draws.min() >= 0.1 and draws.max() <= 0.7
        assert np.histogram(draws, bins=6, range=(0.1, 0.7))[0].min() > 500  # flat, not clumped
    if ratio["kind"] == "discrete":
        assert set(np.round(draws, 6)) == {0.25, 0.5, 0.75}


def test_linear_schedule_goes_from_start_to_end():
    sampler = RatioSampler(validate_config(RatioConfig, {"kind": "linear"}, "t"), total_steps=101, seed=0)
    assert sampler.sample(0, 3).tolist() == pytest.approx([0.3] * 3)
    assert sampler.sample(50, 1)[0] == pytest.approx(0.225)
    assert sampler.sample(100, 1)[0] == pytest.approx(0.15)


def test_batch_granularity_gives_one_ratio_per_batch_and_sample_granularity_many():
    per_batch = RatioSampler(validate_config(RatioConfig, {"kind": "uniform"}, "t"), total_steps=1, seed=0)
    per_sample = RatioSampler(
        validate_config(RatioConfig, {"kind": "uniform", "granularity": "sample"}, "t"), total_steps=1, seed=0
    )
    for step in range(20):
        assert len(set(per_batch.sample(step, 32).tolist())) == 1
    assert len(set(per_sample.sample(0, 32).tolist())) == 32


def test_a_steps_accumulated_micro_batches_share_its_ratio():
    """R²MAE draws one ratio per step's global batch. Drawn per call, a step of two accumulated
    micro-batches trained on two ratios, and the ratio logged for it (their mean) was no batch's: a
    run split to save memory trained on a narrower distribution than the same run unsplit."""
    cfg = validate_config(RatioConfig, {"kind": "uniform", "low": 0.15, "high": 0.45}, "t")
    whole = RatioSampler(cfg, total_steps=50, seed=3)
    split = RatioSampler(cfg, total_steps=50, seed=3)
    for step in range(50):
        ratio = whole.sample(step, 16)
        halves = [split.sample(step, 8), split.sample(step, 8)]  # grad_accum 2
        assert np.array_equal(np.concatenate(halves), ratio), step
    per_sample = RatioSampler(cfg.model_copy(update={"granularity": "sample"}), total_steps=50, seed=3)
    assert not np.array_equal(per_sample.sample(0, 8), per_sample.sample(0, 8))  # records draw their own


def test_ranks_share_a_steps_ratio_and_draw_their_records_own():
    """Per batch, every rank of a step masks at one ratio. Per sample, every rank drew the same
    records' ratios (one stream seeded alike): a global batch of W ranks held each ratio W times. A
    stream per rank now; rank 0's is a one-process run's, so those reproduce as before."""
    cfg = validate_config(RatioConfig, {"kind": "uniform", "low": 0.15, "high": 0.45}, "t")
    ranks = [RatioSampler(cfg, total_steps=5, seed=3, rank=r) for r in range(2)]
    assert np.array_equal(ranks[0].sample(0, 4), ranks[1].sample(0, 4))
    per_sample = cfg.model_copy(update={"granularity": "sample"})
    ranks = [RatioSampler(per_sample, total_steps=5, seed=3, rank=r) for r in range(2)]
    assert not np.array_equal(ranks[0].sample(0, 4), ranks[1].sample(0, 4))
    alone = RatioSampler(per_sample, total_steps=5, seed=3)
    assert np.array_equal(
        alone.sample(0, 4), RatioSampler(per_sample, total_steps=5, seed=3, rank=0).sample(0, 4)
    )


def test_same_ratio_on_every_rank_different_positions(dna_batch):
    cfg = masking(scheme="r2mae")
    a = Masker(cfg, target="tokens", vocab_size=10, seed=3, rank=0)
    b = Masker(cfg, target="tokens", vocab_size=10, seed=3, rank=1)
    for step in range(5):
        ma, mb = a(dna_batch, step), b(dna_batch, step)
        assert torch.equal(ma["ratio"], mb["ratio"])  # one ratio for the global batch
    assert not torch.equal(ma["masked"], mb["masked"])  # but each rank masks its own positions


@pytest.mark.parametrize("kind", ["uniform", "span"])
def test_positions_mask_exact_counts_and_never_specials(dna_batch, kind):
    ids, attn = dna_batch["input_ids"], dna_batch["attention_mask"]
    maskable = attn & (ids >= NUM_SPECIAL)
    gen = torch.Generator().manual_seed(0)
    n_mask = (maskable.sum(1).float() * 0.4).round().long()
    for _ in range(50):
        if kind == "span":
            masked = span_positions(maskable, n_mask, gen, mean_span=3.0, max_span=10)
        else:
            masked = uniform_positions(maskable, n_mask, gen)
        assert torch.equal(masked.sum(1), n_mask)
        assert not (masked & ~maskable).any()  # never [CLS], [SEP], padding
        special = torch.isin(ids, torch.tensor([CLS_ID, SEP_ID, PAD_ID]))
        assert not (masked & special).any()


def test_uniform_positions_are_uniform_over_the_sequence(dna_batch):
    ids, attn = dna_batch["input_ids"][:1].repeat(4000, 1), dna_batch["attention_mask"][:1].repeat(4000, 1)
    maskable = attn & (ids >= NUM_SPECIAL)
    n = int(maskable[0].sum())
    masked = uniform_positions(maskable, torch.full((4000,), 5), torch.Generator().manual_seed(1))
    freq = masked[:, maskable[0]].float().mean(0)
    assert freq.mean().item() == pytest.approx(5 / n, rel=1e-6)
    assert (freq - 5 / n).abs().max().item() < 0.03  # every position equally likely


def test_span_lengths_are_geometric_with_the_configured_mean():
    L = 1000
    maskable = torch.ones(200, L, dtype=torch.bool)
    maskable[:, 0] = maskable[:, -1] = False
    n = torch.full((200,), 150)
    masked = span_positions(maskable, n, torch.Generator().manual_seed(2), mean_span=4.0, max_span=30)
    runs = []
    for row in masked.numpy():
        edges = np.flatnonzero(np.diff(np.concatenate([[0], row.astype(int), [0]])))
        runs.extend(edges[1::2] - edges[::2])
    runs = np.array(runs)
    assert masked.sum().item() == 200 * 150
    # spans never touch (each is separate), so runs are spans; the last span of a row is trimmed
    assert runs.mean() == pytest.approx(4.0, rel=0.1)
    assert runs.max() <= 30


def test_spans_of_mean_length_one_are_single_tokens_not_a_crash(dna_batch):
    """`masking.positions.mean_span: 1`, the documented lower bound, passed the config check and then
    failed the run at its first step (torch's geometric_ refuses p = 1): every span is one token."""
    ids, attn = dna_batch["input_ids"], dna_batch["attention_mask"]
    maskable = attn & (ids >= NUM_SPECIAL)
    n_mask = (maskable.sum(1).float() * 0.3).round().long()
    masked = span_positions(maskable, n_mask, torch.Generator().manual_seed(0), mean_span=1.0, max_span=10)
    assert torch.equal(masked.sum(1), n_mask) and not (masked & ~maskable).any()
    assert not (masked[:, 1:] & masked[:, :-1]).any()  # separate spans of one token never touch


def test_high_ratio_spans_still_exact(dna_batch):
    ids, attn = dna_batch["input_ids"], dna_batch["attention_mask"]
    maskable = attn & (ids >= NUM_SPECIAL)
    n_mask = (maskable.sum(1).float() * 0.9).round().long()
    masked = span_positions(maskable, n_mask, torch.Generator().manual_seed(0), mean_span=1.5, max_span=3)
    assert torch.equal(masked.sum(1), n_mask)
    assert not (masked & ~maskable).any()


def test_mlm_corruption_80_10_10_and_targets(dna_batch):
    big = {k: v.repeat(40, 1) for k, v in dna_batch.items() if k != "labels"}
    masker = Masker(masking(scheme="bert15"), target="tokens", vocab_size=10, seed=0)
    out = masker(big, 0)
    masked, ids = out["masked"], big["input_ids"]
    maskable = big["attention_mask"] & (ids >= NUM_SPECIAL)
    assert float(out["realised_ratio"]) == pytest.approx(0.15, abs=0.01)
    assert torch.equal(out["target_ids"][masked], ids[masked])
    assert (out["target_ids"][~masked] == -100).all()
    assert torch.equal(out["input_ids"][~masked], ids[~masked])  # unmasked tokens untouched
    new = out["input_ids"][masked]
    as_mask = (new == MASK_ID).float().mean().item()
    unchanged = (new == ids[masked]).float().mean().item()
    assert as_mask == pytest.approx(0.8, abs=0.02)
    # 10 % kept + 10 % random, of which 1 in 5 content tokens (A C G T N) equals the original
    assert unchanged == pytest.approx(0.1 + 0.1 / 5, abs=0.02)
    assert ((new >= NUM_SPECIAL) | (new == MASK_ID)).all()  # random replacements are content tokens
    assert (masked & ~maskable).sum() == 0


def test_realised_ratio_tracks_the_drawn_ratio(dna_batch):
    masker = Masker(
        masking(scheme="r2mae", ratio={"low": 0.2, "high": 0.6}), target="tokens", vocab_size=10, seed=0
    )
    for step in range(20):
        out = masker(dna_batch, step)
        assert float(out["realised_ratio"]) == pytest.approx(float(out["ratio"][0]), abs=0.02)


def test_masker_state_resumes_the_same_stream(dna_batch):
    cfg = masking(scheme="r2mae", positions={"kind": "span"})
    a = Masker(cfg, target="tokens", vocab_size=10, seed=5)
    for step in range(3):
        a(dna_batch, step)
    state = a.state_dict()
    expected = [a(dna_batch, s) for s in range(3, 6)]
    b = Masker(cfg, target="tokens", vocab_size=10, seed=99)
    b.load_state_dict(state)
    for s, want in zip(range(3, 6), expected):
        got = b(dna_batch, s)
        assert torch.equal(got["masked"], want["masked"]) and torch.equal(got["input_ids"], want["input_ids"])


def test_schemes_are_one_switch_and_explicit_keys_win():
    assert masking(scheme="scgpt").ratio.values == [0.25, 0.5, 0.75]
    assert masking(scheme="scgpt").ratio.kind == "discrete"
    assert masking(scheme="dynamic").ratio.kind == "linear"
    assert masking(scheme="mae75").corruption.kind == "mae"
    assert masking(scheme="span").positions.kind == "span"
    tuned = masking(scheme="r2mae", ratio={"high": 0.6})
    assert (tuned.ratio.kind, tuned.ratio.low, tuned.ratio.high) == ("uniform", 0.15, 0.6)
    assert masking(scheme="fixed40", ratio={"low": 0.1, "high": 0.75}).ratio.kind == "fixed"


def test_the_run_names_the_masking_a_scheme_resolved_to_when_the_config_overrides_its_keys():
    """Keys written in a config win over a scheme's: a scheme swept over cells-mlp.yaml (ratio low 0.5,
    high 0.9) trains with that range, not its own, and the run's log line must say so."""
    from biomask.masking.config import masking_text

    cells_mlp = {"ratio": {"low": 0.5, "high": 0.9}}
    mine = {"kind": "beta", "a": 2.0, "b": 5.0, "low": 0.1, "high": 0.9}
    cfg = MaskingConfig.model_validate(
        {**cells_mlp, "scheme": "custom", "ratio": {**mine, **cells_mlp["ratio"]}}
    )
    assert masking_text(cfg) == "custom (Beta(2, 5) on [0.5, 0.9])"
    assert masking_text(MaskingConfig.model_validate({**cells_mlp, "scheme": "r2mae"})) == (
        "r2mae (U(0.5, 0.9)); the config's ratio.low=0.5, ratio.high=0.9 replace the scheme's 0.15, 0.45"
    )
    assert masking_text(MaskingConfig.model_validate({**cells_mlp, "scheme": "fixed40"})) == "fixed40 (40%)"
    assert masking_text(MaskingConfig.model_validate({"scheme": "r2mae"})) == "r2mae (U(0.15, 0.45))"
