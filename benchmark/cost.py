"""What a full scoring will cost on this machine, said before anything is scored (issue 30, item 2).

Three parts, each usable alone:

- :func:`profile` runs the model on one and on two random images of the dataset's input shape (a
  forward pass without gradients, then a forward and backward pass with respect to the input, the
  parameters frozen as scoring freezes them) under ``torch.utils.flop_counter.FlopCounterMode`` and a
  ``TorchDispatchMode`` that records every ATen operator's output. The difference between the two
  runs is the per-image part: FLOPs of one forward and of one forward+backward per image, the bytes
  of every tensor a pass makes, and the largest single tensor at any batch size (each output's size
  is ``fixed + batch * per_image``). It works for any ``nn.Module``, the ``.pt2``
  :class:`~salbench.model_zoo.exported.ExportedModule` included (it runs ATen operators). Matrix
  products, convolutions and attention are counted; elementwise ops, pooling and the SmoothBlock's C
  kernel are not (their time is in the per-pass constant of the calibration).
- :func:`scoring_work` counts, from the resolved :class:`~salbench.benchmark.scoring.ScoreConfig`,
  the image-passes of a full scoring (the same stage model as ``benchmark.progress.stage_work``):
  per image and method the attribution (VG one forward+backward, IG ``ig_steps``), SSIM (one explainer
  call per σ, plus a forward for an explainer that does not start at the input), ROS (one explainer
  call and forward per sample), ROAD (a forward and an imputation per removal level and tie rule);
  one clean forward per image; the natural accuracy (a forward per test image) and the robust accuracy
  (PGD with the dataset's steps on the first 1000 test images). The numerical band re-scores twice
  without accuracies (one-ulp in float32, float64 where the model can be cast).
- :func:`calibrate` times, once per machine, what one image-pass costs: the forward pass and the IG
  step (the scoring's own explainer) of the zoo's LeNet (FMNIST, 250 images, the scoring batch) and
  ResNet-8 (CIFAR-10, 64 images), in float32 and float64 (random weights of the zoo architectures:
  the time does not depend on the values), and a ROAD imputation per image and level at each input
  shape it is asked about. On CPU a pass is timed as the process's CPU time per torch thread (at most
  its wall time), so other jobs on the same cores do not enter the calibration. Per pass kind (forward,
  forward+backward) it fits
  ``seconds per image = a + b * FLOPs`` (non-negative least squares through the two networks); float64
  is the float32 time times the nets' float64/float32 ratio (interpolated in log FLOPs). The
  result is cached as JSON in ``$SALBENCH_CACHE_DIR`` (default ``~/.cache/salbench``), keyed by the
  CPU model, ISA, torch and oneDNN versions, native kernels, torch thread count and device;
  ``salbench score/leaderboard --recalibrate`` measures again.

:func:`estimate` puts them together (:class:`Estimate`: seconds of the scoring and of the band,
peak tensor and working memory) and :meth:`Estimate.format` is the one line the harness prints before
scoring; without ``--time-limit`` the run's budget is :meth:`Estimate.time_limit`,
``max(4 x estimate, estimate + 15 min)``, so no run the estimate describes is stopped by the default.

The estimate is of a run with the cores to itself: where other jobs share them the run takes longer
(the line says so when the load average exceeds the cores), which the default time limit's margin
covers; docs/cost-estimate.md has the estimate-vs-measured table of the zoo and the README's example
program on a busy 2-core machine.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from salbench.benchmark.progress import format_seconds

CALIBRATION_VERSION = 3
CACHE_ENV = "SALBENCH_CACHE_DIR"
CACHE_FILE = "calibration.json"
IG_CALIBRATION_STEPS = 2  # IG steps per timed call (the time is per image and step)
TIME_LIMIT_FACTOR = 4.0  # the default --time-limit: max(4 x estimate, estimate + 15 min)
TIME_LIMIT_SLACK_S = 15 * 60.0
ROAD_TIE_RULES = 2  # the ROAD headline (random ties) and the stable-ties variant: an upper bound
# (road_curves re-computes only the pairs where the two orders remove different pixels)
# the calibration networks: (name, arch, dataset, input shape, images per timed call)
CALIBRATION_NETS = (("lenet", "lenet", "fmnist", (1, 28, 28), 250),
                    ("resnet8", "resnet8", "cifar10", (3, 32, 32), 64))
KINDS = ("forward", "backward")  # a forward pass; a forward and backward pass w.r.t. the input
DTYPES = ("float32", "float64")


# ----------------------------------------------------------------------------- profile
@dataclass(frozen=True)
class Profile:
    """Per-image costs of one model at one input shape (:func:`profile`).

    ``forward_flops`` / ``backward_flops``: FLOPs (multiply-add = 2) of one image's forward pass and
    of its forward and backward pass w.r.t. the input. ``*_bytes``: bytes of every tensor the pass
    makes (views excluded), per image and fixed. ``tensors``: ``(fixed, per_image)`` bytes of each
    tensor made, for :meth:`peak_tensor_bytes`.
    """

    input_shape: tuple[int, ...]
    forward_flops: float
    backward_flops: float
    forward_bytes: float
    backward_bytes: float
    fixed_bytes: float
    param_bytes: int
    forward_ops: int
    backward_ops: int
    tensors: tuple[tuple[float, float], ...]
    forward_tensors: tuple[tuple[float, float], ...]

    def peak_tensor_bytes(self, batch: int, *, grad: bool = True) -> int:
        """The largest single tensor a pass over ``batch`` images makes."""
        pairs = self.tensors if grad else self.forward_tensors
        return int(max((f + batch * p for f, p in pairs), default=0))

    def working_bytes(self, batch: int, *, grad: bool = True) -> int:
        """What one pass over ``batch`` images may hold at once: every tensor it makes (a forward and
        backward pass, or a forward pass without gradients)."""
        return int(self.fixed_bytes + batch * (self.backward_bytes if grad else self.forward_bytes))


class _Recorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the bytes of every ATen operator's tensor outputs (views and in-place results excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        schema = getattr(func, "_schema", None)
        aliased = schema is not None and any(r.alias_info is not None for r in schema.returns)
        if not aliased:
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.sizes.append(t.numel() * t.element_size())
        return out


def _run(model: nn.Module, shape: tuple[int, ...], batch: int, device, dtype) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand((batch, *shape), generator=torch.Generator().manual_seed(batch), dtype=dtype).to(device)
    out: dict = {}
    with torch.no_grad(), FlopCounterMode(display=False) as fc, _Recorder() as rec:
        model(x)
    out["forward"] = (fc.get_total_flops(), rec.sizes, rec.ops)
    xg = x.clone().requires_grad_(True)
    # .backward() on the input leaf (FlopCounterMode's module hooks refuse torch.autograd.grad); the
    # parameters are frozen, so the backward pass computes input gradients only, as the explainers do
    with FlopCounterMode(display=False) as fc, _Recorder() as rec:
        logits = model(xg)
        logits.reshape(batch, -1)[:, 0].sum().backward()
    out["backward"] = (fc.get_total_flops(), rec.sizes, rec.ops)
    return out


def _pairs(one: list[int], two: list[int]) -> tuple[tuple[float, float], ...]:
    """``(fixed, per_image)`` of each tensor from its sizes at batch 1 and 2 (same operators in the
    same order); at batch 2 alone when the two runs differ."""
    if len(one) != len(two):
        return tuple((0.0, b / 2) for b in two)
    return tuple((float(max(0, 2 * a - b)), float(max(0, b - a))) for a, b in zip(one, two))


def profile(model: nn.Module, input_shape: tuple[int, ...], *, device=None) -> Profile:
    """FLOPs and tensor sizes of ``model`` on ``input_shape`` images (C, H, W), per image (see the module
    docstring). The model is run in eval mode with frozen parameters on its own device (or ``device``),
    on random images in [0, 1]; afterwards it is as it was (device, modes, ``requires_grad`` flags)."""
    from salbench.benchmark.scoring import _ModelState

    shape = tuple(int(s) for s in input_shape)
    state = _ModelState.capture(model)
    first = next((p for p in [*model.parameters(), *model.buffers()] if p.is_floating_point()), None)
    dev = torch.device(device) if device is not None else (first.device if first is not None else torch.device("cpu"))
    dtype = first.dtype if first is not None else torch.float32
    try:
        model.to(dev).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        r1, r2 = _run(model, shape, 1, dev, dtype), _run(model, shape, 2, dev, dtype)
    finally:
        state.restore(model)
    ff = max(0.0, r2["forward"][0] - r1["forward"][0])
    fb = max(0.0, r2["backward"][0] - r1["backward"][0])
    fwd_bytes1, fwd_bytes2 = sum(r1["forward"][1]), sum(r2["forward"][1])
    b1, b2 = sum(r1["backward"][1]), sum(r2["backward"][1])
    params = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return Profile(input_shape=shape, forward_flops=float(ff), backward_flops=float(fb),
                   forward_bytes=float(max(0, fwd_bytes2 - fwd_bytes1)), backward_bytes=float(max(0, b2 - b1)),
                   fixed_bytes=float(max(0, 2 * b1 - b2)), param_bytes=int(params),
                   forward_ops=r1["forward"][2], backward_ops=r1["backward"][2],
                   tensors=_pairs(r1["backward"][1], r2["backward"][1]),
                   forward_tensors=_pairs(r1["forward"][1], r2["forward"][1]))


# ----------------------------------------------------------------------------- work
@dataclass(frozen=True)
class Work:
    """Image-passes of a run: forward passes, forward+backward passes, ROAD imputations (image x level)."""

    forward: float = 0.0
    backward: float = 0.0
    imputation: float = 0.0

    def __add__(self, other: "Work") -> "Work":
        return Work(self.forward + other.forward, self.backward + other.backward, self.imputation + other.imputation)

    def scaled(self, k: float) -> "Work":
        return Work(self.forward * k, self.backward * k, self.imputation * k)


def _explainer_passes(method: str, cfg) -> tuple[float, bool]:
    """(forward+backward passes of one call of the method's explainer per image, whether a metric needs a
    forward pass of its own before it: an explainer whose first model call is not at the input)."""
    if method == "IG":
        return float(cfg.ig_steps), True
    if method == "VG":
        return 1.0, False
    return 1.0, True  # another registered explainer: one gradient per call is the usual case


def scoring_work(config, dataset: str, *, n_images: int, n_test: int | None = None,
                 accuracy: bool | None = None) -> Work:
    """The image-passes of a full scoring of ``n_images`` set images under ``config`` (resolved for
    ``dataset``), with the accuracy passes over ``n_test`` test images when ``accuracy`` (default:
    ``config.accuracy``) and ``n_test``."""
    from salbench.benchmark.scoring import ROBUST_EVAL, ROBUST_EVAL_IMAGES, resolve_config

    cfg = resolve_config(config, dataset)
    per = Work(forward=1.0)  # the clean logits of every batch
    for m in cfg.methods:
        e, own_forward = _explainer_passes(m, cfg)
        per += Work(backward=e)  # the clean maps
        for name in cfg.metrics:
            if name == "gini":
                continue
            if name == "ssim":
                k = len(cfg.sigmas)
                per += Work(backward=k * e, forward=k if own_forward else 0.0)
            elif name == "ros":
                k = cfg.ros_samples
                per += Work(backward=k * e, forward=k if own_forward else 0.0)
            elif name == "road":
                k = ROAD_TIE_RULES * len(cfg.road_percentages)
                per += Work(forward=k, imputation=k)
            else:  # a registered metric: one forward pass per image (benchmark.progress.stage_work)
                per += Work(forward=1.0)
    work = per.scaled(n_images)
    if (cfg.accuracy if accuracy is None else accuracy) and n_test:
        k = min(ROBUST_EVAL_IMAGES, n_test)
        steps = ROBUST_EVAL[dataset]["steps"]
        work += Work(forward=n_test + k, backward=k * steps)
    return work


# ----------------------------------------------------------------------------- calibration
def cache_dir() -> Path:
    """Where the calibration is cached: ``$SALBENCH_CACHE_DIR``, else ``~/.cache/salbench``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "salbench"


def machine_key(device: str = "cpu") -> dict:
    """What the calibration is valid for: the CPU, its ISA, torch and oneDNN versions, whether the
    native kernels run, the torch thread count and the device (``scoring.platform_info``)."""
    from salbench.benchmark.scoring import platform_info

    info = platform_info()
    dev = torch.device(device)
    key = {k: info.get(k) for k in ("cpu", "machine", "isa", "torch", "onednn", "native_kernels")}
    key.update(threads=torch.get_num_threads(), device=dev.type, version=CALIBRATION_VERSION)
    if dev.type == "cuda":
        key["gpu"] = torch.cuda.get_device_name(dev)
    return key


def _key_id(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """The median over ``reps`` calls of the seconds ``fn`` takes with the CPU to itself: on CPU the
    process's CPU time per torch thread (``min(wall, cpu / threads)``: other jobs on the same cores slow
    the wall clock, not the work), on a GPU the wall clock."""
    fn()  # warm-up (allocator, oneDNN primitives, lazy native libraries)
    _sync(device)
    threads = max(1, torch.get_num_threads())
    ts = []
    for _ in range(reps):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        ts.append(wall if device.type == "cuda" else min(wall, cpu / threads))
    return statistics.median(ts)


def _time_pass(model: nn.Module, shape: tuple[int, ...], batch: int, kind: str, dtype: str, device: str) -> float:
    """Seconds per image of one pass of ``kind`` over a ``batch`` of ``shape`` images: a forward pass
    without gradients, or one step of the scoring's IG explainer (a forward+backward pass)."""
    from salbench.benchmark.scoring import ScoreConfig, explainer_for

    dev = torch.device(device)
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.rand((batch, *shape), generator=g, dtype=dt).to(dev)
    y = torch.randint(0, 10, (batch,), generator=g).to(dev)
    if kind == "forward":
        def fn():
            with torch.no_grad():
                return model(x)
        return _median_seconds(fn, dev, reps=3) / batch
    ig = explainer_for("IG", ScoreConfig(ig_steps=IG_CALIBRATION_STEPS, batch_size=batch))
    reps = 3 if dtype == "float32" else 1
    return _median_seconds(lambda: ig(model, x, y), dev, reps=reps) / (batch * IG_CALIBRATION_STEPS)


def _time_imputation(shape: tuple[int, ...], device: str) -> float:
    """Seconds per image and removal level of the ROAD imputation (``metrics.road_curves`` with a
    linear model, one tie rule, the protocol's levels) at ``shape``."""
    from salbench import metrics
    from salbench.metrics import protocol as P

    dev = torch.device(device)
    c, h, w = shape
    n = max(1, min(16, (1 << 17) // (c * h * w)))
    g = torch.Generator().manual_seed(0)
    x = torch.rand((n, c, h, w), generator=g).to(dev)
    maps = torch.rand((n, h, w), generator=g).to(dev)
    y = torch.zeros(n, dtype=torch.long, device=dev)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, 10)).to(dev).eval()
    for p in lin.parameters():
        p.requires_grad_(False)

    def fn():
        return metrics.road_curves(lin, x, y, maps, percentages=P.ROAD_PERCENTAGES, noise=P.ROAD_NOISE,
                                   generator=torch.Generator(device=dev).manual_seed(0), ties=("random",))

    return _median_seconds(fn, dev, reps=1) / (n * len(P.ROAD_PERCENTAGES))


def _fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Non-negative least squares ``t = a + b * flops`` through ``(flops, seconds)`` points."""
    if not points:
        return 0.0, 0.0
    xs, ts = [p[0] for p in points], [p[1] for p in points]
    n = len(points)
    mx, mt = sum(xs) / n, sum(ts) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx > 0:
        b = sum((x - mx) * (t - mt) for x, t in zip(xs, ts)) / sxx
        a = mt - b * mx
        if a >= 0 and b >= 0:
            return a, b
        if b < 0:
            return mt, 0.0
    # through the origin (a < 0, or a single FLOP count): t = b * flops, or a constant without FLOPs
    sx2 = sum(x * x for x in xs)
    return (0.0, sum(x * t for x, t in zip(xs, ts)) / sx2) if sx2 > 0 else (mt, 0.0)


@dataclass
class Calibration:
    """Seconds per image-pass on this machine (:func:`calibrate`)."""

    key: dict
    created: str
    load_average: float | None
    points: list[dict]  # {net, kind, dtype, flops, seconds}: the timed passes, seconds per image
    coef: dict  # {kind: [a, b]}: float32 seconds per image = a + b * FLOPs
    # {kind: [[flops, ratio], ...]}: float64 / float32 time of each calibration net, by the pass's FLOPs
    float64: dict = field(default_factory=dict)
    imputation: dict = field(default_factory=dict)  # "CxHxW" -> seconds per image and ROAD level
    seconds: float = 0.0  # time the calibration took

    def pass_seconds(self, kind: str, flops: float, dtype: str = "float32") -> float:
        a, b = self.coef[kind]
        t = a + b * flops
        return t * self.float64_ratio(kind, flops) if dtype == "float64" else t

    def float64_ratio(self, kind: str, flops: float) -> float:
        """float64 over float32 time of a pass of ``flops``: the calibration nets' ratios, interpolated in
        log FLOPs between them and held constant beyond them (the float64 line of two nets extrapolates
        badly to nets smaller than the LeNet, where float64 costs about what float32 does)."""
        pts = sorted((f, r) for f, r in self.float64.get(kind, []) if f > 0)
        if not pts:
            return 1.0
        if flops <= pts[0][0]:
            return pts[0][1]
        for (f0, r0), (f1, r1) in zip(pts, pts[1:]):
            if flops <= f1:
                w = math.log(flops / f0) / math.log(f1 / f0) if f1 > f0 else 1.0
                return r0 + w * (r1 - r0)
        return pts[-1][1]

    def imputation_seconds(self, shape: tuple[int, ...], device: str = "cpu") -> float:
        """Seconds of one ROAD imputation (image x level) at ``shape``: timed the first time a shape is
        asked for (well under a second up to 224x224) and cached with the calibration."""
        name = "x".join(map(str, shape))
        if name not in self.imputation:
            self.imputation[name] = _time_imputation(tuple(shape), device)
            _store(self)
        return self.imputation[name]

    def describe(self) -> str:
        c = self.coef
        return (f"forward {c['forward'][0] * 1e6:.0f} us + {c['forward'][1] * 1e12:.1f} ps/FLOP, forward+backward "
                f"{c['backward'][0] * 1e6:.0f} us + {c['backward'][1] * 1e12:.1f} ps/FLOP per image "
                f"({self.key.get('threads')} thread(s), calibrated {self.created}, load average {self.load_average})")


def _read_cache() -> dict:
    path = cache_dir() / CACHE_FILE
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        return doc if isinstance(doc, dict) and isinstance(doc.get("machines"), dict) else {"machines": {}}
    except (OSError, ValueError):
        return {"machines": {}}


def _store(cal: Calibration) -> None:
    doc = _read_cache()
    doc["version"] = CALIBRATION_VERSION
    doc["machines"][_key_id(cal.key)] = asdict(cal)
    d = cache_dir()
    try:
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{CACHE_FILE}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(doc, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, d / CACHE_FILE)
    except OSError:
        pass  # a read-only home: calibrated again next time, nothing else changes


def _cached(key: dict) -> Calibration | None:
    entry = _read_cache()["machines"].get(_key_id(key))
    if not isinstance(entry, dict) or entry.get("key") != key:
        return None
    try:
        return Calibration(**entry)
    except TypeError:
        return None


def calibrate(device: str = "cpu", *, force: bool = False, say: Callable[[str], None] | None = None) -> Calibration:
    """The calibration of this machine (:class:`Calibration`): from the cache when one matches
    :func:`machine_key`, else measured (a few seconds) and cached; ``force`` measures again."""
    key = machine_key(device)
    if not force:
        cal = _cached(key)
        if cal is not None:
            return cal
    if say:
        say("calibrating the cost estimate on this machine (once; a few seconds) ...")
    from salbench.model_zoo.architectures import build

    t0 = time.perf_counter()
    load = _load_average()
    points = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        nets = [(name, build(arch, dataset=ds).eval(), shape, n) for name, arch, ds, shape, n in CALIBRATION_NETS]
    for name, net, shape, n in nets:
        for p in net.parameters():
            p.requires_grad_(False)
        prof = profile(net, shape)
        for dtype in DTYPES:
            m = net.to(device) if dtype == "float32" else copy.deepcopy(net).double().to(device)
            # float64 runs only the IG step (and on fewer images): its ratio to float32 serves both kinds
            kinds = KINDS if dtype == "float32" else ("backward",)
            for kind in kinds:
                batch = n if dtype == "float32" else max(1, n // 4)
                s = _time_pass(m, shape, batch, kind, dtype, device)
                flops = prof.forward_flops if kind == "forward" else prof.backward_flops
                points.append({"net": name, "kind": kind, "dtype": dtype, "flops": flops, "seconds": s})
    coef = {kind: list(_fit_line([(p["flops"], p["seconds"]) for p in points
                                  if p["kind"] == kind and p["dtype"] == "float32"])) for kind in KINDS}
    float64: dict = {kind: [] for kind in KINDS}
    for p64 in (p for p in points if p["dtype"] == "float64"):
        p32 = next(p for p in points if p["net"] == p64["net"] and p["kind"] == "backward" and p["dtype"] == "float32")
        ratio = p64["seconds"] / p32["seconds"] if p32["seconds"] > 0 else 1.0
        for p in points:
            if p["net"] == p64["net"] and p["dtype"] == "float32":
                float64[p["kind"]].append([p["flops"], ratio])
    cal = Calibration(key=key, created=time.strftime("%Y-%m-%d %H:%M:%S"), load_average=load, points=points,
                      coef=coef, float64=float64, seconds=0.0)
    cal.imputation_seconds((1, 28, 28), device)  # the zoo's shapes, so the common estimates need no timing later
    cal.imputation_seconds((3, 32, 32), device)
    cal.seconds = round(time.perf_counter() - t0, 2)
    _store(cal)
    return cal


# ----------------------------------------------------------------------------- estimate
def _castable(model: nn.Module) -> bool:
    """Whether the band re-scores ``model`` in float64 too (``bands.float64_model`` is not None)."""
    from salbench.benchmark.bands import float64_model

    return float64_model(model) is not None


@dataclass(frozen=True)
class Estimate:
    """The estimated cost of scoring one model on this machine."""

    scoring_seconds: float  # the scoring with its accuracy passes (0 when only the band is to run)
    band_seconds: float  # the numerical band's re-scores (0 without a band)
    peak_tensor_bytes: int  # the largest single tensor any pass of the run makes
    memory_bytes: int  # working memory: every tensor of the largest pass + the data + the model copies
    forward_flops: float  # per image
    backward_flops: float  # forward+backward w.r.t. the input, per image
    work: Work
    band_work: Work
    float64: bool  # whether the band includes the float64 re-score
    calibration: dict  # key, created, load average of the calibration used
    load_average: float | None = None  # the 1-minute load average when estimated
    cores: int = 1  # the cores this process may run on

    @property
    def total_seconds(self) -> float:
        return self.scoring_seconds + self.band_seconds

    def time_limit(self) -> float:
        """The default ``--time-limit``: ``max(4 x estimate, estimate + 15 min)``, the estimate scaled up by
        how busy the cores are now (load average / cores, when above 1): the calibration measures CPU
        time, a run on shared cores takes that much longer in wall time, and no legit run may be stopped."""
        busy = max(1.0, (self.load_average or 0.0) / max(self.cores, 1))
        t = self.total_seconds * busy
        return max(TIME_LIMIT_FACTOR * t, t + TIME_LIMIT_SLACK_S)

    def format(self, time_limit: float | None = None) -> str:
        """One line: the estimate and the time limit it implies (``time_limit``: the one given, None for
        the default from this estimate, 0 or inf for none)."""
        parts = []
        if self.scoring_seconds:
            parts.append(f"~{format_seconds(self.scoring_seconds)} scoring")
        if self.band_seconds:
            parts.append(f"~{format_seconds(self.band_seconds)} band")
        if time_limit is None:
            limit = f"--time-limit defaults to {format_seconds(self.time_limit())}"
        elif not explicit_limit(time_limit):
            limit = "no time limit"
        else:
            limit = f"time limit {format_seconds(time_limit)} (--time-limit)"
        busy = ""
        if self.load_average is not None and self.load_average > self.cores:
            busy = (f" (with the cores to itself; they are busy now, load average {self.load_average:.1f} on "
                    f"{self.cores}: expect longer)")
        return (f"estimated cost on this machine: {' + '.join(parts) or 'nothing to run'}{busy}, peak tensor "
                f"{format_bytes(self.peak_tensor_bytes)}, ~{format_bytes(self.memory_bytes)} working memory, "
                f"{format_flops(self.forward_flops)} forward / {format_flops(self.backward_flops)} forward+backward "
                f"per image; {limit}")


def explicit_limit(time_limit: float | None) -> float | None:
    """A ``time_limit`` as a :class:`~salbench.benchmark.progress.Deadline` takes it: None stays None
    (the default, set from the estimate), 0 and infinity are no limit (None)."""
    if time_limit is None or time_limit <= 0 or math.isinf(time_limit):
        return None
    return float(time_limit)


def format_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 kB'``, ``12_000_000`` -> ``'12 MB'`` (decimal units)."""
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= k:
            v = n / k
            return f"{v:.1f} {unit}" if v < 10 else f"{v:.0f} {unit}"
    return f"{int(n)} B"


def format_flops(n: float) -> str:
    """``1_126_560`` -> ``'1.1 MFLOP'``."""
    for unit, k in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if n >= k:
            v = n / k
            return f"{v:.2g} {unit}" if v < 10 else f"{v:.0f} {unit}"
    return f"{int(n)} FLOP"


def work_seconds(work: Work, prof: Profile, cal: Calibration, *, dtype: str = "float32", device: str = "cpu") -> float:
    return (work.forward * cal.pass_seconds("forward", prof.forward_flops, dtype)
            + work.backward * cal.pass_seconds("backward", prof.backward_flops, dtype)
            + (work.imputation * cal.imputation_seconds(prof.input_shape, device) if work.imputation else 0.0))


def estimate(model: nn.Module, dataset: str, config=None, *, n_images: int = 1000, n_test: int | None = 10_000,
             score: bool = True, band: bool = True, float64: bool | None = None, processes: int = 1,
             calibration: Calibration | None = None, prof: Profile | None = None,
             say: Callable[[str], None] | None = None) -> Estimate:
    """The estimated cost of scoring ``model`` on ``dataset`` with ``config`` (default ``ScoreConfig()``):
    ``n_images`` set images, ``n_test`` test images for the accuracy passes (10,000 for FMNIST and
    CIFAR-10); the scoring when ``score``, the numerical band when ``band`` (float64 re-score when
    ``float64``, default: when the model can be cast, as ``bands.numerical_band`` decides); divided over
    ``processes`` (``--procs``). ``calibration``/``prof``: re-use ones already made."""
    from salbench.benchmark.scoring import ScoreConfig, resolve_config
    from salbench.model_zoo.datasets import get_spec

    cfg = resolve_config(config or ScoreConfig(), dataset)
    shape = tuple(get_spec(dataset).input_shape)
    cal = calibration or calibrate(cfg.device, say=say)
    prof = prof or profile(model, shape)
    if float64 is None:
        float64 = band and _castable(model)
    work = scoring_work(cfg, dataset, n_images=n_images, n_test=n_test) if score else Work()
    ulp = scoring_work(cfg, dataset, n_images=n_images, accuracy=False) if band else Work()
    t_score = work_seconds(work, prof, cal, device=cfg.device) if score else 0.0
    t_band = 0.0
    if band:
        t_band = work_seconds(ulp, prof, cal, device=cfg.device)
        if float64:
            t_band += work_seconds(ulp, prof, cal, dtype="float64", device=cfg.device)
    k = max(1, processes)
    # memory: the largest pass of the run (scoring batch, PGD batch of 500, natural-accuracy batch of
    # 1000 without gradients), the set and the test split (uint8), the model and the band's copies
    batches = [cfg.batch_size, 500] if score or band else [cfg.batch_size]
    nat = [1000] if score else []  # the natural-accuracy batch, without gradients
    peak = max([prof.peak_tensor_bytes(b) for b in batches] + [prof.peak_tensor_bytes(b, grad=False) for b in nat])
    passes = max([prof.working_bytes(b) for b in batches] + [prof.working_bytes(b, grad=False) for b in nat])
    pixels = math.prod(shape)
    data = (n_images + (n_test or 0)) * pixels + cfg.batch_size * pixels * 4 * (3 if float64 else 2)
    copies = 1 + (1 + (2 if float64 else 0) if band else 0)
    memory = passes + data + prof.param_bytes * copies
    return Estimate(scoring_seconds=t_score / k, band_seconds=t_band / k, peak_tensor_bytes=int(peak),
                    memory_bytes=int(memory), forward_flops=prof.forward_flops, backward_flops=prof.backward_flops,
                    work=work, band_work=ulp.scaled(2 if float64 else 1), float64=bool(float64),
                    calibration={"key": cal.key, "created": cal.created, "load_average": cal.load_average},
                    load_average=_load_average(), cores=_cores())


def plan(model: nn.Module, dataset: str, config, *, imageset=None, test_split=None, score: bool = True,
         band: bool = True, time_limit: float | None = None, say: Callable[[str], None] = lambda m: None,
         processes: int = 1) -> float | None:
    """What the harness runs before scoring a model: the estimate, said in one line (or one line saying why
    there is none), and the time limit of the run in seconds (None: no limit): ``time_limit`` when given
    (0 or inf: none), else :meth:`Estimate.time_limit`."""
    try:
        est = estimate(model, dataset, config, n_images=len(imageset) if imageset is not None else 1000,
                       n_test=len(test_split) if test_split is not None else 10_000, score=score, band=band,
                       processes=processes, say=say)
    except Exception as e:  # the estimate never stops a run: scoring reports a broken model itself
        say(f"no cost estimate ({type(e).__name__}: {str(e)[:200]}); "
            + ("no time limit" if explicit_limit(time_limit) is None else f"time limit {format_seconds(time_limit)}"))
        return explicit_limit(time_limit)
    say(est.format(time_limit))
    return est.time_limit() if time_limit is None else explicit_limit(time_limit)


__all__ = ["Calibration", "Estimate", "Profile", "Work", "cache_dir", "calibrate", "estimate", "explicit_limit",
           "format_bytes", "format_flops", "machine_key", "plan", "profile", "scoring_work", "work_seconds"]
