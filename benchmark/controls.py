"""Control explainers on the boards (PROTOCOL §9.1): ``random`` and ``edge`` (``metrics.controls``),
maps that ignore the model, scored with every metric on the same fixed set as VG and IG.

They are stored apart from the models' results, one result per checkpoint under
``leaderboards/controls/<dataset>/`` (same format, identity and digest as any result; their config
names the control methods and measures no accuracy), so scoring a control never touches a model's
stored VG/IG values. ``<dataset>_controls.csv`` has one row per zoo model x control with every
aggregate (point estimates; ``control`` = True), and the main board's ``beaten_by_control`` column
names, on each VG/IG row, the headline aggregates on which a control of the same model scores
better (``edge`` on ``ssim_mean``, say): a metric a model-free map wins is measuring something
other than the model's explanation. Controls are never compared or ranked.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

import pandas as pd

from salbench.benchmark import results as R
from salbench.benchmark.metric_registry import headline_aggregates
from salbench.benchmark.scoring import ScoreConfig, control_methods, score

CONTROLS = "controls"


def controls_root(results_root: Path | None = None) -> Path:
    """Where the control results live: ``controls/`` next to the results folder (``leaderboards/controls``);
    the results folder holds one folder per dataset and nothing else."""
    return (results_root or R.results_dir()).parent / CONTROLS


def control_config(config: ScoreConfig = ScoreConfig()) -> ScoreConfig:
    """``config`` scoring the registered control explainers instead of its methods, without accuracies
    (the model's own result has them)."""
    return replace(config, methods=control_methods(), accuracy=False)


def score_controls(dataset: str, *, config: ScoreConfig = ScoreConfig(), rescore: bool = False,
                   progress: bool = True, results_root: Path | None = None, out_dir: Path | None = None,
                   cards_dir: Path | None = None, imageset=None, test_split=None, only: list[str] | None = None,
                   notify: Callable[[str], None] | None = None) -> list[dict]:
    """Score the control explainers on every zoo model of ``dataset`` (re-using stored control results
    of the same identity), store them under :func:`controls_root`, and regenerate the boards."""
    from salbench.benchmark import harness as H
    from salbench.benchmark.imagesets import load_imageset
    from salbench.model_zoo import zoo
    from salbench.model_zoo.data import load_split

    say = H._notifier(notify, progress)
    cfg = control_config(config)
    root = controls_root(results_root)
    cards = H.zoo_cards(dataset, cards_dir)
    H.check_only(dataset, only, cards)
    test_split = test_split or load_split(dataset, "test")
    imageset = imageset or load_imageset(dataset, test_split=test_split, cards_dir=cards_dir)
    out = []
    for card in cards:
        if only and card["id"] not in only:
            continue
        R.check_result_target(dataset, card["sha256"], root=root)
        res = None if rescore else H._cached(dataset, card["sha256"], cfg, imageset, root, say,
                                             f"the controls of {card['id']}")
        if res is None:
            model = zoo.load(card["id"], cards_dir=cards_dir)
            res = score(model, imageset, cfg, test_split=test_split, progress=progress).to_dict()
            res.pop("band", None)
            say(f"  done in {res['timings']['total']:.1f} s")
            H._save(dataset, res, card, root, out_dir)
        out.append(res)
    H.regenerate(dataset, results_root=results_root, out_dir=out_dir, images_sha256=imageset.images_sha256)
    return out


def list_controls(dataset: str, results_root: Path | None = None, images_sha256: str | None = None) -> list[dict]:
    """The stored control results of ``dataset`` ([] when none were scored)."""
    if not (controls_root(results_root) / dataset).is_dir():
        return []
    return R.list_results(dataset, root=controls_root(results_root), images_sha256=images_sha256)


def controls_table(controls: list[dict], *, stats: bool = False) -> pd.DataFrame:
    """One row per model x control (the main board's columns, ``control`` = True), or an empty frame.
    Point estimates only by default: controls are never compared, and their bootstrap intervals would
    double the time of a board regeneration (``stats=True`` adds them)."""
    from salbench.benchmark.leaderboard import leaderboard_tables

    if not controls:
        return pd.DataFrame(columns=["id", "method", "control"])
    df = leaderboard_tables(controls, stats=stats)["main"]
    drop = [c for c in df.columns if c.startswith(("natural_acc", "robust_acc", "autoattack_acc", "acc_on_set"))]
    df = df.drop(columns=drop)
    df.insert(2, "control", True)
    return df


def beaten_by_control(main: pd.DataFrame, controls: pd.DataFrame) -> list[str]:
    """For each row of the main board, ``"<aggregate>:<control>"`` pairs (``;``-joined) where a control
    of the same model has a better point estimate on a headline aggregate (by its direction); "" when
    none does or the model has no control result."""
    if main.empty:
        return []
    if controls.empty:
        return [""] * len(main)
    heads = [(a.name, a.direction) for _, a in headline_aggregates() if a.direction is not None]
    by_model = {mid: g for mid, g in controls.groupby("id")}
    out = []
    for _, row in main.iterrows():
        g = by_model.get(row["id"])
        flags = []
        if g is not None:
            for name, direction in heads:
                if name not in row or name not in g:
                    continue
                for _, c in g.iterrows():
                    if pd.notna(c[name]) and pd.notna(row[name]) and direction * (c[name] - row[name]) > 0:
                        flags.append(f"{name}:{c['method']}")
        out.append(";".join(flags))
    return out
