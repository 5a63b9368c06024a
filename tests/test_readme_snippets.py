"""Every ```python block of README.md runs as written (refactor issue, defect 10).

Each block is executed on its own, in a fresh namespace, in a fresh temporary working directory
(``cwd``; the repository root when none is given), so a block may write files: a block
that no longer matches the API (a renamed function, a changed return type) fails here. A block
whose first line is a marker comment ``# needs: PATH_OR_$ENV_VAR [...]`` (data, a GPU checkpoint)
is skipped, with the missing item as the reason, when one of them is absent; no marker means
the block must run anywhere, fast (tiny models and tensors).

The metrics block is also checked against what the README's text says each function returns.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"^```python[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
_NEEDS = re.compile(r"^#\s*needs:\s*(.+)$")


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(first line number, code)`` of every ```python fenced block in ``text``."""
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in _BLOCK.finditer(text)]


def missing_requirements(code: str) -> list[str]:
    """Items of a leading ``# needs:`` marker that are absent (``$VAR`` unset, or a path that does not exist)."""
    first = code.lstrip().splitlines()[0] if code.strip() else ""
    marker = _NEEDS.match(first)
    if not marker:
        return []
    missing = []
    for item in marker.group(1).split():
        if item.startswith("$"):
            value = os.environ.get(item[1:])
            if not value or not Path(value).exists():
                missing.append(item)
        elif not (README.parent / item).exists():
            missing.append(item)
    return missing


BLOCKS = python_blocks(README.read_text())


def _run(code: str, line: int, cwd: Path | None = None) -> dict:
    missing = missing_requirements(code)
    if missing:
        pytest.skip(f"README.md block at line {line} needs {', '.join(missing)}, absent here")
    namespace: dict = {"__name__": "__readme__"}
    old = os.getcwd()
    os.chdir(cwd or README.parent)
    try:
        exec(compile(code, f"README.md:{line}", "exec"), namespace)
    finally:
        os.chdir(old)
    return namespace


def test_the_readme_has_python_blocks():
    assert BLOCKS, "README.md lost its ```python blocks (the metrics example)"


@pytest.mark.parametrize("line, code", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_python_block_runs(line, code, tmp_path):
    _run(code, line, cwd=tmp_path)


def test_metrics_block_returns_what_the_text_says():
    """The README: per-image tensors, a named tuple from ssim_under_noise, floats from the aggregates."""
    from salbench import metrics

    found = [(line, code) for line, code in BLOCKS if "metrics.road_aopc" in code]
    assert found, "README.md has no metrics example block (one calling metrics.road_aopc)"
    ns = _run(found[0][1], found[0][0])
    x, b = ns["x"], ns["x"].shape[0]
    hw = tuple(x.shape[2:])
    assert ns["maps"].shape == (b, *hw) and ns["ig_maps"].shape == (b, *hw)
    assert ns["gini"].shape == (b,)
    assert isinstance(ns["ssim"], metrics.SSIMUnderNoise)
    n_sigmas = len(metrics.protocol.SSIM_SIGMAS)
    assert ns["ssim"].scores.shape == ns["ssim"].kept.shape == (n_sigmas, b)
    assert ns["ssim_per_sigma"].shape == (n_sigmas,)
    assert ns["ros"].shape == (b,)
    assert isinstance(ns["log10_ros"], float) and isinstance(ns["ros_nan_fraction"], float)
    assert ns["curve"].shape == (b, len(metrics.protocol.ROAD_PERCENTAGES)) and ns["curve"].dtype == torch.bool
    assert isinstance(ns["aopc"], float)


def test_needs_marker_skips_only_when_the_item_is_absent(tmp_path, monkeypatch):
    assert missing_requirements("x = 1\n") == []
    assert missing_requirements("# needs: README.md\nx = 1\n") == []
    assert missing_requirements("# needs: data/nowhere $SALBENCH_NO_SUCH_DIR\n") == ["data/nowhere", "$SALBENCH_NO_SUCH_DIR"]
    monkeypatch.setenv("SALBENCH_README_DATA", str(tmp_path))
    assert missing_requirements("# needs: $SALBENCH_README_DATA\n") == []
    assert python_blocks("a\n```python\nx = 1\n```\n```bash\nls\n```\n") == [(3, "x = 1\n")]
