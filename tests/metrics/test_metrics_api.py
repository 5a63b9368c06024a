"""The public surface of the metrics package and its dependency direction (DESIGN.md)."""

from __future__ import annotations

import ast
import inspect
import sys
from pathlib import Path

from salbench import metrics
from salbench.metrics import protocol

PACKAGE_DIR = Path(metrics.__file__).parent
PUBLIC = {
    "PROTOCOL_VERSION",
    "Explainer",
    "vanilla_gradient",
    "integrated_gradients",
    "gini_index",
    "ssim",
    "SSIMUnderNoise",
    "ssim_under_noise",
    "relative_output_stability",
    "ros_variants",
    "aggregate_ros",
    "median_log10_ros",
    "noisy_linear_imputation",
    "road_curve",
    "road_curves",
    "tied_fraction",
    "road_aopc",
    "randomisation_layers",
    "CascadeResult",
    "cascading_randomisation",
    "efficient_mprt",
}


def test_all_exports_exist():
    assert set(metrics.__all__) == PUBLIC
    for name in metrics.__all__:
        assert getattr(metrics, name) is not None
    # one version string, re-exported (its value is metrics/protocol.py's, bumped with PROTOCOL.md)
    assert metrics.PROTOCOL_VERSION is protocol.PROTOCOL_VERSION
    assert protocol.PROTOCOL_VERSION in ("v1", "v2")


def test_public_functions_are_documented_with_shapes_raises_and_examples():
    for name in PUBLIC - {"PROTOCOL_VERSION", "Explainer", "SSIMUnderNoise", "CascadeResult"}:
        doc = inspect.getdoc(getattr(metrics, name))
        assert doc, name
        for section in ("Args:", "Returns:", "Raises:", "Example:", "PROTOCOL"):
            if name == "aggregate_ros" and section == "PROTOCOL":
                continue
            assert section in doc, f"{name} docstring lacks {section!r}"
        assert ">>>" in doc, name


def _imported_top_level_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(_top(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "salbench":
                names.update(f"salbench.{alias.name}" for alias in node.names)
            else:
                names.add(_top(node.module))
    return names


def _top(name: str) -> str:
    """``torch.nn`` -> ``torch``; our packages keep their second component: ``salbench.metrics``."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "salbench" else parts[0]


def test_metrics_depends_only_on_torch_and_captum():
    """Besides the standard library (ctypes etc. for the optional C kernels, metrics/_native.py),
    only torch and captum."""
    allowed = {"torch", "captum", "salbench.metrics"}
    for path in sorted(PACKAGE_DIR.glob("*.py")):
        imported = {m for m in _imported_top_level_modules(path) if m.split(".")[0] not in sys.stdlib_module_names}
        assert imported <= allowed, f"{path.name} imports {sorted(imported - allowed)}"


def test_protocol_constants_are_not_retyped_in_code():
    """The protocol's numbers live in metrics/protocol.py; code imports them (STYLE.md)."""
    numbers = {
        v
        for name, v in vars(protocol).items()
        if name.isupper() and isinstance(v, float) and v not in (0.0, 1.0, 2.0)
    }
    numbers |= set(protocol.SSIM_SIGMAS) | {w for _, _, w in protocol.ROAD_NEIGHBOUR_WEIGHTS}
    assert {1e-7, 1e-6, 0.02, 0.2, 0.01, 0.03, 1 / 6, 1 / 12} <= numbers
    for path in sorted(PACKAGE_DIR.glob("*.py")):
        if path.name == "protocol.py":
            continue
        constants = {
            node.value
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, float)
        }
        assert not constants & numbers, f"{path.name} re-types {sorted(constants & numbers)}"
