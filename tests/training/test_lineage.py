"""The lineage of warm starts as references (training/lineage.py), read in both forms."""

from __future__ import annotations

import json
from pathlib import Path

from embedserve.package import lineage_epochs, validate_card
from training.lineage import reference, rewrite_card

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "barlow-twins-resnet18-imagenette"


def package(epochs: int, sha: str, source=None) -> dict:
    return {
        "kind": "package",
        "path": "models/p",
        "name": "p",
        "model_sha256": sha * 64,
        "method": "barlow_twins",
        "epochs": epochs,
        "command": "python -m training.train " + "--x " * 40,
        "metrics": {"knn": [{"k": 20, "top1": 0.5}]},
        "init_from": source,
    }


def nested_chain(depth: int) -> dict:
    """The form cards had until 2026-12: each source's record copied into the next."""
    record = None
    for i in range(depth):
        record = package(10 + i, "0123456789abcdef"[i % 16], record)
    return record


def test_a_reference_keeps_the_sources_identity_and_total_epochs_not_its_ancestors():
    chain = nested_chain(12)
    ref = reference(chain)
    assert lineage_epochs(chain) == lineage_epochs(ref) == sum(range(10, 22)) == ref["total_epochs"]
    assert ref["model_sha256"] == chain["model_sha256"] and ref["epochs"] == chain["epochs"]
    assert "init_from" not in ref and "command" not in ref and "metrics" not in ref
    assert reference(ref) == ref  # already a reference: unchanged
    assert reference(None) is None


def test_a_checkpoint_reference_carries_the_reference_of_its_own_source():
    ckpt = {
        "kind": "checkpoint",
        "path": "runs/r/checkpoint.pt",
        "checkpoint_sha256": "f" * 64,
        "epochs": 5,
        "command": "python -m training.train ...",
        "init_from": nested_chain(3),
        "heads_from": {"path": "runs/h.pt", "checkpoint_sha256": "e" * 64, "epochs": 1,
                       "tensors": 13, "command": "python -m training.train ..."},
    }  # fmt: skip
    ref = reference(ckpt)
    assert ref["total_epochs"] == 5 + 10 + 11 + 12
    assert ref["init_from"]["kind"] == "package" and "init_from" not in ref["init_from"]
    assert ref["heads_from"] == {"path": "runs/h.pt", "checkpoint_sha256": "e" * 64,
                                 "epochs": 1, "tensors": 13}  # fmt: skip


def test_an_old_card_is_rewritten_with_every_other_field_kept(tmp_path):
    card = json.loads((SHIPPED / "card.json").read_text())
    card["training"]["init_from"] = nested_chain(12)  # as the card was before the rewrite
    card["training"]["total_epochs"] = card["training"]["epochs"] + sum(range(10, 22))
    path = tmp_path / "card.json"
    path.write_text(json.dumps(card, indent=2) + "\n")
    before, after = rewrite_card(path)
    new = json.loads(path.read_text())
    # the nested chain (about 10 KB) becomes a reference of a few hundred bytes
    no_lineage = {**card, "training": {**card["training"], "init_from": None}}
    lineage_bytes = after - len((json.dumps(no_lineage, indent=1) + "\n").encode())
    assert after == path.stat().st_size and 0 < lineage_bytes < 1024 < before - after
    validate_card(new)
    assert new["training"]["init_from"] == reference(card["training"]["init_from"])
    new["training"].pop("init_from"), card["training"].pop("init_from")
    assert new == card
