"""The cost estimate against measured scoring times (issue 30, item 2): docs/cost-estimate.md.

Two steps::

    .venv/bin/python benchmarks/cost_table.py measure-readme [--band]   # ~3-6 min of one core
    .venv/bin/python benchmarks/cost_table.py write-doc

``measure-readme`` builds the README's example program (the small CNN of "Any architecture: export
it"), trains it for a few hundred Adam steps on FMNIST (so its predictions flip under noise as a real
model's do), exports it to ``.pt2`` and submits it with ``harness.submit`` into a temporary
leaderboards folder (nothing in the repository is written but the measurement file), one torch thread,
the band off unless ``--band``. It records the estimate line the harness said before scoring, the
measured ``timings`` of the result, the wall time, the peak RSS and the load average before and after
in ``docs/cost-estimate.json``.

``write-doc`` estimates every zoo model that has a stored result (``leaderboards/results/<dataset>``,
protocol v2, and the archived v1 CIFAR-10 results in ``leaderboards/archive/v1/results``) with this
machine's calibration (``benchmark/cost.py``; one torch thread, as the zoo was scored), compares each
with the stored ``timings.total`` (scoring + accuracy) and ``band.seconds``, adds the README program's
measurement, and writes the tables into ``docs/cost-estimate.md``. The stored times were measured
while other runs shared the two cores: the table also gives each run's own speed (its IG seconds
per image and step, from its stage timings) against the calibration's, and the estimate rescaled to
that speed, which separates the cost model's error from the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "cost-estimate.md"
MEASURED = ROOT / "docs" / "cost-estimate.json"


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def readme_model():
    """The README's example program, verbatim (README "Any architecture: export it")."""
    from torch import nn

    class MyNet(nn.Module):  # any architecture; here a small CNN for FMNIST (1x28x28 images, 10 classes)
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.tensor([0.2860]).view(1, 1, 1, 1))
            self.register_buffer("std", torch.tensor([0.3530]).view(1, 1, 1, 1))
            self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
            self.classifier = nn.Linear(8 * 14 * 14, 10)

        def forward(self, x):  # x: (B, 1, 28, 28) images in [0, 1]
            x = (x - self.mean) / self.std
            return self.classifier(self.features(x).flatten(1))

    return MyNet()


def _train(model, steps: int = 300):
    import torch.nn.functional as F

    from salbench.model_zoo.data import load_split

    train = load_split("fmnist", "train")
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(train), (64,), generator=g)
        loss = F.cross_entropy(model(train.float_images(idx)), train.labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def measure_readme(band: bool) -> dict:
    from salbench.benchmark import harness

    torch.manual_seed(0)
    model = _train(readme_model())
    tmp = Path(tempfile.mkdtemp(prefix="salbench-cost-"))
    program = torch.export.export(model, (torch.rand(2, 1, 28, 28),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    path = tmp / "my_model.pt2"
    torch.export.save(program, str(path))
    os.environ["SALBENCH_LEADERBOARDS_DIR"] = str(tmp / "leaderboards")  # a private store: nothing committed moves
    said: list[str] = []
    load_before = _load()
    t0 = time.perf_counter()
    card, res = harness.submit(path, arch=None, dataset="fmnist", name="my-cnn", notes="cost table", progress=False,
                               notify=lambda m: (said.append(m), print(m, flush=True)), band=band)
    wall = time.perf_counter() - t0
    out = {
        "model": "README example program (.pt2)", "threads": torch.get_num_threads(), "band": band,
        "said": said, "timings": res["timings"], "band_seconds": (res.get("band") or {}).get("seconds"),
        "submit_wall_seconds": round(wall, 1), "load_average_before": load_before, "load_average_after": _load(),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "natural_accuracy": res["accuracy"].get("natural"), "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    doc = json.loads(MEASURED.read_text()) if MEASURED.is_file() else {}
    doc["readme"] = {**{k: v for k, v in doc.get("readme", {}).items() if k == "rss_before_scoring_bytes"}, **out}
    MEASURED.write_text(json.dumps(doc, indent=1) + "\n")
    return out


def rss_baseline() -> dict:
    """The peak RSS of measure-readme's steps before scoring (imports, training on the FMNIST train split,
    torch.export, reading the program back, the test split): what the scoring's own memory adds to."""
    from salbench.benchmark import harness  # noqa: F401  (the imports measure-readme has)
    from salbench.model_zoo.data import load_split
    from salbench.model_zoo.exported import load_exported

    torch.manual_seed(0)
    model = _train(readme_model())
    tmp = Path(tempfile.mkdtemp(prefix="salbench-cost-"))
    program = torch.export.export(model, (torch.rand(2, 1, 28, 28),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(tmp / "my_model.pt2"))
    load_exported(tmp / "my_model.pt2")
    load_split("fmnist", "test")
    doc = json.loads(MEASURED.read_text()) if MEASURED.is_file() else {}
    doc.setdefault("readme", {})["rss_before_scoring_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    MEASURED.write_text(json.dumps(doc, indent=1) + "\n")
    return doc["readme"]


# ----------------------------------------------------------------------------- the doc
def _results() -> tuple[list[tuple[str, dict]], list[dict]]:
    """The zoo's stored results: protocol v2, and the archived v1 results of models with no v2 result
    (CIFAR-10); the archived v1 results of models that have a v2 result are returned apart (left out)."""
    out, superseded = [], []
    v2 = {json.loads(f.read_bytes())["model"]["id"] for f in (ROOT / "leaderboards" / "results").glob("*/*.json")}
    for kind, folder in (("v2", ROOT / "leaderboards" / "results"),
                         ("v1 (archived)", ROOT / "leaderboards" / "archive" / "v1" / "results")):
        for f in sorted(folder.glob("*/*.json")):
            doc = json.loads(f.read_bytes())
            if doc.get("model", {}).get("source") != "zoo":
                continue
            if kind != "v2" and doc["model"]["id"] in v2:
                superseded.append(doc)
            else:
                out.append((kind, doc))
    return out, superseded


def _speed(timings: dict, n: int, steps: int) -> float | None:
    """The run's own IG seconds per image and step (its ``IG/attribution`` stage)."""
    t = timings.get("IG/attribution")
    return t / (n * steps) if t else None


def _fmt(s: float | None) -> str:
    from salbench.benchmark.progress import format_seconds

    return "-" if s is None else f"{s:.0f} s ({format_seconds(s)})"


def _ratio(est: float | None, meas: float | None) -> str:
    return "-" if not est or not meas else f"{est / meas:.2f}"


def write_doc() -> str:
    from salbench.benchmark import cost as C
    from salbench.benchmark.bands import config_of
    from salbench.model_zoo import zoo
    from salbench.model_zoo.architectures import build
    from salbench.model_zoo.datasets import get_spec

    cal = C.calibrate()
    load_now = _load()
    rows, seen_arch = [], {}
    results, superseded = _results()
    for kind, doc in results:
        m, ds = doc["model"], doc["dataset"]
        cfg = config_of(doc)
        try:
            model = zoo.load(m["id"])
        except Exception:  # a result without its checkpoint here: the architecture (same cost)
            model = build(m["arch"], dataset=ds, smoothing=m.get("smoothing"))
        shape = tuple(get_spec(ds).input_shape)
        prof = C.profile(model, shape)
        est = C.estimate(model, ds, cfg, n_images=doc["imageset"]["n"], n_test=10_000, calibration=cal, prof=prof)
        est_band = C.estimate(model, ds, cfg, n_images=doc["imageset"]["n"], score=False, calibration=cal, prof=prof)
        own = _speed(doc["timings"], doc["imageset"]["n"], cfg.ig_steps)
        cal_step = cal.pass_seconds("backward", prof.backward_flops)
        scale = own / cal_step if own else None
        band_s = (doc.get("band") or {}).get("seconds")
        rows.append({"id": m["id"], "arch": m["arch"], "kind": kind, "measured": doc["timings"]["total"],
                     "estimated": est.scoring_seconds, "band_measured": band_s,
                     "band_estimated": est_band.band_seconds if band_s else None, "own_step_us": own and own * 1e6,
                     "cal_step_us": cal_step * 1e6, "scaled": est.scoring_seconds * scale if scale else None,
                     "scaled_band": est_band.band_seconds * scale if scale and band_s else None})
        seen_arch.setdefault((m["arch"], ds), est)
    meas = json.loads(MEASURED.read_text()).get("readme") if MEASURED.is_file() else None
    readme = None
    if meas:
        model = readme_model()
        prof = C.profile(model, (1, 28, 28))
        est = C.estimate(model, "fmnist", n_images=1000, n_test=10_000, calibration=cal, prof=prof)
        own = _speed(meas["timings"], 1000, 50)
        cal_step = cal.pass_seconds("backward", prof.backward_flops)
        scale = own / cal_step if own else None
        band_ratio = _median([r["band_measured"] / r["measured"] for r in rows
                              if r["band_measured"] and r["kind"] == "v2"])
        readme = {"measured": meas["timings"]["total"], "estimated": est.scoring_seconds,
                  "band_estimated": est.band_seconds, "band_from_ratio": meas["timings"]["total"] * band_ratio,
                  "band_ratio": band_ratio, "own_step_us": own and own * 1e6, "cal_step_us": cal_step * 1e6,
                  "scaled": est.scoring_seconds * scale if scale else None, "meas": meas, "est": est,
                  "est_band": est}
        readme["est"] = C.estimate(model, "fmnist", n_images=1000, n_test=10_000, band=False, calibration=cal,
                                   prof=prof)
    steps = [_speed(d["timings"], d["imageset"]["n"], d["config"]["ig_steps"]) for d in superseded]
    steps = [x * 1e6 for x in steps if x]
    text = _render(cal, load_now, rows, readme, seen_arch,
                   (len(superseded), min(steps, default=0), max(steps, default=0)))
    DOC.write_text(text)
    return text


def _memory_row(m: dict, est) -> str:
    from salbench.benchmark import cost as C

    base = m.get("rss_before_scoring_bytes")
    grew = f"; {C.format_bytes(base)} before scoring (`rss-baseline`: the same steps without the scoring), so the " \
           f"scoring added at most {C.format_bytes(m['peak_rss_bytes'] - base)}" if base else ""
    ratio = f"{est.memory_bytes / (m['peak_rss_bytes'] - base):.2f}" if base and m["peak_rss_bytes"] > base else "-"
    return (f"| memory | peak RSS {C.format_bytes(m['peak_rss_bytes'])} of the whole process (torch, captum and pandas "
            f"imports, the FMNIST train split of the training, torch.export){grew} | "
            f"~{C.format_bytes(est.memory_bytes)} working memory (tensors of the largest pass, data, model copies) | "
            f"{ratio} |")


def _said_scoring(m: dict) -> float | None:
    """The scoring seconds of the estimate line the harness said before the measured run."""
    import re

    line = next((x for x in m.get("said", []) if x.startswith("estimated cost")), "")
    hit = re.search(r"~(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)? scoring", line)
    if not hit or not any(hit.groups()):
        return None
    h, mi, se = (int(g) if g else 0 for g in hit.groups())
    return 3600 * h + 60 * mi + se


def _median(v: list[float]) -> float:
    v = sorted(v)
    return (v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2 if v else float("nan")


def _render(cal, load_now, rows, readme, seen_arch, superseded) -> str:
    from salbench.benchmark import cost as C
    from salbench.model_zoo.architectures import build

    L = ["# Cost estimate vs measured scoring time (issue 30, item 2)", "",
         "Generated by `.venv/bin/python benchmarks/cost_table.py write-doc` (the README program's measurement by "
         "`... measure-readme`); do not edit by hand. How the estimate is made: `benchmark/cost.py` (its module "
         "docstring). `salbench score` and `salbench leaderboard` print it before scoring, e.g.:", ""]
    if readme:
        L += ["```", readme["est_band"].format(), "```", "",
              "(the README's example program, with the band; generated with this page)", ""]
        line = next((s for s in readme["meas"]["said"] if s.startswith("estimated cost")), None)
        if line and line != readme["est"].format():
            L += ["Before the README program's measured run below (band off) the harness said", "", "```", line, "```",
                  "", "from the calibration of that moment, which timed the wall clock while the cores were busy "
                  "(calibration version 1; the cached calibrations are keyed by version, and version 3, CPU time per "
                  "thread, replaced it), and an earlier working-memory formula.", ""]
    c = cal.coef
    L += ["## The calibration of this machine", "",
          f"`{cal.key.get('cpu')}` ({cal.key.get('isa')}, torch {cal.key.get('torch')}, {cal.key.get('threads')} torch "
          f"thread(s)), calibrated {cal.created} in {cal.seconds:.1f} s at load average {cal.load_average} "
          "(2 cores; two or three long training/scoring runs were using them). Seconds per image = a + b x FLOPs "
          "(float32), "
          "fitted per pass kind through the zoo LeNet (FMNIST, 250 images per call) and ResNet-8 "
          "(CIFAR-10, 64 images; random weights, the timing does not depend on them); a forward+backward pass is "
          "one step of the scoring's own IG explainer, timed as the process's CPU time per torch thread (at most the "
          "wall time), so that the other jobs on the cores do not enter the calibration:", "",
          "| net | pass | dtype | FLOPs per image | measured per image (CPU time per torch thread) |",
          "|---|---|---|---|---|"]
    for p in cal.points:
        L.append(f"| {p['net']} | {p['kind']} | {p['dtype']} | {C.format_flops(p['flops'])} | "
                 f"{p['seconds'] * 1e6:.0f} us |")
    L += ["", "| pass (float32) | a (per image) | b (per GFLOP) |", "|---|---|---|"]
    for k in ("forward", "backward"):
        a, b = c[k]
        L.append(f"| {'forward+backward' if k == 'backward' else k} | {a * 1e6:.0f} us | {b * 1e9 * 1e3:.1f} ms |")
    L += ["", "float64 (the band's re-score) = float32 x the nets' float64/float32 ratio, interpolated in log FLOPs "
          "and held beyond the two nets: "
          + ", ".join(f"{r:.2f} at {C.format_flops(f)}" for f, r in sorted(cal.float64.get("backward", [])))
          + " (forward+backward)."]
    L += ["", "ROAD imputation per image and level: " + ", ".join(
        f"{k} {v * 1e6:.0f} us" for k, v in sorted(cal.imputation.items())) + ".", "",
          f"The table was generated at load average {load_now[0]} (1 min), {load_now[1]} (5 min).", ""]
    L += ["## Zoo models: estimate vs the stored scoring times", "",
          "Measured: `timings.total` (scoring + natural and robust accuracy) and `band.seconds` of each stored "
          "result, recorded when the model was scored (`salbench --threads 1 leaderboard`, the same 2-core machine, "
          "each while one to three other training or scoring runs shared the cores; the load of each run was not "
          "recorded). v1 (archived): the CIFAR-10 ResNet-8 results were scored under protocol v1 (one ROAD tie "
          "rule; otherwise the same passes) and have no band; no CIFAR-10 result of protocol v2 exists yet. "
          "'own IG step' is the run's measured IG seconds per image and step (its `IG/attribution` stage), 'cal' the "
          "calibration's; 'rescaled' is the estimate at the run's own speed (estimate x own / cal): its ratio is the "
          "cost model's error without the load.", "",
          "| model | protocol | measured scoring | estimated | est/meas | measured band | estimated band | est/meas | "
          "own IG step / cal | rescaled est/meas (scoring, band) |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        L.append(f"| `{r['id']}` | {r['kind']} | {_fmt(r['measured'])} | {_fmt(r['estimated'])} | "
                 f"{_ratio(r['estimated'], r['measured'])} | {_fmt(r['band_measured'])} | "
                 f"{_fmt(r['band_estimated'])} | "
                 f"{_ratio(r['band_estimated'], r['band_measured'])} | "
                 f"{r['own_step_us']:.0f} / {r['cal_step_us']:.0f} us | "
                 f"{_ratio(r['scaled'], r['measured'])}, {_ratio(r['scaled_band'], r['band_measured'])} |")
    ratios = [r["estimated"] / r["measured"] for r in rows]
    bands = [r["band_estimated"] / r["band_measured"] for r in rows if r["band_measured"]]
    scaled = [r["scaled"] / r["measured"] for r in rows if r["scaled"]]
    L += ["", f"est/meas over the {len(rows)} zoo results: scoring {min(ratios):.2f} to {max(ratios):.2f} "
              f"(within 2x: {sum(0.5 <= x <= 2 for x in ratios)} of {len(ratios)}); band {min(bands):.2f} to "
              f"{max(bands):.2f} (within 2x: {sum(0.5 <= x <= 2 for x in bands)} of {len(bands)}); rescaled to each "
              f"run's own speed {min(scaled):.2f} to {max(scaled):.2f}.", ""]
    if superseded[0]:
        L += [f"Left out: the {superseded[0]} archived v1 results of FMNIST models that have a v2 result above (the "
              f"same models, an older protocol); their own IG steps ran at {superseded[1]:.0f} to "
              f"{superseded[2]:.0f} us "
              "per image, the spread of this machine's load over the day.", ""]
    if readme:
        m = readme["meas"]
        L += ["## The README's example program", "",
              f"The small CNN of README \"Any architecture: export it\" (trained 300 Adam steps on FMNIST, natural "
              f"accuracy {m['natural_accuracy']:.3f}), exported to `.pt2` and submitted with `harness.submit` into a "
              f"temporary store, {m['threads']} torch thread(s), {'with' if m['band'] else 'without'} the band, "
              f"measured {m['measured_at']} (`benchmarks/cost_table.py measure-readme`, under `nice -n 10`); load "
              f"average {m['load_average_before']} before, {m['load_average_after']} after (1, 5, 15 min; 2 cores, "
              "two training runs on them). The estimate below is the one of this table's calibration; the line the "
              "harness said before that run is quoted at the top.", "",
              "| | measured | estimated | est/meas |", "|---|---|---|---|",
              f"| scoring (`timings.total`) | {_fmt(readme['measured'])} | {_fmt(readme['estimated'])} | "
              f"{_ratio(readme['estimated'], readme['measured'])} |"]
        said = _said_scoring(m)
        if said is not None:
            L.append(f"| scoring, as the line said before the run (the calibration of that moment) | "
                     f"{_fmt(readme['measured'])} | {_fmt(said)} | {_ratio(said, readme['measured'])} |")
        if m.get("band_seconds"):
            L.append(f"| band | {_fmt(m['band_seconds'])} | {_fmt(readme['band_estimated'])} | "
                     f"{_ratio(readme['band_estimated'], m['band_seconds'])} |")
        else:
            L.append(f"| band (not run: the measured scoring x {readme['band_ratio']:.2f}, the median band/scoring "
                     f"ratio of the v2 zoo results) | {_fmt(readme['band_from_ratio'])} | "
                     f"{_fmt(readme['band_estimated'])} | "
                     f"{_ratio(readme['band_estimated'], readme['band_from_ratio'])} |")
        L += [f"| own IG step / calibration's | {readme['own_step_us']:.0f} us | {readme['cal_step_us']:.0f} us | "
              f"rescaled est/meas {_ratio(readme['scaled'], readme['measured'])} |",
              _memory_row(m, readme["est"]),
              f"| submit wall time (load, checks, estimate, scoring, store) | {m['submit_wall_seconds']:.0f} s | "
              "- | - |",
              ""]
    L += ["## Registry architectures without a zoo model (estimate only)", "",
          "The same calibration on the architectures `salbench zoo archs` lists that have no stored result here "
          "(FMNIST shape for the LeNets, CIFAR-10 for the CIFAR nets, ImageNette 224x224 for ResNet-18; full "
          "protocol, 1000 images, 10,000 test images, band with float64). Nothing measured: on this CPU these "
          "would run for hours to weeks.", "",
          "| arch | dataset | forward / forward+backward per image | scoring | band | peak tensor | working memory |",
          "|---|---|---|---|---|---|---|"]
    for arch, ds in (("lenet_text", "fmnist"), ("resnet20", "cifar10"), ("vgg16", "cifar10"),
                     ("wrn28_10", "cifar10"), ("resnet18", "imagenette")):
        if (arch, ds) in seen_arch:
            continue
        e = C.estimate(build(arch, dataset=ds), ds, calibration=cal)
        L.append(f"| {arch} | {ds} | {C.format_flops(e.forward_flops)} / {C.format_flops(e.backward_flops)} | "
                 f"{_fmt(e.scoring_seconds)} | {_fmt(e.band_seconds)} | {C.format_bytes(e.peak_tensor_bytes)} | "
                 f"~{C.format_bytes(e.memory_bytes)} |")
    L += ["", "## What the estimate leaves out", "",
          "- The machine's load: the estimate is of a run with the cores to itself (the calibration times CPU time "
          "per thread; it is cached per CPU, ISA, torch version and thread count, `--recalibrate` measures again). "
          "On cores shared with other jobs the wall time is longer by the share those jobs take (the line says so "
          "when the load average exceeds the cores); the default `--time-limit`, max(4x, +15 min), covers that. "
          "Other jobs also slow the CPU time itself a little (shared caches and SMT siblings).",
          "- FLOPs count matrix products, convolutions and attention only; elementwise ops, pooling and the "
          "SmoothBlock's C kernel are in the per-image constant a, which is the LeNet's and ResNet-8's: a network of "
          "matrix products alone (an MLP, no convolutions) costs less per pass than a, and is over-estimated "
          "(the safe side for a time limit).",
          "- SSIM and ROS run the explainer on the images whose prediction did not flip only; the estimate counts "
          "every image (an upper bound), and ROAD's second tie rule re-computes only the levels whose removed "
          "pixels differ; the estimate counts both (upper bound).",
          "- Working memory counts every tensor the largest pass of the run makes (a forward+backward pass of the "
          "PGD batch of 500, or a forward pass of the natural-accuracy batch of 1000), the data and the band's model "
          "copies; not torch itself (its imports alone take about 0.65 GB here) nor what the allocator keeps after "
          "freeing: the README row above compares it with the measured growth of the process.", ""]
    return "\n".join(L)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=("measure-readme", "rss-baseline", "write-doc"))
    ap.add_argument("--band", action="store_true", help="measure-readme: score the band too (about 2x longer)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.step == "measure-readme":
        print(json.dumps(measure_readme(args.band), indent=1))
    elif args.step == "rss-baseline":
        print(json.dumps(rss_baseline(), indent=1))
    else:
        print(write_doc())
    return 0


if __name__ == "__main__":
    sys.exit(main())
