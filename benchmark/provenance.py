"""Who computed a result, and which results were re-computed here within their bands (issue 28, item 3).

A result's content digest proves that a file was not damaged since it was written, not who wrote
it: anyone can edit a result and recompute its digest. Two facts are therefore kept apart:

- ``computed_by`` (in the result): the code and platform that say they computed it, written by
  :func:`benchmark.scoring.score` (``salbench <version>``, the CPU and ISA). A result without it and
  without a ``salbench`` entry in its ``versions`` block is shown as ``imported``. It is a claim.
- a **verification record** (``leaderboards/verifications/<dataset>.json``, next to ``results/``),
  written only by ``salbench verify`` when it has re-scored the result on this machine with the stored
  config and draws and every banded aggregate came out within its band (PROTOCOL §8.4). A record is
  bound to the content digest of the result it checked and keeps the re-scored values; the board's
  ``verified`` column is true only when a record matches the result's current digest and its checks
  hold again when recomputed from the record (an ``ok`` flag is never trusted). A result edited after
  its verification, or forged with a freshly computed digest, is not shown as verified; the check
  nobody can forge is to run ``salbench verify <id>`` yourself.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from pathlib import Path

from salbench.benchmark import results as R
from salbench.model_zoo.safe_files import read_regular
from salbench.model_zoo.zoo import atomic_write_bytes

IMPORTED = "imported"
MAX_RECORDS_BYTES = 16 << 20


def computed_by_now(versions: dict) -> dict:
    """The ``computed_by`` block of a result scored now (from :func:`benchmark.scoring.versions`)."""
    plat = versions.get("platform", {})
    return {"code": f"salbench {versions.get('salbench', 'unknown')}", "protocol": versions.get("protocol"),
            "platform": f"{plat.get('cpu', '?')} / {plat.get('isa', '?')} / torch {plat.get('torch', '?')}"}


def computed_by_label(doc: dict) -> str:
    """``"salbench <version>"`` for a result this code says it computed, else ``"imported"``."""
    cb = doc.get("computed_by")
    if isinstance(cb, dict) and isinstance(cb.get("code"), str):
        return cb["code"]
    ver = doc.get("versions", {}).get("salbench") if isinstance(doc.get("versions"), dict) else None
    return f"salbench {ver}" if isinstance(ver, str) else IMPORTED


def records_path(dataset: str, results_root: Path | None = None) -> Path:
    return Path(results_root or R.results_dir()).parent / "verifications" / f"{dataset}.json"


def result_key(doc: dict) -> str:
    """The record key of a result: its file name without ``.json`` (``<sha256[:16]>-<protocol>``)."""
    return f"{doc['model']['sha256'][:16]}-{doc['protocol']}"


def read_records(dataset: str, results_root: Path | None = None) -> dict:
    """The dataset's verification records (empty when there are none or the file is unreadable,
    with a warning: an unreadable file verifies nothing)."""
    p = records_path(dataset, results_root)
    if not p.exists() and not p.is_symlink():
        return {}
    try:
        data = json.loads(read_regular(p, max_bytes=MAX_RECORDS_BYTES, what="verification records"))
    except (OSError, ValueError) as e:
        R.warn(f"verification records {p} are unreadable ({e}); no row is shown as verified")
        return {}
    return data if isinstance(data, dict) else {}


def _checks_hold(checks) -> bool:
    if not isinstance(checks, list) or not checks:
        return False
    for c in checks:
        try:
            stored, new, band = float(c["stored"]), float(c["rescored"]), float(c["band"])
        except (KeyError, TypeError, ValueError):
            return False
        diff = 0.0 if (math.isnan(stored) and math.isnan(new)) or stored == new else abs(stored - new)
        if not (math.isfinite(band) and diff <= band):
            return False
    return True


def is_verified(doc: dict, records: dict) -> bool:
    """A record for this result, bound to its current content digest, whose checks hold."""
    try:
        rec = records.get(result_key(doc))
    except (KeyError, TypeError):
        return False
    return (isinstance(rec, dict) and isinstance(doc.get("digest"), str) and rec.get("subject") == doc["digest"]
            and _checks_hold(rec.get("checks")))


def record_verification(doc: dict, checks: list, platform: dict, *, results_root: Path | None = None) -> Path:
    """Store (call with the dataset's store lock held) the outcome of ``salbench verify``: a record
    when every check is within its band, the removal of any earlier record otherwise."""
    dataset = doc["dataset"]
    records = read_records(dataset, results_root)
    key = result_key(doc)
    if checks and all(c.ok for c in checks):
        records[key] = {
            "subject": doc.get("digest"), "model": doc["model"].get("id"),
            "verified_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "platform": f"{platform.get('cpu', '?')} / {platform.get('isa', '?')} / torch {platform.get('torch', '?')}",
            "checks": [{"method": c.method, "aggregate": c.aggregate, "stored": c.stored, "rescored": c.rescored,
                        "band": c.band} for c in checks]}
    else:
        records.pop(key, None)
    p = records_path(dataset, results_root)
    atomic_write_bytes(p, (json.dumps(records, indent=1, sort_keys=True, allow_nan=True) + "\n").encode())
    return p


__all__ = ["IMPORTED", "computed_by_label", "computed_by_now", "is_verified", "read_records", "record_verification",
           "records_path"]
