"""Sanity gates per (model, method) (PROTOCOL §9.3): does each explanation change when the model's
parameters, or the labels it was trained on, are randomised?

Per zoo model and method (VG, IG and the controls), on a declared seeded subset of the fixed image
set (:data:`SUBSET_N` images, :func:`subset_indices`):

- MPRT: the cascading model-parameter randomisation of Adebayo et al. 2018, top-down in forward
  execution order (``metrics.sanity.cascading_randomisation``): the mean Spearman rank correlation of
  |map| and the mean scale-free SSIM between the original map and the map after each step;
- sMPRT: the same similarity after every layer is randomised, each map averaged over
  :data:`SMOOTH_SAMPLES` noisy copies of the input (Hedström et al. 2024);
- eMPRT: the relative rise of the map's complexity (discrete entropy) from the model to the fully
  randomised model (Hedström et al. 2024; quantus ``EfficientMPRT``'s default);
- data randomisation (one per dataset and method): the mean Spearman of |map| between the reference
  N model and the N model trained on permuted labels (``salbench train --permute-labels``).

The gate fails a row when its MPRT Spearman after full randomisation is at least
:data:`MPRT_SPEARMAN_MAX`, when its mean eMPRT is not above :data:`EMPRT_MIN`, or when its method's
data-randomisation Spearman is at least :data:`DATA_SPEARMAN_MAX` (undefined, ``n/a``, when the
control model's maps are constant: a permuted-label model that collapsed to a constant output). A map that ignores the model
(the ``edge`` and ``random`` controls, an explainer returning the input) has Spearman 1 and eMPRT 0
by construction and fails; see PROTOCOL §9.3 for why the thresholds are where they are.

Each model's values are stored in ``leaderboards/sanity/<dataset>/<sha256[:16]>.json`` (atomic; re-used
while the weights and :data:`SETTINGS` are unchanged). The boards get ``<dataset>_sanity.csv``
(the cascade curves), ``<dataset>_gates.csv`` and the main board's ``gate`` column.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from salbench.benchmark import results as R
from salbench.benchmark.scoring import EXPLAINERS, ScoreConfig, explainer_for, resolve_config

SUBSET_N = 100  # images of the fixed set the gates use (seeded, declared)
SUBSET_SEED = 0
RANDOMISATION_SEED = 42  # quantus's default seed for the layer re-initialisations
SMOOTH_SAMPLES = 10  # sMPRT: noisy copies per map (quantus's default is 50; cost, PROTOCOL §9.3)
MPRT_SPEARMAN_MAX = 0.5
EMPRT_MIN = 0.0
DATA_SPEARMAN_MAX = 0.5
SETTINGS = {"subset_n": SUBSET_N, "subset_seed": SUBSET_SEED, "randomisation_seed": RANDOMISATION_SEED,
            "order": "top_down", "smooth_samples": SMOOTH_SAMPLES, "version": 1}
SANITY = "sanity"


def sanity_root(results_root: Path | None = None) -> Path:
    """``sanity/`` next to the results folder (``leaderboards/sanity``)."""
    return (results_root or R.results_dir()).parent / SANITY


def sanity_path(dataset: str, sha256: str, results_root: Path | None = None) -> Path:
    return sanity_root(results_root) / dataset / f"{sha256[:16]}.json"


def identity(sha256: str, methods: list[str], ig_steps: int) -> str:
    """What a stored sanity document's numbers are a function of: the weights, the methods, the IG
    steps and :data:`SETTINGS`."""
    fields = {"weights_sha256": sha256, "methods": list(methods), "ig_steps": int(ig_steps), **SETTINGS}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def subset_indices(n: int) -> torch.Tensor:
    """The declared subset of a fixed set of ``n`` images: the first :data:`SUBSET_N` of a permutation
    drawn from ``torch.Generator().manual_seed(SUBSET_SEED)``, sorted."""
    g = torch.Generator().manual_seed(SUBSET_SEED)
    return torch.randperm(n, generator=g)[: min(SUBSET_N, n)].sort().values


def _mean(t: torch.Tensor) -> float:
    v = t.double()
    v = v[torch.isfinite(v)]
    return float(v.mean()) if v.numel() else float("nan")


def model_sanity(model, x: torch.Tensor, y: torch.Tensor, methods: list[str], cfg: ScoreConfig,
                 say: Callable[[str], None] = lambda m: None) -> dict:
    """The MPRT curve, sMPRT and eMPRT of each method for one model on images ``x`` (labels ``y``)."""
    from salbench.metrics import sanity as MS

    out = {}
    for method in methods:
        t0 = time.perf_counter()
        explain = explainer_for(method, cfg)
        cascade = MS.cascading_randomisation(model, x, y, explain, seed=RANDOMISATION_SEED, order="top_down")
        smooth = MS.cascading_randomisation(model, x, y, explain, seed=RANDOMISATION_SEED, order="top_down",
                                            smooth_samples=SMOOTH_SAMPLES, layers=cascade.layers, last_only=True)
        emprt = MS.entropy_rise(cascade.original, cascade.final)  # = efficient_mprt: same two models' maps
        out[method] = {
            "layers": list(cascade.layers),
            "spearman": [_mean(s) for s in cascade.spearman],
            "ssim": [_mean(s) for s in cascade.ssim],
            "spearman_nan_fraction": float(torch.isnan(cascade.spearman[-1]).double().mean()),
            "smprt_spearman": _mean(smooth.spearman[-1]),
            "emprt": _mean(emprt),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        say(f"  {method}: MPRT Spearman {out[method]['spearman'][-1]:.3f}, eMPRT {out[method]['emprt']:.3f} "
            f"({out[method]['seconds']:.1f} s)")
    return out


def data_randomisation(reference, control, x: torch.Tensor, y: torch.Tensor, methods: list[str],
                       cfg: ScoreConfig) -> dict:
    """Per method: the mean Spearman of |map| and scale-free SSIM between the maps of the reference N
    model and of the N model trained on permuted labels."""
    from salbench.metrics import sanity as MS

    out = {}
    for method in methods:
        explain = explainer_for(method, cfg)
        a, b = explain(reference, x, y).detach(), explain(control, x, y).detach()
        out[method] = {"spearman": _mean(MS.spearman(a.abs(), b.abs())), "ssim": _mean(MS.scale_free_ssim(a, b))}
    return out


def _gate_methods() -> list[str]:
    return [m for m in ScoreConfig().methods] + [n for n, s in EXPLAINERS.items() if s.control]


def run_sanity(dataset: str, *, only: list[str] | None = None, rescore: bool = False, progress: bool = True,
               results_root: Path | None = None, out_dir: Path | None = None, cards_dir: Path | None = None,
               imageset=None, test_split=None, notify: Callable[[str], None] | None = None,
               config: ScoreConfig = ScoreConfig()) -> dict[str, dict]:
    """Compute (or re-use) the sanity values of every zoo model and of the dataset's data-randomisation
    control, store them, and regenerate the boards. Returns ``{model id: stored document}``."""
    from salbench.benchmark import harness as H
    from salbench.benchmark.imagesets import load_imageset
    from salbench.model_zoo import zoo
    from salbench.model_zoo.data import load_split
    from salbench.model_zoo.recipes import is_control_card
    from salbench.model_zoo.zoo import atomic_write_json

    say = H._notifier(notify, progress)
    cfg = resolve_config(config, dataset)
    cards = H.zoo_cards(dataset, cards_dir)
    controls = [c for c in zoo.list_cards(dataset, cards_dir) if is_control_card(c)]
    H.check_only(dataset, only, cards + controls)
    test_split = test_split or load_split(dataset, "test")
    imageset = imageset or load_imageset(dataset, test_split=test_split, cards_dir=cards_dir)
    idx = subset_indices(len(imageset))
    x, y = imageset.images[idx].float().div_(255), imageset.labels[idx]
    methods = _gate_methods()
    out = {}
    for card in cards:
        if only and card["id"] not in only:
            continue
        p = sanity_path(dataset, card["sha256"], results_root)
        ident = identity(card["sha256"], methods, cfg.ig_steps)
        doc = _read(p)
        if doc is not None and doc.get("identity") == ident and not rescore:
            say(f"re-using the sanity values of {card['id']}")
        else:
            say(f"sanity checks of {card['id']} on {len(idx)} images ...")
            model = zoo.load(card["id"], cards_dir=cards_dir)
            doc = {"model": {k: card.get(k) for k in ("id", "sha256", "variant", "preset")}, "identity": ident,
                   "settings": SETTINGS, "images_sha256": imageset.images_sha256,
                   "methods": model_sanity(model, x, y, methods, cfg, say)}
            atomic_write_json(p, doc)
        out[card["id"]] = doc
    ref_id = imageset.reference_models.get("N", {}).get("id")
    for card in controls:
        if (only and card["id"] not in only) or ref_id is None:
            continue
        p = sanity_path(dataset, card["sha256"], results_root)
        ident = identity(card["sha256"] + imageset.reference_models["N"].get("sha256", ""), methods, cfg.ig_steps)
        doc = _read(p)
        if doc is None or doc.get("identity") != ident or rescore:
            say(f"data randomisation: {ref_id} vs {card['id']} ...")
            doc = {"model": {k: card.get(k) for k in ("id", "sha256", "variant", "preset")}, "identity": ident,
                   "settings": SETTINGS, "images_sha256": imageset.images_sha256, "reference": ref_id,
                   "natural_accuracy": card.get("natural_accuracy"),
                   "data": data_randomisation(zoo.load(ref_id, cards_dir=cards_dir),
                                              zoo.load(card["id"], cards_dir=cards_dir), x, y, methods, cfg)}
            atomic_write_json(p, doc)
        out[card["id"]] = doc
    H.regenerate(dataset, results_root=results_root, out_dir=out_dir, images_sha256=imageset.images_sha256)
    return out


def _read(p: Path) -> dict | None:
    """A stored document, or None (absent, not a regular file, oversize, not JSON: computed again)."""
    from salbench.model_zoo.safe_files import UnsafeFileError, read_regular

    try:
        doc = json.loads(read_regular(p, max_bytes=1 << 22, what="sanity file").decode("utf-8"))
    except (OSError, ValueError, UnsafeFileError):
        return None
    ok = isinstance(doc, dict) and isinstance(doc.get("model"), dict) and isinstance(doc.get("identity"), str)
    return doc if ok else None


def stored(dataset: str, results_root: Path | None = None, images_sha256: str | None = None) -> list[dict]:
    """The stored sanity documents of ``dataset`` (only those on ``images_sha256`` when given)."""
    folder = sanity_root(results_root) / dataset
    if not folder.is_dir():
        return []
    docs = [d for d in (_read(p) for p in sorted(folder.glob("*.json"))) if d is not None]
    return [d for d in docs if images_sha256 is None or d.get("images_sha256") == images_sha256]


def sanity_tables(docs: list[dict]) -> dict[str, pd.DataFrame]:
    """``{"curves", "gates"}`` from the stored documents: the cascade per (model, method, step), and
    one gate row per (model, method) plus the data-randomisation rows."""
    curves, gates = [], []
    data = {}
    for d in docs:
        for method, v in (d.get("data") or {}).items():
            data[method] = (d["model"]["id"], v)
    for d in sorted(docs, key=lambda d: d["model"]["id"]):
        for method, v in (d.get("methods") or {}).items():
            for i, (layer, sp, ss) in enumerate(zip(v["layers"], v["spearman"], v["ssim"])):
                curves.append({"id": d["model"]["id"], "method": method, "step": i + 1, "layer": layer,
                               "spearman": sp, "ssim": ss})
            fails = []
            if not v["spearman"][-1] < MPRT_SPEARMAN_MAX:
                fails.append("mprt")
            if not v["emprt"] > EMPRT_MIN:
                fails.append("emprt")
            ds = data.get(method, (None, {}))[1].get("spearman", float("nan"))
            if not math.isnan(ds) and not ds < DATA_SPEARMAN_MAX:
                fails.append("data")
            gates.append({"id": d["model"]["id"], "sha256": d["model"]["sha256"], "method": method,
                          "mprt_spearman": v["spearman"][-1], "mprt_ssim": v["ssim"][-1],
                          "smprt_spearman": v["smprt_spearman"], "emprt": v["emprt"], "data_spearman": ds,
                          "gate": "pass" if not fails else "fail: " + ", ".join(fails)})
    for method, (cid, v) in sorted(data.items()):
        gates.append({"id": cid, "sha256": "", "method": method, "mprt_spearman": np.nan, "mprt_ssim": np.nan,
                      "smprt_spearman": np.nan, "emprt": np.nan, "data_spearman": v["spearman"],
                      "gate": ("n/a: the control's maps are constant" if math.isnan(v["spearman"]) else
                               "pass" if v["spearman"] < DATA_SPEARMAN_MAX else "fail: data")})
    cols = ["id", "sha256", "method", "mprt_spearman", "mprt_ssim", "smprt_spearman", "emprt", "data_spearman", "gate"]
    return {"curves": pd.DataFrame(curves, columns=["id", "method", "step", "layer", "spearman", "ssim"]),
            "gates": pd.DataFrame(gates, columns=cols)}


def gate_column(main: pd.DataFrame, gates: pd.DataFrame) -> list[str]:
    """The main board's ``gate`` value of each row: its gate row's verdict, "" where none was computed."""
    if main.empty:
        return []
    by = {(r["sha256"], r["method"]): r["gate"] for _, r in gates.iterrows() if r["sha256"]}
    return [by.get((r["sha256"], r["method"]), "") for _, r in main.iterrows()]
