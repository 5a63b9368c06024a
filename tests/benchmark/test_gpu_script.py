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
