"""Issue 28 (item 3): provenance. Each result says who computed it (``computed_by``), and a row is
marked ``verified`` on the board only after ``salbench verify`` re-scored it here within its bands;
the mark is bound to the result's content, so a hand-forged result (digest recomputed or not) is
never shown as verified, and a re-scored value outside its band removes the mark."""

from __future__ import annotations

import json
from dataclasses import replace

import pandas as pd
import pytest

from salbench.benchmark import bands as B
from salbench.benchmark import harness
from salbench.benchmark import provenance as PV
from salbench.benchmark import results as R
from salbench.benchmark.cli import main
from salbench.benchmark.leaderboard import write_leaderboard

from .conftest import FAST

CHEAP = replace(FAST, methods=("VG",), accuracy=False)


@pytest.fixture
def scored(env):
    harness.score_zoo("fmnist", config=CHEAP, progress=False, imageset=env["imageset"], test_split=env["test"],
                      only=[env["refs"]["A"], env["refs"]["N"]])
    return env


def _board(env) -> pd.DataFrame:
    return pd.read_csv(env["lb"] / "fmnist.csv").set_index("id")


def _forge(path, edit) -> dict:
    doc = json.loads(path.read_bytes())
    edit(doc)
    doc["digest"] = R.content_digest(doc)  # a careful forger recomputes the digest
    path.write_text(json.dumps(doc))
    return doc


def test_scored_results_say_who_computed_them(scored):
    docs = R.list_results("fmnist")
    assert docs and all(d["computed_by"]["code"].startswith("salbench ") for d in docs)
    assert set(_board(scored)["computed_by"]) == {docs[0]["computed_by"]["code"]}
    assert PV.computed_by_label({"versions": {}}) == PV.IMPORTED


def test_verify_marks_the_row_and_a_forged_result_loses_the_mark(scored, capsys):
    env = scored
    a, n = env["refs"]["A"], env["refs"]["N"]
    assert not _board(env)["verified"].any()  # nothing is verified before `salbench verify`
    assert main(["verify", a, "--quiet"]) == 0
    assert "marked verified" in capsys.readouterr().out
    board = _board(env)
    assert board.loc[a, "verified"].all() and not board.loc[n, "verified"].any()
    # forged: a headline value nudged and the digest recomputed -> no longer verified
    path = R.result_path("fmnist", _sha_of(env, a))
    _forge(path, lambda d: d["summary"]["VG"].__setitem__("gini", d["summary"]["VG"]["gini"] + 0.1))
    write_leaderboard("fmnist", images_sha256=env["imageset"].images_sha256)
    assert not _board(env).loc[a, "verified"].any()


def _sha_of(env, mid: str) -> str:
    return next(d["model"]["sha256"] for d in R.list_results("fmnist") if d["model"]["id"] == mid)


def test_a_forged_record_or_ok_flag_is_not_trusted(scored):
    doc = next(d for d in R.list_results("fmnist") if d["model"]["id"] == scored["refs"]["A"])
    pv = B.point_values(doc)
    good = [B.Check(m, k, v, v, B.band_of(doc, m, k)) for m, vals in pv.items() for k, v in vals.items()]
    PV.record_verification(doc, good, {"cpu": "x", "isa": "y", "torch": "z"})
    records = PV.read_records("fmnist")
    assert PV.is_verified(doc, records)
    key = PV.result_key(doc)
    # a record whose re-scored values lie outside the band, even with ok: true, verifies nothing
    bad = json.loads(json.dumps(records))
    bad[key]["ok"] = True
    bad[key]["checks"][0]["rescored"] = bad[key]["checks"][0]["stored"] + 1.0
    assert not PV.is_verified(doc, bad)
    # a record bound to another digest verifies nothing
    other = json.loads(json.dumps(records))
    other[key]["subject"] = "0" * 64
    assert not PV.is_verified(doc, other)
    # a failed re-verification removes the record
    outside = [replace(c, rescored=c.stored + 10 * (c.band + 1)) for c in good]
    PV.record_verification(doc, outside, {})
    assert key not in PV.read_records("fmnist")


def test_unreadable_or_linked_records_verify_nothing(scored, tmp_path, capsys):
    p = PV.records_path("fmnist")
    p.parent.mkdir(parents=True, exist_ok=True)
    elsewhere = tmp_path / "records.json"
    doc = next(iter(R.list_results("fmnist")))
    elsewhere.write_text(json.dumps({PV.result_key(doc): {"subject": doc["digest"], "checks": [
        {"stored": 0.0, "rescored": 0.0, "band": 1.0}]}}))
    p.symlink_to(elsewhere)
    assert PV.read_records("fmnist") == {}
    p.unlink()
    p.write_text("{not json")
    assert PV.read_records("fmnist") == {}
    assert capsys.readouterr().err.count("salbench: warning: verification records") == 2
