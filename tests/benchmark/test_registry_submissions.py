"""Registry submissions with another normalisation: a claimed accuracy the model misses by more than
5 points is refused before scoring (naming normalisation), --mean/--std fixes it and goes on the
card; stored submissions load back (registry and exported); `salbench zoo archs`."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from salbench.benchmark import harness
from salbench.benchmark import submit as S
from salbench.benchmark.cli import main
from salbench.model_zoo.attacks import natural_accuracy
from tests.model_zoo.pt2_craft import PlainLeNet, export_to

from .conftest import quick_train


def _tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


def _weights_for_normalisation(model, m2: float, s2: float) -> dict:
    """The weights of ``model`` (which normalises with the FMNIST mean/std m, s) rewritten for a model
    trained on (x - m2) / s2: the same function under that normalisation (conv1 has no padding)."""
    m, s = model.normalize.mean.item(), model.normalize.std.item()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    w, b = sd["stages.0.0.weight"], sd["stages.0.0.bias"]
    sd["stages.0.0.weight"] = w * s2 / s
    sd["stages.0.0.bias"] = b + w.sum(dim=(1, 2, 3)) * (m2 - m) / s
    return sd


def test_claimed_accuracy_refuses_a_wrong_normalisation_and_mean_std_fixes_it(env, fmnist_small, tmp_path):
    train, test = fmnist_small
    ref = quick_train(train, seed=5, steps=150)
    acc = natural_accuracy(ref, test.images, test.labels)
    f = tmp_path / "other.safetensors"
    save_file(_weights_for_normalisation(ref, 0.5, 0.1), str(f))  # trained on (x - 0.5) / 0.1
    wrong = S.validate(f, arch="lenet", dataset="fmnist")
    assert acc - natural_accuracy(wrong, test.images, test.labels) > 0.05  # the case the check exists for

    env["lb"].mkdir(parents=True, exist_ok=True)
    (env["lb"] / "fmnist.csv").write_text("id,method\n")
    before = _tree_digest(env["lb"])
    with pytest.raises(S.SubmissionError, match=r"points below the claimed .* A likely cause is the input "
                                                r"normalisation: the model was scored with the fmnist default "
                                                r"normalisation .*--mean/--std"):
        harness.submit(f, arch="lenet", dataset="fmnist", name="raw", claimed_accuracy=100 * acc, progress=False,
                       imageset=env["imageset"], test_split=test)
    assert _tree_digest(env["lb"]) == before

    norm = {"mean": [0.5], "std": [0.1]}
    model, card, payload = S.prepare_submission(f, arch="lenet", dataset="fmnist", name="raw", normalization=norm,
                                                claimed_accuracy=S.parse_claimed_accuracy(100 * acc))
    assert card["normalization"] == norm and card["claimed_accuracy"] == round(acc, 6)
    x = test.float_images(torch.arange(16))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    assert S.check_claimed_accuracy(model, test, card["claimed_accuracy"], dataset="fmnist",
                                    normalization=norm) == pytest.approx(acc, abs=1 / len(test))
    # stored, it loads back with its normalisation
    sdir = tmp_path / "subs"
    S.store_submission(card, payload, sdir)
    with torch.no_grad():
        torch.testing.assert_close(S.load_submission(card, sdir)(x), ref(x), rtol=1e-5, atol=1e-5)


def test_a_stored_exported_submission_loads_back_and_is_verified(tmp_path):
    torch.manual_seed(0)
    net = PlainLeNet().eval()
    f = export_to(net, tmp_path / "net.pt2")
    model, card, payload = S.prepare_submission(f, arch=None, dataset="fmnist", name="net",
                                                submissions_dir=tmp_path / "subs", results_root=tmp_path / "res")
    assert card["arch"] == "exported" and payload == f.read_bytes() and card["smoothing"] is None
    sdir = tmp_path / "subs"
    S.store_submission(card, payload, sdir)
    x = torch.rand(3, 1, 28, 28)
    # the stored program vs the eager module it was exported from: two computation paths, float32
    # rounding, not bit-identity (PROTOCOL §8.7); logits ~0.1
    torch.testing.assert_close(S.load_submission(card, sdir)(x), net(x), rtol=1e-5, atol=1e-6)
    (sdir / "fmnist" / card["weights"]).write_bytes(payload[:-1] + b"x")
    with pytest.raises(S.SubmissionError, match="does not match the sha256 on the card"):
        S.load_submission(card, sdir)
    for kw, match in (({"arch": "lenet"}, "scored with --arch exported"),
                      ({"arch": None, "smoothing": {"filter": "gaussian", "placement": 1}}, "--smoothing"),
                      ({"arch": None, "normalization": {"mean": [0.5], "std": [0.5]}}, "--mean/--std")):
        with pytest.raises(S.SubmissionError, match=match):
            S.prepare_submission(f, dataset="fmnist", name="net", **kw)
    with pytest.raises(S.SubmissionError, match="--arch is required for weights"):
        S.prepare_submission(tmp_path / "w.safetensors", arch=None, dataset="fmnist", name="w")


def test_cli_mean_without_std_and_zoo_archs(capsys):
    assert main(["score", "x.safetensors", "--arch", "lenet", "--dataset", "fmnist", "--name", "n",
                 "--mean", "0.5"]) == 2
    assert "--mean and --std go together" in capsys.readouterr().err
    assert main(["zoo", "archs"]) == 0
    out = capsys.readouterr().out
    assert "lenet: 28x28 input, datasets fmnist, 10 state-dict keys" in out
    assert "resnet18: 224x224 input, datasets imagenette" in out and "key maps: torchvision" in out
    assert "  stages.{0,1}.0.{weight,bias}" in out and "exported: any architecture" in out
    assert main(["zoo", "archs", "--keys", "lenet"]) == 0
    assert "  head.5.weight (10, 84)" in capsys.readouterr().out
