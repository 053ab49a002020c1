"""`biomask report`: the study's results in one Markdown file with figures.

What it shows, and how it decides what to say:
- per task, every method (baselines included) as mean ± sd [95 % CI] over seeds;
- R²MAE against the **best fixed ratio** (the fixed-ratio checkpoint with the highest mean
  *validation* MCC on that task and protocol — never the test metric; the test metric only for old
  evaluations without validation scores, and then the report says so), against the other schedules
  (the dynamic one) and against the random init, paired over pretraining seeds when checkpoints are
  named `scheme@seed`; the verdict is "better" or "worse" only when the paired 95 % CI excludes zero,
  and each names its seeds, its interval and its minimal detectable difference;
- the targets (a pretrained model at least the strongest baseline), met or not, with their numbers;
- pretraining: training curves, every step's realised mask ratio, held-out loss across a grid of
  ratios (and its mean, the ratio-averaged score) next to the reference predictors' loss on the same
  masked tokens (token frequencies, the ±k context model, the gene mean) and how many nats below them
  each run is; a UMAP of the embeddings; every stage's config and checksums.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

from biomask import __version__
from biomask.evaluation import clustering
from biomask.evaluation.evaluate import VAL_METRIC
from biomask.evaluation.methods import CHOSEN_ON_VAL
from biomask.evaluation.metrics import (
    MACRO_F1_NOTE,
    METRICS,
    format_summary,
    md_cell,
    paired_comparison,
    signed,
    summarize,
)
from biomask.outputs import file_slugs
from biomask.provenance import code_differs, code_version, read_run_info
from biomask.relocation import where_now
from biomask.report import figures
from biomask.report.collect import (
    SEED_MARK,
    Evaluation,
    PretrainRun,
    StageRecord,
    describe_masking,
    find_pretrain_runs,
    is_fixed_ratio,
    load_evaluation,
    short_value,
    stage_record,
)
from biomask.report.config import ReportConfig
from biomask.report.reuse import SUMMARY_JSON, check_inputs, refuse_older_report, stage_output

log = logging.getLogger(__name__)

# said of a verdict over 2 seeds: t with 1 degree of freedom stretches the interval 12.7-fold
TWO_SEEDS = "; **only 2 seeds**: an interval 12.7× the standard error wide (use 3 or more)"

_METRIC_NAMES = {
    "accuracy": "accuracy",
    "macro_f1": "macro-F1",
    "mcc": "MCC",
    "cluster_ari": "Leiden ARI (resolution 1)",
    "cluster_nmi": "Leiden NMI (resolution 1)",
    "cluster_ari_best": "Leiden ARI (best resolution, picked by the labels)",
    "cluster_nmi_best": "Leiden NMI (best resolution, picked by the labels)",
}


def shown(path: str | Path, report_dir: Path, *, recorded: bool = False) -> str:
    """A path as the report prints it: relative to the report's folder where it lies at most two
    folders up (a run's siblings, or another run folder of the same project), so a report copied or
    published with its runs folder points at the right places; elsewhere absolute, the home folder
    written `~`. A relative path the report opened is relative to its working directory; one another
    stage `recorded` is printed as it was (the folder it was relative to is not known). The resolved
    configs at the end stay as recorded."""
    text = str(path)
    if not os.path.isabs(text):
        if recorded:
            return text
        text = os.path.abspath(text)
    target, base = os.path.normpath(text), os.path.normpath(os.path.abspath(report_dir))
    rel = os.path.relpath(target, base)
    if rel.split(os.sep)[:3] != [os.pardir] * 3:
        return rel
    home = os.path.expanduser("~")
    if home not in ("", os.sep) and (target == home or target.startswith(home + os.sep)):
        return "~" + target[len(home) :]
    return target


def verdict(cmp: dict[str, float], better: str, worse: str) -> str:
    """'better' / 'worse' only when the paired 95 % CI excludes zero; otherwise no significant difference."""
    if cmp["n"] < 2:
        return "a single seed: no interval, no verdict"
    if cmp["ci_low"] > 0:
        return better
    if cmp["ci_high"] < 0:
        return worse
    return "no significant difference"


def target_status(cmp: dict[str, float], mean_at_least: bool) -> str:
    """A target "≥ the strongest baseline": met when the paired interval of the difference lies at or
    above zero, not met when below it, level when it holds zero (not shown either way: a mean a hair
    above the baseline's is not a target met). One unit has no interval: its means decide."""
    if cmp["n"] < 2 or not (math.isfinite(cmp["ci_low"]) and math.isfinite(cmp["ci_high"])):
        return "met" if mean_at_least else "not met"
    if cmp["ci_low"] >= 0:
        return "met"
    if cmp["ci_high"] < 0:
        return "not met"
    return "level"


_PROTOCOL_MODELS = {"linear_probe": "linear probe", "knn": "kNN classifier", "finetune": "fine-tuned model"}

_STATUS_TEXT = {
    "met": "**met**",
    "not met": "**not met**",
    "level": "**level** (not shown either way: the paired interval holds zero)",
}


NEAR_TIE = 0.001  # validation MCCs closer than this: the best pretrained model is a near tie


def detectable_difference(cmp: dict[str, float], power: float = 0.8) -> float:
    """The smallest true mean difference a two-sided paired t-test at 5 % would find with `power`,
    given the comparison's own spread and n: the noncentrality at which the noncentral t passes the
    test's critical value with that probability, times sd / √n (read back from the 95 % interval's
    half-width). The shortcut (t_0.975 + t_power) · sd / √n is 5 % optimistic at n = 3. NaN below
    two units."""
    from scipy import optimize, stats

    n = int(cmp["n"])
    if n < 2 or not math.isfinite(cmp["ci_high"]):
        return float("nan")
    df = n - 1
    critical = stats.t.ppf(0.975, df)
    se = (cmp["ci_high"] - cmp["mean_difference"]) / critical
    if not se > 0:
        return 0.0 if se == 0 else float("nan")

    def shortfall(ncp: float) -> float:
        lower = stats.nct.cdf(-critical, df, ncp)  # NaN where it underflows far from the mean
        return stats.nct.sf(critical, df, ncp) + (0.0 if math.isnan(lower) else lower) - power

    high = critical
    while shortfall(high) < 0:  # power rises with the noncentrality: bracket it from the critical value
        high *= 2
    return float(optimize.brentq(shortfall, 0.0, high) * se)


def per_split_differences(ev: Evaluation, ours: str, theirs: str, metric: str) -> list[float] | None:
    """Per evaluation split: the mean of `ours`'s pretraining seeds minus `theirs` (a method without
    pretraining seeds: a baseline, the random init). The paired interval over seeds takes `theirs` as
    its mean over the splits; these show whether the difference holds split by split. None where the
    evaluation is not grouped by pretraining seed or the scores are missing."""
    raw = ev.results.get("split_scores") or {}
    members = next((m.get("members") for m in ev.results["methods"] if m["name"] == ours), None)
    if not members or theirs not in raw or any(name not in raw for name in members):
        return None
    by_split = [{row.get("seed"): row for row in raw[name]} for name in members]
    out = []
    for row in raw[theirs]:
        split = row.get("seed")
        values = [rows[split][metric] for rows in by_split if split in rows and metric in rows[split]]
        if len(values) != len(by_split) or metric not in row:
            return None
        out.append(sum(values) / len(values) - row[metric])
    return out


def _cmp_text(
    cmp: dict[str, float], metric: str, unit: str = "seeds", splits: list[float] | None = None
) -> str:
    mdd = detectable_difference(cmp)
    if not (math.isfinite(cmp["ci_low"]) and math.isfinite(cmp["ci_high"])):  # one seed: no spread
        return (
            f"Δ {_METRIC_NAMES[metric]} {signed(cmp['mean_difference'])}, better in {cmp['wins']}/{cmp['n']} {unit}: "
            "no interval and no test (one unit)"
        )
    return (
        f"Δ {_METRIC_NAMES[metric]} {signed(cmp['mean_difference'])} [{signed(cmp['ci_low'])}, {signed(cmp['ci_high'])}], "
        f"paired t p = {cmp['p_value']:.2g}, better in {cmp['wins']}/{cmp['n']} {unit}"
        + (
            "; split by split (seeds' mean − the other's, which the interval takes as fixed): "
            + ", ".join(f"{signed(d)}" for d in splits)
            if splits and len(splits) > 1
            else ""
        )
        + (f"; detectable difference ±{mdd:.3f} (80 % power)" if math.isfinite(mdd) else "")
        + (TWO_SEEDS if cmp["n"] == 2 else "")  # two units: say why the interval is so wide
    )


def _on_mcc(ev: Evaluation, method: str, baseline: str, metric: str) -> str:
    """A classification target set on macro-F1 or accuracy, read on MCC too (the metric the best
    pretrained model is chosen on): a tie on one metric can be a loss on another, and a reader should
    not have to recompute it. No p-value, so the summary's count of tests is unchanged."""
    if metric not in ("macro_f1", "accuracy"):
        return ""
    summary = ev.results["summary"]
    if "mcc" not in summary.get(method, {}) or "mcc" not in summary.get(baseline, {}):
        return ""
    cmp = paired_comparison(ev.scores(method, "mcc"), ev.scores(baseline, "mcc"))
    if cmp["n"] < 2 or not math.isfinite(cmp["ci_low"]):
        return ""
    return (
        f"; on MCC (no target; not among the tests counted below): Δ {signed(cmp['mean_difference'])} "
        f"[{signed(cmp['ci_low'])}, {signed(cmp['ci_high'])}], "
        + {"met": "above", "not met": "below", "level": "level"}[
            target_status(cmp, cmp["mean_difference"] >= 0)
        ]
    )


def _across_splits(splits: list[float] | None, metric: str, status: str) -> str:
    """What the seed-level interval leaves out: the variation between draws of test records. With 3
    or more splits, the interval over the splits' differences (each split one unit, its seeds
    averaged); a call it does not bear out is said to hold on these test records only. A clustering
    metric's splits are Leiden runs on the same cells: no sample of cells to speak of."""
    if metric.startswith("cluster_"):
        return (
            "; every split clusters the same cells (a split changes Leiden's seed only), so the interval "
            "is the spread between Leiden runs and pretraining seeds, not between samples of cells"
        )
    if not splits or len(splits) < 2:
        return ""
    called = status in ("met", "not met")
    if len(splits) == 2:
        return (
            "; 2 evaluation splits: no interval across draws of test records, so the call holds on these "
            "two only"
            if called
            else ""
        )
    from scipy import stats

    n, mean = len(splits), sum(splits) / len(splits)
    sd = math.sqrt(sum((d - mean) ** 2 for d in splits) / (n - 1))
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    text = f"; across evaluation splits (each split one unit, its seeds averaged): [{signed(mean - half)}, {signed(mean + half)}]"
    if called and mean - half <= 0 <= mean + half:
        text += " — holds zero: the call holds on these test records, not shown across draws of them"
    elif status == "level" and not mean - half <= 0 <= mean + half:
        # the other way round: a reader told only "level" would miss that every draw went one way
        text += (
            " — excludes zero: on these pretraining seeds every draw of test records goes the same way; "
            "over pretraining seeds the difference is not shown"
        )
    return text


_P_VALUE = re.compile(r"paired t p = ([0-9.e+-]+)")
_CALLED = re.compile(r"\*\*(better|worse|helps|hurts|met|not met|lower|higher)\*\*")


HOLM_MARK = " *Survives Holm's correction over the summary's tests.*"


def _holm_survivors(lines: list[str]) -> tuple[list[tuple[int, float, bool]], set[int]]:
    """The summary's paired tests as (line index, p as printed, called) and the indices of the lines
    whose p-value stays below 5 % after Holm's step-down over all of them (the k-th smallest p against
    0.05 / (m - k))."""
    tested = [
        (i, float(m.group(1)), bool(_CALLED.search(line)))
        for i, line in enumerate(lines)
        if (m := _P_VALUE.search(line))
    ]
    tested = [t for t in tested if math.isfinite(t[1])]
    survivors: set[int] = set()
    for k, (i, p, _) in enumerate(sorted(tested, key=lambda t: t[1])):
        if p > 0.05 / (len(tested) - k):
            break
        survivors.add(i)
    return tested, survivors


def _mark_holm_survivors(lines: list[str]) -> list[str]:
    """The summary with each call that survives Holm's correction marked where it stands: the note
    below counts them, and a reader must find which they are without redoing the correction."""
    tested, survivors = _holm_survivors(lines)
    if len(tested) < 2:
        return lines
    return [line + HOLM_MARK if i in survivors else line for i, line in enumerate(lines)]


def _multiplicity_note(lines: list[str]) -> list[str]:
    """How many paired tests the summary makes and how many of its calls survive Holm's correction
    over all of them: each interval is 95 % on its own, so among many comparisons some exclude zero by
    chance alone (a reader must not take every bolded call as a finding)."""
    tested, survivors = _holm_survivors(lines)
    if len(tested) < 2:
        return []
    m, called, holm = len(tested), sum(c for _, _, c in tested), len(survivors)
    return [
        f"- **Multiple comparisons**: the summary makes {m} paired tests, each interval 95 % on its own "
        f"(unadjusted): if nothing differed, about {0.05 * m:.1f} would exclude zero by chance. {called} "
        f"{'is' if called == 1 else 'are'} called (bold above); {holm} of the {m} p-values stay below 5 % after "
        "Holm's correction over all of them (p-values as printed; marked *Survives Holm's correction* above). "
        "Read a single call at p near 0.05 as a lead, not a finding."
    ]


def _unit(ev: Evaluation) -> str:
    """What a comparison's n counts: pretraining seeds (checkpoints named scheme@seed) or splits."""
    if "unit" in ev.results:
        return ev.results["unit"].split(" ", 1)[1]  # "pretraining seeds (0, 1, 2; each the mean ...)"
    seeds = ", ".join(map(str, ev.results["seeds"]))
    return f"evaluation splits ({seeds}; one pretraining seed)"


# ------------------------------------------------------------------------------------------- sections


def _how_to_read(grouped: bool) -> str:
    """The header's key to every number below: what ± is, what an interval is over and what it
    leaves out, and when a difference or a target is called."""
    over = (
        ": a pretrained scheme's over its pretraining seeds (each seed's score the mean over the "
        "evaluation splits), a baseline's and the random init's over the evaluation splits"
        if grouped
        else " over the evaluation splits"
    )
    fixed = (
        " A baseline or the random init has no pretraining seeds: each seed's score is paired with its "
        "mean over the same splits, taken as fixed, so such an interval holds the variation between "
        "pretraining seeds on these splits, not the variation between splits or between random "
        "initialisations (each split's scores are in the evaluation's metrics.json). A target's bullet "
        "adds the interval across the evaluation splits (each split one unit) and says where a call does "
        "not hold across them; a clustering score's splits are Leiden runs on the same cells."
        if grouped
        else ""
    )
    return (
        f"Scores read mean ± sd [95 % confidence interval (Student t){over}], the interval cut to the "
        "metric's range (so it may be lopsided at 1); comparisons are paired (the same splits, and the "
        f"same pretraining seed where there are several).{fixed} A difference is called significant only "
        "when its paired interval excludes zero; a target is met when that interval lies at or above zero, "
        "not met when below it, and level when it holds zero. A target's bar is the baseline with the best "
        "test mean on its metric (baselines record no validation score), which favours the baselines: a "
        "'met' is conservative, a 'not met' a little harsh."
    )


def _built_as(architecture: dict[str, Any] | None) -> dict[str, Any]:
    """A checkpoint's architecture less what its masking decides (MAE corruption's decoder)."""
    return {k: v for k, v in (architecture or {}).items() if k != "decoder_layers"}


def r2mae_vs_fixed(evaluation: Evaluation, r2mae: str) -> list[dict[str, Any]]:
    """Per protocol: R²MAE against the best fixed-ratio checkpoint, paired over seeds."""
    rows = []
    protocols = sorted(
        {
            m["protocol"]
            for m in evaluation.results["methods"]
            if m["group"] not in ("baseline", "random-init")
        }
    )
    for protocol in protocols:
        ours = evaluation.methods(protocol, r2mae)
        fixed = [
            m
            for m in evaluation.methods(protocol)
            if m["group"] in evaluation.masking and is_fixed_ratio(evaluation.masking[m["group"]])
        ]
        # the best fixed ratio among models built as R²MAE's (an ablation's models differ in more than
        # their masking); all fixed ratios only where none is
        mine = _built_as(evaluation.architecture.get(r2mae))
        fixed = [m for m in fixed if _built_as(evaluation.architecture.get(m["group"])) == mine] or fixed
        if not ours or not fixed:
            continue
        best, chosen_on = best_fixed(evaluation, fixed)
        cmp = paired_comparison(evaluation.scores(ours[0]["name"]), evaluation.scores(best["name"]))
        rows.append(
            {
                "protocol": protocol,
                "r2mae": ours[0]["name"],
                "best_fixed": best["name"],
                "group": best["group"],
                "chosen_on": chosen_on,
                "cmp": cmp,
            }
        )
    return rows


def best_fixed(evaluation: Evaluation, fixed: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
    """The fixed-ratio method with the best mean validation MCC, and what it was chosen on. Choosing
    on the test metric would favour the fixed ratio (the best of several noisy test scores is biased
    upwards); only evaluations written before validation scores existed fall back to it."""
    summary = evaluation.results["summary"]
    if all(VAL_METRIC in summary[m["name"]] for m in fixed):
        return max(fixed, key=lambda m: evaluation.mean(m["name"], VAL_METRIC)), "validation MCC"
    return max(fixed, key=lambda m: evaluation.mean(m["name"])), "the test metric, which favours it"


def r2mae_vs_schedules(evaluation: Evaluation, r2mae: str) -> list[dict[str, Any]]:
    """Per protocol: R²MAE against every other scheme whose ratio is not fixed (the dynamic schedule)."""
    rows = []
    others = [g for g, masking in evaluation.masking.items() if g != r2mae and not is_fixed_ratio(masking)]
    for group in others:
        for theirs in evaluation.methods(group=group):
            ours = evaluation.methods(theirs["protocol"], r2mae)
            if ours and SEED_MARK not in group:
                cmp = paired_comparison(evaluation.scores(ours[0]["name"]), evaluation.scores(theirs["name"]))
                rows.append({"protocol": theirs["protocol"], "group": group, "cmp": cmp})
    return rows


def pairwise_rows(evaluation: Evaluation) -> list[dict[str, Any]]:
    """Per protocol, every pretrained group against every other and the random init (paired): the
    pretraining-data comparison (corpus, self, both) where no scheme is singled out."""
    rows = []
    groups = [g for g in dict.fromkeys(m["group"] for m in evaluation.results["methods"]) if g != "baseline"]
    # after by_pretraining_seed: one per scheme; a pick per split has no pretraining seeds to pair
    groups = [g for g in groups if SEED_MARK not in g and g != CHOSEN_ON_VAL]
    for protocol in sorted({m["protocol"] for m in evaluation.results["methods"] if m["group"] in groups}):
        present = [g for g in groups if evaluation.methods(protocol, g)]
        for i, a in enumerate(present):
            for b in present[i + 1 :]:
                ma, mb = evaluation.methods(protocol, a)[0], evaluation.methods(protocol, b)[0]
                cmp = paired_comparison(evaluation.scores(ma["name"]), evaluation.scores(mb["name"]))
                rows.append({"protocol": protocol, "a": a, "b": b, "cmp": cmp})
    return rows


def _like_for_like(random: dict[str, Any], group: str) -> bool:
    """Whether the random init has `group`'s architecture (a checkpoint, or `group@seed` ones).
    Evaluations written before `architecture_of` was recorded paired every checkpoint with it."""
    names = random.get("architecture_of")
    return names is None or any(n == group or n.rpartition(SEED_MARK)[0] == group for n in names)


def r2mae_vs_random_init(evaluation: Evaluation, r2mae: str) -> list[dict[str, Any]]:
    """Per protocol: does pretraining beat the untrained architecture (paired over seeds)?"""
    rows = []
    for m in evaluation.methods(group=r2mae):
        random = evaluation.methods(m["protocol"], "random-init")
        if random and _like_for_like(random[0], r2mae):
            cmp = paired_comparison(evaluation.scores(m["name"]), evaluation.scores(random[0]["name"]))
            splits = per_split_differences(evaluation, m["name"], random[0]["name"], evaluation.metric)
            rows.append({"protocol": m["protocol"], "cmp": cmp, "splits": splits})
    return rows


def comparison_bullets(ev: Evaluation, r2mae: str, *, pairwise: bool = False) -> list[str]:
    """The summary's verdicts for one evaluation: R²MAE against the best fixed ratio, the schedules and
    the random init, then (`pairwise`) every other pair of pretrained groups not already given one."""
    lines: list[str] = []
    said: set[tuple[str, frozenset[str]]] = set()  # (protocol, pair) already given a bullet
    for row in r2mae_vs_fixed(ev, r2mae):
        said.add((row["protocol"], frozenset((r2mae, row["group"]))))
        text = verdict(row["cmp"], "R²MAE is **better**", "R²MAE is **worse**")
        lines.append(
            f"- **R²MAE vs the best fixed ratio**, {ev.title}, {row['protocol'].replace('_', ' ')}: {row['group']} "
            f"({describe_masking(ev.masking[row['group']])}) was the best fixed ratio (chosen on "
            f"{row['chosen_on']}); {text} ({_cmp_text(row['cmp'], ev.metric, _unit(ev))})."
        )
    for row in r2mae_vs_schedules(ev, r2mae):
        said.add((row["protocol"], frozenset((r2mae, row["group"]))))
        masking = describe_masking(ev.masking[row["group"]])
        ours = "R²MAE"
        if r2mae in ev.masking and masking == describe_masking(ev.masking[r2mae]):
            # not another schedule: checkpoints masked alike that differ otherwise (their genome), so
            # the difference is not R²MAE's: the verdict names the checkpoints
            masking = f"the same masking, {masking}: the checkpoints differ in something else, such as their pretraining data"
            ours = f"the {r2mae} checkpoints"
        text = verdict(row["cmp"], f"{ours} {'is' if ours == 'R²MAE' else 'are'} **better**",
                       f"{ours} {'is' if ours == 'R²MAE' else 'are'} **worse**")  # fmt: skip
        lines.append(
            f"- **{ours} vs {row['group']}** ({masking}), {ev.title}, "
            f"{row['protocol'].replace('_', ' ')}: {text} ({_cmp_text(row['cmp'], ev.metric, _unit(ev))})."
        )
    vs_random = r2mae_vs_random_init(ev, r2mae)
    said |= {(row["protocol"], frozenset((r2mae, "random-init"))) for row in vs_random}
    if pairwise:
        for row in pairwise_rows(ev):
            if (row["protocol"], frozenset((row["a"], row["b"]))) in said:
                continue  # its own bullet above or below
            text = verdict(row["cmp"], f"{row['a']} is **better**", f"{row['a']} is **worse**")
            lines.append(
                f"- **{row['a']} vs {row['b']}**, {ev.title}, {row['protocol'].replace('_', ' ')}: {text} "
                f"({_cmp_text(row['cmp'], ev.metric, _unit(ev))})."
            )
    for row in vs_random:
        text = verdict(row["cmp"], "pretraining **helps**", "pretraining **hurts**")
        lines.append(
            f"- **R²MAE vs the same architecture randomly initialised**, {ev.title}, "
            f"{row['protocol'].replace('_', ' ')}: {text} ({_cmp_text(row['cmp'], ev.metric, _unit(ev), row.get('splits'))})."
        )
    return lines


def target_rows(cfg: ReportConfig, evaluations: dict[str, Evaluation]) -> list[dict[str, Any]]:
    rows = []
    for target in cfg.targets:
        ev = evaluations.get(target.evaluation)
        if ev is None:
            rows.append({"target": target, "missing": f"no evaluation named {target.evaluation!r}"})
            continue
        baseline = ev.results.get("strongest_baseline")
        # with checkpoints named scheme@seed a verdict's unit is the pretraining seed: a model row
        # without them ("chosen on val", picked per split) has no spread over that unit to compare
        grouped = "unit" in ev.results
        candidates = [
            m
            for m in ev.methods(target.protocol)
            if m["group"] not in ("baseline", "random-init") and (not grouped or "members" in m)
        ]
        if baseline is None or not candidates:
            rows.append(
                {"target": target, "missing": "no baseline or no pretrained model under this protocol"}
            )
            continue
        strongest = strongest_baseline(ev, target.metric)
        if strongest is None or any(
            target.metric not in ev.results["summary"][m["name"]] for m in candidates
        ):
            older = code_differs(read_run_info(ev.path))
            why = (
                f" (the evaluation was written by other code, {older}, perhaps before biomask measured "
                f"it: `biomask evaluate ... --overwrite` into {ev.path} recomputes it)"
                if older
                else ""
            )
            rows.append(
                {"target": target, "missing": f"no {target.metric} for the baselines or the models{why}"}
            )
            continue
        baseline = strongest
        r2 = next((m for m in candidates if m["group"] == cfg.r2mae), None)
        # the best pretrained model is picked on validation, as the best fixed ratio is: the best of
        # several noisy test means is biased upwards; evaluations without validation scores fall back
        summary = ev.results["summary"]
        if len(candidates) == 1:  # nothing was chosen
            best, how = candidates[0], "the only pretrained model"
        elif all(VAL_METRIC in summary[m["name"]] for m in candidates):
            ranked = sorted(candidates, key=lambda m: ev.mean(m["name"], VAL_METRIC), reverse=True)
            best = ranked[0]
            how = "chosen on validation MCC"
            if target.metric != "mcc":  # evaluate records no other validation score: say whose MCC
                how = (
                    f"chosen on the {_PROTOCOL_MODELS.get(target.protocol, target.protocol)}'s validation MCC; "
                    f"{_METRIC_NAMES[target.metric].split(' (')[0]} has no validation score"
                )
            margin = ev.mean(best["name"], VAL_METRIC) - ev.mean(ranked[1]["name"], VAL_METRIC)
            if margin < NEAR_TIE:  # a choice a last-bit difference could turn: said, not hidden
                how += f"; a near tie: {margin:.4f} above {ranked[1]['group']}"
        else:
            best = max(candidates, key=lambda m: ev.mean(m["name"], target.metric))
            how = "highest test mean"
        entries = []
        same = r2 is not None and r2["name"] == best["name"]
        pairs = (
            [
                (
                    "R²MAE, the only pretrained model"
                    if len(candidates) == 1
                    else f"R²MAE, the best pretrained model ({how})",
                    r2,
                )
            ]
            if same
            else [("R²MAE", r2), (f"best pretrained ({how})", best)]
        )
        for label, method in pairs:
            if method is None:
                continue
            cmp = paired_comparison(
                ev.scores(method["name"], target.metric), ev.scores(baseline, target.metric)
            )
            entries.append(
                {
                    "label": label,
                    "method": method["name"],
                    "cmp": cmp,
                    "status": target_status(
                        cmp, ev.mean(method["name"], target.metric) >= ev.mean(baseline, target.metric)
                    ),
                }
            )
        rows.append({"target": target, "evaluation": ev, "baseline": baseline, "entries": entries})
    return rows


def _targets_at_a_glance(
    rows: list[dict[str, Any]], holm_p: float | None = None, chosen: dict[str, str] | None = None
) -> list[str]:
    """One table line per target and model, first in the summary: a reader finds each target's verdict
    there, without reading the bullets (which give the seeds, the choice on validation and the power).
    `holm_p`: the largest p-value that survives Holm's correction over the summary's tests (Holm's
    survivors are the smallest p-values), None where there is no correction to report. `chosen`:
    evaluation -> the settings chosen on its own scores (its verdicts are marked)."""
    if not rows:
        return []
    lines = [
        "Targets at a glance (each in full in the bullets below):",
        "",
        "| target | strongest baseline | pretrained model | difference [95 % CI] | detectable (80 % power) "
        "| p (paired t) | verdict | survives Holm |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        t = row["target"]
        if "missing" in row:
            lines.append(
                f"| {t.evaluation}, {t.protocol.replace('_', ' ')} {_METRIC_NAMES[t.metric]} | | | | | | not assessed | |"
            )
            continue
        ev = row["evaluation"]
        task = re.split(r" \(|, ", ev.title, maxsplit=1)[0]
        target = f"{task}, {t.protocol.replace('_', ' ')} {_METRIC_NAMES[t.metric]}"
        baseline = f"{row['baseline']} {ev.mean(row['baseline'], t.metric):.3f}"
        for e in row["entries"]:
            group = next(m["group"] for m in ev.results["methods"] if m["name"] == e["method"])
            who = {"R²MAE": "R²MAE"}.get(e["label"], f"best pretrained: {group}")
            if e["label"].startswith("R²MAE,"):
                who = (
                    "R²MAE, the only pretrained"
                    if "only" in e["label"]
                    else "R²MAE, also the best pretrained"
                )
            c = e["cmp"]
            # as printed, as the correction read it
            holds = holm_p is not None and float(f"{c['p_value']:.2g}") <= holm_p
            finite = math.isfinite(c["ci_low"]) and math.isfinite(c["ci_high"])
            interval = f"[{signed(c['ci_low'])}, {signed(c['ci_high'])}]" if finite else "(no interval)"
            p = f"{c['p_value']:.2g}" if math.isfinite(c["p_value"]) else "—"
            marked = " (settings chosen on it)" if (chosen or {}).get(t.evaluation) else ""
            lines.append(
                f"| {target} | {baseline} | {who} {ev.mean(e['method'], t.metric):.3f} | "
                f"{signed(c['mean_difference'])} {interval} | {_detectable(c)} | {p} | "
                f"**{e['status']}**{marked} | {'yes' if holds else 'no'} |"
            )
    return [*lines, ""]


TARGETS_PNG = "targets.png"


def _target_entries(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each assessed (target, model) of the summary's table, for its figure."""
    drawn = []
    for row in rows:
        if "missing" in row:
            continue
        t, ev = row["target"], row["evaluation"]
        task = re.split(r" \(|, ", ev.title, maxsplit=1)[0]
        for e in row["entries"]:
            c = e["cmp"]
            if not math.isfinite(c["mean_difference"]):
                continue
            finite = math.isfinite(c["ci_low"]) and math.isfinite(c["ci_high"])
            who = "R²MAE" if e["label"].startswith("R²MAE") else e["method"]
            drawn.append(
                {
                    "label": f"{task}, {t.protocol.replace('_', ' ')} {_METRIC_NAMES[t.metric]}: {who}",
                    "difference": c["mean_difference"],
                    "low": c["ci_low"] if finite else None,
                    "high": c["ci_high"] if finite else None,
                    "status": e["status"],
                }
            )
    return drawn


def _targets_json(
    rows: list[dict[str, Any]], holm_p: float | None, chosen: dict[str, str] | None = None
) -> dict[str, Any]:
    """The table "Targets at a glance" as data: each target and model with its figures and verdict
    (null where there is no number: one seed has no interval)."""

    def number(x: float) -> float | None:
        return float(x) if math.isfinite(x) else None

    targets = []
    for row in rows:
        t = row["target"]
        entry: dict[str, Any] = {"evaluation": t.evaluation, "protocol": t.protocol, "metric": t.metric}
        if (chosen or {}).get(t.evaluation):
            entry["settings_chosen_on_this_evaluation"] = chosen[t.evaluation]
        if "missing" in row:
            targets.append({**entry, "verdict": "not assessed", "why": row["missing"]})
            continue
        ev = row["evaluation"]
        entry["baseline"] = {"name": row["baseline"], "mean": number(ev.mean(row["baseline"], t.metric))}
        for e in row["entries"]:
            c = e["cmp"]
            targets.append(
                {
                    **entry,
                    "model": {
                        "label": e["label"],
                        "name": e["method"],
                        "mean": number(ev.mean(e["method"], t.metric)),
                    },
                    "difference": number(c["mean_difference"]),
                    "ci95": [number(c["ci_low"]), number(c["ci_high"])],
                    "n": int(c["n"]),
                    "p": number(c["p_value"]),
                    "detectable": number(detectable_difference(c)),
                    "verdict": e["status"],
                    "survives_holm": bool(
                        holm_p is not None
                        and math.isfinite(c["p_value"])
                        and float(f"{c['p_value']:.2g}") <= holm_p
                    ),
                }
            )
    return {"targets": targets}


def _detectable(cmp: dict[str, float]) -> str:
    """The table's power column: a level verdict with a wide one cannot tell a large loss from none."""
    mdd = detectable_difference(cmp)
    return f"±{mdd:.3f}" if math.isfinite(mdd) else "—"


def _notes_once(ev: Evaluation, noted: set[str]) -> list[str]:
    """An evaluation's notes (evaluate's caveats, such as checkpoints pretrained on the records it tests
    on) under the first of its targets in the summary: a verdict read there must carry them, not only
    the evaluation's own section further down."""
    if ev.key in noted or not ev.results.get("notes"):
        return []
    noted.add(ev.key)
    return [f"  - *Note on this evaluation*: {note}" for note in ev.results["notes"]]


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _variants(runs: list[PretrainRun]) -> dict[int, tuple[str, str]]:
    """Each run's (scheme, setting); runs that differ only in their seed share both. One scheme name
    can cover several maskings (a ratio-range sweep, `custom` runs): the scheme then carries its
    masking, `r2mae (U(0.15, 0.3))`. The setting names the other config keys in which runs of one
    seed differ (an ablation such as model.mask_indicator, another corpus), '' where none does —
    without both, two runs of one seed would be one scheme's and one would silently replace the other."""
    flat = {id(r): _flat({k: v for k, v in r.config.items() if k not in ("masking", "output")}) for r in runs}
    for values in flat.values():
        values.pop("train.seed", None)
    seed = {id(r): r.config.get("train", {}).get("seed") for r in runs}
    keys = sorted({k for values in flat.values() for k in values})
    varied = [
        k
        for k in keys
        if any(
            seed[id(a)] == seed[id(b)]
            and k in flat[id(a)]
            and k in flat[id(b)]  # a key one run's older config lacks is no setting of its own
            and repr(flat[id(a)][k]) != repr(flat[id(b)][k])
            for a in runs
            for b in runs
        )
    ]
    maskings: dict[str, set[str]] = {}
    for run in runs:
        maskings.setdefault(run.masking.get("scheme", run.name), set()).add(describe_masking(run.masking))
    out: dict[int, tuple[str, str]] = {}
    for run in runs:
        scheme = run.masking.get("scheme", run.name)
        if len(maskings[scheme]) > 1:
            scheme = f"{scheme} ({describe_masking(run.masking)})"
        setting = ", ".join(f"{k}={short_value(flat[id(run)].get(k))}" for k in varied)
        out[id(run)] = (scheme, setting)
    return out


def _pretraining_verdict(modality: str, runs: list[PretrainRun], r2mae: str) -> list[str]:
    """R²MAE's ratio-averaged held-out loss against the best fixed ratio's, over pretraining seeds:
    per setting (runs that differ in more than their masking are not compared), and for every
    masking run under R²MAE's name."""
    variants = _variants(runs)
    lines: list[str] = []
    for setting in dict.fromkeys(s for _, s in variants.values()):
        by_scheme: dict[str, dict[Any, float]] = {}
        masking: dict[str, dict[str, Any]] = {}
        for run in runs:
            scheme, run_setting = variants[id(run)]
            if run_setting == setting and "mean_loss" in run.final_eval:
                seed = run.config.get("train", {}).get("seed")
                by_scheme.setdefault(scheme, {})[seed] = run.final_eval["mean_loss"]
                masking[scheme] = run.masking
        fixed = [s for s in by_scheme if is_fixed_ratio(masking[s])]
        if not fixed:
            continue
        label = f"{modality}, {setting}" if setting else modality
        best = min(fixed, key=lambda s: sum(by_scheme[s].values()) / len(by_scheme[s]))
        for ours in (s for s in by_scheme if s == r2mae or s.startswith(f"{r2mae} (")):
            name = "R²MAE" + ours[len(r2mae) :]
            lines += _one_pretraining_verdict(label, name, by_scheme[ours], best, by_scheme[best])
    return lines


def _one_pretraining_verdict(
    label: str, name: str, ours: dict[Any, float], best: str, theirs: dict[Any, float]
) -> list[str]:
    seeds = sorted(set(ours) & set(theirs), key=str)
    if not seeds:
        return []
    a = [ours[s] for s in seeds]
    b = [theirs[s] for s in seeds]
    if len(seeds) < 2:
        word = "lower (better)" if a[0] < b[0] else "higher (worse)"
        return [
            f"- **Pretraining ({label})**: {name}'s held-out masked loss averaged over the ratio grid is {a[0]:.4f}, "
            f"{word} than the best fixed ratio ({best}, {b[0]:.4f}) — one pretraining seed per scheme, so no interval."
        ]
    cmp = paired_comparison(b, a)  # positive: R²MAE's loss is lower
    text = verdict(cmp, f"{name}'s is **lower** (better)", f"{name}'s is **higher** (worse)")
    return [
        f"- **Pretraining ({label})**: held-out masked loss averaged over the ratio grid, {name} "
        f"{sum(a) / len(a):.4f} against the best fixed ratio ({best}) {sum(b) / len(b):.4f} "
        # unlike the downstream tasks' pick (on validation), this one is on the loss it is compared on
        "(the fixed ratio with the lowest mean of this same loss, a choice that favours it): "
        f"{text} "
        f"(best fixed − R²MAE {signed(cmp['mean_difference'], 4)} [{signed(cmp['ci_low'], 4)}, {signed(cmp['ci_high'], 4)}], "
        # its p-value in the form the multiplicity note counts: it is one of the summary's paired tests
        f"paired t p = {cmp['p_value']:.2g}, {len(seeds)} pretraining seeds ({', '.join(map(str, seeds))}) "
        "paired by seed" + (TWO_SEEDS if len(seeds) == 2 else "") + ")."
    ]


def _loss_unit(runs: list[PretrainRun]) -> str:
    units = {run.loss_unit for run in runs}
    return units.pop() if len(units) == 1 else "loss units"


def _reference_names(runs: list[PretrainRun]) -> list[str]:
    return list(dict.fromkeys(name for run in runs for name in run.references))


def _learned_verdict(modality: str, runs: list[PretrainRun]) -> list[str]:
    """What the models learned: nats below the strongest reference (the lowest mean loss), by scheme
    over its pretraining seeds, and in how many runs the model is below it at all."""
    names = _reference_names(runs)
    scored = [r for r in runs if r.references and "mean_loss" in r.final_eval]
    if not names or not scored:
        return []
    strongest = min(
        names,
        key=lambda n: sum(r.references[n]["mean_loss"] for r in scored if n in r.references) / len(scored),
    )
    variants = _variants(scored)
    below: dict[str, list[float]] = {}
    for run in scored:
        if strongest in run.references:
            scheme, setting = variants[id(run)]
            scheme = f"{scheme} ({setting})" if setting else scheme
            gap = run.references[strongest]["mean_loss"] - run.final_eval["mean_loss"]
            below.setdefault(scheme, []).append(gap)
    unit = _loss_unit(scored)
    parts = []
    for scheme, gaps in below.items():
        s = summarize(gaps)
        spread = f" ± {s['sd']:.4f}" if len(gaps) > 1 else ""
        parts.append(f"{scheme} {signed(s['mean'], 4)}{spread} ({len(gaps)} seed{'s' * (len(gaps) > 1)})")
    n_below = sum(g > 0 for gaps in below.values() for g in gaps)
    n_all = sum(len(g) for g in below.values())
    # a count of runs below the reference is moved by gaps of a ten-thousandth of a nat: where every
    # scheme has seeds, a scheme has learned beyond the reference only if its interval says so
    shown = [k for k, gaps in below.items() if len(gaps) > 1 and summarize(gaps)["ci_low"] > 0]
    testable = all(len(gaps) > 1 for gaps in below.values())
    if 2 * n_below < n_all:
        caveat = (
            f" — most runs do not beat this simple predictor, so verdicts between these {modality} "
            "models' masking schemes compare models that learned little beyond it."
        )
    elif testable and not shown:
        caveat = (
            f" — but no scheme is shown above it (each one's 95 % interval over its seeds reaches zero), "
            f"so verdicts between these {modality} models' masking schemes compare models not shown to "
            "have learned beyond it."
        )
    else:
        caveat = "."
    return [
        f"- **What the {modality} models learned**: {unit} below the {strongest} reference (the strongest "
        f"reference predictor, same masked tokens, mean over the ratio grid; positive = the model predicts "
        f"better): {'; '.join(parts)}. Below it in {n_below} of {n_all} runs{caveat}"
    ]


def _pretrained_on(runs: list[PretrainRun], report_dir: Path) -> list[str]:
    """What a modality's runs were pretrained on, from each run's config and its store's run.json:
    the store, the data it was built from, the split trained on and the one the held-out loss is
    measured on (a table of losses says nothing of which genome or cells they are of)."""
    seen: dict[tuple[str, str, str], list[str]] = {}
    for run in runs:
        data = run.config.get("data", {})
        if not data.get("store"):
            continue
        store = where_now(run.path, str(data["store"]))  # the run folder may have moved since
        key = (store, str(data.get("train_split", "train")), str(data.get("eval_split", "val")))
        seen.setdefault(key, []).append(run.name)
    lines = []
    for (store, train, held_out), names in seen.items():
        info = read_run_info(Path(store)) or {}
        sources = ", ".join(str(i.get("name")) for i in info.get("inputs", []) if i.get("name"))
        lines.append(
            f"Pretrained on `{shown(store, report_dir)}`"
            + (f" (built from {sources})" if sources else "")
            + f": its '{train}' records; held-out loss on its '{held_out}' records"
            + (f" ({len(names)} of these {len(runs)} runs)" if len(seen) > 1 else "")
            + "."
        )
    return [*lines, ""] if lines else []


def _pretrain_table(runs: list[PretrainRun]) -> list[str]:
    """One row per run (scheme and seed): the held-out loss at each ratio and its mean, then each
    reference predictor's mean loss on the same masked tokens and the nats the model is below it."""
    grid = sorted({r for run in runs for r in run.final_eval.get("loss", {})}, key=float)
    refs = _reference_names(runs)
    head = (
        "| run | masking | steps | tokens/s | "
        + " | ".join(f"loss @ {r}" for r in grid)
        + " | mean over grid |"
        + "".join(f" reference: {name} | below {name} |" for name in refs)
    )
    lines = [head, "|" + "---|" * (5 + len(grid) + 2 * len(refs))]
    for run in runs:
        losses = run.final_eval.get("loss", {})
        tps = run.train["tokens_per_s"].median() if "tokens_per_s" in run.train else float("nan")
        steps = run.config.get("train", {}).get("steps", "?")
        cells = " | ".join(f"{losses[r]:.4f}" if r in losses else "" for r in grid)
        mean = run.final_eval.get("mean_loss", float("nan"))
        line = f"| {md_cell(run.name)} | {describe_masking(run.masking)} | {steps} | {tps:,.0f} | {cells} | **{mean:.4f}** |"
        for name in refs:
            ref = run.references.get(name, {}).get("mean_loss", float("nan"))
            line += f" {ref:.4f} | {signed(ref - mean, 4)} ({signed(100 * (1 - mean / ref), 1)}%) |"
        lines.append(line)
    if refs:  # where on the ratio grid the model gains: nats below the strongest reference per ratio
        strongest = min(
            refs, key=lambda n: min(r.references.get(n, {}).get("mean_loss", math.inf) for r in runs)
        )
        lines += [
            "",
            f"{_loss_unit(runs)[0].upper()}{_loss_unit(runs)[1:]} below the {strongest} reference at each masking ratio (reference − model, same masked "
            "tokens; positive: the model predicts better):",
            "",
            "| run | " + " | ".join(f"@ {r}" for r in grid) + " |",
            "|" + "---|" * (1 + len(grid)),
        ]
        for run in runs:
            ref = run.references.get(strongest, {}).get("loss", {})
            losses = run.final_eval.get("loss", {})
            cells = " | ".join(
                f"{signed(ref[r] - losses[r], 4)}" if r in ref and r in losses else "" for r in grid
            )
            lines.append(f"| {md_cell(run.name)} | {cells} |")
    return lines


_SPLIT_MODES = {
    "resample": "each a fresh train / val / test draw from all labelled records, stratified by label where "
    "every class has 3 or more",
    "store": "each the prep stage's one fixed split",
}


def _split_mode(ev: Evaluation) -> str:
    """What an evaluation's splits are, in words ('resample' alone told a reader nothing)."""
    spec = ev.results.get("splits") or {}
    mode = str(spec.get("mode", "?"))
    group, grouped = spec.get("group", "none"), ev.results.get("split_groups")
    if mode == "resample" and group != "none" and grouped:
        kept = (
            f"records sharing {spec.get('min_shared')} bases (either strand)"
            if group == "shared_sequence"
            else "cells of one batch"
        )
        return (
            f"resample in whole groups (splits.group={group}): each a fresh draw per seed, {kept} kept on one "
            f"side ({grouped['groups']:,} groups, the largest {grouped['largest']:,} records)"
        )
    return f"{mode}: {_SPLIT_MODES[mode]}" if mode in _SPLIT_MODES else mode


def _split_sizes(ev: Evaluation) -> str:
    """How many records each split held (train / val / test), as evaluate recorded them."""
    sizes = sorted({(s["train"], s["val"], s["test"]) for s in ev.results.get("split_sizes") or []})
    if not sizes:
        return ""
    return "; train / val / test records: " + ", ".join(f"{a} / {b} / {c}" for a, b, c in sizes)


def _evaluation_table(ev: Evaluation) -> list[str]:
    lines = [
        "| method | protocol | " + " | ".join(_METRIC_NAMES[m] for m in METRICS) + " |",
        "|---|---|---|---|---|",
    ]
    for m in ev.results["methods"]:
        name = m["name"] if m["group"] == "baseline" else m["group"]
        masking = f" ({describe_masking(ev.masking[m['group']])})" if m["group"] in ev.masking else ""
        cells = " | ".join(format_summary(ev.results["summary"][m["name"]][metric]) for metric in METRICS)
        lines.append(f"| {md_cell(name)}{masking} | {m['protocol']} | {cells} |")
    if any(m["group"] == CHOSEN_ON_VAL for m in ev.results["methods"]):
        lines += [
            "",
            f"*{CHOSEN_ON_VAL}*: per evaluation split, the checkpoint whose linear probe has the best "
            "validation MCC (the pick a user makes without the test labels).",
        ]
    # what a user copying the template gets: the pooling each model's probe picked on val (every
    # protocol of a model uses its probe's pick, so one entry per model)
    chosen: dict[str, dict[str, int]] = {}
    for m in ev.results["methods"]:
        if m.get("pooling_counts"):
            chosen.setdefault(m["group"], m["pooling_counts"])
    if chosen:
        listed = "; ".join(
            f"{group}: " + ", ".join(f"{p} {n}×" for p, n in sorted(counts.items(), key=lambda kv: -kv[1]))
            for group, counts in chosen.items()
        )
        lines += ["", f"Pooling chosen on val (over checkpoints and evaluation splits): {listed}."]
    clustered = [m for m in ev.results["methods"] if "cluster_ari" in ev.results["summary"][m["name"]]]
    if clustered:  # what a scanpy user sees: Leiden clusters of each representation against the labels
        lines += [
            "",
            "| representation (Leiden) | ARI, resolution 1 | NMI, resolution 1 | ARI, best resolution (scIB) "
            "| NMI, best resolution |",
            "|---|---|---|---|---|",
        ]
        for m in clustered:
            name = m["name"] if m["group"] == "baseline" else m["group"]
            s = ev.results["summary"][m["name"]]
            cells = " | ".join(format_summary(s[k]) if k in s else "" for k in clustering.METRICS)
            lines.append(f"| {md_cell(name)} | {cells} |")
        lines += ["", clustering_note(ev.results.get("protocol_settings", {}).get("leiden", {}))]
    return lines


METRICS_NOTE = (
    f"{MACRO_F1_NOTE} MCC: the Matthews correlation coefficient over all classes at once (scikit-learn's "
    "multiclass form, Gorodkin's R_K): 0 for a constant or chance prediction, 1 for a perfect one; "
    "unlike accuracy it does not reward predicting the largest class."
)


def clustering_note(leiden: dict[str, Any]) -> str:
    """How the Leiden columns were scored, from the evaluation's own record (`protocol_settings`):
    an evaluation reused from older code used another grid."""
    # evaluations from before metrics.json recorded its settings (early 2026-12-07) used the half grid
    grid = leiden.get("best_resolution_grid") or [0.2, 0.4, 2.0]
    spacing = (
        f"{grid[0]:g}, {grid[1]:g}, …, {grid[-1]:g}" if len(grid) > 2 else ", ".join(f"{r:g}" for r in grid)
    )
    ties = (
        "the lowest of equals"
        if "lowest" in leiden.get("best_resolution_by", "")
        else "of equals the one nearest 1 (biomask until late on 2026-12-07)"
    )
    return (
        f"Leiden: scanpy's kNN graph ({clustering.N_NEIGHBORS} neighbours) of the representation over every "
        "labelled record, not only a split's test records, clustered without the labels and scored against "
        "them (ARI, NMI); a split changes only the random seed of the neighbour search and of Leiden (and "
        "a model's pooling where it is chosen on validation), so a baseline's interval here is over those "
        f"seeds. Best resolution (scIB, Luecken et al. 2022): of resolutions {spacing}, the one whose "
        f"clusters have the highest NMI against these same labels ({ties}) — a choice on the scored "
        "labels, optimistic for every representation alike."
    )


def _code_label(code: dict[str, Any]) -> str:
    commit = (code.get("git_commit") or "")[:10] or "no commit"
    source = f", source {str(code['source_sha256'])[:12]}" if code.get("source_sha256") else ""
    return f"{commit}{' (dirty)' if code.get('git_dirty') else ''}{source}"


def _code_versions(records: list[StageRecord], renderer: dict[str, Any] | None = None) -> list[str]:
    """A line when the inputs were not all written by one clean code version (a run that spanned a
    commit, or uncommitted changes), or when the one version that wrote them is not the code that
    renders the report (a report rebuilt after a pull): the header's commit is then not the whole
    story, and a reader would take the renderer's commit for the results'."""
    versions: dict[str, list[str]] = {}
    for r in records:
        versions.setdefault(_code_label(r.code), []).append(r.path.name)
    dirty = any(r.code.get("git_dirty") for r in records)
    if len(versions) == 1 and not dirty and renderer is not None:
        written, ours = records[0].code.get("source_sha256"), renderer.get("source_sha256")
        # outputs of before 2026-12-05 recorded no source hash: their clean commit tells instead
        commits = records[0].code.get("git_commit"), renderer.get("git_commit")
        other_commit = not written and all(commits) and commits[0] != commits[1]  # dirty or not: other code
        if (written and ours and written != ours) or other_commit:
            return [
                "",
                f"**Code versions.** Every input stage was written by {next(iter(versions))}; this report "
                f"was rendered by {_code_label(renderer)}: the results are the former's, the header's "
                "commit only the renderer's. See the provenance table below.",
            ]
    if len(versions) <= 1 and not dirty:
        return []
    parts = [
        f"{label}: {len(names)} output{'s' if len(names) > 1 else ''} ({', '.join(names[:3])}{', …' if len(names) > 3 else ''})"
        for label, names in versions.items()
    ]
    return [
        "",
        f"**Code versions.** The inputs were written by {len(versions)} code version"
        f"{'s' if len(versions) > 1 else ''}"
        + (", some with uncommitted changes" if dirty else "")
        + ": "
        + "; ".join(parts)
        + ". The same source sha256 means the same code; see the provenance table below.",
    ]


def _provenance(records: list[StageRecord], report_dir: Path) -> list[str]:
    lines = [
        "| stage | output | fingerprint | code | inputs (file sha256 or stage fingerprint) | seeds |",
        "|---|---|---|---|---|---|",
    ]
    for r in records:
        commit = _code_label(r.code)
        inputs = "<br>".join(
            f"{i.get('name')}: `{str(i.get('sha256') or i.get('fingerprint'))[:12]}`" for i in r.inputs
        )
        seeds = ", ".join(f"{k}={v}" for k, v in r.seeds.items())
        lines.append(
            f"| {r.stage} | `{shown(r.path, report_dir)}` | `{r.fingerprint[:12]}` | biomask {r.code.get('biomask', '?')} {commit} | {inputs} | {seeds} |"
        )
    lines.append("")
    for r in records:
        lines += [
            f"<details><summary>resolved config: {shown(r.path, report_dir)}</summary>",
            "",
            "```yaml",
            r.config_text.rstrip(),
            "```",
            "",
            "</details>",
            "",
        ]
    return lines


# ------------------------------------------------------------------------------------------- the stage


def _embedded_by(h5ad: str, report_dir: Path, key: str) -> str:
    """Which model made the embeddings the UMAP shows, as `biomask embed` recorded it in uns[key]
    (a study evaluates many checkpoints; the figure is of one): '' where the file has no such
    record."""
    import anndata

    try:
        adata = anndata.read_h5ad(h5ad, backed="r")
        try:
            record = dict(adata.uns.get(key, {}))
        finally:
            adata.file.close()  # a report run in a notebook kept the file open for reading otherwise
    except (OSError, ValueError, KeyError):
        return ""
    if not record.get("checkpoint"):
        return ""
    steps = f", {record['training_steps']} steps" if record.get("training_steps") is not None else ""
    scheme = f" ({record['masking_scheme']}{steps})" if record.get("masking_scheme") else ""
    how = ", ".join(
        f"{name} {record[key]}"
        for name, key in (("pooling", "pooling"), ("layer", "layer"), ("normalisation", "normalisation"))
        if record.get(key) is not None
    )
    cells = f"{record['cells']} cells" if record.get("cells") is not None else "the cells"
    weights = (
        f", weights sha256 `{str(record['checkpoint_weights_sha256'])[:12]}`"
        if record.get("checkpoint_weights_sha256")
        else ""
    )
    return (
        f"; {cells} embedded by the checkpoint `{shown(record['checkpoint'], report_dir, recorded=True)}`{scheme}{weights}"
        + (f" ({how})" if how else "")
        + _genes_measured(record)
    )


def _genes_measured(record: dict) -> str:
    """How many of the model's genes the embedded cells measured, and from which identifiers: the
    figure of a model that saw few of its genes (another gene naming, another species) is no
    picture of what it learned, and the report said nothing of it."""
    found = record.get("gene_coverage")
    try:
        present, known = int(found["vocab_genes_present"]), int(found["vocab_genes"])
    except (TypeError, KeyError, ValueError):
        return ""
    column = record.get("gene_id_column")
    source = f", matched on {column}" if column and column != "var index" else ""
    low = (
        " — **too few for the figure to show what the model learned**"
        if known and present < known / 2
        else ""
    )
    return f"; {present:,} of the model's {known:,} genes measured{source}{low}"


def strongest_baseline(ev: Evaluation, metric: str) -> str | None:
    """The baseline with the best mean on `metric`, among those that have it (only the kNN baselines
    carry clustering scores): one rule for the targets and the per-evaluation sections."""
    baselines = [
        m["name"]
        for m in ev.results["methods"]
        if m["group"] == "baseline" and metric in ev.results["summary"].get(m["name"], {})
    ]
    return max(baselines, key=lambda name: ev.mean(name, metric), default=None)


def render(cfg: ReportConfig, out: Path) -> str:
    """Collect every input, draw the figures into `out/figures`, return the Markdown."""
    fig_dir = out / "figures"
    runs = {modality: find_pretrain_runs(paths) for modality, paths in cfg.pretrain.items()}
    evaluations = {
        key: load_evaluation(key, spec.path, spec.metric, spec.title) for key, spec in cfg.evaluations.items()
    }
    # figure file names: distinct whatever the keys' case or punctuation, and inside figures/
    pretrain_slugs, eval_slugs = file_slugs(list(runs)), file_slugs(list(evaluations), keep="_")
    groups = {m.get("group") for ev in evaluations.values() for m in ev.results["methods"]}
    if evaluations and cfg.r2mae not in groups:
        found = sorted(str(g) for g in groups - {None, "baseline", "random-init"})
        log.warning(
            "report: r2mae: %r names no checkpoint of these evaluations (their checkpoints: %s), so the "
            "report has no R²MAE comparison; set r2mae to one of them",
            cfg.r2mae,
            ", ".join(found) or "none",
        )
    code = code_version()
    paths = [run.path for mruns in runs.values() for run in mruns] + [ev.path for ev in evaluations.values()]
    if cfg.embedding is not None:
        paths.append(Path(cfg.embedding.path).parent)
    paths += [Path(p) for p in cfg.provenance]
    records = [r for r in (stage_record(p) for p in dict.fromkeys(paths)) if r is not None]
    lines = [
        f"# {cfg.title}",
        "",
        f"Generated {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M UTC} by biomask {__version__}"
        + (
            f" (commit {code['git_commit'][:10]}{', dirty' if code.get('git_dirty') else ''})"
            if code.get("git_commit")
            else ""
        )
        + ". "
        + _how_to_read(any("unit" in ev.results for ev in evaluations.values())),
        *_code_versions(records, code),
        "",
        "## Summary",
        "",
    ]
    targets = target_rows(cfg, evaluations)
    chosen = {key: spec.chosen_on for key, spec in cfg.evaluations.items() if spec.chosen_on}
    noted: set[str] = set()
    for row in targets:
        t = row["target"]
        if "missing" in row:
            log.warning("report: target %s / %s not assessed: %s", t.evaluation, t.protocol, row["missing"])
            lines.append(
                f"- **Target** {t.evaluation} / {t.protocol} / {_METRIC_NAMES[t.metric]}: not assessed ({row['missing']})."
            )
            continue
        ev = row["evaluation"]
        base = format_summary(ev.results["summary"][row["baseline"]][t.metric])
        ref = ""
        if t.reference:  # what the bar is and where a quoted figure comes from, in the config's words
            ref = f" (reference: {t.reference})"
        lines.append(
            f"- **Target: {ev.title}, {t.protocol.replace('_', ' ')} {_METRIC_NAMES[t.metric]} ≥ the strongest baseline** — {row['baseline']}: {base}{ref}."
        )
        lines += _notes_once(ev, noted)
        if t.evaluation in chosen and f"chosen:{t.evaluation}" not in noted:  # once per evaluation
            noted.add(f"chosen:{t.evaluation}")
            lines.append(
                f"  - *Settings chosen on this evaluation's own scores*: {chosen[t.evaluation]}. Neither the "
                "interval nor Holm's correction accounts for that choice: read the verdict as optimistic."
            )
        for e in row["entries"]:
            ours = format_summary(ev.results["summary"][e["method"]][t.metric])
            no_interval = e["cmp"]["n"] < 2 or not math.isfinite(e["cmp"]["ci_low"])
            status = _STATUS_TEXT[e["status"]] + (" (no interval: by the means)" if no_interval else "")
            splits = per_split_differences(ev, e["method"], row["baseline"], t.metric)
            lines.append(
                f"  - {e['label']} ({e['method']}): {ours} → {status}; "
                f"{_cmp_text(e['cmp'], t.metric, _unit(ev), splits)}{_across_splits(splits, t.metric, e['status'])}"
                f"{_on_mcc(ev, e['method'], row['baseline'], t.metric)}."
            )
    for ev in evaluations.values():
        lines += comparison_bullets(ev, cfg.r2mae, pairwise=cfg.evaluations[ev.key].pairwise)
    for modality, mruns in runs.items():
        lines += _pretraining_verdict(modality, mruns, cfg.r2mae)
        lines += _learned_verdict(modality, mruns)
    summary_start = lines.index("## Summary")
    tested, survivors = _holm_survivors(lines[summary_start:])
    holm_p = max((p for i, p, _ in tested if i in survivors), default=None) if len(tested) > 1 else None
    lines[summary_start:] = _mark_holm_survivors(lines[summary_start:])
    lines += _multiplicity_note(lines[summary_start:])
    glance = _targets_at_a_glance(targets, holm_p, chosen)
    drawn = _target_entries(targets)
    if drawn:
        figures.target_differences(drawn, fig_dir / TARGETS_PNG)
        glance += [f"![targets' paired differences](figures/{TARGETS_PNG})", ""]
    lines[summary_start + 2 : summary_start + 2] = glance
    # written into the stage's temporary folder, renamed into place with report.md
    (out / SUMMARY_JSON).write_text(
        json.dumps(_targets_json(targets, holm_p, chosen), indent=2, allow_nan=False) + "\n", encoding="utf-8"
    )
    lines.append("")

    lines += ["## Pretraining", ""]
    for modality, mruns in runs.items():
        if not mruns:
            continue
        slug = pretrain_slugs[modality]
        curves = figures.training_curves(mruns, modality, fig_dir / f"pretrain-{slug}-curves.png")
        hist = figures.ratio_histograms(mruns, modality, fig_dir / f"pretrain-{slug}-ratios.png")
        grid = figures.loss_by_ratio(mruns, modality, fig_dir / f"pretrain-{slug}-loss-by-ratio.png")
        lines += [
            f"### {modality}",
            "",
            *_pretrained_on(mruns, Path(cfg.output)),
            *_pretrain_table(mruns),
            "",
        ]
        for fig in (curves, hist, grid):
            lines += [f"![{fig.stem}](figures/{fig.name})", ""]

    lines += ["## Downstream tasks", ""]
    for ev in evaluations.values():
        seeds = ev.results["seeds"]
        lines += [
            f"### {ev.title}",
            "",
            f"{len(seeds)} evaluation splits ({', '.join(map(str, seeds))}; {_split_mode(ev)}"
            + _split_sizes(ev)
            + ")"
            + (f"; pretrained models summarised over {ev.results['unit']}" if "unit" in ev.results else "")
            + "; "
            f"main metric: {_METRIC_NAMES[ev.metric]}; strongest baseline (on it): "
            f"{strongest_baseline(ev, ev.metric)}.",
            "",
            *[f"- Note: {note}" for note in ev.results.get("notes") or []],
            *([""] if ev.results.get("notes") else []),
            *_evaluation_table(ev),
            "",
            METRICS_NOTE,  # how the table's macro-F1 averages (per-class support: the evaluation's report.md)
            "",
        ]
        rows = [
            {**r, "vs": f"best fixed: {r['group']} (on {r['chosen_on']})"}
            for r in r2mae_vs_fixed(ev, cfg.r2mae)
        ]
        rows += [{**r, "vs": r["group"]} for r in r2mae_vs_schedules(ev, cfg.r2mae)]
        rows += [{**r, "vs": "random init"} for r in r2mae_vs_random_init(ev, cfg.r2mae)]
        if rows:
            lines += [
                f"R²MAE paired with each comparison over {_unit(ev)}; detectable: the smallest true "
                "difference the paired t-test finds with 80 % power at this n and spread.",
                "",
                "| protocol | R²MAE vs | "
                + _METRIC_NAMES[ev.metric]
                + " difference [95 % CI] | detectable | p (paired t) | R²MAE better in | verdict |",
                "|---|---|---|---|---|---|---|",
            ]
            for row in rows:
                c = row["cmp"]
                lines.append(
                    f"| {row['protocol']} | {row['vs']} | {signed(c['mean_difference'])} [{signed(c['ci_low'])}, {signed(c['ci_high'])}] | "
                    f"±{detectable_difference(c):.3f} | {c['p_value']:.2g} | {c['wins']}/{c['n']} | "
                    f"{verdict(c, 'better', 'worse')} |"
                )
            lines.append("")
        fig = figures.metric_intervals(ev, fig_dir / f"eval-{eval_slugs[ev.key]}.png")
        lines += [f"![{fig.stem}](figures/{fig.name})", ""]

    if cfg.embedding is not None:
        title = cfg.embedding.title  # None: the embedding and the checkpoint it came from
        key = cfg.embedding.key
        fig = figures.umap(cfg.embedding.path, cfg.embedding.color, title, fig_dir / "umap.png", key)
        lines += [
            "## Embeddings",
            "",
            f"`{shown(cfg.embedding.path, Path(cfg.output))}`: `obsm[{key!r}]`, neighbours and UMAP with scanpy"
            + _embedded_by(cfg.embedding.path, Path(cfg.output), key)
            + "."
            + _vectors_note(cfg.embedding.path, key),
            "",
            f"![umap](figures/{fig.name})",
            "",
        ]

    lines += ["## Configs, seeds and data checksums", "", *_provenance(records, Path(cfg.output))]
    return "\n".join(lines) + "\n"


def _vectors_note(h5ad: str, key: str) -> str:
    """Said where the file's vectors are not those biomask embed wrote (their sha256 in uns): cells
    removed or reordered (a subset of the embedded file is a usual thing to draw), or values edited —
    the figure is of the file as it is, and its record is not the vectors' any more."""
    from biomask.embedding.anndata_io import changed_embedding

    if not changed_embedding(h5ad, key):
        return ""
    log.warning(
        "report: %s: obsm[%r] is not what biomask embed wrote (cells removed or reordered, or "
        "values edited); the UMAP is of the file as it is, and the report says so",
        h5ad,
        key,
    )
    return (
        f" **Its vectors are not those biomask embed wrote** (their sha256 in `uns[{key!r}]` differs: "
        "cells removed or reordered, or values edited since); the figure is of the file as it is"
    )


def make_report(cfg: ReportConfig, *, overwrite: bool = False) -> Path:
    """Write `report.md` and `figures/` into the output directory; return the report's path."""
    check_inputs(cfg)
    stage = stage_output(cfg)
    if not overwrite:
        refuse_older_report(cfg)
    if stage.is_current(overwrite=overwrite):
        return Path(cfg.output) / "report.md"
    with stage.writing() as tmp:
        (tmp / "report.md").write_text(render(cfg, tmp), encoding="utf-8")
    log.info("report written to %s", Path(cfg.output) / "report.md")
    return Path(cfg.output) / "report.md"
