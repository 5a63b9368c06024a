"""The architecture registry (PROTOCOL §1, §5): every registered arch is tested for free."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from salbench.model_zoo.architectures import NORMALIZATION, Normalize, arch_spec, build, list_archs
from salbench.model_zoo.data import DATASETS, IMAGE_SHAPE
from salbench.model_zoo.smoothing import SmoothBlock, gaussian_sigma
from salbench.model_zoo.zoo import count_params

BIG = 20_000_000  # archs above this many parameters only get the parameter-count check
BATCH_ONE = {"resnet18", "vgg16"}  # forward these at batch 1 (CPU cost / 1x1 BN maps)


def _cifar_resnet_params(n: int, w: int, k: int) -> int:
    """Hand count of a CIFAR ResNet-(6n+2) with conv+BN projection shortcuts (He et al.)."""
    conv = lambda cin, cout, ks: cin * cout * ks * ks  # noqa: E731  (bias-free)
    bn = lambda c: 2 * c  # noqa: E731
    total = conv(3, w, 3) + bn(w)  # stem
    cin = w
    for cout in (w, 2 * w, 4 * w):
        for i in range(n):
            a = cin if i == 0 else cout
            total += conv(a, cout, 3) + bn(cout) + conv(cout, cout, 3) + bn(cout)
            if a != cout:
                total += conv(a, cout, 1) + bn(cout)
        cin = cout
    return total + 4 * w * k + k


# independent references for the parameter counts
EXPECTED_PARAMS = {
    # conv 1->6 k5 (156) + conv 6->16 k5 (2416) + fc 256-120 (30840) + 120-84 (10164) + 84-10 (850)
    "lenet": 44_426,
    # conv 1->32 k5 (832) + conv 32->64 k5 (51264) + fc 1024-1024 (1049600) + 1024-10 (10250)
    "lenet_text": 1_111_946,
    "resnet8": _cifar_resnet_params(1, 16, 10),  # = 78,042
    "resnet20": _cifar_resnet_params(3, 16, 10),  # = 272,474
    # torchvision resnet18 (11,689,512 with 1000 classes) - 513 * 990 for a 10-class head
    "resnet18": 11_689_512 - 513 * 990,
    # VGG-16 convs 14,714,688 + BN 8448 + linear 512-10 (5130)
    "vgg16": 14_728_266,
    # Zagoruyko & Komodakis WRN-28-10 (the "36.5M" of the paper)
    "wrn28_10": 36_479_194,
}


def _input(arch: str, batch: int, seed: int = 0) -> torch.Tensor:
    spec = arch_spec(arch)
    c, h, w = IMAGE_SHAPE[spec.datasets[0]]
    assert h == w == spec.input_size
    return torch.rand(batch, c, h, w, generator=torch.Generator().manual_seed(seed))


def test_registry_lists_every_family():
    assert {"lenet", "resnet8", "resnet18", "vgg16", "wrn28_10"} <= set(list_archs())
    assert set(list_archs()) == set(EXPECTED_PARAMS), "a new arch needs its expected parameter count here"


@pytest.mark.parametrize("arch", list_archs())
def test_spec_is_consistent(arch):
    spec = arch_spec(arch)
    assert spec.name == arch
    assert spec.datasets and set(spec.datasets) <= set(DATASETS)
    for ds in spec.datasets:
        assert IMAGE_SHAPE[ds][-1] == spec.input_size


@pytest.mark.parametrize("arch", list_archs())
def test_parameter_count(arch):
    model = build(arch)
    assert count_params(model) == EXPECTED_PARAMS[arch]
    assert count_params(model) == sum(p.numel() for p in model.parameters())


def test_parameter_counts_quoted_in_the_docs():
    assert count_params(build("lenet")) == 44_426
    assert abs(count_params(build("wrn28_10")) - 36.5e6) < 0.05e6


@pytest.mark.parametrize("arch", list_archs())
def test_forward_shape_gradient_and_normalisation_first(arch):
    model = build(arch, num_classes=7).eval()
    if count_params(model) > BIG:
        pytest.skip(f"{arch}: {count_params(model) / 1e6:.1f}M parameters, forward too slow for the default suite")
    batch = 1 if arch in BATCH_ONE else 2
    x = _input(arch, batch).requires_grad_(True)

    # record which leaf module runs first and what it receives
    calls: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
    hooks = [
        m.register_forward_hook(lambda mod, inp, out: calls.append((mod, inp[0], out)))
        for m in model.modules()
        if not list(m.children())
    ]
    try:
        logits = model(x)
    finally:
        for h in hooks:
            h.remove()

    assert logits.shape == (batch, 7)
    assert torch.isfinite(logits).all()
    # normalisation is the first layer and sees the raw [0, 1] input
    first, inp, out = calls[0]
    assert isinstance(first, Normalize) and first is model.normalize
    assert inp is x
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in NORMALIZATION[arch_spec(arch).datasets[0]])
    torch.testing.assert_close(out, (x - mean) / std)
    # gradients reach the input
    logits[:, 3].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", list_archs())
def test_normalize_buffers_match_protocol(arch):
    for ds in arch_spec(arch).datasets:
        model = build(arch, dataset=ds)
        assert isinstance(next(iter(model.children())), Normalize), "Normalize must be the first child"
        mean, std = NORMALIZATION[ds]
        assert model.normalize.mean.flatten().tolist() == pytest.approx(mean)
        assert model.normalize.std.flatten().tolist() == pytest.approx(std)
        # not persisted: a checkpoint holds only learned weights + BN statistics
        assert not any(k.startswith("normalize.") for k in model.state_dict())


@pytest.mark.parametrize("arch", ["lenet", "resnet8"])
def test_model_equals_unnormalised_model_on_normalised_input(arch):
    """Normalisation is in the model, not in the pipeline: model(x) == rest((x - m) / s)."""
    torch.manual_seed(0)
    model = build(arch).eval()
    x = _input(arch, 3)
    with torch.no_grad():
        ref = model(x)
        mean, std = NORMALIZATION[arch_spec(arch).datasets[0]]
        z = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
        model.normalize = nn.Identity()
        torch.testing.assert_close(model(z), ref)


def test_dataset_must_fit_the_arch():
    with pytest.raises(ValueError, match="cifar10"):
        build("lenet", dataset="cifar10")


def test_unknown_arch_names_the_known_ones():
    with pytest.raises(ValueError) as info:
        build("resnet9000")
    msg = str(info.value)
    assert "resnet9000" in msg
    for name in list_archs():
        assert name in msg


@pytest.mark.parametrize("arch", ["lenet", "resnet8"])
@pytest.mark.parametrize("filter", ["gaussian", "mean", "median"])
def test_smoothblock_placement(arch, filter):
    n_stages = len(build(arch).stages)
    for placement in range(1, n_stages + 1):
        torch.manual_seed(0)
        model = build(arch, smoothing={"filter": filter, "placement": placement}).eval()
        assert isinstance(model.smooth, SmoothBlock) and model.smooth.filter == filter
        # sized by the feature map after stage `placement`, computed here independently
        with torch.no_grad():
            h = model.normalize(_input(arch, 1))
            for stage in model.stages[:placement]:
                h = stage(h)
        assert model.smooth.mix.in_channels == model.smooth.mix.out_channels == h.shape[1]
        assert model.smooth.sigma == pytest.approx(gaussian_sigma(h.shape[-1]))
        # and run right after that stage
        order: list[str] = []
        named = {**{f"stage{i}": s for i, s in enumerate(model.stages, 1)}, "smooth": model.smooth,
                 "head": model.head}
        hooks = [m.register_forward_hook(lambda *a, n=n: order.append(n)) for n, m in named.items()]
        with torch.no_grad():
            model(_input(arch, 1))
        for hk in hooks:
            hk.remove()
        expected = [f"stage{i}" for i in range(1, n_stages + 1)]
        expected.insert(placement, "smooth")
        assert order == [*expected, "head"]
        assert any(k.startswith("smooth.mix.") for k in model.state_dict())


def test_smoothblock_default_placement_is_after_the_first_block():
    model = build("lenet", smoothing={"filter": "gaussian"})
    assert model.placement == 1
    # LeNet: 28 -> conv5 -> 24 -> pool -> 12; 6 channels; σ(12) = 2.15 (PROTOCOL §5)
    assert model.smooth.mix.in_channels == 6
    assert model.smooth.sigma == pytest.approx(2.15)


@pytest.mark.parametrize("arch", list_archs())
def test_smoothblock_placement_out_of_range(arch):
    n_stages = len(build(arch).stages)
    for bad in (0, n_stages + 1):
        with pytest.raises(ValueError, match="placement"):
            build(arch, smoothing={"filter": "gaussian", "placement": bad})


def test_smoothing_changes_the_function():
    """A model with a SmoothBlock is not the same function as without it (the block is used)."""
    torch.manual_seed(0)
    plain = build("lenet").eval()
    torch.manual_seed(0)
    smooth = build("lenet", smoothing={"filter": "gaussian", "placement": 1}).eval()
    x = _input("lenet", 2)
    with torch.no_grad():
        assert not torch.allclose(plain(x), smooth(x))
        smooth.smooth.mix.weight.zero_()
        smooth.smooth.mix.bias.zero_()
        # y = x + Conv1x1(F(x)) with a zero 1x1 conv is the identity: same logits as without
        sd = {k: v for k, v in smooth.state_dict().items() if not k.startswith("smooth.")}
        plain.load_state_dict(sd)
        torch.testing.assert_close(smooth(x), plain(x))
