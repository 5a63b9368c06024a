"""One declarative spec per dataset (in the spirit of timm's pretrained configs).

Everything that differs between datasets lives here: input shape, classes, normalisation,
the loader, the default scoring batch size, the robust-accuracy attack (PROTOCOL §3), the
default training preset and the reference models of the fixed image set (PROTOCOL §4). Data
loading, architectures, recipes, scoring, image sets, the CLI and the figures read it, so
adding a dataset is one :func:`register_dataset` call plus a loader.

Example:
    >>> get_spec("cifar10").num_classes, get_spec("cifar10").input_shape
    (10, (3, 32, 32))
    >>> "fmnist" in dataset_names()
    True
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset as the benchmark sees it.

    Attributes:
        name: the id used everywhere (``--dataset``, file names, cards).
        input_shape: (C, H, W) of the model input, pixel values in [0, 1] (PROTOCOL §1).
        class_names: one name per class, in label order.
        mean, std: per-channel statistics of the model's first (normalisation) layer.
        loader: ``(split, root, download) -> Split``, or ``"module:function"`` resolved on use.
        robust_eval: PGD L∞ of the robust accuracy: ``eps``, ``alpha``, ``steps`` (PROTOCOL §3).
        score_batch_size: images per scoring batch by default.
        default_preset: the training preset of the dataset's reference models.
        reference_arch: the zoo architecture of those models.
    """

    name: str
    input_shape: tuple[int, int, int]
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    loader: Callable | str
    robust_eval: dict = field(default_factory=dict)
    score_batch_size: int = 64
    default_preset: str = "paper"
    reference_arch: str = ""

    def __post_init__(self) -> None:
        c = self.input_shape[0]
        if len(self.input_shape) != 3 or min(self.input_shape) < 1:
            raise ValueError(f"dataset {self.name!r}: input_shape must be (C, H, W), got {self.input_shape}")
        if len(self.mean) != c or len(self.std) != c or min(self.std) <= 0:
            raise ValueError(f"dataset {self.name!r}: mean/std need {c} entries (one per channel) and std > 0")
        if len(self.class_names) < 2:
            raise ValueError(f"dataset {self.name!r}: needs at least 2 classes")
        missing = {"eps", "alpha", "steps"} - set(self.robust_eval)
        if missing:
            raise ValueError(f"dataset {self.name!r}: robust_eval lacks {sorted(missing)}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return self.mean, self.std

    @property
    def reference_models(self) -> dict[str, str]:
        """variant -> zoo id of the reference N, A and G the image set is defined by (PROTOCOL §4)."""
        return {v: f"{self.name}-{self.reference_arch}-{v}-{self.default_preset}" for v in ("N", "A", "G")}

    def load(self, split: str, root=None, download: bool = True):
        fn = self.loader
        if isinstance(fn, str):
            module, _, attr = fn.partition(":")
            fn = getattr(importlib.import_module(module), attr)
        return fn(split, root, download)


_SPECS: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec, *, replace: bool = False) -> DatasetSpec:
    """Add a dataset; ``replace=True`` overrides an existing entry (tests, private forks)."""
    if spec.name in _SPECS and not replace:
        raise ValueError(f"dataset {spec.name!r} is already registered")
    _SPECS[spec.name] = spec
    return spec


def unregister_dataset(name: str) -> None:
    _SPECS.pop(name, None)


def get_spec(name: str) -> DatasetSpec:
    try:
        return _SPECS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; expected one of {tuple(_SPECS)}") from None


def dataset_names() -> tuple[str, ...]:
    return tuple(_SPECS)


class SpecView(Mapping):
    """A live read-only mapping dataset -> one attribute of its spec (``NUM_CLASSES`` and friends
    stay importable and see datasets registered later)."""

    def __init__(self, attr: str) -> None:
        self._attr = attr

    def __getitem__(self, name: str):
        if name not in _SPECS:
            raise KeyError(name)
        return getattr(_SPECS[name], self._attr)

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(_SPECS))

    def __len__(self) -> int:
        return len(_SPECS)

    def __repr__(self) -> str:
        return f"SpecView({self._attr!r}, {dict(self)!r})"


class DatasetNames:
    """A live sequence of the registered names (usable as argparse ``choices``)."""

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(_SPECS))

    def __contains__(self, name) -> bool:
        return name in _SPECS

    def __len__(self) -> int:
        return len(_SPECS)

    def __getitem__(self, i):
        return tuple(_SPECS)[i]

    def __repr__(self) -> str:
        return repr(tuple(_SPECS))


_FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
_CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_IMAGENETTE_CLASSES = ("tench", "English springer", "cassette player", "chain saw", "church", "French horn",
                       "garbage truck", "gas pump", "golf ball", "parachute")

register_dataset(DatasetSpec(
    "fmnist", (1, 28, 28), _FMNIST_CLASSES, (0.2860,), (0.3530,), "salbench.model_zoo.data:_load_fmnist",
    robust_eval=dict(eps=0.1, alpha=0.01, steps=40), score_batch_size=250, default_preset="paper-10ep",
    reference_arch="lenet"))
register_dataset(DatasetSpec(
    "cifar10", (3, 32, 32), _CIFAR_CLASSES, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
    "salbench.model_zoo.data:_load_cifar10", robust_eval=dict(eps=8 / 255, alpha=2 / 255, steps=10),
    score_batch_size=250, default_preset="cpu-resnet8", reference_arch="resnet8"))
register_dataset(DatasetSpec(
    "imagenette", (3, 224, 224), _IMAGENETTE_CLASSES, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
    "salbench.model_zoo.data:_load_imagenette", robust_eval=dict(eps=1 / 255, alpha=2 / 255, steps=20),
    score_batch_size=16, default_preset="paper", reference_arch="resnet18"))
