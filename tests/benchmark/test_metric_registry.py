"""The metric registry and the typed Result: a new metric is one registration and then gets a board
column with its interval and paired comparisons; results round-trip through validated JSON."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from salbench.benchmark import harness
from salbench.benchmark import metric_registry as R
from salbench.benchmark import stats as S
from salbench.benchmark.results import (DEFAULT_LEADERBOARDS_DIR, Result, StoredResultError, content_digest,
                                        read_result_file, result_identity)
from salbench.benchmark.scoring import ScoreConfig, resolve_config

from .conftest import FAST

COMMITTED = sorted((DEFAULT_LEADERBOARDS_DIR / "results").glob("*/*.json"))  # protocol v2 (v1's are archived)


@pytest.fixture
def map_entropy():
    """A toy metric: the entropy of the normalised absolute map (lower = more concentrated)."""

    def entropy(b: R.Batch) -> torch.Tensor:
        p = b.maps.abs().flatten(1)
        p = p / p.sum(1, keepdim=True).clamp_min(1e-12)
        return -(p * (p + 1e-12).log()).sum(1)

    R.register_scalar_metric("map_entropy", entropy, direction=-1, description="entropy of the normalised map")
    yield "map_entropy"
    R.unregister_metric("map_entropy")


def test_a_registered_metric_gets_a_board_column_interval_and_comparisons(env, map_entropy):
    cfg = replace(FAST, methods=("VG",), accuracy=False)
    harness.score_zoo("fmnist", config=cfg, progress=False, imageset=env["imageset"], test_split=env["test"])
    main = pd.read_csv(env["lb"] / "fmnist.csv")
    assert {"map_entropy", "map_entropy_lo", "map_entropy_hi"} <= set(main.columns)
    assert list(main.columns).index("map_entropy") > list(main.columns).index("aopc")  # registry order
    assert (main["map_entropy_lo"] <= main["map_entropy"]).all() and (main["map_entropy"] <= main["map_entropy_hi"]).all()
    n = len(env["imageset"])
    assert (main["map_entropy"] > 0).all() and (main["map_entropy"] <= np.log(28 * 28)).all()
    # the stored per-image values are what the board averages
    doc = json.loads(next((env["lb"] / "results" / "fmnist").glob("*.json")).read_text())
    vals = doc["per_image"]["VG"]["map_entropy"]
    assert len(vals) == n and doc["summary"]["VG"]["map_entropy"] == pytest.approx(np.mean(vals))
    assert doc["config"]["metrics"] == ["gini", "ssim", "ros", "road", "map_entropy"]
    cmp = pd.read_csv(env["lb"] / "fmnist_comparisons.csv")
    rows = cmp[cmp["metric"] == "map_entropy"]
    assert len(rows) >= 2 and set(rows["verdict"]) <= set(S.VERDICTS)
    assert S.direction("map_entropy") == -1


def test_registering_a_metric_changes_the_identity_only_of_results_that_score_it(map_entropy):
    base = resolve_config(ScoreConfig(metrics=("gini", "ssim", "ros", "road")), "fmnist").to_dict()
    legacy = {k: v for k, v in base.items() if k != "metrics"}  # a result written before the field existed
    ident = dict(sha256="ab" * 32, protocol="v1", images_sha256="cd" * 32, n_images=1000)
    assert result_identity(**ident, config=base) == result_identity(**ident, config=legacy)
    with_toy = resolve_config(ScoreConfig(), "fmnist").to_dict()
    assert with_toy["metrics"][-1] == "map_entropy"
    assert result_identity(**ident, config=with_toy) != result_identity(**ident, config=base)


def test_registry_refuses_bad_entries():
    with pytest.raises(ValueError, match="already registered"):
        R.register_scalar_metric("gini", lambda b: b.maps.sum((1, 2)), direction=1)
    with pytest.raises(ValueError, match="reserved"):
        R.register_scalar_metric("correct", lambda b: b.maps.sum((1, 2)), direction=1)
    with pytest.raises(ValueError, match="identifier"):
        R.register_scalar_metric("a,b", lambda b: b.maps.sum((1, 2)), direction=1)
    with pytest.raises(ValueError, match="direction"):
        R.Aggregate("x", 2, lambda col, v: col("x"), ("x",))
    with pytest.raises(ValueError, match="protocol metric"):
        R.unregister_metric("ros")
    with pytest.raises(ValueError, match="unknown metric 'nope'"):
        resolve_config(ScoreConfig(metrics=("gini", "nope")), "fmnist")
    assert list(R.METRICS)[:4] == list(R.BUILTIN_METRICS)


def test_a_scalar_metric_must_return_one_value_per_image():
    spec = R.register_scalar_metric("bad_shape", lambda b: b.maps, direction=None)
    try:
        b = R.Batch(model=None, x=torch.zeros(2, 1, 4, 4), y=torch.tensor([0, 1]), explainer=None,
                    maps=torch.rand(2, 4, 4), logits=torch.zeros(2, 10), config=FAST, generator=None)
        with pytest.raises(ValueError, match=r"one value per image, shape \(2,\), got \(2, 4, 4\)"):
            spec.compute(b)
    finally:
        R.unregister_metric("bad_shape")


def test_registry_directions_and_compared_metrics_match_the_protocol():
    doc = json.loads(COMMITTED[0].read_text())
    pi = S.PerImage.from_result(doc, "VG")
    sig = pi.sigmas
    assert S.compared_metrics(pi) == ["gini", "ssim_mean", "ssim_raw", *[f"ssim@{s}" for s in sig], "log10_ros",
                                      "ros_floor", "log10_mean_ros", "aopc", "aopc_stable_ties"]
    assert S.aggregate_names(pi) == ["gini", "ssim_mean", "ssim_raw", *[f"ssim@{s}" for s in sig], "log10_ros",
                                     "ros_floor", "log10_mean_ros", "ros_nan_fraction", "log10_mean_ros_nan_fraction",
                                     "aopc", "aopc_stable_ties", "road_tied_fraction", "acc_on_set"]
    assert [S.direction(k) for k in ("gini", "ssim_mean", "log10_ros", "ros_nan_fraction", "aopc")] == [1, 1, -1, None, 1]
    # PROTOCOL §8.2, §8.5: four headline aggregates decide verdicts; each variant names its headline
    roles = {a.name: (a.role, a.variant_of) for a in pi.aggregates()}
    assert [n for n, (r, _) in roles.items() if r == "headline"] == ["gini", "ssim_mean", "log10_ros", "aopc"]
    assert {n: v for n, (r, v) in roles.items() if r == "variant"} == {
        "ssim_raw": "ssim_mean", "ros_floor": "log10_ros", "aopc_stable_ties": "aopc"}
    assert roles["log10_mean_ros"][0] == "secondary"


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.parent.name + "/" + p.name[:8])
def test_every_committed_result_round_trips_through_the_typed_result(path):
    doc = json.loads(path.read_text())
    r = Result.from_dict(doc)
    assert r.to_dict() == doc and list(r.to_dict()) == list(doc)  # same content, same key order
    assert Result.from_dict(r.to_dict()) == r
    assert r.methods == ["VG", "IG"] and r.n == 1000


def _doc():
    return json.loads(COMMITTED[0].read_text())


@pytest.mark.parametrize("breakage, message", [
    (lambda d: d.pop("summary"), "lacks the field 'summary'"),
    (lambda d: d.update(device=3), "'device' must be a str"),
    (lambda d: d.update(extra=1), r"unknown fields \['extra'\]"),
    (lambda d: d["per_image"]["correct"].pop(), "correct must list the 1000 images"),
    (lambda d: d["per_image"]["VG"]["gini"].pop(), r"per_image.VG.gini must cover the 1000 images"),
    (lambda d: d["per_image"]["IG"]["ssim"][3].pop(), r"per_image.IG.ssim must cover the 1000 images \(axis 1\)"),
    (lambda d: d["config"].update(methods=["IG", "VG"]), "differ from its config"),
    (lambda d: d["imageset"].update(n="1000"), "non-negative integer"),
])
def test_a_malformed_result_is_refused_with_the_reason(breakage, message, tmp_path):
    d = _doc()
    breakage(d)
    with pytest.raises(ValueError, match=message):
        Result.from_dict(d)
    # a stored file with a valid digest but malformed content is refused by the store too
    d.pop("digest", None)
    d["digest"] = content_digest(d)
    p = tmp_path / "r.json"
    p.write_text(json.dumps(d))
    with pytest.raises(StoredResultError, match="malformed"):
        read_result_file(p)


def test_score_returns_a_result_whose_json_form_validates(env):
    from salbench.benchmark.scoring import score
    from salbench.model_zoo import zoo

    cfg = replace(FAST, methods=("VG",), accuracy=False, sigmas=(0.05,), ros_samples=2, road_percentages=(1, 50))
    res = score(zoo.load(env["refs"]["A"]), env["imageset"], cfg, progress=False)
    assert isinstance(res, Result) and res.methods == ["VG"]
    again = Result.from_dict(json.loads(json.dumps(res.to_dict())))
    assert again.per_image == res.per_image and again.summary == res.summary
    assert set(res.per_image["VG"]) == {"gini", "ssim", "ssim_kept", "ssim_raw", "ros", "ros_nan", "ros_floor", "road",
                                        "road_stable", "road_tied"}
    assert list(res.summary["VG"]) == ["gini", "ssim", "ssim_kept_fraction", "ssim_mean", "ssim_raw", "log10_ros",
                                       "ros_nan_fraction", "ros_floor", "log10_mean_ros", "log10_mean_ros_nan_fraction",
                                       "road_curve", "aopc", "aopc_stable_ties", "road_tied_fraction"]
    assert res.versions["protocol"] == "v2" and {"cpu", "isa", "torch", "onednn", "native_kernels"} <= set(
        res.versions["platform"])
    assert {"forward", "VG/attribution", "VG/gini", "VG/ssim", "VG/ros", "VG/road"} <= set(res.timings)
    copy.deepcopy(res)  # plain data: picklable/copyable for torch.distributed gathering


def test_figure_panels_come_from_the_registry(map_entropy, tmp_path):
    from salbench.benchmark.figures import metric_panels, metrics_figure

    board = pd.read_csv(DEFAULT_LEADERBOARDS_DIR / "fmnist.csv")
    assert [a.name for a in metric_panels(board)] == ["gini", "ssim_mean", "log10_ros", "aopc"]
    board["map_entropy"] = np.linspace(1, 2, len(board))
    board["map_entropy_lo"], board["map_entropy_hi"] = board["map_entropy"] - 0.1, board["map_entropy"] + 0.1
    assert [a.name for a in metric_panels(board)][-1] == "map_entropy"
    board.to_csv(tmp_path / "toy.csv", index=False)
    png = metrics_figure("toy", out_dir=tmp_path, lb_dir=tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
