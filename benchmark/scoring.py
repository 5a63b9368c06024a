"""Score one model on a fixed image set with every metric (PROTOCOL §2-3).

One pass over the set in batches: per batch and method, the attribution of the clean images
is computed once and re-used by Gini, SSIM-under-noise, ROS and ROAD; the perturbed-input
attributions that SSIM and ROS need by definition are the only other explainer calls.
Every random draw comes from a generator seeded by (seed, method, metric, batch start), so a
score is a pure function of (weights, image set, config) on a given device.
"""

from __future__ import annotations

import itertools
import math
import platform
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from salbench import metrics
from salbench.metrics import protocol as P
from salbench.metrics.controls import edge_map, random_explainer
from salbench.benchmark import distributed as D
from salbench.benchmark.metric_registry import METRICS, Batch, MetricSpec, get_metric, stack_batches
from salbench.benchmark.progress import StageClock, format_seconds, stage_work
from salbench.benchmark.results import Result
from salbench.model_zoo.attacks import natural_correct, robust_correct
from salbench.model_zoo.data import Split
from salbench.model_zoo.datasets import SpecView

METHODS = ("VG", "IG")
ROBUST_EVAL = SpecView("robust_eval")  # PROTOCOL §3 "Accuracy", from the dataset specs
ROBUST_EVAL_IMAGES = 1000
# images per scoring batch (the dataset spec's): large for the small inputs, small enough at
# 224x224 that one IG pass over a batch stays well inside a few GB of memory on CPU
DEFAULT_BATCH_SIZE = SpecView("score_batch_size")


@dataclass(frozen=True)
class ScoreConfig:
    """Everything a score depends on besides the weights and the image set (stored with it)."""

    methods: tuple[str, ...] = METHODS
    batch_size: int | None = None  # None: DEFAULT_BATCH_SIZE of the dataset (streams the set)
    seed: int = 0
    ig_steps: int = P.IG_STEPS
    # IG forward passes hold at most ig_internal_batch_size path points (None: the scoring batch, i.e.
    # one integration step per pass; measured ~2x faster on CPU than all 50 steps at once). A memory
    # knob only: it changes no draw and no number beyond float rounding, so it is not part of a
    # result's identity (benchmark.results.identity_fields)
    ig_internal_batch_size: int | None = None
    sigmas: tuple[float, ...] = P.SSIM_SIGMAS
    ros_samples: int = P.ROS_SAMPLES
    ros_variant: str = "paper"
    road_percentages: tuple[int, ...] = P.ROAD_PERCENTAGES
    road_noise: float = P.ROAD_NOISE
    device: str = "cpu"
    accuracy: bool = True  # natural (full test split) and robust (first 1000 test images)
    # the registered metrics to score (benchmark.metric_registry), in board order; None: every registered one
    metrics: tuple[str, ...] | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


@dataclass(frozen=True)
class ExplainerSpec:
    """A registered attribution method: ``build(cfg)`` returns an explainer
    ``(model, x, y) -> (B, H, W)`` maps (the ``metrics.Explainer`` contract, PROTOCOL §2)."""

    name: str
    build: Callable[["ScoreConfig"], Callable]
    description: str = ""
    control: bool = False  # a model-free control map (benchmark.controls): own board, no verdicts


EXPLAINERS: dict[str, ExplainerSpec] = {}


def register_explainer(name: str, description: str = "", *, control: bool = False):
    """Register an attribution method under ``name`` (a decorator of ``build(cfg) -> explainer``).
    ``ScoreConfig(methods=(..., name))`` then scores it with every metric, and it gets its own rows
    on the leaderboard and in the comparisons.

    >>> @register_explainer("VG2", "squared Vanilla Gradient")
    ... def _vg2(cfg):
    ...     return lambda model, x, y: metrics.vanilla_gradient(model, x, y) ** 2
    >>> "VG2" in EXPLAINERS
    True
    >>> del EXPLAINERS["VG2"]
    """
    if not name or "," in name:
        raise ValueError(f"an explainer name must be non-empty and contain no comma, got {name!r}")

    def deco(build):
        if name in EXPLAINERS:
            raise ValueError(f"an explainer named {name!r} is already registered")
        EXPLAINERS[name] = ExplainerSpec(name, build, description, control)
        return build

    return deco


@register_explainer("VG", "Vanilla Gradient: |d logit_y / d x| summed over channels (PROTOCOL §2)")
def _vg(cfg: "ScoreConfig"):
    return metrics.vanilla_gradient


@register_explainer("IG", "Integrated Gradients, zero baseline, Gauss-Legendre steps, summed over channels (PROTOCOL §2)")
def _ig(cfg: "ScoreConfig"):
    """IG memory: captum's ``internal_batch_size`` splits only the *integration steps* into chunks and
    never holds fewer than one step for every image (it warns and uses ``len(x)`` when asked for
    less). So with ``cfg.ig_internal_batch_size`` below the batch, the images themselves are split
    into chunks of that many, each integrated with the same ``internal_batch_size``: no forward pass
    then holds more than ``ig_internal_batch_size`` path points. IG is per image, so the maps equal
    the unchunked ones up to float rounding.
    """
    chunk = cfg.ig_internal_batch_size

    def ig(model, x, y):
        if chunk is None:  # one integration step (the whole scoring batch) per forward pass
            return metrics.integrated_gradients(model, x, y, n_steps=cfg.ig_steps,
                                                internal_batch_size=max(cfg.batch_size or len(x), len(x)))
        if chunk >= len(x):
            return metrics.integrated_gradients(model, x, y, n_steps=cfg.ig_steps, internal_batch_size=chunk)
        return torch.cat([metrics.integrated_gradients(model, x[i:i + chunk], y[i:i + chunk], n_steps=cfg.ig_steps,
                                                       internal_batch_size=chunk)
                          for i in range(0, len(x), chunk)])

    return ig


@register_explainer("random", "control: a seeded uniform map per image, ignoring the model (metrics.controls)",
                    control=True)
def _random(cfg: "ScoreConfig"):
    return random_explainer(cfg.seed)


@register_explainer("edge", "control: Sobel magnitude of the input summed over channels, ignoring the model "
                    "(metrics.controls)", control=True)
def _edge(cfg: "ScoreConfig"):
    return edge_map


def control_methods() -> tuple[str, ...]:
    """The registered control explainers, in registration order."""
    return tuple(n for n, s in EXPLAINERS.items() if s.control)


def explainer_for(method: str, cfg: ScoreConfig):
    """The explainer of the registered ``method`` under ``cfg`` (see :func:`register_explainer`)."""
    if method not in EXPLAINERS:
        raise ValueError(f"unknown attribution method {method!r}; registered: {', '.join(EXPLAINERS)} "
                         "(add one with salbench.benchmark.scoring.register_explainer)")
    return EXPLAINERS[method].build(cfg)


def resolve_config(config: ScoreConfig, dataset: str) -> ScoreConfig:
    """``config`` with ``batch_size`` (the dataset's default when None) and ``metrics`` (every
    registered metric when None) filled in: the config a result stores and its identity (``benchmark.results.result_identity``) is computed from."""
    if config.batch_size is None:
        config = replace(config, batch_size=DEFAULT_BATCH_SIZE.get(dataset, 64))
    if config.metrics is None:
        config = replace(config, metrics=tuple(METRICS))
    for k in config.metrics:
        get_metric(k)  # a clear error for an unknown name
    return config


def _gen(cfg: ScoreConfig, device, *parts) -> torch.Generator:
    key = zlib.crc32("/".join(map(str, parts)).encode())
    return torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + key)


def platform_info() -> dict:
    """What per-image float32 values depend on beyond the weights and draws (PROTOCOL §8.7): the CPU
    model and the ISA torch dispatches to, torch's and oneDNN's versions, and whether SalBench's native
    C kernels ran (``SALBENCH_NATIVE=0`` turns them off)."""
    import os
    import re

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        isa = torch.backends.cpu.get_cpu_capability()
    except Exception:  # older torch
        isa = "unknown"
    m = re.search(r"(?:oneDNN|MKL-DNN)[^\n]*?v?(\d+\.\d+(?:\.\d+)?)", torch.__config__.show())
    from salbench.metrics._imputation_solver import IMPUTATION_NATIVE
    from salbench.metrics.stability import SSIM_NATIVE
    from salbench.model_zoo.native import LIBRARY as SMOOTHING_NATIVE

    kernels = {"ssim": SSIM_NATIVE.status(), "imputation": IMPUTATION_NATIVE.status(),
               "smoothing": SMOOTHING_NATIVE.status()}
    native = all(v == "native" for v in kernels.values())
    return {"cpu": cpu, "machine": platform.machine(), "isa": isa, "torch": torch.__version__,
            "onednn": m.group(1) if m else "unknown", "native_kernels": native,
            "kernels": kernels}


def versions() -> dict:
    import captum

    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
           "captum": captum.__version__, "protocol": P.PROTOCOL_VERSION, "platform": platform_info()}
    try:
        from importlib.metadata import version

        out["salbench"] = version("salbench")
    except Exception:
        out["salbench"] = "unknown"
    return out


def score(
    model: nn.Module,
    imageset,
    config: ScoreConfig = ScoreConfig(),
    *,
    test_split: Split | None = None,
    progress: bool = True,
    dtype: torch.dtype | None = None,
    deadline=None,
) -> Result:
    """Score ``model`` on ``imageset`` (a ``benchmark.imagesets.ImageSet``) with every method of
    ``config`` and every registered metric (``benchmark.metric_registry``).

    Returns a :class:`~salbench.benchmark.results.Result` with per-image values (``per_image``),
    aggregates (``summary``), accuracies, timings, the resolved config and package versions
    (``Result.to_dict()`` is its JSON form). The stages are :func:`score_batch` per batch,
    :func:`measure_accuracy` and :func:`aggregate`; aggregation follows PROTOCOL §3: Gini mean;
    SSIM mean over kept images per σ (+ kept fraction); log10 of the nan-mean ROS (+ NaN
    fraction); ROAD curve = accuracy per level, AOPC.

    The model is scored on ``config.device`` in eval mode with frozen parameters; afterwards the
    caller's ``model`` is back on its device, in its train/eval modes, with its ``requires_grad`` flags.

    Under ``torch.distributed`` (an initialised group of K > 1 processes, e.g. ``torchrun`` or
    ``salbench --procs K``; ``benchmark.distributed``) every rank calls this with the same arguments:
    rank r scores the scoring batches r, r + K, ... (the same batch boundaries and random draws as one
    process) and its share of the accuracy batches; the per-image values are gathered, and every rank
    returns the same result, equal in every per-image value to a single-process run on the same device
    type. A bare ``device="cuda"`` means ``cuda:<LOCAL_RANK>`` there.

    ``dtype`` (default: the images' float32) casts the images, and the caller casts the model: the
    float64 re-score of the numerical band (PROTOCOL §8.4, ``benchmark.bands``). It is not part of
    the config: a float64 score is a band measurement, never a stored result.

    ``deadline`` (a :class:`benchmark.progress.Deadline`, ``--time-limit``): checked after every stage;
    past it :class:`~salbench.benchmark.progress.TimeLimitExceeded` says how far the run got (nothing
    is written by this function in any case). Under torch.distributed it is not checked (a rank that
    stopped alone would leave the others waiting).
    """
    cfg = resolve_config(config, imageset.dataset)
    device = D.device_for(cfg.device)
    progress = progress and D.is_main()
    state = _ModelState.capture(model)
    try:
        model = model.to(device).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return _score(model, imageset, cfg, device, test_split=test_split, progress=progress, dtype=dtype,
                      deadline=None if D.active() else deadline)
    finally:
        state.restore(model)


@dataclass
class _ModelState:
    """What ``score`` changes on the caller's model (device, train/eval mode of every module,
    ``requires_grad`` of every parameter), to put back afterwards."""

    device: torch.device | None
    training: list[bool]
    requires_grad: list[bool]

    @classmethod
    def capture(cls, model: nn.Module) -> "_ModelState":
        first = next(itertools.chain(model.parameters(), model.buffers()), None)
        return cls(device=None if first is None else first.device,
                   training=[m.training for m in model.modules()],
                   requires_grad=[p.requires_grad for p in model.parameters()])

    def restore(self, model: nn.Module) -> None:
        if self.device is not None:
            model.to(self.device)
        for m, t in zip(model.modules(), self.training):
            m.training = t
        for p, r in zip(model.parameters(), self.requires_grad):
            p.requires_grad_(r)


def _score(model: nn.Module, imageset, cfg: ScoreConfig, device: torch.device, *, test_split: Split | None,
           progress: bool, dtype: torch.dtype | None = None, deadline=None) -> Result:
    n = len(imageset)
    t_start = time.perf_counter()
    timer = _Timer(device)
    specs = [get_metric(k) for k in cfg.metrics]
    explainers = {m: explainer_for(m, cfg) for m in cfg.methods}
    nb = math.ceil(n / cfg.batch_size)
    mine = set(D.my_batches(nb))  # all batches in one process; r, r + K, ... on rank r of K
    # one tick per (batch, method, stage): an IG stage at CIFAR/ImageNette size takes minutes on a CPU
    stages = ("attribution", *(s.name for s in specs))
    total = len(mine) * len(cfg.methods) * len(stages)
    # the bar counts stages; the time left comes from the stage cost model (benchmark.progress), not
    # from tqdm's stages-per-second (stages differ in cost by orders of magnitude)
    bar = tqdm(total=total, desc=f"scoring {imageset.dataset}", disable=not progress, leave=False, unit="stage",
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} stages [{elapsed}{postfix}]")
    clock = StageClock(
        grid=[(min(cfg.batch_size, n - b * cfg.batch_size), m, st) for b in sorted(mine) for m in cfg.methods
              for st in stages],
        work={(m, st): stage_work(st, method=m, ig_steps=cfg.ig_steps, n_sigmas=len(cfg.sigmas),
                                  ros_samples=cfg.ros_samples, road_levels=len(cfg.road_percentages))
              for m in cfg.methods for st in stages})
    seen: dict[str, float] = {}
    parts: dict[int, tuple] = {}  # first image of a batch -> (correct, {method: {metric: {field: values}}})
    for start, x, y in imageset.batches(cfg.batch_size):
        b = start // cfg.batch_size
        if b not in mine:
            continue

        def step(m: str, stage: str) -> None:
            if clock.forward_per_image is None:
                clock.forward(timer.seconds.get("forward", 0.0), len(x))
            key = f"{m}/{stage}"
            clock.done(timer.seconds.get(key, 0.0) - seen.get(key, 0.0))
            seen[key] = timer.seconds.get(key, 0.0)
            bar.set_postfix_str(f"batch {b + 1}/{nb} {m} {stage} done, about {format_seconds(clock.remaining())} left",
                                refresh=False)
            bar.update(1)
            if deadline is not None:
                deadline.check(f"after {clock.position} of {total} scoring stages (batch {b + 1}/{nb}, {m} {stage})")

        parts[start] = score_batch(model, x.to(device, dtype), y.to(device), cfg, explainers, specs, start=start,
                                   timer=timer, on_stage=step)
    bar.close()
    if D.active():  # every rank gets every batch's values (each batch scored by exactly one rank)
        for shard in D.all_gather_object(parts):
            parts.update(shard)
    order = sorted(parts)
    correct = torch.cat([parts[s][0] for s in order])
    values = {m: {spec.name: stack_batches([parts[s][1][m][spec.name] for s in order], spec) for spec in specs}
              for m in cfg.methods}
    metrics_seconds = time.perf_counter() - t_start

    acc = {"on_set": float(correct.float().mean())}
    if deadline is not None:
        deadline.check(f"after all {total} scoring stages, before the accuracy passes")
    if cfg.accuracy and test_split is not None:
        acc.update(measure_accuracy(model, test_split, imageset.dataset, timer=timer, progress=progress))
    timings = timer.gathered()
    summary, per_image = aggregate(values, correct, cfg, specs)
    timings = {k: round(v, 3) for k, v in timings.items()}
    timings["metrics_total"] = round(metrics_seconds, 3)
    timings["total"] = round(time.perf_counter() - t_start, 3)
    if D.active():
        timings["processes"] = D.world_size()
    from salbench.benchmark.provenance import computed_by_now

    vers = versions()
    return Result(
        protocol=P.PROTOCOL_VERSION, dataset=imageset.dataset,
        imageset={"images_sha256": imageset.images_sha256, "n": n, "split": imageset.split},
        config=cfg.to_dict(), versions=vers, computed_by=computed_by_now(vers),
        device=str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        accuracy=acc, summary=summary, per_image=per_image, timings=timings)


class _Timer:
    """Seconds per stage key, summed; CUDA work is synchronised before a stage is timed."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds = device, {}

    def tick(self, key: str, t0: float) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - t0

    def gathered(self) -> dict[str, float]:
        """Stage times; under torch.distributed summed over the ranks (process-seconds)."""
        if not D.active():
            return dict(self.seconds)
        out: dict[str, float] = {}
        for t in D.all_gather_object(dict(self.seconds)):
            for key, v in t.items():
                out[key] = out.get(key, 0.0) + v
        return out


def score_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: ScoreConfig, explainers: dict,
                specs: list[MetricSpec], *, start: int, timer: _Timer | None = None,
                on_stage: Callable[[str, str], None] | None = None) -> tuple[torch.Tensor, dict]:
    """Score one batch (images ``start``, ``start + 1``, ... of the set) with every method and metric.

    Per method the clean maps are computed once and every metric re-uses them (and the clean
    logits); each metric draws from its own generator, seeded by (seed, method, metric, ``start``).
    Returns (correct (B,) bool on CPU, {method: {metric: {field: per-image values on CPU}}}).
    """
    device = x.device
    timer = timer or _Timer(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        logits = model(x)
    correct = (logits.argmax(1) == y).cpu()
    timer.tick("forward", t0)
    out = {}
    for m in cfg.methods:
        ex = explainers[m]
        t0 = time.perf_counter()
        maps = ex(model, x, y)
        timer.tick(f"{m}/attribution", t0)
        if on_stage:
            on_stage(m, "attribution")
        batch = Batch(model=model, x=x, y=y, explainer=ex, maps=maps, logits=logits, config=cfg,
                      generator=lambda key, m=m: _gen(cfg, device, m, key, start))
        out[m] = {}
        for spec in specs:
            t0 = time.perf_counter()
            out[m][spec.name] = spec.compute(batch)
            timer.tick(f"{m}/{spec.name}", t0)
            if on_stage:
                on_stage(m, spec.name)
    return correct, out


def measure_accuracy(model: nn.Module, test_split: Split, dataset: str, *, timer: _Timer | None = None,
                     progress: bool = False) -> dict:
    """Natural accuracy on the whole test split and robust accuracy (the dataset's attack, PROTOCOL §3)
    on its first 1000 images; under torch.distributed each rank evaluates its share of the same batches
    (natural_accuracy's 1000, robust_accuracy's 500) and the counts are summed."""
    timer = timer or _Timer(torch.device("cpu"))
    out = {}
    t0 = time.perf_counter()
    nat_bs = 1000
    nat = natural_correct(model, test_split.images, test_split.labels, batch_size=nat_bs,
                          batches=D.my_batches(math.ceil(len(test_split) / nat_bs)))
    out["natural"] = D.all_sum(nat) / max(len(test_split), 1)
    timer.tick("natural_accuracy", t0)
    t0 = time.perf_counter()
    k = min(ROBUST_EVAL_IMAGES, len(test_split))
    rob = ROBUST_EVAL[dataset]
    rob_bs = 500
    rc = robust_correct(model, test_split.images[:k], test_split.labels[:k], **rob, batch_size=rob_bs,
                        progress=progress, batches=D.my_batches(math.ceil(k / rob_bs)))
    out["robust"] = D.all_sum(rc) / max(k, 1)
    out["robust_protocol"] = {**rob, "images": f"first {k} test images", "random_start": True}
    timer.tick("robust_accuracy", t0)
    return out


def aggregate(values: dict, correct: torch.Tensor, cfg: ScoreConfig, specs: list[MetricSpec]) -> tuple[dict, dict]:
    """Per-image values of the whole set -> (``summary``, ``per_image``) of a result: each metric's
    summary entries (``MetricSpec.summarize``, PROTOCOL §3) and stored per-image block (``encode``)."""
    summary, per_image = {}, {"correct": correct.int().tolist()}
    for m in cfg.methods:
        summary[m], per_image[m] = {}, {}
        for spec in specs:
            summary[m].update(spec.summarize(values[m][spec.name], cfg))
            per_image[m].update(spec.encode(values[m][spec.name]))
    return summary, per_image
