"""Linear-probe-then-fine-tune on the real splice task: the head starts as the fitted probe, fine-tuning
(mixed with the probe, α chosen on validation) never ends below that probe on validation, early
stopping waits for the minimum training, the lr grid is chosen on validation, and layer-wise lr decay
degrades gracefully on models without blocks; long DNA records are windowed, centred or refused,
never cut silently."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import matthews_corrcoef
from sklearn.preprocessing import StandardScaler
from torch import nn

from biomask.batch import collate
from biomask.embedding.inference import embed_records, window_starts
from biomask.errors import InputError
from biomask.evaluation.baselines import Split, fit_tuned_logistic, one_hot
from biomask.evaluation.config import FinetuneSpec, SplitSpec
from biomask.evaluation.data import load_labelled, seed_split
from biomask.evaluation.finetune import (
    Classifier,
    FinetuneRun,
    ProbeHead,
    _pool_pieces,
    choose_mix,
    clear_gain,
    encoder_param_groups,
    finetune,
    finetune_grid,
)
from biomask.models import EncoderConfig, MaskedEncoder, load_pretrained

pytestmark = [pytest.mark.network, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def splice(splice_store, dna_checkpoint):
    data = load_labelled(splice_store)
    split = seed_split(data, SplitSpec(mode="resample", val=0.1, test=0.3), 1)
    records = [data.record(i) for i in range(len(data))]
    model = load_pretrained(dna_checkpoint)
    return data, records, split, model


@pytest.fixture(scope="module")
def probe(splice):
    """The linear probe on the checkpoint's frozen concat features (as `biomask evaluate` fits it)."""
    data, records, (train, val, test), model = splice
    with one_thread():
        x = embed_records(model, records, pooling="concat", max_length=62)
    scaler = StandardScaler().fit(x[train])
    xs = [scaler.transform(x[i]) for i in (train, val, test)]
    y = data.labels
    fitted, val_mcc = fit_tuned_logistic(Split(xs[0], y[train], xs[1], y[val], xs[2], y[test]), 0, patience=2)
    return ProbeHead.from_sklearn(scaler, fitted, 3, val_mcc, fitted.predict(xs[2]))


class one_thread:
    def __enter__(self):
        self.before = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)


def run(splice, probe, *, lrs, **settings):
    data, records, split, model = splice
    with one_thread():
        return finetune_grid(
            model,
            records,
            data.labels,
            split,
            settings=FinetuneSpec(batch_size=64, lr=lrs, warmup=0.0, **settings),
            n_classes=3,
            seed=0,
            max_length=62,
            pooling="concat",
            probe=probe,
        )


@pytest.mark.parametrize("select", ["log_loss", "mcc"])
def test_lp_ft_starts_at_the_probe_and_ends_at_or_above_it_on_validation(splice, probe, select):
    data, _, (_, _, test), _ = splice
    result = run(
        splice, probe, lrs=[1e-4, 3e-4], epochs=2, eval_every=8, min_epochs=1, patience=2, select=select
    )
    # step 0: the head is the probe (its standardisation and coefficients), so it scores what the probe does
    assert result.history[0]["step"] == 0
    assert abs(result.history[0]["val_mcc"] - probe.val_mcc) < 0.02
    assert result.start_val_mcc == probe.val_mcc
    assert result.start_val_loss == result.history[0]["val_loss"] > 0
    assert [g["lr"] for g in result.grid] == [1e-4, 3e-4]
    # the grid keeps the run with the best validation score, never below the probe it started from
    if select == "mcc":
        assert result.best_val_mcc >= probe.val_mcc
        assert result.val_mcc >= result.best_val_mcc  # the mix: α = 0 and α = 1 are candidates
        assert result.val_mcc == max(g["val_mcc"] for g in result.grid)
        assert all(g["val_mcc"] >= g["best_val_mcc"] >= probe.val_mcc for g in result.grid)
    else:
        assert result.val_loss == min(g["val_loss"] for g in result.grid)
        assert all(g["val_loss"] <= result.start_val_loss for g in result.grid)
        assert result.val_mcc >= probe.val_mcc  # the gain is kept only with an MCC no lower
    if result.source == "probe":
        assert result.alpha == 0.0 and result.val_loss == result.start_val_loss
        assert np.array_equal(result.test_predictions, probe.test_predictions)
    else:
        assert result.best_step > 0
        assert (result.source == "mix") == (0.0 < result.alpha < 1.0)
        if select == "log_loss":
            assert result.val_loss < result.start_val_loss
    assert matthews_corrcoef(data.labels[test], result.test_predictions) > 0.5


def test_screening_trains_every_lr_briefly_and_only_the_best_carries_on(splice, probe):
    """finetune.screen_epochs: each lr trains that long, the one whose validation passes went furthest
    carries on from where it stopped (its screen is not trained again) to the whole budget, and the
    result is that run's."""
    from biomask.evaluation.finetune import screen_score

    result = run(splice, probe, lrs=[1e-5, 3e-4], epochs=2, eval_every=8, screen_epochs=0.5)
    screens, full = result.grid[:2], result.grid[2:]
    assert [g["lr"] for g in screens] == [1e-5, 3e-4] and all(g["screen"] for g in screens)
    assert len(full) == 1 and not full[0]["screen"]
    per_epoch = result.steps_per_epoch
    assert all(g["steps"] == -(-per_epoch // 2) for g in screens)  # the screens paused at half an epoch
    scores = [screen_score(g["history"], "log_loss") for g in screens]
    winner = screens[int(np.argmax(scores))]
    assert full[0]["lr"] == winner["lr"]
    # the same run carried on: its passes start with the screen's, then go on past it (not from step 0)
    assert full[0]["history"][: len(winner["history"])] == winner["history"]
    assert [h["step"] for h in full[0]["history"]].count(0) == 1
    assert full[0]["steps"] > winner["steps"]
    assert result.val_loss == full[0]["val_loss"]
    assert screen_score(result.history, "log_loss") == pytest.approx(
        screen_score(full[0]["history"], "log_loss"), abs=1e-4
    )


def test_fresh_head_runs_train_beside_the_probe_started_ones_against_the_same_bar(splice, probe):
    """finetune.fresh_head_lr: those runs start from a random head (training loss at the first step
    near log 3, where the probe-started run is far below), while the probe stays their bar (step 0 is
    the probe's validation score), their mix partner and the fallback; the grid says which run is which."""
    result = run(splice, probe, lrs=[1e-4], fresh_head_lr=[1e-3], max_steps=4, eval_every=1, min_epochs=0)
    started, fresh = result.grid
    assert (started["lr"], started["fresh_head"]) == (1e-4, False)
    assert (fresh["lr"], fresh["fresh_head"]) == (1e-3, True)
    assert fresh["history"][0] == started["history"][0]  # the same bar: the probe's start
    assert abs(fresh["history"][0]["val_mcc"] - probe.val_mcc) < 0.02
    assert abs(fresh["history"][1]["train_loss"] - np.log(3)) < 0.2  # a random head: about uniform
    assert started["history"][1]["train_loss"] < 0.6 * np.log(3)  # the probe: already fitted
    best = min((started, fresh), key=lambda g: g["val_loss"])
    assert result.fresh_head == best["fresh_head"] and result.val_loss == best["val_loss"]
    assert result.val_loss <= result.start_val_loss  # never below the probe on validation
    if result.source == "probe":
        assert np.array_equal(result.test_predictions, probe.test_predictions)
    with pytest.raises(ValueError, match="fresh_head_lr"):  # a fresh head beside a fresh head: refused
        FinetuneSpec(init_head="random", fresh_head_lr=[1e-3])


def test_lr_empty_runs_fresh_heads_only_and_keeps_the_probe_as_the_bar(splice, probe):
    """finetune.lr: [] with fresh_head_lr (the motif template): no probe-started run is trained, the
    fresh head's step 0 is still the probe's score, and the result never ends below the probe on
    validation. lr: [] alone, or fresh_head_lr: [], leaves nothing to run: refused when read."""
    result = run(splice, probe, lrs=[], fresh_head_lr=[1e-3], max_steps=4, eval_every=1, min_epochs=0)
    assert [(g["lr"], g["fresh_head"]) for g in result.grid] == [(1e-3, True)]
    assert result.fresh_head
    assert abs(result.grid[0]["history"][0]["val_mcc"] - probe.val_mcc) < 0.02
    assert result.val_loss <= result.start_val_loss
    for bad in ({"lr": []}, {"lr": [], "fresh_head_lr": []}):
        with pytest.raises(ValueError, match="lr"):
            FinetuneSpec(**bad)


def test_min_budget_steps_gives_a_small_split_more_epochs_and_max_steps_still_caps(splice, probe):
    """finetune.min_budget_steps: a budget of a sliver of an epoch (1 step) becomes 5 steps; max_steps
    caps the floor. Without it the epochs alone set the budget."""
    common = dict(lrs=[], fresh_head_lr=[1e-3], epochs=0.01, eval_every=1, min_epochs=0, patience=100)
    assert run(splice, probe, **common).grid[0]["steps"] == 1
    assert run(splice, probe, **common, min_budget_steps=5).grid[0]["steps"] == 5
    assert run(splice, probe, **common, min_budget_steps=5, max_steps=3).grid[0]["steps"] == 3


def test_an_epoch_of_a_small_training_split_sees_every_record_once(splice):
    """60 training records in batches of 32: an epoch is 2 steps (32 + a short 28) covering each
    record once, not 1 step of a fresh random 32 that leaves half the split unseen."""
    data, records, (train, val, test), model = splice
    settings = FinetuneSpec(batch_size=32, lr=1e-4, epochs=2, warmup=0.0, min_epochs=0, patience=100)
    with one_thread():
        ft = FinetuneRun(
            copy.deepcopy(model),
            records,
            data.labels,
            (train[:60], val[:40], test[:40]),
            n_classes=3,
            settings=settings,
            seed=0,
            max_length=62,
            pooling="concat",
        )
        seen: list[np.ndarray] = []
        collate = ft.batches.collate
        ft.batches.collate = lambda index: (seen.append(np.array(index)), collate(index))[1]
        ft.train()
    assert ft.steps_per_epoch == 2 and ft.step == ft.total == 4
    assert [len(index) for index in seen] == [32, 28, 32, 28]
    for epoch in (seen[:2], seen[2:]):
        assert sorted(np.concatenate(epoch).tolist()) == sorted(train[:60].tolist())


def test_the_chosen_steps_test_predictions_are_those_its_weights_gave_at_that_step(splice):
    """The test pass waits until a step is chosen: each new best's weights are kept, training makes no
    test pass, and the result's test predictions are those a test pass at the chosen step gives (not
    the last step's), from one test pass at the end."""
    data, records, (train, val, test), model = splice
    settings = FinetuneSpec(
        batch_size=16, lr=1e-3, max_steps=6, eval_every=1, warmup=0.0, min_epochs=0, patience=100
    )
    with one_thread():
        ft = FinetuneRun(
            copy.deepcopy(model),
            records,
            data.labels,
            (train[:64], val[:48], test[:48]),
            n_classes=3,
            settings=settings,
            seed=0,
            max_length=62,
            pooling="concat",
        )
        test_pass, passes, at_step = ft._test_probabilities, [], {}
        ft._test_probabilities = lambda: (passes.append(ft.step), test_pass())[1]
        keep = ft._keep_best
        ft._keep_best = lambda: (at_step.__setitem__(ft.step, test_pass()), keep())
        ft.train()
        assert passes == []  # no test pass while training
        assert 0 < ft.best_step < ft.step and ft.best_test is None
        assert not np.array_equal(test_pass(), at_step[ft.best_step])  # the last step predicts otherwise
        result = ft.result()  # no probe: the best step is the result
    assert result.best_step == ft.best_step and result.alpha == 1.0
    assert np.array_equal(result.test_predictions, at_step[ft.best_step].argmax(1))
    assert np.array_equal(ft.best_test, at_step[ft.best_step])
    assert passes == [ft.step]  # one test pass, at the end


def test_a_fresh_head_closing_in_on_the_probe_is_not_stopped_by_the_probes_bar():
    """Patience watches a fresh-head run's own passes: validation log-loss falling 0.60 -> 0.43 -> 0.36
    while the probe sits at 0.30 does not stop it (patience 1), a pass that gets worse does, and a
    pass below the probe's loss becomes the best step. A probe-started run on the same passes stops
    at the first one that does not beat the probe (its own start)."""
    labels = np.array([0, 1])

    def probabilities(p):  # both records right with probability p: log-loss -log(p)
        return np.array([[p, 1 - p], [1 - p, p]])

    def replay(fresh_head, ps):
        run = FinetuneRun.__new__(FinetuneRun)
        run.settings = FinetuneSpec(select="log_loss", patience=1, min_epochs=0)
        run.labels, run.val, run.min_steps = labels, np.array([0, 1]), 0
        run.best_score, run.best_step, run.waited, run.stopped = np.log(0.74), 0, 0, False
        run.own_best = -np.inf if fresh_head else run.best_score
        run._keep_best = lambda: None
        passes = iter(probabilities(p) for p in ps)
        run._validate = lambda step, loss: next(passes)
        for step in range(1, len(ps) + 1):
            run.step, run._window = step, [0.5]  # the pass's mean training loss (not judged)
            run._pass()
            if run.stopped:
                return step, run.best_step
        return None, run.best_step

    closing_in = [0.55, 0.65, 0.70, 0.80]  # -log p: 0.60, 0.43, 0.36, then 0.22 (the probe: 0.30)
    assert replay(True, closing_in) == (None, 4)
    assert replay(False, closing_in) == (1, 0)
    assert replay(True, [0.55, 0.65, 0.60]) == (3, 0)  # worse than its own best: patience runs out


def test_the_probe_is_kept_unless_the_gain_is_larger_than_the_validation_noise():
    """The one-standard-error rule: a log-loss gain the size of its standard error keeps the probe; a
    gain well beyond it, with MCC no lower, replaces it; a clear log-loss gain that costs MCC does not."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    right = np.where(labels[:, None] == np.arange(2), 0.8, 0.2)  # every record right, p = 0.8
    noisy = right + rng.normal(0, 0.05, right.shape) * np.array([1, -1])  # ± noise on the true class
    noisy = np.clip(noisy, 0.01, 0.99)
    noisy /= noisy.sum(1, keepdims=True)
    assert not clear_gain(labels, right, noisy, start_mcc=1.0, min_gain_se=1.0)  # noise, no gain
    sharper = np.where(labels[:, None] == np.arange(2), 0.9, 0.1)
    assert clear_gain(labels, right, sharper, start_mcc=1.0, min_gain_se=1.0)
    one_wrong = sharper.copy()
    one_wrong[0] = one_wrong[0][::-1]  # sharper everywhere but one record flipped: MCC drops
    assert not clear_gain(labels, right, one_wrong, start_mcc=1.0, min_gain_se=0.0)


def test_a_run_that_only_gets_worse_trains_the_minimum_and_returns_the_probe(splice, probe):
    """lr 0.1 wrecks the encoder: early stopping (patience 1, a pass every 5 steps) must still wait for
    the minimum epoch, and the result is then the probe's own predictions."""
    result = run(splice, probe, lrs=[0.1], epochs=3, eval_every=5, min_epochs=1, patience=1)
    assert result.steps >= result.steps_per_epoch and result.steps < 3 * result.steps_per_epoch
    assert result.source == "probe" and result.best_step == 0
    assert np.array_equal(result.test_predictions, probe.test_predictions)
    assert result.best_val_mcc == probe.val_mcc


def test_the_mix_with_the_probe_is_chosen_on_validation():
    """Probe and fine-tuned model each right where the other is unsure: the even mixture gets every
    record right and wins; α = 0 scores the probe's own validation MCC; ties go to the even mixture."""
    labels = np.array([0, 1, 0, 1])
    start = np.array([[0.9, 0.1], [0.1, 0.9], [0.45, 0.55], [0.55, 0.45]])  # right, right, wrong, wrong
    tuned = np.array([[0.45, 0.55], [0.55, 0.45], [0.9, 0.1], [0.1, 0.9]])  # wrong, wrong, right, right
    alpha, mcc, scores = choose_mix(labels, start, tuned, [0.0, 0.25, 0.5, 0.75, 1.0], start_score=0.0)
    assert alpha == 0.5 and mcc == 1.0
    assert scores[0.0] == 0.0 and scores[1.0] == 0.0 and scores[0.25] == 1.0
    same = np.array([[0.9, 0.1], [0.1, 0.9], [0.9, 0.1], [0.1, 0.9]])
    assert choose_mix(labels, same, same, [0.0, 0.25, 0.5, 1.0], start_score=1.0)[0] == 0.5
    assert choose_mix(labels, same, same, [1.0], start_score=1.0)[0] == 1.0  # mix: [1.0] turns it off
    with pytest.raises(ValueError, match="mix"):
        FinetuneSpec(mix=[0.0, 0.5])  # the fine-tuned model alone must be a candidate


def test_probe_head_reproduces_a_binary_logistic_regression(splice):
    """Two classes: sklearn fits one coefficient row; the head's two logits give the same predictions."""
    data, _, (train, _, test), _ = splice
    keep = data.labels != 2
    x = one_hot(data.sequences)
    tr, te = train[keep[train]], test[keep[test]]
    scaler = StandardScaler().fit(x[tr])
    lr = LogisticRegression(C=0.1, max_iter=2000).fit(scaler.transform(x[tr]), data.labels[tr])
    head = ProbeHead.from_sklearn(scaler, lr, 3, 0.0, np.empty(0))
    logits = ((x[te] - head.mean) / head.scale) @ head.weight.T + head.bias
    assert np.array_equal(logits.argmax(1), lr.predict(scaler.transform(x[te])))


@pytest.mark.parametrize("classes", [2, 3])
def test_the_probe_head_starts_at_the_optimum_of_its_own_objective(splice, classes):
    """With the probe's L2 penalty (`ProbeHead.l2`, from its C) the head's gradient at step 0 is ~0 on
    the probe's training features: fine-tuning moves the encoder, not a head the probe already fitted.
    Without the penalty the same head would be pulled away (its gradient is not ~0)."""
    data, _, (train, _, _), _ = splice
    train = train[data.labels[train] < classes]
    x = one_hot(data.sequences)[train]
    y = torch.as_tensor(data.labels[train])
    scaler = StandardScaler().fit(x)
    fitted = LogisticRegression(C=0.05, max_iter=5000, tol=1e-8).fit(scaler.transform(x), y.numpy())
    head = ProbeHead.from_sklearn(scaler, fitted, classes, 0.0, np.empty(0), n_train=len(train))
    assert head.l2 > 0
    weight = torch.tensor(head.weight, dtype=torch.float64, requires_grad=True)
    xs = torch.as_tensor((x - head.mean) / head.scale, dtype=torch.float64)
    logits = xs @ weight.T + torch.as_tensor(head.bias, dtype=torch.float64)
    ce = torch.nn.functional.cross_entropy(logits, y)
    (with_penalty,) = torch.autograd.grad(ce + head.l2 * weight.pow(2).sum(), weight, retain_graph=True)
    (without,) = torch.autograd.grad(ce, weight)
    assert with_penalty.abs().max() < 1e-2 * without.abs().max()  # float32 standardisation: not 0


def test_layer_wise_lr_decay_and_models_without_blocks():
    cfg = EncoderConfig(vocab_size=10, modality="dna", d_model=16, n_layers=3, n_heads=2, d_ff=32, max_len=20)
    model = MaskedEncoder(cfg)
    groups = encoder_param_groups(model, 1e-3, 0.01, 0.5)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert lr_of[id(model.encoder.blocks[2].mlp.proj.weight)] == pytest.approx(1e-3)  # the top block
    assert lr_of[id(model.encoder.blocks[0].mlp.proj.weight)] == pytest.approx(1e-3 * 0.5**2)
    assert lr_of[id(model.embedder.tokens.weight)] == pytest.approx(1e-3 * 0.5**3)
    assert lr_of[id(model.encoder.norm.weight)] == pytest.approx(1e-3)
    assert {id(p) for p in model.parameters()} == set(lr_of)  # every parameter exactly once
    decays = {g["lr"]: g["weight_decay"] for g in groups if g["params"] and g["params"][0].dim() < 2}
    assert set(decays.values()) == {0.0}  # no weight decay on biases and norms

    class Profile(nn.Module):  # another model kind: no transformer blocks
        def __init__(self):
            super().__init__()
            self.encoder = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))

    flat = encoder_param_groups(Profile(), 1e-3, 0.01, 0.5)
    assert {g["lr"] for g in flat} == {1e-3} and sum(len(g["params"]) for g in flat) == 4


def test_head_dropout_acts_in_training_only():
    """`finetune.dropout` (opt-in) regularises the head's input while training; evaluation (validation
    passes, test predictions, the step-0 check against the probe) sees every feature."""
    cfg = EncoderConfig(vocab_size=10, modality="dna", d_model=16, n_layers=1, n_heads=2, d_ff=32, max_len=20)
    torch.manual_seed(0)
    encoder = MaskedEncoder(cfg)
    plain = Classifier(copy.deepcopy(encoder), 3, pooling="mean")
    dropped = Classifier(copy.deepcopy(encoder), 3, pooling="mean", dropout=0.5)
    dropped.head.load_state_dict(plain.head.state_dict())
    batch = collate([{"tokens": np.arange(5, 9) + i % 2} for i in range(4)], modality="dna")
    plain.eval(), dropped.eval()
    assert torch.equal(plain(batch), dropped(batch))
    plain.train(), dropped.train()
    torch.manual_seed(1)
    assert not torch.allclose(plain(batch), dropped(batch))
    assert FinetuneSpec().dropout == 0  # off by default: a probe head keeps the probe's L2 penalty


def test_long_records_are_windowed_centred_or_refused(splice):
    """60-base records into a 30-base input: windows [0, 30) and [30, 60), mean-pooled (concat: both in
    order); centre: bases 15-45; refuse: an error that names the options."""
    _, records, _, model = splice
    few = records[:5]
    cut = lambda r, a, b: {**r, "tokens": np.asarray(r["tokens"])[a:b]}  # noqa: E731
    with one_thread():
        halves = [embed_records(model, [cut(r, a, a + 30) for r in few], pooling="mean") for a in (0, 30)]
        windowed = embed_records(model, few, pooling="mean", max_length=32, long_records="window")
        np.testing.assert_allclose(windowed, (halves[0] + halves[1]) / 2, atol=1e-5)
        # max pooling: the largest value over both windows' tokens, in the probe's features and in
        # the fine-tuning head's (which pools the windows itself)
        halves_max = [embed_records(model, [cut(r, a, a + 30) for r in few], pooling="max") for a in (0, 30)]
        windowed_max = embed_records(model, few, pooling="max", max_length=32, long_records="window")
        np.testing.assert_allclose(windowed_max, np.maximum(*halves_max), atol=1e-6)
        owners = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
        pieces = torch.from_numpy(np.stack(halves_max, 1).reshape(10, -1))
        torch.testing.assert_close(_pool_pieces(pieces, owners, "max").numpy(), windowed_max)
        concat = embed_records(model, few, pooling="concat", max_length=32, long_records="window")
        assert concat.shape == (5, 60 * model.config.d_model)
        centre = embed_records(model, few, pooling="mean", max_length=32, long_records="centre")
        expected = embed_records(model, [cut(r, 15, 45) for r in few], pooling="mean")
        np.testing.assert_allclose(centre, expected, atol=1e-5)
        with pytest.raises(InputError, match="long_records=window"):
            embed_records(model, few, pooling="mean", max_length=32, long_records="refuse")
    assert window_starts(200, 128).tolist() == [0, 72] and window_starts(60, 60).tolist() == [0]


def test_finetuning_windows_long_records_like_the_probe(splice, probe):
    """Fine-tuning on a 30-base input sees every base (two windows per record), from a random head."""
    data, records, (train, val, test), model = splice
    with one_thread():
        result = finetune(
            copy.deepcopy(model),  # finetune trains the encoder in place
            records,
            data.labels,
            (train[:256], val, test),
            n_classes=3,
            settings=FinetuneSpec(batch_size=32, lr=1e-3, epochs=2, min_epochs=1, warmup=0.0),
            seed=0,
            max_length=32,
            pooling="concat",
            long_records="window",
        )
    assert result.source in ("finetune", "untrained") and result.steps == 16
    assert result.best_val_mcc >= result.history[0]["val_mcc"]


def test_a_classifier_on_every_blocks_mean_starts_as_its_probe(splice):
    """mean_layers pooling (every block's mean, windows averaged): the fine-tuning head, started from
    the probe fitted on `embed_records`' features, predicts what that probe predicts."""
    data, records, (train, _, test), model = splice
    few = test[:40]
    with one_thread():
        x = embed_records(model, records, pooling="mean_layers", max_length=32, long_records="window")
        assert x.shape[1] == model.config.n_layers * model.config.d_model
        scaler = StandardScaler().fit(x[train])
        lr = LogisticRegression(C=1.0, max_iter=2000).fit(scaler.transform(x[train]), data.labels[train])
        head = ProbeHead.from_sklearn(scaler, lr, 3, 0.0, np.empty(0))
        classifier = Classifier(copy.deepcopy(model), 3, pooling="mean_layers", probe=head).eval()
        # two 30-base windows per 60-base record, collated record by record, as fine-tuning does
        pieces = [
            {**records[i], "tokens": np.asarray(records[i]["tokens"])[a : a + 30]}
            for i in few
            for a in (0, 30)
        ]
        batch = collate(pieces, modality="dna")
        batch["owners"] = torch.arange(len(few)).repeat_interleave(2)
        with torch.no_grad():
            logits = classifier(batch).numpy()
    np.testing.assert_array_equal(logits.argmax(1), lr.predict(scaler.transform(x[few])))
