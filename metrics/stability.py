"""Stability of saliency maps (PROTOCOL §3 "SSIM under noise" and "ROS").

Input side: :func:`ssim_under_noise` compares the map of an image with the map of a noisy copy
through :func:`ssim`, a batched torch port of ``skimage.metrics.structural_similarity``; by
default each map is first divided by its own max|map| (protocol v2, PROTOCOL §8.2).
Output side: :func:`relative_output_stability` relates the change of the map to the change of
the logits under small uniform perturbations (Agarwal et al. 2022; v1 as computed by quantus);
:func:`ros_variants` gives the v2 headline and its variants (PROTOCOL §8.2, §8.5) in one pass.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Literal, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from salbench.metrics._native import F64, I64, P, NativeLibrary
from salbench.metrics._validation import (
    EvalMode,
    ProbabilityPolicy,
    check_finite,
    check_floating,
    check_images,
    check_logits,
    check_maps,
    check_maps_match_images,
    check_model,
    check_nonempty,
    check_pixel_range,
    check_rank,
    check_targets,
    default_generator,
    looks_like_probabilities,
    rand_like,
    randn_like,
    refuse_probabilities,
)
from salbench.metrics.attributions import Explainer
from salbench.metrics.protocol import (
    ROS_EPS,
    ROS_FLOOR_FRACTION,
    ROS_NOISE_HIGH,
    ROS_NOISE_LOW,
    ROS_SAMPLES,
    SSIM_DATA_RANGE,
    SSIM_K1,
    SSIM_K2,
    SSIM_SIGMAS,
    SSIM_WIN_SIZE,
)

__all__ = ["ssim", "SSIMUnderNoise", "ssim_under_noise", "relative_output_stability", "ros_variants",
           "aggregate_ros"]

#: :func:`ssim` works on chunks of images whose float64 planes (1 + 3 S per image) hold about this
#: many values: on CPU small enough to stay in cache (2^16 measured fastest for 8 x 1000 FMNIST
#: pairs on the 2-core machine, ~20% faster than 2^18), on GPUs large enough to fill the device.
_SSIM_CHUNK_ELEMENTS = {"cpu": 1 << 16}
_SSIM_CHUNK_ELEMENTS_DEFAULT = 1 << 26
#: float32 CPU maps go through a C kernel (``ssim_kernel.c``, built on first use; about 3x faster
#: than the torch path on the 2-core machine, docs/performance.md); everything else, or a machine
#: without a C compiler, takes the torch path below. Both agree to float64 rounding.
SSIM_NATIVE = NativeLibrary(Path(__file__).with_name("ssim_kernel.c"),
                            {"ssim_stack": ([P, P, P, I64, I64, I64, I64, I64, F64, F64, P], None)})


def ssim(a: Tensor, b: Tensor, data_range: float = SSIM_DATA_RANGE, win_size: int = SSIM_WIN_SIZE) -> Tensor:
    r"""Mean structural similarity of each pair of maps (PROTOCOL §3 "SSIM under noise").

    Equals ``skimage.metrics.structural_similarity(a[i], b[i], data_range=data_range,
    win_size=win_size)`` for every i (uniform window, sample covariances, mean over the valid
    region, i.e. without the border of ``(win_size - 1) // 2`` pixels, so padding never
    matters). Computed in float64 on the inputs' device, returned in their dtype. ``b`` may be a
    stack of S batches, each compared with ``a`` (one noisy copy per σ): ``a``'s window sums are
    then computed once for all S.

    Args:
        a: maps (B, H, W).
        b: maps (B, H, W) like ``a``, or a stack (S, B, H, W) of such batches.
        data_range: dynamic range of the maps (default: the protocol's, as the authors' code).
        win_size: odd side length of the window, at most ``min(H, W)``.

    Returns:
        SSIM per pair, at most 1: (B,), or (S, B) for a stacked ``b``.

    Raises:
        ValueError: if ``a`` is not a non-empty, finite, floating (B, H, W) tensor, ``b`` not
            one of that shape or a finite (S, B, H, W) stack of them, if ``win_size`` is not
            odd, at least 3 and at most ``min(H, W)``, or if ``data_range`` is not positive.

    Example:
        >>> a = torch.arange(36.).reshape(1, 6, 6) / 35
        >>> ssim(a, a)
        tensor([1.])
        >>> ssim(a, a.flip(-1)).round(decimals=4)  # skimage: 0.94583...
        tensor([0.9458])
        >>> ssim(a, torch.stack([a, a.flip(-1)])).round(decimals=4)  # (S, B)
        tensor([[1.0000],
                [0.9458]])
    """
    check_maps(a, "a")
    stacked = isinstance(b, Tensor) and b.dim() == 4
    if stacked:
        check_nonempty(b, "b")
        check_floating(b, "b")
        check_finite(b, "b")
        if b.shape[1:] != a.shape:
            raise ValueError(
                f"b must have shape (B, H, W) = {tuple(a.shape)} or (S, B, H, W) = (S, {', '.join(map(str, a.shape))}) "
                f"to match a, got {tuple(b.shape)}"
            )
    else:
        check_maps(b, "b")
        if a.shape != b.shape:
            raise ValueError(f"a and b must have the same shape (B, H, W), got {tuple(a.shape)} and {tuple(b.shape)}")
    if isinstance(win_size, bool) or not isinstance(win_size, int) or win_size < 3 or win_size % 2 == 0:
        raise ValueError(f"win_size must be an odd integer >= 3, got {win_size!r}")
    if win_size > min(a.shape[1:]):
        raise ValueError(f"win_size {win_size} exceeds the map size {tuple(a.shape[1:])}")
    if not (isinstance(data_range, (int, float)) and math.isfinite(data_range) and data_range > 0):
        raise ValueError(f"data_range must be a positive finite number, got {data_range!r}")

    bs = b if stacked else b.unsqueeze(0)
    compute = _ssim_native if _native_ssim_ok(a, bs) else _ssim_torch
    out = compute(a, bs, data_range, win_size).to(a.dtype)
    return out if stacked else out[0]


def _native_ssim_ok(a: Tensor, bs: Tensor) -> bool:
    return (a.device.type == "cpu" and a.dtype == torch.float32 and bs.dtype == torch.float32
            and bs.device.type == "cpu" and SSIM_NATIVE.library() is not None)


def _ssim_native(a: Tensor, bs: Tensor, data_range: float, win_size: int) -> Tensor:
    """(S, B) float64 SSIM of float32 CPU maps ``a`` (B, H, W) with each of ``bs`` (S, B, H, W), in C."""
    a, bs = a.contiguous(), bs.contiguous()
    n_b, batch, height, width = bs.shape
    n = win_size * win_size
    vh, vw = height - win_size + 1, width - win_size + 1
    out = torch.empty(n_b, batch, dtype=torch.float64)
    work = torch.empty(3 * height * vw + 5 * vh * vw, dtype=torch.float64)
    SSIM_NATIVE.library().ssim_stack(a.data_ptr(), bs.data_ptr(), out.data_ptr(), n_b, batch, height, width,
                                     win_size, (SSIM_K1 * data_range * n) ** 2, (SSIM_K2 * data_range * n) ** 2,
                                     work.data_ptr())
    return out


def _ssim_torch(a: Tensor, bs: Tensor, data_range: float, win_size: int) -> Tensor:
    """(S, B) float64 SSIM of ``a`` (B, H, W) with each of ``bs`` (S, B, H, W), in torch (any
    device and dtype), chunked so that the float64 planes stay in cache on CPU."""
    n_b = bs.shape[0]
    batch, height, width = a.shape
    planes = 1 + 3 * n_b  # x, then (y, x^2 + y^2, x y) per compared batch
    per_chunk = _SSIM_CHUNK_ELEMENTS.get(a.device.type, _SSIM_CHUNK_ELEMENTS_DEFAULT)
    chunk = max(1, per_chunk // (planes * height * width))
    out = torch.empty(n_b, batch, dtype=torch.float64, device=a.device)
    # one work buffer for all chunks; its tail only ever feeds windows outside the valid region
    size = min(chunk, batch) * planes * height * width + (win_size - 1) * (width + 1)
    buf = torch.empty(size, dtype=torch.float64, device=a.device)
    for start in range(0, batch, chunk):
        sl = slice(start, start + chunk)
        out[:, sl] = _ssim_chunk(a[sl], bs[:, sl], data_range, win_size, buf)
    return out


def _window_sums(flat: Tensor, win: int, step: int, length: int) -> Tensor:
    """``out[i] = sum_{j < win} flat[i + j * step]`` for ``i < length``, by doubling.

    ``flat`` is 1-D with at least ``length + (win - 1) * step`` entries. Sums of 2, 4, 8, ...
    consecutive taps are built once and combined, so a window costs about
    ``log2(win) + popcount(win)`` contiguous additions instead of ``win``.
    """
    powers = {1: flat}
    size = 1
    while 2 * size <= win:
        prev = powers[size]
        n = prev.shape[0] - size * step
        powers[2 * size] = torch.add(prev[:n], prev[size * step : size * step + n])
        size *= 2
    parts, offset = [], 0
    for size in sorted(powers, reverse=True):
        if (win - offset) & size:
            parts.append(powers[size][offset * step : offset * step + length])
            offset += size
    out = parts[0].clone() if len(parts) == 1 else torch.add(parts[0], parts[1])
    for part in parts[2:]:
        out.add_(part)
    return out


def _ssim_chunk(a: Tensor, b: Tensor, data_range: float, win_size: int, buf: Tensor) -> Tensor:
    """SSIM of (k, H, W) maps ``a`` with each of the (S, k, H, W) maps ``b``, in float64, as skimage
    computes it (see :func:`ssim`); returns (S, k).

    ``buf`` is float64 work space of at least ``k * (1 + 3 S) * H * W + (win_size - 1) * (W + 1)``."""
    n_b, k, height, width = b.shape
    n = win_size * win_size
    cov_norm = n / (n - 1)
    # Window sums S instead of means u = S / n: the n^2 factors cancel in the ratio below.
    c1 = (SSIM_K1 * data_range * n) ** 2
    c2 = (SSIM_K2 * data_range * n) ** 2
    # The planes x and, per compared batch, y, x^2 + y^2 and xy (the formula needs S(xx) + S(yy)
    # only), flattened into one buffer. Window sums along rows (step 1) and columns (step W) are
    # shifted additions over the whole buffer; windows that wrap across a row or plane end land
    # outside the valid region and are dropped.
    plane = height * width
    size = k * plane * (1 + 3 * n_b)
    buf = buf[: size + (win_size - 1) * (width + 1)]
    x = buf[: k * plane].view(k, height, width)
    x.copy_(a)
    rest = buf[k * plane : size].view(n_b, 3, k, height, width)
    rest[:, 0].copy_(b)
    torch.mul(rest[:, 0], rest[:, 0], out=rest[:, 1])
    rest[:, 1].add_(x * x)
    torch.mul(rest[:, 0], x, out=rest[:, 2])
    rows = _window_sums(buf, win_size, 1, size + (win_size - 1) * width)
    sums = _window_sums(rows, win_size, width, size)
    valid_h, valid_w = height - win_size + 1, width - win_size + 1
    sx = sums[: k * plane].view(k, height, width)[:, :valid_h, :valid_w]
    rest = sums[k * plane :].view(n_b, 3, k, height, width)[..., :valid_h, :valid_w]
    sy, sq2, sxy = rest.unbind(dim=1)  # sq2 = S(xx) + S(yy)
    sxsy = sy * sx
    sq = torch.addcmul(sx * sx, sy, sy)  # sx^2 + sy^2
    # (2 ux uy + C1)(2 vxy + C2) / ((ux^2 + uy^2 + C1)(vx + vy + C2)), times n^4 / n^4
    num = torch.add(sxsy, c1 / 2).mul_(torch.add(sxsy, sxy, alpha=-n).mul_(-cov_norm).add_(c2 / 2))
    den = torch.add(sq, c1).mul_(torch.add(sq, sq2, alpha=-n).mul_(-cov_norm).add_(c2))
    return num.div_(den).mean(dim=(2, 3)).mul_(4)


class _SSIMUnderNoiseFields(NamedTuple):
    scores: Tensor
    kept: Tensor


class SSIMUnderNoise(_SSIMUnderNoiseFields):
    """Result of :func:`ssim_under_noise`: one row per noise level σ, one column per image.

    A named tuple ``(scores, kept)`` (it unpacks into those two), plus the attribute
    ``scores_raw``.
    """

    #: SSIM between the map of x and the map of the noisy copy, (S, B); NaN where ``kept`` is False
    #: (those noisy copies are not attributed) and, for scale-free maps, where either map is all
    #: zero, so ``scores.nanmean(dim=1)`` is the protocol's mean per σ.
    scores: Tensor
    #: whether the noisy copy is still classified as ``y`` (S, B) bool; the protocol averages over these.
    kept: Tensor
    #: with ``with_raw=True``: the SSIM of the raw maps (v1, the variant ``ssim_raw``) of the same
    #: noisy copies, (S, B), NaN where ``kept`` is False; else ``None``.
    scores_raw: Tensor | None = None

    def __new__(cls, scores: Tensor, kept: Tensor, scores_raw: Tensor | None = None) -> "SSIMUnderNoise":
        self = super().__new__(cls, scores, kept)
        self.scores_raw = scores_raw
        return self

    def _replace(self, **changes: Tensor | None) -> "SSIMUnderNoise":
        fields = {"scores": self.scores, "kept": self.kept, "scores_raw": self.scores_raw}
        unknown = set(changes) - set(fields)
        if unknown:
            raise ValueError(f"SSIMUnderNoise has no field(s) {sorted(unknown)}")
        return type(self)(**{**fields, **changes})

    def __getnewargs__(self) -> tuple:
        return (self.scores, self.kept, self.scores_raw)

    def __repr__(self) -> str:
        raw = "" if self.scores_raw is None else f", scores_raw={self.scores_raw!r}"
        return f"SSIMUnderNoise(scores={self.scores!r}, kept={self.kept!r}{raw})"


def _check_explainer(explainer: object) -> None:
    if not callable(explainer):
        raise ValueError(f"explainer must be callable as explainer(model, x, y), got {type(explainer).__name__}")


def _explain(explainer: Explainer, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    maps = explainer(model, x, y)
    if not isinstance(maps, Tensor) or maps.shape != (x.shape[0], *x.shape[2:]):
        got = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        raise ValueError(f"explainer must return maps of shape (B, H, W) = {(x.shape[0], *x.shape[2:])}, got {got}")
    return maps.detach()


def _logits(model: nn.Module, x: Tensor, max_label: int, probabilities: ProbabilityPolicy = "allow",
            metric: str = "") -> Tensor:
    with torch.no_grad():
        return check_logits(model(x), x.shape[0], max_label, probabilities=probabilities, metric=metric)


class _NotAtInput(Exception):
    """Raised by :func:`_explain_kept`'s probe to stop an explainer whose first model call is not on x."""


def _explain_kept(
    explainer: Explainer, model: nn.Module, x: Tensor, y: Tensor, max_label: int, keep: Callable[[Tensor], Tensor],
    probabilities: ProbabilityPolicy = "allow", metric: str = "",
) -> tuple[Tensor | None, Tensor, Tensor]:
    """``(maps, logits, kept)``: ``logits = model(x)``, ``kept = keep(logits)`` (B,) bool, and
    ``maps = explainer(model, x, y)`` on the kept images (B, H, W), NaN on the others (``None`` when
    no image is kept). Images that are not kept are not attributed when that saves work.

    The protocol needs the prediction on every image but the map of the kept ones only
    (PROTOCOL §3: SSIM drops noisy images whose prediction flipped; a flipped ROS sample is left out of
    its image's maximum, or makes the image NaN in v1). Two cases, told apart by a probe on the model's first call:

    - The explainer's first model call is on exactly ``x`` (a gradient explainer such as
      :func:`vanilla_gradient`): its output is the logits, so the explainer runs on the whole
      batch in one forward + backward and no extra forward pass is made.
    - Otherwise (integrated gradients first evaluates other points of the path, or a plain
      callable that takes no hooks): the probe stops the explainer before that first call, one
      gradient-free forward pass gives the logits, and the explainer runs on the kept images only.

    The maps of kept images are the explainer's maps of those images; an explainer whose maps
    of an image depend on the other images of its batch would see a smaller batch in the second case.
    ``probabilities`` and ``metric`` apply to the logits (:func:`check_logits`).
    """
    state = {"first": True, "aborted": False}
    captured: list[Tensor] = []

    def probe(module: nn.Module, args: tuple) -> None:
        if not state["first"]:
            return
        state["first"] = False
        inp = args[0] if args else None
        if not (isinstance(inp, Tensor) and inp.shape == x.shape and torch.equal(inp.detach(), x)):
            state["aborted"] = True
            raise _NotAtInput

    def capture(module: nn.Module, args: tuple, output: object) -> None:
        if not captured and not state["aborted"] and isinstance(output, Tensor):
            captured.append(output.detach())

    if isinstance(model, nn.Module):
        handles = [model.register_forward_pre_hook(probe), model.register_forward_hook(capture)]
        try:
            maps = _explain(explainer, model, x, y)
        except _NotAtInput:
            maps = None
        finally:
            for handle in handles:
                handle.remove()
        # An explainer that swallowed the probe's exception returned maps of an interrupted run: drop them.
        if maps is not None and not state["aborted"]:
            logits = (check_logits(captured[0], x.shape[0], max_label, probabilities=probabilities, metric=metric)
                      if captured else _logits(model, x, max_label, probabilities, metric))
            kept = keep(logits)
            return maps.masked_fill(~kept[:, None, None], math.nan), logits, kept
    logits = _logits(model, x, max_label, probabilities, metric)
    kept = keep(logits)
    n_kept = int(kept.sum())
    if n_kept == 0:
        return None, logits, kept
    if n_kept == x.shape[0]:
        return _explain(explainer, model, x, y), logits, kept
    sub = _explain(explainer, model, x[kept], y[kept])
    maps = torch.full((x.shape[0], *sub.shape[1:]), math.nan, dtype=sub.dtype, device=sub.device)
    maps[kept] = sub
    return maps, logits, kept


def ssim_under_noise(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    explainer: Explainer,
    sigmas: Sequence[float] = SSIM_SIGMAS,
    generator: torch.Generator | None = None,
    maps: Tensor | None = None,
    *,
    normalize: bool = True,
    with_raw: bool = False,
) -> SSIMUnderNoise:
    r"""Input-side stability: SSIM between maps of x and of noisy x (PROTOCOL §3 "SSIM under noise", §8.2).

    For each σ in ``sigmas``, in order, one Gaussian draw per image from ``generator`` makes
    the clipped noisy copy ``x~``; ``kept[s] = (argmax model(x~) == y)`` and, for the kept
    images, ``scores[s] = ssim(maps, explainer(model, x~, y))``. The protocol drops the other
    images, so they are not attributed and their score is NaN: the aggregate per σ is
    ``scores[s].nanmean()`` (= ``scores[s][kept[s]].mean()`` when no map is all zero), reported
    with ``kept[s].float().mean()``. The prediction on ``x~`` comes from the explainer's own
    forward pass when its first model call is on ``x~`` itself (vanilla gradient), else from one
    gradient-free forward pass, after which only the kept images are attributed (integrated
    gradients).

    With ``normalize=True`` (protocol v2's headline, §8.2) each map, clean and noisy, is first
    divided by its own max|map| (so it lies in [-1, 1]; ``data_range`` 2 is then its range):
    the score no longer depends on the gradients' scale (multiplying the logits by 10 changes
    no prediction and no score). A pair where either map is all zero has no scale-free map:
    its score is NaN although ``kept`` is True. ``normalize=False`` is v1's SSIM of the raw maps
    (the authors' code; the variant ``ssim_raw``), and ``with_raw=True`` adds those scores, on
    the same noisy maps (no extra attribution), as ``scores_raw``.

    Args:
        model: classifier (B, C, H, W) in [0, 1] -> (B, K) logits tensor; run in eval mode with
            frozen parameters, its modes and ``requires_grad`` flags restored afterwards.
        x: images (B, C, H, W) in [0, 1].
        y: true labels (B,), the attribution target.
        explainer: ``explainer(model, x, y) -> (B, H, W)``, e.g. :func:`vanilla_gradient`.
        sigmas: noise standard deviations in [0, 1] pixel space, each in (0, 1], S of them.
        generator: source of every noise draw. ``None`` uses a fresh generator on ``x``'s device
            seeded with 0. Draws are made on the generator's device.
        maps: ``explainer(model, x, y)`` if already computed (B, H, W), to avoid recomputing it.
        normalize: compare scale-free maps (default, v2) or the raw maps (v1).
        with_raw: also return the raw-map scores as ``scores_raw``.

    Returns:
        ``SSIMUnderNoise(scores (S, B) in the dtype of the maps, NaN where not kept (and, with
        ``normalize``, where a map is all zero); kept (S, B) bool)``, whose ``scores_raw`` is the
        (S, B) raw-map SSIM with ``with_raw=True``, else ``None``.

    Raises:
        ValueError: on a malformed ``x``, ``y`` or ``maps`` (wrong rank, batch-size mismatch,
            NaN/inf, empty batch, channels-last or outside [0, 1] images, a label beyond the
            logits), a σ outside (0, 1] (e.g. 25 in 0-255 units), an empty ``sigmas``, a ``normalize`` or
            ``with_raw`` that is not a bool, an explainer that returns the wrong shape, or a
            model that does not return a (B, K) logits tensor.

    Example:
        >>> from metrics.attributions import vanilla_gradient
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 2))
        >>> x, y = torch.rand(3, 1, 6, 6, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 0])
        >>> out = ssim_under_noise(model, x, y, vanilla_gradient, sigmas=(0.1, 0.2), with_raw=True)
        >>> out.scores.shape, out.kept.shape, out.scores_raw.shape
        (torch.Size([2, 3]), torch.Size([2, 3]), torch.Size([2, 3]))
        >>> bool((out.scores[out.kept] == 1).all())  # the gradient of a linear model does not depend on x
        True
        >>> bool(out.scores[~out.kept].isnan().all())  # flipped noisy copies are not attributed
        True
        >>> scores, kept = out  # a named tuple (scores, kept)
    """
    check_model(model)
    _check_explainer(explainer)
    check_images(x)
    check_pixel_range(x)
    max_label = check_targets(y, x.shape[0])
    sigmas = tuple(sigmas)
    if not sigmas:
        raise ValueError("sigmas is empty; pass at least one noise level")
    for sigma in sigmas:
        _check_sigma(sigma)
    for name, flag in (("normalize", normalize), ("with_raw", with_raw)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be True or False, got {flag!r}")
    if maps is not None:
        check_maps_match_images(maps, x)
    generator = default_generator(generator, x.device)

    with EvalMode(model):
        if maps is None:
            maps = _explain(explainer, model, x, y)
        # the noisy maps of every σ, then one SSIM call (the window sums of ``maps`` are shared);
        # a not-kept image holds a copy of its clean map there and gets NaN afterwards
        noisy_maps = maps.expand(len(sigmas), *maps.shape).clone()
        kept = torch.zeros(len(sigmas), x.shape[0], dtype=torch.bool, device=maps.device)
        for s, sigma in enumerate(sigmas):
            noisy = (x + sigma * randn_like(x, generator)).clamp_(0.0, 1.0)
            found, _, keep = _explain_kept(explainer, model, noisy, y, max_label, lambda logits: logits.argmax(dim=1) == y)
            kept[s] = keep.to(kept.device)
            if found is not None:
                noisy_maps[s, kept[s]] = found.to(device=maps.device, dtype=maps.dtype)[kept[s]]
        raw = ssim(maps, noisy_maps).masked_fill_(~kept, math.nan) if with_raw or not normalize else None
        if normalize:
            clean, clean_zero = _scale_free(maps)
            noisy_maps, noisy_zero = _scale_free(noisy_maps)
            scores = ssim(clean, noisy_maps).masked_fill_(~kept | clean_zero | noisy_zero, math.nan)
        else:
            scores = raw
    return SSIMUnderNoise(scores, kept, raw if with_raw else None)


def _check_sigma(sigma: object) -> None:
    """One noise level of :func:`ssim_under_noise`: a number in (0, 1], [0, 1] pixel units (PROTOCOL §3)."""
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma):
        raise ValueError(f"every sigma must be a finite number in (0, 1], got {sigma!r}")
    if not 0 < sigma <= 1:
        if sigma <= 0:
            hint = "pass a positive noise level"
        elif sigma <= 255:
            hint = f"it looks like 0-255 units: divide by 255 ({sigma!r} / 255 = {sigma / 255:.4g})"
        else:
            hint = "pass a standard deviation of at most 1"
        raise ValueError(
            f"every sigma must be a noise standard deviation in (0, 1] for [0, 1] images (PROTOCOL §3, "
            f"default {', '.join(map(str, SSIM_SIGMAS))}), got {sigma!r}; {hint}"
        )


def _scale_free(maps: Tensor) -> tuple[Tensor, Tensor]:
    """``(maps / max|map|, all-zero flags)`` per (H, W) map of ``maps`` (..., H, W); an all-zero
    map stays zero (its flag marks it for a NaN score)."""
    peak = maps.abs().amax(dim=(-2, -1), keepdim=True)
    zero = peak == 0
    return maps / peak.masked_fill(zero, 1), zero[..., 0, 0]


def relative_output_stability(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    explainer: Explainer,
    n_samples: int = ROS_SAMPLES,
    variant: Literal["paper", "agarwal"] = "paper",
    generator: torch.Generator | None = None,
    maps: Tensor | None = None,
    logits: Tensor | None = None,
    *,
    flips: Literal["exclude", "nan"] = "exclude",
    floor: float | None = None,
) -> Tensor:
    r"""Relative output stability (ROS) per image, lower = more stable (PROTOCOL §3 "ROS", §8.2, §8.5).

    Each of the ``n_samples`` perturbations ``x'`` is one uniform draw per element from
    ``generator`` (one-sided, not clipped); the map of ``x'`` comes from ``explainer`` and the
    output change from the logits. The image's ROS is the maximum of its samples' ratios.

    ``variant`` picks the output-side denominator: ``"paper"`` the logit change
    ``||h - h'||`` (what quantus ``RelativeOutputStability`` computes), ``"agarwal"`` (Agarwal
    et al. 2022, the paper's Eq. 34) the relative logit change ``||(h - h') / h||`` (with the
    ``[h == 0]`` guard of the numerator, at least 1e-6).

    ``flips`` says what a sample whose prediction flips does: ``"exclude"`` (default, protocol
    v2's headline, Agarwal et al.'s definition) leaves it out of the image's maximum, and the
    image is NaN only when every sample flips; ``"nan"`` (protocol v1 and quantus: use it with
    ``variant="paper"`` to reproduce v1) makes the image NaN as soon as one sample flips.

    ``floor`` changes the clean map's element-wise denominator ``e`` of the numerator
    ``||(e - e') / e||``: ``None`` (v1, v2's headline) uses ``e + 1e-6 [e == 0]``, which a
    numerically zero map element turns into a factor of up to 1e6 (PROTOCOL §8 (a)); a number
    f in (0, 1] uses ``sign(e) max(|e|, f max|e|)`` (max over the image's map, sign(0) counted
    +), so no element weighs more than 1 / f times the map's largest (the variant ``ros_floor``
    with f = ``ROS_FLOOR_FRACTION``). An all-zero clean map has no scale; it keeps the 1e-6 guard.

    Only the attributions the result depends on are computed: a flipped sample is not
    attributed, and with ``flips="nan"`` an image that is already NaN is neither classified
    nor attributed again. Every sample still draws noise for the whole batch, so the draws (and
    every non-NaN value) do not depend on which images were skipped. The logits of ``x'`` come
    from the explainer's own forward pass where its first model call is on ``x'`` (vanilla
    gradient), else from one gradient-free forward pass before it (integrated gradients).
    :func:`ros_variants` computes the v2 headline and its variants from one set of samples.

    Args:
        model: classifier (B, C, H, W) in [0, 1] -> (B, K) logits tensor; run in eval mode with
            frozen parameters, its modes and ``requires_grad`` flags restored afterwards.
        x: images (B, C, H, W) in [0, 1].
        y: true labels (B,), the attribution target.
        explainer: ``explainer(model, x, y) -> (B, H, W)``.
        n_samples: number of perturbations per image (default: the protocol's).
        variant: ``"paper"`` or ``"agarwal"`` (the output-side denominator).
        generator: source of the perturbations; ``None`` uses a fresh generator on ``x``'s
            device seeded with 0. Draws are made on the generator's device.
        maps: ``explainer(model, x, y)`` if already computed (B, H, W).
        logits: ``model(x)`` if already computed (B, K).
        flips: ``"exclude"`` (default, v2) or ``"nan"`` (v1, quantus).
        floor: ``None`` (default) or the floor fraction f in (0, 1] of the map-side denominator.

    Returns:
        ROS per image (B,) in the dtype of the maps; NaN marks images as described above.
        Aggregate with :func:`aggregate_ros` (v1) or the median of the per-image log10 (v2).

    Raises:
        ValueError: on a malformed ``x``, ``y``, ``maps`` or ``logits`` (wrong rank, batch-size
            mismatch, NaN/inf, empty batch, channels-last or outside [0, 1] images, a label
            beyond the logits), ``n_samples < 1``, an unknown ``variant`` or ``flips``, a
            ``floor`` outside (0, 1], an explainer that returns the wrong shape, a model
            that does not return a (B, K) logits tensor, or model outputs (or given ``logits``)
            that look like softmax probabilities: B >= 2 rows, each non-negative and summing to
            1 (ROS needs logits).

    Example:
        >>> from metrics.attributions import vanilla_gradient
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 2))
        >>> x, y = torch.rand(3, 1, 6, 6, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 0])
        >>> relative_output_stability(model, x, y, vanilla_gradient).shape
        torch.Size([3])
        >>> # a linear model's gradient map never changes, so the numerator (and ROS) is 0
        >>> bool((relative_output_stability(model, x, y, vanilla_gradient).nan_to_num(0.0) == 0).all())
        True
        >>> v1 = relative_output_stability(model, x, y, vanilla_gradient, flips="nan")  # quantus semantics
    """
    if not isinstance(flips, str) or flips not in ("exclude", "nan"):
        raise ValueError(f"flips must be 'exclude' or 'nan', got {flips!r}")
    _check_floor(floor)
    metric = "relative_output_stability"
    max_label, generator = _check_ros_inputs(model, x, y, explainer, n_samples, variant, generator, maps, logits,
                                             metric)
    with EvalMode(model):
        maps, logits = _clean_maps_and_logits(explainer, model, x, y, maps, logits, max_label, metric)
        r = _ros_samples(explainer, model, x, y, maps, logits, n_samples, variant, generator, max_label,
                         (floor,), stop_on_flip=flips == "nan", metric=metric)[0]
        return _ros_reduce(r, flips)


def ros_variants(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    explainer: Explainer,
    *,
    n_samples: int = ROS_SAMPLES,
    variant: Literal["paper", "agarwal"] = "paper",
    generator: torch.Generator | None = None,
    maps: Tensor | None = None,
    logits: Tensor | None = None,
    floor: float = ROS_FLOOR_FRACTION,
) -> dict[str, Tensor]:
    r"""Per-image ROS of protocol v2's headline and its variants from one set of samples (PROTOCOL §8.2, §8.5).

    One pass over the same ``n_samples`` perturbations and attributions gives

    - ``"exclude"``: the headline, ``relative_output_stability(..., flips="exclude")``;
    - ``"nan"``: v1 (quantus semantics, ``log10_mean_ros``), ``flips="nan"``;
    - ``"floor"``: ``flips="exclude"`` with the floored map-side denominator, ``floor=floor``
      (the variant ``ros_floor``).

    Each equals the separate :func:`relative_output_stability` call with a generator in the
    same state: the same draws, the same arithmetic per image. Only ``"nan"`` can differ in the
    last bits: the separate call attributes the images still alive at a sample as a smaller
    batch, and a model's float results may depend on the batch it runs in.

    Args:
        model, x, y, explainer, n_samples, variant, generator, maps, logits: as
            :func:`relative_output_stability`.
        floor: the floor fraction of the ``"floor"`` entry, in (0, 1] (default: the protocol's).

    Returns:
        ``{"exclude": (B,), "nan": (B,), "floor": (B,)}``, each in the dtype of the maps.

    Raises:
        ValueError: as :func:`relative_output_stability`.

    Example:
        >>> from metrics.attributions import vanilla_gradient
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 2))
        >>> x, y = torch.rand(3, 1, 6, 6, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 0])
        >>> {k: v.shape for k, v in ros_variants(model, x, y, vanilla_gradient).items()}
        {'exclude': torch.Size([3]), 'nan': torch.Size([3]), 'floor': torch.Size([3])}
    """
    if floor is None:
        raise ValueError("floor must be a number in (0, 1] for the 'floor' entry, got None")
    _check_floor(floor)
    metric = "ros_variants"
    max_label, generator = _check_ros_inputs(model, x, y, explainer, n_samples, variant, generator, maps, logits,
                                             metric)
    with EvalMode(model):
        maps, logits = _clean_maps_and_logits(explainer, model, x, y, maps, logits, max_label, metric)
        plain, floored = _ros_samples(explainer, model, x, y, maps, logits, n_samples, variant, generator, max_label,
                                      (None, floor), stop_on_flip=False, metric=metric)
    return {"exclude": _ros_reduce(plain, "exclude"), "nan": _ros_reduce(plain, "nan"),
            "floor": _ros_reduce(floored, "exclude")}


def _check_floor(floor: object) -> None:
    if floor is None:
        return
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not (0 < floor <= 1):
        raise ValueError(f"floor must be None or a number in (0, 1] (a fraction of max|map|), got {floor!r}")


def _check_ros_inputs(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    explainer: Explainer,
    n_samples: int,
    variant: str,
    generator: torch.Generator | None,
    maps: Tensor | None,
    logits: Tensor | None,
    metric: str,
) -> tuple[int, torch.Generator]:
    """The checks of :func:`relative_output_stability`; returns ``(max_label, generator)``.

    Given ``logits`` that look like softmax probabilities are refused (ROS needs logits, PROTOCOL §3)."""
    check_model(model)
    _check_explainer(explainer)
    check_images(x)
    check_pixel_range(x)
    max_label = check_targets(y, x.shape[0])
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
    if variant not in ("paper", "agarwal"):
        raise ValueError(f"variant must be 'paper' or 'agarwal', got {variant!r}")
    if maps is not None:
        check_maps_match_images(maps, x)
    if logits is not None:
        check_rank(logits, "logits", "B K")
        if logits.shape[0] != x.shape[0]:
            raise ValueError(
                f"batch size mismatch: x has shape {tuple(x.shape)} but logits has shape {tuple(logits.shape)}"
            )
        check_finite(logits, "logits")
        check_logits(logits, x.shape[0], max_label)
        if looks_like_probabilities(logits):
            refuse_probabilities(metric, "the given logits")
    return max_label, default_generator(generator, x.device)


def _clean_maps_and_logits(
    explainer: Explainer, model: nn.Module, x: Tensor, y: Tensor, maps: Tensor | None, logits: Tensor | None,
    max_label: int, metric: str,
) -> tuple[Tensor, Tensor]:
    """The clean logits (first, so that a model returning probabilities is refused before any
    attribution) and maps of ROS."""
    if logits is None:
        logits = _logits(model, x, max_label, "refuse", metric)
    if maps is None:
        maps = _explain(explainer, model, x, y)
    return maps, logits


def _map_denominator(e: Tensor, floor: float | None) -> Tensor:
    """The element-wise denominator of the map change for clean maps ``e`` (B, N)."""
    if floor is None:
        return e + ROS_EPS * (e == 0)
    magnitude = torch.maximum(e.abs(), floor * e.abs().amax(dim=1, keepdim=True))
    magnitude = magnitude + ROS_EPS * (magnitude == 0)  # an all-zero map: the v1 guard
    return torch.where(e < 0, -magnitude, magnitude)


def _ros_samples(
    explainer: Explainer,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    maps: Tensor,
    logits: Tensor,
    n_samples: int,
    variant: str,
    generator: torch.Generator,
    max_label: int,
    floors: tuple[float | None, ...],
    stop_on_flip: bool,
    metric: str,
) -> list[Tensor]:
    """The ratio of every sample and image, (S, B) per map-side denominator of ``floors`` (checked
    inputs, model in eval mode); NaN where the sample flipped the prediction or, with
    ``stop_on_flip``, where an earlier sample of the image flipped (not computed)."""
    e = maps.flatten(1)
    e_safe = [_map_denominator(e, f) for f in floors]
    h = logits.detach().to(e.dtype)
    pred = h.argmax(dim=1)
    if variant == "agarwal":
        h_safe = h + ROS_EPS * (h == 0)
    batch = x.shape[0]
    r = [torch.full((n_samples, batch), math.nan, dtype=e.dtype, device=e.device) for _ in floors]
    alive = torch.ones(batch, dtype=torch.bool, device=e.device)  # images whose ROS can still be finite
    for s in range(n_samples):
        # every sample draws the whole batch, so the draws do not depend on which images are alive
        noise = rand_like(x, generator) * (ROS_NOISE_HIGH - ROS_NOISE_LOW) + ROS_NOISE_LOW
        idx = alive.nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        x_p = x + noise
        if idx.numel() < batch:
            x_p = x_p[idx.to(x.device)]
        pred_i = pred[idx].to(x.device)
        # the perturbed logits are checked too (``logits`` may have been given): ROS needs logits
        e_p, h_p, kept = _explain_kept(
            explainer, model, x_p, y[idx.to(y.device)], max_label, lambda logits, p=pred_i: logits.argmax(dim=1) == p,
            "refuse", metric,
        )
        kept = kept.to(e.device)
        if stop_on_flip:  # one flipped sample makes the image NaN: its other samples are not needed
            alive[idx[~kept]] = False
        if e_p is None:
            continue
        idx, e_p, h_p = idx[kept], e_p.to(e.device)[kept].flatten(1).to(e.dtype), h_p.to(e.device)[kept].to(e.dtype)
        if variant == "paper":
            denominator = torch.linalg.vector_norm(h[idx] - h_p, dim=1)
            denominator = denominator + ROS_EPS * (denominator == 0)
        else:
            denominator = torch.linalg.vector_norm((h[idx] - h_p) / h_safe[idx], dim=1).clamp(min=ROS_EPS)
        change = e[idx] - e_p
        for out, safe in zip(r, e_safe):
            out[s, idx] = torch.linalg.vector_norm(change / safe[idx], dim=1) / denominator
    return r


def _ros_reduce(r: Tensor, flips: str) -> Tensor:
    """Per-image ROS from the (S, B) sample ratios (NaN = flipped or not computed)."""
    nan = torch.isnan(r)
    best = torch.where(nan, torch.full_like(r, -math.inf), r).amax(dim=0)
    poisoned = nan.any(dim=0) if flips == "nan" else nan.all(dim=0)
    return torch.where(poisoned, torch.full_like(best, math.nan), best)


def median_log10_ros(ros: Tensor) -> tuple[float, float]:
    r"""Protocol v2 headline of per-image ROS: ``(median over images of log10 ROS, fraction of NaN)``
    (PROTOCOL §8.2). Unlike :func:`aggregate_ros` (log10 of the mean, which one near-zero map pixel
    of one image can carry), the median moves little under float round-off.

    Args:
        ros: per-image ROS (B,), as returned by :func:`relative_output_stability` (any shape is
            flattened).

    Returns:
        ``(median of log10 ROS over the non-NaN images, NaN fraction)``; the median is NaN when
        every image is NaN (numpy's median: the mean of the two middle values for an even count).

    Raises:
        ValueError: if ``ros`` is empty.

    Example:
        >>> med, nan_fraction = median_log10_ros(torch.tensor([10.0, 1000.0, float("nan"), 1.0]))
        >>> round(med, 4), nan_fraction  # median of (1, 3, 0)
        (1.0, 0.25)
    """
    values = ros.detach().flatten().to(torch.float64).cpu()
    if values.numel() == 0:
        raise ValueError("median_log10_ros needs at least one per-image value, got an empty tensor")
    nan = torch.isnan(values)
    nan_fraction = float(nan.mean(dtype=torch.float64))
    if bool(nan.all()):
        return math.nan, nan_fraction
    logs = torch.log10(values[~nan]).sort().values
    k = logs.numel()
    median = logs[k // 2] if k % 2 else (logs[k // 2 - 1] + logs[k // 2]) / 2  # numpy's median (torch's is the lower)
    return float(median), nan_fraction


def aggregate_ros(ros: Tensor) -> tuple[float, float]:
    r"""Protocol aggregate of per-image ROS: ``(log10(nanmean(ros)), fraction of NaN)``.

    Args:
        ros: per-image ROS (B,), as returned by :func:`relative_output_stability`.

    Returns:
        ``(log10 of the mean over non-NaN images, NaN fraction)``; the first is NaN when every
        image is NaN, and ``-inf`` when every non-NaN ROS is 0 (maps that never move, e.g. the
        all-zero maps of a degenerate model): aggregation never raises on such values.

    Raises:
        ValueError: if ``ros`` is not a non-empty floating (B,) tensor or holds an infinity.

    Example:
        >>> log_mean, nan_fraction = aggregate_ros(torch.tensor([10.0, 1000.0, float("nan"), 1.0]))
        >>> round(log_mean, 4), nan_fraction  # log10((10 + 1000 + 1) / 3)
        (2.5276, 0.25)
    """
    check_rank(ros, "ros", "B")
    if ros.numel() == 0:
        raise ValueError("ros is empty (shape (0,)); pass at least one image")
    if not ros.is_floating_point():
        raise ValueError(f"ros must be a floating-point tensor, got dtype {ros.dtype}")
    if bool(torch.isinf(ros).any()):
        raise ValueError(f"ros contains an infinity (shape {tuple(ros.shape)}); ROS values are finite or NaN")
    values = ros.to(torch.float64)
    nan = torch.isnan(values)
    nan_fraction = float(nan.to(torch.float64).mean())
    if bool(nan.all()):
        return math.nan, nan_fraction
    mean = float(values[~nan].mean())
    return (math.log10(mean) if mean > 0 else -math.inf), nan_fraction
