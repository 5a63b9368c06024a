"""The dependency direction of DESIGN.md: benchmark -> model_zoo, benchmark -> metrics; never back.

Static: every import statement of every module (including function-local imports) is read
from the source with ``ast``, so a lazy import inside a function cannot hide a wrong edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {"metrics": {"model_zoo", "benchmark"}, "model_zoo": {"benchmark"}}


def _package_of(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] == "salbench" and len(parts) > 1:
        parts = parts[1:]
    return parts[0] if parts[0] in ("metrics", "model_zoo", "benchmark") else None


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            if node.module == "salbench":
                out += [(node.lineno, f"salbench.{a.name}") for a in node.names]
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_against_the_dependency_direction(package):
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, name in _imports(path):
            if _package_of(name) in FORBIDDEN[package]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not bad, "imports against the dependency direction (DESIGN.md):\n" + "\n".join(bad)


def test_the_check_sees_a_violation(tmp_path):
    """The scanner itself finds both spellings, also inside a function."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from salbench.benchmark import harness\n    import model_zoo.zoo\n")
    assert [_package_of(n) for _, n in _imports(f)] == ["benchmark", "model_zoo"]


def test_our_packages_are_imported_by_their_salbench_names_only():
    """``import metrics`` would pick up a user's own metrics.py (or PyPI's ``metrics``): every
    import of our packages, in code, tests and benchmarks, goes through ``salbench.``."""
    bad = []
    for folder in ("metrics", "model_zoo", "benchmark", "tests", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for line, name in _imports(path):
                if name.split(".")[0] in ("metrics", "model_zoo", "benchmark"):
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not bad, "use the salbench.* names:\n" + "\n".join(bad)
