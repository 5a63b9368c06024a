"""The fixed image set of each dataset (PROTOCOL §4): built once from the zoo's reference
N, A and G models, committed as ``benchmark/imagesets/<dataset>.json``, verified on every load."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from salbench.model_zoo import zoo
from salbench.model_zoo.data import Split, load_split
from salbench.model_zoo.datasets import SpecView
from salbench.model_zoo.safe_files import UnsafeFileError, read_regular

IMAGESETS_DIR = Path(__file__).resolve().parent / "imagesets"
SET_SIZE = 1000
# the most bytes an image-set file may hold (read by safe_files.read_regular: never a link, FIFO or
# device): a committed 1000-image set is about 18 KB, so 16 MiB leaves room for sets ~900x larger
MAX_IMAGESET_BYTES = 16 << 20
SELECTION_SEED = 0
# the zoo's reference N, A and G of each dataset (PROTOCOL §4)
# variant -> reference zoo id per dataset (the dataset specs, PROTOCOL §4)
REFERENCE_MODELS = SpecView("reference_models")


class ImageSetError(ValueError):
    """The committed image set does not match the data or the zoo it was built from."""


@dataclass
class ImageSet:
    dataset: str
    split: str
    indices: Tensor  # (N,) int64, sorted
    labels: Tensor  # (N,) int64
    images: Tensor  # (N, C, H, W) uint8
    reference_models: dict  # variant -> {"id", "sha256"}
    images_sha256: str

    def __len__(self) -> int:
        return len(self.indices)

    def batches(self, batch_size: int):
        """Yield ``(start, x float [0,1], y)`` over the set in order."""
        for s in range(0, len(self), batch_size):
            yield s, self.images[s : s + batch_size].float().div_(255), self.labels[s : s + batch_size]


def imageset_path(dataset: str, directory: Path | None = None) -> Path:
    """``<directory or $SALBENCH_IMAGESETS_DIR or benchmark/imagesets>/<dataset>.json``."""
    import os

    return Path(directory or os.environ.get("SALBENCH_IMAGESETS_DIR") or IMAGESETS_DIR) / f"{dataset}.json"


@torch.no_grad()
def _correct_mask(model, split: Split, batch_size: int = 1000) -> Tensor:
    out = torch.empty(len(split), dtype=torch.bool)
    for s in range(0, len(split), batch_size):
        out[s : s + batch_size] = model(split.float_images(slice(s, s + batch_size))).argmax(1) == split.labels[s : s + batch_size]
    return out


def select_indices(correct: Tensor, n: int = SET_SIZE, seed: int = SELECTION_SEED) -> np.ndarray:
    """PROTOCOL §4: ``default_rng(seed).choice`` of ``n`` among the commonly correct indices, sorted.

    >>> select_indices(torch.tensor([True, False, True, True]), n=2).tolist()
    [2, 3]
    """
    pool = np.flatnonzero(correct.numpy())
    if len(pool) < n:
        raise ImageSetError(f"only {len(pool)} test images are classified correctly by every reference model; need {n}")
    chosen = np.random.default_rng(seed).choice(pool, n, replace=False)
    return np.sort(chosen)


def build_imageset(
    dataset: str,
    reference_ids: dict[str, str],
    *,
    split: str = "test",
    n: int = SET_SIZE,
    root=None,
    out_dir: Path | None = None,
    cards_dir: Path | None = None,
    test_split: Split | None = None,
) -> Path:
    """Select the set from the reference models ``{"N": id, "A": id, "G": id}`` and write its JSON."""
    data = test_split or load_split(dataset, split, root)
    correct = torch.ones(len(data), dtype=torch.bool)
    refs = {}
    for variant, mid in sorted(reference_ids.items()):
        card = zoo.get_card(mid, cards_dir)
        model = zoo.load(mid, cards_dir=cards_dir)
        correct &= _correct_mask(model, data)
        refs[variant] = {"id": mid, "sha256": card["sha256"]}
    idx = select_indices(correct, n)
    doc = {
        "dataset": dataset,
        "split": split,
        "protocol": "PROTOCOL §4",
        "selection": {"rng": f"numpy.random.default_rng({SELECTION_SEED}).choice", "pool_size": int(correct.sum()),
                      "split_size": len(data)},
        "reference_models": refs,
        "images_sha256": data.sha256(idx),
        "indices": idx.tolist(),
        "labels": data.labels[torch.as_tensor(idx)].tolist(),
    }
    path = imageset_path(dataset, out_dir)
    zoo.atomic_write_json(path, doc)
    return path


# key -> (type, what it holds): what load_imageset needs of a set file
_DOC_KEYS = {"dataset": (str, "the dataset name"), "split": (str, "the split name"),
             "images_sha256": (str, "the selected images' sha256"), "indices": (list, "the image indices"),
             "labels": (list, "the labels"), "reference_models": (dict, "the reference checkpoints")}


def read_imageset_doc(path: Path) -> dict:
    """Parse an image-set file and check it has every key load_imageset needs, of the right type.

    Raises:
        ImageSetError: naming the file, and the missing or malformed key (or that it is truncated).
    """
    try:
        raw = read_regular(path, max_bytes=MAX_IMAGESET_BYTES, what="image set")
    except UnsafeFileError as e:
        raise ImageSetError(str(e)) from None  # a link, FIFO, device or oversize file: never followed or read
    except OSError as e:
        raise ImageSetError(f"image set {path} is unreadable ({e.strerror or e})") from None
    try:
        doc = json.loads(raw)
    except ValueError as e:
        what = "empty" if not raw.strip() else f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
        raise ImageSetError(f"image set {path} is {what}: truncated or damaged; restore it "
                            "(git checkout) or rebuild it with `salbench imageset build`") from None
    if not isinstance(doc, dict):
        raise ImageSetError(f"image set {path} is not a JSON object")
    for key, (typ, what) in _DOC_KEYS.items():
        if key not in doc:
            raise ImageSetError(f"image set {path} lacks the key {key!r} ({what}); restore the file")
        if not isinstance(doc[key], typ):
            raise ImageSetError(f"image set {path}: key {key!r} is a {type(doc[key]).__name__}, "
                                f"expected a {typ.__name__} ({what})")
    if len(doc["indices"]) != len(doc["labels"]) or not all(type(i) is int and i >= 0
                                                            for i in doc["indices"] + doc["labels"]):
        raise ImageSetError(f"image set {path}: keys 'indices' and 'labels' must be lists of non-negative integers "
                            "of one length")
    for variant, ref in doc["reference_models"].items():
        if not isinstance(ref, dict) or not isinstance(ref.get("id"), str) or not isinstance(ref.get("sha256"), str):
            raise ImageSetError(f"image set {path}: key 'reference_models.{variant}' needs an 'id' and a 'sha256'")
    return doc


def load_imageset(
    dataset: str,
    *,
    root=None,
    directory: Path | None = None,
    test_split: Split | None = None,
    cards_dir: Path | None = None,
    check_references: bool = True,
) -> ImageSet:
    """Load and verify the committed set: image bytes hash, labels, reference checkpoints.

    Raises:
        ImageSetError: no set committed, different dataset files, or reference models that
            are not the ones the set was built from.
    """
    path = imageset_path(dataset, directory)
    if not (path.exists() or path.is_symlink()):  # a link, FIFO or device there is named by the read below
        raise ImageSetError(f"no image set for {dataset!r} at {path}; build it with `salbench imageset build --dataset {dataset}`")
    doc = read_imageset_doc(path)
    data = test_split or load_split(dataset, doc["split"], root)
    idx = torch.tensor(doc["indices"], dtype=torch.int64)
    if len(idx) and int(idx.max()) >= len(data):
        raise ImageSetError(f"{path.name} indexes image {int(idx.max())} but the {doc['split']} split has {len(data)} images "
                            f"(loaded from {data.source}): different dataset files")
    digest = data.sha256(idx)
    if digest != doc["images_sha256"]:
        raise ImageSetError(
            f"{path.name}: the selected images' sha256 is {digest[:16]}..., the set was built on {doc['images_sha256'][:16]}...: "
            f"the dataset files at {data.source} differ from the ones the set was built from. "
            "Use the canonical files (see README); the set is never re-selected silently."
        )
    labels = data.labels[idx]
    if labels.tolist() != doc["labels"]:
        raise ImageSetError(f"{path.name}: labels differ from the dataset at {data.source}: different dataset files")
    if check_references:
        for variant, ref in doc["reference_models"].items():
            try:
                card = zoo.get_card(ref["id"], cards_dir)
            except KeyError as e:
                raise ImageSetError(f"{path.name}: reference model {variant} {ref['id']!r} is not in the zoo ({e})") from None
            if card["sha256"] != ref["sha256"]:
                raise ImageSetError(f"{path.name}: reference model {ref['id']!r} has sha256 {card['sha256'][:16]}... in the zoo, "
                                    f"the set was built from {ref['sha256'][:16]}...; rebuild the set deliberately")
    return ImageSet(dataset, doc["split"], idx, labels, data.images[idx].clone(), doc["reference_models"], digest)
