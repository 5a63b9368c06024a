"""Slow end-to-end runs (`make test-slow`): the CLI trains a zoo from recipes, builds an image set,
scores it and writes a leaderboard, in private folders; and a committed zoo entry reproduces."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from model_zoo import zoo

pytestmark = pytest.mark.slow
SALBENCH = [sys.executable, "-m", "benchmark.cli", "--threads", "1"]


def _run(args, env):
    out = subprocess.run(SALBENCH + args, env=env, capture_output=True, text=True, timeout=3600)
    assert out.returncode == 0, out.stderr[-2000:]
    return out


def test_cli_pipeline_on_tiny_recipes(tmp_path):
    env = {**os.environ, "SALBENCH_ZOO_DIR": str(tmp_path / "zoo"), "SALBENCH_IMAGESETS_DIR": str(tmp_path / "sets"),
           "SALBENCH_LEADERBOARDS_DIR": str(tmp_path / "lb"), "OMP_NUM_THREADS": "1"}
    for v in ("N", "A", "G"):
        _run(["train", "--dataset", "fmnist", "--variant", v, "--preset", "tiny", "--work-dir", str(tmp_path / "runs"),
              "--quiet"], env)
    cards = sorted((tmp_path / "zoo" / "cards").glob("*.json"))
    assert len(cards) == 3
    refs = [f"--ref={json.loads(c.read_text())['variant']}={c.stem}" for c in cards]
    # tiny models agree on few images: a 20-image set
    _run(["imageset", "build", "--dataset", "fmnist", "--n", "20", *refs], env)


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
    env = {**os.environ, "SALBENCH_ZOO_DIR": str(tmp_path / "zoo"), "SALBENCH_IMAGESETS_DIR": str(tmp_path / "sets"),
           "SALBENCH_LEADERBOARDS_DIR": str(tmp_path / "lb"), "OMP_NUM_THREADS": "1"}
    test_cli_pipeline_on_tiny_recipes(tmp_path)
    weights = next((tmp_path / "zoo" / "checkpoints").glob("fmnist-lenet-G-tiny-*.safetensors"))
    out = _run(["score", str(weights), "--arch", "lenet", "--dataset", "fmnist", "--name", "tiny G",
                "--smoothing", "gaussian:1", "--quiet"], env)
    assert "scored fmnist-sub-tiny-G" in out.stdout
    df = pd.read_csv(tmp_path / "lb" / "fmnist.csv")
    assert set(df["id"]) == {"fmnist-sub-tiny-G"} and len(df) == 2
    assert Path(tmp_path / "lb" / "results" / "fmnist").is_dir()
