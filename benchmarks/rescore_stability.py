"""Does skipping the attributions the protocol does not need keep every stored number? (issue 13.2)

``ssim_under_noise`` no longer attributes noisy copies whose prediction flipped, and
``relative_output_stability`` (paper variant) no longer classifies or attributes the later samples of
an image that is already NaN; the random draws are unchanged. This script re-scores committed FMNIST
zoo models with the current code into a TEMPORARY result store and compares every per-image value
with the committed result in ``leaderboards/results/fmnist/`` (Gini, SSIM per σ and which images were
kept, ROS, ROAD per level, correctness, accuracies, aggregates). SSIM entries of images that are not
kept are NaN now (they were numbers the protocol never used), so SSIM is compared where kept.

``--control REV`` also scores each model with ``metrics/stability.py`` as of git revision REV (the
code before the change; everything else current) and reports new vs control: that isolates this
change from other float-rounding drift since the committed result (e.g. the SmoothBlock rewrite of
3315f5e for G/M1/M2), and the stage timings of the two runs side by side.

Run (single-threaded; nothing is written under leaderboards/)::

    .venv/bin/python benchmarks/rescore_stability.py --control 61b8071 --write-doc

Output: stdout, ``$SALBENCH_LEADERBOARDS_DIR/stability_equivalence.json`` and, with ``--write-doc``,
the "rescore" section of ``docs/performance/scoring.md``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COMMITTED = REPO / "leaderboards" / "results"
DOC = REPO / "docs" / "performance" / "scoring.md"
DEFAULT_IDS = ("fmnist-lenet-N-paper-10ep", "fmnist-lenet-G-paper-10ep")

if not os.environ.get("SALBENCH_LEADERBOARDS_DIR"):
    os.environ["SALBENCH_LEADERBOARDS_DIR"] = tempfile.mkdtemp(prefix="salbench-rescore-stability-")
if Path(os.environ["SALBENCH_LEADERBOARDS_DIR"]).resolve() == (REPO / "leaderboards").resolve():
    sys.exit("refusing to write into the repository's leaderboards/: point SALBENCH_LEADERBOARDS_DIR elsewhere")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rescore_equivalence import _arr, _diff, _flat_summary  # noqa: E402
from smoothing_step_table import write_section  # noqa: E402

from salbench import metrics  # noqa: E402


def _kept_ssim_diff(new: dict, old: dict) -> dict:
    """SSIM where both runs kept the image (the protocol's values), plus kept-pattern mismatches."""
    a, b = _arr(new["ssim"]), _arr(old["ssim"])
    ka, kb = _arr(new["ssim_kept"]).astype(bool), _arr(old["ssim_kept"]).astype(bool)
    both = ka & kb
    d = np.abs(a[both] - b[both])
    rel = d / np.maximum(np.abs(b[both]), 1e-12)
    return {"n": int(both.sum()), "max_abs": float(d.max()) if d.size else 0.0,
            "max_rel": float(rel.max()) if rel.size else 0.0, "n_different": int((d > 0).sum()),
            "nan_mismatch": int((ka != kb).sum()),
            "not_kept_are_nan": bool(np.isnan(a[~ka]).all())}


def compare(new: dict, old: dict) -> dict:
    out = {"per_image": {"correct": _diff(new["per_image"]["correct"], old["per_image"]["correct"])},
           "summary": {}, "accuracy": {}}
    for m in old["summary"]:
        pn, po = new["per_image"][m], old["per_image"][m]
        for key in ("gini", "ssim_kept", "ros", "road"):
            out["per_image"][f"{m}/{key}"] = _diff(pn[key], po[key])
        out["per_image"][f"{m}/ssim (kept)"] = _kept_ssim_diff(pn, po)
        sn, so = _flat_summary(new["summary"][m]), _flat_summary(old["summary"][m])
        for k in so:
            a, b = sn.get(k), so[k]
            if a is None or b is None or (isinstance(b, float) and math.isnan(b)):
                out["summary"][f"{m}/{k}"] = None if a == b else float("inf")
            else:
                out["summary"][f"{m}/{k}"] = abs(float(a) - float(b))
    for k in ("on_set", "natural", "robust"):
        if k in old["accuracy"] and k in new["accuracy"]:
            out["accuracy"][k] = abs(float(new["accuracy"][k]) - float(old["accuracy"][k]))
    return out


def _load_stability(rev: str):
    """``metrics/stability.py`` at git revision ``rev``, imported as a module of its own."""
    src = subprocess.run(["git", "show", f"{rev}:metrics/stability.py"], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="stability-")) / "stability_control.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("salbench_stability_control", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rescore(model_id: str, imageset, test_split, control=None) -> dict:
    from salbench.benchmark.scoring import ScoreConfig, score
    from salbench.model_zoo import zoo

    saved = metrics.ssim_under_noise, metrics.relative_output_stability
    if control is not None:
        metrics.ssim_under_noise, metrics.relative_output_stability = (control.ssim_under_noise,
                                                                      control.relative_output_stability)
    try:
        model = zoo.load(model_id)
        t0 = time.perf_counter()
        res = score(model, imageset, ScoreConfig(), test_split=test_split, progress=False).to_dict()
        res["rescore_seconds"] = time.perf_counter() - t0
    finally:
        metrics.ssim_under_noise, metrics.relative_output_stability = saved
    return res


def _fmt(x: float) -> str:
    return "0" if x == 0 else f"{x:.2e}"


def markdown(report: dict) -> str:
    lines = []
    for model_id, runs in report["models"].items():
        cmps = [k for k in ("new_vs_committed", "control_vs_committed", "new_vs_control") if k in runs]
        lines.append(f"**{model_id}** (weights sha256 {report['sha256'][model_id][:16]}...)\n")
        lines.append("| per-image value | n | " + " | ".join(f"{c.replace('_', ' ')}: max abs (max rel), #differing"
                                                          for c in cmps) + " |")
        lines.append("|---|---|" + "---|" * len(cmps))
        for key in runs[cmps[0]]["per_image"]:
            cells = []
            for c in cmps:
                d = runs[c]["per_image"][key]
                nm = f", pattern differs at {d['nan_mismatch']}" if d["nan_mismatch"] else ""
                cells.append(f"{_fmt(d['max_abs'])} ({_fmt(d['max_rel'])}), {d['n_different']}{nm}")
            lines.append(f"| {key} | {runs[cmps[0]]['per_image'][key]['n']} | " + " | ".join(cells) + " |")
        for c in cmps:
            s = runs[c]["summary"]
            finite = [v for v in s.values() if v is not None]
            worst = max(s, key=lambda k: -1 if s[k] is None else s[k])
            acc = ", ".join(f"{k} accuracy {_fmt(v)}" for k, v in runs[c]["accuracy"].items())
            lines.append(f"\n{c.replace('_', ' ')}, aggregates: max |difference| over the {len(s)} summary values = "
                         f"{_fmt(max(finite) if finite else 0.0)} (at {worst}); {acc}.")
        nan_ok = all(d["not_kept_are_nan"] for k, d in runs["new_vs_committed"]["per_image"].items() if "ssim (kept)" in k)
        lines.append(f"\nNew run: every SSIM entry of a not-kept image is NaN: {nan_ok}.")
        t = runs["timings"]
        keys = [k for k in t["new"] if k not in ("natural_accuracy", "robust_accuracy", "total")]
        lines.append("\n| stage (s, 1 thread) | " + " | ".join(t) + " |")
        lines.append("|---|" + "---|" * len(t))
        for k in keys:
            lines.append(f"| {k} | " + " | ".join(f"{t[p].get(k, float('nan')):.2f}" for p in t) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ids", nargs="+", default=list(DEFAULT_IDS))
    ap.add_argument("--control", metavar="REV", help="also score with metrics/stability.py at this git revision")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--write-doc", action="store_true", help=f"write the section of {DOC.relative_to(REPO)}")
    ap.add_argument("--from-json", metavar="PATH", help="re-render a saved stability_equivalence.json (no scoring)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.from_json:
        report = json.loads(Path(args.from_json).read_text())
        args.threads, args.control = report["threads"], report["control"]
        return _render(report, args)

    from salbench.benchmark.imagesets import load_imageset
    from salbench.model_zoo import zoo
    from salbench.model_zoo.data import load_split

    store = Path(os.environ["SALBENCH_LEADERBOARDS_DIR"])
    control = _load_stability(args.control) if args.control else None
    test_split = load_split("fmnist", "test")
    imageset = load_imageset("fmnist", test_split=test_split)
    report = {"threads": args.threads, "torch": torch.__version__, "control": args.control, "models": {},
              "sha256": {}, "load_before": os.getloadavg()}
    for model_id in args.ids:
        card = zoo.get_card(model_id)
        committed = json.loads((COMMITTED / "fmnist" / f"{card['sha256'][:16]}-v1.json").read_text())
        assert committed["model"]["sha256"] == card["sha256"], model_id
        report["sha256"][model_id] = card["sha256"]
        runs = {"timings": {}}
        # interleaved: control first, then new, so that a load change hits both alike
        fresh = {}
        for name, mod in ([("control", control)] if control else []) + [("new", None)]:
            print(f"scoring {model_id} ({name}) ...", flush=True)
            fresh[name] = rescore(model_id, imageset, test_split, mod)
            runs["timings"][name] = fresh[name]["timings"]
            print(f"  {fresh[name]['rescore_seconds']:.0f} s", flush=True)
        runs["new_vs_committed"] = compare(fresh["new"], committed)
        if control:
            runs["control_vs_committed"] = compare(fresh["control"], committed)
            runs["new_vs_control"] = compare(fresh["new"], fresh["control"])
        report["models"][model_id] = runs
    report["load_after"] = os.getloadavg()
    (store / "stability_equivalence.json").write_text(json.dumps(report, indent=1))
    print(f"saved {store / 'stability_equivalence.json'}")
    return _render(report, args)


def _render(report: dict, args) -> int:
    md = markdown(report)
    print(md)
    if args.write_doc:
        la, lb = report["load_before"], report["load_after"]
        cmd = ".venv/bin/python benchmarks/rescore_stability.py" + (
            f" --control {args.control}" if args.control else "") + " --write-doc"
        head = (f"## Do the stored numbers stay the same?\n\nRe-scored with `{cmd}` ("
                f"{args.threads} thread(s), CPU, full FMNIST protocol, default `ScoreConfig`, torch {report['torch']}) into a temporary "
                f"store and compared value by value with the committed `leaderboards/results/fmnist/*.json`"
                + (f"; 'control' is the same run with `metrics/stability.py` of {args.control} (before the change)"
                   if args.control else "")
                + f". Load average {la[0]:.1f} before, {lb[0]:.1f} after (2 cores shared with two training runs). "
                  "`ssim_kept`, `road` and `correct` are 0/1, so their max abs difference is 0 or 1 and "
                  "'#differing' counts flipped entries; 'pattern differs' counts NaN-pattern (ROS) or "
                  "kept-pattern (SSIM) mismatches. SSIM is compared where both runs kept the image.\n\n")
        write_section(DOC, "rescore", head + md)
        print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
