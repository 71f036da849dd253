"""`--sync-logs` of the quality table: each comparison run's live log copied over its committed
copy when it extends it.
"""

from __future__ import annotations

import tomllib
from typing import Any

from benchmarks.common import ROOT


def sync_logs(comparison: list[dict[str, Any]]) -> list[str]:
    """Copy each live log (the recipe's OUT/metrics.jsonl, not committed) over its committed
    copy when it is longer; whole lines only (the trainer may be writing one). A live log of a
    different run (neither log begins with the other: a lost run restarted from scratch) is
    refused, however long, until its committed copy is deleted on purpose."""
    done = []
    for entry in comparison:
        recipe = tomllib.loads((ROOT / entry["recipe"]).read_text())
        live, committed = ROOT / recipe["out"] / "metrics.jsonl", ROOT / entry["metrics"]
        if not live.exists():
            continue
        text = live.read_text()
        text = text[: text.rfind("\n") + 1]
        old = committed.read_text() if committed.exists() else ""
        if not (text.startswith(old) or old.startswith(text)):
            raise ValueError(
                f"{live} does not continue {committed} (another run): not copied; delete "
                f"{entry['metrics']} first to replace it with this run's log"
            )
        if len(text) <= len(old):
            continue
        committed.parent.mkdir(parents=True, exist_ok=True)
        committed.write_text(text)
        done.append(f"synced {entry['metrics']} from {recipe['out']}/metrics.jsonl")
    return done
