"""The quality table's plots: kNN per epoch of a model's lineage (knn-<model>.png) and of the
methods side by side (knn-methods.png). matplotlib is imported when a plot is drawn.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from benchmarks.quality_methods import METHOD_NAMES

TITLE_WIDTH = 48  # characters of a run name per title line at the plot's size and 9 pt


def title_lines(name: str, width: int = TITLE_WIDTH) -> list[str]:
    """A run name cut at its hyphens into lines that fit the plot's width (long names ran off)."""
    return textwrap.wrap(name, width, break_on_hyphens=True)


def figure(size: tuple[float, float]) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=size, dpi=120)


def save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot(row: dict[str, Any], out: Path) -> Path:
    from matplotlib.ticker import MaxNLocator

    fig, ax = figure((5, 3.4))
    xs = [p["epoch"] for p in row["curve"]]
    ys = [p["knn"] for p in row["curve"]]
    ax.plot(xs, ys, marker="o", label=f"{row['method']} (ours)")
    for i, restart in enumerate(row["restarts"]):
        label = "new schedule at " + ", ".join(map(str, row["restarts"])) if i == 0 else None
        ax.axvline(restart, color="tab:red", ls="--", lw=1, label=label)
    if row["random_init"] is not None:
        ax.axhline(row["random_init"], color="grey", ls=":", label="random init")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"kNN top-1 (k={row['knn_k']}, T={row['knn_temperature']})")
    ax.set_title("\n".join(title_lines(row["name"])), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return save(fig, out / f"knn-{row['name'].replace('/', '-')}.png")


COLOURS = {"simsiam": "tab:green", "byol": "tab:orange", "barlow_twins": "tab:blue"}


def plot_methods(rows: list[dict[str, Any]], out: Path) -> Path:
    """kNN top-1 (k=20) against epoch, a line per comparison run; lightly's 200-epoch figures
    dashed in the same colours; a run in progress ends where it is."""
    fig, ax = figure((7, 5))
    runs = [r for r in rows if r["role"] == "equal budget"]
    for r in runs:
        colour, label = COLOURS.get(r["method"]), METHOD_NAMES.get(r["method"], r["method"])
        xs, ys = [p["epoch"] for p in r["curve"]], [p["knn"] for p in r["curve"]]
        done = f"{r['epochs']}/{r['epochs_planned']} ep"
        ax.plot(xs, ys, marker="o", ms=3, color=colour, label=f"{label}, ours ({done})")
        if r["lightly_200"] is not None:
            ax.axhline(
                r["lightly_200"], color=colour, ls="--", lw=1, label=f"{label}, lightly 200 ep"
            )
    inits = [r["random_init"] for r in runs if r["random_init"] is not None]
    if inits:  # labelled on the plot: the legend keeps a column per method
        ax.axhline(inits[0], color="grey", ls=":", lw=1)
        ax.text(2, inits[0] + 0.004, "random init", color="grey", fontsize=7)
    ax.set_xlim(0, max([r["epochs_planned"] or 0 for r in runs] + [1]))
    ax.set_xlabel("epoch")
    ax.set_ylabel("kNN top-1 (k=20, T=0.07, val at 128 px)")
    ax.set_title("Equal budget: ResNet-18 on Imagenette, 200 epochs, batch 128", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), fontsize=7, ncol=3)
    return save(fig, out / "knn-methods.png")
