"""Scoring and PGD-training throughput at CIFAR-10 (WRN-28-10) and ImageNette (ResNet-18, 224)
scale: a prepared script for a GPU machine (under 10 minutes on one H100-class card).

    python benchmarks/gpu_throughput.py --device cuda --out gpu_throughput.json
    python benchmarks/gpu_throughput.py --device cpu --smoke      # seconds, tiny sizes, any machine

Prints one line per measurement (images/s per metric, PGD training steps/s) and writes JSON.
Inputs are random images with random labels: throughput does not depend on the weights.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import sys
import time

import torch
import torch.nn.functional as F

from salbench import metrics
from salbench.model_zoo.architectures import build
from salbench.model_zoo.attacks import pgd_linf


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats=1):
    fn()  # warm-up (cudnn autotune, allocator)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / repeats


def scoring_throughput(arch, dataset, shape, batch, device, ig_steps, ig_internal):
    model = build(arch, dataset=dataset, smoothing={"filter": "gaussian", "placement": 1}).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(batch, *shape, device=device, generator=g)
    y = torch.randint(0, 10, (batch,), device=device, generator=g)
    vg = metrics.vanilla_gradient
    ig = functools.partial(metrics.integrated_gradients, n_steps=ig_steps, internal_batch_size=ig_internal)
    maps = vg(model, x, y)
    out = {}
    with torch.no_grad():
        out["forward"] = batch / timed(lambda: model(x), device, 3)
    out["VG"] = batch / timed(lambda: vg(model, x, y), device, 3)
    out[f"IG{ig_steps}"] = batch / timed(lambda: ig(model, x, y), device)
    out["gini"] = batch / timed(lambda: metrics.gini_index(maps), device, 3)
    out["ssim_8sigma_VG"] = batch / timed(lambda: metrics.ssim_under_noise(
        model, x, y, vg, generator=torch.Generator(device=device).manual_seed(1), maps=maps), device)
    out["ros_5_VG"] = batch / timed(lambda: metrics.relative_output_stability(
        model, x, y, vg, generator=torch.Generator(device=device).manual_seed(2), maps=maps), device)
    out["road_20_levels"] = batch / timed(lambda: metrics.road_curve(
        model, x, y, maps, generator=torch.Generator(device=device).manual_seed(3)), device)
    return out


def pgd_training(arch, dataset, shape, batch, device, steps, eps, alpha, attack_steps):
    model = build(arch, dataset=dataset, smoothing={"filter": "gaussian", "placement": 1}).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(batch, *shape, device=device, generator=g)
    y = torch.randint(0, 10, (batch,), device=device, generator=g)

    def step():
        model.eval()
        xa = pgd_linf(model, x, y, eps=eps, alpha=alpha, steps=attack_steps, generator=g)
        model.train()
        loss = F.cross_entropy(model(xa), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    dt = timed(step, device, steps)
    return {"steps_per_s": 1 / dt, "images_per_s": batch / dt, "batch": batch, "attack_steps": attack_steps}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs (any machine)")
    ap.add_argument("--train-steps", type=int, default=200)
    ap.add_argument("--out", default=None)
    ap.add_argument("--nproc-per-node", type=int, default=0,
                    help="also score one zoo model with 1, 2, 4, ... up to this many processes (one GPU each; "
                         "torch.distributed via salbench --procs) and report the scaling")
    ap.add_argument("--scaling-model", default="cifar10-resnet8-G-cpu-resnet8")
    ap.add_argument("--scaling-batch-size", type=int, default=125,
                    help="scoring batch size of the scaling runs (the set is sharded by whole batches)")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    s = a.smoke
    cfgs = {
        "cifar10-wrn28_10": dict(arch="resnet8" if s else "wrn28_10", dataset="cifar10", shape=(3, 32, 32),
                                 batch=4 if s else 256, ig_internal=None if s else 2560),
        "imagenette-resnet18": dict(arch="resnet18", dataset="imagenette", shape=(3, 64, 64) if s else (3, 224, 224),
                                    batch=2 if s else 64, ig_internal=None if s else 640),
    }
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "smoke": s, "scoring_images_per_s": {}, "pgd_training": {}}
    for name, c in cfgs.items():
        if s and name.startswith("imagenette"):
            c["arch"] = "resnet18"
        r = scoring_throughput(c["arch"], c["dataset"], c["shape"], c["batch"], device, 2 if s else 50,
                               c["ig_internal"])
        report["scoring_images_per_s"][name] = r
        for k, v in r.items():
            print(f"{name:22s} {k:16s} {v:10.1f} images/s", flush=True)
    tr = pgd_training(cfgs["cifar10-wrn28_10"]["arch"], "cifar10", (3, 32, 32), 4 if s else 128, device,
                      2 if s else a.train_steps, 8 / 255, 2 / 255, 7)
    report["pgd_training"]["cifar10-wrn28_10-pgd7"] = tr
    print(f"PGD-7 training {cfgs['cifar10-wrn28_10']['arch']}: {tr['steps_per_s']:.2f} steps/s, "
          f"{tr['images_per_s']:.0f} images/s", flush=True)
    tr = pgd_training("resnet18", "imagenette", (3, 64, 64) if s else (3, 224, 224), 2 if s else 64, device,
                      2 if s else max(a.train_steps // 4, 10), 1 / 255, 2 / 255, 2 if s else 20)
    report["pgd_training"]["imagenette-resnet18-pgd20"] = tr
    print(f"PGD-20 training resnet18: {tr['steps_per_s']:.2f} steps/s, {tr['images_per_s']:.0f} images/s", flush=True)
    if a.nproc_per_node:
        sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
        from procs_scaling import scaling

        counts = sorted({1, a.nproc_per_node} | {2 ** i for i in range(8) if 2 ** i < a.nproc_per_node})
        r = scaling(a.scaling_model, a.scaling_model.split("-")[0], counts, device=a.device,
                    batch_size=a.scaling_batch_size)
        report["procs_scaling"] = r
        print(f"scoring {a.scaling_model} with {counts} processes: {r['seconds']} s, speed-up {r['speedup']}, "
              f"identical values: {r['identical']}", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
