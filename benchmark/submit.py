"""Submissions: validate an outside checkpoint, card it, and hand it to the harness.

Two formats:

- weights of a registry architecture (``--arch``): safetensors, or a ``.pt`` read with
  ``torch.load(weights_only=True)``; a checkpoint dict with ``--state-key``; torchvision key
  names through a key map (``model_zoo.keymaps``); another input normalisation with
  ``--mean/--std`` (on the card; the model's first layer is built from it);
- an exported program of any architecture (``.pt2``, ``torch.export.save``; card arch
  ``exported``), read by ``model_zoo.exported`` without running code from the file, stored as
  submitted (content-addressed by the file's sha256).

Validation happens before anything is written: the file must fit (keys and shapes, or the
program's checks), hold only finite weights, take the dataset's image shape and produce finite
logits of its class count, one image's logits not depending on the others in its batch. A
claimed natural accuracy (``--claimed-accuracy``) more than 5 points above the measured one is
refused (:func:`check_claimed_accuracy`). A rejected file leaves every result, card and
leaderboard file untouched.
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
from salbench.model_zoo.exported import ARCH as EXPORTED_ARCH
from salbench.model_zoo.exported import is_exported_program, load_exported

from salbench.benchmark.csv_safety import FORMULA_PREFIXES, starts_formula
from salbench.benchmark.results import StoredResultError, leaderboards_dir, read_result_file, result_path, warn


def submissions_root() -> Path:
    return leaderboards_dir() / "submissions"


class SubmissionError(ValueError):
    """The submitted checkpoint failed validation; the message says what is wrong."""


SLUG_MAX = 80  # characters of a name kept in the submission's id (and file names)


def _full_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name.strip()).strip("-.")


def slug(name: str) -> str:
    s = _full_slug(name)
    if not s:
        raise SubmissionError(f"--name {name!r} has no usable characters; use letters, digits, '-', '_' or '.'")
    return s[:SLUG_MAX]


def check_text_fields(name: str, notes: str = "") -> None:
    """Refuse a ``--name`` or ``--notes`` that a spreadsheet opening the board CSV would run as a
    formula (first character ``=``, ``+``, ``-``, ``@``, tab or carriage return; a plain number is
    fine). The boards neutralise such cells anyway (``benchmark.csv_safety``); this says it early.

    >>> check_text_fields("my-model", "trained 10 epochs")
    >>> check_text_fields("=HYPERLINK(1)")
    Traceback (most recent call last):
    ...
    salbench.benchmark.submit.SubmissionError: --name '=HYPERLINK(1)' starts with '=', ...
    """
    for opt, text in (("--name", name), ("--notes", notes)):
        if text and starts_formula(text):
            shown = repr(text if len(text) <= 60 else text[:57] + "...")
            raise SubmissionError(f"{opt} {shown} starts with {text[0]!r}, which a spreadsheet opening the board CSV "
                                  f"would run as a formula (refused first characters: "
                                  f"{' '.join(repr(c) for c in FORMULA_PREFIXES)}); start it with a letter or a "
                                  "digit (nothing was written)")


def parse_smoothing(spec: str | None) -> dict | None:
    """``"gaussian:1"`` -> ``{"filter": "gaussian", "placement": 1}``; None/"none" -> None."""
    if spec in (None, "", "none"):
        return None
    filt, _, place = spec.partition(":")
    try:
        return {"filter": filt, "placement": int(place or 1)}
    except ValueError:
        raise SubmissionError(f"--smoothing must look like FILTER[:PLACEMENT] (e.g. gaussian:1), got {spec!r}") from None


CLAIM_TOLERANCE = 0.05  # a claimed natural accuracy may exceed the measured one by at most 5 points


def validate(path: str | Path, *, arch: str, dataset: str, smoothing: dict | None = None,
             probe: torch.Tensor | None = None, normalization: dict | None = None, state_key: str | None = None,
             key_map: str | None = "auto") -> torch.nn.Module:
    """Load and check a submitted checkpoint or exported program; return the model (eval mode, CPU).

    Raises:
        SubmissionError: with a one-line reason (format, arch mismatch, non-finite weights or outputs,
            wrong class count or image shape, logits that depend on the rest of the batch).
    """
    return _load_and_check(path, arch=arch, dataset=dataset, smoothing=smoothing, probe=probe,
                           normalization=normalization, state_key=state_key, key_map=key_map)[0]


def _load_and_check(path, *, arch, dataset, smoothing=None, probe=None, normalization=None, state_key=None,
                    key_map="auto") -> tuple[torch.nn.Module, dict]:
    path = Path(path)
    exported = arch == EXPORTED_ARCH or is_exported_program(path)
    how: dict = {}
    try:
        if exported:
            if arch not in (None, EXPORTED_ARCH) or not is_exported_program(path):
                raise SubmissionError(f"{path.name}: an exported program is a .pt2 file scored with --arch "
                                      f"{EXPORTED_ARCH} (or no --arch); registry weights take --arch NAME")
            given = [o for o, v in (("--smoothing", smoothing), ("--mean/--std", normalization),
                                    ("--state-key", state_key)) if v]
            if given:
                raise SubmissionError(f"{path.name}: {', '.join(given)} apply to registry weights; an exported "
                                      "program carries its own layers and normalisation")
            model = load_exported(path)
            if model.input_shape != tuple(IMAGE_SHAPE[dataset]):
                raise SubmissionError(f"{path.name}: the program takes {model.input_shape} images, {dataset} "
                                      f"images are {tuple(IMAGE_SHAPE[dataset])}")
        else:
            model, how = zoo.read_checkpoint(path, arch, num_classes=NUM_CLASSES[dataset], dataset=dataset,
                                             smoothing=smoothing, normalization=normalization, state_key=state_key,
                                             key_map=key_map)
    except zoo.CheckpointError as e:
        raise SubmissionError(str(e)) from None
    except ValueError as e:  # unknown arch / smoothing / dataset for this arch / bad mean or std
        if isinstance(e, SubmissionError):
            raise
        raise SubmissionError(f"{path.name}: {e}") from None
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise SubmissionError(f"{path.name}: non-finite (NaN/inf) weights in {bad[:3]}")
    x = probe if probe is not None else torch.rand(8, *IMAGE_SHAPE[dataset], generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            out = model(x)
            one = model(x[:1])
    except (RuntimeError, ValueError, TypeError, IndexError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SubmissionError(f"{path.name}: the model fails on a batch of {tuple(x.shape)} images ({first[:200]})") from None
    if not torch.is_tensor(out) or out.ndim != 2 or out.shape != (len(x), NUM_CLASSES[dataset]):
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise SubmissionError(f"{path.name}: model outputs shape {shape}, expected (B, {NUM_CLASSES[dataset]}) logits")
    if not torch.isfinite(out).all():
        raise SubmissionError(f"{path.name}: model outputs non-finite logits on valid [0, 1] inputs")
    if one.shape != out[:1].shape or not torch.allclose(one, out[:1], rtol=1e-4, atol=1e-4 * float(out.abs().max() + 1)):
        raise SubmissionError(f"{path.name}: an image's logits change with the other images in its batch (e.g. "
                              "BatchNorm in training mode); the protocol scores each image on its own: export/save "
                              "the model in eval mode")
    return model, how


def check_claimed_accuracy(model: torch.nn.Module, test_split, claimed: float | None, *, dataset: str,
                           name: str = "the model", normalization: dict | None = None) -> float | None:
    """Refuse a model whose natural accuracy on the test split is more than ``CLAIM_TOLERANCE``
    below ``claimed`` (a fraction); returns the measured accuracy (None when nothing is claimed).
    The usual cause is an input normalisation other than the one the model was trained with."""
    if claimed is None:
        return None
    from salbench.model_zoo.architectures import NORMALIZATION
    from salbench.model_zoo.attacks import natural_accuracy

    acc = natural_accuracy(model, test_split.images, test_split.labels)
    if claimed - acc > CLAIM_TOLERANCE:
        mean, std = (normalization or {}).get("mean"), (normalization or {}).get("std")
        used = (f"the --mean {mean} / --std {std} given" if normalization else
                f"the {dataset} default normalisation (mean {list(NORMALIZATION[dataset][0])}, std "
                f"{list(NORMALIZATION[dataset][1])})")
        raise SubmissionError(
            f"{name}: natural accuracy {100 * acc:.2f}% on the {dataset} test split ({len(test_split)} images) is "
            f"{100 * (claimed - acc):.2f} points below the claimed {100 * claimed:.2f}% (at most "
            f"{100 * CLAIM_TOLERANCE:.0f} allowed). A likely cause is the input normalisation: the model was scored "
            f"with {used}; pass the mean/std it was trained with (--mean/--std, [0, 1] pixel space), or check "
            "--arch, --dataset and the weights (nothing was written)")
    return acc


def parse_claimed_accuracy(value: float | None) -> float | None:
    """A claimed accuracy as a fraction: values above 1 are read as percent (81.96 -> 0.8196).

    >>> parse_claimed_accuracy(81.96), parse_claimed_accuracy(0.8196), parse_claimed_accuracy(None)
    (0.8196, 0.8196, None)
    """
    if value is None:
        return None
    v = float(value)
    frac = v / 100 if v > 1 else v
    if not 0 < frac <= 1:
        raise SubmissionError(f"--claimed-accuracy must be a fraction in (0, 1] or a percentage in (1, 100], got {value!r}")
    return round(frac, 6)


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
            name = card.get("name", card["id"])
            if len(_full_slug(str(name))) > SLUG_MAX:
                old_name = (old or {}).get("name")
                other = f" (that entry's name: {old_name!r})" if old_name and old_name != name else ""
                raise SubmissionError(
                    f"the name {name!r} is cut to its first {SLUG_MAX} characters for the entry's id "
                    f"{card['id']!r}, which is already used by {held}{other} ({existing}); choose a --name that "
                    f"differs within its first {SLUG_MAX} characters (nothing was written)")
            raise SubmissionError(f"the name {name!r} is already used by {held} "
                                  f"({existing}); choose another --name (nothing was written)")


def prepare_submission(path: str | Path, *, arch: str | None, dataset: str, name: str, notes: str = "",
                       smoothing: dict | None = None, submissions_dir: Path | None = None,
                       probe: torch.Tensor | None = None,
                       results_root: Path | None = None, normalization: dict | None = None,
                       state_key: str | None = None, key_map: str | None = "auto",
                       claimed_accuracy: float | None = None) -> tuple[torch.nn.Module, dict, bytes]:
    """Validate and build the card + the bytes to store, without writing anything: canonical
    safetensors bytes for registry weights, the file itself for an exported program (``arch``
    ``"exported"`` or None with a ``.pt2`` file).

    Raises ``SubmissionError`` when the name is taken by other weights, or the weights are already
    on the board under another id (see :func:`check_not_duplicate`)."""
    check_text_fields(name, notes)
    if arch is None and not is_exported_program(path):
        raise SubmissionError(f"{Path(path).name}: --arch is required for weights (a registry name, see "
                              "`salbench zoo archs`); only an exported .pt2 program needs none")
    model, how = _load_and_check(path, arch=arch, dataset=dataset, smoothing=smoothing, probe=probe,
                                 normalization=normalization, state_key=state_key, key_map=key_map)
    exported = arch in (None, EXPORTED_ARCH)
    mid = f"{dataset}-sub-{slug(name)}"
    payload = Path(path).read_bytes() if exported else zoo.state_dict_bytes(model)
    digest = hashlib.sha256(payload).hexdigest()
    check_name({"id": mid, "dataset": dataset, "sha256": digest, "name": name}, submissions_dir)
    check_not_duplicate({"id": mid, "dataset": dataset, "sha256": digest}, submissions_dir=submissions_dir,
                        results_root=results_root)
    extra = {"name": name, "notes": notes, "submitted_file": Path(path).name,
             "file_sha256": digest if exported else zoo.sha256_file(path)}
    if normalization is not None:
        extra["normalization"] = {"mean": [float(v) for v in normalization["mean"]],
                                  "std": [float(v) for v in normalization["std"]]}
    if how.get("key_map"):
        extra["key_map"] = how["key_map"]
    if state_key is not None:
        extra["state_key"] = state_key
    if claimed_accuracy is not None:
        extra["claimed_accuracy"] = claimed_accuracy
    card = zoo.make_card(
        model_id=mid, model=model, weights_file=f"{mid}-{digest[:8]}.{'pt2' if exported else 'safetensors'}",
        sha256=digest, dataset=dataset, arch=EXPORTED_ARCH if exported else arch, variant="submission",
        preset="submission", recipe=None, smoothing=None if exported else smoothing,
        natural_accuracy=float("nan"), robust_accuracy=float("nan"), robust_protocol={},
        num_classes=NUM_CLASSES[dataset], source="submission", extra=extra,
    )
    return model, card, payload


def load_submission(card: dict, submissions_dir: Path | None = None) -> torch.nn.Module:
    """The model of a stored submission card (its file's sha256 verified against the card; read
    without running code from it), in eval mode on the CPU. Registry weights are rebuilt with the
    card's smoothing and normalisation; an ``exported`` card's program is read by ``load_exported``.

    Raises:
        SubmissionError: the stored file is missing or differs from the card.
    """
    path = (submissions_dir or submissions_root()) / card["dataset"] / card["weights"]
    if not path.is_file():
        raise SubmissionError(f"the stored file of {card['id']} is missing: {path}")
    if zoo.sha256_file(path) != card["sha256"]:
        raise SubmissionError(f"{path} does not match the sha256 on the card of {card['id']}")
    try:
        if card["arch"] == EXPORTED_ARCH:
            return load_exported(path).eval()
        return zoo.load_checkpoint(path, card["arch"], num_classes=card.get("num_classes", NUM_CLASSES[card["dataset"]]),
                                   dataset=card["dataset"], smoothing=card.get("smoothing"),
                                   normalization=card.get("normalization")).eval()
    except (zoo.CheckpointError, ValueError) as e:
        raise SubmissionError(f"{card['id']}: {e}") from None


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
