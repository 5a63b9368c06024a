"""A stored result is re-used only for the same identity: weights sha256, protocol, image set and
every score-affecting config field (methods, IG steps, σ levels, ROS, ROAD, seed, the batch size as
far as it changes the draws, the device type). The committed results keep their identity."""

import json
from dataclasses import replace

import pandas as pd
import pytest
import torch

from salbench.benchmark import harness, scoring
from salbench.benchmark import results as R
from salbench.benchmark.imagesets import IMAGESETS_DIR
from salbench.benchmark.scoring import ScoreConfig
from salbench.metrics.protocol import PROTOCOL_VERSION

from .conftest import FAST

# VG only, no accuracy: the cheapest real score of the tiny environment
CHEAP = replace(FAST, methods=("VG",), accuracy=False)
SHA, IMG = "ab" * 32, "cd" * 32


def _ident(cfg: ScoreConfig, n=1000, dataset="fmnist", sha=SHA):
    return R.result_identity(sha256=sha, protocol="v1", images_sha256=IMG, n_images=n,
                             config=scoring.resolve_config(cfg, dataset).to_dict())


@pytest.mark.parametrize("change", [
    dict(methods=("VG",)), dict(methods=("IG", "VG")), dict(ig_steps=49), dict(sigmas=(0.01, 0.2)),
    dict(ros_samples=4), dict(ros_variant="agarwal"), dict(road_percentages=(1, 50)), dict(road_noise=0.0),
    dict(seed=1), dict(batch_size=100), dict(device="cuda"), dict(device="mps"), dict(accuracy=False),
])
def test_identity_changes_with_every_score_affecting_field(change):
    assert _ident(replace(ScoreConfig(), **change)) != _ident(ScoreConfig())


def test_identity_ignores_what_changes_no_draw():
    base = _ident(ScoreConfig())
    assert _ident(ScoreConfig(batch_size=250)) == base  # the fmnist default, resolved
    assert _ident(ScoreConfig(ig_internal_batch_size=7)) == base  # memory knob only
    # every batch size >= the set size draws the same noise (generators keyed by batch start)
    assert _ident(ScoreConfig(batch_size=40), n=40) == _ident(ScoreConfig(batch_size=4000), n=40)
    assert _ident(ScoreConfig(batch_size=20), n=40) != _ident(ScoreConfig(batch_size=40), n=40)
    # the draws depend on the device type, not on which GPU
    assert _ident(ScoreConfig(device="cuda:0")) == _ident(ScoreConfig(device="cuda:1")) == _ident(ScoreConfig(device="cuda"))
    assert _ident(ScoreConfig(), sha="ef" * 32) != base
    assert len(base) == 64 and int(base, 16) >= 0  # a sha256 hex digest


def _committed():
    out = []
    for d in sorted((R.DEFAULT_LEADERBOARDS_DIR / "results").iterdir()):
        s = json.loads((IMAGESETS_DIR / f"{d.name}.json").read_text())
        out += [(d.name, p, s) for p in sorted(d.glob("*.json"))]
    return out


@pytest.mark.parametrize("dataset,path,imageset", _committed(), ids=lambda v: getattr(v, "stem", None))
def test_committed_results_remain_reusable_with_the_default_config(dataset, path, imageset):
    """The committed results were scored with the default config on CPU: a default `make run` re-uses them."""
    doc = json.loads(path.read_text())
    sha = doc["model"]["sha256"]
    want = R.result_identity(sha256=sha, protocol=doc["protocol"], images_sha256=imageset["images_sha256"],
                             n_images=len(imageset["indices"]), config=scoring.resolve_config(ScoreConfig(), dataset).to_dict())
    assert R.identity_of(doc) == want
    root = R.DEFAULT_LEADERBOARDS_DIR / "results"
    assert R.load_result(dataset, sha, root=root, images_sha256=imageset["images_sha256"], identity=want) is not None
    res, msg = R.find_reusable(dataset, sha, config=scoring.resolve_config(ScoreConfig(), dataset).to_dict(),
                               images_sha256=imageset["images_sha256"], n_images=len(imageset["indices"]), root=root)
    assert res is not None and "re-using the stored result" in msg and doc["created"] in msg
    # but not for a VG-only, a smaller-batch or a CUDA score
    for cfg in (ScoreConfig(methods=("VG",)), ScoreConfig(batch_size=100), ScoreConfig(device="cuda")):
        res, msg = R.find_reusable(dataset, sha, config=scoring.resolve_config(cfg, dataset).to_dict(),
                                   images_sha256=imageset["images_sha256"], n_images=len(imageset["indices"]), root=root)
        assert res is None and "another config" in msg


def _score_calls(monkeypatch):
    calls = []
    real = harness.score

    def counting(model, imageset, config, **kw):
        calls.append(config)
        return real(model, imageset, config, **kw)

    monkeypatch.setattr(harness, "score", counting)
    return calls


def test_methods_subset_result_is_not_reused_by_a_default_run(env, monkeypatch, capsys):
    """`salbench run --methods VG` then `make run`: the second run scores both methods again, and says why."""
    kw = dict(progress=True, imageset=env["imageset"], test_split=env["test"], only=[env["refs"]["G"]])
    calls = _score_calls(monkeypatch)
    harness.score_zoo("fmnist", config=CHEAP, **kw)
    capsys.readouterr()
    (res,) = harness.score_zoo("fmnist", config=replace(CHEAP, methods=("VG", "IG")), **kw)
    assert len(calls) == 2 and set(res["summary"]) == {"VG", "IG"}
    out = capsys.readouterr().out
    assert "another config" in out and "methods" in out, out
    df = pd.read_csv(env["lb"] / "fmnist.csv")
    assert sorted(df["method"]) == ["IG", "VG"]
    # the same config again: re-used, and said so
    harness.score_zoo("fmnist", config=replace(CHEAP, methods=("VG", "IG")), **kw)
    assert len(calls) == 2
    out = capsys.readouterr().out
    assert f"re-using the stored result of {env['refs']['G']}" in out and "scored on" in out, out
    # library callers can take the lines themselves
    msgs = []
    harness.score_zoo("fmnist", config=replace(CHEAP, methods=("VG", "IG")), notify=msgs.append, **kw)
    assert len(msgs) == 1 and "re-using" in msgs[0] and capsys.readouterr().out == ""


def test_batch_size_that_changes_the_draws_is_rescored(env, monkeypatch):
    n = len(env["imageset"])
    kw = dict(progress=False, imageset=env["imageset"], test_split=env["test"], only=[env["refs"]["N"]])
    calls = _score_calls(monkeypatch)
    harness.score_zoo("fmnist", config=replace(CHEAP, batch_size=n), **kw)
    harness.score_zoo("fmnist", config=replace(CHEAP, batch_size=10 * n), **kw)  # same draws: re-used
    assert len(calls) == 1
    (res,) = harness.score_zoo("fmnist", config=replace(CHEAP, batch_size=n // 2), **kw)
    assert len(calls) == 2 and res["config"]["batch_size"] == n // 2


def test_result_scored_on_another_device_type_is_rescored(env, monkeypatch, capsys):
    """An old-style file (no identity field) scored on CUDA is not re-used for a CPU score; with its
    device back to cpu it is (the identity is computed from its stored config)."""
    kw = dict(progress=False, imageset=env["imageset"], test_split=env["test"], only=[env["refs"]["A"]])
    harness.score_zoo("fmnist", config=CHEAP, **kw)
    (path,) = (env["lb"] / "results" / "fmnist").glob("*.json")

    def rewrite(device):
        doc = json.loads(path.read_text())
        doc.pop("identity", None)
        doc["config"]["device"] = device
        doc["digest"] = R.content_digest(doc)  # as if written so (a hand edit without it is refused)
        path.write_text(json.dumps(doc))

    calls = _score_calls(monkeypatch)
    rewrite("cpu")
    harness.score_zoo("fmnist", config=CHEAP, **kw)
    assert calls == []
    rewrite("cuda:0")
    capsys.readouterr()
    (res,) = harness.score_zoo("fmnist", config=CHEAP, **{**kw, "progress": True})
    assert len(calls) == 1 and res["config"]["device"] == "cpu"
    out = capsys.readouterr().out
    assert "device_type: cuda -> cpu" in out, out
    doc = json.loads(path.read_text())
    assert doc["config"]["device"] == "cpu" and doc["identity"] == R.result_identity(
        sha256=doc["model"]["sha256"], protocol=PROTOCOL_VERSION, images_sha256=env["imageset"].images_sha256,
        n_images=len(env["imageset"]), config=scoring.resolve_config(CHEAP, "fmnist").to_dict())


def test_saved_result_carries_its_identity(env):
    harness.score_zoo("fmnist", config=CHEAP, progress=False, imageset=env["imageset"], test_split=env["test"],
                      only=[env["refs"]["N"]])
    (path,) = (env["lb"] / "results" / "fmnist").glob("*.json")
    doc = json.loads(path.read_text())
    want = R.result_identity(sha256=doc["model"]["sha256"], protocol=PROTOCOL_VERSION, images_sha256=env["imageset"].images_sha256,
                             n_images=len(env["imageset"]), config=scoring.resolve_config(CHEAP, "fmnist").to_dict())
    assert doc["identity"] == want
    doc.pop("identity")
    assert R.identity_of(doc) == want  # a file written before the field existed


def test_card_fields_win_over_a_reused_results_model_block(tmp_path):
    result = {"model": {"id": "old-id", "sha256": SHA}, "created": "2020-01-01T00:00:00+00:00", "dataset": "fmnist",
              "protocol": "v1", "imageset": {"images_sha256": IMG, "n": 40}, "config": CHEAP.to_dict()}
    card = {"id": "new-id", "sha256": SHA, "dataset": "fmnist", "source": "submission"}
    p = R.save_result(result, card, root=tmp_path)
    doc = json.loads(p.read_text())
    assert doc["model"]["id"] == "new-id" and doc["model"]["source"] == "submission"
    assert doc["created"] == "2020-01-01T00:00:00+00:00"  # when it was scored


def test_device_type_helper():
    assert [R.device_type(d) for d in ("cpu", "cuda", "cuda:1", "mps", "CUDA:0")] == ["cpu", "cuda", "cuda", "mps", "cuda"]
    assert R.device_type("cuda:1") == torch.device("cuda:1").type
