import math

import pandas as pd
import pytest

from salbench.benchmark import harness
from salbench.benchmark.leaderboard import leaderboard_tables
from salbench.benchmark.scoring import score
from salbench.model_zoo import zoo

from .conftest import FAST


def test_score_is_deterministic_and_complete(env):
    model = zoo.load(env["refs"]["G"])
    a = score(model, env["imageset"], FAST, test_split=env["test"], progress=False).to_dict()
    b = score(zoo.load(env["refs"]["G"]), env["imageset"], FAST, test_split=env["test"], progress=False).to_dict()
    assert a["per_image"] == b["per_image"] and a["summary"] == b["summary"] and a["accuracy"] == b["accuracy"]
    n = len(env["imageset"])
    for m in ("VG", "IG"):
        s, p = a["summary"][m], a["per_image"][m]
        assert 0 < s["gini"] < 1 and len(p["gini"]) == n
        assert len(p["ssim"]) == 8 and all(len(r) == n for r in p["ssim"])
        assert len(p["road"]) == n and all(len(r) == 20 for r in p["road"])
        assert set(s["ssim"]) == {"0.01", "0.03", "0.05", "0.07", "0.09", "0.1", "0.15", "0.2"}
        assert -1 <= s["aopc"] <= 1 and math.isfinite(s["log10_ros"]) and 0 <= s["ros_nan_fraction"] <= 1
    # the reference models classify the whole set correctly by construction
    assert a["accuracy"]["on_set"] == 1.0
    assert 0 <= a["accuracy"]["robust"] <= a["accuracy"]["natural"] <= 1
    assert a["config"]["seed"] == 0 and a["versions"]["torch"]


def test_results_cached_unless_rescore(env, monkeypatch):
    out = harness.score_zoo("fmnist", config=FAST, progress=False, imageset=env["imageset"], test_split=env["test"])
    assert len(out) == 3
    files = sorted((env["lb"] / "results" / "fmnist").glob("*.json"))
    assert len(files) == 3
    df = pd.read_csv(env["lb"] / "fmnist.csv")
    assert len(df) == 6 and set(df["method"]) == {"VG", "IG"}
    assert (env["lb"] / "fmnist_ssim.csv").is_file() and (env["lb"] / "fmnist_road.csv").is_file()

    def boom(*a, **k):
        raise AssertionError("scored although a cached result exists")

    monkeypatch.setattr(harness, "score", boom)
    harness.score_zoo("fmnist", config=FAST, progress=False, imageset=env["imageset"], test_split=env["test"])
    with pytest.raises(AssertionError, match="scored although"):
        harness.score_zoo("fmnist", rescore=True, config=FAST, progress=False, imageset=env["imageset"],
                          test_split=env["test"])


def _fake_result(mid, variant, gini, source="zoo"):
    summary = {"gini": gini, "ssim": {"0.01": 0.9, "0.2": 0.5}, "ssim_kept_fraction": {"0.01": 1.0, "0.2": 0.8},
               "ssim_mean": 0.7, "log10_ros": 3.0, "ros_nan_fraction": 0.1,
               "road_curve": {"1": 1.0, "6": 0.9}, "aopc": 0.05}
    return {"model": {"id": mid, "variant": variant, "preset": "p", "arch": "lenet", "source": source,
                      "sha256": mid * 4},
            "accuracy": {"on_set": 1.0, "natural": 0.9, "robust": 0.5}, "summary": {"VG": summary, "IG": summary},
            "imageset": {"n": 1000}, "protocol": "v2"}


def test_leaderboard_tables_pure():
    res = [_fake_result("sub", "submission", 0.9, "submission"), _fake_result("g", "G", 0.7),
           _fake_result("n", "N", 0.5)]
    t = leaderboard_tables(res, stats=False)  # these fakes carry no per-image values to bootstrap
    main = t["main"]
    assert list(main["id"]) == ["n", "n", "g", "g", "sub", "sub"]  # zoo first in N/A/G order
    for col in ("natural_acc", "robust_acc", "acc_on_set", "gini", "ssim_mean", "ssim@0.01", "ssim@0.2",
                "log10_ros", "ros_nan_fraction", "aopc", "protocol", "sha256", "source", "preset", "variant", "arch"):
        assert col in main.columns, col
    assert main.loc[main["id"] == "g", "gini"].tolist() == [0.7, 0.7]
    assert len(t["ssim"]) == 3 * 2 * 2 and len(t["road"]) == 3 * 2 * 2
    assert set(t["ssim"].columns) >= {"sigma", "ssim", "kept_fraction"}


def test_leaderboard_written_atomically(env, monkeypatch):
    """A crash while writing leaves the previous CSV intact (temp file + os.replace)."""
    harness.score_zoo("fmnist", config=FAST, progress=False, imageset=env["imageset"], test_split=env["test"])
    before = (env["lb"] / "fmnist.csv").read_bytes()
    import salbench.benchmark.leaderboard as L

    def crash(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(L.os if hasattr(L, "os") else __import__("os"), "replace", crash)
    with pytest.raises(RuntimeError):
        harness.regenerate("fmnist")
    assert (env["lb"] / "fmnist.csv").read_bytes() == before
    assert not list(env["lb"].glob(".*.tmp"))


def test_result_from_another_image_set_is_rescored_and_left_off(env):
    """A cached result scored on a different image set (e.g. before the set was rebuilt) is never
    re-used or listed: the model is scored again on the current set."""
    import json

    from salbench.benchmark import results as R

    current = env["imageset"].images_sha256
    harness.score_zoo("fmnist", config=FAST, progress=False, imageset=env["imageset"], test_split=env["test"],
                      only=[env["refs"]["G"]])
    (path,) = (env["lb"] / "results" / "fmnist").glob("*.json")

    def tamper():
        doc = json.loads(path.read_text())
        doc["imageset"]["images_sha256"] = "0" * 64  # pretend it was scored on another set
        doc["summary"]["VG"]["gini"] = -1.0
        doc["digest"] = R.content_digest(doc)  # as if written so (a hand edit without it is refused)
        path.write_text(json.dumps(doc))

    tamper()
    assert len(R.list_results("fmnist")) == 1 and R.list_results("fmnist", images_sha256=current) == []
    out = harness.score_zoo("fmnist", config=FAST, progress=False, imageset=env["imageset"], test_split=env["test"],
                            only=[env["refs"]["G"]])
    assert out[0]["imageset"]["images_sha256"] == current and out[0]["summary"]["VG"]["gini"] >= 0
    df = pd.read_csv(env["lb"] / "fmnist.csv")
    assert len(df) == 2 and (df["gini"] >= 0).all()
    tamper()
    harness.regenerate("fmnist", images_sha256=current)
    assert "-1" not in (env["lb"] / "fmnist.csv").read_text()
