"""Issue 15: every hostile or unlucky input ends in one line, exit code 2 and no file changed; stored
numbers are verified on read (a hand-edited result is never published, a truncated one blocks
nothing); image-set files name the file and key that are wrong."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from salbench import metrics
from salbench.benchmark import harness
from salbench.benchmark import results as R
from salbench.benchmark.cli import main
from salbench.benchmark.imagesets import ImageSetError, imageset_path, load_imageset
from salbench.model_zoo.architectures import build

from .conftest import FAST

CHEAP = replace(FAST, methods=("VG",), accuracy=False)


def _tree(*roots: Path) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for root in roots if root.exists() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.endswith(".lock")}


def _state(env) -> dict:
    return _tree(env["lb"], env["zoo"], env["sets"])


def _score_cli(f: Path, *extra: str) -> list[str]:
    return ["score", str(f), "--arch", "lenet", "--dataset", "fmnist", "--name", "hostile", "--quiet", *extra]


def _one_line_exit_2(rc, capsys, *expected) -> str:
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1, err
    for e in expected:
        assert e in err, err
    return err


# ----------------------------------------------------------------------------- tensor kinds
def _weights(tmp: Path, case: str) -> Path:
    torch.manual_seed(0)
    sd = build("lenet").state_dict()
    w = sd["head.1.weight"]
    if case == "sparse":
        sd["head.1.weight"] = w.to_sparse()
    elif case == "complex":
        sd["head.1.weight"] = torch.complex(w, torch.ones_like(w))
    elif case == "integer":
        sd["head.1.weight"] = w.to(torch.int64)
    elif case == "zeros":
        sd = {k: torch.zeros_like(v) for k, v in sd.items()}
    if case == "bomb":
        sd["extra"] = torch.zeros(64 << 18)  # 64 MiB once inflated
        buf = io.BytesIO()
        torch.save(sd, buf)
        buf.seek(0)
        p = tmp / "bomb.pt"
        with zipfile.ZipFile(buf) as src, zipfile.ZipFile(p, "w", compression=zipfile.ZIP_DEFLATED) as dst:
            for info in src.infolist():
                dst.writestr(info.filename, src.read(info))
        return p
    p = tmp / f"{case}.pt"
    torch.save(sd, p)
    return p


@pytest.mark.parametrize("case,expected", [("sparse", "sparse_coo tensor"), ("complex", "complex tensor"),
                                           ("integer", "dtype mismatch"), ("bomb", "refused before reading")])
def test_tensor_kinds_are_refused_with_one_line(env, tmp_path, capsys, case, expected):
    f = _weights(tmp_path, case)
    before = _state(env)
    rc = main(_score_cli(f))
    _one_line_exit_2(rc, capsys, expected)
    assert _state(env) == before


def test_a_directory_as_checkpoint_is_not_called_missing(env, tmp_path, capsys):
    d = tmp_path / "weights.safetensors"
    d.mkdir()
    before = _state(env)
    _one_line_exit_2(main(_score_cli(d)), capsys, "not a regular file")
    assert _state(env) == before


# ----------------------------------------------------------------------------- options
@pytest.mark.parametrize("opts,expected", [
    (["--device", "banana"], "--device"), (["--device", "cuda:99"], "--device"), (["--device", "meta"], "--device"),
    (["--threads", "0"], "--threads"), (["--threads", "-2"], "--threads"), (["--threads", "two"], "--threads"),
    (["--batch-size", "0"], "--batch-size"), (["--batch-size", "-7"], "--batch-size"),
    (["--batch-size", "1.5"], "--batch-size"),
])
def test_impossible_options_are_refused_before_any_work(env, tmp_path, capsys, opts, expected):
    f = tmp_path / "ok.safetensors"
    save_file(build("lenet").state_dict(), str(f))
    before = _state(env)
    with pytest.raises(SystemExit) as e:
        main(_score_cli(f, *opts))
    _one_line_exit_2(e.value.code, capsys, expected)
    assert _state(env) == before


def test_threads_before_the_subcommand_is_validated_too(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--threads", "0", "zoo", "list"])
    _one_line_exit_2(e.value.code, capsys, "--threads")


# ----------------------------------------------------------------------------- degenerate models
def test_all_zero_model_is_refused_before_scoring(env, tmp_path, capsys, monkeypatch):
    f = _weights(tmp_path, "zeros")
    before = _state(env)
    scored = []
    monkeypatch.setattr(harness, "score", lambda *a, **k: scored.append(1))
    rc = main(_score_cli(f, "--methods", "VG"))
    _one_line_exit_2(rc, capsys, "degenerate", "zero")
    assert scored == [] and _state(env) == before


def test_ros_aggregate_of_all_zero_maps_does_not_raise():
    log_mean, nan_fraction = metrics.aggregate_ros(torch.tensor([0.0, 0.0, float("nan")]))
    assert log_mean == float("-inf") and nan_fraction == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------- stored numbers
def _two_results(env) -> dict[str, Path]:
    kw = dict(config=CHEAP, progress=False, imageset=env["imageset"], test_split=env["test"])
    out = {}
    for v in ("A", "G"):
        harness.score_zoo("fmnist", only=[env["refs"][v]], **kw)
    for p in (env["lb"] / "results" / "fmnist").glob("*.json"):
        out[json.loads(p.read_text())["model"]["variant"]] = p
    return out


def test_a_hand_edited_result_is_never_published_and_blocks_no_other_row(env, capsys):
    paths = _two_results(env)
    doc = json.loads(paths["G"].read_text())
    doc["summary"]["VG"]["gini"] = 0.999  # a better number, typed in
    paths["G"].write_text(json.dumps(doc, separators=(",", ":")))
    capsys.readouterr()
    harness.regenerate("fmnist", images_sha256=env["imageset"].images_sha256)
    err = capsys.readouterr().err
    assert str(paths["G"]) in err and "digest" in err, err
    df = pd.read_csv(env["lb"] / "fmnist.csv")
    assert list(df["id"]) == [env["refs"]["A"]]  # A stays, the tampered G is not published
    assert 0.999 not in set(df["gini"])
    # the next score of that zoo model replaces it (scored again, the file named)
    capsys.readouterr()
    harness.score_zoo("fmnist", config=CHEAP, progress=True, imageset=env["imageset"], test_split=env["test"],
                      only=[env["refs"]["G"]])
    out = capsys.readouterr()
    assert str(paths["G"]) in out.out
    assert set(pd.read_csv(env["lb"] / "fmnist.csv")["id"]) == {env["refs"]["A"], env["refs"]["G"]}
    assert R.read_result_file(paths["G"])["summary"]["VG"]["gini"] != 0.999


@pytest.mark.parametrize("damage", ["empty", "truncated", "not_an_object", "invalid_utf8"])
def test_an_unreadable_result_is_named_and_blocks_nothing(env, tmp_path, capsys, damage):
    paths = _two_results(env)
    raw = paths["G"].read_bytes()
    bad = {"empty": b"", "truncated": raw[: len(raw) // 2], "not_an_object": b"[1, 2]",
           # issue 27: invalid UTF-8 used to raise AttributeError and stop the whole regeneration
           "invalid_utf8": raw[:100] + b"\xff\xfe" + raw[102:]}[damage]
    paths["G"].write_bytes(bad)
    capsys.readouterr()
    harness.regenerate("fmnist", images_sha256=env["imageset"].images_sha256)
    err = capsys.readouterr().err
    assert str(paths["G"]) in err and len(err.strip().splitlines()) == 1, err
    assert list(pd.read_csv(env["lb"] / "fmnist.csv")["id"]) == [env["refs"]["A"]]
    # a submission made in that state lands whole (not blocked, nothing half-written)
    f = tmp_path / "sub.safetensors"
    torch.manual_seed(3)
    save_file(build("lenet").state_dict(), str(f))
    card, _ = harness.submit(f, arch="lenet", dataset="fmnist", name="fine", config=CHEAP, progress=False,
                             imageset=env["imageset"], test_split=env["test"])
    assert card["id"] in set(pd.read_csv(env["lb"] / "fmnist.csv")["id"])


def test_a_result_without_digest_is_accepted_only_when_listed_in_the_legacy_manifest(env):
    paths = _two_results(env)
    doc = json.loads(paths["A"].read_text())
    doc.pop("digest")
    paths["A"].write_text(json.dumps(doc))
    with pytest.raises(R.StoredResultError, match="no digest"):
        R.read_result_file(paths["A"])


def test_committed_results_verify(monkeypatch):
    monkeypatch.delenv("SALBENCH_LEADERBOARDS_DIR", raising=False)
    files = sorted((R.DEFAULT_LEADERBOARDS_DIR / "results").glob("*/*.json"))
    assert files
    for p in files:
        R.read_result_file(p)  # raises on a mismatch


# ----------------------------------------------------------------------------- image sets
@pytest.mark.parametrize("damage,expected", [
    ("truncated", "not valid JSON"), ("empty", "empty"), ("no_labels", "'labels'"),
    ("no_sha", "'images_sha256'"), ("indices_str", "'indices'"),
])
def test_a_damaged_image_set_names_the_file_and_key(env, damage, expected):
    p = imageset_path("fmnist")
    raw = p.read_bytes()
    doc = json.loads(raw)
    if damage == "truncated":
        p.write_bytes(raw[: len(raw) // 2])
    elif damage == "empty":
        p.write_bytes(b"")
    else:
        key = {"no_labels": "labels", "no_sha": "images_sha256", "indices_str": "indices"}[damage]
        if damage == "indices_str":
            doc[key] = "0,1,2"
        else:
            doc.pop(key)
        p.write_text(json.dumps(doc))
    with pytest.raises(ImageSetError) as e:
        load_imageset("fmnist", test_split=env["test"])
    msg = str(e.value)
    assert str(p) in msg and expected in msg and len(msg.splitlines()) == 1, msg
