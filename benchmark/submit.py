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
claimed natural accuracy (``--claimed-accuracy``) more than 0.5 points above the one measured on
the full test split is refused, naming the usual input normalisation that fits the claim where
one does (:func:`check_claimed_accuracy`). A rejected file leaves every result, card and
leaderboard file untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, replace
from pathlib import Path

import torch

from salbench.model_zoo import zoo
from salbench.model_zoo.catalog import MAX_CARD_BYTES
from salbench.model_zoo.data import IMAGE_SHAPE, NUM_CLASSES
from salbench.model_zoo.exported import ARCH as EXPORTED_ARCH
from salbench.model_zoo.exported import current_limits, default_limits, is_exported_program, limits, load_exported
from salbench.model_zoo.safe_files import UnsafeFileError, check_folder, check_write_target, read_regular

from salbench.benchmark.csv_safety import FORMULA_PREFIXES, starts_formula
from salbench.benchmark.results import StoredResultError, leaderboards_dir, read_result_file, result_path, warn
from salbench.benchmark.results import check_result_target


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


CLAIM_TOLERANCE = 0.005  # a claimed natural accuracy may exceed the one measured (full test split) by at most 0.5 points

# what a model that is not an exported program and does not fit its --arch is told (README "Any architecture: export it")
PT2_ROUTE = ("any other architecture: export it with torch.export (inputs in [0, 1], its normalisation inside "
             "forward) and score the .pt2 file: `salbench score my_model.pt2 --dataset {dataset} --name NAME`; "
             "README 'Any architecture: export it'")


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
        hint = f" ({PT2_ROUTE.format(dataset=dataset)})" if isinstance(e, zoo.ArchitectureMismatchError) else ""
        raise SubmissionError(f"{e}{hint}") from None
    except ValueError as e:  # unknown arch / smoothing / dataset for this arch / bad mean or std
        if isinstance(e, SubmissionError):
            raise
        arch_problem = str(e).startswith(("unknown architecture", "architecture "))  # model_zoo.architectures.registry
        hint = f" ({PT2_ROUTE.format(dataset=dataset)})" if arch_problem else ""
        raise SubmissionError(f"{path.name}: {e}{hint}") from None
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


IMAGENET_NORMALIZATION = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # torchvision's usual transform


def usual_normalizations(dataset: str) -> list[tuple[str, tuple[float, ...], tuple[float, ...]]]:
    """The input normalisations a ``dataset`` model is usually trained with, as ``(label, mean, std)``
    in [0, 1] pixel space: none (identity on [0, 1]), mean/std 0.5/0.5, the dataset's own statistics
    (its spec, the registry models' default) and, for RGB images, ImageNet's.

    >>> [(label, mean, std) for label, mean, std in usual_normalizations("fmnist")]
    [('none', (0.0,), (1.0,)), ('0.5/0.5', (0.5,), (0.5,)), ('fmnist', (0.286,), (0.353,))]
    """
    from salbench.model_zoo.datasets import get_spec

    spec = get_spec(dataset)
    c = len(spec.mean)
    out = [("none", (0.0,) * c, (1.0,) * c), ("0.5/0.5", (0.5,) * c, (0.5,) * c),
           (dataset, tuple(spec.mean), tuple(spec.std))]
    if c == 3:
        out.append(("imagenet", *IMAGENET_NORMALIZATION))
    seen, unique = set(), []
    for label, mean, std in out:  # a dataset whose own statistics are one of the others is tried once
        key = tuple(round(v, 6) for v in (*mean, *std))
        if key not in seen:
            seen.add(key)
            unique.append((label, mean, std))
    return unique


def _numbers(values) -> str:
    return " ".join(f"{float(v):g}" for v in values)


def _describe(label: str, mean, std, dataset: str) -> str:
    """'mean 0.5 / std 0.5', 'no normalisation (mean 0 / std 1)', 'the fmnist default (mean 0.286 / std 0.353)'."""
    ms = f"mean {_numbers(mean)} / std {_numbers(std)}"
    if label == "none":
        return f"no normalisation ({ms})"
    if label == dataset:
        return f"the {dataset} default normalisation ({ms})"
    if label == "imagenet":
        return f"ImageNet's normalisation ({ms})"
    return ms


class _Prenormalized(torch.nn.Module):
    """``program((x - mean) / std)``: what an exported program computes on input normalised first."""

    def __init__(self, program: torch.nn.Module, mean, std) -> None:
        super().__init__()
        from salbench.model_zoo.architectures import Normalize

        self.program, self.normalize = program, Normalize([float(v) for v in mean], [float(v) for v in std])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(self.normalize(x))


def check_claimed_accuracy(model: torch.nn.Module, test_split, claimed: float | None, *, dataset: str,
                           name: str = "the model", normalization: dict | None = None) -> float | None:
    """Refuse a model whose natural accuracy on the test split (all of it, in fixed batches, eval
    mode: deterministic) is more than ``CLAIM_TOLERANCE`` (0.5 points) below ``claimed`` (a
    fraction); returns the measured accuracy (None when nothing is claimed).

    The usual cause is an input normalisation other than the one the model was trained with, so a
    refused model is measured again under each of :func:`usual_normalizations` and the refusal names
    the one whose accuracy fits the claim. Registry weights (the model has a ``Normalize`` first layer)
    get that layer replaced, and the message gives the exact ``--mean/--std`` to re-submit with. An
    exported program (no such layer) is fed input normalised first; its message says the
    normalisation must be inside the program (``.pt2`` files take no ``--mean/--std``)."""
    if claimed is None:
        return None
    from salbench.model_zoo.architectures import NORMALIZATION, Normalize
    from salbench.model_zoo.attacks import natural_accuracy

    acc = natural_accuracy(model, test_split.images, test_split.labels)
    if claimed - acc <= CLAIM_TOLERANCE + 1e-9:  # 1e-9: the claim is a rounded decimal
        return acc
    old = getattr(model, "normalize", None)
    registry = isinstance(old, Normalize)
    used = ((tuple(old.mean.flatten().tolist()), tuple(old.std.flatten().tolist())) if registry
            else ((0.0,) * IMAGE_SHAPE[dataset][0], (1.0,) * IMAGE_SHAPE[dataset][0]))
    tried = []  # (label, mean, std, accuracy) of every other usual normalisation
    for label, mean, std in usual_normalizations(dataset):
        if all(abs(a - b) < 1e-6 for a, b in zip((*mean, *std), (*used[0], *used[1]))):
            continue  # what was just measured
        if registry:
            try:
                zoo.set_normalization(model, {"mean": list(mean), "std": list(std)})
                model.normalize.to(old.mean.device)
                a = natural_accuracy(model, test_split.images, test_split.labels)
            finally:
                model.normalize = old
        else:
            a = natural_accuracy(_Prenormalized(model, mean, std), test_split.images, test_split.labels)
        tried.append((label, mean, std, a))
    fits = [t for t in tried if claimed - t[3] <= CLAIM_TOLERANCE + 1e-9]
    head = (f"{name}: natural accuracy {100 * acc:.2f}% on the {dataset} test split ({len(test_split)} images) is "
            f"{100 * (claimed - acc):.2f} points below the claimed {100 * claimed:.2f}% (at most "
            f"{100 * CLAIM_TOLERANCE:g} allowed)")
    if fits:
        label, mean, std, a = max(fits, key=lambda t: t[3])
        if registry:
            if label == dataset:
                how = "re-submit without --mean/--std (the default)"
            else:
                how = f"re-submit with --mean {_numbers(mean)} --std {_numbers(std)}"
            now = (f"the --mean {_numbers(used[0])} / --std {_numbers(used[1])} given" if normalization else
                   f"the {dataset} default normalisation (mean {_numbers(used[0])} / std {_numbers(used[1])})")
            raise SubmissionError(
                f"{head}; with {_describe(label, mean, std, dataset)} instead of {now} it reaches {100 * a:.2f}%, "
                f"so the model was likely trained with that input normalisation: {how} (nothing was written)")
        raise SubmissionError(
            f"{head}; fed images normalised with {_describe(label, mean, std, dataset)} first it reaches "
            f"{100 * a:.2f}%, so the program expects normalised input: the normalisation must be inside the "
            f"exported program (inputs in [0, 1], x = (x - mean) / std at the start of forward; README 'Any "
            f"architecture: export it'); export it again and re-submit (nothing was written)")
    others = ", ".join(f"{_describe(label, mean, std, dataset)}: {100 * a:.2f}%" for label, mean, std, a in tried)
    if registry:
        mean, std = (normalization or {}).get("mean"), (normalization or {}).get("std")
        used_txt = (f"the --mean {mean} / --std {std} given" if normalization else
                    f"the {dataset} default normalisation (mean {list(NORMALIZATION[dataset][0])}, std "
                    f"{list(NORMALIZATION[dataset][1])})")
        raise SubmissionError(
            f"{head}. A likely cause is the input normalisation: the model was scored with {used_txt}, and none "
            f"of the usual ones reaches the claim ({others}); pass the mean/std it was trained with (--mean/--std, "
            "[0, 1] pixel space), or check --arch, --dataset and the weights (nothing was written)")
    raise SubmissionError(
        f"{head}. Fed normalised input it does not reach the claim either ({others}); an exported program takes "
        "[0, 1] images and carries its normalisation inside forward (README 'Any architecture: export it'): check "
        "the program, --dataset and the claimed accuracy (nothing was written)")


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
    try:  # where a score of these weights is written: no link, FIFO or device there (or on the way)
        p = check_result_target(dataset, sha256, root=results_root)
    except StoredResultError as e:
        raise SubmissionError(f"{e} (nothing was written)") from None
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
    sdir = submission_folder(card["dataset"], submissions_dir)
    existing = sdir / f"{card['id']}.json"
    for target, what in ((existing, "submission card"), (sdir / str(card.get("weights", "")), "submission file")):
        if target != sdir:
            try:  # the card and weights are written there: never through a link, never into a FIFO or device
                check_write_target(target, what=what)
            except UnsafeFileError as e:
                raise SubmissionError(f"{e} (nothing was written)") from None
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
    weights_file = f"{mid}-{digest[:8]}.{'pt2' if exported else 'safetensors'}"
    check_name({"id": mid, "dataset": dataset, "sha256": digest, "name": name, "weights": weights_file},
               submissions_dir)
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
    if exported and current_limits() != default_limits():  # raised caps travel with the card (verify, site)
        extra["exported_limits"] = asdict(current_limits())
    card = zoo.make_card(
        model_id=mid, model=model, weights_file=weights_file,
        sha256=digest, dataset=dataset, arch=EXPORTED_ARCH if exported else arch, variant="submission",
        preset="submission", recipe=None, smoothing=None if exported else smoothing,
        natural_accuracy=float("nan"), robust_accuracy=float("nan"), robust_protocol={},
        num_classes=NUM_CLASSES[dataset], source="submission", extra=extra,
    )
    return model, card, payload


def card_limits(card: dict) -> dict:
    """The exported-program caps a submission was scored under (``exported_limits`` on its card, written
    when ``salbench score --max-...`` raised them), as keyword arguments of ``exported.limits``; {} for
    the defaults. A malformed entry is a ``SubmissionError`` naming the card."""
    raw = card.get("exported_limits")
    if raw is None:
        return {}
    kinds = {"max_nodes": int, "max_tensor_bytes": int, "max_gflops_per_image": (int, float)}
    if (not isinstance(raw, dict) or set(raw) - set(kinds)
            or any(isinstance(v, bool) or not isinstance(v, kinds[k]) or not v > 0 for k, v in raw.items())):
        raise SubmissionError(f"the card of {card.get('id')} has a malformed exported_limits entry {raw!r}; expected "
                              "positive max_nodes, max_tensor_bytes and max_gflops_per_image")
    return dict(raw)


def load_submission(card: dict, submissions_dir: Path | None = None) -> torch.nn.Module:
    """The model of a stored submission card (its file's sha256 verified against the card; read
    without running code from it), in eval mode on the CPU. Registry weights are rebuilt with the
    card's smoothing and normalisation; an ``exported`` card's program is read by ``load_exported``.

    Raises:
        SubmissionError: the stored file is missing or differs from the card.
    """
    path = submission_folder(card["dataset"], submissions_dir) / card["weights"]
    if not os.path.lexists(path):
        raise SubmissionError(f"the stored file of {card['id']} is missing: {path}")
    try:  # a link, FIFO or device in the store is never followed or read
        check_write_target(path, what="stored submission file")
    except UnsafeFileError as e:
        raise SubmissionError(str(e)) from None
    if zoo.sha256_file(path) != card["sha256"]:
        raise SubmissionError(f"{path} does not match the sha256 on the card of {card['id']}")
    try:
        if card["arch"] == EXPORTED_ARCH:
            with limits(**card_limits(card)):  # the caps it was scored under, when they were raised
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


def submission_folder(dataset: str, submissions_dir: Path | None = None) -> Path:
    """``<submissions_dir or leaderboards/submissions>/<dataset>``; ``SubmissionError`` when a component
    inside the store is a link (cards and files are never read or written through one)."""
    sdir = (submissions_dir or submissions_root()) / dataset
    try:
        return check_folder(sdir, submissions_dir or leaderboards_dir(), what="submissions folder")
    except UnsafeFileError as e:
        raise SubmissionError(str(e)) from None


def list_submission_cards(dataset: str, submissions_dir: Path | None = None) -> list[dict]:
    sdir = submission_folder(dataset, submissions_dir)
    return [c for c in map(_read_card, sorted(sdir.glob("*.json"))) if c is not None]


def _read_card(p: Path) -> dict | None:
    """A submission card, or None (with a one-line warning naming the file) when it is unreadable, or a
    link, FIFO, device or larger than a card (never followed or read)."""
    try:
        card = json.loads(read_regular(p, max_bytes=MAX_CARD_BYTES, what="submission card"))
    except UnsafeFileError as e:
        warn(f"{e}; ignored")
        return None
    except (OSError, ValueError) as e:
        warn(f"submission card {p} is unreadable ({type(e).__name__}); ignored")
        return None
    if not isinstance(card, dict) or not card.get("sha256") or not card.get("id"):
        warn(f"submission card {p} has no id or sha256; ignored")
        return None
    return card
