"""Figures for the dashboard, rendered with matplotlib to SVG (text stays text, no raster blur).

The server draws in worker threads, so figures are plain ``Figure`` objects (no pyplot state
machine) and the SVG settings are fixed once, not switched per call."""

from __future__ import annotations

import io

import matplotlib
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

# Text stays <text> in the SVG: selectable, readable by screen readers and by the browser tests.
matplotlib.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "fedsynth"})


def to_svg(fig: Figure) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    text = buf.getvalue()
    return text[text.index("<svg"):]  # inline: drop the XML prologue and DOCTYPE


def _plain(label: str) -> str:
    """A run or site name as text: matplotlib would read $...$ as mathtext."""
    return label.replace("$", r"\$")


def curves(series: dict[str, list[tuple[float, float]]], title: str, ylabel: str,
           hlines: dict[str, float] | None = None, empty: str = "no data yet") -> str:
    """One line per series over rounds, dashed budget lines, as inline SVG."""
    fig = Figure(figsize=(5.6, 3.2))
    ax = fig.subplots()
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

