"""Numerical bands and re-score verification (PROTOCOL §8.4, §8.7): benchmark/bands.py, `salbench verify`."""

from __future__ import annotations

import json
import math

import pytest
import torch

from salbench.benchmark import bands as B
from salbench.benchmark import harness
from salbench.benchmark.cli import main
from salbench.benchmark.results import list_results
from salbench.model_zoo import zoo

from .conftest import FAST


def test_ulp_model_moves_every_weight_exactly_one_ulp_up_and_leaves_the_original_alone():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    before = [p.detach().clone() for p in model.parameters()]
    moved = B.ulp_model(model)
    for p0, p, q in zip(before, model.parameters(), moved.parameters()):
        assert torch.equal(p, p0)  # the caller's model is untouched
        assert torch.equal(q, torch.nextafter(p0, torch.full_like(p0, math.inf)))
        assert (q > p0).all() and torch.equal(torch.nextafter(q, torch.full_like(q, -math.inf)), p0)


def test_float64_model_is_a_cast_copy():
    model = torch.nn.Linear(4, 2)
    m64 = B.float64_model(model)
    assert m64 is not None and all(p.dtype == torch.float64 for p in m64.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    x = torch.rand(3, 4)
    torch.testing.assert_close(m64(x.double()).float(), model(x), rtol=1e-5, atol=1e-6)


def test_zoo_results_carry_their_band_and_verify_within_it_on_this_machine(env, capsys):
    harness.score_zoo("fmnist", config=FAST, progress=False, imageset=env["imageset"], test_split=env["test"],
                      only=[env["refs"]["A"]])
    (doc,) = list_results("fmnist")
    band = doc["band"]
    assert band["kinds"] == ["ulp", "float64"]
    names = B.banded_names()
    assert names == ["gini", "ssim_mean", "log10_ros", "log10_mean_ros", "aopc"]
    for m in ("VG", "IG"):
        for n in names:
            v = B.band_of(doc, m, n)
            assert math.isfinite(v) and v >= 0, (m, n)
            # the band is the largest |difference| of the two re-scores from the stored value
            stored = B.point_values(doc)[m][n]
            assert v == pytest.approx(max(abs(band["rescored"][k][m][n] - stored) for k in band["kinds"]), abs=1e-15)
    assert B.band_of(doc, "VG", "gini") < 1e-4  # one ulp or float64 barely moves a mean Gini
    # the band is read from the board too
    import pandas as pd

    board = pd.read_csv(env["lb"] / "fmnist.csv")
    assert {f"{n}_band" for n in names} <= set(board.columns) and board["log10_ros_band"].notna().all()
    assert board["platform"].str.len().gt(0).all() and "ros_ranked" in board.columns
    # a re-score here reproduces every banded aggregate within its band
    checks = B.verify(zoo.load(env["refs"]["A"]), env["imageset"], doc, progress=False)
    assert len(checks) == 2 * len(names) and all(c.ok for c in checks), B.checks_table(checks)
    capsys.readouterr()
    assert main(["verify", env["refs"]["A"], "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "all 10 banded aggregates within their band" in out and "re-scoring on" in out


def test_verify_says_which_aggregate_left_its_band(env, capsys):
    harness.score_zoo("fmnist", config=FAST, progress=False, imageset=env["imageset"], test_split=env["test"],
                      only=[env["refs"]["A"]])
    (doc,) = list_results("fmnist")
    other = zoo.load(env["refs"]["N"])  # other weights: far outside a rounding-level band
    checks = B.verify(other, env["imageset"], doc, progress=False)
    bad = [c for c in checks if not c.ok]
    assert bad and all(c.difference > c.band for c in bad)
    assert "OUTSIDE BAND" in B.checks_table(checks)
    # a result without a band cannot be verified: a clear message, exit 2
    assert main(["verify", "no-such-model"]) != 0
    assert "no stored result" in capsys.readouterr().err


def test_a_result_without_a_band_fails_every_check():
    doc = {"summary": {}, "band": None}
    assert math.isnan(B.band_of(doc, "VG", "gini"))
    c = B.Check("VG", "gini", 0.5, 0.5, float("nan"))
    assert not c.ok and c.difference == 0.0
    assert json.dumps(B.Check("VG", "gini", 0.5, 0.6, 0.2).ok) == "true"


def test_a_submission_gets_its_one_ulp_and_float64_band(env, tmp_path):
    from dataclasses import replace

    from safetensors.torch import save_file

    from salbench.model_zoo.architectures import build

    torch.manual_seed(3)
    f = tmp_path / "mine.safetensors"
    save_file(build("lenet").state_dict(), str(f))
    cheap = replace(FAST, methods=("VG",), accuracy=False)
    card, res = harness.submit(f, arch="lenet", dataset="fmnist", name="banded", config=cheap, progress=False,
                               imageset=env["imageset"], test_split=env["test"])
    assert res["band"]["kinds"] == ["ulp", "float64"]  # a registry architecture can be cast
    stored = [d for d in list_results("fmnist") if d["model"]["id"] == card["id"]]
    assert stored and stored[0]["band"]["band"]["VG"].keys() == set(B.banded_names())
