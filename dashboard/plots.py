"""Figures for the dashboard, rendered with matplotlib to SVG (text stays text, no raster blur)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

# Text stays <text> in the SVG: selectable, readable by screen readers and by the browser tests.
SVG_STYLE = {"svg.fonttype": "none", "svg.hashsalt": "fedsynth"}


def to_svg(fig) -> str:
    buf = io.StringIO()
    with plt.rc_context(SVG_STYLE):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]  # inline: drop the XML prologue and DOCTYPE


def _plain(label: str) -> str:
    """A run or site name as text: matplotlib would read $...$ as mathtext."""
    return label.replace("$", r"\$")


def curves(series: dict[str, list[tuple[float, float]]], title: str, ylabel: str,
           hlines: dict[str, float] | None = None, empty: str = "no data yet") -> str:
    """One line per series over rounds, dashed budget lines, as inline SVG."""
    fig, ax = plt.subplots(figsize=(5.6, 3.2))
    for label, points in series.items():
        if points:
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", markersize=3, label=_plain(label))
    for label, y in (hlines or {}).items():
        ax.axhline(y, linestyle="--", linewidth=0.8, color="grey")
        ax.annotate(_plain(label), (0, y), xycoords=("axes fraction", "data"), fontsize=7, color="grey", va="bottom")
    if not any(series.values()):
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if any(series.values()):
        ax.legend(fontsize=7)
    return to_svg(fig)

