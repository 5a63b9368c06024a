"""Issue 30 (items 4 and 6): the time left that the scoring bar shows comes from a stage cost model
refined by measured stage times, and is within a factor of 2 of the truth once the first stages are
timed (tested on the committed zoo timings, where one stage costs ~500x another, and on a live run
with a slow explainer); `--time-limit` stops a run cleanly, writing nothing."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path

import pytest
from safetensors.torch import save_file

from salbench import metrics
from salbench.benchmark import harness
from salbench.benchmark import progress as PG
from salbench.benchmark import scoring
from salbench.benchmark.cli import main
from salbench.benchmark.progress import Deadline, StageClock, TimeLimitExceeded, format_seconds, stage_work
from salbench.metrics import protocol as P

from .conftest import FAST, quick_train

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = sorted((ROOT / "leaderboards" / "results").glob("*/*.json"))
STAGES = ("attribution", "gini", "ssim", "ros", "road")


def _replay(timings: dict, n: int, batch: int) -> list[float]:
    """Replay a stored run's stage timings through a StageClock; returns predicted/true total time
    after every stage (the first ~1% of the run, before any IG stage is timed, included)."""
    methods = ("VG", "IG")
    nb = -(-n // batch)
    grid = [(min(batch, n - b * batch), m, st) for b in range(nb) for m in methods for st in STAGES]
    work = {(m, st): stage_work(st, method=m, ig_steps=P.IG_STEPS, n_sigmas=len(P.SSIM_SIGMAS),
                                ros_samples=P.ROS_SAMPLES, road_levels=len(P.ROAD_PERCENTAGES))
            for m in methods for st in STAGES}
    clock = StageClock(grid=grid, work=work)
    true = [k * timings[f"{m}/{st}"] / n for k, m, st in grid]
    total = sum(true) + timings["forward"]
    clock.forward(timings["forward"] / nb, grid[0][0])
    ratios, elapsed = [], timings["forward"] / nb
    for t in true:
        clock.done(t)
        elapsed += t
        ratios.append((elapsed + clock.remaining()) / total)
    return ratios


@pytest.mark.skipif(not COMMITTED, reason="no committed results")
@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_the_time_left_is_within_2x_of_the_truth_on_every_stored_zoo_run(path):
    doc = json.loads(path.read_bytes())
    t = doc["timings"]
    if not all(f"{m}/{s}" in t for m in ("VG", "IG") for s in STAGES):
        pytest.skip("a result of another metric set")
    ratios = _replay(t, doc["imageset"]["n"], doc["config"]["batch_size"])
    bad = [(i, round(r, 2)) for i, r in enumerate(ratios) if not 0.5 <= r <= 2.0]
    assert not bad, f"predicted/true total outside [0.5, 2] after stages {bad}"
    assert ratios[len(ratios) // 2:] == pytest.approx([1.0] * (len(ratios) - len(ratios) // 2), rel=0.35)


def test_a_stage_count_bar_would_be_far_off_on_the_same_runs():
    """What the cost model fixes: tqdm's stages-per-second after the first VG stages."""
    doc = json.loads(COMMITTED[0].read_bytes()) if COMMITTED else None
    if doc is None:
        pytest.skip("no committed results")
    t, n = doc["timings"], doc["imageset"]["n"]
    per_stage_vg = sum(t[f"VG/{s}"] for s in STAGES) / 5 / (n // doc["config"]["batch_size"])
    naive_total = per_stage_vg * 10 * (n // doc["config"]["batch_size"])
    assert naive_total < 0.5 * t["metrics_total"]


def test_format_seconds():
    assert [format_seconds(x) for x in (7.2, 95, 3725, float("nan"))] == ["7s", "1m35s", "1h02m", "?"]


def test_deadline_says_how_far_it_got():
    d = Deadline(0.0, start=time.monotonic() - 1)
    with pytest.raises(TimeLimitExceeded, match=r"past the time limit of 0 s, after 3 of 10.*nothing was written"):
        d.check("after 3 of 10 stages")
    Deadline(None).check("never")


SLOW_S = 0.004  # seconds per image of one call of the slow explainer


@pytest.fixture
def slow_explainer():
    @scoring.register_explainer("SLOWX", "a VG that sleeps: the slow stage of the ETA test")
    def _slow(cfg):
        def ex(model, x, y):
            time.sleep(SLOW_S * len(x))
            return metrics.vanilla_gradient(model, x, y)
        return ex

    yield "SLOWX"
    del scoring.EXPLAINERS["SLOWX"]


def test_the_live_estimate_is_within_2x_with_a_slow_stage(env, slow_explainer, monkeypatch):
    seen = []
    real = StageClock.done

    def done(self, seconds):
        real(self, seconds)
        seen.append((time.perf_counter(), self.remaining()))

    monkeypatch.setattr(StageClock, "done", done)
    cfg = replace(FAST, methods=(slow_explainer,), accuracy=False, batch_size=10)
    t0 = time.perf_counter()
    scoring.score(_model(env), env["imageset"], cfg, progress=False)
    t1 = time.perf_counter()
    total = t1 - t0
    ratios = [((t - t0) + rem) / total for t, rem in seen]
    assert len(ratios) == 4 * 5  # 4 batches x (attribution + 4 metrics)
    bad = [(i, round(r, 2)) for i, r in enumerate(ratios) if not 0.5 <= r <= 2.0]
    assert not bad, bad


def _model(env):
    from salbench.model_zoo import zoo

    return zoo.load(env["refs"]["A"])


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


def test_time_limit_stops_a_submission_cleanly_with_one_line(env, fmnist_small, tmp_path, capsys):
    env["lb"].mkdir(parents=True, exist_ok=True)
    w = tmp_path / "mine.safetensors"
    save_file(quick_train(fmnist_small[0], seed=23, steps=20).state_dict(), str(w))
    before = _tree(env["lb"])
    with pytest.raises(TimeLimitExceeded):
        harness.submit(w, arch="lenet", dataset="fmnist", name="late", config=replace(FAST, accuracy=False),
                       progress=False, imageset=env["imageset"], test_split=env["test"], time_limit=1e-6)
    code = main(["score", str(w), "--arch", "lenet", "--dataset", "fmnist", "--name", "late", "--quiet",
                 "--time-limit", "0.000001"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "time limit" in err[0] and "nothing was written" in err[0], err
    assert _tree(env["lb"]) == before
