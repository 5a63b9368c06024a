"""The training-data attribution track is optional (issue 16): the core install and suite never
import quanda, and `salbench tda` without it is a one-line error that names `make setup-tda`.
The track's own tests live in tests_tda/ and run in .venv-tda (`make test-tda`)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from salbench.benchmark.cli import EXIT_BAD_INPUT, main


def test_core_cli_and_tda_module_import_without_quanda():
    code = ("import sys, salbench.benchmark.cli, salbench.benchmark.tda as t; "
            "assert 'quanda' not in sys.modules, 'quanda imported'; "
            "assert t.TDAConfig().train_per_class == 500; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.skipif(importlib.util.find_spec("quanda") is not None, reason="quanda is installed in this environment")
def test_tda_without_the_extra_is_a_one_line_error_naming_setup_tda(capsys):
    assert main(["tda", "--dataset", "fmnist"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "make setup-tda" in err and "quanda" in err


def test_tda_arguments_are_checked_at_parse_time(capsys):
    with pytest.raises(SystemExit) as e:
        main(["tda", "--dataset", "fmnist", "--n-test", "1"])
    assert e.value.code == 2
    assert "--n-test" in capsys.readouterr().err
