"""Training-data attribution (TDA) track: which training images do N, A and G rely on? (issue 16)

Optional: it needs quanda (``make setup-tda``: its own virtualenv ``.venv-tda``, because quanda
0.5.0 pins ``captum<0.9`` and the core uses captum 0.9). Nothing here imports quanda at module
level, so the core CLI and test suite run without it; :func:`require_quanda` says what to run.

What is evaluated, per FMNIST zoo model of the dataset's default preset (N, A, G and their
``-sK`` seed replicas where cards exist):

* explainers (quanda 0.5.0 wrappers that run on a CPU in seconds for this LeNet):
  ``similarity`` (``CaptumSimilarity``: cosine similarity of the penultimate activations,
  Hanawa et al. 2021) and ``representer`` (``RepresenterPoints``, Yeh et al. 2018, fitted on the
  same penultimate features). TracIn-CP needs the training run's epoch checkpoints, which the
  zoo does not keep for the published ``paper-10ep`` models, so it is not evaluated.
* metrics that need no retraining (quanda's own metric classes):
  ``class_detection`` (top-1 training image has the test image's class; higher is better),
  ``top1_cardinality`` (distinct training images among all test images' top-1 / number of test
  images; higher = the attributions depend more on the test image),
  ``randomization_spearman`` (Spearman correlation of a test image's attributions under the model
  and under a fully re-initialised copy; lower = the attributions depend more on what the model
  learnt). Mislabeling detection needs a model trained on deliberately mislabeled data: not done.
* data: a fixed class-balanced subset of the training split (``TRAIN_PER_CLASS`` images per
  class, ``numpy.random.default_rng(SUBSET_SEED)``, indices stored in every result) and the
  first ``n_test`` images of the committed FMNIST image set (PROTOCOL §4). Explanation target =
  the true label, as for the saliency maps (PROTOCOL §2).
* intervals: 95% percentile bootstrap (PROTOCOL §8.3) over the test images with the boards' own routine
  (``stats._bootstrap``, 10 000 resamples, seed 0) for the per-test-image means
  (class detection, randomization); for the cardinality, which is not a per-image mean, a
  centred half-sampling interval (:func:`half_sample_ci`).

Results: one JSON per model in ``leaderboards/tda_results/<dataset>/<model id>.json`` (atomic
write, with the weights' sha256, the resolved config, versions, per-image values and the top
training indices), the board ``leaderboards/<dataset>_tda.csv``, the paired comparisons
``leaderboards/<dataset>_tda_comparisons.csv`` and the figure
``leaderboards/figures/<dataset>_tda_top.png``.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from salbench.model_zoo import zoo
from salbench.model_zoo.data import load_split
from salbench.model_zoo.datasets import get_spec

TDA_VERSION = 1
TRAIN_PER_CLASS = 500
SUBSET_SEED = 0
N_TEST = 1000
EXPLAINERS = ("similarity", "representer")
METRICS = ("class_detection", "top1_cardinality", "randomization_spearman")
DIRECTIONS = {"class_detection": 1, "top1_cardinality": 1, "randomization_spearman": -1}
RANDOMIZATION_SEED = 42
TOP_STORED = 5  # training indices stored per test image (the figure shows the first 3)
EXPLAIN_BATCH = 250
HALF_SAMPLES = 10_000
VARIANTS = ("N", "A", "G")
SHORT = {"similarity": "sim", "representer": "repr"}  # figure labels
SETUP_HINT = ("the training-data attribution track needs quanda (optional extra 'tda'): run `make setup-tda`, "
              "then `make tda` or `.venv-tda/bin/salbench tda --dataset fmnist`")


class TDAUnavailableError(ValueError):
    """quanda (the ``tda`` extra) is not installed in this environment."""


def require_quanda():
    """Import quanda, or raise :class:`TDAUnavailableError` saying to run ``make setup-tda``."""
    try:
        import quanda  # noqa: F401
    except ImportError as e:
        raise TDAUnavailableError(f"{SETUP_HINT} (import quanda failed: {e})") from None
    return quanda


@dataclass(frozen=True)
class TDAConfig:
    """Everything that changes a number of the track (stored in every result; a result is re-used
    only when its config equals the current one)."""

    dataset: str = "fmnist"
    train_per_class: int = TRAIN_PER_CLASS
    subset_seed: int = SUBSET_SEED
    n_test: int = N_TEST
    explainers: tuple[str, ...] = EXPLAINERS
    randomization_seed: int = RANDOMIZATION_SEED
    representer_lmbd: float = 0.003
    representer_epochs: int = 3000
    version: int = TDA_VERSION

    def __post_init__(self):
        if self.train_per_class < 1:
            raise ValueError(f"train_per_class must be >= 1, got {self.train_per_class}")
        if self.n_test < 2:
            raise ValueError(f"n_test must be >= 2 (intervals need two test images), got {self.n_test}")
        bad = [e for e in self.explainers if e not in EXPLAINERS]
        if bad or not self.explainers:
            raise ValueError(f"unknown explainer(s) {bad or '(none)'}; expected some of {EXPLAINERS}")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["explainers"] = list(self.explainers)
        return d


# ---------------------------------------------------------------- data and model plumbing

def train_subset_indices(labels, per_class: int, seed: int = SUBSET_SEED) -> np.ndarray:
    """Class-balanced subset of a split: ``per_class`` indices of each class drawn without
    replacement by one ``numpy.random.default_rng(seed)`` in class order; returned sorted.

    >>> train_subset_indices([0, 1, 0, 1, 0, 1], 2).tolist()
    [1, 2, 4, 5]
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {labels.shape}")
    rng = np.random.default_rng(seed)
    out = []
    for c in np.unique(labels):
        pool = np.flatnonzero(labels == c)
        if len(pool) < per_class:
            raise ValueError(f"class {int(c)} has {len(pool)} images, fewer than per_class={per_class}")
        out.append(rng.choice(pool, per_class, replace=False))
    return np.sort(np.concatenate(out))


def penultimate_layers(model: nn.Module, example: torch.Tensor) -> tuple[str, str]:
    """Names of (the features layer, the classifier layer) for quanda's feature-space explainers:
    the classifier is the last ``nn.Linear`` called in a forward pass of ``example``, the features
    layer the module called just before it, checked to output exactly the classifier's input.

    Raises:
        ValueError: no ``nn.Linear`` is called, or the module before it does not produce its input.
    """
    calls: list[tuple[str, torch.Tensor]] = []
    inputs: dict[str, torch.Tensor] = {}
    hooks = []
    for name, m in model.named_modules():
        if name and not list(m.children()):
            hooks.append(m.register_forward_hook(lambda mod, inp, out, n=name: calls.append((n, out))))
            if isinstance(m, nn.Linear):
                hooks.append(m.register_forward_pre_hook(lambda mod, inp, n=name: inputs.__setitem__(n, inp[0])))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    modules = dict(model.named_modules())
    linear = [i for i, (n, _) in enumerate(calls) if isinstance(modules[n], nn.Linear)]
    if not linear:
        raise ValueError(f"{type(model).__name__} calls no nn.Linear; the TDA explainers need a linear classifier layer")
    j = linear[-1]
    cls_name = calls[j][0]
    if j == 0 or not torch.equal(calls[j - 1][1], inputs[cls_name]):
        raise ValueError(f"the module called before the classifier {cls_name!r} does not output its input; "
                         "the TDA explainers need features -> linear classifier as the last two modules")
    return calls[j - 1][0], cls_name


def _load_state_dict(model: nn.Module, path: str) -> None:
    """quanda's checkpoint hook: safetensors / weights-only state dicts, strict (never unpickles)."""
    model.load_state_dict(zoo.read_state_dict(path))


def _tensor_dataset(x: torch.Tensor, y: torch.Tensor) -> torch.utils.data.TensorDataset:
    return torch.utils.data.TensorDataset(x.float().contiguous(), y.long().contiguous())


@contextlib.contextmanager
def _quiet():
    """captum/quanda log each explainer's start and warn on every activation cache write and line
    search step (in our fresh cache folders these are expected); keep the track's output readable."""
    import logging
    import warnings

    log = logging.getLogger("quanda")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.filterwarnings("ignore", category=UserWarning)
            warnings.filterwarnings("ignore", message=".*(set_default_tensor_type|torch.tensor|To copy construct).*")
            yield
    finally:
        log.setLevel(level)


def make_explainer(name: str, model: nn.Module, train_ds, *, cache_dir: str, model_id: str, layers: tuple[str, str],
                   config: TDAConfig):
    """A quanda explainer by name (``similarity`` or ``representer``) on ``layers``
    (features, classifier); activations are cached in ``cache_dir`` (a fresh folder per model:
    nothing is re-used from disk)."""
    require_quanda()
    from quanda.explainers.wrappers import CaptumSimilarity, RepresenterPoints

    features, classifier = layers
    n = len(train_ds)
    batch = math.gcd(n, 500)  # CaptumSimilarity: a batch size that divides the set avoids its split path
    if name == "similarity":
        return CaptumSimilarity, dict(model_id=model_id, cache_dir=cache_dir, layers=features, batch_size=batch,
                                      load_from_disk=False)
    if name == "representer":
        return RepresenterPoints, dict(model_id=model_id, cache_dir=cache_dir, features_layer=features,
                                       classifier_layer=classifier, batch_size=batch, load_from_disk=False,
                                       show_progress=False, lmbd=config.representer_lmbd,
                                       epoch=config.representer_epochs)
    raise ValueError(f"unknown explainer {name!r}; expected one of {EXPLAINERS}")


# ---------------------------------------------------------------- statistics

def top_k_cardinality(top: np.ndarray) -> float:
    """Distinct training indices in ``top`` (n_test, k) divided by its size (quanda's
    ``TopKCardinalityMetric``).

    >>> top_k_cardinality(np.array([[3], [3], [5], [7]]))
    0.75
    """
    top = np.asarray(top)
    if top.ndim != 2 or top.size == 0:
        raise ValueError(f"top must be a non-empty (n_test, k) array, got shape {top.shape}")
    return len(np.unique(top)) / top.size


def half_sample_ci(n: int, statistic, *, n_half: int = HALF_SAMPLES, seed: int = 0,
                   confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centred half-sampling interval of a statistic of a set of n items that is not a mean.

    ``statistic(idx)`` maps an index array (m,) to a vector (k,). Half-samples of size n//2 are
    drawn without replacement (seeded); for a mean their spread equals the full-sample
    sampling spread (the finite-population factor 1 - m/n is 1/2), so the interval is the full
    estimate plus the half-sample quantiles centred on their mean: est - (q_hi - mean),
    est - (q_lo - mean) (the basic interval). Used for the top-1 cardinality, which changes
    with duplicates and so cannot be bootstrapped with replacement.

    Returns (estimate, lo, hi), each of shape (k,).
    """
    if n < 2:
        raise ValueError(f"half-sampling needs n >= 2 items, got {n}")
    est = np.atleast_1d(np.asarray(statistic(np.arange(n)), dtype=float))
    rng = np.random.default_rng(seed)
    m = n // 2
    draws = np.stack([np.atleast_1d(np.asarray(statistic(rng.permutation(n)[:m]), dtype=float))
                      for _ in range(n_half)])
    centre = draws.mean(0)
    q_lo, q_hi = np.quantile(draws, [(1 - confidence) / 2, (1 + confidence) / 2], axis=0)
    return est, est - (q_hi - centre), est - (q_lo - centre)


def mean_ci(values: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """(mean, lo, hi): the boards' 95% percentile bootstrap over test images of a per-image mean
    (``benchmark.stats._bootstrap``, 10 000 resamples). NaN values (a constant attribution row
    has no Spearman correlation) are left out."""
    from salbench.benchmark import stats

    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return math.nan, math.nan, math.nan
    if len(v) == 1:
        return float(v[0]), math.nan, math.nan
    est, lo, hi = stats._bootstrap(len(v), lambda i: (stats._counts(i, len(v)) @ v[:, None]) / i.shape[-1], seed)
    return float(est[0]), float(lo[0]), float(hi[0])


def paired_delta(a: np.ndarray, b: np.ndarray, seed: int = 0) -> dict:
    """Paired comparison of two per-image columns on the same test images: mean(a - b) with its
    percentile bootstrap interval and the Wilcoxon p (``stats.wilcoxon_p``), on images finite in both."""
    from salbench.benchmark import stats

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    ok = np.isfinite(a) & np.isfinite(b)
    est, lo, hi = mean_ci(a[ok] - b[ok], seed)
    return {"n_paired": int(ok.sum()), "delta": est, "delta_lo": lo, "delta_hi": hi, "p": stats.wilcoxon_p(a[ok], b[ok])}


def verdict(metric: str, delta: float, lo: float, hi: float, p: float | None, alpha: float = 0.05) -> str:
    """``better`` / ``worse`` in the metric's direction when the interval excludes 0 (and, where a
    per-image test exists, its Holm-adjusted p is below alpha); else ``no detectable difference``
    (the boards' rule, PROTOCOL §7)."""
    if not all(map(math.isfinite, (delta, lo, hi))):
        return "not comparable"
    if p is not None and not (math.isfinite(p) and p < alpha):
        return "no detectable difference"
    d = DIRECTIONS[metric]
    if lo > 0 and delta > 0:
        return "better" if d > 0 else "worse"
    if hi < 0 and delta < 0:
        return "worse" if d > 0 else "better"
    return "no detectable difference"


# ---------------------------------------------------------------- one model

def explain_all(explainer, x: torch.Tensor, y: torch.Tensor, n_train: int, batch: int = EXPLAIN_BATCH) -> torch.Tensor:
    """Attributions (n_test, n_train) in batches (RepresenterPoints squeezes a batch of one)."""
    out = []
    for s in range(0, len(x), batch):
        e = explainer.explain(test_data=x[s:s + batch], targets=y[s:s + batch])
        out.append(e.detach().reshape(len(x[s:s + batch]), n_train).cpu())
    return torch.cat(out)


def evaluate_model(model: nn.Module, model_id: str, checkpoint: str, train_ds, test_x: torch.Tensor,
                   test_y: torch.Tensor, config: TDAConfig, *, progress=None) -> dict:
    """Every explainer x metric of the track for one model. Returns ``{explainer: {...}}`` with
    per-image ``class_detection`` and ``randomization_spearman``, the ``top`` training indices
    (n_test, TOP_STORED), the ``top1_cardinality`` estimate and seconds per step.

    ``checkpoint`` is the model's weights file: quanda's model randomization re-loads it
    (through a strict safetensors/weights-only loader) before re-initialising every parameter.
    """
    require_quanda()
    from quanda.metrics.downstream_eval import ClassDetectionMetric
    from quanda.metrics.heuristics import ModelRandomizationMetric, TopKCardinalityMetric

    model = model.eval()
    layers = penultimate_layers(model, test_x[:2])
    n_train = len(train_ds)
    out = {}
    for name in config.explainers:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="salbench-tda-") as cache, _quiet():
            cls, kwargs = make_explainer(name, model, train_ds, cache_dir=cache, model_id=re.sub(r"\W", "_", model_id),
                                         layers=layers, config=config)
            explainer = cls(model=model, train_dataset=train_ds, **kwargs)
            t_fit = time.perf_counter() - t0
            expl = explain_all(explainer, test_x, test_y, n_train)
            t_explain = time.perf_counter() - t0 - t_fit

            # ties (e.g. representer scores of 0 where features do not overlap) make torch.topk's choice
            # depend on k; rank by a stable sort (ties: lowest training index) and give quanda's metrics
            # strictly decreasing scores of that ranking, so they and the stored top indices agree
            order = torch.sort(expl, dim=1, descending=True, stable=True).indices
            ranked = torch.empty_like(expl).scatter_(
                1, order, torch.arange(n_train, 0, -1, dtype=expl.dtype).expand(len(expl), -1).contiguous())
            ties = int((expl == expl.max(1, keepdim=True).values).sum(1).gt(1).sum())

            cd = ClassDetectionMetric(model=model, train_dataset=train_ds, s=1)
            cd.update(ranked, test_y)
            class_detection = torch.cat(cd.state_dict()["scores"]).numpy()

            card = TopKCardinalityMetric(model=model, train_dataset=train_ds, top_k=1)
            card.update(ranked)
            cardinality = float(card.compute()["score"])

            t1 = time.perf_counter()
            # quanda re-seeds torch's global generator while re-initialising (reset_parameters)
            with torch.random.fork_rng(devices=[]):
                rnd = ModelRandomizationMetric(
                    model=model, model_id=kwargs["model_id"], cache_dir=os.path.join(cache, "random"),
                    train_dataset=train_ds, checkpoints=[str(checkpoint)], explainer_cls=cls,
                    expl_kwargs={**kwargs, "cache_dir": os.path.join(cache, "random_expl")},
                    checkpoints_load_func=_load_state_dict, correlation_fn="spearman",
                    seed=config.randomization_seed)
                for s in range(0, len(test_x), EXPLAIN_BATCH):
                    rnd.update(expl[s:s + EXPLAIN_BATCH], test_x[s:s + EXPLAIN_BATCH], test_y[s:s + EXPLAIN_BATCH])
            randomization = torch.cat(rnd.state_dict()["results_dict"]["scores"]).detach().cpu().numpy()
            t_random = time.perf_counter() - t1
        top = order[:, :TOP_STORED].numpy()
        out[name] = {
            "class_detection": class_detection.astype(float).tolist(),
            "randomization_spearman": randomization.astype(float).tolist(),
            "top": top.tolist(),
            "top1_cardinality": cardinality,
            "top1_ties": ties,  # test images whose highest score is shared by several training images
            "seconds": {"fit": round(t_fit, 2), "explain": round(t_explain, 2), "randomization": round(t_random, 2)},
        }
        if progress is not None:
            progress.update(1)
    return {"layers": list(layers), "explainers": out}


# ---------------------------------------------------------------- the track

def results_dir(dataset: str, leaderboards: Path | None = None) -> Path:
    """``<leaderboards>/tda_results/<dataset>``: beside the saliency result store
    (``leaderboards/results/<dataset>``), not inside it, whose every folder is a dataset of
    saliency results."""
    return (leaderboards or leaderboards_dir()) / "tda_results" / dataset


def leaderboards_dir() -> Path:
    """The boards' folder (``$SALBENCH_LEADERBOARDS_DIR`` or ``leaderboards/``)."""
    from salbench.benchmark.results import leaderboards_dir as lb

    return lb()


def track_models(dataset: str, cards_dir: Path | None = None) -> list[dict]:
    """The cards of the dataset's default preset whose variant is N, A or G (seed replicas
    ``-sK`` included), ordered by variant then seed."""
    preset = get_spec(dataset).default_preset
    cards = [c for c in zoo.list_cards(dataset, cards_dir)
             if c.get("preset") == preset and c.get("variant") in VARIANTS and c.get("source", "zoo") == "zoo"
             and (c.get("smoothing") or {}).get("placement", 1) == 1]
    return sorted(cards, key=lambda c: (VARIANTS.index(c["variant"]), c.get("recipe", {}).get("seed", 0), c["id"]))


@dataclass
class TrackData:
    train_indices: np.ndarray
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_indices: np.ndarray
    test_x: torch.Tensor
    test_y: torch.Tensor
    class_names: tuple[str, ...] = field(default=())


def load_track_data(config: TDAConfig) -> TrackData:
    """The fixed training subset and the first ``n_test`` images of the committed image set."""
    from salbench.benchmark.imagesets import load_imageset

    train = load_split(config.dataset, "train", download=False)
    idx = train_subset_indices(train.labels.numpy(), config.train_per_class, config.subset_seed)
    iset = load_imageset(config.dataset, check_references=False)
    if config.n_test > len(iset.indices):
        raise ValueError(f"n_test={config.n_test} exceeds the {len(iset.indices)} images of the {config.dataset} image set")
    k = config.n_test
    return TrackData(idx, train.float_images(torch.as_tensor(idx)), train.labels[torch.as_tensor(idx)],
                     iset.indices[:k].numpy(), iset.images[:k].float().div(255), iset.labels[:k].clone(),
                     tuple(get_spec(config.dataset).class_names))


def _versions() -> dict:
    import captum
    import quanda

    try:
        from importlib.metadata import version

        q = version("quanda")
    except Exception:  # pragma: no cover
        q = getattr(quanda, "__version__", "?")
    return {"quanda": q, "captum": captum.__version__, "torch": torch.__version__, "numpy": np.__version__}


def _load_result(path: Path) -> dict | None:
    from salbench.benchmark.results import MAX_RESULT_BYTES
    from salbench.model_zoo.safe_files import read_regular

    try:  # a link, FIFO or device (UnsafeFileError, a ValueError) is never followed or read: None
        return json.loads(read_regular(path, max_bytes=MAX_RESULT_BYTES, what="TDA result"))
    except (OSError, ValueError):
        return None


def score_model(card: dict, data: TrackData, config: TDAConfig, out_dir: Path, *, rescore: bool = False,
                cards_dir: Path | None = None, progress=None, log=print) -> dict:
    """Evaluate one zoo model (or re-use its stored result when the weights and config match) and
    write ``<out_dir>/<id>.json`` atomically."""
    path = out_dir / f"{card['id']}.json"
    old = None if rescore else _load_result(path)
    train_sha = _indices_sha256(data.train_indices)
    if old and old.get("sha256") == card["sha256"] and old.get("config") == config.as_dict() \
            and old.get("train_indices_sha256") == train_sha:
        log(f"{card['id']}: re-using {path}")
        if progress is not None:
            progress.update(len(config.explainers))
        return old
    model = zoo.load(card["id"], cards_dir=cards_dir)
    t0 = time.perf_counter()
    res = evaluate_model(model, card["id"], str(zoo.weights_path(card, cards_dir)), _tensor_dataset(data.train_x, data.train_y),
                         data.test_x, data.test_y, config, progress=progress)
    result = {
        "model_id": card["id"], "variant": card["variant"], "preset": card["preset"],
        "seed": card.get("recipe", {}).get("seed", 0), "sha256": card["sha256"],
        "natural_accuracy": card.get("natural_accuracy"), "config": config.as_dict(),
        "train_indices": data.train_indices.tolist(), "train_indices_sha256": train_sha,
        "test_indices": data.test_indices.tolist(), "test_labels": data.test_y.tolist(),
        "versions": _versions(), "seconds": round(time.perf_counter() - t0, 2), **res,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    zoo.atomic_write_json(path, result)
    log(f"{card['id']}: {result['seconds']:.0f} s -> {path}")
    return result


def _indices_sha256(a: np.ndarray) -> str:
    """sha256 of the training-subset indices as int64 bytes (a stored result is re-used only with the same subset)."""
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(a, dtype=np.int64).tobytes()).hexdigest()


def board_rows(results: list[dict]) -> list[dict]:
    """One row per model x explainer: each metric's estimate with its 95% interval."""
    rows = []
    for r in results:
        for name, e in r["explainers"].items():
            top1 = np.asarray(e["top"])[:, :1]
            c_est, c_lo, c_hi = half_sample_ci(len(top1), lambda i: top_k_cardinality(top1[i]))
            row = {"model": r["model_id"], "variant": r["variant"], "preset": r["preset"], "seed": r["seed"],
                   "explainer": name, "n_train": len(r["train_indices"]), "n_test": len(r["test_indices"]),
                   "natural_accuracy": r["natural_accuracy"]}
            for metric in ("class_detection", "randomization_spearman"):
                est, lo, hi = mean_ci(e[metric])
                row.update({metric: est, f"{metric}_lo": lo, f"{metric}_hi": hi})
            if not math.isclose(float(c_est[0]), e["top1_cardinality"], abs_tol=1e-12):
                raise ValueError(f"{r['model_id']}/{name}: stored top-1 indices give cardinality {c_est[0]}, "
                                 f"quanda's metric gave {e['top1_cardinality']}: the result file is inconsistent")
            # the basic interval can cross the statistic's range [1/n, 1] at small n: clipped to it
            row.update({"top1_cardinality": float(c_est[0]),
                        "top1_cardinality_lo": float(np.clip(c_lo[0], 1 / len(top1), 1)),
                        "top1_cardinality_hi": float(np.clip(c_hi[0], 1 / len(top1), 1))})
            rows.append(row)
    return rows


def comparison_rows(results: list[dict]) -> list[dict]:
    """Paired comparisons on the same test images, per explainer and metric: A vs N and G vs A
    (seed-0 models, and each seed replica against the same seed's reference where both exist).
    Per-image metrics: paired percentile interval + Wilcoxon, Holm-adjusted within (pair, explainer);
    cardinality: joint half-sampling interval of the difference, no per-image test."""
    from salbench.benchmark import stats

    by = {(r["variant"], r["seed"]): r for r in results}
    rows = []
    for (variant, seed), r in sorted(by.items(), key=lambda kv: (kv[0][1], VARIANTS.index(kv[0][0]))):
        ref_variant = {"A": "N", "G": "A"}.get(variant)
        ref = by.get((ref_variant, seed)) if ref_variant else None
        if ref is None or ref["test_indices"] != r["test_indices"]:
            continue
        for name in r["explainers"]:
            if name not in ref["explainers"]:
                continue
            e, f = r["explainers"][name], ref["explainers"][name]
            family = []
            for metric in ("class_detection", "randomization_spearman"):
                family.append({"metric": metric, **paired_delta(np.asarray(e[metric]), np.asarray(f[metric]))})
            for row, ph in zip(family, stats.holm([x["p"] for x in family])):
                row["p_holm"] = ph
            a1, b1 = np.asarray(e["top"])[:, :1], np.asarray(f["top"])[:, :1]
            d, lo, hi = half_sample_ci(len(a1), lambda i: top_k_cardinality(a1[i]) - top_k_cardinality(b1[i]))
            family.append({"metric": "top1_cardinality", "n_paired": len(a1), "delta": float(d[0]),
                           "delta_lo": float(lo[0]), "delta_hi": float(hi[0]), "p": math.nan, "p_holm": math.nan})
            for row in family:
                p = None if row["metric"] == "top1_cardinality" else row["p_holm"]
                rows.append({"model": r["model_id"], "reference": ref["model_id"], "comparison": f"{variant} vs {ref_variant}",
                             "seed": seed, "explainer": name, **row,
                             "verdict": verdict(row["metric"], row["delta"], row["delta_lo"], row["delta_hi"], p)})
    return rows


def _write_csv(rows: list[dict], path: Path) -> None:
    import pandas as pd

    from salbench.benchmark.csv_safety import safe_frame  # no text cell starts a spreadsheet formula

    path.parent.mkdir(parents=True, exist_ok=True)
    zoo.atomic_write_bytes(path, safe_frame(pd.DataFrame(rows)).to_csv(index=False, float_format="%.6g").encode())


def figure_top(results: list[dict], data: TrackData, path: Path, n_images: int = 4, k: int = 3) -> None:
    """For ``n_images`` test images (the first of evenly spaced classes), the top-``k`` training
    images each seed-0 N, A and G model attributes to, per explainer (PNG, atomic write)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [r for v in VARIANTS for r in results if r["variant"] == v and r["seed"] == 0]
    if not models:
        raise ValueError("no seed-0 N/A/G result to draw")
    explainers = [e for e in EXPLAINERS if all(e in r["explainers"] for r in models)]
    labels = data.test_y.numpy()
    classes = np.unique(labels)
    chosen = []
    for c in classes[np.linspace(0, len(classes) - 1, min(n_images, len(classes))).round().astype(int)]:
        chosen.append(int(np.flatnonzero(labels == c)[0]))
    ncols = 1 + k * len(explainers)
    nrows = len(chosen) * len(models)
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.25 * ncols + 0.6, 1.35 * nrows), squeeze=False)
    name = lambda c: data.class_names[c] if data.class_names else str(c)  # noqa: E731
    for a, t in enumerate(chosen):
        for b, r in enumerate(models):
            row = axes[a * len(models) + b]
            row[0].imshow(data.test_x[t, 0], cmap="gray", vmin=0, vmax=1)
            row[0].set_title(f"test: {name(labels[t])}", fontsize=7)
            row[0].set_ylabel(r["variant"], rotation=0, fontsize=11, labelpad=12, va="center")
            for ei, ex in enumerate(explainers):
                for j in range(k):
                    ti = r["explainers"][ex]["top"][t][j]  # a position in the training subset
                    ax = row[1 + ei * k + j]
                    ax.imshow(data.train_x[ti, 0], cmap="gray", vmin=0, vmax=1)
                    col = "black" if int(data.train_y[ti]) == int(labels[t]) else "red"
                    ax.set_title(f"{SHORT[ex]} #{j + 1}: {name(int(data.train_y[ti]))}", fontsize=6, color=col)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Top training images per test image (rows: N, A, G; sim = captum similarity, repr = representer "
                 "points; red = another class)", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    zoo.atomic_write_bytes(path, buf.getvalue())


def run_track(config: TDAConfig, *, only: str | None = None, rescore: bool = False, cards_dir: Path | None = None,
              out_root: Path | None = None, log=print) -> dict:
    """The whole track: score every model (re-using stored results), write board, comparisons and
    figure. Returns the paths written and the rows."""
    require_quanda()
    from tqdm import tqdm

    cards = track_models(config.dataset, cards_dir)
    if only:
        cards = [c for c in cards if c["id"] == only]
        if not cards:
            raise ValueError(f"{only!r} is not an N/A/G zoo model of {config.dataset}'s default preset; "
                             f"known: {', '.join(c['id'] for c in track_models(config.dataset, cards_dir))}")
    if not cards:
        raise ValueError(f"no N/A/G zoo card for {config.dataset}")
    data = load_track_data(config)
    lb = out_root or leaderboards_dir()
    rdir = results_dir(config.dataset, lb)
    t0 = time.perf_counter()
    results = []
    with tqdm(total=len(cards) * len(config.explainers), desc="tda", unit="model x explainer") as bar:
        for card in cards:
            results.append(score_model(card, data, config, rdir, rescore=rescore, cards_dir=cards_dir,
                                       progress=bar, log=bar.write if log is print else log))
    # the board covers every stored result of the current config, also models not re-run by --only
    stored = {r["model_id"]: r for r in results}
    for card in track_models(config.dataset, cards_dir):
        if card["id"] not in stored:
            old = _load_result(rdir / f"{card['id']}.json")
            if old and old.get("sha256") == card["sha256"] and old.get("config") == config.as_dict():
                stored[card["id"]] = old
    ordered = sorted(stored.values(), key=lambda r: (VARIANTS.index(r["variant"]), r["seed"]))
    rows = board_rows(ordered)
    comps = comparison_rows(ordered)
    board = lb / f"{config.dataset}_tda.csv"
    comp_path = lb / f"{config.dataset}_tda_comparisons.csv"
    fig_path = lb / "figures" / f"{config.dataset}_tda_top.png"
    _write_csv(rows, board)
    _write_csv(comps, comp_path)
    figure_top(ordered, data, fig_path)
    log(f"TDA track: {len(cards)} model(s) in {time.perf_counter() - t0:.0f} s; wrote {board}, {comp_path}, {fig_path}")
    return {"board": board, "comparisons": comp_path, "figure": fig_path, "rows": rows, "comparison_rows": comps}


def format_board(rows: list[dict]) -> str:
    """The board as a short text table (estimates with [lo, hi])."""
    lines = [f"{'model':32s} {'explainer':12s} {'class det.':>22s} {'top-1 card.':>22s} {'rand. Spearman':>22s}"]
    for r in rows:
        cell = lambda m: f"{r[m]:.3f} [{r[m + '_lo']:.3f}, {r[m + '_hi']:.3f}]"  # noqa: E731
        lines.append(f"{r['model']:32s} {r['explainer']:12s} {cell('class_detection'):>22s} "
                     f"{cell('top1_cardinality'):>22s} {cell('randomization_spearman'):>22s}")
    return "\n".join(lines)
