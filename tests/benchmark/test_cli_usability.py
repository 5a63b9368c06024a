"""CLI papercuts: defaults and choices in help, --threads after the subcommand, non-zero exit on
an unknown dataset, plain (ANSI-free) error messages."""

import pytest

from salbench.benchmark import cli


def _help(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_help_shows_defaults_and_choices(capsys):
    out = _help(capsys, "train")
    assert "(default: paper)" in out and "(default: 0)" in out and "paper-10ep" in out and "cpu-resnet8" in out
    out = _help(capsys, "run")
    assert "default: VG,IG" in out and "{fmnist,cifar10,imagenette}" in out
    assert "``" not in _help(capsys)


def test_threads_is_accepted_after_the_subcommand(capsys, monkeypatch):
    seen = {}
    monkeypatch.setattr(cli, "_threads", lambda n: seen.setdefault("n", n))
    assert cli.main(["zoo", "presets", "--threads", "1", "--dataset", "fmnist"]) == 0
    assert seen["n"] == 1 and "fmnist/paper-10ep" in capsys.readouterr().out


def test_unknown_dataset_exits_nonzero(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["zoo", "list", "--dataset", "foo"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_errors_carry_no_ansi_codes(capsys, monkeypatch):
    def boom(args):
        raise ValueError("\x1b[1;31mbad thing\x1b[0m happened")

    monkeypatch.setattr(cli, "cmd_zoo_presets", boom)
    assert cli.main(["zoo", "presets"]) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "bad thing happened" in err and "\x1b" not in err


def test_zoo_list_shows_autoattack_and_the_pgd_gap(capsys, monkeypatch):
    """Issue 11: every card's AutoAttack robust accuracy beside PGD, with the PGD - AutoAttack gap."""
    from salbench.model_zoo import catalog  # the cards' torch-free reader (zoo re-exports it)

    cards = [{"id": "x-A", "variant": "A", "preset": "p", "natural_accuracy": 0.8, "robust_accuracy": 0.62,
              "num_params": 10, "autoattack": {"robust_accuracy": 0.59}},
             {"id": "x-G", "variant": "G", "preset": "p", "natural_accuracy": 0.8, "robust_accuracy": 0.6,
              "num_params": 12}]
    monkeypatch.setattr(catalog, "list_cards", lambda dataset=None, cards_dir=None: cards)
    assert cli.main(["zoo", "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "AutoAtt" in out[0] and "PGD-AA" in out[0]
    assert out[1].split()[-3:] == ["0.5900", "+0.0300", "10"]
    assert out[2].split()[-3:] == ["-", "-", "12"] and "no AutoAttack yet" in out[3]
