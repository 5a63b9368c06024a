"""VGG-16 (with batch norm) for CIFAR-10 (PROTOCOL §5, the paper's second CIFAR model)."""

from __future__ import annotations

from torch import nn

from salbench.model_zoo.architectures.common import NORMALIZATION, Normalize, StagedNet
from salbench.model_zoo.architectures.registry import register

# VGG-16 configuration split into its five pooling blocks
_VGG16 = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


@register("vgg16", input_size=32, datasets=("cifar10",))
def vgg16(*, num_classes: int = 10, dataset: str = "cifar10", smoothing: dict | None = None) -> StagedNet:
    """VGG-16-BN for 32x32 inputs; each stage is one conv block ending in a max-pool."""
    mean, std = NORMALIZATION[dataset]
    cin = len(mean)
    stages = []
    for widths in _VGG16:
        layers: list[nn.Module] = []
        for w in widths:
            layers += [nn.Conv2d(cin, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
            cin = w
        layers.append(nn.MaxPool2d(2))
        stages.append(nn.Sequential(*layers))
    head = nn.Sequential(nn.Flatten(), nn.Linear(512, num_classes))
    return StagedNet(Normalize(mean, std), stages, head, (len(mean), 32, 32), smoothing)
