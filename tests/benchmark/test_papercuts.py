"""Issue 28, item 7 (papercuts): architecture-mismatch errors point to the `.pt2` route; `score` says
that the static site is stale and which command redraws it; `salbench --help` and `salbench zoo list`
start fast, `zoo list` without importing torch; `salbench train --epochs N` runs under its own id
(the trainer side, with a real tiny run: tests/model_zoo/test_short_runs.py)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from salbench.benchmark import score_report
from salbench.benchmark.cli import main
from salbench.model_zoo.architectures import build

REPO = Path(__file__).resolve().parents[2]
SALBENCH = Path(sys.executable).parent / "salbench"
PT2_COMMAND = "salbench score my_model.pt2 --dataset fmnist --name NAME"


# ----------------------------------------------------------------------------- (1) mismatch -> .pt2 route
def _rejected(capsys, *argv) -> str:
    assert main(["score", *argv, "--dataset", "fmnist", "--name", "n"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_the_pt2_command_of_the_hint_is_the_readmes():
    assert "salbench score my_model.pt2 --dataset fmnist --name" in (REPO / "README.md").read_text()


@pytest.mark.parametrize("case", ["keys", "shapes", "unknown-arch"])
def test_architecture_mismatch_points_to_the_pt2_route(case, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SALBENCH_LEADERBOARDS_DIR", str(tmp_path / "lb"))
    f = tmp_path / "w.safetensors"
    torch.manual_seed(0)
    if case == "keys":  # another architecture's state dict
        save_file({"conv.weight": torch.randn(4, 1, 3, 3), "fc.weight": torch.randn(10, 4)}, str(f))
        argv = (str(f), "--arch", "lenet")
        what = "does not fit architecture 'lenet'"
    elif case == "shapes":  # the same key names, another kernel size
        sd = build("lenet").state_dict()
        sd["stages.0.0.weight"] = torch.randn(6, 1, 3, 3)
        save_file(sd, str(f))
        argv = (str(f), "--arch", "lenet")
        what = "does not fit architecture 'lenet': shape mismatch"
    else:
        save_file(build("lenet").state_dict(), str(f))
        argv = (str(f), "--arch", "mynet")
        what = "unknown architecture 'mynet'"
    err = _rejected(capsys, *argv)
    assert what in err and PT2_COMMAND in err and "export it with torch.export" in err, err
    assert not (tmp_path / "lb").exists()


def test_other_file_errors_do_not_mention_the_pt2_route(tmp_path, capsys):
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"not a safetensors file")
    err = _rejected(capsys, str(f), "--arch", "lenet")
    assert ".pt2" not in err, err


# ----------------------------------------------------------------------------- (2) score -> the site is stale
def test_site_notice_names_the_command(tmp_path):
    said = []
    score_report.site_notice(lb_dir=tmp_path, say=said.append)
    assert said == [f"site: none yet at {tmp_path / 'site'}; `salbench site` builds it with this submission"]
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "index.html").write_text("<html></html>")
    said.clear()
    score_report.site_notice(lb_dir=tmp_path, say=said.append)
    assert said == [f"site: {tmp_path / 'site' / 'index.html'} is stale (it does not show this submission yet); "
                    "redraw it with `salbench site`"]


def test_score_ends_with_the_site_line(tmp_path, monkeypatch, capsys):
    """`salbench score`'s last line is the site notice (the submission itself is faked: scoring is covered elsewhere)."""
    from salbench.benchmark import harness

    lb = tmp_path / "lb"
    (lb / "site").mkdir(parents=True)
    (lb / "site" / "index.html").write_text("<html></html>")
    monkeypatch.setenv("SALBENCH_LEADERBOARDS_DIR", str(lb))
    card = {"id": "fmnist-sub-n", "sha256": "0" * 64, "name": "n"}
    res = {"accuracy": {"natural": 0.9, "robust": 0.5, "on_set": 1.0}, "summary": {}}
    monkeypatch.setattr(harness, "submit", lambda *a, **k: (card, res))
    monkeypatch.setattr(score_report, "report", lambda *a, **k: None)
    monkeypatch.setattr(score_report, "regenerate_figures", lambda *a, **k: [])
    assert main(["score", "w.safetensors", "--arch", "lenet", "--dataset", "fmnist", "--name", "n"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"site: {lb / 'site' / 'index.html'} is stale (it does not show this submission yet); " \
                   "redraw it with `salbench site`"


# ----------------------------------------------------------------------------- (3) start-up
_PROBE = ("import sys\n"
          "from salbench.benchmark.cli import main\n"
          "try:\n"
          "    rc = main(sys.argv[1:])\n"
          "except SystemExit as e:\n"
          "    rc = e.code\n"
          "print('TORCH-IMPORTED' if 'torch' in sys.modules else 'NO-TORCH', rc, file=sys.stderr)\n")


@pytest.mark.parametrize("argv", [["--help"], ["zoo", "list"]], ids=["help", "zoo-list"])
def test_start_up_is_fast_and_zoo_list_needs_no_torch(argv):
    """Wall time of the installed command (< 2 s, lenient for loaded CI machines; about 0.1-0.3 s idle),
    and `import torch` does not happen (checked in-process through the same `main`)."""
    best = float("inf")
    for _ in range(2):  # the better of two: the first may pay for a cold file cache
        t0 = time.perf_counter()
        out = subprocess.run([str(SALBENCH), *argv], capture_output=True, text=True, timeout=60)
        best = min(best, time.perf_counter() - t0)
        assert out.returncode == 0, out.stderr
    assert best < 2.0, f"`salbench {' '.join(argv)}` took {best:.2f} s"
    probe = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, timeout=60)
    assert probe.stderr.strip().splitlines()[-1] == "NO-TORCH 0", probe.stderr


# ----------------------------------------------------------------------------- (4) train --epochs N (plumbing)
@pytest.mark.parametrize("extra, epochs, mid", [
    (["--epochs", "1"], 1, "fmnist-lenet-A-paper-10ep-e1"),
    (["--epochs", "1", "--seed", "2"], 1, "fmnist-lenet-A-paper-10ep-e1-s2"),
    (["--epochs", "10"], 10, "fmnist-lenet-A-paper-10ep"),  # the preset's own count: the full run itself
    ([], 10, "fmnist-lenet-A-paper-10ep"),
])
def test_train_epochs_gets_its_own_id(extra, epochs, mid, tmp_path, monkeypatch, capsys):
    from salbench.benchmark.leaderboard import recipe_of, seed_of
    from salbench.model_zoo import training

    seen = {}

    def fake_train(recipe, **kw):  # the epoch loop is tests/model_zoo/test_short_runs.py's
        seen["recipe"], seen["kw"] = recipe, kw

    monkeypatch.setattr(training, "train", fake_train)
    rc = main(["train", "--dataset", "fmnist", "--variant", "A", "--preset", "paper-10ep", *extra,
               "--work-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "zoo")])
    assert rc == 0
    recipe = seen["recipe"]
    assert recipe.epochs == epochs and training.model_id_for(recipe) == mid
    assert seen["kw"]["work_dir"] == str(tmp_path / "runs") and seen["kw"]["out_dir"] == str(tmp_path / "zoo")
    out = capsys.readouterr().out
    if mid.startswith("fmnist-lenet-A-paper-10ep-e"):
        assert f"its own id {mid}" in out
        # the boards see it as its own recipe (preset paper-10ep-e1), not as a replica of the full run
        assert recipe.preset == "paper-10ep-e1" and recipe_of({"id": mid}) == "fmnist-lenet-A-paper-10ep-e1"
        assert seed_of({"id": mid}) == (2 if "--seed" in extra else 0)
    else:
        assert "its own id" not in out


@pytest.mark.parametrize("bad", ["0", "-1", "two"])
def test_train_epochs_must_be_positive(bad, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--dataset", "fmnist", "--variant", "A", "--epochs", bad])
    assert e.value.code == 2 and "--epochs" in capsys.readouterr().err
