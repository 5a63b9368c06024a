"""Gradient saliency maps (PROTOCOL §2 "Attributions").

Both explainers return one (B, H, W) map per image, summed over channels, for the target class
``y`` (the true label). They run on the device and in the dtype of ``x``, with the model in
evaluation mode (:class:`metrics._validation.EvalMode`: a model handed over in train mode is
evaluated in eval mode and given back in train mode, BatchNorm statistics untouched).
Any callable with the :data:`Explainer` signature can be passed to the stability metrics.
"""

from __future__ import annotations

from typing import Callable, Literal, overload

import torch
from captum._utils.common import _run_forward
from captum._utils.gradient import compute_gradients
from captum.attr import IntegratedGradients, Saliency
from torch import Tensor, nn

from salbench.metrics._validation import EvalMode, check_images, check_model, check_pixel_range, check_targets, logits_of
from salbench.metrics.protocol import IG_METHOD, IG_STEPS, ROS_NOISE_HIGH

#: ``explainer(model, x (B, C, H, W), y (B,)) -> maps (B, H, W)``.
Explainer = Callable[[nn.Module, Tensor, Tensor], Tensor]

__all__ = ["Explainer", "vanilla_gradient", "integrated_gradients"]

#: On CPU, integrated gradients computes the gradients of its ``B * n_steps`` path points in
#: chunks of about this many input values (334 FMNIST, 85 CIFAR-10, 5 ImageNette images): one
#: model call on all 12 500 points of a scoring batch runs at half the per-image rate of calls of a
#: few hundred FMNIST images, whose activations stay in cache (docs/performance/scoring.md). Each
#: point's gradient is its own backward pass, so the chunking does not change the maps
#: (bit-identical for the zoo's models, tests/metrics/test_attributions.py); captum's sum over the
#: path, done once on the concatenated gradients, is unchanged. GPUs keep one call.
IG_CPU_CHUNK_ELEMENTS = 1 << 18


def summed_gradients(forward_fn, inputs, target_ind=None, additional_forward_args=None):
    """captum's :func:`~captum._utils.gradient.compute_gradients` with one backward root: the
    target logits are summed, where captum hands ``torch.unbind`` of them (B scalar roots, B
    ``ones_like`` seeds) to ``torch.autograd.grad``. Every root's seed is 1 either way, so the
    gradients are bit-identical (``tests/metrics/test_attributions.py``); the B roots cost ~10% of an
    IG pass of 250 LeNet images (docs/performance.md). Outputs of more than one value per example
    (no target) go to captum, which rejects them with its message."""
    with torch.autograd.set_grad_enabled(True):
        outputs = _run_forward(forward_fn, inputs, target_ind, additional_forward_args)
        if not isinstance(outputs, Tensor) or outputs.dim() != 1:
            return compute_gradients(forward_fn, inputs, target_ind, additional_forward_args)
        return torch.autograd.grad(outputs.sum(), inputs)


def _chunked_gradients(chunk_elements: int):
    """A captum ``gradient_func`` that runs :func:`summed_gradients` on consecutive chunks of the
    (single) input tensor and concatenates the gradients."""

    def gradient_func(forward_fn, inputs, target_ind=None, additional_forward_args=None):
        (points,) = inputs
        n = points.shape[0]
        per = max(1, chunk_elements // max(1, points[0].numel()))
        if n <= per or additional_forward_args is not None:
            return summed_gradients(forward_fn, inputs, target_ind, additional_forward_args)
        per_point_target = isinstance(target_ind, Tensor) and target_ind.dim() == 1 and target_ind.numel() == n
        grads = []
        for start in range(0, n, per):
            chunk = points[start : start + per].detach().requires_grad_(True)
            target = target_ind[start : start + per] if per_point_target else target_ind
            grads.append(summed_gradients(forward_fn, (chunk,), target)[0])
        return (torch.cat(grads),)

    return gradient_func


def _check_inputs(model: nn.Module, x: Tensor, y: Tensor) -> int:
    """PROTOCOL §1 inputs; returns the largest label (checked against the logits width later).

    Values up to ``1 + ROS_NOISE_HIGH`` pass: ROS explains unclipped perturbations (PROTOCOL §3).
    """
    check_model(model)
    check_images(x)
    check_pixel_range(x, high=1.0 + ROS_NOISE_HIGH)
    return check_targets(y, x.shape[0])


def vanilla_gradient(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    r"""Vanilla gradient (VG): the absolute gradient of the target logit, summed over channels (PROTOCOL §2).

    captum ``Saliency`` with the protocol's settings.

    Args:
        model: classifier mapping (B, C, H, W) images in [0, 1] to a (B, K) logits tensor. Run in
            eval mode with frozen parameters; its modes and ``requires_grad`` flags are restored.
        x: images (B, C, H, W) in [0, 1] (up to ``1 + ROS_NOISE_HIGH`` for ROS's unclipped
            perturbations, PROTOCOL §3). Not modified; gradients flow through a detached copy.
        y: target classes (B,), integer.

    Returns:
        maps (B, H, W), non-negative, same dtype and device as ``x``, detached.

    Raises:
        ValueError: if ``x`` is not a finite floating channels-first (B, C, H, W) tensor with
            B > 0 and values in [0, 1] (see ``x``), ``y`` is not an integer (B,) tensor of non-negative
            labels below the model's number of logits, or the model does not return a (B, K)
            logits tensor.

    Warns:
        UserWarning: once per process, when the model's outputs look like softmax probabilities
            (B >= 2 rows, each non-negative and summing to 1): gradients of probabilities are
            legal but usually a mistake (the protocol explains the logits); the maps are returned.

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2, bias=False))
        >>> with torch.no_grad():
        ...     _ = model[1].weight.copy_(torch.tensor([[1., -2., 3., -4.], [0., 0., 0., 0.]]))
        >>> vanilla_gradient(model, torch.full((1, 1, 2, 2), 0.5), torch.tensor([0]))
        tensor([[[1., 2.],
                 [3., 4.]]])
    """
    max_label = _check_inputs(model, x, y)
    inputs = x.detach().clone().requires_grad_(True)
    with EvalMode(model):
        saliency = Saliency(logits_of(model, max_label, probabilities="warn", metric="vanilla_gradient"))
        saliency.gradient_func = summed_gradients
        attr = saliency.attribute(inputs, target=y, abs=True)
    return attr.detach().sum(dim=1)


@overload
def integrated_gradients(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    n_steps: int = ...,
    internal_batch_size: int | None = ...,
    return_convergence_delta: Literal[False] = ...,
) -> Tensor: ...


@overload
def integrated_gradients(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    n_steps: int = ...,
    internal_batch_size: int | None = ...,
    *,
    return_convergence_delta: Literal[True],
) -> tuple[Tensor, Tensor]: ...


def integrated_gradients(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    n_steps: int = IG_STEPS,
    internal_batch_size: int | None = None,
    return_convergence_delta: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""Integrated gradients (IG) from the black image, summed (signed) over channels (PROTOCOL §2).

    captum ``IntegratedGradients`` with the protocol's settings. The signed channel sum keeps
    completeness: ``maps.sum((1, 2)) = logit_y(x) - logit_y(0) + delta``.

    Args:
        model: classifier mapping (B, C, H, W) images in [0, 1] to a (B, K) logits tensor, run
            in eval mode (see :func:`vanilla_gradient`).
        x: images (B, C, H, W) in [0, 1]. Not modified.
        y: target classes (B,), integer.
        n_steps: number of integration nodes on the path (default: the protocol's).
        internal_batch_size: forwarded to captum (which then sums the path in pieces: the maps
            change at float rounding); ``None`` evaluates all ``B * n_steps`` path points as one
            batch, whose gradients are computed in chunks of ``IG_CPU_CHUNK_ELEMENTS`` input values
            on CPU (same maps, faster, less memory) and in one call on other devices.
        return_convergence_delta: also return captum's per-image completeness error (B,).

    Returns:
        maps (B, H, W), same dtype and device as ``x``, detached; with
        ``return_convergence_delta=True`` the tuple ``(maps, delta)`` with ``delta`` (B,).

    Raises:
        ValueError: on a malformed ``x`` / ``y`` (see :func:`vanilla_gradient`), or if
            ``n_steps`` or ``internal_batch_size`` is not a positive integer.

    Warns:
        UserWarning: as :func:`vanilla_gradient`, once per process, for outputs that look like
            softmax probabilities.

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2, bias=False))
        >>> with torch.no_grad():
        ...     _ = model[1].weight.copy_(torch.tensor([[1., -2., 3., -4.], [0., 0., 0., 0.]]))
        >>> x = torch.tensor([[[[0.5, 0.5], [1.0, 0.25]]]])
        >>> maps, delta = integrated_gradients(model, x, torch.tensor([0]), return_convergence_delta=True)
        >>> maps.round(decimals=4)
        tensor([[[ 0.5000, -1.0000],
                 [ 3.0000, -1.0000]]])
        >>> bool(delta.abs().max() < 1e-5)
        True
    """
    max_label = _check_inputs(model, x, y)
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be a positive integer, got {n_steps!r}")
    if internal_batch_size is not None and (
        isinstance(internal_batch_size, bool) or not isinstance(internal_batch_size, int) or internal_batch_size < 1
    ):
        raise ValueError(f"internal_batch_size must be a positive integer or None, got {internal_batch_size!r}")
    inputs = x.detach()
    ig = IntegratedGradients(logits_of(model, max_label, probabilities="warn", metric="integrated_gradients"))
    if internal_batch_size is None and x.device.type == "cpu":
        ig.gradient_func = _chunked_gradients(IG_CPU_CHUNK_ELEMENTS)
    else:
        ig.gradient_func = summed_gradients
    with EvalMode(model):
        result = ig.attribute(
            inputs,
            baselines=0,
            target=y,
            n_steps=n_steps,
            method=IG_METHOD,
            internal_batch_size=internal_batch_size,
            return_convergence_delta=return_convergence_delta,
        )
    if return_convergence_delta:
        attr, delta = result
        return attr.detach().sum(dim=1), delta.detach()
    return result.detach().sum(dim=1)
