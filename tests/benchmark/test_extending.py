"""Extension points: a new attribution method is one registration, and then it is scored by
every metric and gets leaderboard rows, comparisons and intervals without any other edit."""

from dataclasses import replace

import pandas as pd
import pytest
import torch
from captum.attr import NoiseTunnel, Saliency

from salbench.benchmark import harness
from salbench.benchmark.scoring import EXPLAINERS, explainer_for, register_explainer

from .conftest import FAST


@pytest.fixture
def smoothgrad():
    @register_explainer("SG", "SmoothGrad (captum NoiseTunnel over Saliency), 4 samples, stdev 0.1")
    def _sg(cfg):
        def sg(model, x, y):
            a = NoiseTunnel(Saliency(model)).attribute(x, target=y, nt_type="smoothgrad", nt_samples=4, stdevs=0.1,
                                                       abs=True)
            return a.sum(1)

        return sg

    yield "SG"
    del EXPLAINERS["SG"]


def test_a_registered_explainer_gets_board_rows_and_comparisons(env, smoothgrad):
    cfg = replace(FAST, methods=("VG", smoothgrad), accuracy=False)
    harness.score_zoo("fmnist", config=cfg, progress=False, imageset=env["imageset"], test_split=env["test"])
    main = pd.read_csv(env["lb"] / "fmnist.csv")
    sg = main[main["method"] == "SG"]
    assert len(sg) == 3 and sg["gini"].between(0, 1).all()
    assert (sg["gini_lo"] <= sg["gini"]).all() and (sg["gini"] <= sg["gini_hi"]).all()
    assert not sg["gini"].equals(main[main["method"] == "VG"]["gini"].reset_index(drop=True))
    cmp = pd.read_csv(env["lb"] / "fmnist_comparisons.csv")
    assert {"VG", "SG"} <= set(cmp["method"])


def test_unknown_and_duplicate_explainers_are_refused(smoothgrad):
    with pytest.raises(ValueError, match="registered: .*SG"):
        explainer_for("nope", FAST)
    with pytest.raises(ValueError, match="already registered"):
        register_explainer("SG")(lambda cfg: None)
    maps = explainer_for("SG", FAST)(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)),
                                     torch.rand(2, 1, 28, 28), torch.tensor([0, 1]))
    assert maps.shape == (2, 28, 28)
