"""The pretrained models' rows of the `biomask evaluate` table: every checkpoint under every protocol,
and the same architecture randomly initialised (seeded per evaluation seed) under the same protocols.

| protocol       | features                                     | classifier                                   |
|----------------|----------------------------------------------|----------------------------------------------|
| `linear_probe` | frozen embeddings, computed once per model   | standardised + the baselines' tuned logistic |
|                | (random init: once per seed)                 | regression (C chosen on val; see WIDE)       |
| `mlp_probe`    | the same embeddings                          | one-hidden-layer MLP, early stopping on val  |
| `finetune`     | the whole encoder, trained                   | a linear head started as the fitted linear   |
|                |                                              | probe (LP-FT), through the DeepSpeed engine  |
|                |                                              | (biomask.evaluation.finetune); lr chosen on    |
|                |                                              | val from a grid; its class probabilities     |
|                |                                              | mixed with the probe's (α chosen on val);    |
|                |                                              | the probe when no run beats it on val        |

Equal inputs: a DNA record longer than a model's input (what it was trained on) is never cut silently.
`long_records` (window | centre | refuse) decides for the probes and fine-tuning alike, and the number
of such records per model is logged and written to metrics.json (each method's `inputs`).

Pooling (`pooling`): one for every model, or — `auto` or a list — chosen per model and seed on the
validation split: a linear probe is fitted on each candidate's features and the candidate with the
best validation MCC (ties: the earlier) is used by every protocol of that model and seed. The choice
and each candidate's validation MCC are in that seed's row of metrics.json (`pooling`,
`pooling_val_mcc`) and in report.md.

Every checkpoint is loaded and checked before any method runs: its modality and (cells) tokenizer and
scheme must be the store's — otherwise a clear error and exit 2, nothing written. A DNA checkpoint
with another tokenizer than the store's (k-mer or BPE next to char, say) reads the store's sequences
(decoded, as the baselines read them) tokenized its own way, so checkpoints of several tokenizers
are evaluated side by side on the same records and splits; its `inputs` say so (`retokenized`).

`select_on_val`: one more row, "chosen on val (linear probe)": for each seed, the checkpoint whose
linear probe scores the best validation MCC (ties: the earlier listed), with that probe's test
predictions — the tokenizer / model / pretraining choice made on validation data, never on test.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import matthews_corrcoef
from sklearn.preprocessing import StandardScaler

from biomask.batch import n_specials
from biomask.embedding.inference import (
    check_long_records,
    embed_records_pooled,
    inference_max_length,
    pick_device,
    record_policy,
    window_starts,
)
from biomask.errors import InputError
from biomask.evaluation import clustering
from biomask.evaluation.baselines import Split, fit_tuned_logistic
from biomask.evaluation.config import PROTOCOLS, EvaluateConfig
from biomask.evaluation.data import LabelledRecords
from biomask.evaluation.methods import CHOSEN_ON_VAL, RANDOM_INIT, Method
from biomask.evaluation.probes import mlp_probe
from biomask.models import MaskedEncoder, build_model, check_tokenizer, load_pretrained
from biomask.models.kinds import PROFILE_KINDS
from biomask.models.model import POOLINGS
from biomask.models.profile import check_standardise, standardised_on
from biomask.provenance import content_sha256, sha256_file
from biomask.resources import resolve_threads

log = logging.getLogger(__name__)

# `pooling: auto` tries these, in this order (ties go to the earlier): position-free summaries first
# (mean; max: a motif anywhere; mean_layers: every block's mean), then position-aware concat, then
# the [CLS] vector
POOLINGS_AUTO = ("mean", "max", "mean_layers", "concat", "cls")


def reads_whole_profile(model: Any) -> bool:
    """A profile model (mlp, panel transformer) fine-tunes on the whole profile: finetune.max_length,
    a CPU shortcut, is for token models."""
    return getattr(model.config, "kind", "transformer") in PROFILE_KINDS


@contextlib.contextmanager
def torch_threads(n: int | str) -> Iterator[None]:
    """Tiny models on a busy machine run fastest on few threads (idle OpenMP threads spin)."""
    n = resolve_threads(n)
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_checked(name: str, path: str, data: LabelledRecords) -> tuple[MaskedEncoder, bool]:
    """A checkpoint that fits the store (same modality; cells: same tokenizer and scheme), and whether
    its records must be tokenized its own way (DNA, another tokenizer than the store's)."""
    model = load_pretrained(path)
    store = data.store
    if model.config.modality != data.modality:
        raise InputError(
            f"checkpoint {name} ({path}) is a {model.config.modality} model, but store {store.root} holds "
            f"{data.modality} records; evaluate it on a {model.config.modality} store"
        )
    try:
        check_tokenizer(model, store.root)
    except InputError:
        if data.modality != "dna":
            raise  # a gene vocabulary is a panel and its statistics: no re-tokenizing a cell
        log.info("%s: another tokenizer than the store's; its records are the sequences, re-tokenized", name)
        return model, True
    scheme = store.manifest.get("scheme") if data.modality == "cells" else None
    if scheme is not None and model.config.scheme != scheme:
        raise InputError(
            f"checkpoint {name} ({path}) was trained on {model.config.scheme} cells, but store {store.root} is "
            f"{scheme}; prepare the evaluation set with tokenizer.scheme={model.config.scheme}"
        )
    return model, False


class Features:
    """Frozen embeddings of every labelled record: once per checkpoint, or once per seed (random init).
    The poolings asked for `together` (the candidates a probe chooses among) come from one forward
    pass."""

    def __init__(self, cfg: EvaluateConfig, data: LabelledRecords, records: Callable[[], list[dict]]) -> None:
        self.cfg, self.data, self.records = cfg, data, records
        self.cache: dict[Any, np.ndarray] = {}

    def of(
        self,
        model_for_seed: Callable[[int], MaskedEncoder],
        seed: int | None,
        max_length: int,
        pooling: str,
        together: list[str] | None = None,
    ) -> np.ndarray:
        if (seed, max_length, pooling) not in self.cache:
            model = model_for_seed(seed if seed is not None else 0).to(pick_device(self.cfg.device))
            wanted = [p for p in together or [] if (seed, max_length, p) not in self.cache] or [pooling]
            wanted = wanted if pooling in wanted else [pooling]
            with torch_threads(self.cfg.num_workers):
                vectors = embed_records_pooled(
                    model,
                    self.records(),
                    poolings=wanted,
                    batch_size=self.cfg.batch_size,
                    max_length=max_length,
                    long_records=self.cfg.long_records,
                )
            self.cache.update({(seed, max_length, p): x for p, x in vectors.items()})
        return self.cache[(seed, max_length, pooling)]


# On wide features (concat pooling: length × d_model, more than WIDE of them) the probe walks the
# baselines' ascending C grid only until a C scores below the best on val: there the weakly
# regularised fits are the slow ones (hundreds of L-BFGS iterations on thousands of features) and
# they lose. Narrower features (mean / cls pooling) try every C.
WIDE, PROBE_PATIENCE = 1024, 1


class Probes:
    """The linear probe of one model: standardised frozen features + the baselines' tuned logistic
    regression (C on val), fitted once per seed and input length and shared by `linear_probe` (its
    test predictions) and `finetune` (the head it starts from)."""

    def __init__(self, features: Features, n_classes: int) -> None:
        self.features, self.n_classes = features, n_classes
        self.cache: dict[Any, Any] = {}

    def fit(
        self, model_for_seed, feature_seed, max_length, data, train, val, test, seed, pooling, together=None
    ):
        from biomask.evaluation.finetune import ProbeHead

        key = (feature_seed, max_length, seed, pooling)
        if key not in self.cache:
            x = self.features.of(model_for_seed, feature_seed, max_length, pooling, together)
            y = data.labels
            with torch_threads(1):
                scaler = StandardScaler().fit(x[train])
                patience = PROBE_PATIENCE if x.shape[1] > WIDE else None
                x_train, x_val, x_test = (
                    scaler.transform(x[i]).astype(np.float32) for i in (train, val, test)
                )
                model, val_mcc = fit_tuned_logistic(
                    Split(x_train, y[train], x_val, y[val], x_test, y[test]), seed, patience=patience
                )
            pred = model.predict(x_test)
            self.cache[key] = ProbeHead.from_sklearn(
                scaler, model, self.n_classes, val_mcc, pred, n_train=len(train)
            )
        return self.cache[key]


def pooling_candidates(
    pooling: str | list[str], model: MaskedEncoder, one_length: bool, name: str
) -> list[str]:
    """The poolings this model is evaluated with: the configured one, or those of `auto` / a list that
    apply to it (a kind may offer fewer: `model.poolings`; concat needs DNA records of one length)."""
    supported = getattr(model, "poolings", POOLINGS)

    def applies(p: str) -> bool:
        return p in supported and (p != "concat" or (model.config.modality == "dna" and one_length))

    if isinstance(pooling, str) and pooling != "auto":
        if pooling not in supported:
            raise InputError(
                f"pooling={pooling}: checkpoint {name} ({model.config.kind} model) offers "
                f"{', '.join(supported)}; set pooling to one of them or to auto"
            )
        return [pooling]
    wanted = list(POOLINGS_AUTO) if pooling == "auto" else list(pooling)
    chosen = [p for p in wanted if applies(p)]
    dropped = [p for p in wanted if p not in chosen]
    if not chosen:
        raise InputError(
            f"pooling={pooling}: none applies to checkpoint {name} ({model.config.kind} model on "
            f"{model.config.modality} records{'' if one_length else ' of several lengths'}); use pooling=mean"
        )
    if dropped and pooling != "auto":
        log.warning("%s: pooling %s does not apply here; choosing among %s", name, dropped, chosen)
    return chosen


class PoolingChoice:
    """The pooling of one model for a seed: its only candidate, or the candidate whose linear probe
    (fitted on the training split) scores the best validation MCC; ties go to the earlier one."""

    def __init__(self, candidates: list[str], probes: Probes) -> None:
        self.candidates, self.probes = candidates, probes

    def choose(
        self, model_for_seed, feature_seed, max_length, data, train, val, test, seed
    ) -> tuple[str, dict[str, Any]]:
        if len(self.candidates) == 1:
            return self.candidates[0], {"pooling": self.candidates[0]}
        scores = {
            p: self.probes.fit(
                model_for_seed, feature_seed, max_length, data, train, val, test, seed, p, self.candidates
            ).val_mcc
            for p in self.candidates
        }
        best = max(self.candidates, key=scores.__getitem__)  # max keeps the first of equal scores
        return best, {"pooling": best, "pooling_val_mcc": {p: round(v, 4) for p, v in scores.items()}}


def random_init(template: MaskedEncoder, seed: int) -> MaskedEncoder:
    """The template's architecture with fresh weights drawn from `seed` (its RNG only)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(template.config)
    # Data statistics are not learned weights: a random profile model keeps the checkpoint's input
    # standardisation, so it differs from the pretrained one in its learned weights only.
    for name, buffer in template.named_buffers():
        dict(model.named_buffers())[name].copy_(buffer)
    return model.eval()


def chosen_on_val(probes: list[Method]) -> Method:
    """The row of `select_on_val`: per seed, the linear probe (among `probes`, one per checkpoint) with
    the best validation MCC; ties go to the earlier. Each probe is fitted once (cached), so this costs
    nothing more."""

    def predict(data, train, val, test, seed):
        runs = [(m.group, *m.predict(data, train, val, test, seed)) for m in probes]
        best = max(range(len(runs)), key=lambda i: runs[i][2]["val_mcc"])  # max keeps the first
        name, pred, details = runs[best]
        return pred, {
            "chosen": name,
            "chosen_val_mcc": {n: round(d["val_mcc"], 4) for n, _, d in runs},
            **{k: v for k, v in details.items() if k != "val_mcc"},
            "val_mcc": details["val_mcc"],
        }

    names = ", ".join(m.group for m in probes)
    return Method(f"{CHOSEN_ON_VAL} (linear probe)", CHOSEN_ON_VAL, "linear_probe", predict, {"among": names})


def tokenizer_label(tokenizer: dict[str, Any]) -> str:
    """ "char", "kmer (k=6)", "bpe (4,096 tokens)": a checkpoint's or store's tokenizer record, named."""
    kind = str(tokenizer.get("kind", "?"))
    if kind == "kmer" and tokenizer.get("k"):
        return f"kmer (k={tokenizer['k']})"
    if kind == "bpe" and tokenizer.get("vocab_size"):
        return f"bpe ({tokenizer['vocab_size']:,} tokens)"
    return kind


def pretrained_on_these_records(model: Any, data: LabelledRecords, mode: str) -> str | None:
    """Why a checkpoint pretrained on this very store sees test records (None: it does not). Label-free,
    but the baselines never see the test records before they are scored; the split the checkpoint
    trained on is recorded since 2026-12-05 (before: assumed to be `train`)."""
    trained = (getattr(model, "checkpoint_info", None) or {}).get("data") or {}
    same_store = trained.get("manifest_sha256") == sha256_file(data.store.root / "manifest.json") or (
        trained.get("content_sha256") is not None
        and trained["content_sha256"] == content_sha256(data.store.manifest)
    )
    if not same_store:
        shared = _shared_sources(trained, data.store.manifest)
        if not shared and _shared_token_shards(trained, data.store.manifest):
            # the same records reached by another route (a task cut from a GenBank file inline, and
            # pretraining on the CSV `datasets task` wrote from it): same tokens, other source files
            return (
                "pretrained (label-free) on a store holding token shards identical to this store's: the "
                "same records, prepared from other files. For a clean test, pretrain on other sequences "
                "(or on this store's train split, with splits.mode=store)"
            )
        if not shared:
            return None
        return (
            f"pretrained (label-free) on a store prepared from the same input file as this one ({shared}), "
            "perhaps tokenized or split otherwise: its records are likely among the test records. For a "
            "clean test, pretrain on other sequences (or on this store's train split, with splits.mode=store)"
        )
    split = trained.get("train_split", "train")
    if mode == "resample":
        return (
            f"pretrained (label-free) on this store's {split!r} records, and splits.mode=resample draws "
            "test records from them: set splits.mode=store to test only on records it was not pretrained on"
        )
    if split == "test":
        return "pretrained (label-free) on this store's test records, the ones it is scored on"
    if split != "train":
        return (
            f"pretrained (label-free) on this store's {split!r} records, on which the choices (C, pooling, "
            "the fine-tuning step) are made"
        )
    return None


def _pretraining_manifest(trained: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint's pretraining store's manifest, when it is still there and the one it records."""
    if not trained.get("store"):
        return None
    path = Path(str(trained["store"])) / "manifest.json"
    try:
        if sha256_file(path) == trained.get("manifest_sha256"):
            found = json.loads(path.read_text(encoding="utf-8"))
            return found if isinstance(found, dict) else None
    except (OSError, ValueError):
        pass
    return None


def _token_digests(manifest: dict[str, Any], splits: Any = None) -> set[str]:
    found = set()
    for name, split in (manifest.get("splits") or {}).items():
        if splits is None or name in splits:
            for shard in split.get("shards") or []:
                digest = ((shard.get("files") or {}).get("tokens") or {}).get("sha256")
                if digest:
                    found.add(digest)
    return found


def _shared_token_shards(trained: dict[str, Any], manifest: dict[str, Any]) -> bool:
    theirs = _pretraining_manifest(trained)
    if theirs is None:
        return False
    return bool(_token_digests(theirs, [trained.get("train_split", "train")]) & _token_digests(manifest))


def _shared_sources(trained: dict[str, Any], manifest: dict[str, Any]) -> str:
    """The input files (by sha256) the checkpoint's pretraining store and this store were both
    prepared from, named ("" when none). Checkpoints written before the sources were recorded: read
    from their store's manifest, when it is still there and the one they record."""
    sources = trained.get("sources")
    if sources is None:
        sources = (_pretraining_manifest(trained) or {}).get("sources")
    theirs = {s.get("sha256") for s in sources or [] if s.get("sha256")}
    ours = [s for s in manifest.get("sources") or [] if s.get("sha256") in theirs]
    return ", ".join(str(s.get("name") or s.get("path")) for s in ours)


def model_methods(cfg: EvaluateConfig, data: LabelledRecords, notes: list[str] | None = None) -> list[Method]:
    """Methods for every checkpoint × protocol (+ random-init × protocol); see the module docstring.
    What a reader of the report must know about them is added to `notes`."""
    from biomask.evaluation.finetune import finetune_grid

    notes = notes if notes is not None else []
    checked = {name: load_checked(name, path, data) for name, path in cfg.checkpoints.items()}
    models = {name: model for name, (model, _) in checked.items()}
    seen: dict[str, list[str]] = {}
    for name in models:
        why = pretrained_on_these_records(models[name], data, cfg.splits.mode)
        if why:
            seen.setdefault(why, []).append(name)
    for why, names in seen.items():
        message = f"{'checkpoint' if len(names) == 1 else 'checkpoints'} {', '.join(names)}: {why}"
        log.warning("%s", message)
        notes.append(message)
    if RANDOM_INIT in models:
        raise InputError(f"checkpoint name {RANDOM_INIT!r} is reserved for the randomly initialised model")
    if cfg.select_on_val and len(models) < 2:
        log.warning("select_on_val: one checkpoint, nothing to choose among; no row added")
    elif cfg.select_on_val and "linear_probe" not in cfg.protocols:
        log.warning(
            "select_on_val chooses by the linear probe's validation MCC, and protocols %s has no "
            "linear_probe: no row added (add linear_probe to protocols for it)",
            cfg.protocols,
        )
    cache: dict[str, list[dict]] = {}

    def records() -> list[dict]:
        if "store" not in cache:
            cache["store"] = [data.record(i) for i in range(len(data))]
        return cache["store"]

    if cfg.standardise == "data":
        for name, (model, retokenize) in checked.items():
            where = f"checkpoint {name}, store {data.store.root}"
            check_standardise(model, cfg.standardise, where)
            checked[name] = (standardised_on(model, records(), where), retokenize)
        models = {name: model for name, (model, _) in checked.items()}
        if models:
            notes.append(
                "standardise=data: the cell models' genes are standardised by this store's cells (every "
                "record, labels unused), not by their pretraining cells'"
            )

    def records_of(name: str) -> Callable[[], list[dict]]:
        """The records as checkpoint `name` reads them: the store's, or its sequences re-tokenized."""
        if not checked[name][1]:
            return records

        def retokenized() -> list[dict]:
            if name not in cache:
                from biomask.embedding.dna import sequence_encoder

                encode = sequence_encoder(checked[name][0])
                cache[name] = [
                    encode(seq, f"store {data.store.root}, record {i}")
                    for i, seq in enumerate(data.sequences)
                ]
            return cache[name]

        return retokenized

    if cfg.pooling == "concat":
        lengths = {len(r["tokens"]) for r in records()}
        if len(lengths) > 1:
            raise InputError(
                f"pooling concat needs records of one length (fixed-length sequences), but store "
                f"{data.store.root} has {min(lengths)} to {max(lengths)} tokens per record; use pooling=mean"
            )

    n_classes = len(data.label_names)
    spec = cfg.finetune
    methods: list[Method] = []

    def inputs(
        name: str, model: MaskedEncoder, max_length: int, source: Callable[[], list[dict]]
    ) -> dict[str, Any]:
        """How the records meet this model's input (checked, logged and reported)."""
        specials = n_specials(model.config.modality)
        policy = record_policy(model, cfg.long_records)
        lengths = [max_length]
        # a profile model fine-tunes on the whole profile: finetune.max_length is for token models
        whole = reads_whole_profile(model)
        if "finetune" in cfg.protocols and spec.max_length and spec.max_length < max_length and not whole:
            lengths.append(spec.max_length)
        out: dict[str, Any] = {"max_tokens": max_length - specials, "long_records": policy}
        if model.config.modality == "dna":  # which tokens it reads: a report compares tokenizers too
            # a random init reads the store's own tokens
            info = getattr(model, "checkpoint_info", None) or {}
            out["tokenizer"] = tokenizer_label(
                info.get("tokenizer") or data.store.manifest.get("tokenizer") or {}
            )
        if source is not records:
            out["retokenized"] = True  # the store's sequences in this checkpoint's own tokens
        for limit in lengths:
            n_long = check_long_records(
                source(), limit - specials, policy, where=f"store {data.store.root}, model {name}"
            )
            key = "n_long" if limit == max_length else "n_long_finetune"
            out[key] = n_long
            if key == "n_long_finetune":
                out["max_tokens_finetune"] = limit - specials
            out["n_records"] = len(data)
            if n_long:
                most = max(len(r["tokens"]) for r in source())
                out["longest"] = most
                if policy == "window" and key == "n_long":
                    out["windows_max"] = len(window_starts(most, limit - specials))
                log.warning(
                    "%s: %d of %d records are longer than its input of %d tokens (up to %d): long_records=%s%s",
                    name,
                    n_long,
                    len(data),
                    limit - specials,
                    most,
                    policy,
                    f" (up to {len(window_starts(most, limit - specials))} windows, pooled)"
                    if policy == "window"
                    else "",
                )
        return out

    def add(
        name: str,
        model_for_seed: Callable[[int], MaskedEncoder],
        per_seed: bool,
        max_length: int,
        records: Callable[[], list[dict]],
    ) -> None:
        one_length = len({len(r["tokens"]) for r in records()}) <= 1
        candidates = pooling_candidates(cfg.pooling, model_for_seed(0), one_length, name)
        features = Features(cfg, data, records)
        probes = Probes(features, n_classes)
        asked = list(POOLINGS_AUTO) if cfg.pooling == "auto" else cfg.pooling
        if "concat" in asked and "concat" not in candidates and not one_length:
            message = "concat pooling not tried: it needs records of one length, and these have several"
            if message not in notes:
                log.warning("%s", message)
                notes.append(message)
        choice = PoolingChoice(candidates, probes)
        info = {"inputs": inputs(name, model_for_seed(0), max_length, records), "poolings": candidates}
        # a profile model reads the whole profile: finetune.max_length (a CPU shortcut) is for token models
        whole = reads_whole_profile(model_for_seed(0))
        ft_length = max_length if whole else min(max_length, spec.max_length or max_length)
        for protocol in cfg.protocols:
            if protocol == "knn":

                def predict(data, train, val, test, seed):
                    key = seed if per_seed else None
                    pooling, chosen = choice.choose(
                        model_for_seed, key, max_length, data, train, val, test, seed
                    )
                    x = features.of(model_for_seed, key, max_length, pooling)
                    scores = clustering.cluster_scores(x, data.labels, seed, data.batches)
                    # the val split's MCC: what a study may choose among models by (never test)
                    on_val = clustering.knn_predict(x, data.labels, train, val)
                    scores["val_mcc"] = float(matthews_corrcoef(data.labels[val], on_val))
                    return clustering.knn_predict(x, data.labels, train, test), {**scores, **chosen}

            elif protocol in ("linear_probe", "mlp_probe"):

                def predict(data, train, val, test, seed, protocol=protocol):
                    key = seed if per_seed else None
                    pooling, chosen = choice.choose(
                        model_for_seed, key, max_length, data, train, val, test, seed
                    )
                    if protocol == "linear_probe":
                        fit = probes.fit(
                            model_for_seed, key, max_length, data, train, val, test, seed, pooling
                        )
                        return fit.test_predictions, {**chosen, "val_mcc": fit.val_mcc, "C": fit.c}
                    x = features.of(model_for_seed, key, max_length, pooling)
                    with torch_threads(1):
                        pred = mlp_probe(x, data.labels, train, val, test, seed, n_classes=n_classes)
                    return pred, chosen

            elif protocol == "finetune":

                def predict(data, train, val, test, seed):
                    probe = None
                    key = seed if per_seed else None
                    pooling, chosen = choice.choose(
                        model_for_seed, key, max_length, data, train, val, test, seed
                    )
                    if spec.init_head == "probe":  # the probe on the features fine-tuning starts from
                        probe = probes.fit(
                            model_for_seed, key, ft_length, data, train, val, test, seed, pooling
                        )
                    with torch_threads(cfg.num_workers):
                        # every lr (and seed) starts from the same weights: finetune_grid copies them
                        result = finetune_grid(
                            model_for_seed(seed),
                            records(),
                            data.labels,
                            (train, val, test),
                            settings=spec,
                            n_classes=n_classes,
                            seed=seed,
                            max_length=ft_length,
                            pooling=pooling,
                            long_records=cfg.long_records,
                            probe=probe,
                        )
                    return result.test_predictions, {
                        "finetune_source": result.source,
                        "lr": result.lr,
                        "fresh_head": result.fresh_head,
                        "best_epoch": round(result.best_epoch, 2),
                        "start_val_mcc": result.start_val_mcc,
                        "best_val_mcc": result.best_val_mcc,
                        "alpha": result.alpha,
                        "val_mcc": result.val_mcc,
                        "start_val_loss": round(result.start_val_loss, 4),
                        "val_loss": round(result.val_loss, 4),
                        "steps": result.steps,
                        "grid": result.grid,
                        **chosen,
                    }

            else:  # a name in PROTOCOLS without a branch here: refused, never run as another protocol
                raise ValueError(
                    f"protocol {protocol!r} has no method: add its branch to model_methods "
                    "(biomask/evaluation/protocols.py)"
                )
            methods.append(Method(f"{name} ({PROTOCOLS[protocol]})", name, protocol, predict, info))

    for name, model in models.items():
        add(name, lambda seed, model=model: model, False, inference_max_length(model), records_of(name))
    if cfg.select_on_val and len(models) > 1 and "linear_probe" in cfg.protocols:
        methods.append(chosen_on_val([m for m in methods if m.protocol == "linear_probe"]))
    if cfg.random_init and models:
        first = next(iter(models))
        template = models[first]
        others = sorted(n for n, m in models.items() if m.config != template.config)
        if others:
            message = (
                f"{RANDOM_INIT} is {first}'s architecture, untrained; {', '.join(others)} "
                f"{'has' if len(others) == 1 else 'have'} another (compare {RANDOM_INIT} with {first} only)"
            )
            log.warning("%s", message)
            notes.append(message)
        add(
            RANDOM_INIT,
            lambda seed: random_init(template, seed),
            True,
            inference_max_length(template),
            records_of(first),
        )
        # the checkpoints it is like for like with: only these are paired with it (evaluate, report)
        same = [n for n, m in models.items() if m.config == template.config]
        for m in methods:
            if m.group == RANDOM_INIT:
                m.info["architecture_of"] = same
    log.info(
        "evaluate: %d model methods (%s) on %d records",
        len(methods),
        ", ".join(f"{name}: {Path(p).as_posix()}" for name, p in cfg.checkpoints.items()),
        len(data),
    )
    return methods
