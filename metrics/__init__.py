"""SalBench metrics: trustworthiness scores of gradient saliency maps on plain tensors.

A standalone library (it imports nothing from ``model_zoo`` or ``benchmark``): functions take
any ``nn.Module`` and tensors, run batched on the inputs' device, draw randomness only from an
explicit ``torch.Generator``, and return per-image tensors for the caller to aggregate. The
definitions are those of ``PROTOCOL.md`` (version :data:`PROTOCOL_VERSION`), sections 2-3, with
the per-image changes of protocol v2 (section 8: random ROAD tie order, scale-free SSIM, ROS with
flipped samples left out) as defaults and v1's definitions as options.
"""

from __future__ import annotations

from salbench.metrics.attributions import Explainer, integrated_gradients, vanilla_gradient
from salbench.metrics.faithfulness import noisy_linear_imputation, road_aopc, road_curve, road_curves, tied_fraction
from salbench.metrics.protocol import PROTOCOL_VERSION
from salbench.metrics.sanity import CascadeResult, cascading_randomisation, efficient_mprt, randomisation_layers
from salbench.metrics.sparsity import gini_index
from salbench.metrics.stability import (
    SSIMUnderNoise,
    aggregate_ros,
    median_log10_ros,
    relative_output_stability,
    ros_variants,
    ssim,
    ssim_under_noise,
)

__all__ = [
    "PROTOCOL_VERSION",
    "Explainer",
    "vanilla_gradient",
    "integrated_gradients",
    "gini_index",
    "ssim",
    "SSIMUnderNoise",
    "ssim_under_noise",
    "relative_output_stability",
    "ros_variants",
    "aggregate_ros",
    "median_log10_ros",
    "noisy_linear_imputation",
    "road_curve",
    "road_curves",
    "tied_fraction",
    "road_aopc",
    "randomisation_layers",
    "CascadeResult",
    "cascading_randomisation",
    "efficient_mprt",
]
