"""Tests of the training-data attribution track (benchmark/tda.py) with quanda's real classes on
tiny inputs: hand-computed and independent references (scipy, quanda's own metric classes)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats as sps
from torch import nn

from salbench.benchmark import tda
from salbench.model_zoo.architectures import build


def _toy(n_per_class=6, n_test=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    train_y = torch.arange(10).repeat_interleave(n_per_class)
    train_x = torch.rand(len(train_y), 1, 28, 28, generator=g)
    test_y = torch.arange(n_test) % 10
    test_x = torch.rand(n_test, 1, 28, 28, generator=g)
    return train_x, train_y, test_x, test_y


def _lenet(seed=0):
    torch.manual_seed(seed)
    return build("lenet", num_classes=10, dataset="fmnist").eval()


# ------------------------------------------------------------------ helpers

def test_train_subset_indices_is_balanced_seeded_and_sorted():
    labels = np.repeat(np.arange(3), [10, 7, 9])
    a = tda.train_subset_indices(labels, 4, seed=0)
    assert np.array_equal(a, np.sort(a)) and len(np.unique(a)) == 12
    assert np.bincount(labels[a]).tolist() == [4, 4, 4]
    assert np.array_equal(a, tda.train_subset_indices(labels, 4, seed=0))
    assert not np.array_equal(a, tda.train_subset_indices(labels, 4, seed=1))
    # the documented draw: one default_rng(seed), classes in order
    rng = np.random.default_rng(0)
    ref = np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), 4, replace=False) for c in range(3)]))
    assert np.array_equal(a, ref)
    with pytest.raises(ValueError, match="class 1 has 7 images"):
        tda.train_subset_indices(labels, 8)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        tda.train_subset_indices([], 1)


def test_penultimate_layers_of_the_zoo_lenet_feed_its_classifier():
    model = _lenet()
    x = torch.rand(3, 1, 28, 28)
    feat, cls = tda.penultimate_layers(model, x)
    assert (feat, cls) == ("head.4", "head.5")
    mods = dict(model.named_modules())
    got = {}
    h = mods[feat].register_forward_hook(lambda m, i, o: got.__setitem__("f", o))
    with torch.no_grad():
        logits = model(x)
    h.remove()
    assert got["f"].shape == (3, 84)
    torch.testing.assert_close(mods[cls](got["f"]), logits)
    # a smoothed (G) LeNet has the same head
    torch.manual_seed(0)
    g = build("lenet", num_classes=10, dataset="fmnist", smoothing={"filter": "gaussian", "placement": 1}).eval()
    assert tda.penultimate_layers(g, x) == ("head.4", "head.5")


def test_penultimate_layers_refuses_models_it_cannot_explain():
    conv_only = nn.Sequential(nn.Conv2d(1, 10, 28), nn.Flatten())
    with pytest.raises(ValueError, match="calls no nn.Linear"):
        tda.penultimate_layers(conv_only, torch.rand(2, 1, 28, 28))

    class Shifted(nn.Module):  # the classifier's input is not the previous module's output
        def __init__(self):
            super().__init__()
            self.body, self.act, self.fc = nn.Flatten(), nn.ReLU(), nn.Linear(784, 10)

        def forward(self, x):
            return self.fc(self.act(self.body(x)) + 1.0)

    with pytest.raises(ValueError, match="does not output its input"):
        tda.penultimate_layers(Shifted(), torch.rand(2, 1, 28, 28))


def test_top_k_cardinality_matches_quanda_metric():
    from quanda.metrics.heuristics import TopKCardinalityMetric

    g = torch.Generator().manual_seed(0)
    expl = torch.randn(40, 15, generator=g)
    ds = torch.utils.data.TensorDataset(torch.zeros(15, 1), torch.zeros(15, dtype=torch.long))
    for k in (1, 3):
        m = TopKCardinalityMetric(model=nn.Linear(1, 1), train_dataset=ds, top_k=k)
        m.update(expl)
        top = expl.topk(k, dim=1).indices.numpy()
        assert tda.top_k_cardinality(top) == pytest.approx(m.compute()["score"], abs=1e-12)
    assert tda.top_k_cardinality(np.array([[1, 2], [2, 3]])) == 0.75  # {1, 2, 3} of 4
    with pytest.raises(ValueError, match="n_test, k"):
        tda.top_k_cardinality(np.array([1, 2]))


def test_half_sample_ci_matches_the_normal_interval_of_a_mean():
    rng = np.random.default_rng(1)
    v = rng.normal(0.3, 2.0, 400)
    est, lo, hi = tda.half_sample_ci(len(v), lambda i: v[i].mean(), n_half=4000, seed=0)
    half = 1.96 * v.std(ddof=1) / math.sqrt(len(v))
    assert est[0] == pytest.approx(v.mean())
    assert hi[0] - lo[0] == pytest.approx(2 * half, rel=0.12)
    assert (est[0] - lo[0]) == pytest.approx(half, rel=0.15)
    const = tda.half_sample_ci(10, lambda i: 0.5, n_half=50)
    assert [float(a[0]) for a in const] == [0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match="n >= 2"):
        tda.half_sample_ci(1, lambda i: 0.0)


def test_mean_ci_and_paired_delta_against_scipy():
    rng = np.random.default_rng(2)
    a, b = rng.random(200), rng.random(200)
    est, lo, hi = tda.mean_ci(a)
    assert est == pytest.approx(a.mean()) and lo < est < hi
    ref = sps.bootstrap((a,), np.mean, n_resamples=10_000, method="percentile", random_state=np.random.default_rng(0))
    assert lo == pytest.approx(ref.confidence_interval.low, abs=0.01)
    assert hi == pytest.approx(ref.confidence_interval.high, abs=0.01)
    b[:3] = np.nan  # left out of the pairs
    d = tda.paired_delta(a, b)
    ok = np.isfinite(b)
    assert d["n_paired"] == 197
    assert d["delta"] == pytest.approx((a[ok] - b[ok]).mean())
    assert d["p"] == pytest.approx(sps.wilcoxon(a[ok], b[ok]).pvalue)
    assert math.isnan(tda.mean_ci(np.array([np.nan]))[0])


def test_verdict_follows_direction_interval_and_p():
    assert tda.verdict("class_detection", 0.1, 0.05, 0.15, 0.001) == "better"
    assert tda.verdict("class_detection", -0.1, -0.15, -0.05, 0.001) == "worse"
    assert tda.verdict("randomization_spearman", -0.1, -0.15, -0.05, 0.001) == "better"  # lower is better
    assert tda.verdict("class_detection", 0.1, 0.05, 0.15, 0.2) == "no detectable difference"
    assert tda.verdict("class_detection", 0.1, -0.01, 0.15, 0.001) == "no detectable difference"
    assert tda.verdict("top1_cardinality", 0.1, 0.05, 0.15, None) == "better"  # no per-image test
    assert tda.verdict("top1_cardinality", math.nan, 0, 1, None) == "not comparable"


def test_config_checks():
    with pytest.raises(ValueError, match="unknown explainer"):
        tda.TDAConfig(explainers=("tracin",))
    with pytest.raises(ValueError, match="n_test must be >= 2"):
        tda.TDAConfig(n_test=1)
    with pytest.raises(ValueError, match="train_per_class"):
        tda.TDAConfig(train_per_class=0)


# ------------------------------------------------------------------ one model, real quanda explainers

@pytest.fixture(scope="module")
def toy_eval(tmp_path_factory):
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    model = _lenet(3)
    ckpt = tmp_path_factory.mktemp("ckpt") / "toy.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    train_x, train_y, test_x, test_y = _toy()
    cfg = tda.TDAConfig(train_per_class=6, n_test=8, representer_epochs=300)
    res = tda.evaluate_model(model, "toy", str(ckpt), tda._tensor_dataset(train_x, train_y), test_x, test_y, cfg)
    return model, res, (train_x, train_y, test_x, test_y)


def _features(model, x):
    got = {}
    h = dict(model.named_modules())["head.4"].register_forward_hook(lambda m, i, o: got.__setitem__("f", o))
    with torch.no_grad():
        model(x)
    h.remove()
    return got["f"]


def test_similarity_explainer_is_the_cosine_of_penultimate_features(toy_eval):
    model, res, (train_x, train_y, test_x, test_y) = toy_eval
    assert res["layers"] == ["head.4", "head.5"]
    e = res["explainers"]["similarity"]
    ft, fr = _features(model, test_x), _features(model, train_x)
    cos = torch.nn.functional.normalize(ft, dim=1) @ torch.nn.functional.normalize(fr, dim=1).T
    top = np.asarray(e["top"])
    assert top.shape == (8, tda.TOP_STORED)
    # the stored top-1 is the hand-computed most similar training image (ties: same cosine)
    best = cos.max(1).values
    torch.testing.assert_close(cos[torch.arange(8), torch.as_tensor(top[:, 0])], best)
    # class detection (top-1) is, per image, "the top training image has the test label"
    assert e["class_detection"] == [float(train_y[t] == test_y[i]) for i, t in enumerate(top[:, 0])]
    assert e["top1_cardinality"] == pytest.approx(len(set(top[:, 0].tolist())) / 8)


def test_representer_explanations_and_randomization_are_sane(toy_eval):
    _, res, (train_x, train_y, test_x, test_y) = toy_eval
    for name in tda.EXPLAINERS:
        e = res["explainers"][name]
        assert len(e["class_detection"]) == 8 and set(e["class_detection"]) <= {0.0, 1.0}
        r = np.asarray(e["randomization_spearman"])
        assert r.shape == (8,) and np.all(np.abs(r[np.isfinite(r)]) <= 1 + 1e-6)
        # re-initialising every parameter changes the ranking: no image keeps a perfect correlation
        assert np.all(r[np.isfinite(r)] < 0.999)
        assert set(e["seconds"]) == {"fit", "explain", "randomization"}


def test_randomization_spearman_is_scipys_on_quandas_random_model(tmp_path):
    """The per-image values the track stores are scipy's Spearman between the model's and the
    re-initialised model's similarity attributions (independent recomputation)."""
    from quanda.explainers.wrappers import CaptumSimilarity
    from quanda.metrics.heuristics import ModelRandomizationMetric
    from safetensors.torch import save_file

    model = _lenet(4)
    ckpt = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    train_x, train_y, test_x, test_y = _toy(4, 6, seed=5)
    ds = tda._tensor_dataset(train_x, train_y)
    cls, kw = tda.make_explainer("similarity", model, ds, cache_dir=str(tmp_path / "c"), model_id="m",
                                 layers=("head.4", "head.5"), config=tda.TDAConfig())
    expl = tda.explain_all(cls(model=model, train_dataset=ds, **kw), test_x, test_y, len(ds))
    with torch.random.fork_rng(devices=[]):
        rnd = ModelRandomizationMetric(model=model, model_id="m", cache_dir=str(tmp_path / "r"), train_dataset=ds,
                                       checkpoints=[str(ckpt)], explainer_cls=cls,
                                       expl_kwargs={**kw, "cache_dir": str(tmp_path / "rc")},
                                       checkpoints_load_func=tda._load_state_dict, seed=42)
        rnd.update(expl, test_x, test_y)
    got = torch.cat(rnd.state_dict()["results_dict"]["scores"]).numpy()
    fr = _features(rnd.rand_model, train_x)
    ft = _features(rnd.rand_model, test_x)
    rand_cos = (torch.nn.functional.normalize(ft, dim=1) @ torch.nn.functional.normalize(fr, dim=1).T).numpy()
    ref = [sps.spearmanr(expl[i].numpy(), rand_cos[i]).statistic for i in range(len(test_x))]
    np.testing.assert_allclose(got, ref, atol=1e-4)
    # and the weights the randomization started from are the checkpoint's (strict safetensors loader)
    fresh = _lenet(99)
    tda._load_state_dict(fresh, str(ckpt))
    for a, b in zip(fresh.state_dict().values(), model.state_dict().values()):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------ the whole track on a tiny subset

def _fmnist_available():
    try:
        from salbench.model_zoo.data import load_split

        load_split("fmnist", "test", download=False)
        return True
    except Exception:
        return False


@pytest.mark.skipif(not _fmnist_available(), reason="FMNIST files not found (make data)")
def test_run_track_writes_board_comparisons_figure_and_reuses_results(tmp_path):
    cfg = tda.TDAConfig(train_per_class=8, n_test=24, representer_epochs=200)
    logs = []
    out = tda.run_track(cfg, out_root=tmp_path, log=logs.append)
    ids = [c["id"] for c in tda.track_models("fmnist")]
    assert {r["variant"] for r in out["rows"]} >= {"N", "A", "G"}
    assert len(out["rows"]) == 2 * len(ids)
    import pandas as pd

    board = pd.read_csv(out["board"])
    assert list(board["model"]) == [r["model"] for r in out["rows"]]
    for _, row in board.iterrows():
        res = json.loads((tmp_path / "tda_results" / "fmnist" / f"{row['model']}.json").read_text())
        e = res["explainers"][row["explainer"]]
        assert res["config"] == cfg.as_dict() and len(res["train_indices"]) == 80 and len(res["test_indices"]) == 24
        assert row["class_detection"] == pytest.approx(np.mean(e["class_detection"]), abs=1e-5)
        assert row["randomization_spearman"] == pytest.approx(np.nanmean(e["randomization_spearman"]), abs=1e-5)
        assert row["top1_cardinality"] == pytest.approx(e["top1_cardinality"], abs=1e-5)
        for m in tda.METRICS:
            assert row[f"{m}_lo"] <= row[m] + 1e-9 <= row[f"{m}_hi"] + 2e-9
    comps = pd.read_csv(out["comparisons"])
    assert set(comps["comparison"]) == {"A vs N", "G vs A"}
    by = {r["model"]: r for r in out["rows"] if r["explainer"] == "similarity"}
    c = comps[(comps.comparison == "G vs A") & (comps.explainer == "similarity") & (comps.metric == "class_detection")
              & (comps.seed == 0)].iloc[0]
    assert c["delta"] == pytest.approx(by[c["model"]]["class_detection"] - by[c["reference"]]["class_detection"], abs=1e-5)
    png = out["figure"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # a second run re-uses every stored result (same weights, same config) and writes the same board
    before = out["board"].read_bytes()
    logs.clear()
    tda.run_track(cfg, out_root=tmp_path, log=logs.append)
    assert sum("re-using" in x for x in logs) == len(ids)
    assert out["board"].read_bytes() == before
    with pytest.raises(ValueError, match="not an N/A/G zoo model"):
        tda.run_track(cfg, only="nope", out_root=tmp_path)
