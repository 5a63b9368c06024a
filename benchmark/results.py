"""The result store: one JSON file per (checkpoint sha256, protocol version) and dataset.

``leaderboards/results/<dataset>/<sha256[:16]>-<protocol>.json`` holds the model's card
summary, per-image values, curves, timings, versions, seed, the resolved config and the
result's :func:`identity <result_identity>`. Files are written atomically. A stored result is
re-used only when its identity equals the one asked for (same weights, protocol, image set and
score-affecting config, see :func:`identity_fields`); otherwise the model is scored again and the
file replaced, so the store holds the latest result of each checkpoint.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from pathlib import Path

from salbench.metrics.protocol import PROTOCOL_VERSION
from salbench.model_zoo.zoo import atomic_write_bytes

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


# ---------------------------------------------------------------------------------------------
# identity: everything that changes a number of a result
# ---------------------------------------------------------------------------------------------

def device_type(device: str) -> str:
    """``"cuda:1"`` -> ``"cuda"``; ``"cpu"`` -> ``"cpu"``; ``"mps"`` -> ``"mps"`` (torch.device(...).type)."""
    return str(device).split(":", 1)[0].strip().lower()


def identity_fields(*, sha256: str, protocol: str, images_sha256: str, n_images: int, config: dict) -> dict:
    """The canonical fields a result's numbers are a function of.

    ``config`` is a *resolved* score config as stored in a result (``ScoreConfig.to_dict()`` with
    ``batch_size`` filled in). Included: the weights sha256, the protocol version, the image set
    hash, and from the config the methods (in order: it is the row order), IG steps, σ levels,
    ROS samples and variant, ROAD levels and noise, the seed, whether accuracies are measured, the
    device *type* (``torch.Generator`` draws different noise on CPU and CUDA; the index of a GPU does
    not change the draws), and the batch size as far as it changes the random draws: generators are
    keyed by batch start, so every batch size >= the set size draws the same noise and counts as
    ``n_images``.

    Left out on purpose (execution knobs that change no draw and no formula, only float rounding,
    like the thread count): ``ig_internal_batch_size`` (how many IG path points one forward pass
    holds) and the exact GPU index/model.
    """
    c = config
    return {
        "weights_sha256": str(sha256),
        "protocol": str(protocol),
        "images_sha256": str(images_sha256),
        "methods": [str(m) for m in c["methods"]],
        "ig_steps": int(c["ig_steps"]),
        "sigmas": [float(s) for s in c["sigmas"]],
        "ros_samples": int(c["ros_samples"]),
        "ros_variant": str(c["ros_variant"]),
        "road_percentages": [int(p) for p in c["road_percentages"]],
        "road_noise": float(c["road_noise"]),
        "seed": int(c["seed"]),
        "accuracy": bool(c.get("accuracy", True)),
        "draw_batch_size": min(int(c["batch_size"]), int(n_images)),
        "device_type": device_type(c.get("device", "cpu")),
    }


def result_identity(*, sha256: str, protocol: str, images_sha256: str, n_images: int, config: dict) -> str:
    """The identity of a result: sha256 (hex) of the canonical JSON (sorted keys, no spaces) of
    :func:`identity_fields`. Two results with the same identity hold the same numbers (up to float
    rounding), so a stored result is re-used exactly when its identity equals the requested one."""
    fields = identity_fields(sha256=sha256, protocol=protocol, images_sha256=images_sha256, n_images=n_images,
                             config=config)
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _doc_identity_args(doc: dict) -> dict:
    return {"sha256": doc["model"]["sha256"], "protocol": doc["protocol"],
            "images_sha256": doc["imageset"]["images_sha256"], "n_images": doc["imageset"]["n"],
            "config": doc["config"]}


def identity_of(doc: dict) -> str | None:
    """The identity of a stored result: its ``identity`` field, or (files written before the field
    existed) the identity computed from its own stored model sha256, protocol, image set and config.
    None when the file lacks what it takes (treated as a mismatch)."""
    if doc.get("identity"):
        return doc["identity"]
    try:
        return result_identity(**_doc_identity_args(doc))
    except (KeyError, TypeError, ValueError):
        return None


def identity_difference(doc: dict, *, sha256: str, protocol: str, images_sha256: str, n_images: int,
                        config: dict) -> list[str]:
    """Which identity fields of a stored result differ from the requested ones, as
    ``"name: stored -> requested"`` strings (empty when they agree or the file cannot say)."""
    try:
        have = identity_fields(**_doc_identity_args(doc))
    except (KeyError, TypeError, ValueError):
        return ["the stored file has no readable config"]
    want = identity_fields(sha256=sha256, protocol=protocol, images_sha256=images_sha256, n_images=n_images,
                           config=config)
    return [f"{k}: {have[k]} -> {want[k]}" for k in want if have.get(k) != want[k]]


def _on_set(doc: dict, images_sha256: str | None) -> bool:
    return images_sha256 is None or doc.get("imageset", {}).get("images_sha256") == images_sha256


def load_result(dataset: str, sha256: str, protocol: str = PROTOCOL_VERSION, root: Path | None = None,
                images_sha256: str | None = None, identity: str | None = None) -> dict | None:
    """The stored result of a checkpoint, or None. With ``images_sha256``, a result scored on another
    image set (e.g. before the set was rebuilt) counts as absent, so it is scored again. With
    ``identity`` (:func:`result_identity`), so does a result whose identity differs (another config,
    device type, ...)."""
    p = result_path(dataset, sha256, protocol, root)
    if not p.is_file():
        return None
    doc = json.loads(p.read_text())
    if doc.get("model", {}).get("sha256") != sha256 or doc.get("protocol") != protocol:
        return None  # a stale or foreign file: treat as absent
    if not _on_set(doc, images_sha256):
        return None
    if identity is not None and identity_of(doc) != identity:
        return None
    return doc


def find_reusable(dataset: str, sha256: str, *, config: dict, images_sha256: str, n_images: int,
                  protocol: str = PROTOCOL_VERSION, root: Path | None = None) -> tuple[dict | None, str]:
    """Look up a stored result that may be re-used for a score with the resolved ``config``.

    Returns ``(doc, message)``: ``doc`` is the stored result when its identity matches (``message``
    then says what is re-used and when it was scored), else None with ``message`` saying why it is
    scored (no stored result, another image set, or which config fields differ)."""
    want = dict(sha256=sha256, protocol=protocol, images_sha256=images_sha256, n_images=n_images, config=config)
    p = result_path(dataset, sha256, protocol, root)
    if not p.is_file():
        return None, "no stored result"
    doc = json.loads(p.read_text())
    if doc.get("model", {}).get("sha256") != sha256 or doc.get("protocol") != protocol:
        return None, f"the stored file {p.name} belongs to other weights or another protocol"
    if not _on_set(doc, images_sha256):
        return None, "the stored result was scored on another image set"
    if identity_of(doc) != result_identity(**want):
        diff = identity_difference(doc, **want)
        return None, "the stored result was scored with another config (" + "; ".join(diff or ["identity"]) + ")"
    return doc, (f"re-using the stored result of {doc['model'].get('id')} (sha256 {sha256[:12]}...) "
                 f"scored on {doc.get('created', 'an unknown date')} ({doc.get('device', '?')}, protocol {protocol}); "
                 "--rescore scores again")


def save_result(result: dict, card: dict, root: Path | None = None) -> Path:
    """Write ``result`` for the checkpoint of ``card``; the card's model fields always win over a
    ``model`` block already in ``result`` (e.g. a re-used result), and the identity is (re)computed."""
    model = {k: card.get(k) for k in MODEL_FIELDS}
    rest = {k: v for k, v in result.items() if k not in ("model", "created", "identity")}
    doc = {"model": model,
           "created": result.get("created") or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           **rest}
    doc["identity"] = result_identity(**_doc_identity_args(doc))
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
