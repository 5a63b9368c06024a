"""gini_index against quantus.Sparseness (one image per call) and hand-computed cases."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from salbench.metrics import gini_index


def _quantus_sparseness(a: np.ndarray) -> float:
    quantus = pytest.importorskip("quantus")
    metric = quantus.Sparseness(disable_warnings=True)  # abs=True, normalise=True (by max)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (score,) = metric(
            model=None, x_batch=np.zeros((1, 1, *a.shape), np.float32), y_batch=np.zeros(1, int), a_batch=a[None, None]
        )
    return float(score)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_quantus_on_random_maps(dtype):
    rng = np.random.default_rng(0)
    maps = [
        rng.normal(size=(28, 28)),
        rng.exponential(size=(28, 28)) ** 4,  # heavy tail: sparse
        rng.uniform(size=(32, 17)),
        rng.normal(size=(5, 5)) * 1e-4,  # tiny scale: irrelevant after the max normalisation
    ]
    for m in maps:
        m = m.astype(dtype)
        ours = float(gini_index(torch.from_numpy(m)[None]))
        assert ours == pytest.approx(_quantus_sparseness(m.copy()), abs=1e-6)


def test_matches_quantus_on_real_saliency_maps(vg_maps, ig_maps):
    for maps in (vg_maps[:20], ig_maps[:20]):
        ours = gini_index(maps)
        ref = torch.tensor([_quantus_sparseness(m.numpy().copy()) for m in maps], dtype=torch.float64)
        torch.testing.assert_close(ours.double(), ref, atol=1e-6, rtol=0)
    # IG maps are signed: the sign must be ignored
    torch.testing.assert_close(gini_index(ig_maps[:20]), gini_index(ig_maps[:20].abs()))


def test_per_image_normalisation_makes_scores_batch_independent(vg_maps):
    batch = torch.cat([vg_maps[:5], 1000 * vg_maps[5:10]])
    alone = torch.cat([gini_index(m[None]) for m in batch])
    torch.testing.assert_close(gini_index(batch), alone, atol=1e-7, rtol=0)


def test_one_hot_map_is_close_to_one():
    n = 28 * 28
    m = torch.zeros(1, 28, 28, dtype=torch.float64)
    m[0, 3, 7] = -2.5
    g = float(gini_index(m))
    # exact value with the 1e-7 offset: a = 1e-7 everywhere except one 1 + 1e-7
    eps = 1e-7
    num = sum((2 * i - n - 1) * eps for i in range(1, n)) + (2 * n - n - 1) * (1 + eps)
    expected = num / (n * (n * eps + 1))
    assert g == pytest.approx(expected, rel=1e-12)
    assert g == pytest.approx((n - 1) / n, abs=1e-4)


@pytest.mark.parametrize("value", [0.0, 1.0, -3.0, 1e-30])
def test_constant_map_is_zero(value):
    g = gini_index(torch.full((2, 6, 6), value, dtype=torch.float64))
    assert g.abs().max() < 1e-12


def test_all_zero_map_is_exactly_zero_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = gini_index(torch.zeros(3, 4, 4))
    assert torch.equal(g, torch.zeros(3))


def test_two_level_map_hand_computed():
    # 4 pixels of value 1 and 12 of value 3 (n = 16): a = 1/3 + eps (4x), 1 + eps (12x)
    m = torch.full((4, 4), 3.0, dtype=torch.float64)
    m[0, :] = 1.0
    n, eps = 16, 1e-7
    a = sorted([1 / 3 + eps] * 4 + [1 + eps] * 12)
    expected = sum((2 * i - n - 1) * ai for i, ai in enumerate(a, start=1)) / (n * sum(a))
    assert float(gini_index(m[None])) == pytest.approx(expected, rel=1e-12)
    # without the offset: (-48 / 3 + 48) / (16 * (4 / 3 + 12)) = 32 / (640 / 3) = 0.15
    assert expected == pytest.approx(0.15, abs=1e-6)


def test_half_zero_map_is_one_half():
    m = torch.zeros(1, 2, 8, dtype=torch.float64)
    m[0, 0] = 7.0
    assert float(gini_index(m)) == pytest.approx(0.5, abs=1e-6)


def test_dtype_and_device_follow_input():
    for dtype in (torch.float32, torch.float64):
        assert gini_index(torch.rand(2, 3, 3, dtype=dtype)).dtype == dtype
    if torch.cuda.is_available():
        m = torch.rand(4, 8, 8)
        torch.testing.assert_close(gini_index(m.cuda()).cpu(), gini_index(m))


@pytest.mark.parametrize(
    "maps, match",
    [
        (torch.rand(28, 28), r"maps must have shape \(B, H, W\).*\(28, 28\)"),
        (torch.rand(2, 1, 28, 28), r"maps must have shape \(B, H, W\).*\(2, 1, 28, 28\)"),
        (torch.rand(0, 28, 28), r"maps is empty.*\(0, 28, 28\)"),
        (torch.tensor([[[1.0, math.nan]]]), r"maps contains non-finite values \(1 NaN"),
        (torch.tensor([[[1.0, math.inf]]]), r"maps contains non-finite values \(0 NaN, 1 inf"),
        (torch.ones(1, 2, 2, dtype=torch.int64), r"floating-point.*int64"),
    ],
)
def test_bad_input_raises_value_error(maps, match):
    with pytest.raises(ValueError, match=match):
        gini_index(maps)


def test_not_a_tensor_raises_value_error():
    with pytest.raises(ValueError, match="must be a torch.Tensor, got ndarray"):
        gini_index(np.zeros((1, 2, 2)))
