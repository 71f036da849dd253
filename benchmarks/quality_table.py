"""The quality table: the methods side by side, and every run beside the published results.

From `benchmarks/quality_runs.json`: "comparison", the equal-budget runs of the three methods,
each named by its recipe (training/recipes/: method, epochs, resolution, OUT of its live log
OUT/metrics.jsonl) with a committed copy of its log, `benchmarks/results/logs/NAME.metrics.jsonl`;
"runs", earlier runs' logs (one file per run, or a folder per model trained in several schedules,
one file per stage). Writes into benchmarks/results/: quality.json and quality.md (a row per
method run and one for the shipped default, models/DEFAULT: an exported package's figures from
its card and `embedserve eval` report, else its log's latest evaluation; then a row per run),
knn-methods.png (kNN per epoch, a line per method) and knn-<model>.png (one per lineage).

    python -m benchmarks.quality_table               # from the committed logs
    python -m benchmarks.quality_table --sync-logs   # first copies each live log over its
                                                     # committed copy when it extends it
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.common import RESULTS, ROOT
from benchmarks.quality_logs import summarize
from benchmarks.quality_markdown import markdown
from benchmarks.quality_methods import method_rows
from benchmarks.quality_plots import plot, plot_methods
from benchmarks.quality_sync import sync_logs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--runs", default=str(ROOT / "benchmarks" / "quality_runs.json"))
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--no-plots", action="store_true")
    p.add_argument(
        "--sync-logs",
        action="store_true",
        help="first copy each comparison run's live log over its committed copy if it extends it",
    )
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = json.loads(Path(args.runs).read_text())
    if args.sync_logs:
        for line in sync_logs(manifest["comparison"]):
            print(line)
    runs = manifest["runs"]
    by_name = {run["name"]: run for run in runs}
    rows = [summarize(run, run.get("knn_k", 20), by_name) for run in runs]
    methods = method_rows(manifest["comparison"], by_name, {r["name"]: r for r in rows})
    if not args.no_plots:
        continued = {run.get("continues") for run in runs}
        for row in rows:
            if row["name"] not in continued:  # the last of its lineage: one plot per model
                row["plot"] = str(plot(row, out).relative_to(out))
        plot_methods(methods, out)
    (out / "quality.json").write_text(
        json.dumps({"methods": methods, "runs": rows}, indent=2) + "\n"
    )
    (out / "quality.md").write_text(markdown(rows, methods))
    print(markdown(rows, methods))
    return 0


if __name__ == "__main__":
    sys.exit(main())
