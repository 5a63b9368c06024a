"""Registry weights in other shapes: torchvision ResNet-18 keys (key map), checkpoint dicts
(--state-key), another normalisation (--mean/--std), and the key listing of `salbench zoo archs`."""

from __future__ import annotations

import itertools
import re

import pytest
import torch
from safetensors.torch import save_file

from salbench.model_zoo import zoo
from salbench.model_zoo.architectures import build, list_archs
from salbench.model_zoo.architectures.describe import abbreviate_keys, describe, expected_state_dict
from salbench.model_zoo.keymaps import apply_key_map
from salbench.model_zoo.zoo import CheckpointError, read_checkpoint

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


@pytest.fixture(scope="module")
def tv_resnet18(tmp_path_factory):
    """A torchvision ResNet-18 (10 classes) with non-trivial BatchNorm statistics, saved as a .pt state dict."""
    import torchvision

    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=10)
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("tv") / "resnet18.pt"
    torch.save(tv.state_dict(), path)
    return tv.eval(), path


def test_torchvision_resnet18_keys_map_onto_our_resnet18_and_compute_the_same_function(tv_resnet18):
    """Ours normalises inside; torchvision expects normalised input: ours(x) == tv((x - mean) / std)."""
    tv, path = tv_resnet18
    model, how = read_checkpoint(path, "resnet18", dataset="imagenette", normalization=IMAGENET, key_map="auto")
    assert how == {"key_map": "torchvision"}
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    mean, std = (torch.tensor(IMAGENET[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    with torch.no_grad():
        torch.testing.assert_close(model(x), tv((x - mean) / std), rtol=1e-5, atol=1e-5)
    explicit, how = read_checkpoint(path, "resnet18", dataset="imagenette", normalization=IMAGENET,
                                    key_map="torchvision")
    assert how["key_map"] == "torchvision"
    assert all(torch.equal(a, b) for a, b in zip(explicit.state_dict().values(), model.state_dict().values()))
    with pytest.raises(CheckpointError, match=r"does not fit architecture 'resnet18' \(key maps for resnet18: "
                                              r"torchvision"):
        read_checkpoint(path, "resnet18", dataset="imagenette", key_map="none")
    with pytest.raises(CheckpointError, match="no key map 'timm' for architecture 'resnet18'"):
        read_checkpoint(path, "resnet18", dataset="imagenette", key_map="timm")


def test_key_map_is_a_bijection_onto_our_keys():
    import torchvision

    tv_keys = list(torchvision.models.resnet18(num_classes=10).state_dict())
    ours = build("resnet18").state_dict()
    mapped = apply_key_map({k: torch.zeros(1) for k in tv_keys}, "resnet18", "torchvision")
    assert set(mapped) == set(ours) and len(mapped) == len(tv_keys)


def test_checkpoint_dict_needs_and_takes_a_state_key(tmp_path):
    model = build("lenet").eval()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "epoch": 1, "optimizer": {"lr": 0.1}}, path)
    with pytest.raises(CheckpointError, match=r"pass --state-key with the entry that holds the weights \('model', "
                                              r"'optimizer'\)"):
        read_checkpoint(path, "lenet")
    loaded, _ = read_checkpoint(path, "lenet", state_key="model")
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(loaded(x), model(x))
    with pytest.raises(CheckpointError, match=r"has no entry 'weights' \(--state-key\); its top-level keys: "
                                              r"'model', 'epoch', 'optimizer'"):
        read_checkpoint(path, "lenet", state_key="weights")
    st = tmp_path / "w.safetensors"
    save_file(model.state_dict(), str(st))
    with pytest.raises(CheckpointError, match="--state-key applies to a .pt/.pth checkpoint dict"):
        read_checkpoint(st, "lenet", state_key="model")


def test_another_normalisation_builds_the_first_layer_from_it(tmp_path):
    """A LeNet trained on (x - m2) / s2: its conv1 rewritten for the dataset's normalisation gives
    the same logits, so weights + (m2, s2) must equal the original model exactly (up to float)."""
    torch.manual_seed(0)
    ref = build("lenet").eval()  # normalises with the FMNIST mean/std (m, s)
    m, s = ref.normalize.mean.item(), ref.normalize.std.item()
    m2, s2 = 0.0, 1.0  # trained on raw [0, 1] pixels
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    w, b = sd["stages.0.0.weight"], sd["stages.0.0.bias"]
    # W (x - m) / s + b == W' (x - m2) / s2 + b'  with W' = W s2 / s,  b' = b + sum(W) (m2 - m) / s
    sd["stages.0.0.weight"] = w * s2 / s
    sd["stages.0.0.bias"] = b + w.sum(dim=(1, 2, 3)) * (m2 - m) / s
    path = tmp_path / "raw.safetensors"
    save_file(sd, str(path))
    model, _ = read_checkpoint(path, "lenet", normalization={"mean": [m2], "std": [s2]})
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(read_checkpoint(path, "lenet")[0](x), ref(x), atol=1e-3)  # with the default: not
    for bad, match in (({"mean": [0.1, 0.2], "std": [1.0, 1.0]}, "--mean must be 1 number"),
                       ({"mean": [0.1], "std": [0.0]}, "--std must be > 0"),
                       ({"mean": [float("nan")], "std": [1.0]}, "--mean must be finite")):
        with pytest.raises(ValueError, match=match):
            read_checkpoint(path, "lenet", normalization=bad)


def _expand(pattern: str) -> set[str]:
    """All keys a brace pattern stands for."""
    parts = re.split(r"(\{[^}]*\})", pattern)
    choices = [p[1:-1].split(",") if p.startswith("{") else [p] for p in parts]
    return {"".join(c) for c in itertools.product(*choices)}


@pytest.mark.parametrize("arch", list_archs())
def test_zoo_archs_abbreviation_stands_for_exactly_the_expected_keys(arch):
    keys = list(expected_state_dict(arch))
    patterns = abbreviate_keys(keys)
    expanded = [k for p in patterns for k in sorted(_expand(p))]
    assert sorted(expanded) == sorted(keys) and len(expanded) == len(set(expanded))
    assert len(patterns) <= 16  # abbreviated
    text = describe(arch)
    assert text.startswith(f"{arch}: ") and "input, datasets" in text
    full = describe(arch, keys=True)
    assert all(f"  {k} (" in full for k in keys)
