"""Dataset splits as uint8 tensors in [0, 255] (PROTOCOL §1).

``load_split(dataset, split, root=None)`` returns a :class:`Split` for

- ``fmnist``: raw idx files (plain or ``.gz``), e.g. Debian's ``dataset-fashion-mnist`` at
  ``/usr/share/datasets/fashion-mnist`` or torchvision's ``FashionMNIST/raw``; else
  torchvision's download when allowed.
- ``cifar10``: the binary record files (``test_batch.bin`` and ``train.bin`` or
  ``data_batch_{1..5}.bin``), or torchvision's ``cifar-10-batches-py``; else torchvision's
  download when allowed.
- ``imagenette``: torchvision's ``Imagenette`` layout (``imagenette2-320/{train,val}/<wnid>/``),
  or any image folder with one sub-folder per class; resized (short side 256) and centre
  cropped to 224 for evaluation (PROTOCOL §1).

Where the data lives is resolved in this order: the ``root`` argument, the environment
variable (``SALBENCH_FMNIST_DIR``, ``SALBENCH_CIFAR10_DIR``, ``SALBENCH_IMAGENETTE_DIR``),
the known system/offline copies, then ``$SALBENCH_DATA`` (default ``./data``). A missing
dataset raises :class:`DatasetNotFoundError` naming every path tried and how to fetch it.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from salbench.model_zoo.datasets import DatasetNames, SpecView, get_spec

# live views of the dataset specs (salbench.model_zoo.datasets): datasets registered later appear
DATASETS = DatasetNames()
SPLITS = ("train", "test")
REPO_ROOT = Path(__file__).resolve().parent.parent
FMNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
CIFAR10_OFFLINE_DIR = REPO_ROOT.parent / "shared" / "data" / "cifar10"
NUM_CLASSES = SpecView("num_classes")
IMAGE_SHAPE = SpecView("input_shape")


class DatasetNotFoundError(FileNotFoundError):
    """The dataset files were found nowhere; the message says where we looked and what to run."""


@dataclass
class Split:
    """A dataset split held in memory: ``images`` uint8 (N, C, H, W), ``labels`` int64 (N,)."""

    dataset: str
    split: str
    images: Tensor
    labels: Tensor
    source: str

    def __len__(self) -> int:
        return len(self.labels)

    def float_images(self, index=slice(None)) -> Tensor:
        """Images (or a subset) as float32 in [0, 1]."""
        return self.images[index].float().div_(255)

    def sha256(self, indices=None) -> str:
        """sha256 of the selected images' uint8 bytes in index order (PROTOCOL §4)."""
        imgs = self.images if indices is None else self.images[torch.as_tensor(indices)]
        return hashlib.sha256(imgs.contiguous().numpy().tobytes()).hexdigest()


def data_dir() -> Path:
    return Path(os.environ.get("SALBENCH_DATA", REPO_ROOT / "data"))


def load_split(dataset: str, split: str, root: str | os.PathLike | None = None, *, download: bool = True) -> Split:
    """Load a whole split (see the module docstring for sources).

    Raises:
        ValueError: unknown dataset or split.
        DatasetNotFoundError: no copy found and none could be downloaded.
    """
    spec = get_spec(dataset)  # ValueError naming the known datasets
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return spec.load(split, root, download)


def _candidates(root, env: str, defaults: list[Path]) -> list[Path]:
    out = []
    if root is not None:
        out.append(Path(root))
    if os.environ.get(env):
        out.append(Path(os.environ[env]))
    out += defaults
    return out


# ----------------------------------------------------------------------------- FMNIST
_FMNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (plain or gzip'd) into a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte idx file (bad magic {data[:4].hex()})")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: header says {dims}, found {arr.size} bytes")
    return arr.reshape(dims)


def _find_file(d: Path, name: str) -> Path | None:
    for cand in (d / name, d / f"{name}.gz"):
        if cand.is_file():
            return cand
    return None


def _load_fmnist(split, root, download) -> Split:
    dirs = _candidates(root, "SALBENCH_FMNIST_DIR",
                       [FMNIST_SYSTEM_DIR, data_dir() / "FashionMNIST" / "raw"])
    img_name, lbl_name = _FMNIST_FILES[split]
    for d in dirs:
        fi, fl = _find_file(d, img_name), _find_file(d, lbl_name)
        if fi and fl:
            images = torch.from_numpy(read_idx(fi).copy()).unsqueeze(1)
            labels = torch.from_numpy(read_idx(fl).astype(np.int64))
            if len(images) != len(labels):
                raise ValueError(f"{fi} has {len(images)} images but {fl} has {len(labels)} labels")
            return Split("fmnist", split, images, labels, str(d))
    if download and root is None:
        try:
            import torchvision

            ds = torchvision.datasets.FashionMNIST(str(data_dir()), train=split == "train", download=True)
            return Split("fmnist", split, ds.data.unsqueeze(1).clone(), ds.targets.long().clone(),
                         str(data_dir() / "FashionMNIST" / "raw"))
        except Exception as e:  # network errors differ by platform
            reason = f"; torchvision download failed: {e}"
    else:
        reason = ""
    raise DatasetNotFoundError(
        f"FMNIST {split} split not found (looked for {img_name}[.gz] in: {', '.join(map(str, dirs))}){reason}. "
        "Fetch it with `apt-get install dataset-fashion-mnist` (Debian), or "
        "`python -c \"import torchvision; torchvision.datasets.FashionMNIST('data', download=True)\"`, "
        "or point SALBENCH_FMNIST_DIR at a folder holding the idx files."
    )


# ----------------------------------------------------------------------------- CIFAR-10
def _read_cifar_bin(paths: list[Path]) -> tuple[Tensor, Tensor]:
    recs = []
    for p in paths:
        raw = np.fromfile(p, np.uint8)
        if raw.size % 3073:
            raise ValueError(f"{p} is not a CIFAR-10 binary record file ({raw.size} bytes is not a multiple of 3073)")
        recs.append(raw.reshape(-1, 3073))
    arr = np.concatenate(recs)
    labels = torch.from_numpy(arr[:, 0].astype(np.int64))
    images = torch.from_numpy(arr[:, 1:].reshape(-1, 3, 32, 32).copy())
    return images, labels


def _load_cifar10(split, root, download) -> Split:
    dirs = _candidates(root, "SALBENCH_CIFAR10_DIR",
                       [CIFAR10_OFFLINE_DIR, data_dir() / "cifar-10-batches-bin"])
    for d in dirs:
        if split == "test" and (d / "test_batch.bin").is_file():
            return Split("cifar10", split, *_read_cifar_bin([d / "test_batch.bin"]), str(d))
        if split == "train":
            if (d / "train.bin").is_file():
                return Split("cifar10", split, *_read_cifar_bin([d / "train.bin"]), str(d))
            batches = [d / f"data_batch_{i}.bin" for i in range(1, 6)]
            if all(b.is_file() for b in batches):
                return Split("cifar10", split, *_read_cifar_bin(batches), str(d))
    py_dir = data_dir() / "cifar-10-batches-py"
    reason = ""
    if (py_dir.is_dir() or download) and root is None:
        try:
            import torchvision

            ds = torchvision.datasets.CIFAR10(str(data_dir()), train=split == "train", download=download)
            images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
            return Split("cifar10", split, images, torch.tensor(ds.targets, dtype=torch.int64), str(py_dir))
        except Exception as e:
            reason = f"; torchvision: {e}"
    raise DatasetNotFoundError(
        f"CIFAR-10 {split} split not found (looked for test_batch.bin / train.bin / data_batch_*.bin in: "
        f"{', '.join(map(str, dirs))}){reason}. Set SALBENCH_CIFAR10_DIR to a folder with the binary "
        "record files, or run `python -c \"import torchvision; torchvision.datasets.CIFAR10('data', download=True)\"`."
    )


# ----------------------------------------------------------------------------- ImageNette
IMAGENETTE_EVAL_RESIZE = 256
IMAGENETTE_CROP = 224


def _imagenette_folder(root: Path, split: str) -> Path | None:
    sub = "val" if split == "test" else "train"
    for cand in (root / "imagenette2-320" / sub, root / "imagenette2" / sub, root / sub):
        if cand.is_dir():
            return cand
    return None


def _load_imagenette(split, root, download) -> Split:
    from PIL import Image
    from torchvision.transforms import functional as TF

    dirs = _candidates(root, "SALBENCH_IMAGENETTE_DIR", [data_dir() / "imagenette"])
    folder = next((f for f in (_imagenette_folder(d, split) for d in dirs) if f is not None), None)
    if folder is None and download and root is None:
        try:
            import torchvision

            torchvision.datasets.Imagenette(str(dirs[-1]), split="val" if split == "test" else "train",
                                            size="320px", download=True)
            folder = _imagenette_folder(dirs[-1], split)
        except Exception as e:
            raise DatasetNotFoundError(
                f"ImageNette not found in {', '.join(map(str, dirs))} and the download failed ({e}). "
                "On a machine with internet: `python -c \"import torchvision; torchvision.datasets."
                "Imagenette('data/imagenette', size='320px', download=True)\"`, or set SALBENCH_IMAGENETTE_DIR."
            ) from e
    if folder is None:
        raise DatasetNotFoundError(
            f"ImageNette {split} split not found (looked for imagenette2-320/{{train,val}} in "
            f"{', '.join(map(str, dirs))}); set SALBENCH_IMAGENETTE_DIR or allow the torchvision download."
        )
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if len(classes) != NUM_CLASSES["imagenette"]:
        raise ValueError(f"{folder} has {len(classes)} class folders, expected {NUM_CLASSES['imagenette']}")
    files, labels = [], []
    for k, c in enumerate(classes):
        for f in sorted((folder / c).iterdir()):
            if f.suffix.lower() in (".jpeg", ".jpg", ".png"):
                files.append(f)
                labels.append(k)
    images = torch.empty(len(files), 3, IMAGENETTE_CROP, IMAGENETTE_CROP, dtype=torch.uint8)
    for i, f in enumerate(files):
        with Image.open(f) as im:
            t = TF.pil_to_tensor(im.convert("RGB"))
        t = TF.resize(t, IMAGENETTE_EVAL_RESIZE, antialias=True)
        images[i] = TF.center_crop(t, IMAGENETTE_CROP)
    return Split("imagenette", split, images, torch.tensor(labels, dtype=torch.int64), str(folder))
