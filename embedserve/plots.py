"""Pictures of an evaluation: recall against queries/s of the approximate indexes (matplotlib, the
`eval` extra) and a retrieval grid of queries with their nearest neighbours (Pillow only)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont, ImageOps

from embedserve.preprocess import ImageDecodeError, decode

CORRECT, WRONG, QUERY = (30, 160, 60), (210, 40, 40), (60, 90, 200)


def plot_recall_qps(report: dict[str, Any], out: str | os.PathLike, k: int = 10) -> Path:
    """Recall@k against the exact index vs queries/s, one line per approximate index (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(
            "the recall-vs-QPS plot needs matplotlib: pip install 'embedserve[eval]'"
        ) from e
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    by_index: dict[str, list[dict[str, Any]]] = {}
    for row in report["ann"]:
        by_index.setdefault(row["index"], []).append(row)
    for name, rows in by_index.items():
        qps = [r["qps"] for r in rows]
        recall = [r[f"recall@{k}"] for r in rows]
        parameter = rows[0]["parameter"]
        ax.plot(qps, recall, marker="o", label=f"{name} ({parameter})" if parameter else name)
        for r, x, y in zip(rows, qps, recall, strict=True):
            if r["parameter"]:
                ax.annotate(
                    f"{r['value']}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7
                )
    exact = report["exact"]
    ax.plot([exact["qps"]], [1.0], marker="*", markersize=12, linestyle="", label="Flat (exact)")
    ax.set_xscale("log")
    ax.set_xlabel("queries per second (log scale; all queries in one batch)")
    ax.set_ylabel(f"recall@{k} against the exact index")
    ax.set_ylim(0, 1.03)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    title = report.get("title")
    ax.set_title(title or "Approximate search: recall vs speed", fontsize=10)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out)
    plt.close(fig)
    return out


def _thumbnail(path: str | None, size: int) -> Image.Image:
    """A size x size RGB thumbnail of an image file (grey where it cannot be read)."""
    try:
        if path is None:
            raise ImageDecodeError("no path")
        return ImageOps.fit(decode(path), (size, size))
    except (ImageDecodeError, OSError):
        return Image.new("RGB", (size, size), (128, 128, 128))


def retrieval_grid(
    rows: Sequence[tuple[str, str, Sequence[tuple[str, str, float]]]],
    out: str | os.PathLike,
    thumb: int = 96,
    border: int = 4,
) -> Path:
    """One row per query: the query (blue frame), then its neighbours framed green when their
    label is the query's, red otherwise, each captioned with its label and similarity.

    `rows`: (query path, query label, [(neighbour path, neighbour label, similarity), ...]).
    """
    columns = 1 + max((len(hits) for _, _, hits in rows), default=0)
    caption = 14
    cell_w, cell_h = thumb + 2 * border + 6, thumb + 2 * border + caption + 6
    grid = Image.new("RGB", (columns * cell_w, len(rows) * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for r, (query_path, query_label, hits) in enumerate(rows):
        cells = [(query_path, query_label, None, QUERY)] + [
            (path, label, sim, CORRECT if label == query_label else WRONG)
            for path, label, sim in hits
        ]
        for c, (path, label, sim, colour) in enumerate(cells):
            x, y = c * cell_w + 3, r * cell_h + 3
            draw.rectangle([x, y, x + thumb + 2 * border - 1, y + thumb + 2 * border - 1], colour)
            grid.paste(_thumbnail(path, thumb), (x + border, y + border))
            text = f"{label}" if sim is None else f"{label} {sim:.2f}"
            draw.text((x, y + thumb + 2 * border + 1), text[:18], fill=colour, font=font)
    out = Path(out)
    grid.save(out)
    return out
