"""Plots written as PNG files, through matplotlib's file-only backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend


def axes(width: float, height: float, columns: int = 1) -> tuple[Any, Any]:
    """A figure of ``width`` x ``height`` inches and its axes (a list of them for several columns)."""
    return plt.subplots(1, columns, figsize=(width, height))


def finish(ax: Any, xlabel: str, ylabel: str, title: str | None = None, legend: int | None = 7) -> None:
    """Axis labels, an optional small title, and a legend of font size ``legend`` (None: no legend)."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    if legend:
        ax.legend(fontsize=legend)


def save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
