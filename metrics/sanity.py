"""Model-parameter randomisation sanity checks (PROTOCOL §9.3): does a map change when the weights are re-drawn?

- :func:`cascading_randomisation`: MPRT (Adebayo et al. 2018, "Sanity checks for saliency maps"): the
  similarity of each map to the original after re-initialising one more layer, output layer first; with
  ``smooth_samples`` it is sMPRT (Hedström et al. 2024, "Sanity checks revisited"): maps averaged over
  noisy copies of the input.
- :func:`efficient_mprt`: eMPRT (Hedström et al. 2024): the relative rise of the map's discrete entropy
  from the model to the fully randomised model.

Re-initialisation is quantus 0.6.0's (``PyTorchModel.get_random_layer_generator``): on a deep copy,
``torch.manual_seed(seed + 1)`` before each layer's ``reset_parameters()``, so with the same layer
sequence the weights are quantus's bit for bit, and each layer's new weights depend on the seed and its
shape only (the fully randomised model is the same for every cascading order). Layers are taken in
forward *execution* order (:func:`randomisation_layers`; quantus: registration order). The caller's
model and RNG states are left unchanged.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import Tensor, nn

from salbench.metrics._validation import EvalMode, check_images, check_targets
from salbench.metrics.attributions import Explainer
from salbench.metrics.protocol import EMPRT_BINS, SMPRT_NOISE
from salbench.metrics.stability import _check_explainer, _explain, _scale_free, ssim

__all__ = ["randomisation_layers", "CascadeResult", "cascading_randomisation", "efficient_mprt", "spearman",
           "scale_free_ssim", "discrete_entropy", "entropy_rise"]

ORDERS = ("top_down", "bottom_up", "independent")


def _owns_resettable_parameters(module: nn.Module) -> bool:
    return hasattr(module, "reset_parameters") and any(True for _ in module.parameters(recurse=False))


def randomisation_layers(model: nn.Module, x: Tensor) -> list[str]:
    """Names (``model.named_modules()``) of the modules to re-initialise, in execution order (PROTOCOL §9.3).

    A module qualifies when it owns parameters directly and has ``reset_parameters`` (the root too, name
    ``""``). Its position is the first call of its forward pre-hook in one ``torch.no_grad()`` forward
    pass of ``x[:1]`` (eval mode; the modes are restored). A module never called itself, whose parent
    uses its parameters directly (the zoo's ``SmoothBlock`` applies ``mix``'s weights in its own
    forward), takes the position of its closest executed ancestor below the root (ties: registration
    order). Modules without one are left out (pass them in ``layers`` explicitly).

    Args:
        model: an ``nn.Module``; x: an input batch (B, C, H, W) (its first image is run once).

    Returns:
        The module names, first executed first.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``.
        ValueError: if ``x`` is not a finite floating (B, C, H, W) batch.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Flatten(),
        ...                           torch.nn.Linear(2 * 6 * 6, 3))
        >>> randomisation_layers(net, torch.rand(1, 1, 8, 8))
        ['0', '3']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (its layers are re-initialised), got {type(model).__name__}")
    check_images(x)
    first: dict[str, int] = {}

    def hook(name: str):
        def pre(module: nn.Module, inputs: object) -> None:  # returns None: inputs pass unchanged
            first.setdefault(name, len(first))
        return pre

    named = list(model.named_modules())
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in named]
    try:
        with torch.no_grad(), EvalMode(model):
            model(x[:1])
    finally:
        for h in handles:
            h.remove()

    def position(name: str) -> int | None:  # its own first call, else its closest called ancestor's
        while name not in first and "." in name:
            name = name.rpartition(".")[0]
        return first.get(name)

    placed = [(position(n), i, n) for i, (n, m) in enumerate(named) if _owns_resettable_parameters(m)]
    return [n for pos, _, n in sorted(p for p in placed if p[0] is not None)]


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation of each pair of rows of two (B, ...) tensors, flattened per row.

    Pearson correlation of the ranks, tied values getting their average rank (``scipy.stats.spearmanr``,
    ``scipy.stats.rankdata(method="average")``), in float64. NaN where either row is constant.
    """
    if a.shape != b.shape or a.dim() < 2 or not bool(torch.isfinite(a).all() & torch.isfinite(b).all()):
        raise ValueError(f"spearman needs two finite (B, ...) tensors of one shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)} (non-finite values have no rank)")
    ra, rb = _average_ranks(a.reshape(len(a), -1)), _average_ranks(b.reshape(len(b), -1))
    ra, rb = ra - ra.mean(dim=1, keepdim=True), rb - rb.mean(dim=1, keepdim=True)
    den = torch.sqrt((ra * ra).sum(dim=1) * (rb * rb).sum(dim=1))
    r = (ra * rb).sum(dim=1) / den.masked_fill(den == 0, 1)
    return r.clamp(-1, 1).masked_fill(den == 0, math.nan)


def scale_free_ssim(a: Tensor, b: Tensor) -> Tensor:
    """:func:`ssim` (default ``data_range``) of two (B, H, W) map batches, each map divided by its own
    max|map| first (protocol v2), in float64 (B,). An all-zero map stays zero; constant maps keep a finite
    SSIM through the constants C1, C2 (two all-zero maps score 1)."""
    return ssim(_scale_free(a.double())[0], _scale_free(b.double())[0])


def _average_ranks(v: Tensor) -> Tensor:
    """1-based ranks along dim 1 of a (B, N) tensor, ties averaged, float64."""
    n = v.shape[1]
    s, order = v.sort(dim=1)
    pos = torch.arange(n, device=v.device).expand_as(s)
    starts = torch.ones_like(s, dtype=torch.bool)
    starts[:, 1:] = s[:, 1:] != s[:, :-1]
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    first = torch.where(starts, pos, 0).cummax(dim=1).values  # first index of each tie group
    last = torch.where(ends, pos, n).flip(1).cummin(dim=1).values.flip(1)  # and its last
    ranks = (first + last).double() / 2 + 1
    return torch.empty_like(ranks).scatter_(1, order, ranks)


def discrete_entropy(maps: Tensor, n_bins: int = EMPRT_BINS) -> Tensor:
    """Entropy (nats) per map of the histogram of its values in ``n_bins`` equal bins from its min to max.

    quantus ``discrete_entropy`` (``complexity_func.py``): ``scipy.stats.entropy(np.histogram(a,
    bins=n_bins)[0])``. The bin edges are numpy's (``np.linspace`` in the maps' dtype, a constant map's
    range widened by 0.5 on each side); a value goes to the bin whose edges hold it, the last bin
    closed. float64 (B,); a constant map fills one bin: entropy 0.
    """
    flat = maps.detach().reshape(len(maps), -1)
    lo, hi = flat.amin(dim=1, keepdim=True), flat.amax(dim=1, keepdim=True)
    same = lo == hi
    lo, hi = torch.where(same, lo - 0.5, lo), torch.where(same, hi + 0.5, hi)
    delta = hi - lo
    step = delta / n_bins
    grid = torch.arange(n_bins + 1, dtype=flat.dtype, device=flat.device)
    edges = torch.where(step == 0, grid / n_bins * delta, grid * step) + lo  # np.linspace, operation by operation
    edges[:, -1:] = hi
    idx = (torch.searchsorted(edges, flat, right=True) - 1).clamp_(0, n_bins - 1)
    rows = torch.arange(len(flat), device=flat.device)[:, None] * n_bins
    counts = torch.bincount((idx + rows).flatten(), minlength=len(flat) * n_bins).view(len(flat), n_bins)
    p = counts.double() / counts.sum(dim=1, keepdim=True)
    return -torch.where(p > 0, p * torch.log(p), 0.0).sum(dim=1)


@dataclass
class CascadeResult:
    """Result of :func:`cascading_randomisation`: row l is the step after re-initialising ``layers[l]``."""

    #: the module names in the order they were re-initialised (top-down: the output layer first)
    layers: list[str]
    #: (L, B) float64 Spearman of |original map| and |map after step l|; NaN where either map is constant
    spearman: Tensor
    #: (L, B) float64 :func:`scale_free_ssim` of the original map and the map after step l
    ssim: Tensor
    #: (B, H, W) maps of the unchanged model (smoothed for sMPRT)
    original: Tensor
    #: (B, H, W) maps after the last step (the fully randomised model for a cascading order)
    final: Tensor


def _reset(module: nn.Module, seed: int) -> None:
    """quantus's ``torch.manual_seed(seed + 1); module.reset_parameters()``, with the generators that
    seeds (CPU, and the CUDA devices holding the module's parameters) restored afterwards."""
    cuda = sorted({p.device.index for p in module.parameters(recurse=False) if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed + 1)
        for i in cuda:
            torch.cuda.default_generators[i].manual_seed(seed + 1)
        module.reset_parameters()


def _maps(explainer: Explainer, model: nn.Module, x: Tensor, y: Tensor, samples: int, noise: float,
          noise_seed: int, clip: bool, step: str) -> Tensor:
    """The explainer's maps of ``x``, or for ``samples`` = n > 0 the sMPRT mean over n copies of ``x``."""
    if samples == 0:
        maps = _explain(explainer, model, x, y)
    else:
        gen = torch.Generator().manual_seed(noise_seed)  # same draws for every step of a cascade
        std = noise * (x.amax(dim=(1, 2, 3), keepdim=True) - x.amin(dim=(1, 2, 3), keepdim=True))
        maps = None
        for i in range(samples):
            xi = x
            if i < samples - 1:  # quantus: "the last epsilon is defined as zero"
                eps = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
                xi = x.double() + eps.double() * std.double()  # as numpy: float64 noise, one rounding
                xi = (xi.clamp(0, 1) if clip else xi).to(x.dtype)
            m = _explain(explainer, model, xi, y) / samples
            maps = m if maps is None else maps + m
    if not bool(torch.isfinite(maps).all()):
        raise ValueError(f"the explainer returned non-finite maps ({step}); a randomised model may overflow: "
                         "check the model's outputs or pass fewer/other layers")
    return maps


def _check_call(model: object, x: Tensor, y: Tensor, explainer: object, seed: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (its layers are re-initialised), got {type(model).__name__}")
    check_images(x)
    check_targets(y, x.shape[0])
    _check_explainer(explainer)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")


def _resolve_layers(work: nn.Module, x: Tensor, layers: Sequence[str] | None) -> list[str]:
    if layers is None:
        found = randomisation_layers(work, x)
        if not found:
            raise ValueError("the model has no module that owns parameters and has reset_parameters(); nothing "
                             "to randomise")
        return found
    if isinstance(layers, str) or not all(isinstance(n, str) for n in layers) or len(layers) == 0:
        raise TypeError(f"layers must be a non-empty list of module names (str), got {layers!r}")
    modules = dict(work.named_modules())
    for name in layers:
        if name not in modules or not _owns_resettable_parameters(modules[name]):
            why = "is not a module of the model" if name not in modules else \
                "owns no parameters or has no reset_parameters()"
            raise ValueError(f"layer {name!r} {why}; expected names from model.named_modules() such as "
                             f"randomisation_layers(model, x) = {randomisation_layers(work, x)}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers lists a module twice: {list(layers)}; list each module once")
    return list(layers)


def cascading_randomisation(
    model: nn.Module, x: Tensor, y: Tensor, explainer: Explainer, *, seed: int = 0,
    layers: Sequence[str] | None = None, order: Literal["top_down", "bottom_up", "independent"] = "top_down",
    smooth_samples: int = 0, smooth_noise: float = SMPRT_NOISE, generator_seed: int | None = None, smooth_clip: bool = True,
    last_only: bool = False,
) -> CascadeResult:
    r"""MPRT and sMPRT (PROTOCOL §9.3): similarity of each map to the original after each re-initialisation.

    On a deep copy of ``model`` in eval mode the layers (default :func:`randomisation_layers`) are
    re-initialised as quantus does: ``order="top_down"`` (output layer first, cumulatively: Adebayo et
    al.'s cascading randomisation), ``"bottom_up"`` (cumulatively) or ``"independent"`` (original
    weights reloaded before each layer). An explicit ``layers`` list fixes the sequence; ``order`` then
    only picks cumulative or ``"independent"``. After each step the maps for the labels ``y`` are
    compared with the original maps by the Spearman rank correlation of |map| (quantus ``MPRT``
    defaults: ``abs=True``, ``correlation_spearman``; its batch-wide ``normalise_by_max`` cannot change
    a rank) and by :func:`scale_free_ssim`. ``last_only`` compares after the last step only (one row,
    ``layers`` its last name): the cost of one map instead of one per layer.

    sMPRT (Hedström et al. 2024; quantus ``SmoothMPRT.explain_smooth_batch_numpy``): for
    ``smooth_samples`` = n > 0 every map is the mean of the explainer's maps of n copies of ``x``: n - 1
    with Gaussian noise of standard deviation ``smooth_noise`` times the image's own range (max - min
    over C, H, W), then ``x`` itself (quantus: "the last epsilon is defined as zero"; n = 1 is MPRT).
    The noise comes from a CPU generator seeded with ``generator_seed`` (default ``seed``) afresh for
    every map, so all steps see the same noisy copies (quantus draws new ones from numpy's global RNG).
    ``smooth_clip`` clips the copies to [0, 1], as the library's explainers take pixel-space images
    (quantus does not clip: ``smooth_clip=False``).

    Args:
        model: an ``nn.Module`` classifier (copied, never changed); x: images (B, C, H, W); y: labels
            (B,); explainer: ``(model, x, y) -> (B, H, W)`` maps.
        seed: re-initialisation seed (quantus's ``seed``, default 42 there).
        layers: module names in the order to re-initialise them (default: all, by ``order``).

    Returns:
        :class:`CascadeResult`, one (L, B) row of ``spearman`` and ``ssim`` per step.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``, ``layers`` not a list of str or a seed not an int.
        ValueError: on malformed ``x``/``y``, an unknown or non-resettable layer, a bad ``order``, negative
            ``smooth_samples``/``smooth_noise``, or maps of the wrong shape or not finite.

    Example:
        >>> from salbench.metrics import vanilla_gradient
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 8), torch.nn.ReLU(),
        ...                           torch.nn.Linear(8, 3))
        >>> x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
        >>> r = cascading_randomisation(net, x, y, vanilla_gradient, seed=42)
        >>> r.layers, tuple(r.spearman.shape)
        (['3', '1'], (2, 4))
        >>> bool((cascading_randomisation(net, x, y, lambda m, xx, yy: xx.sum(1)).spearman == 1).all())
        True
    """
    _check_call(model, x, y, explainer, seed)
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if isinstance(smooth_samples, bool) or not isinstance(smooth_samples, int) or smooth_samples < 0:
        raise ValueError(f"smooth_samples must be an int >= 0 (0: plain MPRT), got {smooth_samples!r}")
    if not isinstance(smooth_noise, (int, float)) or not math.isfinite(smooth_noise) or smooth_noise < 0:
        raise ValueError(f"smooth_noise must be a finite number >= 0 (a fraction of each image's range), "
                         f"got {smooth_noise!r}")
    noise_seed = seed if generator_seed is None else generator_seed
    if isinstance(noise_seed, bool) or not isinstance(noise_seed, int):
        raise TypeError(f"generator_seed must be an int or None, got {generator_seed!r}")
    work = copy.deepcopy(model).eval()
    explicit = layers is not None
    names = _resolve_layers(work, x, layers)
    if order == "top_down" and not explicit:
        names = names[::-1]
    modules = dict(work.named_modules())

    def maps(step: str) -> Tensor:
        return _maps(explainer, work, x, y, smooth_samples, float(smooth_noise), noise_seed, smooth_clip, step)

    original = maps("original model")
    saved = copy.deepcopy(work.state_dict()) if order == "independent" else None
    rho, sim, current = [], [], original
    for i, name in enumerate(names):
        if saved is not None:
            work.load_state_dict(saved)
        _reset(modules[name], seed)
        if last_only and i < len(names) - 1:
            continue
        current = maps(f"after re-initialising {name!r}")
        rho.append(spearman(original.abs(), current.abs()))
        sim.append(scale_free_ssim(original, current))
    return CascadeResult(names[-1:] if last_only else names, torch.stack(rho), torch.stack(sim), original, current)


def efficient_mprt(
    model: nn.Module, x: Tensor, y: Tensor, explainer: Explainer, *, seed: int = 0, n_bins: int = EMPRT_BINS,
    layers: Sequence[str] | None = None,
) -> Tensor:
    r"""eMPRT per image (PROTOCOL §9.3): ``(H(map of the fully randomised model) - H(map)) / H(map)``.

    Hedström et al. 2024. H is :func:`discrete_entropy` of the raw map, as quantus ``EfficientMPRT``
    with its defaults (``discrete_entropy``, 100 bins, no ``rule``, ``abs=False``, ``normalise=False``,
    ``skip_layers=True``): only the original and the fully randomised model are explained. Every layer
    (default :func:`randomisation_layers`) is re-initialised as in :func:`cascading_randomisation`; with
    the per-layer seeding the order does not matter (quantus's default ``bottom_up`` = ``top_down``).

    Returns:
        float64 (B,); NaN where the original map is constant (H = 0; quantus returns inf there, or NaN
        when the randomised map is constant too).

    Args:
        As :func:`cascading_randomisation`; n_bins: histogram bins (quantus default 100).

    Raises:
        As :func:`cascading_randomisation`; ValueError if ``n_bins`` is not a positive int.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
        >>> x, y = torch.rand(2, 1, 8, 8), torch.tensor([0, 1])
        >>> efficient_mprt(net, x, y, lambda m, xx, yy: xx.sum(1)).tolist()  # a model-free map: no rise
        [0.0, 0.0]
    """
    _check_call(model, x, y, explainer, seed)
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int (quantus default {EMPRT_BINS}), got {n_bins!r}")
    work = copy.deepcopy(model).eval()
    modules = dict(work.named_modules())
    before = _maps(explainer, work, x, y, 0, 0.0, 0, False, "original model")
    for name in _resolve_layers(work, x, layers):
        _reset(modules[name], seed)
    after = _maps(explainer, work, x, y, 0, 0.0, 0, False, "fully randomised model")
    return entropy_rise(before, after, n_bins)


def entropy_rise(original: Tensor, randomised: Tensor, n_bins: int = EMPRT_BINS) -> Tensor:
    """eMPRT's score from the two maps it compares: ``(H(randomised) - H(original)) / H(original)`` per
    map (:func:`discrete_entropy`), NaN where the original is constant. With a cascade's ``original``
    and ``final`` maps (every layer re-initialised, per-layer seeding) it equals :func:`efficient_mprt`
    without explaining the two models again."""
    h0, h1 = discrete_entropy(original, n_bins), discrete_entropy(randomised, n_bins)
    return torch.where(h0 > 0, (h1 - h0) / h0.masked_fill(h0 == 0, 1), math.nan)
