"""Issue 28 (target): a kill -9 at any moment of a real `salbench score` (a subprocess, not a
simulated kill in-process) leaves a store that the next command recovers: afterwards the store holds
either no trace of the submission or all of it (card, weights, result, board row), every file in it
reads back (digest, sha256), and no temporary file or journal is left.

The moments are spread evenly over the wall time of one undisturbed run: 4 in the default suite,
20 in the slow suite (`make test-slow`)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from safetensors.torch import save_file

from salbench.benchmark import store
from salbench.benchmark.results import list_results

from .conftest import quick_train

NAME = "kill nine"
SID = "fmnist-sub-kill-nine"


def _cmd(weights: Path) -> list[str]:
    return [sys.executable, "-m", "salbench.benchmark.cli", "--threads", "1", "score", str(weights), "--arch", "lenet",
            "--dataset", "fmnist", "--name", NAME, "--methods", "VG", "--no-band", "--quiet"]


def _state(lb: Path) -> dict:
    """What the store says about the submission, checked for consistency."""
    sdir = lb / "submissions" / "fmnist"
    cards = sorted(sdir.glob("*.json")) if sdir.is_dir() else []
    weights = sorted(sdir.glob("*.safetensors")) if sdir.is_dir() else []
    results = [d for d in list_results("fmnist", root=lb / "results") if d["model"]["id"] == SID]  # digest-checked
    board = pd.read_csv(lb / "fmnist.csv") if (lb / "fmnist.csv").is_file() else pd.DataFrame({"id": []})
    debris = sorted(str(p.relative_to(lb)) for p in lb.rglob("*") if p.name.endswith((".tmp", ".journal.json")))
    on_board = SID in set(board["id"])
    if cards:
        card = json.loads(cards[0].read_text())
        assert hashlib.sha256((sdir / card["weights"]).read_bytes()).hexdigest() == card["sha256"]
    return {"cards": len(cards), "weights": len(weights), "results": len(results), "on_board": on_board,
            "debris": debris}


NONE = {"cards": 0, "weights": 0, "results": 0, "on_board": False, "debris": []}
ALL = {"cards": 1, "weights": 1, "results": 1, "on_board": True, "debris": []}


@pytest.mark.parametrize("moments", [4, pytest.param(20, marks=pytest.mark.slow)])
def test_kill_nine_at_spread_moments_of_a_real_score_is_recovered(env, fmnist_small, tmp_path, moments):
    lb = env["lb"]
    lb.mkdir(parents=True, exist_ok=True)
    w = tmp_path / "mine.safetensors"
    save_file(quick_train(fmnist_small[0], seed=21, steps=30).state_dict(), str(w))
    snapshot = tmp_path / "before"
    shutil.copytree(lb, snapshot)
    t0 = time.monotonic()
    done = subprocess.run(_cmd(w), capture_output=True, text=True, timeout=600)
    wall = time.monotonic() - t0
    assert done.returncode == 0, done.stderr[-2000:]
    assert _state(lb) == ALL
    outcomes = []
    for i in range(moments):
        shutil.rmtree(lb)
        shutil.copytree(snapshot, lb)
        at = wall * (i + 0.5) / moments
        p = subprocess.Popen(_cmd(w), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            p.wait(timeout=at)
            finished = True
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)
            finished = False
        with store.StoreLock("fmnist", lb, say=lambda m: None):  # the next command
            pass
        state = _state(lb)
        assert state in (NONE, ALL), f"killed at {at:.1f} s of {wall:.1f} s: {state}"
        outcomes.append((round(at, 1), finished, state == ALL))
    # the moments cover the run: early kills leave nothing, and the store is whole either way
    assert not outcomes[0][2], outcomes
