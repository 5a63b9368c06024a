"""The model contract of every metric that runs a model (PROTOCOL §1; refactor issue, defect 9).

A model handed over in train mode is evaluated in eval mode (BatchNorm on its running
statistics, which stay untouched) and given back in the caller's mode with the caller's
``requires_grad`` flags, also when the metric raises. Inputs that break PROTOCOL §1 (labels
beyond the logits, images outside [0, 1], channels-last images, a model that does not return a
logits tensor) raise one one-line ``ValueError`` naming the problem and the fix.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from salbench.metrics import (
    integrated_gradients,
    relative_output_stability,
    road_curve,
    road_curves,
    ros_variants,
    ssim_under_noise,
    vanilla_gradient,
)

K = 5


def _bn_model() -> nn.Module:
    """A small CNN with BatchNorm whose running statistics are far from any batch's statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, K)
    )
    with torch.no_grad():
        model[1].running_mean.fill_(0.3)
        model[1].running_var.fill_(4.0)
        model[1].weight.uniform_(0.5, 2.0)
        model[1].bias.uniform_(-1.0, 1.0)
    return model


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = _bn_model().eval()(x).argmax(1)  # labels the eval-mode model gets right
    return x, y


def _maps(x: torch.Tensor) -> torch.Tensor:
    return torch.rand(x.shape[0], *x.shape[2:], generator=torch.Generator().manual_seed(1))


def _g() -> torch.Generator:
    return torch.Generator().manual_seed(0)


RUNNERS = {
    "vanilla_gradient": lambda m, x, y: vanilla_gradient(m, x, y),
    "integrated_gradients": lambda m, x, y: integrated_gradients(m, x, y, n_steps=8),
    "ssim_under_noise": lambda m, x, y: ssim_under_noise(
        m, x, y, vanilla_gradient, sigmas=(0.05, 0.2), generator=_g()
    ),
    "relative_output_stability": lambda m, x, y: relative_output_stability(
        m, x, y, vanilla_gradient, n_samples=2, generator=_g()
    ),
    "road_curve": lambda m, x, y: road_curve(m, x, y, _maps(x), percentages=(1, 10, 50), generator=_g()),
    "ssim_under_noise_with_raw": lambda m, x, y: ssim_under_noise(
        m, x, y, vanilla_gradient, sigmas=(0.05, 0.2), generator=_g(), normalize=False, with_raw=True
    ),
    "ros_variants": lambda m, x, y: ros_variants(m, x, y, vanilla_gradient, n_samples=2, generator=_g()),
    "road_curves": lambda m, x, y: road_curves(m, x, y, _maps(x).round(decimals=1), percentages=(1, 10, 50),
                                               generator=_g()),
}


def _as_tuple(out) -> tuple:
    if isinstance(out, dict):
        return tuple(out.values())
    return tuple(out) if isinstance(out, tuple) else (out,)


def _flags(model: nn.Module) -> list[bool]:
    return [p.requires_grad for p in model.parameters()]


@pytest.mark.parametrize("name", RUNNERS)
def test_a_train_mode_model_is_scored_in_eval_mode_and_given_back_unchanged(name):
    run = RUNNERS[name]
    x, y = _data()
    expected = run(_bn_model().eval(), x, y)

    model = _bn_model().train()
    model[4].weight.requires_grad_(False)  # a layer the caller froze stays frozen
    bn_state = copy.deepcopy(model[1].state_dict())
    flags = _flags(model)
    got = run(model, x, y)

    for a, b in zip(_as_tuple(got), _as_tuple(expected)):
        torch.testing.assert_close(a, b, equal_nan=True)
    assert all(m.training for m in model.modules()), "the caller's train mode was not restored"
    for key, value in model[1].state_dict().items():
        assert torch.equal(value, bn_state[key]), f"BatchNorm {key} changed"
    assert _flags(model) == flags
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", RUNNERS)
def test_mixed_submodule_modes_are_restored_one_by_one(name):
    x, y = _data()
    model = _bn_model().train()
    model[1].eval()  # the caller's frozen BatchNorm inside a training model
    RUNNERS[name](model, x, y)
    assert [m.training for m in model] == [True, False, True, True, True]
    assert model.training


def test_mode_and_flags_are_restored_when_the_metric_raises():
    x, y = _data()
    model = _bn_model().train()
    model[0].bias.requires_grad_(False)
    flags = _flags(model)
    seen = {}

    def failing_explainer(m, xx, yy):
        seen["training"] = any(mod.training for mod in m.modules())
        seen["requires_grad"] = any(p.requires_grad for p in m.parameters())
        raise RuntimeError("explainer failed")

    with pytest.raises(RuntimeError, match="explainer failed"):
        ssim_under_noise(model, x, y, failing_explainer, sigmas=(0.1,))
    assert seen == {"training": False, "requires_grad": False}, "the model was not evaluated in eval mode"
    assert all(m.training for m in model.modules())
    assert _flags(model) == flags


def test_eval_mode_context_manager_restores_on_exception_and_nests():
    from salbench.metrics._validation import EvalMode

    model = _bn_model().train()
    model[4].bias.requires_grad_(False)
    flags = _flags(model)
    with pytest.raises(KeyError):
        with EvalMode(model):
            with EvalMode(model):
                assert not model.training and not any(_flags(model))
            assert not model.training and not any(_flags(model))  # the inner exit keeps the outer state
            raise KeyError("inside")
    assert model.training and _flags(model) == flags
    with EvalMode(len):  # a plain callable is left alone
        pass


class _TupleModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _bn_model().eval()

    def forward(self, x):
        return self.net(x), x.mean()


class _DictModel(_TupleModel):
    def forward(self, x):
        return {"logits": self.net(x)}


def _bad_case(case: str):
    x, y = _data()
    model = _bn_model().eval()
    if case == "label":
        return model, x, torch.where(torch.arange(len(y)) == 2, torch.tensor(K), y), r"class 5 .*5 logits"
    if case == "range_255":
        return model, (x * 255).round(), y, r"\[0, 1\] pixel space.*255.*divide 0-255 images by 255"
    if case == "range_normalised":
        return model, (x - 0.5) / 0.25, y, r"\[0, 1\] pixel space.*\[-1\.99.*normalisation inside the model"
    if case == "channels_last_gray":
        return model, x.permute(0, 2, 3, 1), y, r"\(6, 8, 8, 1\).*channels-last.*permute\(0, 3, 1, 2\)"
    if case == "channels_last_rgb":
        return model, torch.rand(6, 8, 8, 3), y, r"\(6, 8, 8, 3\).*channels-last"
    if case == "tuple":
        return _TupleModel(), x, y, r"logits tensor.*got a tuple"
    if case == "dict":
        return _DictModel(), x, y, r"logits tensor.*got a dict"
    raise AssertionError(case)


CASES = ["label", "range_255", "range_normalised", "channels_last_gray", "channels_last_rgb", "tuple", "dict"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", RUNNERS)
def test_contract_violations_raise_one_clear_value_error(name, case):
    model, x, y, match = _bad_case(case)
    with pytest.raises(ValueError, match=match) as err:
        RUNNERS[name](model, x, y)
    assert "\n" not in str(err.value)


def test_ros_checks_given_logits_against_the_labels():
    x, y = _data()
    model = _bn_model().eval()
    with pytest.raises(ValueError, match=r"class 5 .*5 logits"):
        relative_output_stability(
            model, x, torch.full_like(y, K), lambda m, xx, yy: torch.zeros(len(xx), 8, 8), logits=torch.zeros(6, K)
        )


def test_ros_perturbations_above_one_still_reach_the_explainer():
    """ROS adds one-sided noise (up to 1.2): the inner explainer call must not reject it."""
    x, y = _data()
    ros = relative_output_stability(_bn_model().eval(), torch.ones_like(x), y, integrated_gradients, n_samples=1)
    assert ros.shape == (6,)
