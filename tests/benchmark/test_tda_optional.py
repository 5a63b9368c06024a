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


def test_readme_tda_table_quotes_the_committed_csvs():
    """The README's N vs A vs G table is the committed board and comparisons, rounded (no drift)."""
    import csv
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    board = list(csv.DictReader((root / "leaderboards" / "fmnist_tda.csv").open()))
    comps = list(csv.DictReader((root / "leaderboards" / "fmnist_tda_comparisons.csv").open()))
    names = {"class detection": "class_detection", "top-1 cardinality": "top1_cardinality",
             "randomization Spearman": "randomization_spearman"}
    rows = [r for r in (root / "README.md").read_text().splitlines()
            if re.match(r"\| (similarity|representer) \| ", r)]
    assert len(rows) == 6
    num = r"([+−-]?[0-9.]+)"
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        explainer, metric = cells[0], names[cells[1].rstrip(" ↑↓")]
        for variant, cell in zip("NAG", cells[2:5]):
            est, lo, hi = (float(x) for x in re.fullmatch(rf"{num} \[{num}, {num}\]", cell).groups())
            r = next(b for b in board if b["variant"] == variant and b["seed"] == "0" and b["explainer"] == explainer)
            for got, key in ((est, metric), (lo, f"{metric}_lo"), (hi, f"{metric}_hi")):
                assert abs(got - float(r[key])) <= 5e-4 + 1e-9, (line, variant, key)
        for comparison, cell in zip(("A vs N", "G vs A"), cells[5:7]):
            m = re.fullmatch(rf"{num} \[{num}, {num}\] (.+)", cell.replace("−", "-"))
            c = next(c for c in comps if c["comparison"] == comparison and c["seed"] == "0"
                     and c["explainer"] == explainer and c["metric"] == metric)
            for got, key in zip(m.groups()[:3], ("delta", "delta_lo", "delta_hi")):
                assert abs(float(got) - float(c[key])) <= 5e-4 + 1e-9, (line, comparison, key)
            assert m.group(4) == c["verdict"], (line, comparison)


def test_readme_tda_seed_table_quotes_the_committed_board():
    import csv
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    board = {(b["model"], b["explainer"]): b for b in csv.DictReader((root / "leaderboards" / "fmnist_tda.csv").open())}
    ids = {"N": "fmnist-lenet-N-paper-10ep", "N-s1": "fmnist-lenet-N-paper-10ep-s1"}
    rows = [r for r in (root / "README.md").read_text().splitlines() if re.match(r"\| N(-s1)? \| (similarity|representer) \|", r)]
    assert len(rows) == 4
    num = r"([0-9.]+)"
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        b = board[(ids[cells[0]], cells[1])]
        for metric, cell in zip(("class_detection", "top1_cardinality", "randomization_spearman"), cells[2:5]):
            vals = [float(x) for x in re.fullmatch(rf"{num} \[{num}, {num}\]", cell).groups()]
            for got, key in zip(vals, (metric, f"{metric}_lo", f"{metric}_hi")):
                assert abs(got - float(b[key])) <= 5e-4 + 1e-9, (line, key)
