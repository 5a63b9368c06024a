"""Issue 30, item 2: the cost estimate said before scoring (benchmark/cost.py): FLOPs and tensor sizes from
running the model on one and two images, the per-machine calibration (cached), the estimate and the
default time limit derived from it."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from salbench.benchmark import cost as C
from salbench.benchmark import harness
from salbench.benchmark.cli import build_parser
from salbench.benchmark.scoring import ScoreConfig

from .conftest import FAST, quick_train


def _small_cnn() -> nn.Module:
    # conv 1->4 k3 on 8x8 (6x6 out), flatten, linear 144->10
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10)).eval()


def test_flops_and_tensor_sizes_match_a_hand_count():
    model = _small_cnn()
    flags = [p.requires_grad for p in model.parameters()]
    p = C.profile(model, (1, 8, 8))
    conv = 2 * (4 * 6 * 6) * (1 * 3 * 3)  # multiply-adds of the conv, x2
    linear = 2 * 144 * 10
    assert p.forward_flops == conv + linear == 5472
    # backward w.r.t. the input only (frozen parameters, as scoring runs): the same products transposed
    assert p.backward_flops == 2 * (conv + linear)
    # the largest tensor a pass makes: the conv output, 4x6x6 float32 per image
    assert p.peak_tensor_bytes(1) == 4 * 36 * 4 and p.peak_tensor_bytes(250) == 250 * 4 * 36 * 4
    assert p.peak_tensor_bytes(1000, grad=False) == 1000 * 4 * 36 * 4
    assert p.param_bytes == 4 * (4 * 9 + 4 + 1440 + 10)
    assert [q.requires_grad for q in model.parameters()] == flags and not model.training  # put back


def test_profile_runs_an_exported_program(tmp_path):
    from salbench.model_zoo.exported import load_exported

    model = _small_cnn()
    prog = torch.export.export(model, (torch.rand(2, 1, 8, 8),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    f = tmp_path / "m.pt2"
    torch.export.save(prog, str(f))
    mod = load_exported(f)
    assert C.profile(mod, (1, 8, 8)).forward_flops == C.profile(model, (1, 8, 8)).forward_flops == 5472


def _fake_timing(monkeypatch, calls: list):
    """Timing functions that return ``a + b * FLOPs`` exactly, and count their calls."""
    def time_pass(model, shape, batch, kind, dtype, device):
        calls.append(("pass", kind, dtype))
        flops = C.profile(model, shape)
        f = flops.forward_flops if kind == "forward" else flops.backward_flops
        scale = 2.0 if dtype == "float64" else 1.0
        return scale * ((1e-4 if kind == "forward" else 3e-4) + 5e-11 * f)

    def time_imputation(shape, device):
        calls.append(("imputation", shape))
        return 2e-5

    monkeypatch.setattr(C, "_time_pass", time_pass)
    monkeypatch.setattr(C, "_time_imputation", time_imputation)


def test_the_calibration_is_cached_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("SALBENCH_CACHE_DIR", str(tmp_path / "cache"))
    calls: list = []
    _fake_timing(monkeypatch, calls)
    cal = C.calibrate()
    assert calls and (tmp_path / "cache" / "calibration.json").is_file()
    # the fit recovers the line the timings follow
    assert cal.coef["backward"] == pytest.approx([3e-4, 5e-11], rel=1e-6)
    assert cal.coef["forward"] == pytest.approx([1e-4, 5e-11], rel=1e-6)
    for f in (1e3, 1e6, 1e7, 1e9):  # float64 at the nets' ratio (2 in these timings) at any size
        assert cal.pass_seconds("backward", f, "float64") == pytest.approx(2 * cal.pass_seconds("backward", f))
        assert cal.pass_seconds("forward", f, "float64") == pytest.approx(2 * cal.pass_seconds("forward", f))
    doc = json.loads((tmp_path / "cache" / "calibration.json").read_text())
    (entry,) = doc["machines"].values()
    assert entry["key"] == C.machine_key() and entry["key"]["threads"] == torch.get_num_threads()
    calls.clear()
    again = C.calibrate()  # a second call times nothing
    assert calls == [] and again.coef == cal.coef and again.created == cal.created
    C.estimate(_small_cnn_28(), "fmnist", calibration=again)  # the zoo's shapes: no timing either
    assert calls == []
    C.calibrate(force=True)  # --recalibrate
    assert calls


def test_the_float64_ratio_is_interpolated_between_the_nets_and_held_beyond():
    cal = C.Calibration(key={}, created="", load_average=None, points=[], coef={"backward": [1.0, 0.0]},
                        float64={"backward": [[1e6, 1.0], [1e8, 3.0]]})
    assert cal.float64_ratio("backward", 1e3) == 1.0 and cal.float64_ratio("backward", 1e10) == 3.0
    assert cal.float64_ratio("backward", 1e7) == pytest.approx(2.0)
    assert cal.pass_seconds("backward", 1e7, "float64") == pytest.approx(2.0)


def test_a_changed_machine_key_calibrates_again(tmp_path, monkeypatch):
    monkeypatch.setenv("SALBENCH_CACHE_DIR", str(tmp_path))
    calls: list = []
    _fake_timing(monkeypatch, calls)
    C.calibrate()
    calls.clear()
    real = C.machine_key
    monkeypatch.setattr(C, "machine_key", lambda device="cpu": {**real(device), "threads": 999})
    C.calibrate()
    assert calls
    assert len(json.loads((tmp_path / "calibration.json").read_text())["machines"]) == 2


def _small_cnn_28() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(8 * 14 * 14, 10)).eval()


@pytest.fixture
def fake_calibration(tmp_path, monkeypatch):
    monkeypatch.setenv("SALBENCH_CACHE_DIR", str(tmp_path / "cache"))
    calls: list = []
    _fake_timing(monkeypatch, calls)
    return C.calibrate()


def test_the_estimate_grows_with_ig_steps_and_images(fake_calibration):
    model, cal = _small_cnn_28(), fake_calibration
    prof = C.profile(model, (1, 28, 28))

    def est(**kw):
        n = kw.pop("n_images", 1000)
        return C.estimate(model, "fmnist", ScoreConfig(**kw), n_images=n, calibration=cal, prof=prof)

    by_steps = [est(ig_steps=k).total_seconds for k in (1, 2, 10, 50, 100)]
    assert by_steps == sorted(by_steps) and len(set(by_steps)) == 5
    by_images = [est(n_images=n).total_seconds for n in (10, 100, 1000, 5000)]
    assert by_images == sorted(by_images) and len(set(by_images)) == 4
    full = est()
    # the work model: per image 1 + 8 + 5 VG and 50 x 14 IG forward+backward passes, PGD-40 on 1000 test images
    assert full.work.backward == 1000 * (14 + 50 * 14) + 1000 * 40
    # the band: one-ulp + float64 re-scores without accuracy passes, each costing more than nothing
    assert full.float64 and full.band_seconds > 0
    assert est(accuracy=False).scoring_seconds < full.scoring_seconds
    only_vg = est(methods=("VG",))
    assert only_vg.total_seconds < full.total_seconds / 10
    assert C.estimate(model, "fmnist", ScoreConfig(), band=False, calibration=cal, prof=prof).band_seconds == 0


def test_the_default_time_limit_comes_from_the_estimate(fake_calibration):
    e = replace(C.estimate(_small_cnn_28(), "fmnist", calibration=fake_calibration), load_average=None)
    assert e.time_limit() == max(4 * e.total_seconds, e.total_seconds + 900)
    # on busy cores (load average 6 on 2 cores) the run takes ~3x longer in wall time: so does the limit
    busy = replace(e, scoring_seconds=1000.0, band_seconds=2000.0, load_average=6.0, cores=2)
    assert busy.time_limit() == 4 * 3 * 3000.0
    short = replace(e, scoring_seconds=10.0, band_seconds=20.0)
    assert short.time_limit() == 30 + 15 * 60
    long = replace(e, scoring_seconds=1000.0, band_seconds=2000.0, load_average=None)
    assert long.time_limit() == 12000
    line = long.format()
    assert line.startswith("estimated cost on this machine: ~16m40s scoring + ~33m20s band, peak tensor ")
    assert line.endswith("--time-limit defaults to 3h20m") and "FLOP forward" in line
    assert long.format(600).endswith("time limit 10m00s (--time-limit)")
    assert long.format(0).endswith("no time limit")
    busy = replace(long, load_average=5.0, cores=2).format()
    assert "~33m20s band (with the cores to itself; they are busy now, load average 5.0 on 2: expect longer)" in busy
    assert "busy" not in replace(long, load_average=1.5, cores=2).format()
    said = []
    assert C.plan(_small_cnn_28(), "fmnist", ScoreConfig(), time_limit=None, say=said.append) > 900
    assert C.plan(_small_cnn_28(), "fmnist", ScoreConfig(), time_limit=0, say=said.append) is None
    assert C.plan(_small_cnn_28(), "fmnist", ScoreConfig(), time_limit=42.0, say=said.append) == 42.0
    assert len(said) == 3 and all(s.startswith("estimated cost on this machine: ~") for s in said)


def test_cli_time_limit_zero_or_none_means_no_limit():
    p = build_parser()
    for text in ("0", "none", "None"):
        args = p.parse_args(["leaderboard", "--dataset", "fmnist", "--time-limit", text])
        assert args.time_limit == 0.0 and C.explicit_limit(args.time_limit) is None
    assert p.parse_args(["leaderboard", "--dataset", "fmnist"]).time_limit is None
    assert p.parse_args(["leaderboard", "--dataset", "fmnist", "--recalibrate"]).recalibrate
    with pytest.raises(SystemExit):
        p.parse_args(["leaderboard", "--dataset", "fmnist", "--time-limit", "-5"])


def test_submit_says_the_estimate_before_scoring_and_uses_its_time_limit(env, fmnist_small, tmp_path, monkeypatch,
                                                                         fake_calibration):
    w = tmp_path / "mine.safetensors"
    save_file(quick_train(fmnist_small[0], seed=31, steps=20).state_dict(), str(w))
    said: list[str] = []
    seen = {}
    real_score, real_estimate = harness.score, C.estimate

    def score(*a, **kw):
        said.append("<scoring starts>")
        seen["limit"] = kw["deadline"].limit
        return real_score(*a, **kw)

    def estimate(*a, **kw):
        seen["estimate"] = real_estimate(*a, **kw)
        return seen["estimate"]

    monkeypatch.setattr(harness, "score", score)
    monkeypatch.setattr(C, "estimate", estimate)
    harness.submit(w, arch="lenet", dataset="fmnist", name="costly", config=FAST, progress=False,
                   imageset=env["imageset"], test_split=env["test"], band=False, notify=said.append)
    lines = [i for i, m in enumerate(said) if m.startswith("estimated cost on this machine: ")]
    assert len(lines) == 1 and lines[0] < said.index("<scoring starts>"), said
    est = seen["estimate"]
    assert seen["limit"] == est.time_limit() and said[lines[0]].endswith(
        f"--time-limit defaults to {C.format_seconds(est.time_limit())}")
    # sized for this run: the test's image set and test split, FAST's IG steps, no band
    n, n_test = len(env["imageset"]), len(env["test"])
    assert est.band_seconds == 0 and est.work.backward == n * (14 + FAST.ig_steps * 14) + n_test * 40


def test_a_model_the_estimate_cannot_run_gets_one_line_and_no_default_limit(fake_calibration):
    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    said: list[str] = []
    assert C.plan(Broken(), "fmnist", ScoreConfig(), time_limit=None, say=said.append) is None
    assert C.plan(Broken(), "fmnist", ScoreConfig(), time_limit=60.0, say=said.append) == 60.0
    assert said == ["no cost estimate (RuntimeError: boom); no time limit",
                    "no cost estimate (RuntimeError: boom); time limit 1m00s"]
