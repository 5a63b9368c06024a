"""Input checks shared by the metric functions.

Every public metric calls these first, so a bad input fails with a ``ValueError`` that names
the argument, what was expected and what was received, before any work is done. The metrics
that call a model run it inside :class:`EvalMode` and check its outputs with :func:`logits_of`
(PROTOCOL §1: [0, 1] images in, (B, K) logits out); an output that looks like softmax
probabilities (:func:`looks_like_probabilities`) is refused where a metric needs logits (ROS) and
warned about once per process where it is legal but usually a mistake (the gradient explainers).
"""

from __future__ import annotations

import warnings
from typing import Callable, Literal

import torch
from torch import Tensor, nn


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
    """A floating, finite, non-empty, channels-first ``(B, C, H, W)`` image batch."""
    check_rank(x, name, "B C H W")
    check_nonempty(x, name)
    check_channels_first(x, name)
    check_floating(x, name)
    check_finite(x, name)


def check_channels_first(x: Tensor, name: str = "x") -> None:
    """Reject a channels-last ``(B, H, W, C)`` batch (C of 1 or 3, H and W above 4)."""
    _, d1, d2, d3 = x.shape
    if d3 in (1, 3) and d1 > 4 and d2 > 4:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)}, which looks channels-last (B, H, W, C); the metrics take "
            f"channels-first (B, C, H, W) images: pass {name}.permute(0, 3, 1, 2)"
        )


def check_pixel_range(x: Tensor, name: str = "x", high: float = 1.0) -> None:
    """Images in [0, 1] pixel space (PROTOCOL §1), values up to ``high`` allowed (up to rounding).

    The explainers pass ``high = 1 + ROS_NOISE_HIGH``: ROS (PROTOCOL §3) explains one-sided,
    unclipped perturbations of [0, 1] images, from this library or from quantus.
    """
    lo, hi = (float(v) for v in torch.aminmax(x))
    if lo < 0 or hi > high * (1 + 4 * torch.finfo(x.dtype).eps):
        hint = (
            "divide 0-255 images by 255"
            if lo >= 0 and hi <= 255
            else "pass unnormalised images and put the mean/std normalisation inside the model"
        )
        raise ValueError(
            f"{name} must hold images in [0, 1] pixel space (PROTOCOL §1), got values in "
            f"[{lo:.4g}, {hi:.4g}]; {hint}"
        )


def check_targets(y: Tensor, batch: int, name: str = "y") -> int:
    """Non-negative integer labels ``(B,)`` matching the batch; returns the largest label."""
    check_labels(y, batch, name)
    lo, hi = (int(v) for v in torch.aminmax(y))
    if lo < 0:
        raise ValueError(f"{name} must hold non-negative class indices, got min {lo}")
    return hi


def check_model(model: object) -> None:
    """Raise ``ValueError`` unless ``model`` is callable."""
    if not callable(model):
        raise ValueError(f"model must be a callable nn.Module, got {type(model).__name__}")


#: PROTOCOL §1: models return logits. A (B, K) output of B >= 2 rows and K >= 2 columns whose every row
#: is non-negative and sums to 1 within this tolerance is taken for softmax probabilities.
PROBABILITY_SUM_TOLERANCE = 1e-4

#: What :func:`check_logits` does with an output that looks like probabilities.
ProbabilityPolicy = Literal["allow", "warn", "refuse"]

#: Whether :func:`warn_probabilities` has warned in this process (it warns once).
_probabilities_warned = False


def looks_like_probabilities(out: Tensor) -> bool:
    """Whether a (B, K) model output looks like softmax probabilities rather than logits.

    True when there are at least 2 rows and 2 columns and every row is non-negative and sums to 1
    within :data:`PROBABILITY_SUM_TOLERANCE` (computed in float64). The logits of a trained (or
    randomly initialised) classifier practically never do this for a whole batch.

    Example:
        >>> logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.3, -2.0]])
        >>> looks_like_probabilities(logits), looks_like_probabilities(logits.softmax(dim=1))
        (False, True)
        >>> looks_like_probabilities(logits[:1].softmax(dim=1))  # one image: not enough evidence
        False
    """
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] < 2 or out.shape[1] < 2:
        return False
    if not out.is_floating_point():
        return False
    o = out.detach().to(torch.float64)
    return bool(((o.amin(dim=1) >= 0) & ((o.sum(dim=1) - 1).abs() <= PROBABILITY_SUM_TOLERANCE)).all())


def refuse_probabilities(metric: str, name: str = "the model's outputs") -> None:
    """Raise the one-line ``ValueError`` of a metric that needs logits and got probabilities."""
    raise ValueError(
        f"{metric} needs logits (PROTOCOL §3), but {name} look like softmax probabilities (every row "
        f"non-negative and summing to 1); pass the logits: drop the model's final softmax"
    )


def warn_probabilities(explainer: str) -> None:
    """Warn, once per process, that an explainer differentiates what look like probabilities."""
    global _probabilities_warned
    if _probabilities_warned:
        return
    _probabilities_warned = True
    warnings.warn(
        f"{explainer}: the model's outputs look like softmax probabilities (every row non-negative and "
        f"summing to 1); gradients of probabilities are legal but usually a mistake: the protocol explains "
        f"the logits (PROTOCOL §2), so drop the model's final softmax unless you mean it (warned once per process)",
        UserWarning,
        stacklevel=3,
    )


def check_logits(
    out: object,
    batch: int,
    max_label: int | None = None,
    name: str = "y",
    *,
    probabilities: ProbabilityPolicy = "allow",
    metric: str = "",
) -> Tensor:
    """A model output must be a ``(batch, K)`` logits tensor with ``K > max_label``; returns it.

    An output that :func:`looks_like_probabilities` is returned as it is with ``probabilities="allow"``,
    refused with ``"refuse"`` (:func:`refuse_probabilities`, naming ``metric``) and warned about once
    per process with ``"warn"`` (:func:`warn_probabilities`).
    """
    if not isinstance(out, Tensor):
        raise ValueError(
            f"model must return a logits tensor of shape (B, K), got a {type(out).__name__}; wrap it in an "
            f"nn.Module whose forward returns only the logits"
        )
    if out.dim() != 2 or out.shape[0] != batch:
        raise ValueError(
            f"model must return logits of shape (B, K) = ({batch}, K) for {batch} image(s), "
            f"got shape {tuple(out.shape)}"
        )
    if max_label is not None and max_label >= out.shape[1]:
        raise ValueError(
            f"{name} holds class {max_label} but the model returns {out.shape[1]} logits (classes 0 to "
            f"{out.shape[1] - 1}); check the labels or the model's number of classes"
        )
    if probabilities == "refuse" and looks_like_probabilities(out):
        refuse_probabilities(metric)
    if probabilities == "warn" and not _probabilities_warned and looks_like_probabilities(out):
        warn_probabilities(metric)
    return out


def logits_of(
    model: Callable[[Tensor], object],
    max_label: int | None = None,
    *,
    probabilities: ProbabilityPolicy = "allow",
    metric: str = "",
) -> Callable[[Tensor], Tensor]:
    """``model`` as a function whose every output passes :func:`check_logits` (for captum and ROAD).

    ``probabilities`` and ``metric`` apply to the first call's output only (see :func:`check_logits`).
    """
    first = [True]

    def forward(inputs: Tensor) -> Tensor:
        policy = probabilities if first[0] else "allow"
        first[0] = False
        return check_logits(model(inputs), inputs.shape[0], max_label, probabilities=policy, metric=metric)

    return forward


class EvalMode:
    """Run a model in evaluation mode with frozen parameters; restore the caller's state afterwards.

    On entry every submodule is put in eval mode (BatchNorm uses its running statistics and
    does not update them, dropout is off) and every parameter gets ``requires_grad=False``
    (gradients flow to the inputs only). On exit, also when the block raises, each submodule's
    ``training`` flag and each parameter's ``requires_grad`` flag are set back to what they
    were. A callable that is not an ``nn.Module`` is left alone. Nesting is allowed.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).train()
        >>> with EvalMode(model):
        ...     model.training, model[0].weight.requires_grad
        (False, False)
        >>> model.training, model[0].weight.requires_grad
        (True, True)
    """

    def __init__(self, model: object) -> None:
        self.model = model

    def __enter__(self) -> object:
        if isinstance(self.model, nn.Module):
            self._modes = [(m, m.training) for m in self.model.modules()]
            self._flags = [(p, p.requires_grad) for p in self.model.parameters()]
            self.model.eval()
            for p, _ in self._flags:
                p.requires_grad_(False)
        return self.model

    def __exit__(self, *exc_info: object) -> None:
        if isinstance(self.model, nn.Module):
            for module, training in self._modes:
                module.training = training
            for p, requires_grad in self._flags:
                p.requires_grad_(requires_grad)


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
