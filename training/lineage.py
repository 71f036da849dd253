"""Where an encoder came from, as references rather than copies.

A run started with `--init-from` records its source; the exported card keeps that record under
`training.init_from`. Until 2026-12 each record copied its source's own record, so a card
carried the whole chain of warm starts nested level by level (16 KB of a 27 KB card after 12
restarts). Now a record *refers* to its source:

- a package: its name and path, `model_sha256` (the sha256 of its model.onnx, which is the
  `sha256` field of that package's card.json: the card of that export is found in the history
  of models/NAME/card.json by it), `epochs` (of the run that made it) and `total_epochs`
  (with everything before it). Its own lineage is in its card;
- a checkpoint (not kept with the repository): its path, `checkpoint_sha256`, epochs and
  total epochs, and the reference of its own source (so the chain reaches a package).

Readers accept both forms: `embedserve.package.lineage_epochs` takes `total_epochs` where a
record has it and follows the nested copies otherwise. `python -m training.lineage CARD`
rewrites an older card in the reference form (every other field kept; it was run once on
models/barlow-twins-resnet18-imagenette/card.json: 27,467 -> 7,316 bytes).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from embedserve.package import lineage_epochs, validate_card

# what a reference keeps of a source's record (the rest is in the source's own card)
REFERENCE_KEYS = (
    "kind",
    "path",
    "name",
    "model_sha256",
    "checkpoint_sha256",
    "method",
    "epochs",
    "total_epochs",
    "encoder_only",
    "parity_min_cosine",
    "batchnorm_statistics_images",
)
HEADS_KEYS = ("path", "checkpoint_sha256", "epochs", "tensors")


def reference(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """The reference form of an --init-from record (of either form); None stays None."""
    if not record:
        return None
    ref = {k: record[k] for k in REFERENCE_KEYS if k in record}
    ref["total_epochs"] = lineage_epochs(record)
    ref = {k: ref[k] for k in REFERENCE_KEYS if k in ref}  # total_epochs beside epochs
    if record.get("kind") != "package" and record.get("init_from"):
        ref["init_from"] = reference(record["init_from"])
    if record.get("heads_from"):
        ref["heads_from"] = {
            k: record["heads_from"][k] for k in HEADS_KEYS if k in record["heads_from"]
        }
    return ref


def rewrite_card(path: Path) -> tuple[int, int]:
    """Rewrite a card.json's `training.init_from` in the reference form, in place, every other
    field unchanged; returns (bytes before, bytes after)."""
    text = path.read_text()
    card = json.loads(text)
    training = card.get("training", {})
    before_total = lineage_epochs(training.get("init_from"))
    new = {**card, "training": {**training, "init_from": reference(training.get("init_from"))}}
    if lineage_epochs(new["training"]["init_from"]) != before_total:
        raise ValueError(f"{path}: the rewritten lineage counts other epochs")
    validate_card(new, str(path))
    out = json.dumps(new, indent=1) + "\n"  # as training.export writes cards
    path.write_text(out)
    return len(text.encode()), len(out.encode())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m training.lineage",
        description="Rewrite cards written before 2026-12 so that training.init_from refers to "
        "its source instead of copying its whole lineage (nothing else changes).",
    )
    p.add_argument("cards", nargs="+", type=Path, help="card.json files to rewrite in place")
    for path in p.parse_args(argv).cards:
        before, after = rewrite_card(path)
        print(f"{path}: {before} -> {after} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
