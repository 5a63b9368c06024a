"""Scoring under torch.distributed (issue 12): 2 gloo processes give the single-process result,
every per-image value bit for bit, and rank 0 alone writes (benchmark/distributed.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from salbench.benchmark import distributed as D
from salbench.benchmark.scoring import ScoreConfig, score
from salbench.model_zoo.data import Split

REPO = Path(__file__).resolve().parents[2]
# 40 images in batches of 15: 3 batches (15, 15, 10), rank 0 scores batches 0 and 2, rank 1 batch 1
CFG = ScoreConfig(batch_size=15, ig_steps=4)


def _gloo_or_skip() -> None:
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this build")
    try:
        import torch.multiprocessing as mp

        mp.get_context("spawn")
    except (ImportError, ValueError) as e:  # pragma: no cover - platform specific
        pytest.skip(f"multiprocessing spawn unavailable: {e}")


def _rank_main(rank: int, world: int, init_file: str, model, imageset, test_split, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        assert D.active() and D.rank() == rank and D.world_size() == world
        res = score(model, imageset, CFG, test_split=test_split, progress=False).to_dict()
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(res))
    finally:
        torch.distributed.destroy_process_group()


def _two_rank_results(tmp_path, model, imageset, test_split) -> list[dict]:
    import torch.multiprocessing as mp

    mp.start_processes(_rank_main, args=(2, str(tmp_path / "rdzv"), model, imageset, test_split, str(tmp_path)),
                       nprocs=2, join=True, start_method="spawn")
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def test_two_gloo_ranks_score_bit_for_bit_like_one_process(env, trained_models, tmp_path):
    """Every per-image list (correct, Gini, ROS, SSIM and kept per σ, ROAD per level, VG and IG) and
    both accuracies of a 2-process gloo run equal the single-process CPU run exactly; both ranks
    return the same result. The test split has 1200 images so that natural accuracy (batches of
    1000) and robust accuracy (batches of 500, one random-start generator) are split over the ranks."""
    _gloo_or_skip()
    model = trained_models["G"][0]
    t = env["test"]
    reps = 4  # 300 test images repeated: 1200 images, 2 natural and 2 robust evaluation batches
    split = Split("fmnist", "test", t.images.repeat(reps, 1, 1, 1), t.labels.repeat(reps), t.source)
    torch.set_num_threads(1)
    single = json.loads(json.dumps(score(model, env["imageset"], CFG, test_split=split, progress=False).to_dict()))
    r0, r1 = _two_rank_results(tmp_path, model, env["imageset"], split)
    assert r0["per_image"] == r1["per_image"] and r0["accuracy"] == r1["accuracy"]
    assert r0["per_image"].keys() == single["per_image"].keys()
    assert r0["per_image"]["correct"] == single["per_image"]["correct"]
    for m in CFG.methods:
        for metric, values in single["per_image"][m].items():
            assert r0["per_image"][m][metric] == values, f"{m} {metric} differs from the single-process run"
    assert r0["summary"] == single["summary"]
    assert r0["accuracy"] == single["accuracy"]
    assert r0["timings"]["processes"] == 2


def _run_cli(args: list[str], env_vars: dict, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "salbench.benchmark.cli", *args], cwd=REPO, env=env_vars,
                          capture_output=True, text=True, timeout=timeout)


def test_procs_flag_launches_two_ranks_and_rank0_writes_once(env, tmp_path):
    """``salbench --procs 2 leaderboard`` goes through torch.distributed.run: one result file, written by
    rank 0, equal in every per-image value to an in-process single-process score of the same model;
    the board lists it; the table is printed once."""
    _gloo_or_skip()
    from salbench.benchmark.results import list_results
    from salbench.model_zoo import zoo

    mid = env["refs"]["A"]
    vars_ = {**os.environ, "SALBENCH_ZOO_DIR": str(env["zoo"]), "SALBENCH_IMAGESETS_DIR": str(env["sets"]),
             "SALBENCH_LEADERBOARDS_DIR": str(env["lb"]),
             "SALBENCH_ALLOW_OVERSUBSCRIBE": "1"}  # 2 processes also on a 1-core machine
    args = ["--procs", "2", "--threads", "1", "leaderboard", "--dataset", "fmnist", "--only", mid,
            "--methods", "VG", "--batch-size", "15", "--quiet"]
    p = _run_cli(args, vars_)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count(mid) == 1, p.stdout  # the table, printed by rank 0 only
    (res,) = list_results("fmnist")
    assert res["timings"]["processes"] == 2
    from salbench.model_zoo.data import load_split

    torch.set_num_threads(1)
    single = score(zoo.load(mid), env["imageset"],
                   ScoreConfig(methods=("VG",), batch_size=15), test_split=load_split("fmnist", "test"), progress=False)
    single = json.loads(json.dumps(single.to_dict()))
    assert res["per_image"] == single["per_image"]
    assert res["accuracy"] == single["accuracy"]
    assert (env["lb"] / "fmnist.csv").is_file()


def test_procs_rejected_for_unsharded_commands(capsys):
    from salbench.benchmark.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--procs", "2", "zoo", "list"])
    assert e.value.code == 2
    assert "--procs applies to run, leaderboard, score" in capsys.readouterr().err


def _rank_pid(parent_pid: int, rank: str) -> int | None:
    """The pid of a descendant of ``parent_pid`` whose environment has ``RANK=rank`` (Linux /proc)."""
    procs = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                procs[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    family, grew = {parent_pid}, True
    while grew:
        new = {p for p, pp in procs.items() if pp in family} - family
        family |= new
        grew = bool(new)
    for p in family - {parent_pid}:
        try:
            env = Path(f"/proc/{p}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"LOCAL_RANK=" + rank.encode() in env:
            return p
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc to find a rank's pid")
def test_a_killed_rank_fails_the_run_and_nothing_is_written(env):
    """SIGKILL of rank 1 while the 2-process run is under way: the launcher stops rank 0, the command
    exits non-zero with a message, and no result or leaderboard file exists; the rerun succeeds."""
    _gloo_or_skip()
    import signal
    import time

    vars_ = {**os.environ, "SALBENCH_ZOO_DIR": str(env["zoo"]), "SALBENCH_IMAGESETS_DIR": str(env["sets"]),
             "SALBENCH_LEADERBOARDS_DIR": str(env["lb"]),
             "SALBENCH_ALLOW_OVERSUBSCRIBE": "1"}  # 2 processes also on a 1-core machine
    # --no-band: the kill and the rerun are what is tested here (bands: test_bands.py); the band's two
    # re-scores would triple the rerun's time
    p = subprocess.Popen([sys.executable, "-m", "salbench.benchmark.cli", "--procs", "2", "--threads", "1",
                          "leaderboard", "--dataset", "fmnist", "--batch-size", "15", "--quiet", "--no-band"],
                         cwd=REPO, env=vars_, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pid, deadline = None, time.monotonic() + 60
        while pid is None and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.2)
            pid = _rank_pid(p.pid, "1")
        assert pid is not None, "rank 1 never started"
        time.sleep(2)  # let it get into loading / scoring
        os.kill(pid, signal.SIGKILL)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode != 0
    assert "processes failed" in err and "no result or leaderboard file was written" in err
    assert not list((env["lb"] / "results").glob("**/*.json")) if (env["lb"] / "results").exists() else True
    assert not (env["lb"] / "fmnist.csv").exists()
    # the rerun (nobody killed) succeeds and writes the board
    rerun = subprocess.run([sys.executable, "-m", "salbench.benchmark.cli", "--procs", "2", "--threads", "1",
                            "leaderboard", "--dataset", "fmnist", "--batch-size", "15", "--quiet", "--no-band"],
                           cwd=REPO, env=vars_, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert (env["lb"] / "fmnist.csv").is_file() and list((env["lb"] / "results").glob("**/*.json"))
