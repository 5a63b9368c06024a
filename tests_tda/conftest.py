"""The TDA track's tests run in .venv-tda (`make test-tda`), never in the core suite (tests/).

They are skipped, with the reason, only when the 'tda' extra could not be installed from the
package index (the Makefile sets SALBENCH_TDA_SKIP then) or quanda is absent from this env."""

import importlib.util
import os

import pytest
import torch

_REASON = os.environ.get("SALBENCH_TDA_SKIP") or (
    None if importlib.util.find_spec("quanda") else
    "quanda is not installed in this environment: run `make test-tda` (it installs the 'tda' extra into .venv-tda)")


def pytest_collection_modifyitems(config, items):
    if _REASON:
        for item in items:
            item.add_marker(pytest.mark.skip(reason=_REASON))


@pytest.fixture(autouse=True)
def _one_thread():
    # the track's small matrix ops are much faster on one thread when the cores are busy (docs/tda.md)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
