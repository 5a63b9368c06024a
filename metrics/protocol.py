"""Constants of the SalBench scoring protocol (protocol v2).

Every default used by the metric functions lives here, once. The meaning of each value is
given in ``PROTOCOL.md`` (sections "2. Attributions" and "3. Metrics"); code cites those
sections instead of restating them.
"""

from __future__ import annotations

PROTOCOL_VERSION = "v2"

# PROTOCOL §2: Integrated Gradients
IG_STEPS = 50
IG_METHOD = "gausslegendre"

# PROTOCOL §3: Gini
GINI_EPS = 1e-7

# PROTOCOL §3: SSIM under noise
SSIM_SIGMAS: tuple[float, ...] = (0.01, 0.03, 0.05, 0.07, 0.09, 0.10, 0.15, 0.20)
SSIM_DATA_RANGE = 2.0
SSIM_WIN_SIZE = 5
SSIM_K1 = 0.01
SSIM_K2 = 0.03

# PROTOCOL §3: ROS (paper variant)
ROS_SAMPLES = 5
ROS_NOISE_LOW = 0.02
ROS_NOISE_HIGH = 0.2
ROS_EPS = 1e-6
# PROTOCOL §8.5: the ``ros_floor`` variant floors the clean map's element-wise denominator at this
# fraction of the image's max|map| (keeping its sign, 0 counted +)
ROS_FLOOR_FRACTION = 1e-3

# PROTOCOL §3: ROAD
ROAD_PERCENTAGES: tuple[int, ...] = tuple(range(1, 100, 5))  # 1, 6, ..., 96 (L = 20)
ROAD_NOISE = 0.01
# PROTOCOL §8.1: ROAD orders tied map values by a seeded random permutation per image, drawn from
# a generator seeded with (the image's noise seed + this offset): noise seeds lie in [0, 2^62), tie
# seeds in [2^63, 2^63 + 2^62), so the two streams never share a seed
ROAD_TIE_SEED_OFFSET = 1 << 63
# 8-neighbour weights of the noisy linear imputation: (dy, dx) -> weight
ROAD_NEIGHBOUR_WEIGHTS: tuple[tuple[int, int, float], ...] = (
    (-1, -1, 1 / 12), (-1, 0, 1 / 6), (-1, 1, 1 / 12),
    (0, -1, 1 / 6), (0, 1, 1 / 6),
    (1, -1, 1 / 12), (1, 0, 1 / 6), (1, 1, 1 / 12),
)

# PROTOCOL §9.3: sMPRT noise (standard deviation as a fraction of each image's range, quantus
# SmoothMPRT's noise_magnitude) and eMPRT's histogram bins (quantus EfficientMPRT's n_bins_default)
SMPRT_NOISE = 0.1
# PROTOCOL §9.1: the edge control's sqrt(gx² + gy² + eps), kornia filters.sobel's default eps
EDGE_EPS = 1e-6
EMPRT_BINS = 100

__all__ = [name for name in dir() if name.isupper()]
