"""Every docstring example of the three packages runs, imported by its ``salbench.*`` name.

(pytest's ``--doctest-modules`` would import ``metrics/x.py`` as a second, top-level ``metrics.x``
module: registries would then see every architecture twice.)
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import salbench.benchmark
import salbench.metrics
import salbench.model_zoo


def _modules() -> list[str]:
    names = []
    for pkg in (salbench.metrics, salbench.model_zoo, salbench.benchmark):
        names.append(pkg.__name__)
        names += [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]
    return sorted(names)


MODULES = _modules()


def test_every_module_is_found():
    assert {"salbench.metrics.sparsity", "salbench.model_zoo.smoothing", "salbench.benchmark.stats",
            "salbench.model_zoo.architectures.lenet"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False,
                             report=True)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples of {name} failed (see output)"
