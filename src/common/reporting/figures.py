"""Figures for the HTML report, rendered with matplotlib to inline PNG."""

from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def to_data_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_grid(images: torch.Tensor, title: str, cols: int = 8) -> str:
    n = max(1, len(images))
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.9, rows * 0.9 + 0.4), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(images):
            ax.imshow(images[i, 0].numpy(), cmap="gray", vmin=0, vmax=1)
    fig.suptitle(title, fontsize=9)
    return to_data_uri(fig)


def line_plot(series: dict[str, tuple[list[float], list[float]]], title: str, xlabel: str, ylabel: str, hline: dict[str, float] | None = None) -> str:
    fig, ax = plt.subplots(figsize=(5, 3))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for label, y in (hline or {}).items():
        ax.axhline(y, linestyle="--", linewidth=0.8, color="grey")
        ax.text(ax.get_xlim()[0], y, f" {label}", fontsize=7, va="bottom", color="grey")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=7)
    return to_data_uri(fig)


def histogram(groups: dict[str, list[float]], title: str, xlabel: str, bins: int = 40) -> str:
    fig, ax = plt.subplots(figsize=(5, 3))
    for label, values in groups.items():
        ax.hist(values, bins=bins, alpha=0.55, label=label)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return to_data_uri(fig)


def samples_figure(previews: dict, path, per_class: int = 8, names: dict | None = None) -> None:
    """Real (held-out) beside synthetic images, one row pair per class, as a PNG file (``samples.png``)."""
    classes = sorted(previews["real"])
    fig, axes = plt.subplots(2 * len(classes), per_class, figsize=(per_class * 0.8, 2 * len(classes) * 0.85), squeeze=False)
    for r, (c, kind) in enumerate((c, k) for c in classes for k in ("real", "synthetic")):
        imgs = previews[kind][c]
        for j, ax in enumerate(axes[r]):
            ax.axis("off")
            if j < len(imgs):
                ax.imshow(imgs[j, 0].numpy(), cmap="gray", vmin=0, vmax=1)
        label = (names or {}).get(c, f"class {c}")
        axes[r][0].text(-0.15, 0.5, f"{kind}\n{label}", transform=axes[r][0].transAxes, ha="right", va="center", fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
