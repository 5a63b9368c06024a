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


def test_a_registered_dataset_gets_a_board(tmp_path, monkeypatch, fmnist_small, trained_models):
    """Adding a dataset is one spec entry plus a loader: here a toy dataset (FMNIST images under
    another name, another class naming) gets zoo cards, an image set, scores and its own board
    and claims file without editing any module."""
    from salbench.benchmark.cli import build_parser
    from salbench.benchmark.imagesets import build_imageset, load_imageset
    from salbench.model_zoo.data import NUM_CLASSES, Split, load_split
    from salbench.model_zoo.datasets import DatasetSpec, get_spec, register_dataset, unregister_dataset

    from .conftest import write_zoo_entry

    _, test = fmnist_small
    fm = get_spec("fmnist")

    def loader(split, root, download):
        return Split("toy", split, test.images, test.labels, "toy copy of the FMNIST test images")

    spec = register_dataset(DatasetSpec("toy", (1, 28, 28), tuple(f"c{k}" for k in range(10)), fm.mean, fm.std, loader,
                                        robust_eval=dict(eps=0.05, alpha=0.01, steps=2), score_batch_size=20,
                                        default_preset="test", reference_arch="lenet"))
    try:
        for var, d in (("SALBENCH_ZOO_DIR", "zoo"), ("SALBENCH_IMAGESETS_DIR", "sets"),
                       ("SALBENCH_LEADERBOARDS_DIR", "lb")):
            monkeypatch.setenv(var, str(tmp_path / d))
        assert NUM_CLASSES["toy"] == 10 and load_split("toy", "test").dataset == "toy"
        refs = {}
        for v, (model, sm) in trained_models.items():
            card = write_zoo_entry(tmp_path / "zoo", model, mid=spec.reference_models[v], variant=v, smoothing=sm)
            card["dataset"] = "toy"  # the helper writes fmnist cards; this one is the toy dataset's
            (tmp_path / "zoo" / "cards" / f"{card['id']}.json").write_text(__import__("json").dumps(card))
            refs[v] = card["id"]
        build_imageset("toy", refs, n=20, test_split=test)
        imageset = load_imageset("toy", test_split=test)
        cfg = replace(FAST, methods=("VG",), accuracy=False)
        harness.score_zoo("toy", config=cfg, progress=False, imageset=imageset, test_split=test)
        board = pd.read_csv(tmp_path / "lb" / "toy.csv")
        assert sorted(board["variant"]) == ["A", "G", "N"] and (board["n_images"] == 20).all()
        assert (tmp_path / "lb" / "toy_pattern.md").read_text().startswith("# toy:")
        assert build_parser().parse_args(["leaderboard", "--dataset", "toy"]).dataset == "toy"
    finally:
        unregister_dataset("toy")
    with pytest.raises(ValueError, match="unknown dataset 'toy'"):
        get_spec("toy")
