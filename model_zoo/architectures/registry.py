"""Architecture registry (timm-style): builders are registered by name and built by ``build``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    name: str
    builder: Callable[..., nn.Module]
    input_size: int
    datasets: tuple[str, ...]


_REGISTRY: dict[str, ArchSpec] = {}


def register(name: str, *, input_size: int, datasets: tuple[str, ...]):
    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"architecture {name!r} registered twice")
        _REGISTRY[name] = ArchSpec(name, fn, input_size, datasets)
        return fn

    return deco


def list_archs() -> list[str]:
    """Names of every registered architecture."""
    return sorted(_REGISTRY)


def arch_spec(name: str) -> ArchSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(list_archs())}") from None


def build(arch: str, *, num_classes: int = 10, dataset: str | None = None, smoothing: dict | None = None) -> nn.Module:
    """Build a registered architecture taking [0, 1] inputs (PROTOCOL §1).

    Args:
        arch: registry name (see ``list_archs()``).
        num_classes: K, the number of logits.
        dataset: which normalisation the first layer uses; defaults to the arch's first dataset.
        smoothing: None or ``{"filter": ..., "placement": ...}`` (PROTOCOL §5).

    Example:
        >>> import torch
        >>> build("lenet")(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    spec = arch_spec(arch)
    dataset = dataset or spec.datasets[0]
    if dataset not in spec.datasets:
        from salbench.model_zoo.datasets import get_spec

        h, w = get_spec(dataset).input_shape[1:]
        if (h, w) != (spec.input_size, spec.input_size):
            raise ValueError(f"architecture {arch!r} takes {spec.input_size}x{spec.input_size} inputs "
                             f"(made for {spec.datasets}); dataset {dataset!r} has {h}x{w}")
    return spec.builder(num_classes=num_classes, dataset=dataset, smoothing=smoothing)
