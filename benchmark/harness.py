"""The harness: score zoo models and submissions (re-using cached results) and regenerate
leaderboards under a file lock, so concurrent submissions never lose a row."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from salbench.benchmark import bands as B
from salbench.benchmark import cost as C
from salbench.benchmark import distributed as D
from salbench.benchmark import results as R
from salbench.benchmark import submit as S
from salbench.benchmark.imagesets import load_imageset
from salbench.benchmark.leaderboard import write_leaderboard
from salbench.benchmark.progress import Deadline
from salbench.benchmark.scoring import ScoreConfig, resolve_config, score
from salbench.benchmark.store import StoreLock, check_writable, commit_submission
from salbench.model_zoo import zoo
from salbench.model_zoo.data import load_split
from salbench.model_zoo.recipes import is_control_card


def _lock(dataset: str, out_dir: Path | None = None, *, results_root: Path | None = None,
          submissions_dir: Path | None = None) -> "StoreLock":
    """The dataset's store lock: waiting announced and bounded ($SALBENCH_LOCK_TIMEOUT), and an
    interrupted submission completed / temporary debris removed on entry (``benchmark.store``)."""
    return StoreLock(dataset, out_dir, results_root=results_root, submissions_dir=submissions_dir)


def zoo_cards(dataset: str, cards_dir: Path | None = None) -> list[dict]:
    """The zoo models the boards score: not the tiny test preset, not the control models (trained on
    permuted labels, ``model_zoo.recipes.is_control_card``; the sanity gates use them)."""
    return [c for c in zoo.list_cards(dataset, cards_dir) if c.get("preset") not in ("tiny",) and not is_control_card(c)]


def check_only(dataset: str, only: list[str] | None, cards: list[dict]) -> None:
    """``ValueError`` naming the ``only`` ids that are not among ``cards`` (before anything is loaded)."""
    unknown = [i for i in only or [] if i not in {c["id"] for c in cards}]
    if unknown:
        raise ValueError(f"unknown {dataset} zoo id(s) {', '.join(unknown)}; known: {', '.join(c['id'] for c in cards)}")


def _notifier(notify: Callable[[str], None] | None, progress: bool) -> Callable[[str], None]:
    if not D.is_main():  # under torch.distributed only rank 0 speaks
        return lambda msg: None
    if notify is not None:
        return notify
    return (lambda msg: print(msg, flush=True)) if progress else (lambda msg: None)


def _cached(dataset: str, sha256: str, config: ScoreConfig, imageset, results_root: Path | None,
            say: Callable[[str], None], label: str, function: dict | None = None,
            replace_unverifiable: bool = True) -> dict | None:
    """The stored result for these weights if its identity matches the requested score (announced),
    else None (and why it is scored is announced). Under torch.distributed rank 0 decides for every rank.
    With ``replace_unverifiable=False`` a stored file that fails verification raises its
    ``StoredResultError`` (on every rank) instead of being scored again."""
    res, why, bad = None, None, None
    if D.is_main():
        try:
            res, why = R.find_reusable(dataset, sha256, config=resolve_config(config, dataset).to_dict(),
                                       images_sha256=imageset.images_sha256, n_images=len(imageset),
                                       root=results_root, function=function, replace_unverifiable=replace_unverifiable)
        except R.StoredResultError as e:
            bad = str(e)
    res, why, bad = D.broadcast_object((res, why, bad))
    if bad is not None:
        raise R.StoredResultError(bad)
    say(why if res is not None else f"scoring {label} ({why}) ...")
    return res


def score_zoo(dataset: str, *, rescore: bool = False, config: ScoreConfig = ScoreConfig(), progress: bool = True,
              results_root: Path | None = None, out_dir: Path | None = None, cards_dir: Path | None = None,
              imageset=None, test_split=None, only: list[str] | None = None,
              notify: Callable[[str], None] | None = None, band: bool = True,
              time_limit: float | None = None) -> list[dict]:
    """Ensure a result for every zoo model of ``dataset`` (score where missing or ``rescore``),
    then regenerate the leaderboard. Returns the results. ``only``: these zoo ids, all known
    (``ValueError`` before anything is loaded or written otherwise).

    A stored result is re-used only when its identity (``benchmark.results.result_identity``:
    weights, protocol, image set, score-affecting config, device type) equals this call's; otherwise
    the model is scored again and the stored file replaced. ``notify`` receives one line per model
    (re-used or why scored); default: printed when ``progress``.

    A stored file that fails verification (edited, truncated, a legacy file not in the manifest) is
    scored again only when asked (``only`` names the model, or ``rescore``); otherwise the model is
    left out of the board with one warning naming the file (a regeneration never starts hours of
    unasked scoring). A link, FIFO or device at a model's result path is never replaced: that model
    is left out with one warning; a results folder reached through a link is refused before any work.

    With ``band`` (default), a result without its numerical band (PROTOCOL §8.4: one-ulp and float64
    re-scores with the same draws, ``benchmark.bands``) gets one, stored in the result.

    ``time_limit`` (seconds, ``--time-limit``): the budget of each model's scoring and band; past it
    :class:`~salbench.benchmark.progress.TimeLimitExceeded` (the models finished before are stored). Before a
    model is scored its cost estimate is said (``benchmark.cost``); without ``time_limit`` the budget is
    ``max(4 x estimate, estimate + 15 min)``, and 0 means no limit."""
    say = _notifier(notify, progress)
    cards = zoo_cards(dataset, cards_dir)
    check_only(dataset, only, cards)
    R.results_folder(dataset, results_root)  # StoredResultError (one line) when reached through a link
    test_split = test_split or load_split(dataset, "test")
    imageset = imageset or load_imageset(dataset, test_split=test_split, cards_dir=cards_dir)
    out = []
    for card in cards:
        if only and card["id"] not in only:
            continue
        try:
            R.check_result_target(dataset, card["sha256"], root=results_root)  # no link, FIFO, device there
            if rescore:
                res = None
                say(f"scoring {card['id']} (--rescore) ...")
            else:
                res = _cached(dataset, card["sha256"], config, imageset, results_root, say, card["id"],
                              replace_unverifiable=bool(only))
        except R.StoredResultError as e:
            if D.is_main():  # the line list_results says for the same file (said once)
                R.warn(f"{e}; {R.LEFT_OUT}")
            continue
        model = None
        deadline = Deadline(C.explicit_limit(time_limit))
        need_band = band and not (res or {}).get("band")
        if res is None or need_band:  # the cost estimate, said before anything runs; the default time limit
            model = zoo.load(card["id"], cards_dir=cards_dir)
            deadline.limit = _plan(model, dataset, config, imageset, test_split, score=res is None, band=need_band,
                                   time_limit=time_limit, say=say)
        if res is None:
            res = score(model, imageset, config, test_split=test_split, progress=progress, deadline=deadline).to_dict()
            say(f"  done in {res['timings']['total']:.1f} s"
                + (f" on {D.world_size()} processes" if D.active() else ""))
            res.pop("band", None)
            _save(dataset, res, card, results_root, out_dir)
        if band and not res.get("band"):
            model = model or zoo.load(card["id"], cards_dir=cards_dir)
            say(f"numerical band of {card['id']} (one-ulp and float64 re-scores) ...")
            res["band"] = B.numerical_band(model, imageset, res, float64=True, progress=progress, deadline=deadline)
            say(f"  done in {res['band']['seconds']:.1f} s")
            _save(dataset, res, card, results_root, out_dir)
        out.append(res)
    if D.is_main():
        regenerate(dataset, results_root=results_root, out_dir=out_dir, images_sha256=imageset.images_sha256)
    return out


def _plan(model, dataset: str, config: ScoreConfig, imageset, test_split, *, score: bool, band: bool,
          time_limit: float | None, say: Callable[[str], None]) -> float | None:
    """The cost estimate line (``benchmark.cost``; rank 0 alone under torch.distributed, where the time
    limit is not checked) and the run's time limit: ``time_limit``, or from the estimate when None."""
    if not D.is_main():
        return C.explicit_limit(time_limit)
    return C.plan(model, dataset, config, imageset=imageset, test_split=test_split, score=score, band=band,
                  time_limit=time_limit, say=say, processes=D.world_size() if D.active() else 1)


def _save(dataset: str, res: dict, card: dict, results_root: Path | None, out_dir: Path | None) -> None:
    if D.is_main():  # under torch.distributed rank 0 alone writes
        with _lock(dataset, out_dir, results_root=results_root):
            R.save_result(res, card, root=results_root)


def regenerate(dataset: str, *, results_root: Path | None = None, out_dir: Path | None = None,
               images_sha256: str | None = None) -> dict[str, Path]:
    with _lock(dataset, out_dir, results_root=results_root):
        return write_leaderboard(dataset, results_root=results_root, out_dir=out_dir, images_sha256=images_sha256)


def submit(path: str | Path, *, arch: str | None, dataset: str, name: str, notes: str = "", smoothing: str | None = None,
           rescore: bool = False, config: ScoreConfig = ScoreConfig(), progress: bool = True,
           results_root: Path | None = None, out_dir: Path | None = None, submissions_dir: Path | None = None,
           imageset=None, test_split=None, notify: Callable[[str], None] | None = None,
           normalization: dict | None = None, state_key: str | None = None, key_map: str | None = "auto",
           claimed_accuracy: float | None = None, band: bool = True,
           time_limit: float | None = None) -> tuple[dict, dict]:
    """Validate, score and add a submitted checkpoint to the leaderboard. Nothing is written
    unless validation and scoring both succeed.

    Weights already on the board under another id (a zoo model, another submission's card or a
    stored result) are refused with ``SubmissionError`` naming that id; resubmitting under the same
    name updates the entry. A stored result of the same identity is re-used (announced through
    ``notify``; default: printed when ``progress``). With ``band`` (default) the result gets its
    numerical band (PROTOCOL §8.4): the one-ulp re-score, plus float64 where the model can be cast.
    ``time_limit`` (seconds): the budget of scoring and band; past it nothing is written
    (:class:`~salbench.benchmark.progress.TimeLimitExceeded`). Before scoring the cost estimate is said
    (``benchmark.cost``); without ``time_limit`` the budget is ``max(4 x estimate, estimate + 15 min)``, and 0
    means no limit."""
    say = _notifier(notify, progress)
    deadline = Deadline(C.explicit_limit(time_limit))  # None: set from the cost estimate below
    # validate first: a rejected file costs no data loading and writes nothing
    model, card, payload = S.prepare_submission(path, arch=arch, dataset=dataset, name=name, notes=notes,
                                                smoothing=S.parse_smoothing(smoothing),
                                                submissions_dir=submissions_dir, results_root=results_root,
                                                normalization=normalization, state_key=state_key, key_map=key_map,
                                                claimed_accuracy=S.parse_claimed_accuracy(claimed_accuracy))
    check_writable(dataset, out_dir=out_dir, results_root=results_root, submissions_dir=submissions_dir)
    test_split = test_split or load_split(dataset, "test")
    S.check_claimed_accuracy(model, test_split, card.get("claimed_accuracy"), dataset=dataset, name=Path(path).name,
                             normalization=card.get("normalization"))
    imageset = imageset or load_imageset(dataset, test_split=test_split)
    if rescore:
        res = None
        say(f"scoring {card['id']} (--rescore) ...")
    else:
        res = _cached(dataset, card["sha256"], config, imageset, results_root, say, card["id"],
                      function=R.function_fields(card))
    need_band = band and not (res or {}).get("band")
    if res is None or need_band:  # the cost estimate, said before anything runs; the default time limit
        deadline.limit = _plan(model, dataset, config, imageset, test_split, score=res is None, band=need_band,
                               time_limit=time_limit, say=say)
    if res is None:
        S.check_not_degenerate(model, imageset, resolve_config(config, dataset), name=Path(path).name)
        res = score(model, imageset, config, test_split=test_split, progress=progress, deadline=deadline).to_dict()
    if band and not res.get("band"):
        say("numerical band (one-ulp re-score, and float64 where the model can be cast) ...")
        res["band"] = B.numerical_band(model, imageset, res, float64=True, progress=progress, deadline=deadline)
    card["natural_accuracy"] = res["accuracy"].get("natural")
    card["robust_accuracy"] = res["accuracy"].get("robust")
    card["robust_protocol"] = res["accuracy"].get("robust_protocol", {})
    if not D.is_main():  # under torch.distributed rank 0 alone writes
        return card, res
    with _lock(dataset, out_dir, results_root=results_root, submissions_dir=submissions_dir):
        # all or nothing, name and weights checked again under the lock (benchmark.store)
        commit_submission(card, payload, res, images_sha256=imageset.images_sha256, submissions_dir=submissions_dir,
                          results_root=results_root, out_dir=out_dir)
    return card, res
