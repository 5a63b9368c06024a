"""Residual networks: small CIFAR-10 ResNets (CPU scale) and ResNet-18 for ImageNette (224)."""

from __future__ import annotations

from torch import nn

from salbench.model_zoo.architectures.common import NORMALIZATION, Normalize, StagedNet
from salbench.model_zoo.architectures.registry import register


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers with an identity (or 1x1 projection) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def _stage(cin: int, cout: int, n: int, stride: int) -> nn.Sequential:
    return nn.Sequential(*[BasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)])


def cifar_resnet(depth: int, width: int, num_classes: int, dataset: str, smoothing: dict | None) -> StagedNet:
    """He et al. CIFAR ResNet-(6n+2): a 3x3 stem, three stages of n blocks (width, 2w, 4w).

    Stage 1 holds the stem and the first residual stage, so "SmoothBlock after the first
    residual block" is placement 1.
    """
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    mean, std = NORMALIZATION[dataset]
    stem = nn.Sequential(nn.Conv2d(len(mean), width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
    stages = [
        nn.Sequential(stem, _stage(width, width, n, 1)),
        _stage(width, 2 * width, n, 2),
        _stage(2 * width, 4 * width, n, 2),
    ]
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, num_classes))
    return StagedNet(Normalize(mean, std), stages, head, (len(mean), 32, 32), smoothing)


@register("resnet8", input_size=32, datasets=("cifar10",))
def resnet8(*, num_classes: int = 10, dataset: str = "cifar10", smoothing: dict | None = None) -> StagedNet:
    """CPU-scale CIFAR ResNet-8 (16-32-64 channels, ~78k parameters)."""
    return cifar_resnet(8, 16, num_classes, dataset, smoothing)


@register("resnet20", input_size=32, datasets=("cifar10",))
def resnet20(*, num_classes: int = 10, dataset: str = "cifar10", smoothing: dict | None = None) -> StagedNet:
    """CIFAR ResNet-20 (16-32-64 channels, ~0.27M parameters)."""
    return cifar_resnet(20, 16, num_classes, dataset, smoothing)


@register("resnet18", input_size=224, datasets=("imagenette",))
def resnet18(*, num_classes: int = 10, dataset: str = "imagenette", smoothing: dict | None = None) -> StagedNet:
    """ResNet-18 (He et al.) for 224x224 ImageNette, trained from scratch; stages = layer1..layer4
    (layer1 includes the 7x7 stem), so "SmoothBlock after layer1" is placement 1."""
    mean, std = NORMALIZATION[dataset]
    stem = nn.Sequential(
        nn.Conv2d(len(mean), 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
    )
    stages = [
        nn.Sequential(stem, _stage(64, 64, 2, 1)),
        _stage(64, 128, 2, 2),
        _stage(128, 256, 2, 2),
        _stage(256, 512, 2, 2),
    ]
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes))
    return StagedNet(Normalize(mean, std), stages, head, (len(mean), 224, 224), smoothing)
