"""Slow end-to-end runs (`make test-slow`): the CLI trains a zoo from recipes, builds an image set,
scores it and writes a leaderboard, in private folders; and a committed zoo entry reproduces."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from salbench.model_zoo import zoo

pytestmark = pytest.mark.slow
SALBENCH = [sys.executable, "-m", "salbench.benchmark.cli", "--threads", "1"]


def _run(args, env):
    out = subprocess.run(SALBENCH + args, env=env, capture_output=True, text=True, timeout=3600)
    assert out.returncode == 0, out.stderr[-2000:]
    return out


def _env(tmp_path):
    return {**os.environ, "SALBENCH_ZOO_DIR": str(tmp_path / "zoo"), "SALBENCH_IMAGESETS_DIR": str(tmp_path / "sets"),
            "SALBENCH_LEADERBOARDS_DIR": str(tmp_path / "lb"), "OMP_NUM_THREADS": "1"}


def _tiny_zoo_and_set(tmp_path, env) -> list[Path]:
    """Train the tiny N, A and G recipes into a private zoo and build a 20-image set from them."""
    for v in ("N", "A", "G"):
        _run(["train", "--dataset", "fmnist", "--variant", v, "--preset", "tiny", "--work-dir", str(tmp_path / "runs"),
              "--quiet"], env)
    cards = sorted((tmp_path / "zoo" / "cards").glob("*.json"))
    assert len(cards) == 3
    refs = [f"--ref={json.loads(c.read_text())['variant']}={c.stem}" for c in cards]
    # tiny models agree on few images: a 20-image set
    _run(["imageset", "build", "--dataset", "fmnist", "--n", "20", *refs], env)
    assert (tmp_path / "sets" / "fmnist.json").is_file()
    return cards


def _train_entry(tmp_path, env, variant: str) -> Path:
    """A tiny-recipe model trained with seed 1 outside the zoo (a submission candidate): its weights."""
    entries = tmp_path / "entries"
    _run(["train", "--dataset", "fmnist", "--variant", variant, "--preset", "tiny", "--seed", "1",
          "--work-dir", str(tmp_path / "runs-s1"), "--out", str(entries), "--quiet"], env)
    return next((entries / "checkpoints").glob(f"fmnist-lenet-{variant}-tiny*.safetensors"))


def test_cli_pipeline_on_tiny_recipes(tmp_path):
    """Train, build the set, score all three models on it, write the leaderboard and figures."""
    env = _env(tmp_path)
    _tiny_zoo_and_set(tmp_path, env)
    # the zoo scorer leaves "tiny" presets off the board and a zoo model's weights are not taken as a
    # submission, so the board gets three more tiny models (seed 1, trained outside the zoo) as entries
    ids = set()
    for v in ("N", "A", "G"):
        weights = _train_entry(tmp_path, env, v)
        smoothing = ["--smoothing", "gaussian:1"] if v == "G" else []
        out = _run(["score", str(weights), "--arch", "lenet", "--dataset", "fmnist", "--name", f"tiny {v}",
                    "--quiet", *smoothing], env)
        ids.add(f"fmnist-sub-tiny-{v}")
        assert f"scored fmnist-sub-tiny-{v}" in out.stdout
    # the main job on this private board: regenerates the leaderboard and draws the figures
    out = _run(["run", "--dataset", "fmnist", "--quiet"], env)
    assert all(i in out.stdout for i in ids)  # the printed table
    results = sorted((tmp_path / "lb" / "results" / "fmnist").glob("*.json"))
    assert len(results) == 3, [r.name for r in results]
    df = pd.read_csv(tmp_path / "lb" / "fmnist.csv")
    assert set(df["id"]) == ids and len(df) == 6  # 3 models x (VG, IG)
    assert set(df["method"]) == {"VG", "IG"}
    for col in ("gini", "ssim_mean", "log10_ros", "aopc"):
        assert df[col].notna().all(), col
    assert df["gini"].between(0, 1).all()
    for name in ("fmnist_ssim.csv", "fmnist_road.csv", "figures/fmnist_ssim.png", "figures/fmnist_road.png"):
        assert (tmp_path / "lb" / name).is_file(), name


@pytest.mark.parametrize("variant", ["N"])
def test_zoo_entry_reproduces_from_its_card(tmp_path, variant):
    """`salbench train` with the card's preset gives the card's sha256 (CPU, one thread)."""
    card = zoo.get_card(f"fmnist-lenet-{variant}-paper-10ep")
    env = {**os.environ, "SALBENCH_ZOO_DIR": str(tmp_path / "zoo"), "OMP_NUM_THREADS": "1"}
    _run(["train", "--dataset", "fmnist", "--variant", variant, "--preset", card["preset"],
          "--work-dir", str(tmp_path / "runs"), "--quiet"], env)
    new = json.loads((tmp_path / "zoo" / "cards" / f"{card['id']}.json").read_text())
    assert new["sha256"] == card["sha256"]
    assert new["natural_accuracy"] == card["natural_accuracy"]


def test_cli_submission_on_tiny_set(tmp_path):
    env = _env(tmp_path)
    _tiny_zoo_and_set(tmp_path, env)
    weights = _train_entry(tmp_path, env, "G")
    out = _run(["score", str(weights), "--arch", "lenet", "--dataset", "fmnist", "--name", "tiny G",
                "--smoothing", "gaussian:1", "--quiet"], env)
    assert "scored fmnist-sub-tiny-G" in out.stdout
    df = pd.read_csv(tmp_path / "lb" / "fmnist.csv")
    assert set(df["id"]) == {"fmnist-sub-tiny-G"} and len(df) == 2
    assert Path(tmp_path / "lb" / "results" / "fmnist").is_dir()
