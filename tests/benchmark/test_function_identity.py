"""Issue 28 (item 4): everything that changes the function a submission computes is in its result
identity. The same weights re-sent with another normalisation, smoothing or key reading are scored
again (and the reason named); the committed zoo results keep the identities they were stored with."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from safetensors.torch import save_file

from salbench.benchmark import harness
from salbench.benchmark import results as R

from .conftest import FAST, quick_train

CHEAP = replace(FAST, methods=("VG",), accuracy=False)
COMMITTED = sorted((Path(__file__).resolve().parents[2] / "leaderboards" / "results").glob("*/*.json"))


@pytest.fixture
def weights(fmnist_small, tmp_path):
    f = tmp_path / "mine.safetensors"
    save_file(quick_train(fmnist_small[0], seed=13, steps=30).state_dict(), str(f))
    return f


def _submit(env, f, said, **kw):
    return harness.submit(f, arch="lenet", dataset="fmnist", name="mine", config=CHEAP, progress=False,
                          imageset=env["imageset"], test_split=env["test"], band=False, notify=said.append, **kw)


@pytest.mark.parametrize("change, kw, field", [
    ("normalisation", dict(normalization={"mean": [0.5], "std": [0.5]}), "normalization"),
    ("normalisation changed again", dict(normalization={"mean": [0.2860], "std": [0.3530]}), "normalization"),
])
def test_a_resubmission_that_changes_the_function_is_scored_again(env, weights, change, kw, field):
    said: list[str] = []
    card1, res1 = _submit(env, weights, said)
    said.clear()
    _submit(env, weights, said)  # the very same submission: re-used
    assert any(m.startswith("re-using") for m in said), said
    said.clear()
    card2, res2 = _submit(env, weights, said, **kw)
    assert card2["sha256"] == card1["sha256"]  # same weights' bytes ...
    why = [m for m in said if m.startswith("scoring ")]
    assert why and field in why[0], said  # ... scored again, and the changed field is named
    stored = R.load_result("fmnist", card2["sha256"], root=env["lb"] / "results")
    assert stored["model"][field] is not None and stored["identity"] != res1.get("identity")
    assert R.identity_of(stored) == R.result_identity(**R._doc_identity_args(stored))


def test_function_fields_cover_submissions_only():
    assert R.function_fields({"source": "zoo", "arch": "lenet"}) is None
    f = R.function_fields({"source": "submission", "arch": "lenet", "normalization": {"mean": [0.5], "std": [0.5]}})
    assert set(f) == set(R.FUNCTION_FIELDS) and f["normalization"] == {"mean": [0.5], "std": [0.5]}
    base = dict(sha256="a" * 64, protocol="v2", images_sha256="b" * 64, n_images=10,
                config={"methods": ["VG"], "ig_steps": 50, "sigmas": [0.1], "ros_samples": 5, "ros_variant": "paper",
                        "road_percentages": [10], "road_noise": 0.01, "seed": 0, "batch_size": 10})
    ids = {R.result_identity(**base, function=fn) for fn in
           (None, f, {**f, "normalization": None}, {**f, "key_map": "timm"}, {**f, "state_key": "model"},
            {**f, "arch": "resnet8"}, {**f, "smoothing": {"filter": "gaussian", "placement": 1}})}
    assert len(ids) == 7


@pytest.mark.skipif(not COMMITTED, reason="no committed results")
@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_committed_results_keep_their_stored_identity(path):
    doc = json.loads(path.read_bytes())
    assert R.result_identity(**R._doc_identity_args(doc)) == doc["identity"]
