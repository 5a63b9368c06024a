"""Where the scoring time of one zoo model goes, and the floor the protocol sets (issue 13, item 2).

Scores one committed FMNIST zoo model on the committed 1000-image set (VG + IG, every metric, no
accuracy pass, default ``ScoreConfig``, one torch thread) and counts, with hooks on the model, every
image that goes through it: with gradients (forward + backward: an attribution) or without (forward
only: the kept checks of SSIM and ROS, ROAD's 20 levels, the clean logits). The floor is

    floor = n_fb * t_fb + n_f * t_f

with ``t_fb`` the model's raw forward + backward time per image (``torch.autograd.grad`` of the
target logits, at the batch IG uses: one integration step of the scoring batch) and ``t_f`` its raw
forward time per image (no grad, at ROAD's batch of about 1300 images), both measured in this run.
``n_fb`` / ``n_f`` are the passes the scoring made; they are the protocol's minimum (PROTOCOL §3: a
map of every kept noisy copy and of every sample of an image that is not yet NaN, a prediction of
every noisy copy and every ROAD level), except that VG attributes a noisy copy in the same pass that
classifies it, so VG's few flipped copies get a backward pass the protocol does not need (counted).
Everything else (SSIM arithmetic, ROAD's imputation solve, ROS norms, Python) is above the floor.

Run::

    .venv/bin/python benchmarks/scoring_floor.py [--model fmnist-lenet-G-paper-10ep] [--write-doc]

Prints a JSON report and a markdown table; ``--write-doc`` writes the "floor" section of
``docs/performance/scoring.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smoothing_step_table import write_section  # noqa: E402

DOC = Path(__file__).resolve().parent.parent / "docs" / "performance" / "scoring.md"


class PassCounter:
    """Forward hooks that count images per model call, with and without gradient tracking."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.fb = self.f = 0
        # a forward hook (not a pre-hook): a call that a probe stops before it runs is not counted
        self.handle = model.register_forward_hook(self._count)

    def _count(self, module, args, output) -> None:
        n = args[0].shape[0]
        if torch.is_grad_enabled() and args[0].requires_grad:
            self.fb += n
        else:
            self.f += n

    def close(self) -> None:
        self.handle.remove()


def _best(fn, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def raw_rates(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, fb_batch: int, f_batch: int) -> dict:
    """Per-image seconds of a raw forward + backward (batch ``fb_batch``) and forward (``f_batch``)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    xb = x[:fb_batch].clone().requires_grad_(True)
    yb = y[:fb_batch]

    def fb():
        for _ in range(8):
            torch.autograd.grad(model(xb).gather(1, yb[:, None]).sum(), xb)

    xf = x.repeat((f_batch + len(x) - 1) // len(x), 1, 1, 1)[:f_batch]

    def f():
        with torch.no_grad():
            for _ in range(2):
                model(xf)

    return {"t_fb": _best(fb, 5) / (8 * fb_batch), "t_f": _best(f, 5) / (2 * f_batch),
            "fb_batch": fb_batch, "f_batch": f_batch}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="fmnist-lenet-G-paper-10ep")
    ap.add_argument("--write-doc", action="store_true")
    ap.add_argument("--context", default="nothing else running",
                    help="what else ran on the machine, for the doc (e.g. 'two training runs on both cores')")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from salbench.benchmark.imagesets import load_imageset
    from salbench.benchmark.scoring import ScoreConfig, resolve_config, score
    from salbench.model_zoo import zoo

    imageset = load_imageset("fmnist")
    cfg = resolve_config(ScoreConfig(accuracy=False), "fmnist")
    model = zoo.load(args.model)
    x = imageset.images.float().div(255)
    y = imageset.labels
    load_before = os.getloadavg()
    # ROAD classifies about 1M pixel values per call: 66 images x 20 levels for FMNIST
    rates = raw_rates(model, x, y, fb_batch=cfg.batch_size, f_batch=66 * len(cfg.road_percentages))
    counter = PassCounter(model)
    t0 = time.perf_counter()
    res = score(model, imageset, cfg, progress=False).to_dict()
    wall = time.perf_counter() - t0
    counter.close()
    res = res.to_dict() if hasattr(res, "to_dict") else res
    rates_after = raw_rates(model, x, y, fb_batch=cfg.batch_size, f_batch=66 * len(cfg.road_percentages))
    # the raw rates before and after the scoring run: the floor uses their mean (load drifts)
    t_fb = (rates["t_fb"] + rates_after["t_fb"]) / 2
    t_f = (rates["t_f"] + rates_after["t_f"]) / 2
    floor = counter.fb * t_fb + counter.f * t_f
    timings = res["timings"]
    report = {
        "model": args.model, "images": len(imageset), "config": cfg.to_dict(), "threads": 1,
        "wall_s": wall, "timings": timings,
        "passes": {"forward_backward_images": counter.fb, "forward_only_images": counter.f},
        "raw": {"t_fb_us": t_fb * 1e6, "t_f_us": t_f * 1e6, "before": rates, "after": rates_after},
        "floor_s": floor, "floor_fb_s": counter.fb * t_fb, "floor_f_s": counter.f * t_f,
        "ratio_to_floor": wall / floor,
        "load_before": load_before, "load_after": os.getloadavg(),
    }
    print(json.dumps(report, indent=1))
    lines = [
        f"## Where the time goes, and the floor\n",
        f"`.venv/bin/python benchmarks/scoring_floor.py --model {args.model} --write-doc`: the full protocol "
        f"(VG + IG(50), 8 σ, 5 ROS samples, 20 ROAD levels) on the {len(imageset)}-image FMNIST set, scoring "
        f"batch {cfg.batch_size}, accuracy pass off, one torch thread. Load average {load_before[0]:.1f} before, "
        f"{report['load_after'][0]:.1f} after ({args.context}); the ratio to the floor compares times measured "
        f"in the same run.\n",
        "| stage | seconds |", "|---|---|",
        *[f"| {k} | {v:.2f} |" for k, v in timings.items() if k not in ("metrics_total", "total")],
        f"| **total (wall)** | **{wall:.2f}** |", "",
        f"Images through the model: **{counter.fb:,}** with a backward pass (attributions: IG's 50 path points "
        f"per map, VG's one), **{counter.f:,}** forward only (the clean logits, the kept checks of SSIM "
        f"and ROS, ROAD's 20 levels). The model's raw rate in the same run: forward + backward "
        f"{t_fb * 1e6:.1f} µs per image (batch {cfg.batch_size}), forward {t_f * 1e6:.1f} µs per image (batch "
        f"{rates['f_batch']}).", "",
        f"**Floor** = {counter.fb:,} x {t_fb * 1e6:.1f} µs + {counter.f:,} x {t_f * 1e6:.1f} µs = "
        f"{counter.fb * t_fb:.1f} s + {counter.f * t_f:.1f} s = **{floor:.1f} s**; scoring took {wall:.1f} s: "
        f"**{wall / floor:.2f}x the floor** (target 1.3x).",
    ]
    md = "\n".join(lines)
    print(md)
    if args.write_doc:
        write_section(DOC, "floor", md)
        print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
