"""`biomask evaluate`: every method on the same per-seed splits, baselines in the same table.

For each seed the labelled records are split (resampled, or the store's splits), and every method —
baselines, and each pretrained checkpoint under each protocol, and the same architecture randomly
initialised — is trained on train, selected on val, and scored on test. Outputs: `metrics.json`
(per seed, summaries, paired comparisons), `report.md`, and a confusion matrix per method.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

from biomask.errors import InputError
from biomask.evaluation import baselines, clustering
from biomask.evaluation.config import EvaluateConfig
from biomask.evaluation.data import LabelledRecords, load_labelled, seed_split
from biomask.evaluation.groups import describe_groups
from biomask.evaluation.methods import CHOSEN_ON_VAL, RANDOM_INIT, Method, Predict
from biomask.evaluation.metrics import (
    MACRO_F1_NOTE,
    METRIC_BOUNDS,
    METRICS,
    classification_metrics,
    format_summary,
    md_cell,
    paired_comparison,
    per_class_table,
    signed,
    summarize,
)
from biomask.evaluation.reuse import stage_output
from biomask.outputs import file_slugs
from biomask.provenance import strict_json

log = logging.getLogger(__name__)

# The validation score of a model protocol (the MCC on the seed's val split of the model the protocol
# selected there): what a study may choose among pretrained models by without looking at test.
VAL_METRIC = "val_mcc"
SMALL_VAL = 30  # fewer validation records than this: the choices made on them are said to be noisy

# ------------------------------------------------------------------------------------------- baselines


def _kmer_lr(ks: list[int]) -> Predict:
    def predict(
        data: LabelledRecords, train: np.ndarray, val: np.ndarray, test: np.ndarray, seed: int
    ) -> tuple[np.ndarray, dict]:
        seqs, y = data.sequences, data.labels
        parts = [[seqs[i] for i in idx] for idx in (train, val, test)]
        pred, k = baselines.kmer_lr(*parts, (y[train], y[val], y[test]), ks, seed)
        return pred, {"kmer_k": k}

    return predict


def _onehot_lr(
    data: LabelledRecords, train: np.ndarray, val: np.ndarray, test: np.ndarray, seed: int
) -> np.ndarray:
    x = baselines.one_hot(data.sequences)
    y = data.labels
    return baselines.tuned_logistic(
        baselines.Split(x[train], y[train], x[val], y[val], x[test], y[test]), seed
    )


def _pca_lr(components: int) -> Predict:
    def predict(
        data: LabelledRecords, train: np.ndarray, val: np.ndarray, test: np.ndarray, seed: int
    ) -> np.ndarray:
        x = data.expression
        x_train, x_val, x_test = baselines.pca_features(x[train], [x[val], x[test]], components, seed)
        y = data.labels
        return baselines.tuned_logistic(
            baselines.Split(x_train, y[train], x_val, y[val], x_test, y[test]), seed
        )

    return predict


def _hvg_lr(
    data: LabelledRecords, train: np.ndarray, val: np.ndarray, test: np.ndarray, seed: int
) -> np.ndarray:
    x = data.expression
    scaler = StandardScaler(with_mean=False).fit(x[train])  # sparse stays sparse; scale per gene
    y = data.labels
    parts = [scaler.transform(x[idx]) for idx in (train, val, test)]
    return baselines.tuned_logistic(
        baselines.Split(parts[0], y[train], parts[1], y[val], parts[2], y[test]), seed
    )


def _representation_knn(represent: Callable[[LabelledRecords, int], np.ndarray]) -> Predict:
    """The `knn` protocol on an expression representation: kNN predictions + Leiden scores."""

    def predict(
        data: LabelledRecords, train: np.ndarray, val: np.ndarray, test: np.ndarray, seed: int
    ) -> tuple[np.ndarray, dict]:
        x = represent(data, seed)
        return clustering.knn_predict(x, data.labels, train, test), clustering.cluster_scores(
            x, data.labels, seed, data.batches
        )

    return predict


def _pca_coordinates(components: int) -> Callable[[LabelledRecords, int], np.ndarray]:
    def represent(data: LabelledRecords, seed: int) -> np.ndarray:
        """scanpy's X_pca: PCA of the log-normalised expression of every record (no labels used)."""
        x = data.expression
        n = min(components, x.shape[0] - 1, x.shape[1] - 1)
        solver = "arpack" if sp.issparse(x) else "auto"
        return PCA(n_components=n, svd_solver=solver, random_state=seed).fit_transform(x)

    return represent


def _all_genes(data: LabelledRecords, seed: int) -> np.ndarray:
    """The log-normalised expression of every gene of the store, dense (for the kNN graph)."""
    x = data.expression
    return np.asarray(x.todense()) if sp.issparse(x) else np.asarray(x)


def _expression_methods(cfg: EvaluateConfig, name: str) -> list[Method]:
    """pca_lr / hvg_lr, and with the knn protocol their representations under kNN and Leiden."""
    pca = f"PCA({cfg.baseline.pca_components})"
    methods = [
        Method(f"{pca} + LR", "baseline", name, _pca_lr(cfg.baseline.pca_components))
        if name == "pca_lr"
        else Method("all genes + LR", "baseline", name, _hvg_lr)
    ]
    if "knn" in cfg.protocols:
        if name == "pca_lr":
            methods.append(
                Method(
                    f"{pca} + kNN",
                    "baseline",
                    "pca_knn",
                    _representation_knn(_pca_coordinates(cfg.baseline.pca_components)),
                )
            )
        else:
            methods.append(Method("all genes + kNN", "baseline", "hvg_knn", _representation_knn(_all_genes)))
    return methods


# The data each baseline reads: on another modality's store it is skipped (said in the notes), not
# run into an error halfway. A new baseline names its modality here (a test keeps this in step with
# EvaluateConfig.baselines).
BASELINE_MODALITY = {"kmer_lr": "dna", "onehot_lr": "dna", "pca_lr": "cells", "hvg_lr": "cells"}


def baseline_methods(
    cfg: EvaluateConfig, data: LabelledRecords, notes: list[str] | None = None
) -> list[Method]:
    """The configured baselines; one that cannot run here is skipped with a warning and a note for
    the report (`notes`), so a missing bar is never silent."""
    methods = []
    notes = notes if notes is not None else []

    def skip(message: str) -> None:
        log.warning("%s", message)
        notes.append(message)

    for name in cfg.baselines:
        needs = BASELINE_MODALITY.get(name)
        if needs is not None and data.modality != needs:
            what = "DNA" if needs == "dna" else "expression"
            skip(f"baseline {name} needs {what}; skipped for a {data.modality} store")
        elif name in ("pca_lr", "hvg_lr"):
            methods += _expression_methods(cfg, name)
        elif name == "kmer_lr":
            ks = cfg.baseline.kmer_k if isinstance(cfg.baseline.kmer_k, list) else [cfg.baseline.kmer_k]
            label = f"{ks[0]}-mer" if len(ks) == 1 else "k-mer"  # several k: chosen per seed on val
            methods.append(Method(f"{label} counts + LR", "baseline", name, _kmer_lr(ks)))
        elif name == "onehot_lr":
            lengths = {len(s) for s in data.sequences}
            if len(lengths) != 1:
                skip(
                    f"baseline onehot_lr (one-hot + LR) not run: it needs records of one length, and these "
                    f"have {min(lengths):,}–{max(lengths):,} bases; kmer_lr (k-mer counts + LR) reads records "
                    "of any length"
                )
                continue
            methods.append(Method("one-hot + LR", "baseline", name, _onehot_lr))
        else:  # a name EvaluateConfig.baselines accepts without a branch here: refused, not left out unseen
            raise ValueError(
                f"baseline {name!r} has no method: add its branch to baseline_methods "
                "(biomask/evaluation/evaluate.py)"
            )
    return methods


# ------------------------------------------------------------------------------------------- running


def evaluate(
    cfg: EvaluateConfig, *, overwrite: bool = False, extra_methods: list[Method] | None = None
) -> Path:
    """Run every method on every seed; write metrics.json, report.md and confusion matrices. A Python
    caller's global random streams are given back (fine-tuning and the random-init baseline seed
    torch's, and dropout draws from it)."""
    # torch: not for the report, which reads this module
    from biomask.randomness import callers_streams
    from biomask.training.distributed import torch_linear_kept

    with callers_streams(), torch_linear_kept():  # fine-tuning's ZeRO-3 swaps F.linear
        return _evaluate(cfg, overwrite=overwrite, extra_methods=extra_methods)


def _evaluate(cfg: EvaluateConfig, *, overwrite: bool, extra_methods: list[Method] | None) -> Path:
    data = load_labelled(cfg.store)
    stage = stage_output(cfg)
    if stage.is_current(overwrite=overwrite):
        return Path(cfg.output)
    if cfg.checkpoints:  # a device torch cannot use, said before the baselines run (it was after them)
        from biomask.embedding.inference import pick_device

        pick_device(cfg.device)
        if "finetune" in cfg.protocols:
            from biomask.training.accelerator import accelerator

            accelerator()  # DS_ACCELERATOR=cuda on a CPU node: refused now, not at the first fine-tune
    # every shard's sha256, as pretrain checks (after the reuse check: a rerun hashes nothing): a
    # changed label or token is exit 2, not a result
    data.store.verify()
    # every seed's split first: a grouping that cannot be split is refused before any model loads
    splits = {seed: seed_split(data, cfg.splits, seed) for seed in cfg.seeds}
    notes: list[str] = _split_notes(data, splits, cfg)
    methods = baseline_methods(cfg, data, notes)
    if cfg.checkpoints:
        from biomask.evaluation.protocols import model_methods

        methods += model_methods(cfg, data, notes)
    elif not extra_methods:
        message = (
            "no checkpoints given (checkpoints.NAME=PATH): the baselines only; the protocols and "
            "random_init run on checkpoints"
        )
        log.warning("%s", message)
        notes.append(message)
    methods += extra_methods or []
    groups = {m.group for m in methods}
    for pair in cfg.compare:  # a name the config allows but this run has no rows of (random_init: false)
        absent = [name for name in pair if name not in groups]
        if absent:
            raise InputError(
                f"compare: {absent[0]!r} has no rows in this evaluation (random_init and select_on_val "
                f"add theirs when true); the rows' names: {', '.join(sorted(groups - {'baseline'}))}"
            )
    per_seed: dict[str, list[dict[str, Any]]] = {m.name: [] for m in methods}
    split_sizes = []  # the records each seed's splits actually hold (the report header prints them)
    with baselines.fit_threads(cfg.num_workers):  # the C grids' fits side by side, on num_workers
        for seed in cfg.seeds:
            train, val, test = splits[seed]
            split_sizes.append({"seed": seed, "train": len(train), "val": len(val), "test": len(test)})
            for method in methods:
                log.info("seed %d: %s", seed, method.name)
                out = method.predict(data, train, val, test, seed)
                pred, details = out if isinstance(out, tuple) else (out, {})
                if "val_mcc" not in details and "best_val_mcc" in details:  # fine-tuning's selection score
                    details = {**details, "val_mcc": details["best_val_mcc"]}
                per_seed[method.name].append(
                    {
                        "seed": seed,
                        **classification_metrics(data.labels[test], pred, data.label_names),
                        **details,
                    }
                )
    if cfg.splits.mode == "store" and len(cfg.seeds) > 1:
        message = (
            f"splits.mode=store: all {len(cfg.seeds)} seeds evaluate the store's one split, so a spread over "
            "seeds is only the methods' own randomness (a random init, fine-tuning), not the data's; a "
            "method that is deterministic on a split (a baseline, a checkpoint's probe) scores the same in "
            "every seed, and its paired differences get no interval. splits.mode=resample draws a split per seed"
        )
        log.warning("%s", message)
        notes.append(message)
    smallest_val = min(s["val"] for s in split_sizes)
    if smallest_val < SMALL_VAL:
        message = (
            f"the validation split holds {smallest_val} records in at least one seed: the choices made on it "
            "(C, k, pooling, the fine-tuning step) are noisy; more records, or a larger splits.val, steady them"
        )
        log.warning("%s", message)
        notes.append(message)
    with stage.writing(seeds={f"seed_{i}": s for i, s in enumerate(cfg.seeds)}) as tmp:
        results = _summarise(cfg, methods, per_seed, data)
        results["split_sizes"] = split_sizes
        groups = data.groups(cfg.splits)
        if groups is not None:  # how many records the grouping tied together
            results["split_groups"] = describe_groups(groups)
        results["standardise"] = cfg.standardise
        results["notes"] = notes
        (tmp / "metrics.json").write_text(strict_json(results), encoding="utf-8")
        split_table(data, {seed: splits[seed] for seed in cfg.seeds}).to_csv(tmp / SPLITS_FILE, index=False)
        (tmp / "report.md").write_text(render_report(results, Path(cfg.output).name), encoding="utf-8")
        slugs = file_slugs([m.name for m in methods])  # `R2MAE` and `r2mae` wrote one file
        for method in methods:
            total = np.sum([np.array(r["confusion_matrix"]) for r in per_seed[method.name]], axis=0)
            frame = pd.DataFrame(total, index=data.label_names, columns=data.label_names)
            frame.to_csv(tmp / f"confusion-{slugs[method.name]}.csv")
    log.info("evaluation written to %s", cfg.output)
    return Path(cfg.output)


SPLITS_FILE = "splits.csv.gz"  # which records each seed trained, chose and was tested on


def split_table(data: LabelledRecords, splits: dict[int, tuple]) -> pd.DataFrame:
    """One row per labelled record — where it sits in the store, its id and label — and per seed the
    split it fell in: a user scores their own model on exactly these test records, with no need of
    biomask's code to draw them again."""
    where = pd.DataFrame(data.locations, columns=["store_split", "store_index"])
    ids = np.empty(len(where), dtype=object)
    sources = np.full(len(where), "", dtype=object)  # barcodes repeat across a store's inputs
    for name, rows in where.groupby("store_split").groups.items():
        meta = data.store.split(str(name)).meta()
        index = where.loc[rows, "store_index"].to_numpy()
        ids[rows] = meta["id"].to_numpy()[index] if "id" in meta else [f"{name}:{i}" for i in index]
        if "source" in meta:
            sources[rows] = meta["source"].to_numpy()[index]
    table = where.assign(id=ids)
    if sources.any():
        table["source"] = sources
    table["label"] = np.asarray(data.label_names, dtype=object)[data.labels]
    for seed, parts in splits.items():
        column = np.full(len(table), "", dtype=object)
        for part, members in zip(("train", "val", "test"), parts):
            column[members] = part
        table[f"seed_{seed}"] = column
    return table


def _split_notes(data: LabelledRecords, splits: dict[int, tuple], cfg: EvaluateConfig) -> list[str]:
    """What a reader must know of the splits drawn: seeds that drew the same one (few groups allow few
    splits), and test classes a seed's training split never holds (whole groups held out, or a
    class of one or two records): no method can predict those."""
    notes = []
    drawn: dict[bytes, list[int]] = {}
    for seed, (_, val, test) in splits.items():
        drawn.setdefault(np.sort(test).tobytes() + b"|" + np.sort(val).tobytes(), []).append(seed)
    same = [seeds for seeds in drawn.values() if len(seeds) > 1]
    if same and cfg.splits.mode == "resample":
        listed = "; ".join(", ".join(map(str, seeds)) for seeds in same)
        notes.append(
            f"seeds {listed} drew the same split (splits.group={cfg.splits.group} leaves few distinct ways to "
            "deal whole groups): a spread over those seeds is the methods' own randomness, not the data's"
        )
    names = data.label_names
    for seed, (train, val, test) in splits.items():
        missing = sorted(set(data.labels[test].tolist()) - set(data.labels[train].tolist()))
        if missing:
            shown = ", ".join(str(names[c]) if c < len(names) else str(c) for c in missing)
            notes.append(
                f"seed {seed}: test class(es) {shown} never in its training split, so no method can predict "
                "them (each scores 0 in macro-F1)"
            )
        unseen = np.isin(data.labels[val], data.labels[train], invert=True)
        if unseen.any():
            shown = ", ".join(
                str(names[c]) if c < len(names) else str(c)
                for c in sorted(set(data.labels[val][unseen].tolist()))
            )
            notes.append(
                f"seed {seed}: validation class(es) {shown} ({int(unseen.sum())} of {len(val)} validation records) "
                "never in its training split: what is chosen on validation (C, k, pooling, epochs) is scored "
                "partly on records no method can predict"
            )
    smallest = min((len(train) for train, _, _ in splits.values()), default=0)
    if "knn" in cfg.protocols and smallest < 2 * clustering.N_NEIGHBORS:
        notes.append(
            f"kNN votes among {clustering.N_NEIGHBORS} neighbours, and a training split holds only {smallest} "
            "records: the vote takes in "
            + ("all of them, so every kNN row predicts the largest class for every record" if smallest
               <= clustering.N_NEIGHBORS else "over half of them, so it leans to the largest classes")
            + ": kNN rows (and their differences) say little here; read the probes"
        )  # fmt: skip
    for note in notes:
        log.warning("%s", note)
    return notes


def _summarise(
    cfg: EvaluateConfig, methods: list[Method], per_seed: dict, data: LabelledRecords
) -> dict[str, Any]:
    summary = {
        m.name: {
            metric: summarize([r[metric] for r in per_seed[m.name]], bounds=METRIC_BOUNDS.get(metric))
            for metric in (*METRICS, *clustering.METRICS, *clustering.BATCH_METRICS, VAL_METRIC)
            if per_seed[m.name] and metric in per_seed[m.name][0]
        }
        for m in methods
    }
    comparisons = []
    one_split = cfg.splits.mode == "store"  # every seed evaluates the store's own split
    by_key = {(m.group, m.protocol): m.name for m in methods}
    pairs = [tuple(p) for p in cfg.compare]
    # what pretraining adds, paired on the same splits: every checkpoint of the random init's
    # architecture against it (another architecture's untrained twin is not evaluated)
    like = next((m.info.get("architecture_of") for m in methods if m.group == RANDOM_INIT), None)
    pairs += [
        (m.group, RANDOM_INIT)
        for m in methods
        if m.group not in ("baseline", RANDOM_INIT, CHOSEN_ON_VAL)
        and (RANDOM_INIT, m.protocol) in by_key
        and (like is None or m.group in like)
    ]
    for a, b in dict.fromkeys(pairs):
        for protocol in cfg.protocols:
            if (a, protocol) in by_key and (b, protocol) in by_key:
                comparisons.append(
                    _compare(by_key[(a, protocol)], by_key[(b, protocol)], per_seed, one_split)
                )
    baselines = [m for m in methods if m.group == "baseline"]
    strongest = max(baselines, key=lambda m: summary[m.name]["mcc"]["mean"], default=None)
    # a kNN row against the strongest baseline under kNN (the same classifier on another
    # representation): against a logistic regression its difference would be the classifiers' too
    strongest_knn = max(
        (m for m in baselines if m.protocol.endswith("_knn")),
        key=lambda m: summary[m.name]["mcc"]["mean"],
        default=None,
    )
    if strongest is not None:
        for m in methods:
            if m.group != "baseline":
                b = strongest_knn if m.protocol == "knn" and strongest_knn is not None else strongest
                comparisons.append(_compare(m.name, b.name, per_seed, one_split))
    return {
        "store": cfg.store,
        "label_names": data.label_names,
        "seeds": cfg.seeds,
        "splits": cfg.splits.model_dump(),
        # DNA records longer than a model's input: how they were embedded and fine-tuned
        "long_records": cfg.long_records,
        "kmer_k": cfg.baseline.kmer_k,
        "finetune": cfg.finetune.model_dump() if "finetune" in cfg.protocols else None,
        "methods": [{"name": m.name, "group": m.group, "protocol": m.protocol, **m.info} for m in methods],
        "summary": summary,
        "per_seed": per_seed,
        "comparisons": comparisons,
        "strongest_baseline": strongest.name if strongest else None,
        # the baseline kNN rows are paired with (none: no kNN baseline ran)
        "strongest_knn_baseline": strongest_knn.name if strongest_knn else None,
        "protocol_settings": protocol_settings(),
    }


def protocol_settings() -> dict[str, Any]:
    """The fixed settings of the probes and clustering, recorded with the scores: what a methods
    section states, from the constants the code uses (no config key sets them)."""
    from biomask.evaluation import baselines, clustering

    return {
        "linear_probe": {
            "model": "sklearn LogisticRegression (lbfgs, max_iter 3000), features standardised on the training split",
            "C_grid": list(baselines.C_GRID),
            "C_chosen_by": "validation MCC (ties: the stronger regularisation)",
        },
        "knn": {"k": clustering.N_NEIGHBORS, "space": "the representation, Euclidean"},
        "leiden": {
            "graph": f"scanpy neighbors, {clustering.N_NEIGHBORS} neighbours, every labelled record",
            "flavor": clustering.LEIDEN_FLAVOR,
            "n_iterations": clustering.LEIDEN_ITERATIONS,
            "resolution": clustering.RESOLUTION,
            "best_resolution_grid": list(clustering.RESOLUTIONS),
            "best_resolution_by": clustering.BEST_BY,
            "random_state": "the evaluation seed",
        },
    }


def _compare(a: str, b: str, per_seed: dict, one_split: bool = False) -> dict[str, Any]:
    """a against b over the seeds. `one_split` (splits.mode store: every seed evaluates the same split):
    a difference that is the same in every seed is one observation repeated, not n agreeing ones — it
    gets no interval and no test (n 1), where n copies would give a zero-width interval and p = 0."""

    def compare(metric: str) -> dict[str, float]:
        x, y = ([r[metric] for r in per_seed[name]] for name in (a, b))
        if one_split and len({round(u - v, 12) for u, v in zip(x, y)}) == 1:
            return {**paired_comparison(x[:1], y[:1]), "one_split": True}
        return paired_comparison(x, y)

    return {"a": a, "b": b, **{metric: compare(metric) for metric in METRICS}}


def _details(results: dict[str, Any]) -> list[str]:
    """Per-seed choices made on validation (k-mer k; fine-tuning lr, best epoch, probe kept)."""
    lines: list[str] = []
    for m in results["methods"]:
        rows = results["per_seed"][m["name"]]
        if rows and "kmer_k" in rows[0]:
            lines.append(
                f"- {m['name']}: k chosen on val per seed: " + ", ".join(str(r["kmer_k"]) for r in rows)
            )
        elif rows and "finetune_source" in rows[0]:
            kept = sum(r["finetune_source"] == "probe" for r in rows)
            seeds = "; ".join(
                f"seed {r['seed']}: "
                + (
                    "probe kept"
                    if r["finetune_source"] == "probe"
                    else f"lr {r['lr']:g}{' (fresh head)' if r.get('fresh_head') else ''}, epoch {r['best_epoch']:g}"
                    + (f", mixed with the probe at α {r['alpha']:g}" if 0 < r.get("alpha", 1.0) < 1 else "")
                )
                + f" (val MCC {r['start_val_mcc']:.3f} -> {r.get('val_mcc', r['best_val_mcc']):.3f}"
                + (
                    f", log-loss {r['start_val_loss']:.3f} -> {r['val_loss']:.3f})"
                    if "val_loss" in r
                    else ")"
                )
                for r in rows
            )
            note = (
                f" — fine-tuning did not beat the probe on val (beyond its noise: finetune.min_gain_se) in {kept} of {len(rows)} seeds, where the row reports the probe's predictions"
                if kept
                else ""
            )
            lines.append(f"- {m['name']}: {seeds}{note}")
        # choices among candidates by validation MCC: (what, the row's choice key, its scores key)
        for what, chosen, scores in (
            ("checkpoint", "chosen", "chosen_val_mcc"),  # select_on_val: the checkpoint each seed used
            ("pooling", "pooling", "pooling_val_mcc"),  # pooling auto / a list
        ):
            if rows and scores in rows[0]:
                per_seed = "; ".join(
                    f"{r[chosen]} (" + ", ".join(f"{c} {v:.3f}" for c, v in r[scores].items()) + ")"
                    for r in rows
                )
                lines.append(f"- {m['name']}: {what} per seed: {per_seed}")
    if lines:
        lines = ["", "Chosen on the validation split (per seed):", "", *lines]
    return lines


def splits_text(results: dict[str, Any]) -> str:
    """The splits as evaluated: the store's own with their sizes, or the resample's fractions and sizes."""
    spec, sizes = results["splits"], results.get("split_sizes")
    if not sizes:  # metrics.json written before split sizes were recorded
        return f"{spec['mode']} (val {spec['val']}, test {spec['test']})"

    def span(key: str) -> str:
        values = [s[key] for s in sizes]
        return f"{min(values):,}" if min(values) == max(values) else f"{min(values):,}–{max(values):,}"

    counts = f"train {span('train')}, val {span('val')}, test {span('test')} records"
    if spec["mode"] == "store":
        return f"the store's own ({counts})"
    grouped = results.get("split_groups")
    if spec.get("group", "none") != "none" and grouped:
        kept = (
            f"records sharing {spec['min_shared']} bases (either strand) kept on one side"
            if spec["group"] == "shared_sequence"
            else "each batch kept on one side"
        )
        return (
            f"resampled per seed in whole groups, the best label balance of a few random deals — {kept}: "
            f"{grouped['groups']:,} groups, the largest {grouped['largest']:,} records, "
            f"{grouped['records_grouped']:,} records not alone (val {spec['val']}, test {spec['test']}: {counts})"
        )
    return f"resampled per seed, stratified (val {spec['val']}, test {spec['test']}: {counts})"


_POLICY_TEXT = {
    "window": "embedded in windows of the model's length, their vectors pooled (averaged, or concatenated "
    "in order under concat pooling)",
    "centre": "cut to the model's length around their centre",
    "first": "cut to the model's length from their start",
}


def _long_records_lines(results: dict[str, Any]) -> list[str]:
    """Whether any record was longer than a model's input, and what was done with it: a window
    policy that applied to every record reads differently from one that never applied."""
    policy = results.get("long_records", "first")
    seen, lines = set(), []
    for m in results["methods"]:
        inputs = m.get("inputs") or {}
        if m["group"] in seen or not (inputs.get("n_long") or inputs.get("n_long_finetune")):
            continue
        seen.add(m["group"])
        how = _POLICY_TEXT.get(inputs.get("long_records", policy), inputs.get("long_records", policy))
        total = f"{inputs['n_records']:,}" if isinstance(inputs.get("n_records"), int) else "?"
        for count, width, what, windows in (
            ("n_long", "max_tokens", "its input", inputs.get("windows_max")),
            ("n_long_finetune", "max_tokens_finetune", "its fine-tuning input (finetune.max_length)", None),
        ):
            if inputs.get(count):
                lines.append(
                    f"- {m['group']}: {inputs[count]:,} of {total} records are longer "
                    f"than {what} of {inputs.get(width, '?')} tokens: {how}"
                    + (f", up to {windows} per record" if windows else "")
                    + f" (long_records={inputs.get('long_records', policy)})."
                )
    if lines:
        whole = list(
            dict.fromkeys(m["group"] for m in results["methods"] if "inputs" in m and m["group"] not in seen)
        )
        if whole:
            lines.append(f"- {', '.join(whole)}: every record fits; long_records={policy} did not apply.")
        return [
            "",
            "Records longer than a model's input (the baselines read every record whole):",
            "",
            *lines,
            "",
        ]
    if any("inputs" in m for m in results["methods"]):
        return [f"No record is longer than any model's input: long_records={policy} did not apply."]
    return []


def _tokenizer_lines(results: dict[str, Any]) -> list[str]:
    """Which tokens each DNA checkpoint reads, where they differ among checkpoints or from the store's
    (a row chosen on validation may pick a tokenizer as much as a checkpoint)."""
    read: dict[str, tuple[str, bool]] = {}
    for m in results["methods"]:
        inputs = m.get("inputs") or {}
        if "tokenizer" in inputs:
            read.setdefault(m["group"], (inputs["tokenizer"], bool(inputs.get("retokenized"))))
    if not read or (len({t for t, _ in read.values()}) == 1 and not any(r for _, r in read.values())):
        return []
    parts = [
        f"{g}: {t}" + (" (the store's sequences re-tokenized)" if r else "") for g, (t, r) in read.items()
    ]
    return ["", f"Tokenizers the checkpoints read: {'; '.join(parts)}.", ""]


def _metric_rows(results: dict[str, Any], methods: list[dict], metrics: tuple[str, ...]) -> list[str]:
    """One table row per method: its summary of each metric (blank where it has none)."""
    rows = []
    for m in methods:
        s = results["summary"][m["name"]]
        rows.append(
            f"| {md_cell(m['name'])} | "
            + " | ".join(format_summary(s[k]) if k in s else "" for k in metrics)
            + " |"
        )
    return rows


def render_report(results: dict[str, Any], name: str | None = None) -> str:
    """The Markdown table: one row per method, mean ± sd [95 % CI] over seeds. `name`: the output's
    (two evaluations of one store had one heading)."""
    seeds = results["seeds"]
    lines = [
        f"# Evaluation {name}: {Path(results['store']).name}"
        if name
        else f"# Evaluation: {results['store']}",
        "",
        *([f"Store: `{results['store']}`.", ""] if name else []),
        f"{len(seeds)} evaluation seeds ({', '.join(map(str, seeds))}: one resampled split each, unless the "
        f"splits are the store's own); splits: {splits_text(results)}. Values: mean ± sd [95 % CI] over them.",
        MACRO_F1_NOTE,
        *_long_records_lines(results),
        *_tokenizer_lines(results),
        *(["", "**Notes:**", *(f"- {n}" for n in results.get("notes", []))] if results.get("notes") else []),
        "",
        "| method | protocol | accuracy | macro-F1 | MCC |",
        "|---|---|---|---|---|",
    ]
    for m in results["methods"]:
        s = results["summary"][m["name"]]
        cells = " | ".join(format_summary(s[metric]) for metric in METRICS)
        lines.append(f"| {md_cell(m['name'])} | {m['protocol']} | {cells} |")
    lines += _details(results)
    clustered = [m for m in results["methods"] if "cluster_ari" in results["summary"][m["name"]]]
    if clustered:
        lines += [
            "",
            "## Leiden clusters of each representation against the labels (knn protocol)",
            "",
            f"`sc.pp.neighbors` (k = {clustering.N_NEIGHBORS}) + `sc.tl.leiden` (resolution "
            f"{clustering.RESOLUTION:g}) on every labelled record; the labels are not used to cluster. "
            f"Best resolution: scIB's protocol, Leiden at resolutions {clustering.RESOLUTIONS[0]:g}, "
            f"{clustering.RESOLUTIONS[1]:g}, …, {clustering.RESOLUTIONS[-1]:g} on the same graph, the "
            "one with the highest NMI kept, the lowest of equals (the labels choose the resolution, for "
            "every representation alike). Every record is clustered in "
            "every seed, so an interval here is over Leiden's random seed only, not over data (the spread "
            "over pretraining seeds is in the study report).",
            "",
            "| representation | ARI | NMI | ARI, best resolution | NMI, best resolution |",
            "|---|---|---|---|---|",
        ]
        lines += _metric_rows(results, clustered, clustering.METRICS)
    mixed = [m for m in clustered if "batch_mixing" in results["summary"][m["name"]]]
    if mixed:
        lines += [
            "",
            "## Batches (the store's batch_column; knn protocol)",
            "",
            f"Mixing: the other batches' share of each record's {clustering.N_NEIGHBORS} nearest neighbours, "
            "over the records whose label several batches have, divided by that share if batches were "
            "mixed at random within each label (1: mixed; 0: apart). Cross-batch accuracy: each such "
            f"record's label from a {clustering.N_NEIGHBORS}-nearest-neighbour vote among the other "
            "batches' records only. Higher mixing with the accuracy and ARI kept is what batch correction "
            "should give; batches that differ in make-up or labelling are not expected to reach 1.",
            "",
            "| representation | batch mixing | cross-batch accuracy |",
            "|---|---|---|",
        ]
        lines += _metric_rows(results, mixed, clustering.BATCH_METRICS)
    lines += per_class_table(results)
    if results["comparisons"]:
        lines += [
            "",
            "## Paired comparisons (same splits per seed)",
            "",
            "| a | b | Δ MCC [95 % CI] | p (paired t) | a wins |",
            "|---|---|---|---|---|",
        ]
        for c in results["comparisons"]:
            m = c["mcc"]
            if m.get("one_split"):  # the same difference in every seed, on the one split they share
                interval, p = "(one split, the same in every seed: no interval)", "–"
            elif m["n"] < 2:  # one seed: a difference, no interval or test
                interval, p = "(one seed: no interval)", "–"
            else:
                interval, p = f"[{signed(m['ci_low'])}, {signed(m['ci_high'])}]", f"{m['p_value']:.3g}"
            lines.append(
                f"| {md_cell(c['a'])} | {md_cell(c['b'])} | {signed(m['mean_difference'])} {interval} | {p} | {m['wins']}/{m['n']} |"
            )
    return "\n".join(lines) + "\n"
