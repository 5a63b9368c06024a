"""Faithfulness of saliency maps: ROAD with noisy linear imputation (PROTOCOL §3 "ROAD-AOPC").

ROAD (Rong et al. 2022, "A Consistent and Efficient Evaluation Strategy for Attribution
Methods") removes the most relevant pixels first and fills them by noisy linear imputation, so
that the filled image does not leak where pixels were removed; a faithful map makes the
accuracy drop quickly. The imputation solves the exact sparse system of the authors' code and
of quantus ``noisy_linear_imputation``, batched over images, channels and removal levels.
Pixels of equal map value are ordered by a seeded random permutation per image (PROTOCOL §8.1)
or, as in protocol v1, by pixel index (``ties="stable"``); :func:`tied_fraction` says how many
pixels of a map are tied.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
from torch import Tensor, nn

from salbench.metrics._imputation_solver import solve_imputation
from salbench.metrics._validation import (
    EvalMode,
    check_images,
    check_maps,
    check_maps_match_images,
    check_model,
    check_nonempty,
    check_pixel_range,
    check_rank,
    check_targets,
    default_generator,
    logits_of,
    randn_like,
)
from salbench.metrics.protocol import ROAD_NOISE, ROAD_PERCENTAGES, ROAD_TIE_SEED_OFFSET

__all__ = ["noisy_linear_imputation", "road_curve", "road_curves", "road_aopc", "tied_fraction"]

#: The tie orders :func:`road_curve` knows: ``"random"`` (PROTOCOL §8.1) and ``"stable"`` (v1, §3).
TIE_MODES = ("random", "stable")

#: With ``batch_size=None``, :func:`road_curve` imputes about this many values (images x levels
#: x C x H x W) per chunk and classifies them in one model call; on CPU, model calls of about a
#: thousand FMNIST images measured faster than larger ones.
_AUTO_CHUNK_ELEMENTS = 1 << 20
#: On CPU the imputed images of a chunk are classified this many input values per model call
#: (334 FMNIST images): forward-only calls of 1320 FMNIST images ran 1.5x slower per image than
#: calls of 128-512, whose activations stay in cache (docs/performance/scoring.md). Predictions do not
#: depend on the split.
_CPU_FORWARD_ELEMENTS = 1 << 18


def _check_noise(noise: float) -> None:
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not math.isfinite(noise) or noise < 0:
        raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")


def noisy_linear_imputation(
    x: Tensor,
    mask: Tensor,
    noise: float = ROAD_NOISE,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Fill the removed pixels of each image by noisy linear imputation (PROTOCOL §3 "ROAD-AOPC").

    The protocol's linear system (each removed pixel the weighted mean of its in-image
    8-neighbours, normalised by the in-image weight sum as quantus does), solved jointly over
    the removed pixels of an image, per channel; then Gaussian noise of standard deviation
    ``noise`` is added to the removed pixels only. Known pixels are returned unchanged. With
    ``noise=0`` the result is the solution of the system to a residual below 1e-9 (agreeing
    with scipy ``spsolve`` to about 1e-7 or better).

    Args:
        x: images (B, C, H, W).
        mask: (B, H, W) bool, True = removed (to impute). Every image needs at least one
            known pixel.
        noise: standard deviation of the Gaussian noise added to the imputed pixels (default:
            the protocol's).
        generator: source of the noise, one (B, C, H, W) draw; ``None`` uses a fresh generator
            on ``x``'s device seeded with 0. Draws are made on the generator's device.

    Returns:
        imputed images (B, C, H, W), same dtype and device as ``x``.

    Raises:
        ValueError: if ``x`` is not a non-empty finite floating channels-first (B, C, H, W) tensor, ``mask`` is
            not a bool (B, H, W) tensor matching ``x``, a mask removes every pixel of an image,
            or ``noise`` is negative or not finite.

    Example:
        >>> x = torch.tensor([[[[0., 1., 0.], [1., 9., 1.], [0., 1., 0.]]]])
        >>> mask = torch.zeros(1, 3, 3, dtype=torch.bool)
        >>> mask[0, 1, 1] = True  # the centre: (4 * 1/6 * 1 + 4 * 1/12 * 0) / 1
        >>> noisy_linear_imputation(x, mask, noise=0.0)[0, 0]
        tensor([[0.0000, 1.0000, 0.0000],
                [1.0000, 0.6667, 1.0000],
                [0.0000, 1.0000, 0.0000]])
    """
    check_images(x)
    check_rank(mask, "mask", "B H W")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (True = removed), got dtype {mask.dtype}")
    if mask.shape != (x.shape[0], *x.shape[2:]):
        raise ValueError(
            f"mask must have shape (B, H, W) = {(x.shape[0], *x.shape[2:])} to match x of shape "
            f"{tuple(x.shape)}, got {tuple(mask.shape)}"
        )
    _check_noise(noise)
    full = mask.flatten(1).all(dim=1)
    if bool(full.any()):
        bad = full.nonzero().squeeze(1).tolist()
        raise ValueError(
            f"mask removes every pixel of image(s) {bad[:10]}; linear imputation needs at least one known pixel"
        )
    filled = solve_imputation(x, mask.to(x.device))
    if noise > 0:  # filled is a fresh tensor: add the noise in place, on removed pixels only
        eps = randn_like(x, default_generator(generator, x.device))
        filled.addcmul_(eps, mask.to(device=x.device, dtype=x.dtype).unsqueeze(1), value=noise)
    return filled


def _check_percentages(percentages: Sequence[float], n_pixels: int) -> list[int]:
    """The pixel count of each removal level: percents in [1, 100), strictly increasing (PROTOCOL §3)."""
    percentages = list(percentages)
    if not percentages:
        raise ValueError("percentages is empty; pass at least one removal level")
    default = "1, 6, ..., 96"
    counts = []
    for p in percentages:
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p):
            raise ValueError(f"every percentage must be a finite number in [1, 100), got {p!r}")
        if not 1 <= p < 100:
            if 0 < p < 1:
                hint = f"it looks like a fraction: pass percents ({p!r} * 100 = {p * 100:.4g})"
            elif p >= 100:
                hint = f"{p!r}% removes all {n_pixels} pixels and the imputation needs at least one known pixel"
            else:
                hint = "pass removal levels of at least 1%"
            raise ValueError(
                f"every ROAD percentage must be a percent of the pixels in [1, 100) (PROTOCOL §3, default "
                f"{default}), got {p!r}; {hint}"
            )
        k = int(n_pixels * p / 100)
        if k >= n_pixels:
            raise ValueError(
                f"percentage {p!r} removes all {n_pixels} pixels; the imputation needs at least one known pixel"
            )
        counts.append(k)
    for a, b in zip(percentages, percentages[1:]):
        if not a < b:
            raise ValueError(
                f"ROAD percentages must be strictly increasing (PROTOCOL §3, default {default}), got {a!r} "
                f"then {b!r} in {tuple(percentages)!r}; sort them and drop repeats"
            )
    return counts


def road_curve(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    maps: Tensor,
    percentages: Sequence[float] = ROAD_PERCENTAGES,
    noise: float = ROAD_NOISE,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
    *,
    ties: Literal["random", "stable"] = "random",
) -> Tensor:
    r"""ROAD: is each image still classified as ``y`` after removing its top-p% pixels? (PROTOCOL §3, §8.1)

    Pixels (H * W positions, all channels together) are ranked by the signed map value, most
    relevant first; level p removes ``int(H * W * p / 100)`` of them, fills them by
    :func:`noisy_linear_imputation`, and checks the model's argmax. All levels of a chunk of
    images are imputed and classified in one batch.

    Pixels of equal map value (:func:`tied_fraction`) are ordered, with ``ties="random"``
    (protocol v2, §8.1), by a random permutation of the image's pixels: the map is sorted
    stably after that permutation. With ``ties="stable"`` (protocol v1) they go to the lower
    pixel index first (raster order), as v1 computed it, bit for bit. A map without ties gets
    the same order, and the same result, in both modes.

    The noise of image i is drawn from its own generator, seeded by the i-th of B seeds drawn
    from ``generator``; its tie permutation from another generator seeded by that seed plus
    ``ROAD_TIE_SEED_OFFSET``. So the result does not depend on ``batch_size``, and both tie
    modes use the same noise draws (only the order of the removed pixels differs).
    :func:`road_curves` returns both modes' curves at the cost of one plus the levels where
    they differ.

    Args:
        model: classifier (B, C, H, W) in [0, 1] -> (B, K) logits tensor; run in eval mode with
            frozen parameters, its modes and ``requires_grad`` flags restored afterwards.
        x: images (B, C, H, W) in [0, 1].
        y: true labels (B,).
        maps: saliency maps (B, H, W), signed values are used as they are.
        percentages: removal levels in percent, each in [1, 100), strictly increasing, L of them
            (default: the protocol's 20).
        noise: imputation noise standard deviation (default: the protocol's).
        generator: source of the noise and of the tie permutations; ``None`` uses a fresh
            generator on ``x``'s device seeded with 0.
        batch_size: images per chunk (each chunk imputes and classifies ``batch_size * L``
            images at once). ``None`` picks a chunk of about 1M pixel values (66 FMNIST
            images, 1 ImageNette image). The result does not depend on it.
        ties: ``"random"`` (default, protocol v2) or ``"stable"`` (protocol v1).

    Returns:
        correctness (B, L) bool; ``road_aopc`` turns it into the protocol's score.

    Raises:
        ValueError: on a malformed ``x``, ``y`` or ``maps`` (wrong rank, batch-size mismatch,
            NaN/inf, empty batch, channels-last or outside [0, 1] images, a negative label or
            one beyond the logits), an empty ``percentages``, one outside [1, 100) (fractions
            such as 0.1 for 10%) or not strictly increasing, a negative ``noise``, a non-positive ``batch_size``, an
            unknown ``ties``, or a model that does not return a (B, K) logits tensor.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
        >>> x = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
        >>> maps = torch.arange(32.).reshape(2, 4, 4)
        >>> road_curve(model, x, torch.tensor([0, 1]), maps, percentages=(10, 50, 90)).shape
        torch.Size([2, 3])
        >>> # no tied values: both tie orders give the same curve
        >>> bool((road_curve(model, x, torch.tensor([0, 1]), maps, ties="stable")
        ...       == road_curve(model, x, torch.tensor([0, 1]), maps)).all())
        True
    """
    _check_tie_mode(ties)
    return road_curves(model, x, y, maps, percentages, noise, generator, batch_size, ties=(ties,))[ties]


def road_curves(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    maps: Tensor,
    percentages: Sequence[float] = ROAD_PERCENTAGES,
    noise: float = ROAD_NOISE,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
    *,
    ties: Sequence[Literal["random", "stable"]] = TIE_MODES,
) -> dict[str, Tensor]:
    r""":func:`road_curve` for several tie orders at once, on the same draws (PROTOCOL §3 "ROAD-AOPC", §8.1, §8.5).

    ``road_curves(..., ties=modes)[m]`` equals ``road_curve(..., ties=m)`` with a generator in
    the same state, for every ``m`` in ``modes``: the same noise draws and tie permutations.
    An (image, level) pair whose removed pixel set is the same under every mode (every level
    of a map without ties, and the levels whose cut falls outside its tied values) is imputed
    and classified once; only the pairs where an order removes other pixels than the first
    mode's are computed again. The scoring harness stores the headline (``"random"``) and the
    ``aopc_stable_ties`` variant (``"stable"``) from one call.

    Args:
        model, x, y, maps, percentages, noise, generator, batch_size: as :func:`road_curve`.
        ties: the tie orders, a non-empty sequence of ``"random"`` and ``"stable"`` (default:
            both).

    Returns:
        ``{mode: correctness (B, L) bool}`` for every mode of ``ties``, in that order.

    Raises:
        ValueError: as :func:`road_curve`, and on an empty ``ties`` or an unknown mode in it.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
        >>> x = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
        >>> maps = torch.zeros(2, 4, 4)  # every pixel tied
        >>> curves = road_curves(model, x, torch.tensor([0, 1]), maps, percentages=(10, 50, 90))
        >>> sorted(curves), curves["random"].shape, curves["stable"].dtype
        (['random', 'stable'], torch.Size([2, 3]), torch.bool)
    """
    if isinstance(ties, str) or not isinstance(ties, Sequence) or len(ties) == 0:
        raise ValueError(f"ties must be a non-empty sequence of tie modes {TIE_MODES}, got {ties!r}")
    for mode in ties:
        _check_tie_mode(mode)
    modes = list(dict.fromkeys(ties))
    check_model(model)
    check_images(x)
    check_pixel_range(x)
    max_label = check_targets(y, x.shape[0])
    check_maps_match_images(maps, x)
    _check_noise(noise)
    batch, channels, height, width = x.shape
    n_pixels = height * width
    counts = _check_percentages(percentages, n_pixels)
    levels = len(counts)
    if batch_size is None:
        batch_size = max(1, _AUTO_CHUNK_ELEMENTS // (levels * channels * n_pixels))
    elif isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    generator = default_generator(generator, x.device)
    seeds = torch.randint(0, 2**62, (batch,), generator=generator, device=generator.device).tolist()

    flat = maps.flatten(1)
    ranks = [_rank(flat, mode, seeds, generator) for mode in modes]
    k = torch.tensor(counts, device=ranks[0].device)

    correct = {mode: torch.empty(batch, levels, dtype=torch.bool, device=x.device) for mode in modes}
    classify = logits_of(model, max_label)
    with EvalMode(model):
        for start in range(0, batch, batch_size):
            sl = slice(start, start + batch_size)
            xb, b = x[sl], x[sl].shape[0]
            # removed pixels per (image, level) of each mode: (b * L, H, W)
            removed = [(rank[sl, None, :] < k[None, :, None]).view(b * levels, height, width).to(x.device)
                       for rank in ranks]
            # the first mode computes every pair; a further mode only the pairs whose pixels differ
            extra = [(r != removed[0]).flatten(1).any(dim=1).nonzero().squeeze(1) for r in removed[1:]]
            pair = torch.cat([torch.arange(b * levels, device=x.device), *extra])  # (image, level) of each row
            mask = torch.cat([removed[0], *(r[idx] for r, idx in zip(removed[1:], extra))])
            stack = xb.unsqueeze(1).expand(b, levels, channels, height, width).reshape(b * levels, channels, height,
                                                                                        width)
            filled = solve_imputation(stack if pair.numel() == b * levels else stack[pair], mask)
            if noise > 0:
                eps = torch.cat(
                    [
                        randn_like(xb[:1].expand(levels, channels, height, width), _image_generator(seed, generator))
                        for seed in seeds[start : start + b]
                    ]
                )
                if pair.numel() > b * levels:
                    eps = eps[pair.to(eps.device)]
                filled.addcmul_(eps, mask.to(x.dtype).unsqueeze(1), value=noise)
            per_call = filled.shape[0]
            if filled.device.type == "cpu":
                per_call = max(1, _CPU_FORWARD_ELEMENTS // (channels * n_pixels))
            with torch.no_grad():
                pred = torch.cat([classify(part).argmax(dim=1) for part in filled.split(per_call)])
            hit = (pred == y[sl].to(pred.device).repeat_interleave(levels)[pair.to(pred.device)]).to(x.device)
            first = hit[: b * levels]
            correct[modes[0]][sl] = first.view(b, levels)
            offset = b * levels
            for mode, idx in zip(modes[1:], extra):  # a further mode: the first's, except where it differs
                own = first.clone()
                own[idx] = hit[offset : offset + idx.numel()]
                offset += idx.numel()
                correct[mode][sl] = own.view(b, levels)
    return correct


def _check_tie_mode(ties: object) -> None:
    if not isinstance(ties, str) or ties not in TIE_MODES:
        raise ValueError(f"ties must be one of {TIE_MODES}, got {ties!r}")


def _rank(flat: Tensor, mode: str, seeds: list[int], generator: torch.Generator) -> Tensor:
    """(B, N) position of each pixel in the removal order of ``mode`` (0 = removed first)."""
    batch, n_pixels = flat.shape
    if mode == "stable":
        order = torch.sort(flat, dim=1, descending=True, stable=True).indices
    else:  # a random permutation per image, then a stable sort: ties keep the permutation's order
        perm = torch.stack(
            [torch.randperm(n_pixels, generator=_tie_generator(seed, generator), device=generator.device)
             for seed in seeds]
        ).to(flat.device)
        order = perm.gather(1, torch.sort(flat.gather(1, perm), dim=1, descending=True, stable=True).indices)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n_pixels, device=order.device).expand(batch, n_pixels))
    return rank


def _image_generator(seed: int, parent: torch.Generator) -> torch.Generator:
    return torch.Generator(device=parent.device).manual_seed(seed)


def _tie_generator(seed: int, parent: torch.Generator) -> torch.Generator:
    """The tie permutation's generator of the image whose noise seed is ``seed`` (in [0, 2^62))."""
    return torch.Generator(device=parent.device).manual_seed(seed + ROAD_TIE_SEED_OFFSET)


def tied_fraction(maps: Tensor) -> Tensor:
    r"""Fraction of each map's pixels whose value another pixel of that map shares (PROTOCOL §8.1).

    These are the pixels whose ROAD order a tie rule decides (:func:`road_curve`'s ``ties``):
    integrated gradients are exactly 0 wherever the image is 0, and a ReLU network's vanilla
    gradient is often 0 on whole regions. Values compare as floats (``-0.0 == 0.0``).

    Args:
        maps: saliency maps (B, H, W).

    Returns:
        (B,) float64 in [0, 1]: 0 for a map of distinct values, 1 for a constant map (with more
        than one pixel).

    Raises:
        ValueError: if ``maps`` is not a non-empty, finite, floating (B, H, W) tensor.

    Example:
        >>> maps = torch.tensor([[[0., 0.], [1., 2.]], [[3., 3.], [3., 3.]], [[1., 2.], [3., 4.]]])
        >>> tied_fraction(maps)
        tensor([0.5000, 1.0000, 0.0000], dtype=torch.float64)
    """
    check_maps(maps)
    values = torch.sort(maps.flatten(1), dim=1).values
    same = values[:, 1:] == values[:, :-1]  # each sorted value equals its right neighbour
    tied = torch.zeros_like(values, dtype=torch.bool)
    tied[:, 1:] |= same
    tied[:, :-1] |= same
    return tied.sum(dim=1).to(torch.float64) / values.shape[1]


def road_aopc(curve: Tensor) -> float:
    r"""ROAD area over the perturbation curve, higher = more faithful (PROTOCOL §3 "ROAD-AOPC").

    The protocol's (the authors') formula over the accuracy per level, ``curve.mean(0)``; the
    first level of ``curve`` is the reference point.

    Args:
        curve: correctness (B, L), bool or 0/1 floats, as returned by :func:`road_curve`.

    Returns:
        the AOPC, a Python float.

    Raises:
        ValueError: if ``curve`` is not a non-empty (B, L) tensor of bools or of the numbers 0 and 1.

    Example:
        >>> curve = torch.tensor([[True, True, False], [True, False, False]])
        >>> road_aopc(curve)  # acc = (1, 0.5, 0): (0 + 0.5 + 1) / 4
        0.375
    """
    check_rank(curve, "curve", "B L")
    check_nonempty(curve, "curve")
    values = curve.to(torch.float64)
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"curve contains NaN or inf (shape {tuple(curve.shape)})")
    bad = (values != 0) & (values != 1)
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"curve must hold correctness (bool, or the numbers 0 and 1), got {float(values[first]):.4g} at index "
            f"{first}; pass road_curve's output (B, L), not accuracies or percentages"
        )
    acc = values.mean(dim=0)
    return float((acc[0] - acc).sum() / (acc.numel() + 1))
