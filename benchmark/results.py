"""The result store: one JSON file per (checkpoint sha256, protocol version) and dataset.

``leaderboards/results/<dataset>/<sha256[:16]>-<protocol>.json`` holds the model's card
summary, per-image values, curves, timings, versions, seed, the resolved config and the
result's :func:`identity <result_identity>`. Files are written atomically. A stored result is
re-used only when its identity equals the one asked for (same weights, protocol, image set and
score-affecting config, see :func:`identity_fields`); otherwise the model is scored again and the
file replaced, so the store holds the latest result of each checkpoint.

Every file carries ``digest``, the sha256 of its own canonical content (:func:`content_digest`),
checked on every read (:func:`read_result_file`): a file edited by hand, empty or truncated is
named in a one-line warning and left out (never published; a zoo model's is scored again only when
asked, ``salbench leaderboard --only ID`` or ``--rescore``: a board regeneration never starts hours of
unasked scoring), and it blocks no other row. Files written before the digest existed (the committed
ones) are accepted only when their exact bytes are listed in ``benchmark/legacy_results.json``.
Only regular files are read or replaced (``model_zoo.safe_files``): a link, FIFO, device or
oversize file in the results folder is named and left out the same way, never followed, read or
written through, and a results folder reached through a link is refused.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from salbench.metrics.protocol import PROTOCOL_VERSION
from salbench.model_zoo.safe_files import UnsafeFileError, check_folder, check_write_target, read_regular
from salbench.model_zoo.zoo import atomic_write_bytes

DEFAULT_LEADERBOARDS_DIR = Path(__file__).resolve().parent.parent / "leaderboards"


def leaderboards_dir() -> Path:
    """``$SALBENCH_LEADERBOARDS_DIR`` or the repo's ``leaderboards/`` (CSVs, results, submissions, figures)."""
    return Path(os.environ.get("SALBENCH_LEADERBOARDS_DIR") or DEFAULT_LEADERBOARDS_DIR)


def results_dir() -> Path:
    return leaderboards_dir() / "results"

# card fields copied into each result so a leaderboard needs nothing else
MODEL_FIELDS = ("id", "dataset", "arch", "variant", "preset", "source", "sha256", "natural_accuracy",
                "robust_accuracy", "num_params", "smoothing", "notes", "name", "normalization", "key_map",
                "state_key")

# what, besides the weights' bytes, decides the function a submission computes (issue 28, item 4):
# the architecture it is built as, its smoothing blocks, the input normalisation put in front of it
# and how its state dict was read (key map, state key). An exported program's file bytes (its sha256)
# hold its graph and weights. A zoo model's card is committed with its weights, so its identity
# keeps the weights' sha256 alone (and the identities of every stored zoo result stay as they were).
FUNCTION_FIELDS = ("arch", "smoothing", "normalization", "key_map", "state_key")


def function_fields(model: dict) -> dict | None:
    """The identity's ``function`` block of a card (or a result's ``model`` block): for a submission,
    :data:`FUNCTION_FIELDS` as the card holds them (absent ones None); for a zoo model, None."""
    if not isinstance(model, dict) or model.get("source") != "submission":
        return None
    return {k: model.get(k) for k in FUNCTION_FIELDS}


def result_path(dataset: str, sha256: str, protocol: str = PROTOCOL_VERSION, root: Path | None = None) -> Path:
    return (root or results_dir()) / dataset / f"{sha256[:16]}-{protocol}.json"


# ---------------------------------------------------------------------------------------------
# the typed result
# ---------------------------------------------------------------------------------------------

_REQUIRED = {"protocol": str, "dataset": str, "imageset": dict, "config": dict, "versions": dict, "device": str,
             "accuracy": dict, "summary": dict, "per_image": dict, "timings": dict}
_STORED = {"model": dict, "created": str, "identity": str, "digest": str, "band": dict, "computed_by": dict}


@dataclass
class Result:
    """One model scored on one image set: what ``benchmark.scoring.score`` returns and, with the
    model block, identity and digest added by :func:`save_result`, what a result file holds.

    ``to_dict()`` is the JSON form (the stored file's keys and order); ``from_dict`` validates a
    JSON form and raises ``ValueError`` naming the first problem (a missing or mistyped field,
    per-image values that do not cover the ``imageset.n`` images, methods that do not match the
    config). ``Result.from_dict(r.to_dict()) == r``.
    """

    protocol: str
    dataset: str
    imageset: dict  # images_sha256, n, split
    config: dict  # the resolved ScoreConfig.to_dict()
    versions: dict
    device: str
    accuracy: dict  # on_set; natural, robust, robust_protocol when measured
    summary: dict  # method -> {aggregate: value} (metric_registry.MetricSpec.summarize)
    per_image: dict  # correct, and method -> per-image values (MetricSpec.encode)
    timings: dict
    model: dict | None = None  # the card's MODEL_FIELDS (stored results)
    created: str | None = None
    identity: str | None = None
    digest: str | None = None
    band: dict | None = None  # the numerical band (benchmark.bands, PROTOCOL §8.4)
    computed_by: dict | None = None  # the code and platform that computed it (benchmark.provenance)

    @property
    def methods(self) -> list[str]:
        return list(self.summary)

    @property
    def n(self) -> int:
        return int(self.imageset["n"])

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("model", "created") if getattr(self, k) is not None}
        d.update({k: getattr(self, k) for k in _REQUIRED})
        d.update({k: getattr(self, k) for k in ("computed_by", "band", "identity", "digest")
                  if getattr(self, k) is not None})
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Result":
        if not isinstance(d, dict):
            raise ValueError(f"a result must be a JSON object, got {type(d).__name__}")
        unknown = sorted(set(d) - set(_REQUIRED) - set(_STORED))
        if unknown:
            raise ValueError(f"result has unknown fields {unknown}; expected {sorted({**_REQUIRED, **_STORED})}")
        for k, t in {**_REQUIRED, **_STORED}.items():
            if k in _REQUIRED and k not in d:
                raise ValueError(f"result lacks the field {k!r}")
            if k in d and not isinstance(d[k], t):
                raise ValueError(f"result field {k!r} must be a {t.__name__}, got {type(d[k]).__name__}")
        r = cls(**d)
        r._validate()
        return r

    def _validate(self) -> None:
        from salbench.benchmark import metric_registry as R

        n = self.imageset.get("n")
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"result imageset.n must be a non-negative integer, got {n!r}")
        if not isinstance(self.imageset.get("images_sha256"), str):
            raise ValueError("result imageset.images_sha256 must be a string")
        correct = self.per_image.get("correct")
        if not isinstance(correct, list) or len(correct) != n:
            raise ValueError(f"result per_image.correct must list the {n} images, got "
                             f"{len(correct) if isinstance(correct, list) else type(correct).__name__}")
        methods = self.config.get("methods")
        if methods is not None and list(methods) != self.methods:
            raise ValueError(f"result summary methods {self.methods} differ from its config's {list(methods)}")
        for m in self.methods:
            per = self.per_image.get(m)
            if not isinstance(per, dict):
                raise ValueError(f"result has a {m} summary but no per-image {m} values")
            for spec in R.metrics_in(per):
                for field in spec.fields:
                    v = per[field]
                    axis = spec.image_axis.get(field, 0)
                    got = len(v) if axis == 0 else (len(v[0]) if v else 0)
                    if axis and not all(len(row) == n for row in v):
                        got = -1
                    if got != n:
                        raise ValueError(f"result per_image.{m}.{field} must cover the {n} images (axis {axis})")
                if not isinstance(self.summary[m], dict):
                    raise ValueError(f"result summary.{m} must be an object")
            if "acc_on_set" in self.per_image.get(m, {}):
                raise ValueError("per_image fields may not be named acc_on_set")
        if not isinstance(self.accuracy.get("on_set"), (int, float)):
            raise ValueError("result accuracy.on_set must be a number")


# ---------------------------------------------------------------------------------------------
# identity: everything that changes a number of a result
# ---------------------------------------------------------------------------------------------

def device_type(device: str) -> str:
    """``"cuda:1"`` -> ``"cuda"``; ``"cpu"`` -> ``"cpu"``; ``"mps"`` -> ``"mps"`` (torch.device(...).type)."""
    return str(device).split(":", 1)[0].strip().lower()


def identity_fields(*, sha256: str, protocol: str, images_sha256: str, n_images: int, config: dict,
                    function: dict | None = None) -> dict:
    """The canonical fields a result's numbers are a function of.

    ``config`` is a *resolved* score config as stored in a result (``ScoreConfig.to_dict()`` with
    ``batch_size`` filled in). Included: the weights sha256, the protocol version, the image set
    hash, and from the config the methods (in order: it is the row order), the metrics (when not
    the protocol's four: ``benchmark.metric_registry``), IG steps, σ levels,
    ROS samples and variant, ROAD levels and noise, the seed, whether accuracies are measured, the
    device *type* (``torch.Generator`` draws different noise on CPU and CUDA; the index of a GPU does
    not change the draws), and the batch size as far as it changes the random draws: generators are
    keyed by batch start, so every batch size >= the set size draws the same noise and counts as
    ``n_images``.

    For a submission, ``function`` (:func:`function_fields` of its card: architecture, smoothing,
    normalisation, key map, state key) is included too: the same weights read another way compute
    another function, so a resubmission that changes any of them is scored again.

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
        **_metrics_field(c),
        **({"function": json.loads(json.dumps(function, sort_keys=True))} if function is not None else {}),
    }


# the metric set of every result scored before metrics were registered (their configs do not name it)
_PROTOCOL_METRICS = ("gini", "ssim", "ros", "road")


def _metrics_field(config: dict) -> dict:
    """``{"metrics": [...]}`` when a config scores another metric set than the protocol's four, else
    nothing: a result of the protocol's metrics keeps the identity it had before the field existed."""
    names = [str(m) for m in (config.get("metrics") or _PROTOCOL_METRICS)]
    return {} if tuple(names) == _PROTOCOL_METRICS else {"metrics": names}


def result_identity(*, sha256: str, protocol: str, images_sha256: str, n_images: int, config: dict,
                    function: dict | None = None) -> str:
    """The identity of a result: sha256 (hex) of the canonical JSON (sorted keys, no spaces) of
    :func:`identity_fields`. Two results with the same identity hold the same numbers (up to float
    rounding), so a stored result is re-used exactly when its identity equals the requested one."""
    fields = identity_fields(sha256=sha256, protocol=protocol, images_sha256=images_sha256, n_images=n_images,
                             config=config, function=function)
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _doc_identity_args(doc: dict) -> dict:
    return {"sha256": doc["model"]["sha256"], "protocol": doc["protocol"],
            "images_sha256": doc["imageset"]["images_sha256"], "n_images": doc["imageset"]["n"],
            "config": doc["config"], "function": function_fields(doc["model"])}


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
                        config: dict, function: dict | None = None) -> list[str]:
    """Which identity fields of a stored result differ from the requested ones, as
    ``"name: stored -> requested"`` strings (empty when they agree or the file cannot say)."""
    try:
        have = identity_fields(**_doc_identity_args(doc))
    except (KeyError, TypeError, ValueError):
        return ["the stored file has no readable config"]
    want = identity_fields(sha256=sha256, protocol=protocol, images_sha256=images_sha256, n_images=n_images,
                           config=config, function=function)
    out = [f"{k}: {have.get(k)} -> {want[k]}" for k in want if have.get(k) != want[k]]
    if isinstance(want.get("function"), dict):  # name the function fields that changed, not the whole block
        old = have.get("function") or {}
        out = [x for x in out if not x.startswith("function:")] + [
            f"{k}: {old.get(k)} -> {v}" for k, v in want["function"].items() if old.get(k) != v]
    return out


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
    doc = _read_or_warn(p, "treated as absent (scored again)")
    if doc is None or doc.get("model", {}).get("sha256") != sha256 or doc.get("protocol") != protocol:
        return None  # a stale, foreign or unverifiable file: treat as absent
    if not _on_set(doc, images_sha256):
        return None
    if identity is not None and identity_of(doc) != identity:
        return None
    return doc


def find_reusable(dataset: str, sha256: str, *, config: dict, images_sha256: str, n_images: int,
                  protocol: str = PROTOCOL_VERSION, root: Path | None = None,
                  function: dict | None = None, replace_unverifiable: bool = True) -> tuple[dict | None, str]:
    """Look up a stored result that may be re-used for a score with the resolved ``config``.

    Returns ``(doc, message)``: ``doc`` is the stored result when its identity matches (``message``
    then says what is re-used and when it was scored), else None with ``message`` saying why it is
    scored (no stored result, another image set, or which config fields differ). A stored file that
    fails verification (:func:`read_result_file`) is scored again and replaced, or with
    ``replace_unverifiable=False`` its :class:`StoredResultError` is raised."""
    want = dict(sha256=sha256, protocol=protocol, images_sha256=images_sha256, n_images=n_images, config=config,
                function=function)
    p = result_path(dataset, sha256, protocol, root)
    if not os.path.lexists(p):  # a link or FIFO there is named by read_result_file, not called absent
        return None, "no stored result"
    try:
        doc = read_result_file(p)
    except StoredResultError as e:
        if not replace_unverifiable:
            raise
        return None, f"{e}; it is replaced"
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


def result_document(result: "Result | dict", card: dict, root: Path | None = None) -> tuple[Path, bytes]:
    """The path and the bytes :func:`save_result` writes (nothing is written): the card's model
    fields always win over a ``model`` block already in ``result`` (e.g. a re-used result), the
    identity is (re)computed and the content digest (:func:`content_digest`) added."""
    if isinstance(result, Result):
        result = result.to_dict()
    model = {k: card.get(k) for k in MODEL_FIELDS}
    rest = {k: v for k, v in result.items() if k not in ("model", "created", "identity", "digest")}
    doc = {"model": model,
           "created": result.get("created") or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           **rest}
    doc["identity"] = result_identity(**_doc_identity_args(doc))
    doc["digest"] = content_digest(doc)
    p = result_path(result["dataset"], card["sha256"], result["protocol"], root)
    # compact: per-image lists make an indented file ~3x larger
    return p, (json.dumps(doc, separators=(",", ":")) + "\n").encode()


def save_result(result: "Result | dict", card: dict, root: Path | None = None) -> Path:
    """Write ``result`` for the checkpoint of ``card`` atomically (see :func:`result_document`)."""
    p, data = result_document(result, card, root)
    atomic_write_bytes(p, data)
    return p


# ---------------------------------------------------------------------------------------------
# verification: a stored result is read only when its content is what was written
# ---------------------------------------------------------------------------------------------

# sha256 of the bytes of result files written before results carried a digest (the committed
# leaderboards/results/ files): such a file is accepted without a digest only when its bytes are listed
LEGACY_MANIFEST = Path(__file__).resolve().parent / "legacy_results.json"

# the most bytes a stored result may hold (safe_files.read_regular: never a link, FIFO or device). The
# largest committed result (FMNIST, 1000 images, VG + IG) is about 0.98 MB; 32 MiB leaves a margin of
# ~30x for more methods, metrics or images, and bounds what a planted file can make a command read
MAX_RESULT_BYTES = 32 << 20
MAX_MANIFEST_BYTES = 1 << 20  # the legacy manifest (about 1 KB)


class StoredResultError(ValueError):
    """A stored result file is unreadable (empty, truncated, not JSON) or its content does not match
    its digest (edited by hand); the message names the file."""


def content_digest(doc: dict) -> str:
    """sha256 (hex) of the canonical JSON (sorted keys, no spaces) of a result without its
    ``digest`` field: what a result file carries as ``digest`` and is checked against on every read.
    It covers every stored number, the model block (with the checkpoint sha256) and the identity."""
    body = {k: v for k, v in doc.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _legacy_hashes() -> set[str]:
    try:
        return set(json.loads(read_regular(LEGACY_MANIFEST, max_bytes=MAX_MANIFEST_BYTES, what="legacy manifest")))
    except (OSError, ValueError):  # UnsafeFileError (a link, FIFO, ...) is a ValueError: nothing is listed
        return set()


def read_result_file(p: Path) -> dict:
    """Read and verify one stored result file.

    Raises:
        StoredResultError: empty/truncated/not a JSON object, no model sha256, or a content digest
            that does not match (or, for a file without a digest, bytes not in the legacy manifest).
    """
    try:
        raw = read_regular(p, max_bytes=MAX_RESULT_BYTES, what="stored result")
    except UnsafeFileError as e:  # a link, FIFO, device or folder, or an oversize file: never followed or read
        raise StoredResultError(str(e)) from None
    except OSError as e:
        raise StoredResultError(f"stored result {p} is unreadable ({e.strerror or e})") from None
    try:
        doc = json.loads(raw)
    except UnicodeDecodeError as e:  # a ValueError without .msg/.lineno: named here, never an AttributeError
        raise StoredResultError(f"stored result {p} is not UTF-8 text (byte {e.start}); it is damaged or not a "
                                "result file") from None
    except ValueError as e:
        what = "empty" if not raw.strip() else f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
        raise StoredResultError(f"stored result {p} is {what}; probably truncated by a crash") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("model"), dict) or not doc["model"].get("sha256"):
        raise StoredResultError(f"stored result {p} has no model block with a checkpoint sha256")
    if "digest" in doc:
        if doc["digest"] != content_digest(doc):
            raise StoredResultError(f"stored result {p} does not match its digest: its content was changed after "
                                    "it was written (edited by hand?)")
    elif hashlib.sha256(raw).hexdigest() not in _legacy_hashes():
        raise StoredResultError(f"stored result {p} carries no digest and is not a known committed result "
                                f"({LEGACY_MANIFEST.name}): it cannot be verified")
    try:
        Result.from_dict(doc)
    except ValueError as e:
        raise StoredResultError(f"stored result {p} is malformed: {e}") from None
    return doc


_WARNED: set[str] = set()


def warn(message: str, once: bool = True) -> None:
    """One line on stderr (with ``once``: per distinct message and process, e.g. a bad stored file)."""
    if not once or message not in _WARNED:
        _WARNED.add(message)
        print(f"salbench: warning: {message}", file=sys.stderr, flush=True)


def results_folder(dataset: str, root: Path | None = None) -> Path:
    """``<root or leaderboards/results>/<dataset>``, refused when a component inside the store (the
    ``results`` folder, the dataset's folder) is a link: reads and writes never go through one.

    Raises:
        StoredResultError: naming the folder and the link.
    """
    folder = (root or results_dir()) / dataset
    try:
        return check_folder(folder, root or leaderboards_dir(), what="results folder")
    except UnsafeFileError as e:
        raise StoredResultError(str(e)) from None


def check_result_target(dataset: str, sha256: str, protocol: str = PROTOCOL_VERSION,
                        root: Path | None = None) -> Path:
    """The result path of these weights, checked before a score is written there: its folder reached
    without a link (:func:`results_folder`) and the file, when it exists, a regular file itself (not a
    link, FIFO, device or folder).

    Raises:
        StoredResultError: one line naming the path and what it is (nothing is read or written).
    """
    results_folder(dataset, root)
    p = result_path(dataset, sha256, protocol, root)
    try:
        check_write_target(p, what="stored result")
    except UnsafeFileError as e:
        raise StoredResultError(str(e)) from None
    return p


# what happens to a stored file that cannot be verified, said with it (one line per file and process)
LEFT_OUT = ("left out of the board (restore it, or delete it and score the model again: "
            "`salbench leaderboard --only ID` for a zoo model)")


def _read_or_warn(p: Path, action: str) -> dict | None:
    try:
        return read_result_file(p)
    except StoredResultError as e:
        warn(f"{e}; {action}")
        return None


def list_results(dataset: str, protocol: str = PROTOCOL_VERSION, root: Path | None = None,
                 images_sha256: str | None = None) -> list[dict]:
    """Every stored, verified result of ``dataset`` (only those scored on ``images_sha256`` when
    given). A file that is unreadable or fails verification (:func:`read_result_file`) is left out
    with a one-line warning naming it: it is never published, and it blocks no other row. So is a
    link, FIFO, device or oversize file (never followed or read); a results folder reached through a
    link is refused (:class:`StoredResultError`, :func:`results_folder`)."""
    d = results_folder(dataset, root)
    out = []
    for p in sorted(d.glob(f"*-{protocol}.json")):
        doc = _read_or_warn(p, LEFT_OUT)
        if doc is not None and _on_set(doc, images_sha256):
            out.append(doc)
    return out
