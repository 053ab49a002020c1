"""Figures drawn by matplotlib's Agg on figures of their own, never pyplot's: a notebook's backend
(inline) and its open figures stay as they were, and nothing is left for pyplot to show or close
(`matplotlib.use("Agg")` at import switched a Jupyter kernel's plots off). The report's, theory's and
the UMAP's figures are made here."""

from __future__ import annotations

from typing import Any


def subplots(
    *args: Any, figsize: tuple[float, float], dpi: float | None = None, **kwargs: Any
) -> tuple[Any, Any]:
    """`plt.subplots` without pyplot: the figure, its Agg canvas attached, and its axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)  # the canvas text is measured on (titles fitted) and savefig draws with
    return fig, fig.subplots(*args, **kwargs)
