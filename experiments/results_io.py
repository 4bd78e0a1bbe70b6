"""Result files of the apps and benchmarks, each written atomically (coel_env.atomic): a crash or Ctrl-C never
leaves half a CSV or half an image behind. JSON and text go through `coel_env.atomic` directly."""

from __future__ import annotations

import csv
from pathlib import Path

from coel_env.atomic import atomic_path


def write_csv(path: str | Path, rows: list[dict]) -> Path:
    """`rows` (dicts with the same keys as the first) as a CSV file."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)


def save_png(fig, path: str | Path, dpi: int = 110) -> Path:
    """A matplotlib figure as a PNG file."""
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return Path(path)


def save_image(array, path: str | Path) -> Path:
    """An RGB(A) array as a PNG file (matplotlib's imsave)."""
    import matplotlib.pyplot as plt

    with atomic_path(path, ".png") as tmp:
        plt.imsave(tmp, array, format="png")
    return Path(path)
