"""salbench: train the zoo, build image sets, score checkpoints, write leaderboards and figures.

Exit codes: 0 success, 1 a run failed (e.g. a metric crashed), 2 bad input (arguments, a
checkpoint that fails validation, a missing dataset), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

EXIT_OK, EXIT_FAIL, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
from salbench.model_zoo.datasets import DatasetNames

DATASETS = DatasetNames()  # live: every registered dataset spec


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (the command, the problem, where help is), exit code 2."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {_plain(message)} (see `{self.prog} --help`)\n")


def _int_at_least(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high]."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if v < low or (high is not None and v > high):
            rng = f">= {low}" if high is None else f"between {low} and {high}"
            raise argparse.ArgumentTypeError(f"must be {rng}, got {v}")
        return v

    parse.__name__ = "integer"
    return parse


def _device(text: str) -> str:
    """An argparse type: a torch device this machine has (cpu, cuda, cuda:N, mps)."""
    if text.strip().lower() == "cpu":
        return "cpu"
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cpu" and dev.index in (None, 0):
        return "cpu"
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine; use cpu")
        if dev.index is not None and dev.index >= n:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {n} CUDA device(s) (cuda:0 to cuda:{n - 1})")
        return text
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available on this machine; use cpu")
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: unsupported device type {dev.type!r}; use cpu, cuda, cuda:N or mps")


_THREADS = _int_at_least(1, 1024)
_POSITIVE = _int_at_least(1)


def _positive_seconds(text: str) -> float:
    """A number of seconds > 0, or 0 / ``none`` for no limit (returned as 0.0)."""
    if text.strip().lower() in ("none", "0"):
        return 0.0
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds (or none), got {text!r}") from None
    if not (v > 0 and v < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, or 0 / none for no limit, got {text!r}")
    return v


_POSITIVE_SECONDS = _positive_seconds


def _positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (0 < v < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


_LIST_ITEM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:=+-]*$")


def _comma_list(text: str, what: str, check_chars: bool = True) -> list[str]:
    """The items of a comma-separated list option; empty or malformed lists are usage errors."""
    items = [t.strip() for t in text.split(",")]
    if not text.strip() or all(not t for t in items):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}, got {text!r} (empty)")
    if any(not t for t in items):
        raise argparse.ArgumentTypeError(f"{text!r} has an empty item (two commas in a row, or a comma at an end)")
    bad = [t for t in items if check_chars and not _LIST_ITEM.match(t)]
    if bad:
        raise argparse.ArgumentTypeError(f"{bad[0]!r} in {text!r} is not one of {what} (letters, digits, '_', '-', '.')")
    dup = sorted({t for t in items if items.count(t) > 1})
    if dup:
        raise argparse.ArgumentTypeError(f"{text!r} names {dup[0]!r} more than once")
    return items


def _methods(text: str) -> str:
    """An argparse type: comma-separated registered attribution methods (returned normalised)."""
    items = _comma_list(text, "attribution methods", check_chars=False)  # any registered name
    from salbench.benchmark.scoring import EXPLAINERS  # the registry: imported only for a well-formed list

    unknown = [m for m in items if m not in EXPLAINERS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown attribution method {unknown[0]!r}; registered: "
                                         f"{', '.join(EXPLAINERS)}")
    controls = [m for m in items if EXPLAINERS[m].control]
    if controls:
        raise argparse.ArgumentTypeError(f"{controls[0]!r} is a control explainer: controls are scored apart, "
                                         "with `salbench controls --dataset D`")
    return ",".join(items)


_methods.__name__ = "methods"


def _ids(text: str) -> str:
    """An argparse type: comma-separated ids (returned normalised; unknown ids are said later)."""
    return ",".join(_comma_list(text, "ids"))


_ids.__name__ = "ids"


def _ref(text: str) -> str:
    """An argparse type: VARIANT=ID."""
    variant, eq, mid = (t.strip() for t in text.partition("="))
    if not eq or not _LIST_ITEM.match(variant) or not _LIST_ITEM.match(mid):
        raise argparse.ArgumentTypeError(f"expected VARIANT=ID (e.g. N=fmnist-lenet-N-paper), got {text!r}")
    return f"{variant}={mid}"


def _threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def cmd_train(args) -> int:
    from salbench.model_zoo.recipes import get_recipe
    from salbench.model_zoo.training import train

    recipe = get_recipe(args.dataset, args.preset, args.variant, placement=args.placement, seed=args.seed,
                        epochs=args.epochs, permute_labels=args.permute_labels)
    if args.epochs is not None and recipe.preset != args.preset and not args.quiet and _is_main():
        from salbench.model_zoo.training import model_id_for

        print(f"a {recipe.epochs}-epoch run of preset {args.preset}: its own id {model_id_for(recipe)} (the "
              f"preset's full run keeps its id, checkpoints and card)", flush=True)
    from salbench.benchmark.distributed import device_for

    # under torch.distributed a bare "cuda" is this process's cuda:<LOCAL_RANK>
    train(recipe, work_dir=args.work_dir, out_dir=args.out, resume=not args.no_resume,
          device=str(device_for(args.device)), progress=not args.quiet)
    return EXIT_OK


def cmd_zoo_list(args) -> int:
    from salbench.model_zoo.catalog import list_cards  # JSON only: no torch import (start-up well under 1 s)

    cards = list_cards(args.dataset)
    if not cards:
        print("no zoo cards" + (f" for {args.dataset}" if args.dataset else ""))
        return EXIT_OK
    print(f"{'id':40s} {'variant':7s} {'preset':12s} {'natural':>8s} {'PGD':>8s} {'AutoAtt':>8s} {'PGD-AA':>8s} "
          f"{'params':>9s}")
    for c in cards:
        aa = c.get("autoattack") if isinstance(c.get("autoattack"), dict) else None
        aa_txt = f"{aa['robust_accuracy']:8.4f}" if aa else f"{'-':>8s}"
        gap_txt = f"{c['robust_accuracy'] - aa['robust_accuracy']:+8.4f}" if aa else f"{'-':>8s}"
        print(f"{c['id']:40s} {c['variant']:7s} {c['preset']:12s} {c['natural_accuracy']:8.4f} "
              f"{c['robust_accuracy']:8.4f} {aa_txt} {gap_txt} {c['num_params']:9d}")
    if any(not isinstance(c.get("autoattack"), dict) for c in cards):
        print("-: no AutoAttack yet (salbench zoo autoattack --dataset D adds it)")
    return EXIT_OK


def cmd_zoo_archs(args) -> int:
    from salbench.model_zoo.architectures.describe import describe_all

    print(describe_all(keys_for=args.keys))
    return EXIT_OK


def cmd_zoo_presets(args) -> int:
    from salbench.model_zoo.recipes import PRESETS

    for key, p in sorted(PRESETS.items()):
        if args.dataset in (None, p.dataset):
            a = p.adversarial
            print(f"{key:24s} {p.natural.arch:9s} N {p.natural.epochs:3d} ep, A/G {a.epochs:3d} ep "
                  f"(PGD-{a.attack_steps}){'  [scaled down]' if p.scaled_down else ''}  {p.description}")
    return EXIT_OK


def cmd_zoo_autoattack(args) -> int:
    """AutoAttack (standard, L∞, the dataset's ε) on the first 1000 test images of each zoo
    model that has no such number yet (or all with --force); written onto its card."""
    from salbench.model_zoo import zoo
    from salbench.model_zoo.autoattack import autoattack_card_entry
    from salbench.model_zoo.data import load_split

    from salbench.model_zoo.recipes import is_control_card

    cards = zoo.list_cards(args.dataset)
    if args.only:
        only = set(_only(args))
        unknown = only - {c["id"] for c in cards}
        if unknown:
            raise ValueError(f"unknown zoo id(s) {', '.join(sorted(unknown))}; see `salbench zoo list`")
        cards = [c for c in cards if c["id"] in only]
    else:  # a control model (permuted labels, PROTOCOL §9.2) only when named
        cards = [c for c in cards if not is_control_card(c)]
    todo = [c for c in cards if args.force or "autoattack" not in c]
    if not todo:
        print("every selected card already has an AutoAttack robust accuracy (use --force to recompute)")
    splits = {}
    for card in todo:
        ds = card["dataset"]
        splits.setdefault(ds, load_split(ds, "test"))
        t = splits[ds]
        eps = card["robust_protocol"]["eps"]
        print(f"AutoAttack on {card['id']} (eps {eps:.4g}) ...", flush=True)
        entry = autoattack_card_entry(zoo.load(card["id"]), t.images, t.labels, eps=eps,
                                      n_classes=card.get("num_classes", 10),
                                      pgd_robust_accuracy=card.get("robust_accuracy"), progress=not args.quiet)
        path = zoo.zoo_dir() / "cards" / f"{card['id']}.json"
        fresh = zoo.read_card(path)  # re-read (another process may have updated it): a regular file only
        fresh["autoattack"] = entry
        zoo.atomic_write_json(path, fresh)
        print(f"  {card['id']}: PGD {card.get('robust_accuracy', float('nan')):.4f}, AutoAttack "
              f"{entry['robust_accuracy']:.4f} (gap {entry.get('pgd_minus_autoattack', float('nan')):+.4f})", flush=True)
    return EXIT_OK


def _config(args):
    from salbench.benchmark.scoring import ScoreConfig

    kw = {"device": args.device}
    if getattr(args, "batch_size", None):
        kw["batch_size"] = args.batch_size
    if getattr(args, "methods", None):
        kw["methods"] = tuple(args.methods.split(","))
    return ScoreConfig(**kw)


def cmd_imageset(args) -> int:
    from salbench.benchmark.imagesets import REFERENCE_MODELS, build_imageset, load_imageset

    if args.imageset_command == "build":
        refs = dict(REFERENCE_MODELS[args.dataset])
        for spec in args.ref or []:
            variant, _, mid = spec.partition("=")
            refs[variant] = mid
        path = build_imageset(args.dataset, refs, n=args.n)
        print(f"wrote {path}")
    s = load_imageset(args.dataset)
    print(f"{args.dataset} image set OK: {len(s)} images of the {s.split} split, sha256 {s.images_sha256[:16]}..., "
          f"references {', '.join(r['id'] for r in s.reference_models.values())}")
    return EXIT_OK


def _print_table(dataset: str) -> None:
    import pandas as pd

    from salbench.benchmark.leaderboard import markdown_table
    from salbench.benchmark.results import leaderboards_dir

    df = pd.read_csv(leaderboards_dir() / f"{dataset}.csv")
    print(markdown_table(df) if len(df) else f"(no rows in {dataset}.csv)")


def cmd_leaderboard(args) -> int:
    from salbench.benchmark.harness import score_zoo

    score_zoo(args.dataset, rescore=args.rescore, config=_config(args), progress=not args.quiet, only=_only(args),
              band=not args.no_band, time_limit=args.time_limit)
    if _is_main():
        _print_table(args.dataset)
    return EXIT_OK


def _only(args) -> list[str] | None:
    """The ``--only`` ids (each option may hold a comma-separated list), or None."""
    return [i for part in args.only for i in part.split(",") if i] if getattr(args, "only", None) else None


def cmd_controls(args) -> int:
    from salbench.benchmark.controls import score_controls

    score_controls(args.dataset, rescore=args.rescore, progress=not args.quiet, only=_only(args))
    return EXIT_OK


def cmd_sanity(args) -> int:
    from salbench.benchmark.sanity import run_sanity

    run_sanity(args.dataset, rescore=args.rescore, progress=not args.quiet, only=_only(args))
    return EXIT_OK


def cmd_figures(args) -> int:
    from salbench.benchmark.figures import BOARD_FIGURES, saliency_grid, sanity_figure
    from salbench.benchmark.harness import zoo_cards
    from salbench.benchmark.imagesets import load_imageset
    from salbench.model_zoo import zoo

    paths = [fn(args.dataset) for fn in BOARD_FIGURES]
    paths += [p for p in [sanity_figure(args.dataset)] if p is not None]
    by_variant = {c["variant"]: c["id"] for c in zoo_cards(args.dataset)}
    models = {v: zoo.load(by_variant[v]) for v in ("N", "A", "G") if v in by_variant}
    if models:
        paths.append(saliency_grid(models, load_imageset(args.dataset)))
    for p in paths:
        print(f"wrote {p}")
    return EXIT_OK


def cmd_site(args) -> int:
    """The static leaderboard site (benchmark.site): galleries drawn where missing or stale, pages rewritten."""
    from salbench.benchmark import site as W

    if not args.no_galleries:
        W.refresh_galleries(force=args.redraw_galleries, say=lambda msg: print(msg, flush=True))
    out, written = W.build_site()
    n_files, n_bytes = W.site_size(out)
    print(f"site: {out} ({n_files} files, {n_bytes / 1024:.0f} KiB; {len(written)} rewritten); "
          f"open {out / 'index.html'} in a browser")
    return EXIT_OK


def cmd_run(args) -> int:
    """The main job: score the dataset's zoo, write the leaderboards and the figures."""
    rc = cmd_leaderboard(args)
    return rc or (cmd_figures(args) if _is_main() else EXIT_OK)


def cmd_tda(args) -> int:
    """The optional training-data attribution track (quanda; benchmark/tda.py, imported here only)."""
    from salbench.benchmark import tda

    tda.require_quanda()  # TDAUnavailableError (a ValueError): one line naming `make setup-tda`
    if args.threads is None:
        import torch

        torch.set_num_threads(1)  # its small matrix ops run ~12x faster on 1 thread than on 2 busy cores (docs/tda.md)
    config = tda.TDAConfig(dataset=args.dataset, train_per_class=args.train_per_class, n_test=args.n_test,
                           explainers=tuple(args.explainer or tda.EXPLAINERS))
    out = tda.run_track(config, only=args.only, rescore=args.rescore)
    print(tda.format_board(out["rows"]))
    return EXIT_OK


def cmd_score(args) -> int:
    from salbench.benchmark.harness import submit
    from salbench.benchmark.submit import SubmissionError

    from salbench.benchmark import score_report

    said: list[str] = []

    def notify(msg: str) -> None:
        said.append(msg)
        print(msg, flush=True)

    if (args.mean is None) != (args.std is None):
        print("salbench: rejected: --mean and --std go together (one value per input channel each)", file=sys.stderr)
        return EXIT_BAD_INPUT
    from salbench.model_zoo.exported import limits as exported_limits

    try:
        # whether a stored result is re-used (and when it was scored) or why it is scored: always said
        with exported_limits(max_nodes=args.max_nodes, max_tensor_bytes=args.max_tensor_bytes,
                             max_gflops_per_image=args.max_gflops_per_image):  # caps of a .pt2 program
            card, res = submit(args.file, arch=args.arch, dataset=args.dataset, name=args.name, notes=args.notes,
                               smoothing=args.smoothing, rescore=args.rescore, config=_config(args),
                               progress=not args.quiet, notify=notify,
                               normalization={"mean": args.mean, "std": args.std} if args.mean is not None else None,
                               state_key=args.state_key, key_map=args.key_map,
                               claimed_accuracy=args.claimed_accuracy, band=not args.no_band,
                               time_limit=args.time_limit)
    except SubmissionError as e:
        if _is_main():
            print(f"salbench: rejected: {_plain(str(e))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not _is_main():
        return EXIT_OK
    print(f"scored {card['id']} (sha256 {card['sha256'][:12]}...): natural acc {res['accuracy'].get('natural', float('nan')):.4f}, "
          f"robust acc {res['accuracy'].get('robust', float('nan')):.4f}, acc on set {res['accuracy']['on_set']:.4f}")
    for m, s in res["summary"].items():
        print(f"  {m}: Gini {s['gini']:.4f}  SSIM {s['ssim_mean']:.4f}  log10 ROS {s['log10_ros']:.3f} "
              f"(NaN {s['ros_nan_fraction']:.3f})  AOPC {s['aopc']:.4f}")
    if card.get("key_map"):
        print(f"  (keys renamed by the {card['key_map']!r} key map; model_zoo/keymaps.py)")
    score_report.report(args.dataset, card, reused=not any(m.startswith("scoring ") for m in said))
    _print_verdicts(args.dataset, card["id"])
    score_report.regenerate_figures(args.dataset)
    score_report.site_notice()
    return EXIT_OK


def cmd_remove(args) -> int:
    """Take a submission off the board, all or nothing (benchmark.store.remove_submission)."""
    from salbench.benchmark.store import StoreLock, remove_submission

    with StoreLock(args.dataset):
        card = remove_submission(args.dataset, args.name)
    print(f"removed {card['id']} ({card.get('name') or card['id']}) from the {args.dataset} board: its card, weights and "
          f"stored result are gone and the board files regenerated; run `salbench site` to redraw the site")
    return EXIT_OK


def cmd_verify(args) -> int:
    """Re-score a stored result on this machine; exit 0 when every banded aggregate is within its band."""
    from pathlib import Path

    from salbench.benchmark import bands as B
    from salbench.benchmark.imagesets import load_imageset
    from salbench.benchmark.results import list_results, read_result_file
    from salbench.benchmark.scoring import platform_info
    from salbench.benchmark.submit import list_submission_cards, load_submission
    from salbench.model_zoo import zoo

    target = args.target
    if Path(target).is_symlink() or (Path(target).exists() and not Path(target).is_dir()):
        doc = read_result_file(Path(target))  # a link, FIFO or device: refused with one line, never read
    else:
        docs = [d for ds in DATASETS for d in list_results(ds) if d["model"].get("id") == target]
        if not docs:
            print(f"salbench: verify: no stored result for {target!r}: give a zoo or submission id "
                  "(`salbench zoo list`) or the path of a result file", file=sys.stderr)
            return EXIT_BAD_INPUT
        doc = docs[0]
    mid = doc["model"].get("id")
    if not doc.get("band"):
        print(f"salbench: verify: the result of {mid} has no numerical band; score it with "
              "`salbench leaderboard` (zoo) or `salbench score` (submission) to add one", file=sys.stderr)
        return EXIT_BAD_INPUT
    if doc["model"].get("source") == "zoo":
        model = zoo.load(mid)
    else:
        cards = [c for c in list_submission_cards(doc["dataset"]) if c["id"] == mid]
        if not cards:
            print(f"salbench: verify: the submission card of {mid} is missing", file=sys.stderr)
            return EXIT_BAD_INPUT
        model = load_submission(cards[0])
    here = platform_info()
    there = doc.get("versions", {}).get("platform", {})
    print(f"verifying {mid}: stored on {there.get('cpu', '?')} ({there.get('isa', '?')}, torch {there.get('torch', '?')}), "
          f"re-scoring on {here['cpu']} ({here['isa']}, torch {here['torch']}) ...", flush=True)
    checks = B.verify(model, load_imageset(doc["dataset"]), doc, progress=not args.quiet)
    print(B.checks_table(checks))
    bad = [c for c in checks if not c.ok]
    stored_here = not Path(target).is_file() or _is_stored(doc)
    if stored_here:  # the board marks (or unmarks) the row: benchmark.provenance
        from salbench.benchmark.leaderboard import write_leaderboard
        from salbench.benchmark.provenance import record_verification
        from salbench.benchmark.store import StoreLock, _committed_images_sha256

        with StoreLock(doc["dataset"]):
            record_verification(doc, checks, here)
            write_leaderboard(doc["dataset"], images_sha256=_committed_images_sha256(doc["dataset"]))
    if bad:
        print(f"{len(bad)} of {len(checks)} aggregates outside their band: "
              + ", ".join(f"{c.method} {c.aggregate}" for c in bad)
              + ("; the row is not marked verified on the board" if stored_here else ""))
        return 1
    print(f"all {len(checks)} banded aggregates within their band"
          + ("; the row is marked verified on the board (run `salbench site` to redraw the site)" if stored_here else ""))
    return EXIT_OK


def _is_stored(doc: dict) -> bool:
    """``doc`` is the result the store holds for its weights (same content digest)."""
    from salbench.benchmark.results import load_result

    try:
        held = load_result(doc["dataset"], doc["model"]["sha256"], doc["protocol"])
    except (KeyError, TypeError, ValueError):
        return False
    return held is not None and held.get("digest") == doc.get("digest")


def _print_verdicts(dataset: str, model_id: str) -> None:
    """The submission's paired verdicts against the dataset's reference A and G (PROTOCOL §7)."""
    import pandas as pd

    from salbench.benchmark.results import leaderboards_dir

    path = leaderboards_dir() / f"{dataset}_comparisons.csv"
    if not path.is_file():
        return
    df = pd.read_csv(path)
    df = df[(df["model"] == model_id) & df["metric"].isin(["gini", "ssim_mean", "log10_ros", "aopc"])]
    if df.empty:
        print(f"  (no reference A/G results on the {dataset} board to compare with)")
        return
    print(f"verdicts vs the reference models (paired over the set, 95% CI of the difference; {path.name}):")
    for _, r in df.iterrows():
        extra = f" ({r['robustness']})" if isinstance(r.get("robustness"), str) else ""
        print(f"  vs {r['reference']:<32s} {r['method']:3s} {r['metric']:<10s} {r['delta']:+.4f} "
              f"[{r['delta_lo']:+.4f}, {r['delta_hi']:+.4f}]  p_holm {r['p_holm']:.2g}  {r['verdict']}{extra}")


def _scoring_args(p) -> None:
    p.add_argument("--device", type=_device, default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--batch-size", type=_POSITIVE, default=None,
                   help="images per scoring batch (default: 250 for fmnist and cifar10, 16 for imagenette)")
    p.add_argument("--methods", type=_methods, default=None,
                   help="comma-separated attribution methods: VG, IG, or any registered with "
                        "salbench.benchmark.scoring.register_explainer (default: VG,IG)")
    p.add_argument("--rescore", action="store_true", help="ignore cached results and score again")
    p.add_argument("--no-band", action="store_true",
                   help="skip the numerical band (PROTOCOL §8.4: one-ulp and float64 re-scores, ~2x the scoring time)")
    p.add_argument("--time-limit", type=_POSITIVE_SECONDS, default=None, metavar="SECONDS",
                   help="wall-clock budget of each model's scoring and band: past it the run stops, nothing is "
                        "written for that model, and the message says how far it got (default: max(4x, +15 min) "
                        "of the cost estimate printed before scoring; 0 or none: no limit)")
    p.add_argument("--recalibrate", action="store_true",
                   help="time this machine again for the cost estimate (benchmark/cost.py; cached per machine)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--procs", type=_POSITIVE, default=argparse.SUPPRESS, metavar="K",
                   help="score on K processes through torch's launcher (torch.distributed.run, standalone), "
                        "each with cores/K threads unless --threads says otherwise (also accepted before the subcommand)")


def _only_arg(p) -> None:
    p.add_argument("--only", action="append", type=_ids, metavar="ID[,ID]",
                   help="score only these zoo ids (the leaderboard still lists every cached result); "
                        "separate processes may score different ids at once")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="salbench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=_THREADS, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--procs", type=_POSITIVE, default=1, metavar="K",
                   help="run, leaderboard, score, train: K processes on this machine through torch.distributed.run "
                        "(scoring: the image set sharded by scoring batches; training: DDP; rank 0 writes); "
                        "default threads cores/K each")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a zoo model (N, A, G, M1, M2) from a recipe preset",
                       description="Train one zoo entry; checkpoints every epoch and resumes after a crash.")
    t.add_argument("--dataset", required=True, choices=DATASETS)
    t.add_argument("--variant", required=True, choices=["N", "A", "G", "M1", "M2"])
    t.add_argument("--preset", default="paper",
                   help="recipe preset: fmnist: paper (the full recipe, 40 PGD epochs for A/G), paper-10ep, tiny; "
                        "cifar10: paper (GPU), cpu-resnet8; imagenette: paper (GPU). `salbench zoo presets` describes them")
    t.add_argument("--placement", type=int, default=None, help="SmoothBlock after stage 1, 2 or 3 (default: recipe)")
    t.add_argument("--seed", type=int, default=0,
                   help="training seed (init, data order, augmentation, PGD starts); ids get -s<seed> when > 0")
    t.add_argument("--permute-labels", action="store_true",
                   help="the data-randomisation control: train on permuted labels (id ...-randlabels; a control "
                        "model the sanity gates use, never scored on a board)")
    t.add_argument("--epochs", type=_POSITIVE, default=None, metavar="N",
                   help="a short (or longer) real run: N epochs instead of the preset's, under its own id "
                        "(preset name + -e<N>, e.g. fmnist-lenet-A-paper-10ep-e1), so it never replaces the full run")
    t.add_argument("--work-dir", default="runs", help="epoch checkpoints (resumed from)")
    t.add_argument("--out", default=None, help="zoo folder for weights + card (default: the bundled zoo)")
    t.add_argument("--device", type=_device, default="cpu", help="cpu, cuda, cuda:1, ...")
    t.add_argument("--no-resume", action="store_true", help="start from scratch even if a checkpoint exists")
    t.add_argument("--quiet", action="store_true")
    t.add_argument("--procs", type=_POSITIVE, default=argparse.SUPPRESS, metavar="K",
                   help="train on K processes (DistributedDataParallel, batch/K per process) through torch.distributed.run")
    t.set_defaults(func=cmd_train)

    i = sub.add_parser("imageset", help="build or verify the fixed image set of a dataset (PROTOCOL §4)")
    isub = i.add_subparsers(dest="imageset_command", required=True)
    ib = isub.add_parser("build", help="select the 1000 images every reference N/A/G model classifies correctly")
    ib.add_argument("--dataset", required=True, choices=DATASETS)
    ib.add_argument("--ref", action="append", type=_ref,
                    help="override a reference model, e.g. --ref N=fmnist-lenet-N-paper")
    ib.add_argument("--n", type=_POSITIVE, default=1000)
    iv = isub.add_parser("verify", help="check the committed set against the data files and the zoo")
    iv.add_argument("--dataset", required=True, choices=DATASETS)
    i.set_defaults(func=cmd_imageset)

    s = sub.add_parser("score", help="validate, score and add a submitted checkpoint to the leaderboard",
                       description="Score a checkpoint (.safetensors, or a state-dict .pt read with weights_only=True, "
                                   "of a registry architecture) or an exported program of any architecture (.pt2 from "
                                   "torch.export.save, read without running code from it) on the dataset's fixed "
                                   "image set and add it to the leaderboard; then print where its rows are, its ranks "
                                   "and verdicts, and redraw the dataset's SSIM and ROAD figures.")
    s.add_argument("file")
    s.add_argument("--arch", default=None,
                   help="registry architecture name (salbench zoo archs) for weights; none (or 'exported') for a .pt2")
    s.add_argument("--dataset", required=True, choices=DATASETS)
    s.add_argument("--name", required=True, help="leaderboard name of the submission")
    s.add_argument("--notes", default="", help="free text stored on the card")
    s.add_argument("--smoothing", default=None, help="SmoothBlock of the model, FILTER[:PLACEMENT], e.g. gaussian:1")
    s.add_argument("--state-key", default=None, metavar="KEY",
                   help="the entry of a checkpoint dict holding the state dict, e.g. model for {'model': sd, 'epoch': 1}")
    s.add_argument("--key-map", default="auto", metavar="NAME",
                   help="rename the file's keys: auto (a known map when only it makes the keys fit, e.g. torchvision "
                        "ResNet-18 names), none, or a map name (torchvision); see model_zoo/keymaps.py")
    s.add_argument("--mean", type=float, nargs="+", default=None, metavar="M",
                   help="per-channel mean the model was trained with, [0, 1] pixel space (default: the dataset's); "
                        "stored on the card; with --std")
    s.add_argument("--std", type=float, nargs="+", default=None, metavar="S",
                   help="per-channel std the model was trained with (default: the dataset's); with --mean")
    s.add_argument("--claimed-accuracy", type=float, default=None, metavar="ACC",
                   help="natural test accuracy the model is known to reach (fraction or percent), on the card; "
                        "refused if the one measured on the full test split is more than 0.5 points lower, naming the "
                        "usual normalisation that fits the claim (e.g. --mean 0.5 --std 0.5)")
    caps = "a .pt2 program over it is refused before it runs (README 'Any architecture: export it')"
    s.add_argument("--max-nodes", type=_POSITIVE, default=None, metavar="N",
                   help=f"cap on the operator nodes of an exported program (default: 10000); {caps}")
    s.add_argument("--max-tensor-bytes", type=_POSITIVE, default=None, metavar="BYTES",
                   help=f"cap on any single tensor an exported program makes for one image (default: 1073741824, "
                        f"1 GiB); {caps}")
    s.add_argument("--max-gflops-per-image", type=_positive_float, default=None, metavar="G",
                   help=f"cap on an exported program's estimated forward FLOPs per image, in GFLOPs (default: 50); "
                        f"{caps}")
    _scoring_args(s)
    s.set_defaults(func=cmd_score)

    lb = sub.add_parser("leaderboard", help="score zoo models without a cached result and rewrite the CSVs")
    lb.add_argument("--dataset", required=True, choices=DATASETS)
    _scoring_args(lb)
    _only_arg(lb)
    lb.set_defaults(func=cmd_leaderboard)

    for name, func, what, help_ in (
            ("controls", cmd_controls, "control results",
             "score the control explainers (random, edge) on every zoo model; writes <dataset>_controls.csv and the "
             "main board's beaten_by_control column"),
            ("sanity", cmd_sanity, "sanity values",
             "sanity gates (model-parameter and data randomisation) of every zoo model; writes <dataset>_gates.csv, "
             "<dataset>_sanity.csv and the main board's gate column")):
        q = sub.add_parser(name, help=help_)
        q.add_argument("--dataset", required=True, choices=DATASETS)
        q.add_argument("--rescore", action="store_true", help=f"ignore stored {what} and compute again")
        q.add_argument("--quiet", action="store_true")
        _only_arg(q)
        q.set_defaults(func=func)

    v = sub.add_parser("verify", help="re-score a stored result here; exit 0 when every headline aggregate is "
                                      "within its numerical band, 1 when one is not")
    v.add_argument("target", help="a zoo or submission id, or the path of a stored result file")
    v.add_argument("--quiet", action="store_true")
    v.set_defaults(func=cmd_verify)

    rm = sub.add_parser("remove", help="take a submission off the board (card, weights, result; boards regenerated)")
    rm.add_argument("name", help="the submission's name or id (`salbench score` printed it)")
    rm.add_argument("--dataset", required=True, choices=DATASETS)
    rm.set_defaults(func=cmd_remove)

    f = sub.add_parser("figures", help="SSIM-vs-noise and ROAD curves, saliency-map grid (PNG)")
    f.add_argument("--dataset", required=True, choices=DATASETS)
    f.set_defaults(func=cmd_figures)

    r = sub.add_parser("run", help="the main job: leaderboard + figures for a dataset, printing the table")
    r.add_argument("--dataset", default="fmnist", choices=DATASETS)
    _scoring_args(r)
    _only_arg(r)
    r.set_defaults(func=cmd_run)

    td = sub.add_parser("tda", help="optional: training-data attribution track with quanda (make setup-tda first)",
                        description="Evaluate quanda's training-data attribution explainers (captum similarity, "
                                    "representer points) on the dataset's N/A/G zoo models with class detection, "
                                    "top-1 cardinality and model randomization; write leaderboards/<dataset>_tda.csv, "
                                    "its comparisons, the results and figures/<dataset>_tda_top.png. Needs the 'tda' "
                                    "extra: `make setup-tda`, then `.venv-tda/bin/salbench tda`.")
    td.add_argument("--dataset", default="fmnist", choices=("fmnist",))
    td.add_argument("--train-per-class", type=_POSITIVE, default=500, metavar="K",
                    help="training images per class in the fixed subset (default: %(default)s)")
    td.add_argument("--n-test", type=_int_at_least(2), default=1000, metavar="N",
                    help="first N images of the committed image set (default: %(default)s)")
    td.add_argument("--explainer", action="append", choices=("similarity", "representer"),
                    help="evaluate only this explainer (repeatable; default: both)")
    td.add_argument("--only", default=None, metavar="ID", help="one zoo model (the board keeps the others' stored results)")
    td.add_argument("--rescore", action="store_true", help="recompute even where a stored result matches")
    td.set_defaults(func=cmd_tda)

    w = sub.add_parser("site", help="the static leaderboard site: leaderboards/site/ (open index.html)",
                       description=cmd_site.__doc__)
    w.add_argument("--no-galleries", action="store_true",
                   help="do not draw missing or stale per-model saliency galleries (no model is loaded)")
    w.add_argument("--redraw-galleries", action="store_true", help="draw every gallery again")
    w.set_defaults(func=cmd_site)

    z = sub.add_parser("zoo", help="inspect the model zoo")
    zsub = z.add_subparsers(dest="zoo_command", required=True)
    zl = zsub.add_parser("list", help="list zoo cards with their accuracies")
    zl.add_argument("--dataset", default=None, choices=DATASETS)
    zl.set_defaults(func=cmd_zoo_list)
    zaa = zsub.add_parser("autoattack", help="AutoAttack (standard, L-inf) robust accuracy onto zoo cards",
                          description=cmd_zoo_autoattack.__doc__)
    zaa.add_argument("--dataset", default=None, choices=DATASETS)
    zaa.add_argument("--only", action="append", type=_ids, metavar="ID[,ID]", help="only these zoo ids")
    zaa.add_argument("--force", action="store_true", help="recompute where a card already has a number")
    zaa.add_argument("--quiet", action="store_true")
    zaa.set_defaults(func=cmd_zoo_autoattack)
    zp = zsub.add_parser("presets", help="list training presets with their description")
    zp.add_argument("--dataset", default=None, choices=DATASETS)
    zp.set_defaults(func=cmd_zoo_presets)
    za = zsub.add_parser("archs", help="registered architectures: input size, datasets, expected state-dict keys")
    za.add_argument("--keys", default=None, metavar="ARCH", help="every state-dict key of ARCH with its shape")
    za.set_defaults(func=cmd_zoo_archs)
    _finish(p)
    return p


_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def _plain(text: str) -> str:
    """Strip ANSI escape sequences (colour codes some libraries put in their messages).

    >>> _plain("\x1b[31mbad\x1b[0m input")
    'bad input'
    """
    return _ANSI.sub("", text)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown in every option's help (unless it already names its default, or there is
    none to show); descriptions keep their line breaks."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or action.default is None or action.default is False
                or action.default is argparse.SUPPRESS or not action.option_strings):
            return text
        return super()._get_help_string(action)


def _finish(parser: argparse.ArgumentParser, top: bool = True) -> None:
    """Every (sub)command: defaults in help, and ``--threads`` accepted after the subcommand too."""
    parser.formatter_class = _HelpFormatter
    if not top and not any("--threads" in a.option_strings for a in parser._actions):
        parser.add_argument("--threads", type=_THREADS, default=argparse.SUPPRESS,
                            help="torch intra-op threads (also accepted before the subcommand)")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                _finish(sub, top=False)


DISTRIBUTED_COMMANDS = ("run", "leaderboard", "score", "train")


def _is_main() -> bool:
    from salbench.benchmark import distributed as D

    return D.is_main()


def _strip_procs(argv: list[str]) -> list[str]:
    """``argv`` without its ``--procs K`` / ``--procs=K`` options.

    >>> _strip_procs(["--procs", "2", "run", "--procs=3", "--dataset", "fmnist"])
    ['run', '--dataset', 'fmnist']
    """
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--procs":
            skip = True
        elif not a.startswith("--procs="):
            out.append(a)
    return out


OVERSUBSCRIBE_ENV = "SALBENCH_ALLOW_OVERSUBSCRIBE"  # =1: --procs may exceed the cores available


def _cores() -> int:
    """Cores this process may run on: its CPU affinity where the OS has one, else the CPU count."""
    import os

    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _launch(argv: list[str], procs: int, threads: int | None) -> int:
    """Run this command line on ``procs`` processes through torch's launcher (``torch.distributed.run``
    in standalone mode: a local rendezvous, one process per rank); each gets ``threads`` torch threads
    (default: cores // procs, at least 1). The exit code is the failing rank's, else 0; the error
    line says what the failed run had written to the leaderboards folder (``store.what_a_failed_run_left``)."""
    import os

    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from salbench.benchmark import store

    child = _strip_procs(argv)
    if threads is None:
        threads = max(1, _cores() // procs)
        child = ["--threads", str(threads), *child]
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    before = store.store_snapshot()
    try:
        torchrun.main(["--standalone", f"--nproc-per-node={procs}", "--max-restarts=0",
                       "-m", "salbench.benchmark.cli", *child])
    except ChildFailedError as e:
        codes = [f.exitcode for f in e.failures.values()]
        code = next((c for c in codes if c in (EXIT_BAD_INPUT, EXIT_INTERRUPTED)), None)
        print(f"salbench: error: {len(codes)} of {procs} processes failed (exit codes {codes}); "
              f"{store.what_a_failed_run_left(before)}", file=sys.stderr)
        return code if code is not None else EXIT_FAIL
    return EXIT_OK


def _time_limit_error() -> type:
    from salbench.benchmark.progress import TimeLimitExceeded  # no torch import

    return TimeLimitExceeded


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)  # --help and usage errors exit here, before torch is imported
    from salbench.benchmark import distributed as D

    procs = getattr(args, "procs", 1) or 1
    if procs < 1:
        parser.error(f"--procs must be >= 1, got {procs}")
    if D.under_launcher():
        if D.launched() and args.command not in DISTRIBUTED_COMMANDS and D.rank_from_env() != 0:
            return EXIT_OK  # commands that are not sharded run on rank 0 only
    elif procs > 1:
        if args.command not in DISTRIBUTED_COMMANDS:
            parser.error(f"--procs applies to {', '.join(DISTRIBUTED_COMMANDS)}, not {args.command}")
        import os

        cores = _cores()
        if procs > cores and os.environ.get(OVERSUBSCRIBE_ENV) != "1":
            parser.error(f"--procs {procs} is more than the {cores} core(s) this process may run on; use --procs "
                         f"{cores} or fewer (or set {OVERSUBSCRIBE_ENV}=1 to start more processes than cores)")
        return _launch(argv, procs, args.threads)
    _threads(args.threads)
    if args.command in DISTRIBUTED_COMMANDS:
        D.init(getattr(args, "device", "cpu"))
    if getattr(args, "recalibrate", False) and _is_main():
        from salbench.benchmark.cost import calibrate

        calibrate(getattr(args, "device", "cpu"), force=True, say=lambda m: print(m, flush=True))
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, KeyError, FileNotFoundError, _time_limit_error()) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        if _is_main():
            print(f"salbench: error: {_plain(str(msg))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        D.shutdown()


if __name__ == "__main__":
    sys.exit(main())
