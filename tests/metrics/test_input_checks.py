"""Wrong inputs the metric functions refuse (or warn about) instead of scoring silently (issue 28, item 6).

- a model returning softmax probabilities: refused by ROS (it needs logits, PROTOCOL §3), warned
  about once per process by the gradient explainers (legal but usually a mistake, PROTOCOL §2);
- ``ssim_under_noise`` noise levels outside (0, 1] (``sigmas=(25,)`` in 0-255 units);
- ROAD percentages outside [1, 100) (``(0.1, 0.5)``: fractions for percent) or not increasing;
- ``road_aopc`` of a curve holding anything but 0 and 1.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from salbench.metrics import (
    _validation,
    integrated_gradients,
    relative_output_stability,
    road_aopc,
    road_curve,
    road_curves,
    ros_variants,
    ssim_under_noise,
    vanilla_gradient,
)
from salbench.metrics._validation import PROBABILITY_SUM_TOLERANCE, looks_like_probabilities
from salbench.metrics.faithfulness import _check_percentages
from salbench.metrics.protocol import ROAD_PERCENTAGES, SSIM_SIGMAS

PROBABILITY_WARNING = r"gradients of probabilities are legal but usually a mistake"


def _logit_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 3))


def _probability_model() -> nn.Module:
    return nn.Sequential(*_logit_model(), nn.Softmax(dim=1))


def _data(batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.rand(batch, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = _logit_model()(x).argmax(dim=1)
    return x, y


@pytest.fixture
def fresh_warning(monkeypatch):
    """A process that has not warned about probabilities yet."""
    monkeypatch.setattr(_validation, "_probabilities_warned", False)


class _CountingExplainer:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, model, x, y):
        self.calls += 1
        return vanilla_gradient(model, x, y)


# ------------------------------------------------------------------------------ probabilities


def test_looks_like_probabilities():
    logits = torch.randn(5, 10, generator=torch.Generator().manual_seed(0))
    assert not looks_like_probabilities(logits)
    assert looks_like_probabilities(logits.softmax(dim=1))
    assert looks_like_probabilities(logits.double().softmax(dim=1))
    assert looks_like_probabilities(torch.eye(3))  # one-hot rows are probabilities too
    # within the tolerance, not beyond it
    p = logits.softmax(dim=1)
    assert looks_like_probabilities(p * (1 + PROBABILITY_SUM_TOLERANCE / 2))
    assert not looks_like_probabilities(p * (1 + 10 * PROBABILITY_SUM_TOLERANCE))
    # a single image, a single class, a negative entry or one row off: not (enough) evidence
    assert not looks_like_probabilities(p[:1])
    assert not looks_like_probabilities(torch.ones(4, 1))
    q = p.clone()
    q[2] = torch.tensor([1.5, -0.5] + [0.0] * 8)
    assert not looks_like_probabilities(q)
    q = p.clone()
    q[3] *= 2
    assert not looks_like_probabilities(q)
    # non-negative log-probabilities or plain positive logits do not sum to 1
    assert not looks_like_probabilities(logits.abs())


@pytest.mark.parametrize("ros", [relative_output_stability, ros_variants], ids=["ros", "ros_variants"])
def test_ros_refuses_a_model_returning_probabilities_before_any_attribution(ros, fresh_warning):
    x, y = _data()
    explainer = _CountingExplainer()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused before the explainer could warn
        with pytest.raises(ValueError, match=rf"^{ros.__name__} needs logits \(PROTOCOL §3\), but the model's "
                                             r"outputs look like softmax probabilities.*drop the model's final softmax$"):
            ros(_probability_model(), x, y, explainer, n_samples=2)
    assert explainer.calls == 0
    # the same model without its softmax is scored
    out = ros(_logit_model(), x, y, explainer, n_samples=2)
    assert explainer.calls > 0
    assert all(v.shape == (4,) for v in (out.values() if isinstance(out, dict) else [out]))


@pytest.mark.parametrize("ros", [relative_output_stability, ros_variants], ids=["ros", "ros_variants"])
def test_ros_refuses_given_probabilities_and_probabilities_on_the_perturbed_images(ros, fresh_warning):
    x, y = _data()
    with torch.no_grad():
        logits = _logit_model()(x)
    with pytest.raises(ValueError, match=r"needs logits.*but the given logits look like softmax probabilities"):
        ros(_logit_model(), x, y, vanilla_gradient, n_samples=2, logits=logits.softmax(dim=1))
    # true logits given, but the model itself returns probabilities: its outputs on x' are refused
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # vanilla_gradient's warning, tested below
        with pytest.raises(ValueError, match=r"needs logits.*but the model's outputs look like softmax"):
            ros(_probability_model(), x, y, vanilla_gradient, n_samples=2, logits=logits)
    ros(_logit_model(), x, y, vanilla_gradient, n_samples=2, logits=logits)  # the consistent call passes


def test_ros_accepts_a_single_image_of_any_model():
    """One row is no evidence (a (1, K) output can be anything): the check needs a batch of two."""
    x, y = _data(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert relative_output_stability(_probability_model(), x, y, vanilla_gradient, n_samples=2).shape == (1,)


@pytest.mark.parametrize("explainer", [vanilla_gradient, integrated_gradients])
def test_gradient_explainers_warn_once_per_process_about_probabilities(explainer, fresh_warning):
    x, y = _data()
    with pytest.warns(UserWarning, match=rf"^{explainer.__name__}: the model's outputs look like softmax "
                                         rf"probabilities.*{PROBABILITY_WARNING}.*warned once per process\)$"):
        maps = explainer(_probability_model(), x, y)
    assert maps.shape == (4, 8, 8) and bool(torch.isfinite(maps).all())  # legal: the maps are returned
    assert _validation._probabilities_warned
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process: neither explainer warns again
        vanilla_gradient(_probability_model(), x, y)
        integrated_gradients(_probability_model(), x, y, n_steps=4)


@pytest.mark.parametrize("explainer", [vanilla_gradient, integrated_gradients])
def test_gradient_explainers_do_not_warn_for_logits(explainer, fresh_warning):
    x, y = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        explainer(_logit_model(), x, y)
    assert not _validation._probabilities_warned


def test_probability_warning_comes_through_ssim_and_road_accepts_probabilities(fresh_warning):
    """SSIM and ROAD only use the argmax, which softmax keeps: they score such a model (SSIM warns
    through its gradient explainer), with the same result as for its logits."""
    x, y = _data()
    maps = torch.rand(4, 8, 8, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = road_curve(_probability_model(), x, y, maps, percentages=(10, 50))
    assert torch.equal(a, road_curve(_logit_model(), x, y, maps, percentages=(10, 50)))
    with pytest.warns(UserWarning, match=PROBABILITY_WARNING):
        ssim_under_noise(_probability_model(), x, y, vanilla_gradient, sigmas=(0.1,))


# ------------------------------------------------------------------------------ SSIM sigmas


@pytest.mark.parametrize(
    "sigmas, match",
    [
        ((25,), r"got 25; it looks like 0-255 units: divide by 255 \(25 / 255 = 0.09804\)$"),
        ((0.1, 12.75), r"got 12.75; it looks like 0-255 units"),
        ((1.5,), r"got 1.5; it looks like 0-255 units"),
        ((0,), r"got 0; pass a positive noise level$"),
        ((0.0,), r"got 0.0; pass a positive noise level$"),
        ((-0.1,), r"got -0.1; pass a positive noise level$"),
        ((300.0,), r"got 300.0; pass a standard deviation of at most 1$"),
        ((math.inf,), r"a finite number in \(0, 1\], got inf$"),
        ((True,), r"a finite number in \(0, 1\], got True$"),
    ],
)
def test_ssim_under_noise_refuses_sigmas_outside_0_1(sigmas, match):
    x, y = _data()
    with pytest.raises(ValueError, match=r"^every sigma must be .*" + match):
        ssim_under_noise(_logit_model(), x, y, vanilla_gradient, sigmas=sigmas)


def test_ssim_under_noise_accepts_sigmas_in_0_1():
    x, y = _data()
    out = ssim_under_noise(_logit_model(), x, y, vanilla_gradient, sigmas=(1e-6, 1, 1.0))
    assert out.scores.shape == (3, 4)
    assert all(0 < s <= 1 for s in SSIM_SIGMAS)


def test_the_sigma_message_is_one_line_with_what_was_expected():
    x, y = _data()
    with pytest.raises(ValueError) as info:
        ssim_under_noise(_logit_model(), x, y, vanilla_gradient, sigmas=(25,))
    message = str(info.value)
    assert "\n" not in message
    assert "(0, 1] for [0, 1] images (PROTOCOL §3, default 0.01, 0.03" in message


# ------------------------------------------------------------------------------ ROAD percentages


@pytest.mark.parametrize(
    "percentages, match",
    [
        ((0.1, 0.5), r"^every ROAD percentage must be a percent of the pixels in \[1, 100\) \(PROTOCOL §3, default "
                     r"1, 6, \.\.\., 96\), got 0.1; it looks like a fraction: pass percents \(0.1 \* 100 = 10\)$"),
        ((1, 0.5), r"got 0.5; it looks like a fraction"),
        ((0, 10, 50), r"got 0; pass removal levels of at least 1%$"),
        ((-5, 10), r"got -5; pass removal levels of at least 1%$"),
        ((10, 100), r"got 100; 100% removes all 64 pixels"),
        ((10, 150.0), r"got 150.0; 150.0% removes all 64 pixels"),
        ((10, math.nan), r"every percentage must be a finite number in \[1, 100\), got nan"),
        ((50, 10), r"^ROAD percentages must be strictly increasing \(PROTOCOL §3, default 1, 6, \.\.\., 96\), got 50 "
                   r"then 10 in \(50, 10\); sort them and drop repeats$"),
        ((1, 10, 10, 20), r"strictly increasing.*got 10 then 10"),
    ],
)
@pytest.mark.parametrize("road", [road_curve, road_curves])
def test_road_refuses_percentages_outside_1_100_or_not_increasing(road, percentages, match):
    x, y = _data()
    maps = torch.rand(4, 8, 8, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=match):
        road(_logit_model(), x, y, maps, percentages=percentages)


def test_road_accepts_the_protocol_percentages_and_fractional_percents():
    assert len(_check_percentages(ROAD_PERCENTAGES, 28 * 28)) == 20
    x, y = _data()
    maps = torch.rand(4, 8, 8, generator=torch.Generator().manual_seed(1))
    assert road_curve(_logit_model(), x, y, maps, percentages=(1, 2.5, 99.9)).shape == (4, 3)
    assert road_curves(_logit_model(), x, y, maps, percentages=[5])["random"].shape == (4, 1)


# ------------------------------------------------------------------------------ road_aopc


@pytest.mark.parametrize(
    "curve, match",
    [
        (torch.tensor([[1.0, 2.0]]), r"^curve must hold correctness \(bool, or the numbers 0 and 1\), got 2 at "
                                     r"index \(0, 1\); pass road_curve's output \(B, L\), not accuracies or percentages$"),
        (torch.tensor([[1, 1, 0], [1, 2, 0]]), r"got 2 at index \(1, 1\)"),
        (torch.tensor([[0.9, 0.5]]), r"got 0.9 at index \(0, 0\)"),  # accuracies, not correctness
        (torch.tensor([[1.0, -1.0]]), r"got -1 at index \(0, 1\)"),
        (torch.tensor([[100, 50]]), r"got 100 at index \(0, 0\)"),
    ],
)
def test_road_aopc_refuses_values_other_than_0_and_1(curve, match):
    with pytest.raises(ValueError, match=match):
        road_aopc(curve)


def test_road_aopc_accepts_bool_and_0_1_numbers():
    curve = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    for c in (curve, curve.long(), curve.to(torch.uint8), curve.float(), curve.double(), curve.half()):
        assert road_aopc(c) == pytest.approx(0.2)
