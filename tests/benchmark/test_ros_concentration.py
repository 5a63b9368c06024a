"""benchmarks/ros_concentration.py: the ROS concentration diagnostic, on hand-computed cases and the zoo."""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "ros_concentration.py"


def _module():
    spec = importlib.util.spec_from_file_location("ros_concentration", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_concentration_hand_computed():
    c = _module().concentration(np.array([1.0, 10.0, 100.0, np.nan]), np.array([10.0, 10.0, 10.0, 5.0]))
    assert c["n"] == 3  # the NaN image is left out of both
    assert c["aggregate"] == pytest.approx(math.log10(37.0) - 1.0)
    assert c["median"] == pytest.approx(0.0) and c["g_lower"] == pytest.approx(1 / 3)
    assert c["top_a"] == pytest.approx(1 / 3) and c["top_g"] == pytest.approx(100 / 111)
    # A's largest is the first of the ties (image 0), G's is image 2: only image 1 is left
    assert c["aggregate_wo_top"] == pytest.approx(0.0)


def test_one_exploding_image_carries_the_aggregate_not_the_median():
    rng = np.random.default_rng(0)
    a = 10 ** rng.normal(4, 0.1, 500)
    g = a * 10 ** -0.05  # G is 0.05 lower everywhere
    a[7] = 1e12  # one exploding ratio of A
    c = _module().concentration(g, a)
    assert c["median"] == pytest.approx(-0.05) and c["g_lower"] == 1.0
    assert c["aggregate"] < -2 and c["top_a"] > 0.99
    assert c["aggregate_wo_top"] == pytest.approx(-0.05, abs=0.01)


def test_zoo_pairs_share_preset_and_seed():
    mod = _module()
    found = mod.pairs(mod.list_results("fmnist"))
    # every committed (G, A) pair of one preset and seed: paper-10ep s0-s5 as their trainings land, paper s0-s1
    assert len(found) >= 5 and {(p, s) for *_, p, s in found} >= {("paper-10ep", 0), ("paper-10ep", 1),
                                                                   ("paper-10ep", 2), ("paper", 0), ("paper", 1)}
    for g, a, preset, seed in found:
        gid, aid = g["model"]["id"], a["model"]["id"]
        assert gid.replace("-G-", "-A-") == aid and (seed == 0) == ("-s" not in gid)
        assert g["model"]["preset"] == a["model"]["preset"] == preset


def test_docs_section_matches_the_committed_results():
    mod = _module()
    doc = mod.DOC.read_text()
    assert mod.markdown(mod.zoo_rows()) in doc, \
        "docs/zoo.md's ros-concentration section is stale: run .venv/bin/python benchmarks/ros_concentration.py --write-doc"
