"""score() leaves the caller's model as it found it; ScoreConfig.ig_internal_batch_size really bounds
the IG forward passes (captum alone never goes below one integration step for every image)."""

from dataclasses import replace

import pytest
import torch

from salbench.benchmark.imagesets import ImageSet
from salbench.benchmark.scoring import ScoreConfig, explainer_for, score
from salbench.model_zoo.architectures import build


def _set(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ImageSet(dataset="fmnist", split="test", indices=torch.arange(n), labels=torch.randint(0, 10, (n,), generator=g),
                    images=torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8),
                    reference_models={}, images_sha256="0" * 64)


def _model(seed=0):
    torch.manual_seed(seed)
    return build("lenet")


class MaxBatch(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.seen = inner, []

    def forward(self, x):
        self.seen.append(len(x))
        return self.inner(x)


CFG = ScoreConfig(batch_size=12, ig_steps=5, sigmas=(0.05,), ros_samples=2, road_percentages=(1, 50), accuracy=False)


def test_ig_internal_batch_size_bounds_each_forward_pass_but_not_the_numbers():
    model = _model().eval()
    s = _set(12)
    x, y = s.images.float() / 255, s.labels
    ref_model = MaxBatch(model)
    ref = explainer_for("IG", CFG)(ref_model, x, y)
    assert max(ref_model.seen) == 12  # default: one integration step of the whole batch per pass
    for k in (1, 4, 5, 24):
        small = MaxBatch(model)
        maps = explainer_for("IG", replace(CFG, ig_internal_batch_size=k))(small, x, y)
        assert max(small.seen) <= k, (k, small.seen)
        assert maps.shape == ref.shape
        torch.testing.assert_close(maps, ref, rtol=1e-5, atol=1e-6)
    small = MaxBatch(model)
    explainer_for("IG", replace(CFG, ig_internal_batch_size=4))(small, x, y)
    assert max(small.seen) == 4


def test_ig_internal_batch_size_leaves_scores_unchanged():
    s = _set(12)
    a = score(_model(), s, CFG, progress=False).to_dict()
    b = score(_model(), s, replace(CFG, ig_internal_batch_size=3), progress=False).to_dict()
    assert a["per_image"]["VG"] == b["per_image"]["VG"]
    assert a["per_image"]["IG"]["road"] == b["per_image"]["IG"]["road"]
    assert a["per_image"]["IG"]["gini"] == pytest.approx(b["per_image"]["IG"]["gini"], rel=1e-5, abs=1e-7)


def _state(model):
    return ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()],
            {p.device for p in model.parameters()})


def _prepared_model():
    model = _model().train()
    params = list(model.parameters())
    params[0].requires_grad_(False)  # a caller's partly frozen model
    list(model.children())[-1].eval()  # and mixed modes
    return model


def test_score_restores_the_callers_model():
    model = _prepared_model()
    before = _state(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    score(model, _set(12), CFG, progress=False)
    assert _state(model) == before
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_score_restores_the_callers_model_when_it_fails():
    model = _prepared_model()
    before = _state(model)
    with pytest.raises(ValueError, match="unknown attribution method"):
        score(model, _set(12), replace(CFG, methods=("XX",)), progress=False)
    assert _state(model) == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_score_on_cuda_returns_the_model_to_its_device():
    model = _prepared_model()
    before = _state(model)
    res = score(model, _set(12), replace(CFG, device="cuda"), progress=False)
    assert _state(model) == before and res.config["device"] == "cuda"
