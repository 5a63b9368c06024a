"""Input checks shared by the metric functions.

Every public metric calls these first, so a bad input fails with a ``ValueError`` that names
the argument, what was expected and what was received, before any work is done.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_tensor(t: object, name: str) -> None:
    """Raise ``ValueError`` unless ``t`` is a ``torch.Tensor``."""
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_rank(t: Tensor, name: str, dims: str) -> None:
    """Check that ``t`` has ``len(dims.split())`` dimensions (``dims`` like ``"B H W"``).

    Raises:
        ValueError: if ``t`` is not a tensor or has the wrong number of dimensions.
    """
    check_tensor(t, name)
    expected = dims.split()
    if t.dim() != len(expected):
        raise ValueError(
            f"{name} must have shape ({', '.join(expected)}), "
            f"got {t.dim()} dimension(s) with shape {tuple(t.shape)}"
        )


def check_nonempty(t: Tensor, name: str) -> None:
    """Raise ``ValueError`` if the batch dimension (or any other dimension) of ``t`` is empty."""
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)}); pass at least one image")


def check_floating(t: Tensor, name: str) -> None:
    """Raise ``ValueError`` if ``t`` is not floating point."""
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def check_finite(t: Tensor, name: str) -> None:
    """Raise ``ValueError`` if ``t`` holds a NaN or an infinity (reporting how many)."""
    # One reduction pass: a NaN or inf always makes the sum non-finite; only then (or if huge
    # finite values overflow the sum) is the element-wise test run.
    if t.numel() == 0 or bool(torch.isfinite(t.sum())):
        return
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(bad.sum()) - n_nan
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{name} contains non-finite values ({n_nan} NaN, {n_inf} inf; first at index {first}) "
            f"in a tensor of shape {tuple(t.shape)}"
        )


def check_images(x: Tensor, name: str = "x") -> None:
    """A floating, finite, non-empty ``(B, C, H, W)`` image batch."""
    check_rank(x, name, "B C H W")
    check_nonempty(x, name)
    check_floating(x, name)
    check_finite(x, name)


def check_maps(maps: Tensor, name: str = "maps") -> None:
    """A floating, finite, non-empty ``(B, H, W)`` batch of saliency maps."""
    check_rank(maps, name, "B H W")
    check_nonempty(maps, name)
    check_floating(maps, name)
    check_finite(maps, name)


def check_labels(y: Tensor, batch: int, name: str = "y") -> None:
    """Integer labels of shape ``(B,)`` matching the image batch size."""
    check_rank(y, name, "B")
    if y.dtype in (torch.bool,) or y.is_floating_point() or y.is_complex():
        raise ValueError(f"{name} must hold integer class labels, got dtype {y.dtype}")
    if y.shape[0] != batch:
        raise ValueError(f"batch size mismatch: x has {batch} image(s) but {name} has shape {tuple(y.shape)}")


def check_same_batch(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    """Raise ``ValueError`` if the leading (batch) dimensions of ``a`` and ``b`` differ."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"batch size mismatch: {name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}"
        )


def check_maps_match_images(maps: Tensor, x: Tensor, name: str = "maps") -> None:
    """Maps ``(B, H, W)`` must match images ``(B, C, H, W)`` in batch and spatial size."""
    check_maps(maps, name)
    if maps.shape[0] != x.shape[0] or maps.shape[1:] != x.shape[2:]:
        raise ValueError(
            f"{name} must have shape (B, H, W) = {(x.shape[0], *x.shape[2:])} to match x of shape "
            f"{tuple(x.shape)}, got {tuple(maps.shape)}"
        )


def default_generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator:
    """The caller's generator, or a fresh one on ``device`` seeded with 0."""
    if generator is None:
        return torch.Generator(device=device).manual_seed(0)
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return generator


def randn_like(t: Tensor, generator: torch.Generator) -> Tensor:
    """Standard normal draws shaped like ``t``, sampled on the generator's device, moved to ``t``'s.

    Sampling on the generator's device keeps a CPU generator usable for CUDA inputs (and gives
    the same numbers as on CPU); a CUDA generator samples on its GPU.
    """
    draw = torch.randn(t.shape, generator=generator, device=generator.device, dtype=t.dtype)
    return draw.to(t.device)


def rand_like(t: Tensor, generator: torch.Generator) -> Tensor:
    """Uniform [0, 1) draws shaped like ``t`` (see :func:`randn_like` for the device rule)."""
    draw = torch.rand(t.shape, generator=generator, device=generator.device, dtype=t.dtype)
    return draw.to(t.device)
