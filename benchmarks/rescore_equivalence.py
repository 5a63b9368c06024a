"""Do the committed smoothed checkpoints keep their scores under the new SmoothBlock?

Re-scores committed FMNIST zoo models (default: the G and M2 LeNets) with the current code into a
TEMPORARY result store and compares every per-image value with the committed result in
``leaderboards/results/fmnist/``: Gini, ROS, SSIM (per σ, and which images were kept), ROAD (per
image and level), correctness on the set, the natural/robust accuracies and the aggregates.

``--paths new ulp`` adds a float-tolerance probe: the same model with every parameter moved by one
ulp (``torch.nextafter`` toward +inf), scored with the new path. It differs from the committed
model by float rounding only, so ``ulp`` vs ``new`` shows how far each aggregate moves under a
rounding-level change of the network: the yardstick for "unchanged within float tolerance".

``--paths new reference`` scores each model twice: with the new ``SmoothBlock.forward`` and with
the pre-3315f5e formula ``x + mix(smooth_reference(x))`` (reflect pad + depthwise conv /
unfold + sort). The reference run is the control: it shows how far a re-score of the *old* code
on this machine/torch build is from the committed numbers, so a new-vs-committed difference can be
told apart from run-to-run float noise.

Run (single-threaded; nothing is written under leaderboards/)::

    SALBENCH_LEADERBOARDS_DIR=$(mktemp -d) .venv/bin/python benchmarks/rescore_equivalence.py \
        --paths new reference --write-doc

The numbers go to stdout, to ``$SALBENCH_LEADERBOARDS_DIR/equivalence.json`` and, with
``--write-doc``, into the "rescore" section of ``docs/performance/smoothblock.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COMMITTED = REPO / "leaderboards" / "results"
DOC = REPO / "docs" / "performance" / "smoothblock.md"
DEFAULT_IDS = ("fmnist-lenet-G-paper-10ep", "fmnist-lenet-M2-paper-10ep")

# never score into the repository's store: a temporary one unless the caller named another
if not os.environ.get("SALBENCH_LEADERBOARDS_DIR"):
    os.environ["SALBENCH_LEADERBOARDS_DIR"] = tempfile.mkdtemp(prefix="salbench-rescore-")
if Path(os.environ["SALBENCH_LEADERBOARDS_DIR"]).resolve() == (REPO / "leaderboards").resolve():
    sys.exit("refusing to write into the repository's leaderboards/: point SALBENCH_LEADERBOARDS_DIR elsewhere")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from salbench.model_zoo.smoothing import SmoothBlock  # noqa: E402
from smoothing_step_table import write_section  # noqa: E402  (same folder: the doc's generated sections)

NEW_FORWARD = SmoothBlock.forward


def reference_forward(self, x):
    """SmoothBlock.forward before 3315f5e."""
    return x + self.mix(self.smooth_reference(x))


def _arr(values) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in np.ravel(np.array(values, dtype=object))], dtype=np.float64)


def _diff(a, b) -> dict:
    """max |a - b| over entries finite in both, max relative diff, and NaN-pattern mismatches."""
    a, b = _arr(a), _arr(b)
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    both = ~nan_a & ~nan_b
    d = np.abs(a[both] - b[both])
    rel = d / np.maximum(np.abs(b[both]), 1e-12)
    return {"n": int(a.size), "max_abs": float(d.max()) if d.size else 0.0,
            "max_rel": float(rel.max()) if rel.size else 0.0,
            "n_different": int((d > 0).sum()), "nan_mismatch": int((nan_a != nan_b).sum())}


def _flat_summary(s: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in s.items():
        if isinstance(v, dict):
            out.update(_flat_summary(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def compare(new: dict, old: dict) -> dict:
    out = {"per_image": {}, "summary": {}, "accuracy": {}}
    out["per_image"]["correct"] = _diff(new["per_image"]["correct"], old["per_image"]["correct"])
    for m in old["summary"]:
        pn, po = new["per_image"][m], old["per_image"][m]
        for key in ("gini", "ssim", "ssim_kept", "ros", "road"):
            out["per_image"][f"{m}/{key}"] = _diff(pn[key], po[key])
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


def rescore(model_id: str, path: str, imageset, test_split) -> dict:
    from salbench.benchmark import results as R
    from salbench.benchmark.scoring import ScoreConfig, score
    from salbench.model_zoo import zoo

    SmoothBlock.forward = reference_forward if path == "reference" else NEW_FORWARD
    try:
        model = zoo.load(model_id)
        if path == "reference":
            assert model.smooth is not None, f"{model_id} has no SmoothBlock"
        if path == "ulp":  # the float-tolerance probe: every parameter one ulp up
            with torch.no_grad():
                for p in model.parameters():
                    p.copy_(torch.nextafter(p, torch.full_like(p, math.inf)))
        t0 = time.perf_counter()
        res = score(model, imageset, ScoreConfig(), test_split=test_split, progress=False).to_dict()
        res["rescore_seconds"] = time.perf_counter() - t0
    finally:
        SmoothBlock.forward = NEW_FORWARD
    card = zoo.get_card(model_id)
    root = Path(os.environ["SALBENCH_LEADERBOARDS_DIR"]) / f"results-{path}"
    R.save_result(res, card, root=root)
    return res


def _fmt(x: float) -> str:
    return "0" if x == 0 else f"{x:.2e}"


def markdown(report: dict) -> str:
    lines = []
    for model_id, per_path in report["models"].items():
        lines.append(f"**{model_id}** (weights sha256 {report['sha256'][model_id][:16]}...)\n")
        paths = list(per_path)
        head = "| per-image value | n | " + " | ".join(
            f"{p} vs committed: max abs (max rel), #differing" for p in paths) + " |"
        if "new_vs_reference" in report and model_id in report["new_vs_reference"]:
            head = head[:-2] + " | new vs reference: max abs |"
        lines += [head, "| " + " | ".join(["---"] * (head.count("|") - 1)) + " |"]
        for key in per_path[paths[0]]["per_image"]:
            cells = []
            for p in paths:
                d = per_path[p]["per_image"][key]
                nm = f", NaN pattern differs at {d['nan_mismatch']}" if d["nan_mismatch"] else ""
                cells.append(f"{_fmt(d['max_abs'])} ({_fmt(d['max_rel'])}), {d['n_different']}{nm}")
            row = f"| {key} | {per_path[paths[0]]['per_image'][key]['n']} | " + " | ".join(cells) + " |"
            if "new_vs_reference" in report and model_id in report["new_vs_reference"]:
                row += f" {_fmt(report['new_vs_reference'][model_id]['per_image'][key]['max_abs'])} |"
            lines.append(row)
        for p in paths:
            s = per_path[p]["summary"]
            largest, worst = _largest(s)
            acc = per_path[p]["accuracy"]
            lines.append(f"\n{p} vs committed, aggregates: max |difference| over the {len(s)} summary values "
                         f"(Gini, SSIM per σ / kept fraction / mean, log10 ROS, ROS NaN fraction, ROAD curve, AOPC; "
                         f"VG and IG) = {_fmt(largest)} (at {worst}); "
                         + ", ".join(f"{k} accuracy {_fmt(v)}" for k, v in acc.items())
                         + f". Scoring took {per_path[p]['seconds']:.0f} s.")
        if model_id in report.get("ulp_vs_new", {}):
            lines += _tolerance_table(report, model_id)
        lines.append("")
    return "\n".join(lines)


def _tolerance_table(report: dict, model_id: str) -> list[str]:
    """Each aggregate's change new vs committed beside its change under the one-ulp probe."""
    new = report["models"][model_id]["new"]["summary"]
    ulp = report["ulp_vs_new"][model_id]["summary"]
    keys = [k for k in new if k.split("/", 1)[1] in ("gini", "ssim_mean", "log10_ros", "ros_nan_fraction", "aopc")]
    out = ["", "Float tolerance: each aggregate's change under this code (new vs committed) beside its change "
           "when every parameter moves by one ulp (ulp vs new; the same code):", "",
           "| aggregate | new vs committed | ulp vs new |", "| --- | --- | --- |"]
    for k in keys:
        a, b = new.get(k), ulp.get(k)
        out.append(f"| {k} | {'n/a' if a is None else _fmt(a)} | {'n/a' if b is None else _fmt(b)} |")
    largest, worst = _largest(ulp)
    out.append(f"\nulp vs new, aggregates: max |difference| over the {len(ulp)} summary values = "
               f"{_fmt(largest)} (at {worst}).")
    return out


def _largest(summary: dict) -> tuple[float, str | None]:
    """The largest aggregate difference of a comparison and where it is (None entries: not comparable)."""
    keys = [k for k, v in summary.items() if v is not None]
    worst = max(keys, key=summary.get, default=None)
    return (0.0 if worst is None else summary[worst]), worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ids", nargs="+", default=list(DEFAULT_IDS))
    ap.add_argument("--paths", nargs="+", choices=("new", "reference", "ulp"), default=["new"])
    ap.add_argument("--section", default="rescore", help="the generated section of the doc to write")
    ap.add_argument("--context", default="2 cores shared with two training processes and other sessions' test runs",
                    help="what else ran on the machine, for the doc")
    ap.add_argument("--title", help="the section's heading (default: from --paths)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--write-doc", action="store_true", help=f"write the section of {DOC.relative_to(REPO)}")
    ap.add_argument("--render", metavar="JSON", help="no scoring: render a saved equivalence.json (with --write-doc)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.render:
        report = json.loads(Path(args.render).read_text())
    else:
        report = _rescore_all(args)
    md = markdown(report)
    print(md)
    if args.write_doc:
        cmd = ("SALBENCH_LEADERBOARDS_DIR=$(mktemp -d) .venv/bin/python benchmarks/rescore_equivalence.py "
               f"--ids {' '.join(args.ids)} --paths {' '.join(args.paths)} --section {args.section} --write-doc")
        la, lb = report["load_before"], report["load_after"]
        title = args.title or ("Do committed checkpoints keep their scores, within float tolerance? (one-ulp probe)"
                               if "ulp" in args.paths else "Do committed checkpoints keep their scores?")
        head = (f"## {title}\n\n"
                f"Re-scored with `{cmd}` (torch {report['torch']}, {report['threads']} thread(s), CPU, full FMNIST "
                f"protocol: VG and IG, 1000 images, default `ScoreConfig`, natural and robust accuracy) into a "
                f"temporary result store, compared value by value with the committed "
                f"`leaderboards/results/fmnist/*.json`. Load average during the run: {la[0]:.1f} before, "
                f"{lb[0]:.1f} after ({args.context}). `ssim_kept`, `road` and `correct` "
                f"are 0/1 values, so their max abs difference is 0 or 1 and '#differing' counts flipped "
                f"entries. SSIM/ROS entries that are NaN (image not kept / ROS undefined) are compared as a "
                f"pattern.\n\n")
        write_section(DOC, args.section, head + md)
        print(f"wrote {DOC}")
    return 0


def _rescore_all(args) -> dict:
    """Score every (model, path) of ``args`` into the temporary store and compare; the report."""

    from salbench.benchmark.imagesets import load_imageset
    from salbench.model_zoo import zoo
    from salbench.model_zoo.data import load_split

    store = Path(os.environ["SALBENCH_LEADERBOARDS_DIR"])
    print(f"temporary result store: {store}", flush=True)
    test_split = load_split("fmnist", "test")
    imageset = load_imageset("fmnist", test_split=test_split)
    report = {"store": str(store), "threads": args.threads, "torch": torch.__version__, "models": {},
              "sha256": {}, "new_vs_reference": {}, "load_before": os.getloadavg()}
    for model_id in args.ids:
        card = zoo.get_card(model_id)
        committed_path = COMMITTED / "fmnist" / f"{card['sha256'][:16]}-v1.json"
        committed = json.loads(committed_path.read_text())
        assert committed["model"]["sha256"] == card["sha256"], committed_path
        report["sha256"][model_id] = card["sha256"]
        report["models"][model_id] = {}
        fresh = {}
        for path in args.paths:
            print(f"scoring {model_id} with the {path} SmoothBlock path ...", flush=True)
            res = rescore(model_id, path, imageset, test_split)
            fresh[path] = res
            cmp = compare(res, committed)
            cmp["seconds"] = res["rescore_seconds"]
            report["models"][model_id][path] = cmp
            worst = {k: v["max_abs"] for k, v in cmp["per_image"].items()}
            print(f"  {res['rescore_seconds']:.0f} s; max abs per-image diff vs committed: "
                  + ", ".join(f"{k}={_fmt(v)}" for k, v in worst.items()), flush=True)
            print(f"  accuracy diffs: {cmp['accuracy']}; max aggregate diff: "
                  f"{_fmt(max((v for v in cmp['summary'].values() if v is not None), default=0.0))}", flush=True)
        if {"new", "reference"} <= set(fresh):
            report["new_vs_reference"][model_id] = compare(fresh["new"], fresh["reference"])
        if {"new", "ulp"} <= set(fresh):
            report.setdefault("ulp_vs_new", {})[model_id] = compare(fresh["ulp"], fresh["new"])
    report["load_after"] = os.getloadavg()
    (store / "equivalence.json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    raise SystemExit(main())
