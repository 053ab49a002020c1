"""UMAP titles (issue 19): a long title — a checkpoint path — is wrapped to lie inside the figure, so
its start (what the figure shows) is never cut off on the left by a legend-narrowed axes."""

from __future__ import annotations

import os

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from biomask.embedding.plots import fit_title, plot_colours

plt.switch_backend("Agg")

TITLE = "/scratch/users/someone/projects/pbmc/runs/study-full/pretrain_cells/masking.scheme=r2mae,train.seed=3 · mean pooling · layer -1"


def _figure():
    """Like scanpy's UMAP: axes of a 6 x 5 inch figure, a categorical legend outside on the right."""
    fig, ax = plt.subplots(figsize=(6, 5), dpi=120)
    for i, name in enumerate(["CD14+ Monocyte", "CD56+ NK", "CD4+/CD45RA+/CD25- Naive T", "Dendritic"]):
        ax.scatter([i], [i], label=name)
    ax.legend(loc="center left", bbox_to_anchor=(1, 0.5), frameon=False)
    fig.tight_layout()
    return fig, ax


def _inside(fig, ax) -> bool:
    box = ax.title.get_window_extent(fig.canvas.get_renderer())
    return box.x0 >= 0 and box.x1 <= fig.bbox.width


def test_a_long_title_is_wrapped_inside_the_figure_and_keeps_every_character():
    fig, ax = _figure()
    ax.set_title(TITLE)
    assert not _inside(fig, ax)  # the failure seen in the report: centred, it runs off the left edge
    fit_title(ax, TITLE)
    assert _inside(fig, ax)
    assert "".join(ax.get_title().split()) == "".join(TITLE.split())
    plt.close(fig)


def test_a_short_title_is_left_alone():
    fig, ax = _figure()
    fit_title(ax, "X_biomask, by bulk_labels")
    assert ax.get_title() == "X_biomask, by bulk_labels"
    plt.close(fig)


def test_cluster_ids_are_classes_and_a_missing_label_is_no_class():
    ids = plot_colours(pd.Series(np.arange(30) % 4))
    assert isinstance(ids.dtype, pd.CategoricalDtype) and list(ids.cat.categories) == ["0", "1", "2", "3"]
    names = plot_colours(pd.Series(["B", None, np.nan, "T", "nan", "NA"], dtype=object))
    assert list(names.cat.categories) == ["B", "T"] and names.isna().sum() == 4  # as prep reads them
    with_nan = plot_colours(pd.Series([10.0, 2.0, np.nan, 1.0] * 5))  # cluster ids kept as floats
    assert list(with_nan.cat.categories) == ["1", "2", "10"] and with_nan.isna().sum() == 5
    nullable = plot_colours(pd.Series([1, None, 2], dtype="Int64"))
    assert list(nullable.cat.categories) == ["1", "2"]
    depth = pd.Series(np.linspace(0, 1, 30))  # a measurement stays a colour scale
    assert pd.api.types.is_float_dtype(plot_colours(depth))


def test_report_runs_are_drawn_apart_beyond_ten():
    """12 runs (4 schemes x 3 seeds) in one panel: matplotlib's cycle gives runs 1 and 11 one colour."""
    from biomask.report.figures import _style

    assert len({tuple(_style(i).values()) for i in range(60)}) == 60


def test_a_column_of_hundreds_of_classes_is_coloured_without_a_legend(tmp_path):
    """`--umap-color barcode`: 600 classes drew a 600-entry legend, a PNG seven times the plot's
    height. Above MAX_LEGEND classes the plot keeps its size and its title says why there is no
    legend; a few classes keep theirs."""
    from PIL import Image

    from biomask.embedding.plots import MAX_LEGEND, umap_png

    vectors = np.random.default_rng(0).normal(size=(200, 8)).astype(np.float32)
    sizes = {}
    for name, values in (
        ("barcode", [f"bc{i}" for i in range(200)]),
        ("type", [f"t{i % 4}" for i in range(200)]),
    ):
        umap_png(vectors, pd.Series(values, name=name), tmp_path / f"{name}.png", title="cells")
        sizes[name] = Image.open(tmp_path / f"{name}.png").size
    assert MAX_LEGEND < 200 and sizes["barcode"][1] <= sizes["type"][1] * 1.1, sizes


def test_report_runs_take_their_schemes_colour_and_their_own_line():
    """With one colour per run the eleventh took the first's: bert15 seed 0 and r2mae seed 1 differed
    by a marker alone. A scheme is one colour; its seeds differ by line style and marker."""
    from types import SimpleNamespace

    from biomask.report.figures import _run_styles

    schemes = [
        {"scheme": "r2mae", "ratio": {"kind": "uniform", "low": 0.15, "high": 0.45, "granularity": "batch"}},
        {"scheme": "bert15", "ratio": {"kind": "fixed", "value": 0.15, "granularity": "batch"}},
    ]
    runs = [SimpleNamespace(masking=m) for m in schemes for _ in range(3)]
    styles = _run_styles(runs)
    assert len({s["color"] for s in styles[:3]}) == 1 and len({s["color"] for s in styles[3:]}) == 1
    assert styles[0]["color"] != styles[3]["color"]
    assert len({(s["color"], s["ls"], s["marker"]) for s in styles}) == 6
    fixed = [
        {"scheme": "fixed", "ratio": {"kind": "fixed", "value": v, "granularity": "batch"}}
        for v in (0.15, 0.4)
    ]
    assert len({s["color"] for s in _run_styles([SimpleNamespace(masking=m) for m in fixed])}) == 2
    # eleven arms: the eleventh shares the first's colour, not its look; arms that differ in another
    # setting than masking (a sweep of mask_indicator) are arms too; the seed is not
    many = [{"scheme": "fixed", "ratio": {"kind": "fixed", "value": v / 100}} for v in range(5, 60, 5)]
    styles = _run_styles([SimpleNamespace(masking=m) for m in many])
    assert len({tuple(s.values()) for s in styles}) == 11
    one = many[0]
    arms = [
        SimpleNamespace(
            masking=one,
            config={"model": {"mask_indicator": flag}, "train": {"seed": seed}, "output": f"o{seed}"},
        )
        for flag in (True, False)
        for seed in (0, 1)
    ]
    styles = _run_styles(arms)
    assert styles[0]["color"] == styles[1]["color"] != styles[2]["color"] == styles[3]["color"]


def test_the_umap_leaves_the_callers_matplotlib_backend_alone(tmp_path):
    """umap_png switched matplotlib to Agg: in a Jupyter kernel (inline backend) every later scanpy
    plot showed nothing. It draws on a figure of its own."""
    import warnings

    import matplotlib

    from biomask.embedding.plots import umap_png

    before = matplotlib.get_backend()
    matplotlib.use("pdf")  # any backend that is not Agg, as a notebook's inline one is not
    try:
        vectors = np.random.default_rng(0).normal(size=(60, 4)).astype(np.float32)
        users = plt.figure()  # the notebook's own figure, current: neither drawn on nor closed
        users.add_subplot().plot([0, 1])
        open_before = plt.get_fignums()
        umap_png(vectors, pd.Series(["a", "b", "c"] * 20, name="kind"), tmp_path / "u.png", title="t")
        assert matplotlib.get_backend() == "pdf" and (tmp_path / "u.png").stat().st_size > 1000
        # a colour scale: scanpy draws its bar through pyplot, whose empty figure a notebook would show
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            umap_png(vectors, pd.Series(np.linspace(0, 1, 60), name="depth"), tmp_path / "d.png", title="t")
        assert not [w for w in caught if "colorbar" in str(w.message)], [str(w.message) for w in caught]
        assert plt.get_fignums() == open_before and (tmp_path / "d.png").stat().st_size > 1000
        assert plt.gcf() is users and len(users.axes) == 1
    finally:
        plt.close("all")
        matplotlib.use(before)


def test_report_and_theory_figures_leave_the_callers_matplotlib_alone(tmp_path):
    """`import biomask.report.figures` called matplotlib.use("Agg"): a notebook that imported the
    report (or `biomask theory`'s plots) lost its inline plots, and each figure went through pyplot.
    Importing and drawing change neither the backend nor pyplot's open figures. In a process of its
    own: the import is what is tested, and this one has imported the modules already."""
    import subprocess
    import sys

    script = f"""
import matplotlib, matplotlib.pyplot as plt
from pathlib import Path
from types import SimpleNamespace
import numpy as np
plt.figure()  # the user's own open figure
import biomask.report.figures as figures, biomask.theory.plots
runs = [SimpleNamespace(step_ratios=np.linspace(0.1, 0.9, 50), label=f"run {{i}}") for i in range(3)]
figures.ratio_histograms(runs, "t", Path({str(tmp_path)!r}) / "h.png")
print(matplotlib.get_backend(), plt.get_fignums())
"""
    env = {**os.environ, "MPLBACKEND": "pdf"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0] == "pdf [1]", done.stdout
    assert (tmp_path / "h.png").stat().st_size > 1000


def test_a_long_runs_training_loss_is_drawn_as_a_running_mean_over_its_faint_values(tmp_path, monkeypatch):
    """12,000 logged steps drew the training loss as a solid band of noise: past SMOOTH_FROM logged
    steps the curve is a running mean (said on the axis), the logged values faint beneath it."""
    from types import SimpleNamespace

    from biomask.report import figures

    rng = np.random.default_rng(0)

    def run(n: int):
        steps = np.arange(1, n + 1)
        train = pd.DataFrame({"step": steps, "loss": 2.0 - steps / n + rng.normal(0, 0.3, n)})
        return SimpleNamespace(train=train, evals=pd.DataFrame(), label=f"{n} steps", masking={"scheme": str(n)},
                               loss_unit="nats")  # fmt: skip

    seen = {}
    monkeypatch.setattr(figures, "_save", lambda fig, path: seen.setdefault(path.name, fig.axes[0]))
    figures.training_curves([run(4000)], "long", tmp_path / "long.png")
    figures.training_curves([run(100)], "short", tmp_path / "short.png")
    long, short = seen["long.png"], seen["short.png"]
    faint, mean = long.get_lines()
    assert faint.get_alpha() < 0.5 and mean.get_label() == "4000 steps"
    assert np.std(np.diff(mean.get_ydata())) < np.std(np.diff(faint.get_ydata())) / 10
    assert "running mean" in long.get_ylabel()
    (line,) = short.get_lines()
    assert "running mean" not in short.get_ylabel() and len(line.get_ydata()) == 100


def test_the_umap_closes_the_pyplot_figures_it_made_when_scanpy_raises(tmp_path, monkeypatch):
    """The empty pyplot figure scanpy's colour bar makes is closed when scanpy fails too (the error
    reaches the notebook; the figure would be shown under it)."""
    import pytest
    import scanpy as sc

    from biomask.embedding.plots import umap_png

    def failing(*args, **kwargs):
        plt.figure()
        raise RuntimeError("scanpy failed")

    monkeypatch.setattr(sc.pl, "umap", failing)
    before = plt.get_fignums()
    vectors = np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32)
    with pytest.raises(RuntimeError, match="scanpy failed"):
        umap_png(vectors, pd.Series(["a", "b"] * 20, name="kind"), tmp_path / "u.png", title="t")
    assert plt.get_fignums() == before


def test_theory_figures_are_drawn_at_their_size_on_figures_of_their_own():
    from biomask.theory.plots import _subplots

    before = plt.get_fignums()
    fig, axes = _subplots(2, 3, figsize=(7.0, 4.5), squeeze=False)
    assert tuple(fig.get_size_inches()) == (7.0, 4.5) and axes.shape == (2, 3)
    assert plt.get_fignums() == before  # not pyplot's: nothing for a notebook to show or close


def test_the_targets_figure_draws_each_paired_difference_coloured_by_its_verdict(tmp_path, monkeypatch):
    """The verdicts rest on paired differences, which no figure showed (the evaluation figures give
    each method's own interval): one row per target and model, its interval, zero marked."""
    from matplotlib.colors import to_rgba

    from biomask.report import figures

    seen = {}
    monkeypatch.setattr(figures, "_save", lambda fig, path: seen.setdefault("ax", fig.axes[0]))
    entries = [
        {"label": "a: R²MAE", "difference": 0.05, "low": 0.01, "high": 0.09, "status": "met"},
        {"label": "b: R²MAE", "difference": -0.01, "low": -0.04, "high": 0.02, "status": "level"},
        {"label": "c: bert15", "difference": -0.03, "low": None, "high": None, "status": "not met"},
    ]
    figures.target_differences(entries, tmp_path / "t.png")
    ax = seen["ax"]
    labels = {tick.get_position()[1]: tick.get_text() for tick in ax.get_yticklabels()}
    assert labels == {2: "a: R²MAE", 1: "b: R²MAE", 0: "c: bert15"}  # in the table's order, top down
    points = {
        line.get_ydata()[0]: (line.get_xdata()[0], line.get_marker())
        for line in ax.get_lines()
        if line.get_marker() not in ("None", None, "")
    }
    # a verdict is told by its marker and its word as well as its colour (red and green alone: one
    # reader in twelve cannot tell them apart)
    assert points == {2: (0.05, "^"), 1: (-0.01, "o"), 0: (-0.03, "v")}
    colours = {
        line.get_marker(): line.get_color() for line in ax.get_lines() if line.get_marker() in ("^", "o", "v")
    }
    assert colours == {"^": "#009E73", "o": "#7F7F7F", "v": "#D55E00"}  # Okabe-Ito: no red against green
    words = {t.get_text(): t.get_color() for t in ax.texts}
    assert words == {"met": "#009E73", "level": "#7F7F7F", "not met": "#D55E00"}
    assert {(t.get_position()[1], t.get_text()) for t in ax.texts} == {
        (2, "met"),
        (1, "level"),
        (0, "not met"),
    }
    assert len(ax.collections) == 2  # intervals where there are some: the third has none
    marker_colours = [line.get_color() for line in ax.get_lines() if line.get_marker() in ("^", "o")]
    assert [tuple(c.get_color()[0]) for c in ax.collections] == [to_rgba(c) for c in marker_colours]
    assert any(line.get_xdata()[0] == 0 for line in ax.get_lines() if line.get_marker() in ("None", None, ""))


def test_a_ratio_drawn_per_record_is_drawn_per_record(tmp_path, monkeypatch):
    """A per-sample R²MAE run's pooled step ratios crowd the range's mean and read as a fixed ratio:
    its panel draws each record's realised ratio, on a scale of its own."""
    from types import SimpleNamespace

    from biomask.report import figures

    drawn = {}
    monkeypatch.setattr(figures, "_save", lambda fig, path: drawn.setdefault("fig", fig) and path)
    counts = np.zeros(40)
    counts[4:36] = 100  # records spread over 0.1-0.9
    runs = [
        SimpleNamespace(step_ratios=np.full(50, 0.5), record_ratio_counts=counts, label="per sample"),
        SimpleNamespace(step_ratios=np.linspace(0.15, 0.45, 50), record_ratio_counts=None, label="per batch"),
    ]
    figures.ratio_histograms(runs, "t", tmp_path / "h.png")
    first, second = drawn["fig"].axes[:2]
    assert first.get_title() == "per sample\n(per record)" and first.get_ylabel() == "records"
    assert second.get_title() == "per batch" and second.get_ylabel() == "steps"
    assert first.get_ylim()[1] >= 100 and second.get_ylim()[1] < 100  # not one scale for both
    assert "per record where drawn per record" in drawn["fig"].texts[0].get_text()
