"""Figures of `biomask theory` (matplotlib, drawn by Agg on figures of their own: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from biomask.agg import subplots as _subplots

if TYPE_CHECKING:
    from biomask.theory.study import Block

RISK_PNG = "risk_vs_ratio.png"
EQUIVALENCE_PNG = "equivalence.png"
RANDOM_PNG = "random_vs_fixed.png"
OPTIMUM_PNG = "optimum_vs_size.png"
TEST_RATIO_PNG = "test_ratio.png"
PROBE_PNG = "probe.png"
FIGURES = (RISK_PNG, EQUIVALENCE_PNG, RANDOM_PNG, OPTIMUM_PNG, TEST_RATIO_PNG, PROBE_PNG)


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def risk_curves(blocks: list[Block], path: Path) -> Path:
    """Best-scalar risk against the fixed ratio (test repetitions), one panel per covariance × K,
    one line per γ; the chosen ranges as bars over [a, b] with a dot at their p′."""
    covs = list(dict.fromkeys(b.cov.name for b in blocks))
    ks = list(dict.fromkeys(b.k_label for b in blocks))
    gammas = sorted({b.gamma for b in blocks})
    fig, axes = _subplots(len(covs), len(ks), figsize=(3.4 * len(ks), 2.7 * len(covs)), squeeze=False)
    for b in blocks:
        a = b.analysis
        ax = axes[covs.index(b.cov.name)][ks.index(b.k_label)]
        colour = f"C{gammas.index(b.gamma)}"
        t = a["curves"]["best_scalar"]["test"]
        mean = np.array([x["mean"] for x in t])
        ax.fill_between(
            a["grid"], [x["ci_low"] for x in t], [x["ci_high"] for x in t], color=colour, alpha=0.2, lw=0
        )
        ax.plot(a["grid"], mean, "-", color=colour, lw=1, label=f"γ = {b.gamma:g}")
        for mode, r in a["metrics"]["best_scalar"]["ranges"].items():
            y = r["test"]["mean"]
            ax.hlines(
                y, *r["range"], color=colour, lw=2.5, alpha=0.6, linestyles="-" if mode != "batch" else ":"
            )
            ax.plot(r["equivalent"], y, "o", color=colour, ms=3)
        ax.set_title(f"{b.cov.name}, K = {b.k_label}", fontsize=8)
        ax.set_xlim(0, 1)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("mask ratio p", fontsize=7)
        ax.set_ylabel("best-scalar risk", fontsize=7)
        ax.legend(fontsize=6)
    return _save(fig, path)


def equivalence(blocks: list[Block], path: Path) -> Path:
    """Left: every range's best-scalar risk against its equivalent fixed ratio's (K = ∞, all
    settings): on the identity line. Right: cosine between the chosen ranges' weights and p′'s by K."""
    fig, (left, right) = _subplots(1, 2, figsize=(9, 3.8))
    covs = list(dict.fromkeys(b.cov.name for b in blocks))
    for b in blocks:
        if b.epochs is None:
            pts = np.array(b.analysis["equivalence"]["points"])
            left.plot(pts[:, 4], pts[:, 3], ".", ms=2, color=f"C{covs.index(b.cov.name)}")
    lo, hi = left.get_xlim()
    left.plot([lo, hi], [lo, hi], "-", color="0.5", lw=0.6)
    for k, cov in enumerate(covs):
        left.plot([], [], ".", color=f"C{k}", label=cov)
    left.legend(fontsize=7)
    left.set_xlabel("fixed ratio p′: best-scalar risk", fontsize=8)
    left.set_ylabel("U(a, b): best-scalar risk", fontsize=8)
    left.set_title("K = ∞: every U(a, b) is its p′ = E[p²(1−p)]/E[p(1−p)]", fontsize=8)
    ks = list(dict.fromkeys(b.k_label for b in blocks))
    for b in blocks:
        for m in b.analysis["metrics"].values():
            for mode, r in m["ranges"].items():
                x = ks.index(b.k_label) + (0.15 if mode == "batch" else 0.0)
                right.plot(
                    x,
                    r["cosine_to_equivalent"]["mean"],
                    "o",
                    ms=3,
                    color="tab:red" if mode == "batch" else "tab:blue",
                )
    right.plot([], [], "o", color="tab:blue", label="per sample / mixture")
    right.plot([], [], "o", color="tab:red", label="per batch")
    right.set_xticks(range(len(ks)), [f"K = {k}" for k in ks])
    right.set_ylabel("mean cosine(ŵ range, ŵ p′)", fontsize=8)
    right.set_title("chosen ranges against their p′ (test repetitions)", fontsize=8)
    right.legend(fontsize=7)
    return _save(fig, path)


def random_vs_fixed(blocks: list[Block], path: Path) -> Path:
    """Forest plots: risk(best fixed) − risk(best range), paired 95 % CI on the test repetitions, for
    the primary metric and for the mask-aware model over test ratios; > 0: the range is better."""
    panels = [
        ("best_scalar", "zero-fill, best-scalar risk (primary)"),
        ("aware_q_avg", "mask-aware, risk over test ratios"),
    ]
    rows = [
        (b, mode, r) for b in blocks for mode, r in b.analysis["metrics"]["best_scalar"]["ranges"].items()
    ]
    fig, axes = _subplots(1, 2, figsize=(11, 0.17 * len(rows) + 1.4), sharey=True)
    for ax, (metric, title) in zip(axes, panels):
        for i, b in enumerate(rows):
            block, mode = b[0], b[1]
            c = block.analysis["metrics"][metric]["ranges"][mode]["vs_best_fixed"]
            colour = "tab:green" if c["ci_low"] > 0 else "tab:red" if c["ci_high"] < 0 else "0.3"
            ax.errorbar(
                c["mean_difference"],
                i,
                xerr=[[c["mean_difference"] - c["ci_low"]], [c["ci_high"] - c["mean_difference"]]],
                fmt="o",
                color=colour,
                ms=2.5,
                capsize=1.5,
                lw=0.8,
            )
        ax.axvline(0, color="black", lw=0.8)
        ax.set_xscale("symlog", linthresh=0.002)
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("risk(best fixed) − risk(best range)  (> 0: range better)", fontsize=7)
        ax.tick_params(labelsize=6)
    axes[0].set_yticks(range(len(rows)))
    axes[0].set_yticklabels(
        [f"{b.cov.name} γ={b.gamma:g} K={b.k_label} {mode}" for b, mode, _ in rows], fontsize=5.5
    )
    axes[0].invert_yaxis()
    return _save(fig, path)


def optimum_vs_size(blocks: list[Block], path: Path) -> Path:
    """The best fixed ratio (best-scalar risk, 95 % bootstrap over test repetitions) against γ."""
    fig, ax = _subplots(figsize=(5.5, 3.6))
    covs = list(dict.fromkeys(b.cov.name for b in blocks))
    ks = list(dict.fromkeys(b.k_label for b in blocks))
    markers = "os^D"
    for b in blocks:
        f = b.analysis["metrics"]["best_scalar"]["best_fixed"]
        k, j = covs.index(b.cov.name), ks.index(b.k_label)
        x = b.gamma * (1 + 0.05 * (k - 1.5) + 0.015 * j)
        ax.errorbar(
            x,
            f["ratio"],
            # the interval is over the test repetitions, the ratio chosen on the selection ones
            yerr=[[max(f["ratio"] - f["interval"][0], 0.0)], [max(f["interval"][1] - f["ratio"], 0.0)]],
            fmt=markers[j % len(markers)],
            color=f"C{k}",
            ms=4,
            capsize=2,
            alpha=1.0 if b.epochs is None else 0.6,
        )
    for k, cov in enumerate(covs):
        group = sorted((b for b in blocks if b.cov.name == cov and b.epochs is None), key=lambda b: b.gamma)
        ax.plot(
            [b.gamma for b in group],
            [b.analysis["metrics"]["best_scalar"]["best_fixed"]["ratio"] for b in group],
            "-",
            color=f"C{k}",
            lw=0.8,
            label=cov,
        )
    for j, k in enumerate(ks):
        ax.plot([], [], markers[j % len(markers)], color="0.4", label=f"K = {k}")
    ax.set_xscale("log")
    gammas = sorted({b.gamma for b in blocks})
    ax.set_xticks(gammas, [f"{g:g}" for g in gammas])
    ax.minorticks_off()
    ax.set_xlabel("model size γ = d / n")
    ax.set_ylabel("best fixed mask ratio p*")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=6, ncol=2)
    return _save(fig, path)


def test_ratio(blocks: list[Block], path: Path) -> Path:
    """Risk against the test ratio q for the schemes chosen on the averaged-over-q metrics, at the
    largest simulated γ: plain model raw and with dropout rescaling, mask-aware model."""
    top = max((b.gamma for b in blocks if b.epochs is not None), default=max(b.gamma for b in blocks))
    chosen = [b for b in blocks if b.gamma == top]
    covs = list(dict.fromkeys(b.cov.name for b in chosen))
    ks = list(dict.fromkeys(b.k_label for b in chosen))
    fig, axes = _subplots(len(ks), len(covs), figsize=(3.3 * len(covs), 2.6 * len(ks)), squeeze=False)
    for b in chosen:
        ax = axes[ks.index(b.k_label)][covs.index(b.cov.name)]
        c = b.analysis["test_ratio_curves"]
        for label, values in c["curves"].items():
            style = "--" if "raw" in label else ":" if "per batch" in label else "-"
            colour = "tab:orange" if label.startswith("mask-aware") else "tab:blue"
            if "U(" in label:
                colour = "tab:red" if label.startswith("mask-aware") else "tab:green"
            ax.plot(c["q"], values, style, color=colour, lw=1, label=label)
        ax.axhline(1.0, color="0.6", lw=0.5)
        ax.set_ylim(0, 1.3)
        ax.set_title(f"{b.cov.name} γ={b.gamma:g} K={b.k_label}", fontsize=8)
        ax.set_xlabel("test mask ratio q", fontsize=7)
        ax.set_ylabel("risk", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=4.5)
    return _save(fig, path)


def probe(extras: dict[str, list], path: Path) -> Path:
    """Probe risk per latent factor against the fixed ratio (K = ∞), raw input as a dashed line."""
    entries = extras["probe"]
    fig, axes = _subplots(1, max(len(entries), 1), figsize=(3.6 * max(len(entries), 1), 3.0), squeeze=False)
    for ax, p in zip(axes[0], entries):
        g = len(p["grid"])
        for k, factor in enumerate(p["factors"]):
            mean = [p["risk"][i][k]["mean"] for i in range(g)]
            ax.plot(p["grid"], mean, "-", color=f"C{k}", lw=1, label=factor)
            ax.axhline(p["risk"][-1][k]["mean"], ls="--", color=f"C{k}", lw=0.7)
        ax.set_title(f"{p['covariance']} γ={p['gamma']:g}: probe (dashed: raw x)", fontsize=8)
        ax.set_xlabel("mask ratio p", fontsize=7)
        ax.set_ylabel("probe risk (1 = null)", fontsize=7)
        ax.set_yscale("log")
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=6)
    if not entries:
        axes[0][0].text(0.5, 0.5, "no probe in this config", ha="center", va="center")
        axes[0][0].set_axis_off()
    return _save(fig, path)


def all_figures(blocks: list[Block], extras: dict[str, list], directory: Path) -> list[Path]:
    return [
        risk_curves(blocks, directory / RISK_PNG),
        equivalence(blocks, directory / EQUIVALENCE_PNG),
        random_vs_fixed(blocks, directory / RANDOM_PNG),
        optimum_vs_size(blocks, directory / OPTIMUM_PNG),
        test_ratio(blocks, directory / TEST_RATIO_PNG),
        probe(extras, directory / PROBE_PNG),
    ]
