"""A plain-PyTorch model of an arbitrary architecture, exported as the README shows, scored through
`salbench score` into a private board; hostile .pt2 files refused with nothing changed."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from salbench.benchmark import harness
from salbench.benchmark.cli import main
from tests.model_zoo.pt2_craft import PlainLeNet, export_to, nodes, pickled_payload, rewrite
from tests.test_readme_snippets import BLOCKS, _run

from .conftest import FAST


def _tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


@pytest.fixture
def board(env):
    harness.score_zoo("fmnist", config=FAST, progress=False, imageset=env["imageset"], test_split=env["test"])
    return env


def _readme_export_block() -> tuple[int, str]:
    found = [(line, code) for line, code in BLOCKS if "torch.export.save" in code]
    assert found, "README.md lost its export example (a block calling torch.export.save)"
    return found[0]


def test_readme_exported_model_is_scored_and_lands_on_the_board(board, tmp_path, capsys, monkeypatch):
    """The README's export snippet, then `salbench score my_model.pt2 ...` as the README shows (VG
    only, to keep it small): the row, its name and notes on the board, the CLI's report, re-use on
    a second submission, and the figures redrawn with the submission in a non-zoo colour."""
    work = tmp_path / "user"
    work.mkdir()
    line, code = _readme_export_block()
    ns = _run(code, line, cwd=work)
    assert type(ns["model"]).__name__ == "MyNet"  # not a registry architecture
    pt2 = work / "my_model.pt2"
    assert pt2.is_file()
    monkeypatch.chdir(work)
    argv = ["score", "my_model.pt2", "--dataset", "fmnist", "--name", "my-cnn", "--notes", "plain pytorch, exported",
            "--methods", "VG", "--batch-size", "20"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    lb = board["lb"]
    df = pd.read_csv(lb / "fmnist.csv")
    rows = df[df["id"] == "fmnist-sub-my-cnn"]
    assert len(rows) == 1 and rows.iloc[0]["method"] == "VG"
    assert rows.iloc[0]["name"] == "my-cnn" and rows.iloc[0]["notes"] == "plain pytorch, exported"
    assert rows.iloc[0]["arch"] == "exported" and rows.iloc[0]["source"] == "submission"
    card = json.loads((lb / "submissions" / "fmnist" / "fmnist-sub-my-cnn.json").read_text())
    sha = hashlib.sha256(pt2.read_bytes()).hexdigest()
    assert card["arch"] == "exported" and card["sha256"] == sha and card["weights"].endswith(".pt2")
    assert (lb / "submissions" / "fmnist" / card["weights"]).read_bytes() == pt2.read_bytes()
    # what score says: the board's path and row id, ranks, scored (not re-used), figures
    assert f"board: {(lb / 'fmnist.csv').resolve()}: 1 row(s) with id fmnist-sub-my-cnn" in out
    assert "rank among the 4 VG rows (1 = best): gini " in out  # N, A, G and the submission
    assert "result: scored now and stored" in out
    figs = [lb / "figures" / "fmnist_ssim.png", lb / "figures" / "fmnist_road.png"]
    assert all(f.is_file() and f.stat().st_size > 1000 for f in figs)
    said = next(line for line in out.splitlines() if line.startswith("figures: "))
    assert all(str(f) in said for f in figs)
    from salbench.benchmark.figures import COLORS, _style

    ssim = pd.read_csv(lb / "fmnist_ssim.csv")
    assert "fmnist-sub-my-cnn" in set(ssim["id"])
    style = _style(list(zip(ssim["id"], ssim["variant"])))
    assert style["fmnist-sub-my-cnn"]["color"] not in COLORS.values()
    # the same file again: the stored result is re-used and said so
    before = _tree_digest(lb / "results")
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "re-using the stored result" in out and "result: a stored result of the same weights" in out
    assert _tree_digest(lb / "results") == before
    assert len(pd.read_csv(lb / "fmnist.csv").query("id == 'fmnist-sub-my-cnn'")) == 1
    # ... and on the site, with a saliency gallery drawn from the stored exported program
    from salbench.benchmark import site

    said = []
    site.refresh_galleries(lb, say=said.append)
    site_dir, _ = site.build_site(lb)
    page = (site_dir / "fmnist.html").read_text()
    assert "fmnist-sub-my-cnn" in page and "plain pytorch, exported" in page
    gallery = site_dir / site.GALLERY_DIR / f"{site.anchor('fmnist-sub-my-cnn')}.png"
    assert gallery.is_file() and gallery.stat().st_size > 1000, said
    assert not [m for m in said if "fmnist-sub-my-cnn" in m and "skipped" in m], said


def _hostile(kind: str, tmp: Path) -> tuple[Path, str]:
    src = export_to(PlainLeNet().eval(), tmp / "good.pt2")
    marker = tmp / "pwned"
    if kind == "pickled_payload":
        cfg = json.loads(zipfile.ZipFile(src).read("good/data/weights/model_weights_config.json"))
        rec = cfg["config"]["conv1.weight"]["path_name"]

        def mark(c):
            c["config"]["conv1.weight"]["use_pickle"] = True

        return (rewrite(src, tmp / "evil.pt2", weights_config=mark,
                        replace={f"data/weights/{rec}": pickled_payload(marker)}),
                "is a pickled record that is not a plain tensor")
    if kind == "unknown_op":
        def edit(doc):
            next(n for n in nodes(doc) if n["target"] == "torch.ops.aten.relu.default")["target"] = "torch.os.system"

        return rewrite(src, tmp / "op.pt2", graph=edit), "calls 'torch.os.system', which SalBench does not run"
    if kind == "wrong_dataset":
        return src, "the program takes (1, 28, 28) images, cifar10 images are (3, 32, 32)"
    if kind == "with_arch":
        return src, "an exported program is a .pt2 file scored with --arch exported"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["pickled_payload", "unknown_op", "wrong_dataset", "with_arch"])
def test_hostile_or_mismatched_programs_are_refused_and_nothing_changes(env, tmp_path, capsys, kind):
    board = env  # a private zoo and image set; the board folder holds one file that must stay as it is
    board["lb"].mkdir(parents=True, exist_ok=True)
    (board["lb"] / "fmnist.csv").write_text("id,method\n")
    f, expected = _hostile(kind, tmp_path)
    before = _tree_digest(board["lb"])
    argv = ["score", str(f), "--dataset", "cifar10" if kind == "wrong_dataset" else "fmnist", "--name", "bad",
            "--quiet"] + (["--arch", "lenet"] if kind == "with_arch" else [])
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert expected in err and len(err.splitlines()) == 1, err
    assert _tree_digest(board["lb"]) == before
    assert not (tmp_path / "pwned").exists()
