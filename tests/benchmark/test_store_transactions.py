"""Issue 15: a submission lands all or nothing. Killed at every write boundary in turn, the store
is either as before or completed by the next command (which says so); the next command leaves no
temporary file or journal behind; a name is checked under the lock, so of two submissions of
different weights under one name only the first lands; waiting for the lock is bounded."""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from filelock import FileLock
from safetensors.torch import save_file

from salbench.benchmark import harness
from salbench.benchmark import leaderboard as L
from salbench.benchmark import store
from salbench.benchmark import submit as S
from salbench.benchmark.cli import main
from salbench.benchmark.results import Result
from salbench.model_zoo.architectures import build

from .conftest import FAST

CHEAP = replace(FAST, methods=("VG",), accuracy=False)


class Killed(BaseException):
    """Stands in for SIGKILL: not an Exception, so no `except Exception` clean-up runs."""


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


def _debris(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.name.endswith(".tmp") or p.name.endswith(".journal.json"))


def _weights(tmp: Path, seed: int, name: str) -> Path:
    torch.manual_seed(seed)
    f = tmp / name
    save_file(build("lenet").state_dict(), str(f))
    return f


@pytest.fixture
def base(env):
    """A board with one zoo result on it: the 'before' state of a submission."""
    harness.score_zoo("fmnist", config=CHEAP, progress=False, imageset=env["imageset"], test_split=env["test"],
                      only=[env["refs"]["A"]])
    return env


def test_kill_at_every_write_boundary_leaves_old_or_completed_state(base, tmp_path, monkeypatch, capsys):
    env, lb = base, base["lb"]
    f = _weights(tmp_path, 5, "mine.safetensors")
    prepared = S.prepare_submission(f, arch="lenet", dataset="fmnist", name="atomic")
    res = harness.score(prepared[0], env["imageset"], CHEAP, test_split=env["test"], progress=False).to_dict()
    res["created"] = "2026-01-01T00:00:00+00:00"
    monkeypatch.setattr(S, "prepare_submission", lambda *a, **k: (prepared[0], dict(prepared[1]), prepared[2]))
    monkeypatch.setattr(harness, "score", lambda *a, **k: Result.from_dict(dict(res)))
    # band=False: the numerical band re-scores for real (and records its wall time), while this test
    # needs every run to store the same bytes; bands are tested in test_bands.py
    kw = dict(arch="lenet", dataset="fmnist", name="atomic", config=CHEAP, progress=False, rescore=True,
              imageset=env["imageset"], test_split=env["test"], band=False)
    regen = dict(images_sha256=env["imageset"].images_sha256)

    snapshot = tmp_path / "before"
    shutil.copytree(lb, snapshot)
    before = _tree(lb)
    harness.submit(f, **kw)
    after = _tree(lb)
    assert after != before and not _debris(lb)

    # every boundary: the three staged files, the journal, three renames, six board files, the end
    counter = {"n": 0, "kill_at": None, "labels": []}

    def boundary(label):
        counter["labels"].append(label)
        counter["n"] += 1
        if counter["n"] == counter["kill_at"]:
            raise Killed(label)

    real_write = L.atomic_write_bytes

    def write_board_file(path, data):
        path = Path(path)
        # killed while writing: a half-written hidden temporary file stays behind
        (path.parent / f".{path.name}.killed.tmp").write_bytes(data[: len(data) // 2])
        boundary(f"writing {path.name}")
        (path.parent / f".{path.name}.killed.tmp").unlink()
        real_write(path, data)

    monkeypatch.setattr(store, "_boundary", boundary)
    monkeypatch.setattr(L, "atomic_write_bytes", write_board_file)
    shutil.rmtree(lb)
    shutil.copytree(snapshot, lb)
    harness.submit(f, **kw)  # count the boundaries of one clean run
    n_boundaries = counter["n"]
    assert n_boundaries >= 14, counter["labels"]

    outcomes = []
    for k in range(1, n_boundaries + 1):
        shutil.rmtree(lb)
        shutil.copytree(snapshot, lb)
        counter.update(n=0, kill_at=k, labels=[])
        with pytest.raises(Killed):
            harness.submit(f, **kw)
        journal = store.journal_path("fmnist", lb)
        label = counter["labels"][-1]
        if not journal.exists():  # killed before the journal landed, or after it was removed
            clean = {p: h for p, h in _tree(lb).items() if not p.endswith(".tmp")}
            assert clean in (before, after), f"killed at {label!r}: a half-stored submission without a journal"
        counter.update(kill_at=None)
        capsys.readouterr()
        harness.regenerate("fmnist", **regen)  # the next command
        said = capsys.readouterr().err
        assert not _debris(lb), f"killed at {label!r}: debris {_debris(lb)}"
        state = _tree(lb)
        assert state in (before, after), f"killed at {label!r}: neither the old nor the new store"
        outcomes.append((label, "new" if state == after else "old", "completed" in said))
    # before the journal: old; from the journal on: the next command completes it and says so
    first_new = next(i for i, o in enumerate(outcomes) if o[1] == "new")
    assert outcomes[first_new][0] == "journal written", outcomes
    assert all(o[1] == "old" for o in outcomes[:first_new]) and all(o[1] == "new" for o in outcomes[first_new:])
    assert all(o[2] for o in outcomes[first_new:-1]), outcomes  # completed and said so (the last had finished)


def test_leftover_tmp_files_are_removed_by_the_next_command(base, capsys):
    lb = base["lb"]
    debris = [lb / ".fmnist.csv.x1y2.tmp", lb / "results" / "fmnist" / ".abc-v1.json.zz.tmp",
              lb / "submissions" / "fmnist" / ".fmnist-sub-x.json.qq.tmp"]
    for p in debris:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half")
    other = lb / ".cifar10.csv.k.tmp"  # another dataset's lock guards that one
    other.write_bytes(b"x")
    capsys.readouterr()
    harness.regenerate("fmnist", images_sha256=base["imageset"].images_sha256)
    assert not any(p.exists() for p in debris) and other.exists()
    assert "removed 3 temporary file(s)" in capsys.readouterr().err


def test_same_name_twice_at_once_only_one_lands(base, tmp_path, monkeypatch):
    """The second submission (different weights, same --name) lands while the first is scoring:
    the first is refused under the lock and writes nothing."""
    env = base
    first, second = _weights(tmp_path, 1, "first.safetensors"), _weights(tmp_path, 2, "second.safetensors")
    real_score = harness.score
    kw = dict(arch="lenet", dataset="fmnist", name="same", config=CHEAP, progress=False,
              imageset=env["imageset"], test_split=env["test"])
    landed = {}

    def score_while_other_lands(*a, **k):
        monkeypatch.setattr(harness, "score", real_score)
        landed["card"], _ = harness.submit(second, **kw)  # passes its own checks, lands first
        return real_score(*a, **k)

    monkeypatch.setattr(harness, "score", score_while_other_lands)
    with pytest.raises(S.SubmissionError, match="already used"):
        harness.submit(first, **kw)
    cards = S.list_submission_cards("fmnist")
    assert [c["sha256"] for c in cards] == [landed["card"]["sha256"]]
    subs = sorted(p.name for p in (env["lb"] / "submissions" / "fmnist").iterdir())
    assert subs == sorted([f"{landed['card']['id']}.json", landed["card"]["weights"]]), subs
    assert list(pd.read_csv(env["lb"] / "fmnist.csv")["id"]).count("fmnist-sub-same") == 1
    assert not _debris(env["lb"])


def test_waiting_for_the_lock_is_announced_and_bounded(base, monkeypatch, capsys):
    monkeypatch.setenv("SALBENCH_LOCK_TIMEOUT", "1.5")
    lb = base["lb"]
    before = _tree(lb)
    held = FileLock(str(lb / ".fmnist.lock"))
    import threading

    ready, release = threading.Event(), threading.Event()

    def hold():  # another "process" holds the lock (a thread: filelock locks are per thread)
        with held:
            ready.set()
            release.wait(30)

    t = threading.Thread(target=hold)
    t.start()
    ready.wait(10)
    try:
        with pytest.raises(store.StoreBusyError) as e:
            harness.regenerate("fmnist", images_sha256=base["imageset"].images_sha256)
    finally:
        release.set()
        t.join()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "waiting for" in err[0] and "SALBENCH_LOCK_TIMEOUT" in err[0], err
    assert "still held" in str(e.value) and len(str(e.value).splitlines()) == 1
    assert _tree(lb) == before


def test_a_read_only_store_is_refused_before_scoring(env, tmp_path, monkeypatch, capsys):
    f = _weights(tmp_path, 9, "ro.safetensors")
    scored = []
    monkeypatch.setattr(harness, "score", lambda *a, **k: scored.append(1))
    monkeypatch.setattr(store.os, "access", lambda p, mode: False)  # as root, chmod does not stop writes
    rc = main(["score", str(f), "--arch", "lenet", "--dataset", "fmnist", "--name", "ro", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "not a writable folder" in err and len(err.splitlines()) == 1, err
    assert scored == [] and not env["lb"].exists()
