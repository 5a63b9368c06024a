"""PGD L∞ (Madry et al. 2018) with a random start, used for adversarial training and for
robust accuracy (PROTOCOL §3 "Accuracy", §5)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from salbench.model_zoo.smoothing import input_gradients_only


def pgd_linf(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    alpha: float,
    steps: int,
    generator: torch.Generator | None = None,
    random_start: bool = True,
    start: Tensor | None = None,
) -> Tensor:
    """Projected gradient ascent on the cross-entropy inside the L∞ ball of radius ``eps``.

    Inputs stay in [0, 1] after every step. Only the input gradient is computed (no
    parameter gradients), and the model's mode (train/eval) is left as the caller set it.

    Args:
        model: maps [0, 1] images (B, C, H, W) to logits (B, K).
        x: clean images in [0, 1], (B, C, H, W).
        y: true labels, (B,).
        eps, alpha, steps: radius, step size and number of steps, in [0, 1] pixel units.
        generator: the random start's generator (on x's device); None -> seeded 0.
        random_start: start from a uniform point of the ball (Madry) instead of x.
        start: the starting point itself (inside the ball, in [0, 1]; then no draw is made): a
            distributed trainer draws the random start of the whole batch and passes each rank its share.

    Returns:
        Adversarial images (B, C, H, W), detached, with ``|x_adv - x| <= eps``.

    Raises:
        ValueError: on a non-4D input, a label/batch mismatch or a negative radius.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
        >>> x = torch.full((3, 1, 2, 2), 0.5); y = torch.tensor([0, 1, 0])
        >>> bool(((pgd_linf(model, x, y, eps=0.1, alpha=0.05, steps=3) - x).abs() <= 0.1 + 1e-6).all())
        True
    """
    if x.ndim != 4:
        raise ValueError(f"pgd_linf expects images (B, C, H, W), got shape {tuple(x.shape)}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"labels must have shape ({x.shape[0]},), got {tuple(y.shape)}")
    if eps < 0 or alpha < 0 or steps < 0:
        raise ValueError(f"eps, alpha and steps must be >= 0, got {eps}, {alpha}, {steps}")
    x = x.detach()
    if generator is None:
        generator = torch.Generator(device=x.device).manual_seed(0)
    if start is not None:
        x_adv = start.detach().clone()
    elif random_start and eps > 0:
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x_adv = (x + (2 * noise - 1) * eps).clamp_(0, 1)
    else:
        x_adv = x.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with input_gradients_only():  # the C SmoothBlock then skips its parameters' gradients
            loss = F.cross_entropy(model(x_adv), y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, x_adv)
        with torch.no_grad():
            x_adv = x_adv + alpha * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0, 1)
    return x_adv.detach()


@torch.no_grad()
def _correct(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return model(x).argmax(1) == y


def robust_accuracy(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    alpha: float,
    steps: int,
    batch_size: int = 500,
    seed: int = 0,
    progress: bool = False,
) -> float:
    """Fraction of images still classified correctly under ``pgd_linf`` (PROTOCOL §3).

    ``x`` may be uint8 (converted to [0, 1]) or float in [0, 1]. Evaluated in batches, with
    one seeded generator for the random starts; the model is put in eval mode.
    """
    correct = robust_correct(model, x, y, eps=eps, alpha=alpha, steps=steps, batch_size=batch_size, seed=seed,
                             progress=progress)
    return correct / max(len(x), 1)


def robust_correct(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    alpha: float,
    steps: int,
    batch_size: int = 500,
    seed: int = 0,
    progress: bool = False,
    batches: Iterable[int] | None = None,
) -> int:
    """Number of images still classified correctly under ``pgd_linf``, over the evaluation batches
    ``batches`` (indices of ``batch_size`` slices; None: all), as :func:`robust_accuracy` counts them.

    The random starts come from one generator seeded ``seed`` that runs over the batches in order.
    A batch that is not evaluated still advances it by exactly the draw it would have made (the
    random start of its shape, no model call), so the starts of an evaluated batch, and therefore
    the count, do not depend on which other batches this call evaluates: shards of the batches
    summed over processes give the single-process number (bit for bit on the same device type).
    """
    from tqdm.auto import tqdm

    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    starts = list(range(0, len(x), batch_size))
    wanted = set(range(len(starts)) if batches is None else batches)
    last = max(wanted, default=-1)
    correct = 0
    for b in tqdm(range(last + 1), desc="robust acc", disable=not progress, leave=False):
        i = starts[b]
        if b not in wanted:  # advance the generator as pgd_linf's random start would
            if eps > 0:
                shape = (min(batch_size, len(x) - i), *x.shape[1:])
                torch.rand(shape, generator=gen, device=device,
                           dtype=torch.float32 if x.dtype == torch.uint8 else x.dtype)
            continue
        xb = x[i : i + batch_size].to(device)
        xb = xb.float() / 255 if xb.dtype == torch.uint8 else xb
        yb = y[i : i + batch_size].to(device)
        adv = pgd_linf(model, xb, yb, eps=eps, alpha=alpha, steps=steps, generator=gen)
        correct += int(_correct(model, adv, yb).sum())
    return correct


@torch.no_grad()
def natural_accuracy(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 1000) -> float:
    """Clean accuracy of ``model`` on uint8 or [0, 1] float images (eval mode)."""
    return natural_correct(model, x, y, batch_size=batch_size) / max(len(x), 1)


@torch.no_grad()
def natural_correct(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 1000,
                    batches: Iterable[int] | None = None) -> int:
    """Number of correctly classified images over the evaluation batches ``batches`` (indices of
    ``batch_size`` slices; None: all), as :func:`natural_accuracy` counts them."""
    model.eval()
    device = next(model.parameters()).device
    starts = list(range(0, len(x), batch_size))
    correct = 0
    for b in (range(len(starts)) if batches is None else batches):
        i = starts[b]
        xb = x[i : i + batch_size].to(device)
        xb = xb.float() / 255 if xb.dtype == torch.uint8 else xb
        correct += int(_correct(model, xb, y[i : i + batch_size].to(device)).sum())
    return correct
