"""The result store: one JSON file per (checkpoint sha256, protocol version) and dataset.

``leaderboards/results/<dataset>/<sha256[:16]>-<protocol>.json`` holds the model's card
summary, per-image values, curves, timings, versions, seed and the resolved config. Files are
written atomically and re-used unless the caller asks to rescore.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path

from metrics.protocol import PROTOCOL_VERSION
from model_zoo.zoo import atomic_write_bytes

DEFAULT_LEADERBOARDS_DIR = Path(__file__).resolve().parent.parent / "leaderboards"


def leaderboards_dir() -> Path:
    """``$SALBENCH_LEADERBOARDS_DIR`` or the repo's ``leaderboards/`` (CSVs, results, submissions, figures)."""
    return Path(os.environ.get("SALBENCH_LEADERBOARDS_DIR") or DEFAULT_LEADERBOARDS_DIR)


def results_dir() -> Path:
    return leaderboards_dir() / "results"

# card fields copied into each result so a leaderboard needs nothing else
MODEL_FIELDS = ("id", "dataset", "arch", "variant", "preset", "source", "sha256", "natural_accuracy",
                "robust_accuracy", "num_params", "smoothing", "notes")


def result_path(dataset: str, sha256: str, protocol: str = PROTOCOL_VERSION, root: Path | None = None) -> Path:
    return (root or results_dir()) / dataset / f"{sha256[:16]}-{protocol}.json"


def _on_set(doc: dict, images_sha256: str | None) -> bool:
    return images_sha256 is None or doc.get("imageset", {}).get("images_sha256") == images_sha256


def load_result(dataset: str, sha256: str, protocol: str = PROTOCOL_VERSION, root: Path | None = None,
                images_sha256: str | None = None) -> dict | None:
    """The stored result of a checkpoint, or None. With ``images_sha256``, a result scored on another
    image set (e.g. before the set was rebuilt) counts as absent, so it is scored again."""
    p = result_path(dataset, sha256, protocol, root)
    if not p.is_file():
        return None
    doc = json.loads(p.read_text())
    if doc.get("model", {}).get("sha256") != sha256 or doc.get("protocol") != protocol:
        return None  # a stale or foreign file: treat as absent
    return doc if _on_set(doc, images_sha256) else None


def save_result(result: dict, card: dict, root: Path | None = None) -> Path:
    doc = {"model": {k: card.get(k) for k in MODEL_FIELDS},
           "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **result}
    p = result_path(result["dataset"], card["sha256"], result["protocol"], root)
    # compact: per-image lists make an indented file ~3x larger
    atomic_write_bytes(p, (json.dumps(doc, separators=(",", ":")) + "\n").encode())
    return p


def list_results(dataset: str, protocol: str = PROTOCOL_VERSION, root: Path | None = None,
                 images_sha256: str | None = None) -> list[dict]:
    """Every stored result of ``dataset`` (only those scored on ``images_sha256`` when given)."""
    d = (root or results_dir()) / dataset
    out = []
    for p in sorted(d.glob(f"*-{protocol}.json")):
        doc = json.loads(p.read_text())
        if _on_set(doc, images_sha256):
            out.append(doc)
    return out
