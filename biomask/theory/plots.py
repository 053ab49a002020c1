"""Figures of `biomask theory` (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from biomask.theory.study import Setting

RISK_PNG = "risk_vs_ratio.png"
OPTIMUM_PNG = "optimum_vs_size.png"
RANDOM_PNG = "random_vs_fixed.png"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _limits(s: Setting) -> tuple[float, float]:
    """y-limits that show the curve's shape: ratios outside `regular_ratios` (next to the
    interpolation threshold, or with almost no visible context) can have enormous, heavy-tailed
    risks and are left to run off the chart rather than flatten everything else."""
    from biomask.theory.study import regular_ratios

    a = s.analysis
    tame = regular_ratios(s.ratios, s.n, s.d)
    fixed = [f for f, ok in zip(a["fixed"], tame) if ok] or a["fixed"]
    top_values = [f["mean"] for f in fixed] + [r["risk"]["mean"] for r in a["random"]]
    top = min(max(v for v in top_values if np.isfinite(v)), 1.6)
    bottom_values = [f["ci_low"] for f in fixed] + [r["risk"]["ci_low"] for r in a["random"]]
    bottom = max(min([*bottom_values, float(np.nanmin(s.theory))]), 0.0)
    if a["bayes_risk"] > bottom - 0.15 * (top - bottom):
        bottom = min(bottom, a["bayes_risk"])
    span = max(top - bottom, 1e-3)
    return bottom - 0.06 * span, top + 0.06 * span


def risk_curves(settings: list[Setting], path: Path) -> Path:
    """Risk against mask ratio: one panel per (covariance, model size)."""
    plt = _pyplot()
    covs = list(dict.fromkeys(s.analysis["covariance"] for s in settings))
    gammas = list(dict.fromkeys(s.gamma for s in settings))
    fig, axes = plt.subplots(
        len(covs), len(gammas), figsize=(3.3 * len(gammas), 3.0 * len(covs)), squeeze=False
    )
    colours = plt.get_cmap("tab10").colors
    for s in settings:
        a = s.analysis
        ax = axes[covs.index(a["covariance"])][gammas.index(s.gamma)]
        lo, hi = _limits(s)
        f = a["fixed"]
        mean = np.array([x["mean"] for x in f])
        ax.fill_between(s.ratios, [x["ci_low"] for x in f], [x["ci_high"] for x in f], color="0.75", lw=0)
        ax.plot(s.ratios, mean, "o-", color="black", ms=2.5, lw=1, label="fixed p (mean, 95 % CI)")
        ax.plot(
            s.theory_ratios,
            np.clip(s.theory, None, 10 * hi),
            "--",
            color="tab:red",
            lw=1,
            label="deterministic equivalent",
        )
        for k, r in enumerate(a["random"]):
            low, high = r["range"]
            m = r["risk"]["mean"]
            colour = colours[(k + 1) % len(colours)]
            if m <= hi:
                ax.hlines(m, low, high, color=colour, lw=2, label=f"R²MAE {r['label']}")
                ax.errorbar(
                    (low + high) / 2,
                    m,
                    yerr=[[m - r["risk"]["ci_low"]], [r["risk"]["ci_high"] - m]],
                    color=colour,
                    capsize=2,
                    lw=1,
                )
            else:  # off the chart (e.g. a range across the interpolation peak): say where it is
                ax.annotate(
                    f"{r['label']}: {m:.3g}",
                    ((low + high) / 2, hi),
                    xytext=(0, -8 - 9 * k),
                    textcoords="offset points",
                    ha="center",
                    fontsize=6,
                    color=colour,
                )
        refs = [
            (1.0, ":", "0.4", "null predictor"),
            (a["bayes_risk"], "-.", "tab:green", "Bayes risk"),
            (a["unmasked"]["mean"], (0, (5, 2, 1, 2)), "tab:purple", "unmasked regression"),
        ]
        outside = []
        for value, style, colour, name in refs:
            if lo <= value <= hi:
                ax.axhline(value, ls=style, color=colour, lw=1, label=name)
            else:
                outside.append(f"{name} {value:.2f}")
        if a["interpolation_ratio"] is not None:
            ax.axvline(a["interpolation_ratio"], color="tab:orange", lw=0.8, alpha=0.7)
            ax.text(a["interpolation_ratio"], lo, " pn = d", fontsize=6, va="bottom", color="tab:orange")
        best = a["best_fixed"]
        ax.plot(best["ratio"], best["risk"]["mean"], "v", color="tab:blue", ms=6)
        if outside:
            ax.text(0.02, 0.02, "off-chart: " + ", ".join(outside), transform=ax.transAxes, fontsize=6)
        ax.set_ylim(lo, hi)
        ax.set_xlim(0, 1)
        ax.set_title(f"{a['covariance']}, γ = d/n = {s.gamma:g} ({a['regime']})", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("mask ratio p", fontsize=7)
        ax.set_ylabel("test risk (null = 1)", fontsize=7)
    handles, labels = {}, []
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            if label not in handles:
                handles[label] = h
                labels.append(label)
    fig.legend([handles[x] for x in labels], labels, loc="lower center", ncol=min(len(labels), 5), fontsize=7)
    fig.tight_layout(rect=(0, 0.06 + 0.02 * (len(labels) > 5), 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def optimum_vs_size(settings: list[Setting], path: Path) -> Path:
    """The best fixed ratio against model size: simulated (bootstrap interval) and theory."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    covs = list(dict.fromkeys(s.analysis["covariance"] for s in settings))
    for k, cov in enumerate(covs):
        group = sorted((s for s in settings if s.analysis["covariance"] == cov), key=lambda s: s.gamma)
        g = np.array([s.gamma for s in group])
        best = np.array([s.analysis["best_fixed"]["ratio"] for s in group])
        low = np.array([s.analysis["best_fixed"]["interval"][0] for s in group])
        high = np.array([s.analysis["best_fixed"]["interval"][1] for s in group])
        theory = [s.analysis["best_fixed"]["theory_ratio"] for s in group]
        colour = f"C{k}"
        shift = 1 + 0.04 * (k - (len(covs) - 1) / 2)  # keep the error bars apart on the log axis
        ax.errorbar(
            g * shift,
            best,
            yerr=[best - low, high - best],
            fmt="o",
            color=colour,
            capsize=3,
            label=f"{cov}: simulation (95 % bootstrap)",
        )
        theory = np.array(theory)
        for k_side, side in enumerate((g < 1, g > 1)):  # no line across γ = 1: sizes between are not run
            ax.plot(
                g[side],
                theory[side],
                "--",
                color=colour,
                label=f"{cov}: deterministic equivalent" if k_side == 0 else None,
            )
    ax.axvspan(min(s.gamma for s in settings) / 1.5, 1.0, color="0.92", lw=0)
    ax.text(
        0.98,
        0.02,
        "under-\nparameterised",
        fontsize=7,
        ha="right",
        va="bottom",
        transform=ax.get_xaxis_transform(),
    )
    ax.set_xscale("log")
    gammas = sorted({s.gamma for s in settings})
    ax.set_xticks(gammas, [f"{g:g}" for g in gammas])
    ax.minorticks_off()
    ax.set_xlabel("model size γ = d / n")
    ax.set_ylabel("best fixed mask ratio p*")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def random_vs_fixed(settings: list[Setting], path: Path) -> Path:
    """Forest plot: risk(best fixed p) − risk(R²MAE) with its paired 95 % CI; > 0 means R²MAE wins."""
    plt = _pyplot()
    rows = [(s, r) for s in settings for r in s.analysis["random"]]
    fig, ax = plt.subplots(figsize=(6, 0.22 * len(rows) + 1.2))
    for i, (_s, r) in enumerate(rows):
        c = r["vs_best_fixed"]
        colour = "tab:green" if c["ci_low"] > 0 else "tab:red" if c["ci_high"] < 0 else "0.3"
        ax.errorbar(
            c["mean_difference"],
            i,
            xerr=[[c["mean_difference"] - c["ci_low"]], [c["ci_high"] - c["mean_difference"]]],
            fmt="o",
            color=colour,
            ms=3,
            capsize=2,
        )
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(
        [f"{s.analysis['covariance']} γ={s.gamma:g} {r['label']}" for s, r in rows], fontsize=6
    )
    ax.invert_yaxis()
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlabel("risk(best fixed p) − risk(R²MAE), paired 95 % CI  (> 0: R²MAE better)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def all_figures(settings: list[Setting], directory: Path) -> list[Path]:
    return [
        risk_curves(settings, directory / RISK_PNG),
        optimum_vs_size(settings, directory / OPTIMUM_PNG),
        random_vs_fixed(settings, directory / RANDOM_PNG),
    ]
