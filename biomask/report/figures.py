"""The report's figures (matplotlib, written as PNG files)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from biomask.agg import subplots as _subplots
from biomask.evaluation.methods import CHOSEN_ON_VAL
from biomask.evaluation.metrics import METRICS
from biomask.report.collect import Evaluation, PretrainRun

_NAMES = {
    "accuracy": "accuracy",
    "macro_f1": "macro-F1",
    "mcc": "MCC",
    "cluster_ari": "Leiden ARI (res. 1)",
    "cluster_ari_best": "Leiden ARI (NMI-optimal res.)",
}


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # a legend outside the axes stays in the file
    return path


def _legend(ax: Axes) -> None:
    """The legend beside the axes, never over the lines (inside, it covered the curves it named)."""
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0, frameon=False)


_MARKERS = ("o", "s", "^", "D", "v", "P")
_LINES = ("-", "--", ":", "-.")


def _style(i: int) -> dict:
    """Style i of a sequence: ten colours, then the next marker, so no two of up to 60 look alike
    (matplotlib's cycle repeats its colour after ten)."""
    return {"color": f"C{i % 10}", "marker": _MARKERS[(i // 10) % len(_MARKERS)]}


def _arm(run: PretrainRun) -> str:
    """What a run is apart from its seed: its masking, and any other setting its sweep varied (the
    resolved config without `output` and `train.seed`)."""
    config = {k: v for k, v in (getattr(run, "config", None) or {}).items() if k != "output"}
    if isinstance(config.get("train"), dict):
        config["train"] = {k: v for k, v in config["train"].items() if k != "seed"}
    return json.dumps([run.masking, config], sort_keys=True, default=str)


def _run_styles(runs: list[PretrainRun]) -> list[dict]:
    """One colour per arm (a masking scheme, or whatever else its sweep varied), a line style and
    marker per run within it (its seeds): with a colour per run, the eleventh run took the first's
    (bert15 seed 0 and r2mae seed 1 differed by a marker alone). Arms k and k+10 share a colour and
    differ in marker (an offset of 3), so (colour, line, marker) stays distinct up to 20 arms of up
    to 12 seeds."""
    arms: dict[str, int] = {}
    within: dict[str, int] = {}
    styles = []
    for run in runs:
        key = _arm(run)
        k = arms.setdefault(key, len(arms))
        j = within[key] = within.get(key, -1) + 1
        styles.append(
            {
                "color": f"C{k % 10}",
                "ls": _LINES[j % len(_LINES)],
                "marker": _MARKERS[(3 * (k // 10) + j) % len(_MARKERS)],
            }
        )
    return styles


def loss_unit_label(runs: list[PretrainRun]) -> str:
    """' (nats)' or ' (standardised-MSE units)' for a loss axis where every run shares the unit, ''
    where they do not (a bare 'loss' axis left nats and MSE units to be guessed)."""
    units = {run.loss_unit for run in runs}
    return f" ({units.pop()})" if len(units) == 1 else ""


SMOOTH_FROM = 500  # logged training steps from which the loss curve is drawn as a running mean


def training_curves(runs: list[PretrainRun], title: str, path: Path) -> Path:
    """Training loss (at each run's own ratios) and held-out mean loss over the ratio grid, by step;
    past SMOOTH_FROM logged steps, a running mean over the faint logged values."""
    fig, (left, right) = _subplots(1, 2, figsize=(11, 4))
    smoothed = False
    for run, style in zip(runs, _run_styles(runs)):
        if not run.train.empty:
            # markers every so often: the seeds of one arm (its colour) differ there by line and marker;
            # one logged step (a short run) is a point, which a line alone would not draw
            every = max(1, len(run.train) // 8)
            point = {"marker": style["marker"], "ms": 4 if len(run.train) == 1 else 3, "markevery": every}
            loss = run.train["loss"]
            if len(loss) > SMOOTH_FROM:
                # thousands of logged steps (a long run, log_every 1) drew a solid band of noise: the
                # logged values faint, a running mean over a hundredth of them on top
                left.plot(run.train["step"], loss, lw=0.5, alpha=0.25, color=style["color"])
                loss = loss.rolling(max(2, len(loss) // 100), min_periods=1).mean()
                smoothed = True
            left.plot(
                run.train["step"],
                loss,
                label=run.label,
                lw=1.2,
                color=style["color"],
                ls=style["ls"],
                **point,
            )
        if not run.evals.empty:
            right.plot(run.evals["step"], run.evals["mean_loss"], ms=3, label=run.label, lw=1.2, **style)
    unit = loss_unit_label(runs)
    # the two panels measure differently: training at each scheme's own ratios, positions and corruption
    # (80/10/10 leaves some masked tokens visible: lower loss); held out, one protocol for every run
    left.set(
        title=f"{title}: training loss\n(its own ratios and corruption: not comparable with the right)",
        xlabel="step",
        ylabel=f"masked loss{unit}" + (", running mean over 1 % of the steps" if smoothed else ""),
    )
    right.set(
        title="held-out masked loss, mean over the ratio grid\n(every masked token hidden, uniform positions)",
        xlabel="step",
        ylabel=f"mean loss{unit}",
    )
    _legend(right)
    return _save(fig, path)


HIST_COLUMNS = 5


def ratio_histograms(runs: list[PretrainRun], title: str, path: Path) -> Path:
    """The realised mask ratio of every training step, one histogram per run; of every record where
    the ratio is drawn per record (the batch's pooled ratio of such a run is near the range's mean)."""
    n = len(runs)
    # rows of at most HIST_COLUMNS panels: one row of 15 runs was 4,620 px wide, which a Markdown
    # viewer shrinks to an unreadable strip
    cols = min(n, HIST_COLUMNS)
    rows = -(-n // cols)
    mixed = any(
        getattr(run, "record_ratio_counts", None) is not None for run in runs
    )  # steps and records: own y scales
    fig, axes = _subplots(rows, cols, figsize=(2.8 * cols, 2.8 * rows), sharey=not mixed, squeeze=False)
    bins = np.linspace(0, 1, 41)
    for i, (ax, run) in enumerate(zip(axes.flat, runs)):
        records = getattr(run, "record_ratio_counts", None)
        if records is not None and len(records) == len(bins) - 1:
            ax.stairs(records, bins, fill=True, color="tab:orange")
            ax.set_title(f"{run.label}\n(per record)", fontsize=8)
        else:
            ax.hist(run.step_ratios, bins=bins, color="tab:blue")
            ax.set_title(run.label, fontsize=8)
        ax.set_xlabel("realised ratio")
        if i % cols == 0 or mixed:
            ax.set_ylabel("records" if records is not None else "steps")
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    per = "per step, per record where drawn per record" if mixed else "per step"
    fig.suptitle(f"{title}: realised mask ratio {per}", fontsize=10)
    return _save(fig, path)


def loss_by_ratio(runs: list[PretrainRun], title: str, path: Path) -> Path:
    """Each model's final held-out masked loss at every ratio of the evaluation grid."""
    fig, ax = _subplots(figsize=(6, 4))
    for run, style in zip(runs, _run_styles(runs)):
        losses = run.final_eval.get("loss", {})
        if losses:
            ratios = sorted(losses, key=float)
            ax.plot([float(r) for r in ratios], [losses[r] for r in ratios], label=run.label, **style)
    # the reference predictors on the masked tokens, drawn once (the first run's): runs of one
    # training seed mask the same held-out tokens, and other seeds' references differ by noise only
    first = next((run for run in runs if run.references), None)
    for (name, ref), style in zip((first.references if first else {}).items(), ("--", ":", "-.")):
        ratios = sorted(ref.get("loss", {}), key=float)
        if ratios:
            ax.plot([float(r) for r in ratios], [ref["loss"][r] for r in ratios], "k" + style, label=name)
    ax.set(
        title=f"{title}: held-out masked loss by evaluation ratio",
        xlabel="mask ratio at evaluation",
        ylabel=f"held-out masked loss{loss_unit_label(runs)}",
    )
    _legend(ax)
    return _save(fig, path)


# Okabe & Ito's colour-blind-safe palette, and a marker and a word per verdict: red against green
# was the only cue, which one reader in twelve cannot tell apart
_VERDICT_STYLE = {
    "met": ("#009E73", "^"),  # bluish green, a triangle pointing up
    "level": ("#7F7F7F", "o"),  # grey, a circle
    "not met": ("#D55E00", "v"),  # vermillion, a triangle pointing down
}


def target_differences(entries: list[dict], path: Path) -> Path:
    """The targets' verdicts as a picture: each model's paired difference from the strongest baseline
    with its 95 % interval, one row per (target, model), its verdict in colour, marker and word, zero
    marked — what the verdicts rest on (the evaluation figures show each method's own interval, not
    the pairing). `entries`: {"label", "difference", "low", "high", "status"} (low/high None: no
    interval)."""
    from matplotlib.transforms import blended_transform_factory

    fig, ax = _subplots(figsize=(11, 0.32 * len(entries) + 1.3))
    y = np.arange(len(entries))[::-1]
    margin = blended_transform_factory(ax.transAxes, ax.transData)  # x: the axes' right edge; y: a row
    for row, e in zip(y, entries):
        colour, marker = _VERDICT_STYLE.get(e["status"], ("#0072B2", "s"))
        if e["low"] is not None and e["high"] is not None:
            ax.hlines(row, e["low"], e["high"], color=colour, lw=2)
        ax.plot(e["difference"], row, marker, color=colour, ms=6)
        ax.text(1.01, row, e["status"], transform=margin, va="center", fontsize=7, color=colour)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(y, [e["label"] for e in entries], fontsize=7)
    ax.set(
        xlabel="pretrained − strongest baseline (each target's metric; paired, 95 % interval)",
        title="Targets: ▲ met, ● level (the interval holds 0), ▼ not met",
    )
    ax.title.set_fontsize(9)
    return _save(fig, path)


def _colour(method: dict, grouped: bool) -> str:
    """Grey: a baseline; blue: a pretrained scheme over its seeds (or, ungrouped, a checkpoint);
    orange: the random init and per-split picks (chosen on val), over the evaluation splits."""
    if method["group"] == "baseline":
        return "tab:gray"
    if method["group"] == "random-init" or method["group"] == CHOSEN_ON_VAL:
        return "tab:orange"
    return "tab:blue" if "members" in method or not grouped else "tab:orange"


def metric_intervals(evaluation: Evaluation, path: Path) -> Path:
    """Mean and 95 % CI over seeds of each method, per metric; and Leiden ARI where methods have it
    (the kNN protocol's clustering: a figure without it would hide where a model loses)."""
    methods = evaluation.results["methods"]
    summaries = evaluation.results["summary"]
    # both clustering scores the targets use: resolution 1, and scIB's (the NMI-optimal resolution)
    clustering = [
        metric
        for metric in ("cluster_ari", "cluster_ari_best")
        if any(metric in summaries[m["name"]] for m in methods)
    ]
    panels = [*METRICS, *clustering]
    fig, axes = _subplots(1, len(panels), figsize=(4.2 * len(panels), 0.35 * len(methods) + 1.4), sharey=True)
    labels = [m["name"] if m["group"] == "baseline" else f"{m['group']} / {m['protocol']}" for m in methods]
    grouped = "unit" in evaluation.results  # pretrained schemes summarised over their pretraining seeds
    y = np.arange(len(methods))
    missing = {"mean": np.nan, "ci_low": np.nan, "ci_high": np.nan, "n": 0}
    for ax, metric in zip(axes, panels):
        summary = [summaries[m["name"]].get(metric, missing) for m in methods]  # ARI: kNN rows only
        mean = np.array([s["mean"] for s in summary])
        low = np.array([s["ci_low"] if s["n"] > 1 else s["mean"] for s in summary])
        high = np.array([s["ci_high"] if s["n"] > 1 else s["mean"] for s in summary])
        colors = [_colour(m, grouped) for m in methods]
        ax.errorbar(
            mean, y, xerr=[mean - low, high - mean], fmt="none", ecolor="black", elinewidth=1, capsize=2
        )
        ax.scatter(mean, y, c=colors, zorder=3)
        ax.set_title(_NAMES[metric])
    axes[0].set_yticks(y, labels, fontsize=7)
    axes[0].invert_yaxis()
    splits = f"{len(evaluation.results['seeds'])} evaluation splits"
    over = (
        f"blue, pretrained schemes: over {evaluation.results['unit'].split(' (')[0]}; grey (baselines) and "
        f"orange (the rest): over {splits}"
        if grouped
        else f"over {splits}; grey: baselines, blue: pretrained models, orange: the rest"
    )
    fig.suptitle(f"{evaluation.title}\nmean and 95 % CI ({over})", fontsize=9)
    return _save(fig, path)


def umap(h5ad: str, color: str, title: str | None, path: Path, key: str = "X_biomask") -> Path:
    """UMAP of the biomask embeddings (neighbours on obsm[key] only — never a UMAP the file
    already carries, which would be of its expression), coloured by an obs column."""
    import anndata

    from biomask.embedding.anndata_io import DIGEST_KEY
    from biomask.embedding.plots import umap_png
    from biomask.errors import InputError, first_line

    try:
        adata = anndata.read_h5ad(h5ad, backed="r")
    except OSError as exc:  # h5py's "truncated file" / "file signature not found" carry no errno
        raise InputError(
            f"embedding.path {h5ad} is not a readable .h5ad ({first_line(exc)}): give the file `biomask embed` "
            "wrote, whole"
        ) from None
    try:  # closed after: a report run in-process (a notebook) kept the file open, which then
        # refused to be written ("file is already open for read-only") until the kernel restarted
        if key not in adata.obsm:
            # embed's `key` chose another: name the keys biomask embed wrote (their uns record carries
            # the vectors' sha256), so the fix is a setting, not another embedding run
            ours = [
                k for k in adata.obsm if isinstance(adata.uns.get(k), dict) and DIGEST_KEY in adata.uns[k]
            ]
            raise InputError(
                f"{h5ad} has no obsm[{key!r}]"
                + (
                    f"; biomask embed wrote {', '.join(repr(k) for k in ours)} there: set embedding.key={ours[0]}"
                    if ours
                    else "; run `biomask embed` on it first (or set embedding.key to the obsm key it has)"
                )
            )

        if color not in adata.obs:
            raise InputError(
                f"{h5ad}: no obs column {color!r} to colour the UMAP by (columns: {', '.join(adata.obs)})"
            )
        if title is None:  # which model drew it: the run folder of the checkpoint embed recorded
            checkpoint = str((adata.uns.get(key) or {}).get("checkpoint") or "")
            title = f"{key} of {Path(checkpoint).parent.name}" if checkpoint else key
        path.parent.mkdir(parents=True, exist_ok=True)
        umap_png(np.asarray(adata.obsm[key]), adata.obs[color].reset_index(drop=True), path, title=title)
    finally:
        adata.file.close()
    return path
