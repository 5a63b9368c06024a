"""Submissions: validate an outside checkpoint, card it, and hand it to the harness.

Validation happens before anything is written: the file is read without unpickling code
(safetensors, or ``torch.load(weights_only=True)``), must fit the architecture exactly (keys
and shapes), hold only finite weights, and produce finite logits of the dataset's class count.
A rejected file leaves every result, card and leaderboard file untouched.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import replace
from pathlib import Path

import torch

from salbench.model_zoo import zoo
from salbench.model_zoo.data import IMAGE_SHAPE, NUM_CLASSES

from salbench.benchmark.results import StoredResultError, leaderboards_dir, read_result_file, result_path, warn


def submissions_root() -> Path:
    return leaderboards_dir() / "submissions"


class SubmissionError(ValueError):
    """The submitted checkpoint failed validation; the message says what is wrong."""


def slug(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", name.strip()).strip("-.")
    if not s:
        raise SubmissionError(f"--name {name!r} has no usable characters; use letters, digits, '-', '_' or '.'")
    return s[:80]


def parse_smoothing(spec: str | None) -> dict | None:
    """``"gaussian:1"`` -> ``{"filter": "gaussian", "placement": 1}``; None/"none" -> None."""
    if spec in (None, "", "none"):
        return None
    filt, _, place = spec.partition(":")
    try:
        return {"filter": filt, "placement": int(place or 1)}
    except ValueError:
        raise SubmissionError(f"--smoothing must look like FILTER[:PLACEMENT] (e.g. gaussian:1), got {spec!r}") from None


def validate(path: str | Path, *, arch: str, dataset: str, smoothing: dict | None = None,
             probe: torch.Tensor | None = None) -> torch.nn.Module:
    """Load and check a submitted checkpoint; return the model (eval mode, CPU).

    Raises:
        SubmissionError: with a one-line reason (format, arch mismatch, non-finite weights or outputs,
            wrong class count).
    """
    path = Path(path)
    try:
        model = zoo.load_checkpoint(path, arch, num_classes=NUM_CLASSES[dataset], dataset=dataset, smoothing=smoothing)
    except zoo.CheckpointError as e:
        raise SubmissionError(str(e)) from None
    except ValueError as e:  # unknown arch / smoothing / dataset for this arch
        raise SubmissionError(f"{path.name}: {e}") from None
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise SubmissionError(f"{path.name}: non-finite (NaN/inf) weights in {bad[:3]}")
    x = probe if probe is not None else torch.rand(8, *IMAGE_SHAPE[dataset], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x)
    if out.ndim != 2 or out.shape[1] != NUM_CLASSES[dataset]:
        raise SubmissionError(f"{path.name}: model outputs shape {tuple(out.shape)}, expected (B, {NUM_CLASSES[dataset]}) logits")
    if not torch.isfinite(out).all():
        raise SubmissionError(f"{path.name}: model outputs non-finite logits on valid [0, 1] inputs")
    return model


def check_not_degenerate(model: torch.nn.Module, imageset, config, *, name: str = "the model", n: int = 32) -> None:
    """Refuse, before scoring, a model whose saliency maps are all zero on the first ``n`` images of
    the set for some method (e.g. all-zero weights): sparsity, SSIM and ROS are undefined for such
    maps (PROTOCOL §3), and scoring would spend minutes to publish nothing meaningful."""
    from salbench.benchmark.scoring import explainer_for

    x = imageset.images[:n].float().div(255)
    y = imageset.labels[:n]
    model = model.cpu().eval()
    for m in config.methods:
        maps = explainer_for(m, replace(config, batch_size=len(x), ig_internal_batch_size=None))(model, x, y)
        if not bool(torch.isfinite(maps).all()):
            raise SubmissionError(f"{name}: its {m} saliency maps are not finite on the image set; refused before scoring")
        if not bool(maps.any()):
            raise SubmissionError(f"{name}: every {m} saliency map of the first {len(x)} set images is zero (a "
                                  "degenerate model, e.g. all-zero weights or a constant output): sparsity, SSIM "
                                  "and ROS are undefined for it; refused before scoring (nothing was written)")


def existing_entry(dataset: str, sha256: str, *, submissions_dir: Path | None = None,
                   results_root: Path | None = None, cards_dir: Path | None = None) -> list[str]:
    """Ids under which the weights ``sha256`` are already known for ``dataset``: zoo cards, submission
    cards and stored results (whatever the config they were scored with)."""
    ids = [c["id"] for c in zoo.list_cards(dataset, cards_dir) if c.get("sha256") == sha256]
    ids += [c["id"] for c in list_submission_cards(dataset, submissions_dir) if c.get("sha256") == sha256]
    p = result_path(dataset, sha256, root=results_root)
    if p.is_file():
        try:
            model = read_result_file(p).get("model", {})
        except StoredResultError:
            model = {}  # an unverifiable file names no entry (it is replaced when these weights are scored)
        if model.get("sha256") == sha256 and model.get("id"):
            ids.append(model["id"])
    return list(dict.fromkeys(ids))


def check_not_duplicate(card: dict, *, submissions_dir: Path | None = None, results_root: Path | None = None,
                        cards_dir: Path | None = None) -> None:
    """One entry per checkpoint: weights already on the board under another id are refused
    (``SubmissionError`` naming that id); the same name again updates its own entry."""
    others = [i for i in existing_entry(card["dataset"], card["sha256"], submissions_dir=submissions_dir,
                                        results_root=results_root, cards_dir=cards_dir) if i != card["id"]]
    if others:
        name = others[0].removeprefix(f"{card['dataset']}-sub-")
        hint = (f"resubmit with --name {name!r} to update that entry" if others[0] != name
                else "it is a zoo model")
        raise SubmissionError(f"these weights (sha256 {card['sha256'][:12]}...) are already on the {card['dataset']} "
                              f"leaderboard as {others[0]!r}; {hint} (nothing was written)")


def check_name(card: dict, submissions_dir: Path | None = None) -> None:
    """The submission's id (from ``--name``) is free or already holds these same weights; checked
    again under the store lock when the submission is committed, so of two concurrent submissions of
    different weights under one name only the first lands."""
    existing = (submissions_dir or submissions_root()) / card["dataset"] / f"{card['id']}.json"
    if existing.is_file():
        old = _read_card(existing)
        if old is None or old.get("sha256") != card["sha256"]:
            held = f"another checkpoint ({str(old.get('sha256'))[:12]}...)" if old else "an unreadable card"
            raise SubmissionError(f"the name {card.get('name', card['id'])!r} is already used by {held} "
                                  f"({existing}); choose another --name (nothing was written)")


def prepare_submission(path: str | Path, *, arch: str, dataset: str, name: str, notes: str = "",
                       smoothing: dict | None = None, submissions_dir: Path | None = None,
                       probe: torch.Tensor | None = None,
                       results_root: Path | None = None) -> tuple[torch.nn.Module, dict, bytes]:
    """Validate and build the card + canonical safetensors bytes, without writing anything.

    Raises ``SubmissionError`` when the name is taken by other weights, or the weights are already
    on the board under another id (see :func:`check_not_duplicate`)."""
    model = validate(path, arch=arch, dataset=dataset, smoothing=smoothing, probe=probe)
    mid = f"{dataset}-sub-{slug(name)}"
    payload = zoo.state_dict_bytes(model)
    digest = hashlib.sha256(payload).hexdigest()
    check_name({"id": mid, "dataset": dataset, "sha256": digest, "name": name}, submissions_dir)
    check_not_duplicate({"id": mid, "dataset": dataset, "sha256": digest}, submissions_dir=submissions_dir,
                        results_root=results_root)
    card = zoo.make_card(
        model_id=mid, model=model, weights_file=f"{mid}-{digest[:8]}.safetensors", sha256=digest, dataset=dataset,
        arch=arch, variant="submission", preset="submission", recipe=None, smoothing=smoothing,
        natural_accuracy=float("nan"), robust_accuracy=float("nan"), robust_protocol={},
        num_classes=NUM_CLASSES[dataset], source="submission",
        extra={"name": name, "notes": notes, "submitted_file": Path(path).name, "file_sha256": zoo.sha256_file(path)},
    )
    return model, card, payload


def store_submission(card: dict, payload: bytes, submissions_dir: Path | None = None) -> Path:
    sdir = (submissions_dir or submissions_root()) / card["dataset"]
    zoo.atomic_write_bytes(sdir / card["weights"], payload)
    zoo.atomic_write_json(sdir / f"{card['id']}.json", card)
    return sdir / f"{card['id']}.json"


def list_submission_cards(dataset: str, submissions_dir: Path | None = None) -> list[dict]:
    sdir = (submissions_dir or submissions_root()) / dataset
    return [c for c in map(_read_card, sorted(sdir.glob("*.json"))) if c is not None]


def _read_card(p: Path) -> dict | None:
    """A submission card, or None (with a one-line warning naming the file) when it is unreadable."""
    try:
        card = json.loads(p.read_bytes())
    except (OSError, ValueError) as e:
        warn(f"submission card {p} is unreadable ({type(e).__name__}); ignored")
        return None
    if not isinstance(card, dict) or not card.get("sha256") or not card.get("id"):
        warn(f"submission card {p} has no id or sha256; ignored")
        return None
    return card
