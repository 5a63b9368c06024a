"""Control explainers (random, edge): the maps, their own results and board, and the flags they raise."""

from __future__ import annotations

import subprocess
import sys

import kornia
import pandas as pd
import pytest
import torch
from scipy import ndimage

from salbench.benchmark import controls as CT
from salbench.benchmark.harness import score_zoo
from salbench.benchmark.scoring import EXPLAINERS, control_methods
from salbench.metrics.controls import edge_map, random_map

from .conftest import FAST


def test_random_map_is_a_function_of_the_image_and_seed():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 8, 8, generator=g)
    a = random_map(x, seed=0)
    assert a.shape == (4, 8, 8) and 0 <= float(a.min()) and float(a.max()) < 1
    # the same image gets the same map whatever the batch around it (same code path: bit-equal by design)
    assert torch.equal(random_map(x[2:3], seed=0)[0], a[2])
    assert torch.equal(random_map(x.flip(0), seed=0).flip(0), a)
    assert not torch.equal(random_map(x, seed=1), a)
    assert not torch.equal(random_map(x + 1e-3, seed=0), a)  # a noisy copy gets another map
    # uniform: mean 1/2, variance 1/12 over many pixels
    big = random_map(torch.rand(64, 1, 28, 28, generator=g), seed=0)
    assert float(big.mean()) == pytest.approx(0.5, abs=0.01) and float(big.var()) == pytest.approx(1 / 12, abs=0.005)


def test_random_map_leaves_the_global_rng_alone():
    x = torch.rand(2, 1, 8, 8)
    state = torch.get_rng_state()
    random_map(x, seed=3)
    assert torch.equal(state, torch.get_rng_state())


def test_edge_map_is_sobel_magnitude_summed_over_channels():
    """Against scipy's Sobel on an RGB image (interior pixels; kornia pads by replication, scipy's
    'nearest' mode is the same padding). kornia normalises the 3x3 kernel by 1/8 and adds eps=1e-6
    under the square root."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 16, 16, generator=g, dtype=torch.float64)
    got = edge_map(None, x, None)
    assert got.shape == (2, 16, 16)
    ref = torch.zeros(2, 16, 16, dtype=torch.float64)
    for b in range(2):
        for c in range(3):
            img = x[b, c].numpy()
            gx = ndimage.sobel(img, axis=1, mode="nearest") / 8
            gy = ndimage.sobel(img, axis=0, mode="nearest") / 8
            ref[b] += torch.from_numpy((gx ** 2 + gy ** 2 + 1e-6) ** 0.5)
    assert torch.allclose(got, ref, atol=1e-9)
    assert torch.allclose(got, kornia.filters.sobel(x).sum(1))


def test_controls_are_registered_and_refused_on_the_model_boards():
    assert control_methods() == ("random", "edge")
    assert all(EXPLAINERS[m].control for m in control_methods()) and not EXPLAINERS["VG"].control
    p = subprocess.run([sys.executable, "-m", "salbench.benchmark.cli", "leaderboard", "--dataset", "fmnist",
                        "--methods", "VG,edge"], capture_output=True, text=True)
    assert p.returncode == 2 and "control explainer" in p.stderr and "salbench controls" in p.stderr


def test_controls_get_their_own_results_board_and_flags(env):
    score_zoo("fmnist", config=FAST, progress=False, imageset=env["imageset"], test_split=env["test"], band=False)
    main_before = pd.read_csv(env["lb"] / "fmnist.csv")
    assert set(main_before["beaten_by_control"].fillna("")) == {""}  # no control scored yet
    stored = sorted((env["lb"] / "results" / "fmnist").glob("*.json"))
    before = {p: p.read_bytes() for p in stored}

    out = CT.score_controls("fmnist", config=FAST, progress=False, imageset=env["imageset"], test_split=env["test"])
    assert len(out) == 3 and all(r["summary"].keys() == {"random", "edge"} for r in out)
    assert all(not r["accuracy"].get("natural") for r in out)  # accuracies live in the model's own result
    # the models' own stored results are untouched; the controls live apart
    assert {p: p.read_bytes() for p in sorted((env["lb"] / "results" / "fmnist").glob("*.json"))} == before
    assert len(list((env["lb"] / "controls" / "fmnist").glob("*.json"))) == 3

    ctl = pd.read_csv(env["lb"] / "fmnist_controls.csv")
    assert len(ctl) == 6 and set(ctl["method"]) == {"random", "edge"} and ctl["control"].all()
    main = pd.read_csv(env["lb"] / "fmnist.csv")
    assert set(main["method"]) == {"VG", "IG"}  # never a control row on the model board
    # the flags are exactly the headline aggregates where a control's point estimate is better
    rows = main.set_index(["id", "method"])
    for (mid, method), row in rows.iterrows():
        want = []
        for name, direction in (("gini", 1), ("ssim_mean", 1), ("log10_ros", -1), ("aopc", 1)):
            for _, c in ctl[ctl["id"] == mid].iterrows():
                if direction * (c[name] - row[name]) > 0:
                    want.append(f"{name}:{c['method']}")
        assert (row["beaten_by_control"] if isinstance(row["beaten_by_control"], str) else "") == ";".join(want)
    # a random map under input noise is another random map: its SSIM is near 0, far below every VG's
    assert (ctl[ctl["method"] == "random"]["ssim_mean"] < 0.1).all()
    assert (ctl[ctl["method"] == "random"]["ssim_mean"].max() < main[main["method"] == "VG"]["ssim_mean"].min())

    # re-used on the next call (same identity), nothing re-scored
    msgs = []
    CT.score_controls("fmnist", config=FAST, imageset=env["imageset"], test_split=env["test"], notify=msgs.append)
    assert len(msgs) == 3 and all(m.startswith("re-using") for m in msgs)


def test_beaten_by_control_respects_each_direction():
    main = pd.DataFrame({"id": ["m", "m", "x"], "method": ["VG", "IG", "VG"], "gini": [0.5, 0.9, 0.5],
                         "ssim_mean": [0.5, 0.5, 0.5], "log10_ros": [2.0, 0.5, 1.0], "aopc": [0.1, 0.3, 0.1]})
    ctl = pd.DataFrame({"id": ["m"], "method": ["edge"], "gini": [0.6], "ssim_mean": [0.5],
                        "log10_ros": [1.0], "aopc": [0.2]})
    assert CT.beaten_by_control(main, ctl) == ["gini:edge;log10_ros:edge;aopc:edge", "", ""]
    assert CT.beaten_by_control(main, pd.DataFrame()) == ["", "", ""]


def test_site_page_lists_controls_and_gates_escaped():
    from salbench.benchmark import site as W

    ctl = [{"id": 'm"><script>', "method": "edge", "gini": "0.7", "gini_lo": "0.69", "gini_hi": "0.71",
            "ssim_mean": "0.75", "log10_ros": "2.1", "aopc": "0.37"}]
    gates = [{"id": "m", "sha256": "ab", "method": "VG", "mprt_spearman": "0.36", "emprt": "0.1",
              "gate": "fail: emprt"}]
    ds = W.DatasetData(name="fmnist", board=[], controls=ctl, gates=gates)
    html = W.render(W.SiteData([ds]))["fmnist_sanity.html"].decode()
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert 'id="controls"' in html and 'id="gates"' in html and "fail: emprt" in html
    empty = W.render(W.SiteData([W.DatasetData(name="fmnist", board=[])]))["fmnist_sanity.html"].decode()
    assert "No fmnist_controls.csv yet" in empty and "No fmnist_gates.csv yet" in empty
