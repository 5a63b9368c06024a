"""`--claimed-accuracy` (issue 28, item 5): 0.5 points of tolerance on the full test split, and a refusal
that names the usual normalisation which fits the claim, with the exact option to pass (registry weights)
or the statement that the normalisation belongs inside the program (`.pt2`; no --mean/--std advice).

The realistic case is built from a committed zoo checkpoint instead of a training run: the FMNIST A LeNet's
first convolution rewritten so that the same function expects input normalised with mean/std 0.5/0.5
(conv1 has no padding, so the rewrite is exact). Submitted without --mean/--std it loses 1.72 points, inside
the old 5-point tolerance; claiming the zoo model's natural accuracy from its card must now be refused.
Each accuracy is one pass over the 10 000 test images (about a second for a LeNet).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from salbench.benchmark import submit as S
from salbench.benchmark.cli import main
from salbench.model_zoo import zoo
from salbench.model_zoo.attacks import natural_accuracy
from salbench.model_zoo.data import DatasetNotFoundError, load_split

ZOO_ID = "fmnist-lenet-A-paper-10ep"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def test_split():
    try:
        return load_split("fmnist", "test", download=False)
    except DatasetNotFoundError as e:
        pytest.skip(f"FMNIST not available ({e}); `make data` fetches it")


@pytest.fixture(scope="module")
def zoo_model():
    return zoo.load(ZOO_ID), zoo.get_card(ZOO_ID)


def _half_normalised_weights(model) -> dict:
    """``model``'s weights (it normalises with the FMNIST mean/std m, s) for a LeNet trained on (x - 0.5) / 0.5."""
    m, s = model.normalize.mean.item(), model.normalize.std.item()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    w, b = sd["stages.0.0.weight"], sd["stages.0.0.bias"]
    sd["stages.0.0.weight"] = w * 0.5 / s
    sd["stages.0.0.bias"] = b + w.sum(dim=(1, 2, 3)) * (0.5 - m) / s
    return sd


@pytest.fixture(scope="module")
def half_file(zoo_model, tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("half") / "lenet-half.safetensors"
    save_file(_half_normalised_weights(zoo_model[0]), str(f))
    return f


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def test_the_measurement_is_the_cards_and_deterministic(zoo_model, test_split):
    model, card = zoo_model
    a, b = (natural_accuracy(model, test_split.images, test_split.labels) for _ in range(2))
    assert a == b == card["natural_accuracy"] and len(test_split) == 10_000  # what the trainer wrote on the card


def test_tolerance_is_half_a_point(zoo_model, test_split):
    model, card = zoo_model
    acc = card["natural_accuracy"]
    assert S.CLAIM_TOLERANCE == 0.005
    assert S.check_claimed_accuracy(model, test_split, round(acc + 0.005, 6), dataset="fmnist") == acc  # 0.50: kept
    with pytest.raises(S.SubmissionError, match=r"0\.51 points below the claimed .*at most 0\.5 allowed"):
        S.check_claimed_accuracy(model, test_split, round(acc + 0.0051, 6), dataset="fmnist")


def test_half_normalised_lenet_without_mean_std_is_refused_naming_the_option(zoo_model, half_file, test_split,
                                                                          tmp_path, monkeypatch, capsys):
    """The issue's case end to end through the CLI: one line, exit 2, nothing written."""
    _, card = zoo_model
    wrong = S.validate(half_file, arch="lenet", dataset="fmnist")
    lost = card["natural_accuracy"] - natural_accuracy(wrong, test_split.images, test_split.labels)
    assert S.CLAIM_TOLERANCE < lost < 0.05  # passed the old 5-point check, fails the new one (1.72 points)

    lb = tmp_path / "leaderboards"
    monkeypatch.setenv("SALBENCH_LEADERBOARDS_DIR", str(lb))
    rc = main(["score", str(half_file), "--arch", "lenet", "--dataset", "fmnist", "--name", "half",
               "--claimed-accuracy", f"{100 * card['natural_accuracy']:.2f}", "--no-band"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "1.72 points below the claimed 76.41% (at most 0.5 allowed)" in err
    assert "with mean 0.5 / std 0.5 instead of the fmnist default normalisation" in err
    assert "it reaches 76.41%" in err and "re-submit with --mean 0.5 --std 0.5 (nothing was written)" in err
    assert _tree(lb) == []  # nothing written

    # the option it names makes the same weights pass the check (and they compute the zoo model's function)
    norm = {"mean": [0.5], "std": [0.5]}
    fixed = S.validate(half_file, arch="lenet", dataset="fmnist", normalization=norm)
    assert S.check_claimed_accuracy(fixed, test_split, card["natural_accuracy"], dataset="fmnist",
                                    normalization=norm) == pytest.approx(card["natural_accuracy"], abs=2e-4)


def test_a_wrong_mean_std_is_answered_with_the_default(zoo_model, test_split, tmp_path):
    """Registry weights trained with the dataset's own statistics, submitted with --mean/--std 0.5/0.5."""
    model, card = zoo_model
    f = tmp_path / "a.safetensors"
    save_file({k: v.clone() for k, v in model.state_dict().items()}, str(f))
    norm = {"mean": [0.5], "std": [0.5]}
    wrong = S.validate(f, arch="lenet", dataset="fmnist", normalization=norm)
    with pytest.raises(S.SubmissionError) as e:
        S.check_claimed_accuracy(wrong, test_split, card["natural_accuracy"], dataset="fmnist", normalization=norm,
                                 name="a.safetensors")
    msg = str(e.value)
    assert "with the fmnist default normalisation (mean 0.286 / std 0.353) instead of the --mean 0.5 / --std 0.5 " \
           "given it reaches 76.41%" in msg
    assert msg.endswith("re-submit without --mean/--std (the default) (nothing was written)")
    assert wrong.normalize.mean.item() == 0.5  # the model it was given is left as it was


class _ExpectsHalfNormalised(nn.Module):
    """A program exported without its normalisation: it expects input already normalised with 0.5/0.5."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, z):
        return self.net(z * 0.5 + 0.5)


def test_pt2_refusal_says_the_normalisation_belongs_inside_the_program(zoo_model, test_split, tmp_path,
                                                                      monkeypatch, capsys):
    from tests.model_zoo.pt2_craft import export_to

    model, card = zoo_model
    f = export_to(_ExpectsHalfNormalised(model).eval(), tmp_path / "half.pt2")
    lb = tmp_path / "leaderboards"
    monkeypatch.setenv("SALBENCH_LEADERBOARDS_DIR", str(lb))
    rc = main(["score", str(f), "--dataset", "fmnist", "--name", "half-pt2",
               "--claimed-accuracy", f"{100 * card['natural_accuracy']:.2f}", "--no-band"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "points below the claimed 76.41% (at most 0.5 allowed)" in err  # the registry route's words
    assert "fed images normalised with mean 0.5 / std 0.5 first it reaches 76.4" in err
    assert "the normalisation must be inside the exported program" in err
    assert "--mean" not in err and "--std" not in err  # a .pt2 file refuses them
    assert _tree(lb) == []


def test_pt2_without_a_fitting_normalisation_gives_no_mean_std_advice(test_split, tmp_path):
    """Nothing fits (a claim no normalisation reaches): the .pt2 message still never says --mean/--std."""
    from salbench.model_zoo.exported import load_exported
    from tests.model_zoo.pt2_craft import PlainLeNet, export_to

    torch.manual_seed(0)
    program = load_exported(export_to(PlainLeNet().eval(), tmp_path / "untrained.pt2"))
    with pytest.raises(S.SubmissionError) as e:
        S.check_claimed_accuracy(program, test_split, 0.9, dataset="fmnist", name="untrained.pt2")
    msg = str(e.value)
    assert "below the claimed 90.00%" in msg and "its normalisation inside forward" in msg
    assert "--mean" not in msg and "--std" not in msg


def test_usual_normalisations_of_an_rgb_dataset():
    labels = [label for label, _, _ in S.usual_normalizations("cifar10")]
    assert labels == ["none", "0.5/0.5", "cifar10", "imagenet"]
    # ImageNette's own statistics are ImageNet's: tried once
    assert [label for label, _, _ in S.usual_normalizations("imagenette")] == ["none", "0.5/0.5", "imagenette"]
