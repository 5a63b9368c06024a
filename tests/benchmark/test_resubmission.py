"""One leaderboard entry per checkpoint: the same weights under another name are refused (exit 2,
nothing written, the existing id named); the same name again re-uses the stored result and says so."""

import hashlib
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
from safetensors.torch import save_file

from salbench.benchmark import harness
from salbench.benchmark.cli import main
from salbench.benchmark.submit import SubmissionError
from salbench.model_zoo import zoo

from .conftest import FAST, quick_train

CHEAP = replace(FAST, methods=("VG",), accuracy=False)


def _tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


@pytest.fixture
def submitted(env, fmnist_small, tmp_path):
    f = tmp_path / "mine.safetensors"
    save_file(quick_train(fmnist_small[0], seed=11, steps=30).state_dict(), str(f))
    card, _ = harness.submit(f, arch="lenet", dataset="fmnist", name="first", config=CHEAP, progress=False,
                             imageset=env["imageset"], test_split=env["test"])
    return env, f, card


def test_same_weights_under_a_new_name_are_refused_and_nothing_is_written(submitted, capsys):
    env, f, card = submitted
    before = _tree_digest(env["lb"])
    with pytest.raises(SubmissionError, match="fmnist-sub-first"):
        harness.submit(f, arch="lenet", dataset="fmnist", name="second", config=CHEAP, progress=False,
                       imageset=env["imageset"], test_split=env["test"])
    rc = main(["score", str(f), "--arch", "lenet", "--dataset", "fmnist", "--name", "second", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "fmnist-sub-first" in err and "--name 'first'" in err, err
    assert _tree_digest(env["lb"]) == before  # no second card, no weights copy, same result and CSVs
    assert [p.name for p in (env["lb"] / "submissions" / "fmnist").glob("*.json")] == ["fmnist-sub-first.json"]
    assert set(pd.read_csv(env["lb"] / "fmnist.csv")["id"]) == {"fmnist-sub-first"}


def test_a_zoo_checkpoint_submitted_under_a_name_is_refused(env, tmp_path, capsys):
    card = zoo.get_card(env["refs"]["G"])
    before = _tree_digest(env["tmp"])
    rc = main(["score", str(env["zoo"] / "checkpoints" / card["weights"]), "--arch", "lenet", "--dataset", "fmnist",
               "--name", "stolen", "--smoothing", "gaussian:1", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and env["refs"]["G"] in err and "zoo model" in err, err
    assert _tree_digest(env["tmp"]) == before


def test_resubmission_under_the_same_name_reuses_and_announces(submitted, capsys):
    env, f, card = submitted
    capsys.readouterr()

    def boom(*a, **k):
        raise AssertionError("scored although an identical result is stored")

    orig = harness.score
    harness.score = boom
    try:
        card2, res = harness.submit(f, arch="lenet", dataset="fmnist", name="first", notes="again", config=CHEAP,
                                    progress=True, imageset=env["imageset"], test_split=env["test"])
    finally:
        harness.score = orig
    assert card2["id"] == card["id"] == "fmnist-sub-first"
    out = capsys.readouterr().out
    assert "re-using the stored result of fmnist-sub-first" in out and "scored on" in out, out
    assert set(pd.read_csv(env["lb"] / "fmnist.csv")["id"]) == {"fmnist-sub-first"}
    assert len(list((env["lb"] / "submissions" / "fmnist").glob("*.safetensors"))) == 1



def test_a_scored_submission_prints_its_verdicts_against_the_reference_a_and_g(env, fmnist_small, tmp_path, capsys):
    """After scoring, the CLI says where the row went and the paired verdicts vs the image set's
    reference A and G (PROTOCOL §7)."""
    from salbench.benchmark import score_report
    from salbench.benchmark.cli import _print_verdicts

    cfg = replace(FAST, accuracy=False)
    harness.score_zoo("fmnist", config=cfg, progress=False, imageset=env["imageset"], test_split=env["test"])
    f = tmp_path / "mine.safetensors"
    save_file(quick_train(fmnist_small[0], seed=12, steps=30).state_dict(), str(f))
    card, _ = harness.submit(f, arch="lenet", dataset="fmnist", name="mine", config=cfg, progress=False,
                             imageset=env["imageset"], test_split=env["test"])
    cmp = pd.read_csv(env["lb"] / "fmnist_comparisons.csv")
    assert set(cmp.loc[cmp["model"] == card["id"], "reference"]) == {env["refs"]["A"], env["refs"]["G"]}
    score_report.report("fmnist", card, reused=False)
    _print_verdicts("fmnist", card["id"])
    out = capsys.readouterr().out
    assert "verdicts vs the reference models" in out and f"{(env['lb'] / 'fmnist.csv').resolve()}: 2 row(s)" in out
    assert "rank among the 4 VG rows (1 = best): gini " in out  # N, A, G and the submission
    for ref in (env["refs"]["A"], env["refs"]["G"]):
        assert f"vs {ref}" in out
    assert any(v in out for v in ("better", "worse", "no detectable difference"))
