"""Issue 28, item 2: regular files only. The store, the image sets, the cards and the ``.pt2`` reader
refuse links, FIFOs, devices and oversize files (and archive members with ``..``, absolute names,
links or folder entries used as files) with one line, never following, writing through or hanging.
A bad file in the results folder is left out with one warning (board regeneration goes on); a bad
explicitly named input is one line and exit 2. Nothing outside the store changes.

Whatever could hang runs under a deadline: ``signal.alarm`` in this process (a blocked FIFO open is
interrupted by it), or a subprocess with a memory cap for ``/dev/zero`` (whose unbounded read no
alarm can interrupt)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from salbench.benchmark import harness
from salbench.benchmark import results as R
from salbench.benchmark import submit as S
from salbench.benchmark.cli import main
from salbench.benchmark.imagesets import MAX_IMAGESET_BYTES, ImageSetError, imageset_path, load_imageset
from salbench.model_zoo import zoo
from salbench.model_zoo.architectures import build
from salbench.model_zoo.safe_files import UnsafeFileError, read_regular
from tests.model_zoo.pt2_craft import PlainLeNet, export_to, members

from .conftest import FAST

CHEAP = replace(FAST, methods=("VG",), accuracy=False)
QUICK = 10.0  # seconds: the bound for every refusal
REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def deadline(seconds: int = 20):
    """Fail (instead of hanging) when the body runs ``seconds``; yields a clock of the elapsed time."""
    def boom(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: it hangs")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    t0 = time.monotonic()
    try:
        yield lambda: time.monotonic() - t0
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _snapshot(*roots: Path) -> dict:
    """Every entry under ``roots`` without following a link: a link by its target, a regular file by
    its sha256, inode and mtime (an atomic replace shows), anything else by its type."""
    out = {}
    for root in roots:
        if not (root.exists() or root.is_symlink()):
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                st = os.lstat(p)
                if stat.S_ISLNK(st.st_mode):
                    out[str(p)] = ("link", os.readlink(p))
                elif stat.S_ISREG(st.st_mode):
                    if not p.name.endswith(".lock"):
                        out[str(p)] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_ino, st.st_mtime_ns)
                elif not stat.S_ISDIR(st.st_mode):
                    out[str(p)] = ("special", stat.S_IFMT(st.st_mode))
    return out


def _one_line(err: str, *expected: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    for e in expected:
        assert e in lines[0], err
    return lines[0]


def _board_ids(env) -> list[str]:
    return list(pd.read_csv(env["lb"] / "fmnist.csv")["id"])


@pytest.fixture
def scored(env, tmp_path):
    """A private store holding the N, A and G results (cheap config, no band) and a folder outside
    it, with a valid result copied there (a file a planted link could lead to)."""
    kw = dict(config=CHEAP, progress=False, imageset=env["imageset"], test_split=env["test"], band=False)
    harness.score_zoo("fmnist", **kw)
    paths = {json.loads(p.read_text())["model"]["variant"]: p for p in (env["lb"] / "results" / "fmnist").glob("*.json")}
    assert set(paths) == {"N", "A", "G"}
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy2(paths["G"], outside / paths["G"].name)
    return {**env, "paths": paths, "outside": outside, "kw": kw}


def _regenerate(env) -> None:
    harness.regenerate("fmnist", images_sha256=env["imageset"].images_sha256)


# ----------------------------------------------------------------------------- the shared reader
def test_read_regular_refuses_every_non_regular_kind_at_once(tmp_path):
    f = tmp_path / "f.json"
    f.write_bytes(b"{}")
    os.symlink(f, tmp_path / "link.json")
    os.mkfifo(tmp_path / "fifo.json")
    os.symlink("/dev/zero", tmp_path / "zero.json")
    (tmp_path / "dir.json").mkdir()
    assert read_regular(f, max_bytes=2) == b"{}"
    with deadline() as elapsed:
        for name, kind in (("link.json", "symbolic link"), ("fifo.json", "FIFO"), ("zero.json", "symbolic link"),
                           ("dir.json", "folder")):
            with pytest.raises(UnsafeFileError, match=kind) as e:
                read_regular(tmp_path / name, max_bytes=1 << 20, what="stored result")
            _one_line(str(e.value), str(tmp_path / name))
        with pytest.raises(UnsafeFileError, match="character device"):
            read_regular("/dev/zero", max_bytes=1 << 20)
        with pytest.raises(UnsafeFileError, match="more than the 1 bytes"):
            read_regular(f, max_bytes=1)
        assert elapsed() < QUICK


def test_an_atomic_write_never_replaces_or_writes_through_a_link_fifo_or_folder(tmp_path):
    target = tmp_path / "outside.json"
    target.write_text("theirs")
    for name, make in (("link.json", lambda p: os.symlink(target, p)), ("fifo.json", os.mkfifo),
                       ("dir.json", lambda p: p.mkdir())):
        make(tmp_path / name)
        before = _snapshot(tmp_path)
        with deadline(), pytest.raises(UnsafeFileError, match="not a regular file"):
            zoo.atomic_write_bytes(tmp_path / name, b"ours")
        assert _snapshot(tmp_path) == before  # no temporary debris either
    assert target.read_text() == "theirs"


# ----------------------------------------------------------------------------- the results folder
def test_a_result_linked_to_a_file_outside_is_not_published_read_or_replaced(scored, capsys, monkeypatch):
    """The reported defect: a link in results/<dataset>/ to a (valid) file elsewhere was published;
    board regeneration and a zoo re-score (even --rescore) now leave it out with one warning."""
    g = scored["paths"]["G"]
    g.unlink()
    os.symlink(scored["outside"] / g.name, g)
    outside_before = _snapshot(scored["outside"])
    capsys.readouterr()
    with deadline() as elapsed:
        _regenerate(scored)
        assert elapsed() < QUICK
    _one_line(capsys.readouterr().err, str(g), "symbolic link", "left out of the board")
    assert scored["refs"]["G"] not in _board_ids(scored) and scored["refs"]["A"] in _board_ids(scored)
    for rescore in (False, True):  # `salbench leaderboard` (and --rescore): skipped, never written through
        monkeypatch.setattr(R, "_WARNED", set())  # the line is said once per process: show this run's
        with deadline():
            harness.score_zoo("fmnist", **scored["kw"], rescore=rescore, only=[scored["refs"]["G"]])
        err = capsys.readouterr().err
        assert str(g) in err and "symbolic link" in err and len(err.strip().splitlines()) == 1, err
        assert g.is_symlink() and scored["refs"]["G"] not in _board_ids(scored)
    assert _snapshot(scored["outside"]) == outside_before


def test_a_linked_results_folder_is_refused_with_one_line(scored, capsys):
    d = scored["lb"] / "results" / "fmnist"
    shutil.move(str(d), str(scored["outside"] / "fmnist"))
    os.symlink(scored["outside"] / "fmnist", d)
    outside_before = _snapshot(scored["outside"])
    board_before = (scored["lb"] / "fmnist.csv").read_bytes()
    capsys.readouterr()
    with deadline() as elapsed:
        with pytest.raises(R.StoredResultError) as e:
            _regenerate(scored)
        _one_line(str(e.value), "results folder", "symbolic link")
        # the CLI: one line, exit 2, before any data is loaded
        assert main(["leaderboard", "--dataset", "fmnist", "--quiet"]) == 2
        _one_line(capsys.readouterr().err, "results folder", "symbolic link")
        assert main(["verify", scored["refs"]["A"], "--quiet"]) == 2
        _one_line(capsys.readouterr().err, "results folder", "symbolic link")
        assert elapsed() < QUICK
    assert (scored["lb"] / "fmnist.csv").read_bytes() == board_before  # not regenerated from what the link shows
    assert _snapshot(scored["outside"]) == outside_before


def test_a_fifo_as_a_result_file_is_left_out_or_refused_never_waited_on(scored, capsys, monkeypatch):
    g = scored["paths"]["G"]
    g.unlink()
    os.mkfifo(g)
    outside_before = _snapshot(scored["outside"])
    capsys.readouterr()
    with deadline() as elapsed:
        _regenerate(scored)  # the board: left out with one warning
        _one_line(capsys.readouterr().err, str(g), "FIFO", "left out of the board")
        monkeypatch.setattr(R, "_WARNED", set())
        harness.score_zoo("fmnist", **scored["kw"])  # `salbench leaderboard`: G skipped, never replaced
        _one_line(capsys.readouterr().err, str(g), "FIFO", "left out of the board")
        assert main(["verify", str(g), "--quiet"]) == 2  # an explicitly named file: one line, exit 2
        _one_line(capsys.readouterr().err, str(g), "FIFO")
        assert elapsed() < QUICK
    assert stat.S_ISFIFO(os.lstat(g).st_mode)
    assert scored["refs"]["G"] not in _board_ids(scored) and scored["refs"]["A"] in _board_ids(scored)
    assert _snapshot(scored["outside"]) == outside_before


def test_dev_zero_linked_as_a_result_file_is_refused_quickly(scored):
    """Reading /dev/zero never ends and no alarm interrupts it, so this runs in a subprocess with a
    memory cap and its own deadline (imports on two busy cores take ~10 s, hence the outer bound)."""
    g = scored["paths"]["G"]
    g.unlink()
    os.symlink("/dev/zero", g)
    script = textwrap.dedent(f"""
        import resource, signal, sys, time
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
        from salbench.benchmark import harness
        from salbench.benchmark.cli import main
        signal.alarm(20)
        t0 = time.monotonic()
        harness.regenerate("fmnist", images_sha256={scored["imageset"].images_sha256!r})
        rc = main(["verify", {str(g)!r}, "--quiet"])
        print(f"rc={{rc}} seconds={{time.monotonic() - t0:.2f}}")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    rc, seconds = (kv.split("=")[1] for kv in proc.stdout.strip().splitlines()[-1].split())
    assert rc == "2" and float(seconds) < QUICK, proc.stdout
    err = proc.stderr.strip().splitlines()
    assert len(err) == 2 and all(str(g) in line and "symbolic link" in line for line in err), proc.stderr
    assert "left out of the board" in err[0] and err[1].startswith("salbench: error:"), proc.stderr
    assert scored["refs"]["G"] not in _board_ids(scored) and g.is_symlink()


def test_an_oversize_result_file_is_left_out_without_being_read(scored, capsys):
    big = scored["lb"] / "results" / "fmnist" / f"{'f' * 16}-v2.json"
    with open(big, "wb") as f:
        f.truncate(R.MAX_RESULT_BYTES + 1)  # sparse: costs no disk
    capsys.readouterr()
    with deadline() as elapsed:
        _regenerate(scored)
        assert elapsed() < QUICK
    _one_line(capsys.readouterr().err, str(big), f"more than the {R.MAX_RESULT_BYTES} bytes")
    assert len(_board_ids(scored)) == 3


def test_the_result_cap_has_a_wide_margin_over_the_committed_results():
    sizes = [p.stat().st_size for p in (R.DEFAULT_LEADERBOARDS_DIR / "results").glob("*/*.json")]
    assert sizes and max(sizes) * 20 < R.MAX_RESULT_BYTES


def test_removing_a_legacy_manifest_entry_leaves_the_row_out_instead_of_rescoring(scored, tmp_path, monkeypatch,
                                                                                    capsys):
    """The reported hang: a committed result without a digest is accepted only when the manifest lists
    its bytes. With its entry removed, `salbench leaderboard` re-scored that zoo model unasked (on the
    real 1000-image set plus its float64 band: hours on a CPU, silent under --quiet). Now it is left
    out with one line naming the file; asking for it (--only ID) scores it again."""
    legacy = {}
    for v, p in scored["paths"].items():  # turn every stored result into a legacy (digest-less) file
        doc = json.loads(p.read_text())
        doc.pop("digest")
        p.write_text(json.dumps(doc))
        legacy[hashlib.sha256(p.read_bytes()).hexdigest()] = f"fmnist/{p.name}"
    manifest = tmp_path / "legacy_results.json"
    manifest.write_text(json.dumps(legacy, indent=2))
    monkeypatch.setattr(R, "LEGACY_MANIFEST", manifest)
    _regenerate(scored)
    assert len(_board_ids(scored)) == 3
    g = scored["paths"]["G"]
    manifest.write_text(json.dumps({k: v for k, v in legacy.items() if v != f"fmnist/{g.name}"}, indent=2))
    g_before = g.read_bytes()

    def no_scoring(*a, **k):
        raise AssertionError("a zoo model was scored again without being asked")

    real_score = harness.score
    monkeypatch.setattr(harness, "score", no_scoring)
    capsys.readouterr()
    with deadline() as elapsed:
        harness.score_zoo("fmnist", **scored["kw"])  # what `salbench leaderboard --dataset fmnist` runs
        assert elapsed() < QUICK
    _one_line(capsys.readouterr().err, str(g), "no digest", "legacy_results.json", "left out of the board")
    assert scored["refs"]["G"] not in _board_ids(scored) and len(_board_ids(scored)) == 2
    assert g.read_bytes() == g_before
    monkeypatch.setattr(harness, "score", real_score)  # asked for by name: scored again, replaced with a digest
    harness.score_zoo("fmnist", **scored["kw"], only=[scored["refs"]["G"]])
    assert "digest" in R.read_result_file(g) and scored["refs"]["G"] in _board_ids(scored)


def test_committed_results_still_read_through_the_bounded_reader(monkeypatch):
    monkeypatch.delenv("SALBENCH_LEADERBOARDS_DIR", raising=False)
    for p in sorted((R.DEFAULT_LEADERBOARDS_DIR / "results").glob("*/*.json")):
        R.read_result_file(p)


# ----------------------------------------------------------------------------- submissions (writes)
def _weights(tmp: Path, seed: int = 7) -> tuple[Path, str]:
    torch.manual_seed(seed)
    model = build("lenet")
    f = tmp / f"w{seed}.safetensors"
    save_file(model.state_dict(), str(f))
    return f, hashlib.sha256(zoo.state_dict_bytes(model)).hexdigest()


def _score_cli(f: Path) -> list[str]:
    return ["score", str(f), "--arch", "lenet", "--dataset", "fmnist", "--name", "mine", "--quiet"]


def test_a_submissions_result_path_linked_elsewhere_is_refused_before_scoring(scored, tmp_path, capsys):
    """The reported defect: a result path that is a link to another file was written through."""
    f, sha = _weights(tmp_path)
    target = R.result_path("fmnist", sha)
    victim = scored["outside"] / "victim.json"
    victim.write_text("not yours")
    os.symlink(victim, target)
    before = _snapshot(scored["lb"], scored["outside"])
    capsys.readouterr()
    with deadline() as elapsed:
        assert main(_score_cli(f)) == 2
        assert elapsed() < QUICK
    _one_line(capsys.readouterr().err, str(target), "symbolic link")
    assert _snapshot(scored["lb"], scored["outside"]) == before


def test_a_linked_submissions_folder_is_refused_before_scoring(scored, tmp_path, capsys):
    f, _ = _weights(tmp_path)
    sdir = scored["lb"] / "submissions" / "fmnist"
    sdir.parent.mkdir(parents=True, exist_ok=True)
    (scored["outside"] / "subs").mkdir()
    os.symlink(scored["outside"] / "subs", sdir)
    before = _snapshot(scored["lb"], scored["outside"])
    capsys.readouterr()
    with deadline() as elapsed:
        assert main(_score_cli(f)) == 2
        assert elapsed() < QUICK
    _one_line(capsys.readouterr().err, "submissions folder", "symbolic link")
    assert _snapshot(scored["lb"], scored["outside"]) == before


def test_a_linked_submission_card_is_ignored_with_one_warning(scored, capsys):
    sdir = scored["lb"] / "submissions" / "fmnist"
    sdir.mkdir(parents=True)
    card = {"id": "fmnist-sub-x", "sha256": "0" * 64, "dataset": "fmnist"}
    (scored["outside"] / "card.json").write_text(json.dumps(card))
    os.symlink(scored["outside"] / "card.json", sdir / "fmnist-sub-x.json")
    os.mkfifo(sdir / "fmnist-sub-y.json")
    capsys.readouterr()
    with deadline():
        assert S.list_submission_cards("fmnist") == []
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "symbolic link" in err[0] and "FIFO" in err[1], err


# ----------------------------------------------------------------------------- cards and image sets
def test_a_linked_or_fifo_zoo_card_is_one_line_never_followed_or_waited_on(env, tmp_path, capsys):
    card = env["zoo"] / "cards" / f"{env['refs']['N']}.json"
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy2(card, outside / card.name)
    before = _snapshot(outside)
    card.unlink()
    os.symlink(outside / card.name, card)
    capsys.readouterr()
    with deadline() as elapsed:
        assert main(["zoo", "list"]) == 2
        _one_line(capsys.readouterr().err, str(card), "symbolic link")
        with pytest.raises(ValueError, match="symbolic link"):
            zoo.get_card(env["refs"]["N"])
        card.unlink()
        os.mkfifo(card)
        assert main(["zoo", "list"]) == 2
        _one_line(capsys.readouterr().err, str(card), "FIFO")
        assert elapsed() < QUICK
    assert _snapshot(outside) == before


@pytest.mark.parametrize("kind", ["link", "fifo", "dev_zero_link", "oversize"])
def test_a_non_regular_image_set_file_is_one_line(env, tmp_path, capsys, kind):
    p = imageset_path("fmnist")
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy2(p, outside / p.name)
    p.unlink()
    if kind == "link":
        os.symlink(outside / p.name, p)
    elif kind == "fifo":
        os.mkfifo(p)
    elif kind == "dev_zero_link":
        os.symlink("/dev/zero", p)
    else:
        with open(p, "wb") as f:
            f.truncate(MAX_IMAGESET_BYTES + 1)
    expected = {"link": "symbolic link", "fifo": "FIFO", "dev_zero_link": "symbolic link",
                "oversize": "more than the"}[kind]
    before = _snapshot(outside)
    capsys.readouterr()
    with deadline() as elapsed:
        with pytest.raises(ImageSetError) as e:
            load_imageset("fmnist", test_split=env["test"])
        _one_line(str(e.value), str(p), expected)
        assert main(["imageset", "verify", "--dataset", "fmnist"]) == 2
        _one_line(capsys.readouterr().err, str(p), expected)
        assert elapsed() < QUICK
    assert _snapshot(outside) == before


# ----------------------------------------------------------------------------- .pt2 archives
def _hostile_pt2(tmp: Path, kind: str) -> Path:
    src = export_to(PlainLeNet().eval(), tmp / "good.pt2")
    old = members(src)
    root = next(iter(old)).split("/", 1)[0]
    dst = tmp / f"{kind}.pt2"
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as z:
        for name, data in old.items():
            if kind == "folder_as_file" and name == f"{root}/models/model.json":
                info = zipfile.ZipInfo(name)
                info.external_attr = (stat.S_IFDIR | 0o755) << 16 | 0x10
                z.writestr(info, data)
                continue
            z.writestr(name, data)
        if kind == "dotdot":
            z.writestr(f"{root}/data/../../evil.py", b"import os")
        elif kind == "absolute":
            z.writestr("/tmp/evil.py", b"import os")
        elif kind == "symlink":
            info = zipfile.ZipInfo(f"{root}/data/weights/evil")
            info.create_system = 3
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            z.writestr(info, "/dev/zero")
    return dst


@pytest.mark.parametrize("kind,expected", [
    ("dotdot", "'..'"), ("absolute", "absolute"), ("symlink", "symbolic link"),
    ("folder_as_file", "folder entry used as a file"),
])
def test_a_pt2_with_a_hostile_member_is_refused_before_anything_is_read(env, tmp_path, capsys, kind, expected):
    f = _hostile_pt2(tmp_path, kind)
    env["lb"].mkdir(parents=True, exist_ok=True)
    (env["lb"] / "fmnist.csv").write_text("id,method\n")
    before = _snapshot(env["lb"])
    capsys.readouterr()
    with deadline() as elapsed:
        rc = main(["score", str(f), "--dataset", "fmnist", "--name", "bad", "--quiet"])
        assert elapsed() < QUICK
    assert rc == 2
    _one_line(capsys.readouterr().err, f.name, expected, "refused before reading it")
    assert _snapshot(env["lb"]) == before
