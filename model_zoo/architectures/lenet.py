"""LeNet variants for FMNIST (PROTOCOL §5)."""

from __future__ import annotations

from torch import nn

from salbench.model_zoo.architectures.common import NORMALIZATION, Normalize, StagedNet
from salbench.model_zoo.architectures.registry import register


def _lenet(c1: int, c2: int, fc: tuple[int, ...], dataset: str, num_classes: int, smoothing):
    mean, std = NORMALIZATION[dataset]
    in_ch = len(mean)

    def block(cin, cout):
        # the authors' order: conv -> maxpool -> ReLU
        return nn.Sequential(nn.Conv2d(cin, cout, 5), nn.MaxPool2d(2), nn.ReLU())

    stages = [block(in_ch, c1), block(c1, c2)]
    flat = c2 * 4 * 4
    layers: list[nn.Module] = [nn.Flatten()]
    dims = (flat, *fc)
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(dims[-1], num_classes))
    return StagedNet(Normalize(mean, std), stages, nn.Sequential(*layers), (in_ch, 28, 28), smoothing)


@register("lenet", input_size=28, datasets=("fmnist",))
def lenet(*, num_classes: int = 10, dataset: str = "fmnist", smoothing: dict | None = None) -> StagedNet:
    """The authors' FMNIST LeNet: conv 1->6 k5, maxpool 2, ReLU, conv 6->16 k5, maxpool 2, ReLU,
    fc 256-120-84-10. Stages: the two conv blocks (SmoothBlock after block 1 by default)."""
    return _lenet(6, 16, (120, 84), dataset, num_classes, smoothing)


@register("lenet_text", input_size=28, datasets=("fmnist",))
def lenet_text(*, num_classes: int = 10, dataset: str = "fmnist", smoothing: dict | None = None) -> StagedNet:
    """The LeNet as the paper's text describes it: conv 32 k5, conv 64 k5, fc 1024."""
    return _lenet(32, 64, (1024,), dataset, num_classes, smoothing)
