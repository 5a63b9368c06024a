"""Scoring one FMNIST zoo model (VG + IG, every metric, 1000 images, no cache): SalBench's
``salbench.benchmark.scoring.score`` vs the quantus-based path of the authors' evaluation code, in one run.

The reference path, per attribution method: ``explain`` on the clean images; ``quantus.Sparseness``;
for each of the 8 noise levels an ``explain`` of the noisy images and a per-pair skimage SSIM;
``quantus.RelativeOutputStability(nr_samples=5)`` (explaining every perturbed sample);
``quantus.ROAD`` (20 levels). Both sides use the same explainers (VG; IG with 50 steps, as
PROTOCOL §2 prescribes) so the ratio measures the metric machinery, not a different IG.
The reference is timed on 100 images and scaled to 1000 (it costs ~0.25 s per image).

Run: ``make bench`` (or ``.venv/bin/python -m pytest benchmarks/test_harness_speed.py -o addopts= --benchmark-only -s``).
"""

from __future__ import annotations

import functools
import time
import warnings

import numpy as np
import pytest
import torch

quantus = pytest.importorskip("quantus")
from skimage.metrics import structural_similarity  # noqa: E402

from salbench import metrics  # noqa: E402
from salbench.metrics.protocol import ROAD_NOISE, ROAD_PERCENTAGES, SSIM_SIGMAS  # noqa: E402

N_REF = 100


def _imageset(x, y):
    from salbench.benchmark.imagesets import ImageSet

    imgs = (x * 255).round().to(torch.uint8)
    return ImageSet("fmnist", "test", torch.arange(len(y)), y, imgs, {}, "benchmark")


def _np_explainer(fn):
    def explain(model, inputs, targets, **kwargs):
        return fn(model, torch.as_tensor(inputs), torch.as_tensor(targets)).detach().numpy()

    return explain


def quantus_path(model, x, y, explainers) -> None:
    """The authors' per-method evaluation through quantus + skimage (see the module docstring)."""
    g = torch.Generator().manual_seed(0)
    xn, yn = x.numpy(), y.numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, fn in explainers.items():
            ex = _np_explainer(fn)
            a = ex(model, xn, yn)
            quantus.Sparseness(disable_warnings=True)(model=model, x_batch=xn, y_batch=yn, a_batch=a[:, None],
                                                      device="cpu")
            for s in SSIM_SIGMAS:
                xs = (x + s * torch.randn(x.shape, generator=g)).clamp(0, 1)
                with torch.no_grad():
                    keep = (model(xs).argmax(1) == y).numpy()
                an = ex(model, xs.numpy(), yn)
                [structural_similarity(a[i], an[i], data_range=2, win_size=5) for i in np.flatnonzero(keep)]
            quantus.RelativeOutputStability(nr_samples=5, disable_warnings=True)(
                model=model, x_batch=xn, y_batch=yn, a_batch=a[:, None], explain_func=ex, softmax=False,
                device="cpu", batch_size=len(yn))
            quantus.ROAD(percentages=list(ROAD_PERCENTAGES), noise=ROAD_NOISE, abs=False, normalise=False,
                         disable_warnings=True)(model=model, x_batch=xn, y_batch=yn, a_batch=a[:, None],
                                                device="cpu", batch_size=len(yn), channel_first=True)


def test_scoring_vs_quantus_path(benchmark, record, lenet, fmnist):
    from salbench.benchmark.scoring import ScoreConfig, score

    x, y = fmnist
    s = _imageset(x, y)
    cfg = ScoreConfig(accuracy=False)
    times = []

    def ours():
        t0 = time.perf_counter()
        score(lenet, s, cfg, progress=False)
        times.append(time.perf_counter() - t0)

    benchmark.pedantic(ours, rounds=1, iterations=1)
    explainers = {"VG": metrics.vanilla_gradient,
                  "IG": functools.partial(metrics.integrated_gradients, n_steps=50)}
    t0 = time.perf_counter()
    quantus_path(lenet, x[:N_REF], y[:N_REF], explainers)
    ref = (time.perf_counter() - t0) * len(y) / N_REF
    record(benchmark, "score one FMNIST model (VG+IG, 1000 images) vs quantus path", min(times), ref, 5.0,
           reference_note=f"quantus path timed on {N_REF} images, scaled x{len(y) // N_REF}")
