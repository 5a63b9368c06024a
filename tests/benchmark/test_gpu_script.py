"""The prepared GPU throughput script runs end to end (tiny sizes on CPU) and writes its report."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_throughput.py"


def test_gpu_script_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_throughput", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "report.json"
    assert mod.main(["--device", "cpu", "--smoke", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    for name in ("cifar10-wrn28_10", "imagenette-resnet18"):
        r = report["scoring_images_per_s"][name]
        assert {"forward", "VG", "gini", "ssim_8sigma_VG", "ros_5_VG", "road_20_levels"} <= set(r)
        assert all(v > 0 for v in r.values())
    assert report["pgd_training"]["cifar10-wrn28_10-pgd7"]["steps_per_s"] > 0


def test_procs_scaling_reports_speedups_and_checks_equal_values(monkeypatch):
    """The scaling helper the GPU script uses (`--nproc-per-node`): one scoring run per process
    count, speed-ups relative to the first, and a check that every run stored the same values
    (the scoring itself is stubbed here; `benchmarks/procs_scaling.py` runs it for real)."""
    spec = importlib.util.spec_from_file_location("procs_scaling", SCRIPT.parent / "procs_scaling.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    seconds = {1: 100.0, 2: 52.0, 4: 27.0}

    def fake_score(model, dataset, procs, lb, device="cpu", batch_size=None):
        d = Path(lb, "results", dataset)
        d.mkdir(parents=True)
        per_image = {"VG": [1, 2, 3]} if procs != 4 else {"VG": [1, 2, 4]}  # the 4-process run differs
        (d / "r.json").write_text(json.dumps({"per_image": per_image, "accuracy": {"on_set": 1.0}}))
        return seconds[procs]

    monkeypatch.setattr(mod, "_score", fake_score)
    r = mod.scaling("m", "cifar10", [1, 2], device="cuda", batch_size=125)
    assert r["speedup"] == {1: 1.0, 2: round(100 / 52, 2)} and r["identical"] is True
    assert mod.scaling("m", "cifar10", [1, 2, 4])["identical"] is False
