"""Checkpoints and their cards (torchvision-style weights-as-data).

Each zoo entry is ``checkpoints/<id>-<sha8>.safetensors`` plus ``cards/<id>.json``. The card
holds everything needed to rebuild and verify the model (arch, smoothing, recipe, sha256,
accuracies). Loading never unpickles code: weights are safetensors, and an outside ``.pt``
state dict is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import nn

from salbench.model_zoo.architectures import build

# the card files (JSON) are read by model_zoo.catalog, which imports no torch (`salbench zoo list`)
from salbench.model_zoo.catalog import (  # noqa: F401
    ZOO_DIR, default_cards_dir, get_card, list_cards, read_card, zoo_dir)

CARD_SCHEMA_VERSION = 1
CARD_FIELDS = (
    "id", "dataset", "arch", "variant", "preset", "recipe", "smoothing", "num_classes", "weights",
    "sha256", "natural_accuracy", "robust_accuracy", "robust_protocol", "num_params", "torch_version",
    "trainer_commit", "created", "source", "card_schema",
)


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, corrupt, unsafe or does not fit the architecture."""


class ArchitectureMismatchError(CheckpointError):
    """A readable checkpoint whose keys, shapes or tensor kinds do not fit the architecture."""


# the most bytes any checkpoint may hold (file size, or declared inflated size of a torch zip) when the
# architecture is unknown; load_checkpoint bounds it by the architecture's own size instead
MAX_CHECKPOINT_BYTES = 4 << 30


def arch_bytes_limit(state_dict: dict[str, torch.Tensor]) -> int:
    """What a checkpoint of an architecture may take: its tensors at 8 bytes per element (float64
    is accepted and cast), twice over, plus 16 MiB for pickle/zip/header overhead."""
    return 2 * 8 * sum(v.numel() for v in state_dict.values()) + (16 << 20)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without a window in which it is changed where Linux says it
    (``/proc/self/status``), else set and restored under a lock."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: ``0o666`` less the umask (0644 under umask 022).

    ``tempfile.mkstemp`` creates 0600 files; everything written through it here is given this mode,
    so weights, cards, results and journals can be read like the boards (e.g. by a static host)."""
    return 0o666 & ~current_umask()


def open_temp_file(folder: str | os.PathLike, name: str) -> tuple[int, str]:
    """``tempfile.mkstemp`` next to ``name`` in ``folder`` (hidden ``.name.*.tmp``), with the mode of a
    normally created file (:func:`new_file_mode`) instead of 0600."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    try:
        mode = new_file_mode()
        os.fchmod(fd, mode) if hasattr(os, "fchmod") else os.chmod(tmp, mode)
    except BaseException:
        os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise
    return fd, tmp


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``; the file
    gets the mode of a normally created one (0666 less the umask). A ``path`` that is a link, a FIFO, a
    device or a folder is refused before anything is written (``safe_files.UnsafeFileError``)."""
    from salbench.model_zoo.safe_files import check_write_target

    path = Path(path)
    check_write_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = open_temp_file(path.parent, path.name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ZOO_DIR, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def state_dict_bytes(model: nn.Module) -> bytes:
    """The canonical safetensors bytes of a model's weights: the same weights always give the same
    bytes (and sha256). No metadata is stored: the card carries it."""
    from safetensors.torch import save

    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return save(sd)


def read_state_dict(path: str | os.PathLike, *, max_bytes: int | None = None,
                    state_key: str | None = None) -> dict[str, torch.Tensor]:
    """Read weights without executing code: ``.safetensors``, or a ``.pt``/``.pth`` state dict
    through ``torch.load(weights_only=True)``. ``state_key``: the state dict is the entry of that
    name in a checkpoint dict (e.g. ``{"model": state_dict, "epoch": 1}``); without it a dict with a
    ``state_dict`` entry is unwrapped.

    Memory is bounded by ``max_bytes`` (default ``MAX_CHECKPOINT_BYTES``): the file's size, and for a
    (possibly compressed) torch zip the sizes its records declare, are checked before anything is read.
    Every tensor must be dense (strided), real, unquantized and hold data.

    Raises:
        CheckpointError: missing, not a regular file, too large, truncated/corrupt, pickled code, not a
            flat tensor dict, or a sparse/complex/quantized/meta tensor.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a regular file (a directory, FIFO or device); pass a weights file")
    limit = MAX_CHECKPOINT_BYTES if max_bytes is None else int(max_bytes)
    size = path.stat().st_size
    if size > limit:
        raise CheckpointError(f"{path} is {size} bytes, more than the {limit} bytes the weights can take; "
                              "is it the right file?")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path))
        except Exception as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    elif path.suffix in (".pt", ".pth", ".bin"):
        _check_zip_sizes(path, limit)  # before torch.load inflates anything
        try:
            with warnings.catch_warnings():  # torch's own notes (e.g. on sparse tensors) are not for the user
                warnings.simplefilter("ignore")
                sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"{path} could not be loaded as a plain state dict with weights_only=True ({first}); "
                "it may be truncated, corrupt or contain pickled code. Save it with "
                "`safetensors.torch.save_file(model.state_dict(), 'model.safetensors')`."
            ) from None
        if state_key is not None:
            if not isinstance(sd, dict) or state_key not in sd:
                keys = ", ".join(repr(k) for k in sd)[:200] if isinstance(sd, dict) else type(sd).__name__
                raise CheckpointError(f"{path.name} has no entry {state_key!r} (--state-key); its top-level keys: {keys}")
            sd = sd[state_key]
        elif isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
    else:
        raise CheckpointError(f"{path}: unsupported checkpoint format {path.suffix!r}; use .safetensors or a .pt state dict")
    if state_key is not None and path.suffix == ".safetensors":
        raise CheckpointError(f"{path.name}: --state-key applies to a .pt/.pth checkpoint dict; a safetensors file "
                              "holds the state dict itself")
    if not isinstance(sd, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items()):
        nested = [k for k, v in sd.items() if isinstance(v, dict)] if isinstance(sd, dict) else []
        hint = (f"; it looks like a checkpoint dict: pass --state-key with the entry that holds the weights "
                f"({', '.join(map(repr, nested[:4]))})") if nested else ""
        raise CheckpointError(f"{path} does not hold a flat {{name: tensor}} state dict{hint}")
    for k, v in sd.items():
        kind = _tensor_kind_problem(v)
        if kind:
            raise CheckpointError(f"{path.name}: tensor {k!r} is {kind}; weights must be dense real tensors "
                                  "(save `model.state_dict()` of a plain float model)")
    return sd


def _tensor_kind_problem(v: torch.Tensor) -> str | None:
    """Why ``v`` cannot be a weight (sparse/quantized/meta/complex/...), or None for a dense real tensor."""
    if v.layout != torch.strided:
        return f"a {str(v.layout).removeprefix('torch.')} tensor"
    if v.is_quantized:
        return f"a quantized tensor ({v.dtype})"
    if v.is_meta or v.device.type != "cpu":
        return f"a tensor on device {v.device.type!r} (no data)"
    if v.is_complex():
        return f"a complex tensor ({v.dtype})"
    if getattr(v, "is_nested", False):
        return "a nested tensor"
    return None


def _check_zip_sizes(path: Path, limit: int) -> None:
    """A torch zip checkpoint's declared (inflated) record sizes must fit ``limit`` in total, checked
    from the zip's directory before any record is inflated (a small deflated file may declare
    gigabytes). torch's reader allocates by the declared size and fails on a record that inflates to
    more, so the declared sizes bound the memory. A legacy (non-zip) file is bounded by its own size."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable torch checkpoint (corrupt zip: {e})") from None
    total = sum(max(i.file_size, 0) for i in infos)
    big = max(infos, key=lambda i: i.file_size, default=None)
    if total > limit:
        raise CheckpointError(f"{path}: its records declare {total} bytes once inflated (largest {big.filename!r}, "
                              f"{big.file_size} bytes), more than the {limit} bytes the weights can take; refused "
                              "before reading it")


def load_checkpoint(
    path: str | os.PathLike,
    arch: str,
    *,
    num_classes: int = 10,
    dataset: str | None = None,
    smoothing: dict | None = None,
    normalization: dict | None = None,
    state_key: str | None = None,
    key_map: str | None = None,
) -> nn.Module:
    """Build ``arch`` and load weights from an outside file, strictly (no silent missing keys).
    The keyword arguments are those of :func:`read_checkpoint`.

    Raises:
        CheckpointError: unreadable file, or keys/shapes that do not fit the architecture.
    """
    return read_checkpoint(path, arch, num_classes=num_classes, dataset=dataset, smoothing=smoothing,
                           normalization=normalization, state_key=state_key, key_map=key_map)[0]


def read_checkpoint(
    path: str | os.PathLike,
    arch: str,
    *,
    num_classes: int = 10,
    dataset: str | None = None,
    smoothing: dict | None = None,
    normalization: dict | None = None,
    state_key: str | None = None,
    key_map: str | None = None,
) -> tuple[nn.Module, dict]:
    """Build ``arch`` and load weights from an outside file, strictly; returns ``(model, how)``
    where ``how["key_map"]`` names the key map applied (or None).

    Args:
        normalization: ``{"mean": [...], "std": [...]}`` (one value per channel, [0, 1] pixel space)
            for the model's first layer instead of the dataset's (PROTOCOL §1); stored on the card.
        state_key: the checkpoint dict entry that holds the state dict (:func:`read_state_dict`).
        key_map: ``"auto"`` (apply a map of ``model_zoo.keymaps`` for this arch when the file's keys
            fit only after it), a map name (e.g. ``"torchvision"``), or None/"none" (keys as saved).

    Raises:
        CheckpointError: unreadable file, or keys/shapes that do not fit the architecture.
    """
    from salbench.model_zoo import keymaps

    model = build(arch, num_classes=num_classes, dataset=dataset, smoothing=smoothing)
    if normalization is not None:
        set_normalization(model, normalization)
    expected = model.state_dict()
    sd = read_state_dict(path, max_bytes=arch_bytes_limit(expected), state_key=state_key)
    applied = None
    if key_map not in (None, "none", "auto"):
        try:
            sd = keymaps.apply_key_map(sd, arch, key_map)
        except ValueError as e:
            raise CheckpointError(f"{Path(path).name}: {e}") from None
        applied = key_map
    elif key_map == "auto" and set(sd) != set(expected):
        for name in keymaps.key_maps_for(arch):
            mapped = keymaps.apply_key_map(sd, arch, name)
            if set(mapped) == set(expected):
                sd, applied = mapped, name
                break
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        hint = ""
        if smoothing is None and any(k.startswith("smooth.") for k in unexpected):
            hint = " (the file has a SmoothBlock: pass the smoothing filter/placement)"
        elif keymaps.key_maps_for(arch) and applied is None:
            hint = f" (key maps for {arch}: {', '.join(keymaps.key_maps_for(arch))}; `salbench zoo archs` lists the keys)"
        else:
            hint = " (`salbench zoo archs` lists each architecture's keys)"
        raise ArchitectureMismatchError(
            f"{Path(path).name} does not fit architecture {arch!r}{hint}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    bad = [f"{k} {tuple(sd[k].shape)} != {tuple(v.shape)}" for k, v in expected.items() if sd[k].shape != v.shape]
    if bad:
        raise ArchitectureMismatchError(f"{Path(path).name} does not fit architecture {arch!r}: shape mismatch {bad[:3]}")
    kinds = [f"{k} {sd[k].dtype} (expected {'floating point' if v.is_floating_point() else v.dtype})"
             for k, v in expected.items()
             if (v.is_floating_point() != sd[k].is_floating_point()) or (not v.is_floating_point() and sd[k].dtype == torch.bool)]
    if kinds:
        raise ArchitectureMismatchError(f"{Path(path).name} does not fit architecture {arch!r}: dtype mismatch {kinds[:3]}")
    model.load_state_dict({k: sd[k].to(v.dtype) for k, v in expected.items()}, strict=True)
    return model.eval(), {"key_map": applied}


def set_normalization(model: nn.Module, normalization: dict) -> None:
    """Replace a registry model's first layer by ``Normalize(mean, std)`` from ``normalization``
    (``{"mean": [...], "std": [...]}``, one value per input channel, finite, std > 0).

    Raises:
        ValueError: wrong channel count, non-finite values or a std <= 0, or a model without a
            ``normalize`` first layer.
    """
    from salbench.model_zoo.architectures import Normalize

    old = getattr(model, "normalize", None)
    if not isinstance(old, Normalize):
        raise ValueError(f"{type(model).__name__} has no normalisation layer to set")
    channels = old.mean.numel()
    mean, std = normalization.get("mean"), normalization.get("std")
    for label, v in (("mean", mean), ("std", std)):
        if not isinstance(v, (list, tuple)) or len(v) != channels or not all(isinstance(a, (int, float)) for a in v):
            raise ValueError(f"--{label} must be {channels} number(s), one per input channel, got {v!r}")
        if not all(math.isfinite(a) for a in v):
            raise ValueError(f"--{label} must be finite, got {list(v)}")
    if min(std) <= 0:
        raise ValueError(f"--std must be > 0 for every channel, got {list(std)}")
    model.normalize = Normalize([float(a) for a in mean], [float(a) for a in std])


# ----------------------------------------------------------------------------- cards
# read_card, list_cards, get_card: model_zoo.catalog (imported above)


def weights_path(card: dict, cards_dir: Path | None = None) -> Path:
    base = (cards_dir or default_cards_dir()).parent / "checkpoints"
    return base / card["weights"]


def load(model_id: str, *, cards_dir: Path | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Load a zoo model by id: verify the weights' sha256 against the card, rebuild from the card.

    Raises:
        KeyError: unknown id.
        CheckpointError: the weights file is missing or its sha256 differs from the card.
    """
    card = get_card(model_id, cards_dir)
    wp = weights_path(card, cards_dir)
    if not wp.is_file():
        raise CheckpointError(f"weights of {model_id!r} missing: {wp}")
    digest = sha256_file(wp)
    if digest != card["sha256"]:
        raise CheckpointError(f"{wp.name}: sha256 {digest[:16]}... differs from the card's {card['sha256'][:16]}...")
    model = load_checkpoint(wp, card["arch"], num_classes=card["num_classes"], dataset=card["dataset"],
                            smoothing=card["smoothing"], normalization=card.get("normalization"))
    return model.to(device).eval()


def make_card(
    *,
    model_id: str,
    model: nn.Module,
    weights_file: str,
    sha256: str,
    dataset: str,
    arch: str,
    variant: str,
    preset: str,
    recipe: dict | None,
    smoothing: dict | None,
    natural_accuracy: float,
    robust_accuracy: float,
    robust_protocol: dict,
    num_classes: int = 10,
    source: str = "zoo",
    extra: dict | None = None,
) -> dict:
    card = {
        "id": model_id, "dataset": dataset, "arch": arch, "variant": variant, "preset": preset,
        "recipe": recipe, "smoothing": smoothing, "num_classes": num_classes, "weights": weights_file, "sha256": sha256,
        "natural_accuracy": round(float(natural_accuracy), 6), "robust_accuracy": round(float(robust_accuracy), 6),
        "robust_protocol": robust_protocol, "num_params": count_params(model), "torch_version": torch.__version__,
        "trainer_commit": git_commit(), "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": source, "card_schema": CARD_SCHEMA_VERSION,
    }
    if extra:
        card.update(extra)
    return card

