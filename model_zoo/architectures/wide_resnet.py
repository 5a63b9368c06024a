"""WideResNet-28-10 for CIFAR-10 (Zagoruyko & Komodakis), the paper's CIFAR model (PROTOCOL §5)."""

from __future__ import annotations

from torch import nn

from salbench.model_zoo.architectures.common import NORMALIZATION, Normalize, StagedNet
from salbench.model_zoo.architectures.registry import register


class WideBlock(nn.Module):
    """Pre-activation wide basic block."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.relu = nn.ReLU()
        self.shortcut = None if (cin == cout and stride == 1) else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        o = self.relu(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(self.relu(self.bn2(y)))
        return y + (x if self.shortcut is None else self.shortcut(o))


def wide_resnet(depth: int, widen: int, num_classes: int, dataset: str, smoothing: dict | None) -> StagedNet:
    if (depth - 4) % 6:
        raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
    n = (depth - 4) // 6
    widths = (16, 16 * widen, 32 * widen, 64 * widen)
    mean, std = NORMALIZATION[dataset]

    def group(cin, cout, stride):
        return nn.Sequential(*[WideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)])

    stages = [
        nn.Sequential(nn.Conv2d(len(mean), widths[0], 3, 1, 1, bias=False), group(widths[0], widths[1], 1)),
        group(widths[1], widths[2], 2),
        group(widths[2], widths[3], 2),
    ]
    head = nn.Sequential(
        nn.BatchNorm2d(widths[3]), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[3], num_classes)
    )
    return StagedNet(Normalize(mean, std), stages, head, (len(mean), 32, 32), smoothing)


@register("wrn28_10", input_size=32, datasets=("cifar10",))
def wrn28_10(*, num_classes: int = 10, dataset: str = "cifar10", smoothing: dict | None = None) -> StagedNet:
    """WideResNet-28-10 (36.5M parameters); SmoothBlock after block group 1 = placement 1."""
    return wide_resnet(28, 10, num_classes, dataset, smoothing)
