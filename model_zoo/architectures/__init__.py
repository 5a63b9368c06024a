"""Architecture registry. Every model maps [0, 1] images (B, C, H, W) to logits (B, K)."""

from salbench.model_zoo.architectures import lenet, resnet, vgg, wide_resnet  # noqa: F401  (registers)
from salbench.model_zoo.architectures.common import NORMALIZATION, Normalize, StagedNet
from salbench.model_zoo.architectures.registry import arch_spec, build, list_archs

__all__ = ["build", "list_archs", "arch_spec", "Normalize", "StagedNet", "NORMALIZATION"]
