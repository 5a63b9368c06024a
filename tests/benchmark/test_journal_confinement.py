"""Issue 28 (items 1 and 5): recovery completes only what the store wrote, and `salbench remove`.

A journal planted in ``leaderboards/`` (a pull request can add one) must not make the next command
rename, write or delete anything outside the dataset's store folders, follow a link, or run
anything: it is refused with one line (exit 2 from the CLI), moved aside, and nothing it names is
touched. `salbench remove NAME` takes a submission off the board all or nothing."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from salbench.benchmark import harness
from salbench.benchmark import leaderboard as L
from salbench.benchmark import store
from salbench.benchmark import submit as S
from salbench.benchmark.cli import main
from salbench.model_zoo.architectures import build

from .conftest import FAST
from .test_store_transactions import Killed  # stands in for SIGKILL

CHEAP = replace(FAST, methods=("VG",), accuracy=False)


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.is_symlink(), p.read_bytes() if p.is_file() and not p.is_symlink() else None)
            for p in sorted(root.rglob("*")) if not p.name.endswith(".lock")}


@pytest.fixture
def store_dirs(tmp_path, monkeypatch):
    """An empty store (leaderboards folder) and an 'outside' folder the attacks aim at."""
    lb, outside = tmp_path / "leaderboards", tmp_path / "outside"
    for d in (lb / "results" / "fmnist", lb / "submissions" / "fmnist", outside):
        d.mkdir(parents=True)
    (outside / "precious.json").write_text('{"keep": true}\n')
    monkeypatch.setenv("SALBENCH_LEADERBOARDS_DIR", str(lb))
    return lb, outside


def _plant(lb: Path, journal: dict | str) -> Path:
    j = store.journal_path("fmnist", lb)
    j.write_text(journal if isinstance(journal, str) else json.dumps(journal))
    return j


def _submit_journal(staged: Path, target: Path, data: bytes, *, stage: bool = True) -> dict:
    if stage:
        staged.parent.mkdir(parents=True, exist_ok=True)
        staged.write_bytes(data)
    return {"op": "submit", "id": "fmnist-sub-evil", "files": [[str(staged), str(target), _sha(data)]],
            "regenerate": {"results_root": None, "images_sha256": None}}


def _hostile_journals(lb: Path, outside: Path) -> dict[str, dict | str]:
    site = outside / "site-packages"
    site.mkdir(exist_ok=True)
    res = lb / "results" / "fmnist"
    payload = b"import os; open('PWNED', 'w')\n"
    return {
        "absolute path outside the store": _submit_journal(site / ".evil.pth.x1.tmp", site / "evil.pth", payload),
        "dot-dot out of the results folder": _submit_journal(
            res / ".x.json.a.tmp", res / ".." / ".." / ".." / "outside" / "x.json", b"{}"),
        "a .pth file inside the store": _submit_journal(res / ".evil.pth.b.tmp", res / "evil.pth", payload),
        "a staged file that is not the target's temporary file": _submit_journal(
            outside / "payload.bin", res / "abcd-v2.json", b"{}"),
        "removal of a file outside": {"op": "remove", "id": "x",
                                      "remove": [[str(outside / "precious.json"),
                                                  _sha((outside / "precious.json").read_bytes())]]},
        "unknown operation": {"op": "exec", "files": []},
        "regenerate from another results folder": {
            **_submit_journal(res / ".r-v2.json.c.tmp", res / "r-v2.json", b"{}"),
            "regenerate": {"results_root": str(outside), "images_sha256": None}},
    }


@pytest.mark.parametrize("case", ["absolute path outside the store", "dot-dot out of the results folder",
                                  "a .pth file inside the store",
                                  "a staged file that is not the target's temporary file",
                                  "removal of a file outside", "unknown operation",
                                  "regenerate from another results folder"])
def test_a_hostile_journal_is_refused_and_nothing_it_names_is_touched(store_dirs, case):
    lb, outside = store_dirs
    journal = _hostile_journals(lb, outside)[case]
    before_out, before_lb = _tree(outside), _tree(lb)
    j = _plant(lb, journal)
    with pytest.raises(store.JournalRefused) as e:
        with store.StoreLock("fmnist", lb):
            pass
    msg = str(e.value)
    assert "\n" not in msg and "refused" in msg and "moved aside" in msg
    assert _tree(outside) == before_out, "a file outside the store was written, renamed or removed"
    after = _tree(lb)
    aside = f".fmnist.journal.refused.json"
    assert not j.exists() and aside in after
    # apart from the journal moved aside, the store is as it was (staged payloads left where they were)
    assert {k: v for k, v in after.items() if k != aside} == {k: v for k, v in before_lb.items() if k != j.name}
    # the next command goes on normally
    with store.StoreLock("fmnist", lb):
        pass


def test_a_linked_results_folder_is_never_written_through(store_dirs):
    lb, outside = store_dirs
    res = lb / "results" / "fmnist"
    shutil.rmtree(res)
    res.symlink_to(outside, target_is_directory=True)  # planted: the dataset folder leads elsewhere
    (outside / ".x-v2.json.d.tmp").write_bytes(b"{}")  # looks like debris through the link
    _plant(lb, _submit_journal(res / ".y-v2.json.e.tmp", res / "y-v2.json", b"{}"))  # staged through the link
    before = _tree(outside)
    with pytest.raises(store.JournalRefused):
        with store.StoreLock("fmnist", lb):
            pass
    assert _tree(outside) == before
    # debris clean-up does not follow the link either
    with store.StoreLock("fmnist", lb):
        pass
    assert _tree(outside) == before


def test_a_journal_that_is_a_link_or_a_fifo_is_refused_without_following_or_hanging(store_dirs):
    lb, outside = store_dirs
    j = store.journal_path("fmnist", lb)
    real = outside / "journal.json"
    real.write_text(json.dumps(_submit_journal(lb / "results" / "fmnist" / ".z-v2.json.f.tmp",
                                               lb / "results" / "fmnist" / "z-v2.json", b"{}")))
    j.symlink_to(real)
    with pytest.raises(store.JournalRefused, match="link or not a regular file"):
        with store.StoreLock("fmnist", lb):
            pass
    assert real.is_file() and not (lb / "results" / "fmnist" / "z-v2.json").exists()
    os.mkfifo(j)
    with pytest.raises(store.JournalRefused):
        with store.StoreLock("fmnist", lb):
            pass


def test_a_staged_file_whose_bytes_are_not_the_journalled_ones_is_left_alone(store_dirs, capsys):
    lb, _ = store_dirs
    res = lb / "results" / "fmnist"
    journal = _submit_journal(res / ".k-v2.json.g.tmp", res / "k-v2.json", b'{"a": 1}')
    (res / ".k-v2.json.g.tmp").write_bytes(b'{"a": 2}')  # swapped after journalling
    _plant(lb, journal)
    with store.StoreLock("fmnist", lb):
        pass
    assert not (res / "k-v2.json").exists()
    assert "could not complete" in capsys.readouterr().err


def test_the_cli_refuses_a_planted_journal_with_one_line_and_exit_2(store_dirs, capsys):
    lb, outside = store_dirs
    site = outside / "site-packages"
    site.mkdir()
    _plant(lb, _submit_journal(site / ".evil.pth.q.tmp", site / "evil.pth", b"import os\n"))
    code = main(["remove", "anything", "--dataset", "fmnist"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "refused" in err[0], err
    assert not (site / "evil.pth").exists()


def test_a_planted_pth_journal_runs_nothing_in_a_fresh_interpreter(store_dirs, tmp_path):
    """The original attack end to end: a journal that would rename a staged .pth into a folder on
    sys.path; after the next salbench command, a fresh Python start must not run it."""
    lb, outside = store_dirs
    site = outside / "site-packages"
    site.mkdir()
    marker = tmp_path / "PWNED"
    _plant(lb, _submit_journal(site / ".evil.pth.r.tmp", site / "evil.pth",
                               f"import pathlib; pathlib.Path({str(marker)!r}).write_text('x')\n".encode()))
    env = {**os.environ, "SALBENCH_LEADERBOARDS_DIR": str(lb)}
    p = subprocess.run([sys.executable, "-m", "salbench.benchmark.cli", "remove", "x", "--dataset", "fmnist"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "refused" in p.stderr
    subprocess.run([sys.executable, "-c", "import site; site.addsitedir(%r)" % str(site)], timeout=60, check=True)
    assert not (site / "evil.pth").exists() and not marker.exists()


# ---------------------------------------------------------------------------------------------
# salbench remove
# ---------------------------------------------------------------------------------------------

def _files(root: Path) -> dict:
    return {str(p.relative_to(root)): _sha(p.read_bytes()) for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.endswith(".lock")}


@pytest.fixture
def with_submission(env, tmp_path):
    harness.score_zoo("fmnist", config=CHEAP, progress=False, imageset=env["imageset"], test_split=env["test"],
                      only=[env["refs"]["A"]])
    lb = env["lb"]
    before = _files(lb)
    torch.manual_seed(7)
    f = tmp_path / "mine.safetensors"
    save_file(build("lenet").state_dict(), str(f))
    card, _ = harness.submit(f, arch="lenet", dataset="fmnist", name="to be removed", config=CHEAP, progress=False,
                             imageset=env["imageset"], test_split=env["test"], band=False)
    return env, card, before


def test_remove_takes_a_submission_off_the_board(with_submission, capsys):
    env, card, before = with_submission
    lb = env["lb"]
    assert card["id"] in (lb / "fmnist.csv").read_text()
    code = main(["remove", "to be removed", "--dataset", "fmnist"])
    assert code == 0 and "removed" in capsys.readouterr().out
    after = _files(lb)
    assert card["id"] not in (lb / "fmnist.csv").read_text()
    assert not any(card["sha256"][:16] in k or card["id"] in k for k in after)
    # the board is the one before the submission (the zoo row only)
    assert after["fmnist.csv"] == before["fmnist.csv"]


def test_remove_refuses_zoo_models_and_unknown_names_with_one_line(with_submission, capsys):
    env, card, _ = with_submission
    lb = env["lb"]
    snap = _files(lb)
    assert main(["remove", env["refs"]["A"], "--dataset", "fmnist"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "zoo model" in err[0]
    assert main(["remove", "no such thing", "--dataset", "fmnist"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "to be removed" in err[0]  # names what is on the board
    assert _files(lb) == snap


def test_remove_killed_at_every_boundary_is_completed_or_not_started(with_submission, monkeypatch, tmp_path, capsys):
    env, card, _ = with_submission
    lb = env["lb"]
    snapshot = tmp_path / "snap"
    shutil.copytree(lb, snapshot)
    full = _files(lb)
    with store.StoreLock("fmnist", lb):
        store.remove_submission("fmnist", card["id"])
    removed = _files(lb)
    counter = {"n": 0, "kill_at": None, "labels": []}

    def boundary(label):
        counter["labels"].append(label)
        counter["n"] += 1
        if counter["n"] == counter["kill_at"]:
            raise Killed(label)

    monkeypatch.setattr(store, "_boundary", boundary)
    shutil.rmtree(lb)
    shutil.copytree(snapshot, lb)
    with store.StoreLock("fmnist", lb):
        store.remove_submission("fmnist", card["id"])
    n = counter["n"]
    assert n >= 5, counter["labels"]
    for k in range(1, n + 1):
        shutil.rmtree(lb)
        shutil.copytree(snapshot, lb)
        counter.update(n=0, kill_at=k, labels=[])
        with pytest.raises(Killed):
            with store.StoreLock("fmnist", lb):
                store.remove_submission("fmnist", card["id"])
        counter.update(kill_at=None)
        capsys.readouterr()
        with store.StoreLock("fmnist", lb):  # the next command
            pass
        state = {p: h for p, h in _files(lb).items() if not p.endswith(".refused.json")}
        # every boundary lies after the journal landed: the next command completes the removal
        assert state == removed, f"killed at {counter['labels'][-1]!r}: the removal was not completed"
        assert state != full and not any(p.endswith(".refused.json") for p in _files(lb))
