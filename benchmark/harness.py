"""The harness: score zoo models and submissions (re-using cached results) and regenerate
leaderboards under a file lock, so concurrent submissions never lose a row."""

from __future__ import annotations

from pathlib import Path

from filelock import FileLock

from benchmark import results as R
from benchmark import submit as S
from benchmark.imagesets import load_imageset
from benchmark.leaderboard import write_leaderboard
from benchmark.scoring import ScoreConfig, score
from model_zoo import zoo
from model_zoo.data import load_split


def _lock(dataset: str, out_dir: Path | None = None) -> FileLock:
    d = out_dir or R.leaderboards_dir()
    d.mkdir(parents=True, exist_ok=True)
    return FileLock(str(d / f".{dataset}.lock"), timeout=600)


def zoo_cards(dataset: str, cards_dir: Path | None = None) -> list[dict]:
    return [c for c in zoo.list_cards(dataset, cards_dir) if c.get("preset") not in ("tiny",)]


def score_zoo(dataset: str, *, rescore: bool = False, config: ScoreConfig = ScoreConfig(), progress: bool = True,
              results_root: Path | None = None, out_dir: Path | None = None, cards_dir: Path | None = None,
              imageset=None, test_split=None, only: list[str] | None = None) -> list[dict]:
    """Ensure a result for every zoo model of ``dataset`` (score where missing or ``rescore``),
    then regenerate the leaderboard. Returns the results. ``only``: these zoo ids, all known
    (``ValueError`` before anything is loaded or written otherwise)."""
    cards = zoo_cards(dataset, cards_dir)
    unknown = [i for i in only or [] if i not in {c["id"] for c in cards}]
    if unknown:
        raise ValueError(f"unknown {dataset} zoo id(s) {', '.join(unknown)}; known: {', '.join(c['id'] for c in cards)}")
    test_split = test_split or load_split(dataset, "test")
    imageset = imageset or load_imageset(dataset, test_split=test_split, cards_dir=cards_dir)
    out = []
    for card in cards:
        if only and card["id"] not in only:
            continue
        res = None if rescore else R.load_result(dataset, card["sha256"], root=results_root,
                                                 images_sha256=imageset.images_sha256)
        if res is None:
            if progress:
                print(f"scoring {card['id']} ...", flush=True)
            model = zoo.load(card["id"], cards_dir=cards_dir)
            res = score(model, imageset, config, test_split=test_split, progress=progress)
            with _lock(dataset, out_dir):
                R.save_result(res, card, root=results_root)
            if progress:
                print(f"  done in {res['timings']['total']:.1f} s", flush=True)
        out.append(res)
    regenerate(dataset, results_root=results_root, out_dir=out_dir, images_sha256=imageset.images_sha256)
    return out


def regenerate(dataset: str, *, results_root: Path | None = None, out_dir: Path | None = None,
               images_sha256: str | None = None) -> dict[str, Path]:
    with _lock(dataset, out_dir):
        return write_leaderboard(dataset, results_root=results_root, out_dir=out_dir, images_sha256=images_sha256)


def submit(path: str | Path, *, arch: str, dataset: str, name: str, notes: str = "", smoothing: str | None = None,
           rescore: bool = False, config: ScoreConfig = ScoreConfig(), progress: bool = True,
           results_root: Path | None = None, out_dir: Path | None = None, submissions_dir: Path | None = None,
           imageset=None, test_split=None) -> tuple[dict, dict]:
    """Validate, score and add a submitted checkpoint to the leaderboard. Nothing is written
    unless validation and scoring both succeed."""
    # validate first: a rejected file costs no data loading and writes nothing
    model, card, payload = S.prepare_submission(path, arch=arch, dataset=dataset, name=name, notes=notes,
                                                smoothing=S.parse_smoothing(smoothing),
                                                submissions_dir=submissions_dir)
    test_split = test_split or load_split(dataset, "test")
    imageset = imageset or load_imageset(dataset, test_split=test_split)
    res = None if rescore else R.load_result(dataset, card["sha256"], root=results_root,
                                             images_sha256=imageset.images_sha256)
    if res is None:
        res = score(model, imageset, config, test_split=test_split, progress=progress)
    card["natural_accuracy"] = res["accuracy"].get("natural")
    card["robust_accuracy"] = res["accuracy"].get("robust")
    card["robust_protocol"] = res["accuracy"].get("robust_protocol", {})
    with _lock(dataset, out_dir):
        S.store_submission(card, payload, submissions_dir)
        R.save_result(res, card, root=results_root)
        write_leaderboard(dataset, results_root=results_root, out_dir=out_dir, images_sha256=imageset.images_sha256)
    return card, res
