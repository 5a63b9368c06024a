"""benchmarks/compare_results.py: any two stored results compared as the boards compare them."""

import importlib.util
from pathlib import Path

import pandas as pd
import pytest

from salbench.benchmark.results import load_result
from salbench.model_zoo import zoo

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "compare_results.py"


def _module():
    spec = importlib.util.spec_from_file_location("compare_results", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _result(model_id):
    doc = load_result("fmnist", zoo.get_card(model_id)["sha256"])
    if doc is None:
        pytest.skip(f"no stored protocol-v2 result of {model_id} yet (`salbench leaderboard --dataset fmnist`)")
    return doc


def test_rows_equal_the_boards_comparisons():
    mod = _module()
    g, a = _result("fmnist-lenet-G-paper-s1"), _result("fmnist-lenet-A-paper-s1")
    board = pd.read_csv(REPO / "leaderboards" / "fmnist_comparisons.csv")
    board = board[(board["model"] == "fmnist-lenet-G-paper-s1") & (board["reference"] == "fmnist-lenet-A-paper-s1")]
    rows = mod.rows(g, a, ("VG",))
    assert [r["metric"] for r in rows] == ["gini", "ssim_mean", "log10_ros", "aopc"]
    for r in rows:
        b = board[(board["method"] == "VG") & (board["metric"] == r["metric"])].iloc[0]
        assert (r["n_paired"], r["verdict"]) == (b["n_paired"], b["verdict"])
        assert r["delta"] == pytest.approx(b["delta"], rel=1e-5) and r["delta_lo"] == pytest.approx(b["delta_lo"], rel=1e-5)
    md = mod.markdown(g, a, rows)
    assert "| VG | log10_ros |" in md and "fmnist-lenet-G-paper-s1" in md


def test_a_result_against_itself_is_no_difference():
    mod = _module()
    a = _result("fmnist-lenet-A-paper-s1")
    for r in mod.rows(a, a, ("IG",)):
        assert r["delta"] == 0 and r["verdict"] == "no detectable difference"
