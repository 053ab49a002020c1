"""Reading what the study's stages left behind: pretraining runs, evaluations, stage provenance."""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from biomask.cells.tokenize import complete_profile
from biomask.config import load_recorded_yaml
from biomask.errors import InputError
from biomask.evaluation import clustering
from biomask.evaluation.evaluate import VAL_METRIC
from biomask.evaluation.metrics import METRIC_BOUNDS, METRICS, summarize
from biomask.masking.config import describe_masking
from biomask.outputs import changed_outputs
from biomask.provenance import read_run_info
from biomask.relocation import where_now
from biomask.stage import CONFIG_SHA256

log = logging.getLogger(__name__)


def is_fixed_ratio(masking: dict[str, Any]) -> bool:
    return masking.get("ratio", {}).get("kind") == "fixed"


@dataclass
class PretrainRun:
    """One finished pretraining run: its masking, its logged curves and its final held-out losses."""

    path: Path
    name: str
    config: dict[str, Any]
    info: dict[str, Any]
    train: pd.DataFrame
    evals: pd.DataFrame
    step_ratios: np.ndarray
    final_eval: dict[str, Any]
    # a ratio drawn per record: its records counted by realised ratio (bins of 1/40); None otherwise
    record_ratio_counts: np.ndarray | None = None

    @property
    def masking(self) -> dict[str, Any]:
        return self.config.get("masking", {})

    @property
    def loss_unit(self) -> str:
        """What its held-out loss is in: models of values with the MSE (the default; run.json files
        before the count likelihoods have no `loss`) give MSE units, standardised for the panel
        profiles; token models (cross-entropy) and count likelihoods give nats."""
        arch = self.info.get("architecture") or {}
        if arch.get("target") != "values" or arch.get("loss", "mse") != "mse":
            return "nats"
        return "standardised-MSE units" if complete_profile(arch.get("scheme")) else "MSE units"

    @property
    def label(self) -> str:
        masking = describe_masking(self.masking)
        return self.name if masking in self.name else f"{self.name} — {masking}"  # a sweep's names carry it

    @property
    def references(self) -> dict[str, dict[str, Any]]:
        """The reference predictors' held-out losses on the model's masked tokens, by readable name:
        {name: {"loss": {ratio: nats}, "mean_loss": ...}} (runs from before `references` existed:
        the profile model's gene mean)."""
        found = self.final_eval.get("references")
        if found is None and "mean_reference_loss" in self.final_eval:
            found = {
                "gene mean": {
                    "loss": self.final_eval.get("reference_loss", {}),
                    "mean_loss": self.final_eval["mean_reference_loss"],
                }
            }
        tables = self.final_eval.get("reference_tables", {})
        names = {
            "frequency": f"{tables.get('field', 'token').rstrip('s')} frequencies",
            "context": f"±{tables.get('k')} context",
        }
        return {names.get(k, k): v for k, v in (found or {}).items()}


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = load_recorded_yaml(path.read_text(encoding="utf-8"), str(path)) or {}
    except FileNotFoundError:
        raise InputError(f"{path} is missing: is {path.parent} a finished biomask stage output?") from None
    except yaml.YAMLError as exc:
        raise _corrupt(path, exc, "the stage that wrote it") from None
    if not isinstance(data, dict):
        raise _corrupt(path, TypeError("not a mapping"), "the stage that wrote it")
    return data


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} where a number belongs (biomask writes strict JSON)")


class _NaN:
    """A NaN read from an evaluation's metrics.json, until `_old_nans` says where it stands."""


def _nan_or_refuse(name: str) -> Any:
    return _NaN() if name == "NaN" else _refuse_constant(name)


# evaluate wrote NaN (not null) for the spread of one seed's summary until 2026-12-05: read as null
_ONE_SEED_SPREAD = ("sd", "ci_low", "ci_high")


def _old_nans(value: Any, path: tuple[str, ...] = ()) -> Any:
    """`value` with the NaNs an older evaluate wrote for one seed's spread (summary → method → metric
    → sd / ci_low / ci_high) read as null; a NaN anywhere else is refused as before (a figure the
    report would draw)."""
    if isinstance(value, _NaN):
        if len(path) == 4 and path[0] == "summary" and path[3] in _ONE_SEED_SPREAD:
            return None
        raise ValueError(
            f"NaN where a number belongs ({'.'.join(path) or 'top level'}; biomask writes strict JSON)"
        )
    if isinstance(value, list):
        return [_old_nans(item, (*path, str(i))) for i, item in enumerate(value)]
    if isinstance(value, dict):
        return {key: _old_nans(item, (*path, str(key))) for key, item in value.items()}
    return value


def _numbers(where: str, values: dict[str, Any], keys: Any) -> None:
    """Every value of `keys` present in `values` is a finite number (or null): a report reads them as
    figures, and a string or NaN there failed deep in its tables with a traceback."""
    for key in keys:
        value = values.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise TypeError(f"{where}{key} is {value!r}, not a number")


_SUMMARY_NUMBERS = ("mean", "sd", "ci_low", "ci_high", "n")
_ROW_NUMBERS = ("accuracy", "macro_f1", "mcc", "ari", "nmi")


def _check_evaluation_numbers(results: dict[str, Any]) -> None:
    for method, metrics in results["summary"].items():
        for metric, stats in metrics.items():
            if isinstance(stats, dict):
                _numbers(f"summary[{method!r}][{metric!r}].", stats, _SUMMARY_NUMBERS)
    for method, rows in results["per_seed"].items():
        for i, row in enumerate(rows):
            _numbers(f"per_seed[{method!r}][{i}].", row, _ROW_NUMBERS)


def _corrupt(path: Path, exc: Exception, stage: str) -> InputError:
    return InputError(
        f"{path} is corrupt or not biomask's ({type(exc).__name__}: {exc}); run `biomask {stage}` again"
    )


def _unchanged(root: Path, info: dict[str, Any] | None, names: list[str], stage: str) -> None:
    """What the report reads from an output matches the sha256 its run.json records (outputs
    written since 2026-12-06 record them): an edited figure is never reported as biomask's."""
    changed = changed_outputs(root, info, names)
    if changed:
        raise InputError(
            f"{root / changed[0]} changed since biomask {stage} wrote it (its sha256 differs from the one "
            f"{root / 'run.json'} records); run `biomask {stage}` again, or restore the file"
        )


def load_pretrain_run(path: Path, name: str | None = None) -> PretrainRun:
    info = read_run_info(path)
    if info is None or info.get("stage") != "pretrain":
        raise InputError(f"{path} is not a finished pretraining run (no run.json of stage pretrain)")
    _unchanged(path, info, ["config.yaml", "metrics.jsonl"], "pretrain")
    config = _read_yaml(path / "config.yaml")
    metrics = path / "metrics.jsonl"
    try:
        lines = [
            json.loads(x, parse_constant=_refuse_constant)
            for x in metrics.read_text(encoding="utf-8").splitlines()
            if x.strip()
        ]
        for i, x in enumerate(lines, 1):  # eval lines: a loss per ratio of the grid
            _numbers(f"line {i}: ", x, ("step", "mean_loss") if x["kind"] == "eval" else ("step", "loss"))
            if x["kind"] == "eval":
                _numbers(f"line {i}: loss ", x["loss"], list(x["loss"]))
        train = pd.DataFrame([x for x in lines if x["kind"] == "train"])
        evals = pd.DataFrame(
            [
                {
                    "step": x["step"],
                    "mean_loss": x["mean_loss"],
                    **{f"loss@{k}": v for k, v in x["loss"].items()},
                }
                for x in lines
                if x["kind"] == "eval"
            ]
        )
    except FileNotFoundError:
        raise InputError(f"{metrics} is missing: is {path} a finished pretraining run?") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise _corrupt(metrics, exc, "pretrain") from None
    ratios = np.array(
        [r for x in lines if x["kind"] == "train" for r in x.get("step_ratios", [])], dtype=float
    )
    per_record = [
        x["record_ratio_counts"] for x in lines if x["kind"] == "train" and "record_ratio_counts" in x
    ]
    try:
        record_counts = np.sum(np.asarray(per_record, dtype=float), axis=0) if per_record else None
    except ValueError as exc:  # rows of different lengths
        raise _corrupt(metrics, exc, "pretrain") from None
    final_eval = info.get("final_eval") or {}
    try:
        _numbers("final_eval.", final_eval, ("mean_loss", "mean_reference_loss"))
    except (TypeError, AttributeError) as exc:
        raise _corrupt(path / "run.json", exc, "pretrain") from None
    return PretrainRun(
        path=path,
        name=name or config.get("masking", {}).get("scheme", path.name),
        config=config,
        info=info,
        train=train,
        evals=evals,
        step_ratios=ratios,
        final_eval=final_eval,
        record_ratio_counts=record_counts,
    )


def find_pretrain_runs(paths: list[str]) -> list[PretrainRun]:
    """Every finished run in the given directories (a run directory, or a sweep's parent directory)."""
    found: list[Path] = []
    for entry in paths:
        path = Path(entry)
        if (path / "run.json").is_file():
            found.append(path)
        elif (path / "in_progress.json").is_file():
            raise InputError(
                f"pretraining output {path} is an unfinished run (in_progress.json, no run.json): run its "
                "command again to finish it, or leave it out of the report"
            )
        elif path.is_dir():
            # hidden folders are biomask's own (a run --overwrite is replacing), never a sweep's run
            runs = [p for p in sorted(path.iterdir()) if p.is_dir() and not p.name.startswith(".")]
            unfinished = [
                p.name for p in runs if (p / "in_progress.json").is_file() and not (p / "run.json").is_file()
            ]
            if unfinished:
                log.warning(
                    "%s: %d unfinished run(s) left out of the report (%s): run their commands again to finish them",
                    path,
                    len(unfinished),
                    ", ".join(unfinished[:5]),
                )
            found += [p for p in runs if (p / "run.json").is_file()]
        else:
            raise InputError(f"pretraining output {path} does not exist")
    runs = [load_pretrain_run(p) for p in found]
    # several runs of one scheme (a ratio-range sweep, several seeds, model ablations): name them by
    # what differs — the ratio, the seed, and any model key that is not the same across the group
    original = {id(r): r.name for r in runs}
    for run in runs:
        group = [r for r in runs if original[id(r)] == original[id(run)]]
        if len(group) > 1:
            seed = run.config.get("train", {}).get("seed")
            varied = sorted(
                key
                for key in {k for r in group for k in r.config.get("model", {})}
                if len({repr(r.config.get("model", {}).get(key)) for r in group}) > 1
            )
            model = run.config.get("model", {})
            extra = "".join(f", model.{k}={short_value(model.get(k))}" for k in varied)
            run.name = f"{run.name} {describe_masking(run.masking)} seed {seed}{extra}"
    return runs


def short_value(value: Any) -> str:
    """A config value in a run's name: booleans as YAML writes them, paths by their last parts."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str) and "/" in value:
        return "/".join(Path(value).parts[-2:])
    return str(value)


@dataclass
class Evaluation:
    """An evaluate stage's results, with the masking of each pretrained checkpoint it scored."""

    key: str
    path: Path
    metric: str
    title: str
    results: dict[str, Any]
    checkpoints: dict[str, str]
    masking: dict[str, dict[str, Any]] = field(default_factory=dict)
    # each checkpoint's (and scheme's, for `scheme@seed` names) architecture from its config.json: an
    # ablation's models (model.mask_indicator=false) share a masking with the default's but not this
    architecture: dict[str, dict[str, Any]] = field(default_factory=dict)

    def methods(self, protocol: str | None = None, group: str | None = None) -> list[dict[str, Any]]:
        return [
            m
            for m in self.results["methods"]
            if (protocol is None or m["protocol"] == protocol) and (group is None or m["group"] == group)
        ]

    def scores(self, method: str, metric: str | None = None) -> list[float]:
        return [r[metric or self.metric] for r in self.results["per_seed"][method]]

    def mean(self, method: str, metric: str | None = None) -> float:
        return float(self.results["summary"][method][metric or self.metric]["mean"])


def load_evaluation(key: str, path: str, metric: str, title: str | None) -> Evaluation:
    root = Path(path)
    _unchanged(root, read_run_info(root), ["config.yaml", "metrics.json"], "evaluate")
    try:
        results = _old_nans(
            json.loads((root / "metrics.json").read_text(encoding="utf-8"), parse_constant=_nan_or_refuse)
        )
        missing = [k for k in ("methods", "per_seed", "summary", "seeds") if k not in results]
        if missing:
            raise KeyError(", ".join(missing))
        _check_evaluation_numbers(results)
    except FileNotFoundError:
        raise InputError(
            f"evaluation {key!r}: {root} has no metrics.json; run `biomask evaluate` first"
        ) from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise _corrupt(root / "metrics.json", exc, "evaluate") from None
    config = _read_yaml(root / "config.yaml")
    checkpoints = dict(config.get("checkpoints") or {})
    read = {  # the sha256 of each checkpoint's config.json as the evaluation read it
        i.get("name"): i.get(CONFIG_SHA256)
        for i in (read_run_info(root) or {}).get("inputs", [])
        if isinstance(i, dict)
    }
    masking, architecture = {}, {}
    for name, ckpt in checkpoints.items():
        saved = _checkpoint_config(key, name, where_now(root, ckpt), read.get(name))
        masking[name] = saved.get("masking", {})
        architecture[name] = saved.get("architecture", {})
        scheme, mark, _ = name.rpartition(SEED_MARK)
        if mark and scheme:
            architecture.setdefault(scheme, architecture[name])
    try:
        results, masking = by_pretraining_seed(_with_pooling_counts(results), masking)
    except (KeyError, TypeError, ValueError, StopIteration) as exc:  # parts that do not fit together
        raise _corrupt(root / "metrics.json", exc, "evaluate") from None
    return Evaluation(key, root, metric, title or key, results, checkpoints, masking, architecture)


def _checkpoint_config(key: str, name: str, path: str, sha256: str | None) -> dict[str, Any]:
    """The config.json of an evaluation's checkpoint, if it is the one the evaluation read (`sha256`,
    its run.json's; None: not recorded); else {} and a warning — its masking unknown, the verdicts
    cannot name what it was trained with, and another checkpoint's must not stand in for it."""
    try:
        text = (Path(path) / "config.json").read_bytes()
        saved = json.loads(text.decode("utf-8"))
    except (OSError, ValueError):
        log.warning(
            "evaluation %r: checkpoint %s (%s) has no readable config.json; its masking is not "
            "reported (moved since? run the report from its pipeline, or set BIOMASK_RUN_DIR)",
            key,
            name,
            path,
        )
        return {}
    if sha256 and hashlib.sha256(text).hexdigest() != sha256:
        log.warning(
            "evaluation %r: checkpoint %s (%s): its config.json is not the one the evaluation read "
            "(sha256 differs: another checkpoint at that path now); its masking is not reported",
            key,
            name,
            path,
        )
        return {}
    return saved if isinstance(saved, dict) else {}


def _with_pooling_counts(results: dict[str, Any]) -> dict[str, Any]:
    """Each method annotated with how often each pooling was chosen on val over its evaluation
    splits ({"mean_layers": 3}), where it chose among several: the study report prints them."""
    methods = []
    for m in results["methods"]:
        rows = results["per_seed"].get(m["name"], [])
        counts = Counter(r["pooling"] for r in rows if "pooling" in r)
        methods.append({**m, "pooling_counts": dict(counts)} if len(m.get("poolings") or []) > 1 else m)
    return {**results, "methods": methods}


SEED_MARK = "@"  # checkpoint names `scheme@seed`: one scheme pretrained with several seeds


def by_pretraining_seed(
    results: dict[str, Any], masking: dict[str, dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Results whose unit is the pretraining seed, when checkpoints are named `scheme@seed`.

    A verdict about a masking scheme must cover the variance of pretraining, not only of the probe's
    splits. Each `scheme@seed` checkpoint's score is first averaged over the evaluation splits (the
    same splits for every method); the scheme then gets one row per protocol whose per-seed values
    are those averages, one per pretraining seed. Methods without a pretraining seed (baselines, the
    random init) enter comparisons as their mean over the same splits, so a paired comparison's
    interval is over pretraining seeds. Their own rows keep their summary over splits. Without `@`
    names the results are returned unchanged (the unit stays the split)."""
    groups: dict[str, dict[str, str]] = {}  # scheme -> {seed: checkpoint name}
    for m in results["methods"]:
        scheme, mark, seed = m["group"].rpartition(SEED_MARK)
        if mark and scheme:
            groups.setdefault(scheme, {})[seed] = m["group"]
    if not groups:
        return results, masking
    n = min(len(seeds) for seeds in groups.values())
    metrics = (*METRICS, *clustering.METRICS, VAL_METRIC)
    used: list[str] = []

    def split_mean(name: str) -> dict[str, float]:
        rows = results["per_seed"][name]
        return {k: float(np.mean([r[k] for r in rows])) for k in metrics if rows and k in rows[0]}

    methods, per_seed, summary = [], {}, {}
    done: set[tuple[str, str]] = set()
    for m in results["methods"]:
        scheme, mark, _ = m["group"].rpartition(SEED_MARK)
        if mark and scheme in groups:
            if (scheme, m["protocol"]) in done:
                continue
            done.add((scheme, m["protocol"]))
            seeds = sorted(groups[scheme], key=lambda v: (len(v), v))[:n]
            used = used or seeds
            names = [next(x["name"] for x in results["methods"] if x["group"] == groups[scheme][seed]
                          and x["protocol"] == m["protocol"]) for seed in seeds]  # fmt: skip
            name = f"{scheme} ({len(seeds)} pretraining seeds, {m['protocol']})"
            per_seed[name] = [{"pretraining_seed": seed, **split_mean(x)} for seed, x in zip(seeds, names)]
            summary[name] = {
                # cut to the metric's range, as evaluate's own summaries are (2 seeds: t with 1 df)
                k: summarize([r[k] for r in per_seed[name]], bounds=METRIC_BOUNDS.get(k))
                for k in metrics
                if k in per_seed[name][0]
            }
            counts: Counter[str] = Counter()
            for x in results["methods"]:
                if x["name"] in names:
                    counts.update(x.get("pooling_counts") or {})
            methods.append(
                {"name": name, "group": scheme, "protocol": m["protocol"], "members": names}
                | ({"pooling_counts": dict(counts)} if counts else {})
            )
            masking.setdefault(scheme, masking.get(groups[scheme][seeds[0]], {}))
        else:
            per_seed[m["name"]] = [split_mean(m["name"])] * n
            summary[m["name"]] = results["summary"][m["name"]]
            methods.append(m)
    if (results.get("splits") or {}).get("mode") == "store":
        # every evaluation seed read the store's one split: the interval is over pretraining seeds on
        # those test records, not over test sets
        unit = (
            f"{n} pretraining seeds ({', '.join(used)}; one split, the store's own, in every evaluation "
            "seed: the interval is over pretraining seeds on these test records, not over test sets)"
        )
    else:
        unit = (
            f"{n} pretraining seeds ({', '.join(used)}; each the mean over {len(results['seeds'])} evaluation "
            f"splits {', '.join(map(str, results['seeds']))})"
        )
    # each evaluation split's own scores, kept: a comparison with a method that has no pretraining
    # seeds is over seeds on fixed splits, and its split-by-split differences show what that hides
    split_scores = results["per_seed"]
    return {
        **results,
        "methods": methods,
        "per_seed": per_seed,
        "summary": summary,
        "unit": unit,
        "split_scores": split_scores,
    }, masking


@dataclass
class StageRecord:
    """What the report lists for reproducibility: a stage output, its config and checksums."""

    path: Path
    stage: str
    fingerprint: str
    code: dict[str, Any]
    inputs: list[dict[str, Any]]
    seeds: dict[str, Any]
    config_text: str


def stage_record(path: Path) -> StageRecord | None:
    info = read_run_info(path)
    if info is None:
        return None
    config = path / "config.yaml"
    return StageRecord(
        path=path,
        stage=info.get("stage", "?"),
        fingerprint=info.get("fingerprint", ""),
        code=info.get("code", {}),
        inputs=info.get("inputs", []),
        seeds=info.get("seeds", {}),
        config_text=config.read_text(encoding="utf-8") if config.exists() else "",
    )
