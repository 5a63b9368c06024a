"""``salbench``: train the zoo, build image sets, score checkpoints, write leaderboards and figures.

Exit codes: 0 success, 1 a run failed (e.g. a metric crashed), 2 bad input (arguments, a
checkpoint that fails validation, a missing dataset), 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys

EXIT_OK, EXIT_FAIL, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


def _threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def cmd_train(args) -> int:
    from model_zoo.recipes import get_recipe
    from model_zoo.training import train

    recipe = get_recipe(args.dataset, args.preset, args.variant, placement=args.placement)
    train(recipe, work_dir=args.work_dir, out_dir=args.out, resume=not args.no_resume, device=args.device,
          progress=not args.quiet)
    return EXIT_OK


def cmd_zoo_list(args) -> int:
    from model_zoo.zoo import list_cards

    cards = list_cards(args.dataset)
    if not cards:
        print("no zoo cards" + (f" for {args.dataset}" if args.dataset else ""))
        return EXIT_OK
    print(f"{'id':40s} {'variant':7s} {'preset':12s} {'natural':>8s} {'robust':>8s} {'params':>9s}")
    for c in cards:
        print(f"{c['id']:40s} {c['variant']:7s} {c['preset']:12s} {c['natural_accuracy']:8.4f} "
              f"{c['robust_accuracy']:8.4f} {c['num_params']:9d}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="salbench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a zoo model (N, A, G, M1, M2) from a recipe preset",
                       description="Train one zoo entry; checkpoints every epoch and resumes after a crash.")
    t.add_argument("--dataset", required=True, choices=["fmnist", "cifar10", "imagenette"])
    t.add_argument("--variant", required=True, choices=["N", "A", "G", "M1", "M2"])
    t.add_argument("--preset", default="paper", help="recipe preset (see model_zoo/recipes.py)")
    t.add_argument("--placement", type=int, default=None, help="SmoothBlock after stage 1, 2 or 3 (default: recipe)")
    t.add_argument("--work-dir", default="runs", help="epoch checkpoints (resumed from)")
    t.add_argument("--out", default=None, help="zoo folder for weights + card (default: the bundled zoo)")
    t.add_argument("--device", default="cpu")
    t.add_argument("--no-resume", action="store_true", help="start from scratch even if a checkpoint exists")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=cmd_train)

    z = sub.add_parser("zoo", help="inspect the model zoo")
    zsub = z.add_subparsers(dest="zoo_command", required=True)
    zl = zsub.add_parser("list", help="list zoo cards with their accuracies")
    zl.add_argument("--dataset", default=None)
    zl.set_defaults(func=cmd_zoo_list)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _threads(args.threads)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"salbench: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
