"""Submissions: a new row for a good checkpoint; bad files rejected with one line, exit 2, nothing changed."""

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from salbench.benchmark import harness
from salbench.benchmark.cli import main
from salbench.model_zoo.architectures import build

from .conftest import FAST, quick_train


def _tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


@pytest.fixture
def board(env):
    harness.score_zoo("fmnist", config=FAST, progress=False, imageset=env["imageset"], test_split=env["test"])
    return env


def test_fresh_model_appears_as_new_row(board, fmnist_small, tmp_path):
    model = quick_train(fmnist_small[0], seed=7, steps=60)
    f = tmp_path / "mine.safetensors"
    save_file(model.state_dict(), str(f))
    card, res = harness.submit(f, arch="lenet", dataset="fmnist", name="my method!", notes="test run",
                               config=FAST, progress=False, imageset=board["imageset"], test_split=board["test"])
    assert card["id"] == "fmnist-sub-my-method" and card["source"] == "submission"
    df = pd.read_csv(board["lb"] / "fmnist.csv")
    rows = df[df["id"] == card["id"]]
    assert len(rows) == 2 and set(rows["source"]) == {"submission"}
    assert len(df) == 8
    assert (board["lb"] / "submissions" / "fmnist" / f"{card['id']}.json").is_file()
    assert 0 <= rows["acc_on_set"].iloc[0] <= 1

    # a torch state-dict .pt of the same weights is accepted and maps to the same checkpoint sha256
    pt = tmp_path / "mine.pt"
    torch.save(model.state_dict(), pt)
    card2, _ = harness.submit(pt, arch="lenet", dataset="fmnist", name="my method!", config=FAST, progress=False,
                              imageset=board["imageset"], test_split=board["test"])
    assert card2["sha256"] == card["sha256"]
    assert len(pd.read_csv(board["lb"] / "fmnist.csv")) == 8


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _bad_files(tmp: Path) -> dict[str, tuple[Path, str, str]]:
    good = build("lenet").state_dict()
    out = {}
    marker = tmp / "pwned"
    p = tmp / "evil.pt"
    torch.save({"conv": Evil(marker)}, p)
    out["pickle"] = (p, "lenet", "weights_only")
    p = tmp / "trunc.safetensors"
    save_file(good, str(p))
    p.write_bytes(p.read_bytes()[:500])
    out["truncated"] = (p, "lenet", "safetensors")
    p = tmp / "wrong.safetensors"
    save_file(build("lenet_text").state_dict(), str(p))
    out["arch"] = (p, "lenet", "does not fit")
    p = tmp / "nan.safetensors"
    sd = {k: v.clone() for k, v in good.items()}
    sd["head.1.weight"][0, 0] = float("nan")
    save_file(sd, str(p))
    out["nan"] = (p, "lenet", "non-finite")
    p = tmp / "classes.safetensors"
    save_file(build("lenet", num_classes=5).state_dict(), str(p))
    out["classes"] = (p, "lenet", "shape mismatch")
    out["missing"] = (tmp / "nope.safetensors", "lenet", "does not exist")
    out["unknown_arch"] = (tmp / "wrong.safetensors", "resnet999", "unknown architecture")
    return out


@pytest.mark.parametrize("case", ["pickle", "truncated", "arch", "nan", "classes", "missing", "unknown_arch"])
def test_bad_submission_rejected_and_nothing_changes(board, tmp_path, capsys, case):
    f, arch, expected = _bad_files(tmp_path)[case]
    before = _tree_digest(board["lb"])
    rc = main(["score", str(f), "--arch", arch, "--dataset", "fmnist", "--name", "bad", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert expected in err and len(err.splitlines()) == 1, err
    assert _tree_digest(board["lb"]) == before
    assert not (tmp_path / "pwned").exists()


SCRIPT = textwrap.dedent("""
    import sys, time, torch
    import salbench.benchmark.leaderboard as L
    from salbench.benchmark import harness
    from salbench.benchmark.imagesets import load_imageset
    from salbench.benchmark.scoring import ScoreConfig
    from salbench.model_zoo.data import Split, load_split
    real = L.list_results
    def slow(*a, **k):  # widen the read-modify-write window a lost update needs
        out = real(*a, **k); time.sleep(1.5); return out
    L.list_results = slow
    te = load_split("fmnist", "test", download=False)
    test = Split("fmnist", "test", te.images[:300], te.labels[:300], te.source)
    s = load_imageset("fmnist", test_split=test)
    harness.submit(sys.argv[1], arch="lenet", dataset="fmnist", name=sys.argv[2], progress=False,
                   config=ScoreConfig(methods=("VG",), batch_size=40, accuracy=False), imageset=s, test_split=test)
""")


def test_concurrent_submissions_lose_no_row(board, fmnist_small, tmp_path):
    files = []
    for i in range(2):
        f = tmp_path / f"m{i}.safetensors"
        save_file(quick_train(fmnist_small[0], seed=20 + i, steps=30).state_dict(), str(f))
        files.append(f)
    script = tmp_path / "submit.py"
    script.write_text(SCRIPT)
    envv = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(f), f"concurrent-{i}"], env=envv,
                              stderr=subprocess.PIPE, text=True) for i, f in enumerate(files)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    df = pd.read_csv(board["lb"] / "fmnist.csv")
    assert {"fmnist-sub-concurrent-0", "fmnist-sub-concurrent-1"} <= set(df["id"])


def test_run_only_unknown_id_is_rejected_and_nothing_changes(board, capsys):
    before = _tree_digest(board["lb"])
    rc = main(["run", "--dataset", "fmnist", "--only", f"{board['refs']['G']},fmnist-lenet-X-nope", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "fmnist-lenet-X-nope" in err and board["refs"]["N"] in err and len(err.splitlines()) == 1
    assert _tree_digest(board["lb"]) == before
