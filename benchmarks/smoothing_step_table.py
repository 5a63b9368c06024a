"""Cost of a SmoothBlock per adversarial training step, old path vs new path.

One adversarial training step as ``model_zoo.training.train`` runs it: eval mode, ``pgd_linf``
(random start; FMNIST LeNet batch 32: ε 0.1, α 0.01, 40 steps; CIFAR ResNet-8 batch 128: ε 8/255,
α 2.5/255, 5 steps, the ``cpu-resnet8`` preset), train mode, forward, cross-entropy, backward,
optimizer step (the recipe's: Adam 1e-4 / SGD 0.1 nesterov). Variants A (no SmoothBlock), G
(Gaussian), M1 (mean), M2 (median), each timed with the new ``SmoothBlock.forward`` and with the
pre-3315f5e formula ``x + mix(smooth_reference(x))`` (``reference_forward`` below, patched onto
the class). Inputs are uniform random images with random labels (the cost does not depend on the
pixel values), models freshly initialised with seed 0.

Runs are interleaved: every round times each (variant, path) once, in an order rotated from
round to round, so a change of the machine's background load hits all of them alike. A
variant's ratio is the median over rounds of ``t(variant, path) / t(A)`` with ``t(A)`` the mean of
the round's two A timings. Single-threaded (``torch.set_num_threads(1)``).

Run::

    .venv/bin/python benchmarks/smoothing_step_table.py --write-doc

prints the markdown table and, with ``--write-doc``, writes it into the "step-table" section of
``docs/performance/smoothblock.md`` with how it was measured.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from salbench.model_zoo.architectures import build
from salbench.model_zoo.attacks import pgd_linf
from salbench.model_zoo import native
from salbench.model_zoo.smoothing import SmoothBlock

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "performance" / "smoothblock.md"
NEW_FORWARD = SmoothBlock.forward
VARIANTS = {"A": None, "G": "gaussian", "M1": "mean", "M2": "median"}
PATHS = ("reference", "new")
# the old path's numbers as the performance issue reported them (ratio to A per adversarial step)
ISSUE_OLD = {"lenet": {"G": 1.16, "M1": 1.16, "M2": 2.91}, "resnet8": {"G": 1.41, "M1": 1.36, "M2": 5.28}}


def reference_forward(self: SmoothBlock, x: torch.Tensor) -> torch.Tensor:
    """``SmoothBlock.forward`` before 3315f5e: reflect pad + depthwise conv / unfold + sort, 1x1 conv."""
    return x + self.mix(self.smooth_reference(x))


@contextlib.contextmanager
def smoothing_path(path: str):
    """Run SmoothBlocks with the ``"new"`` forward or the ``"reference"`` (old) one."""
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; expected one of {PATHS}")
    SmoothBlock.forward = NEW_FORWARD if path == "new" else reference_forward
    try:
        yield
    finally:
        SmoothBlock.forward = NEW_FORWARD


@dataclass(frozen=True)
class Setup:
    arch: str
    dataset: str
    batch: int
    shape: tuple[int, int, int]
    attack: dict
    optimizer: str
    label: str = ""


SETUPS = {
    "lenet": Setup("lenet", "fmnist", 32, (1, 28, 28), dict(eps=0.1, alpha=0.01, steps=40), "adam",
                   "FMNIST LeNet, batch 32, PGD ε 0.1 α 0.01 40 steps"),
    "resnet8": Setup("resnet8", "cifar10", 128, (3, 32, 32), dict(eps=8 / 255, alpha=2.5 / 255, steps=5), "sgd",
                     "CIFAR-10 ResNet-8, batch 128, PGD ε 8/255 α 2.5/255 5 steps"),
}


def make_model(setup: Setup, variant: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    f = VARIANTS[variant]
    return build(setup.arch, num_classes=10, dataset=setup.dataset,
                 smoothing=None if f is None else {"filter": f, "placement": 1})


def make_batch(setup: Setup, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(setup.batch, *setup.shape, generator=g), torch.randint(0, 10, (setup.batch,), generator=g)


def make_optimizer(setup: Setup, model: torch.nn.Module) -> torch.optim.Optimizer:
    if setup.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=1e-4)
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)


def step_function(setup: Setup):
    """``step_fn(model, opt, x, y, gen)`` for :func:`measure`: one adversarial training step of ``setup``."""
    return lambda model, opt, x, y, gen: adversarial_step(model, opt, x, y, setup.attack, gen)


def adversarial_step(model, opt, x, y, attack: dict, gen: torch.Generator) -> float:
    """One step of ``model_zoo.training.train`` for an adversarial recipe; returns the loss."""
    model.eval()
    xa = pgd_linf(model, x, y, generator=gen, **attack)
    model.train()
    loss = F.cross_entropy(model(xa), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


@dataclass
class Timings:
    times: dict = field(default_factory=dict)  # (variant, path) -> [seconds per round]
    ratios: dict = field(default_factory=dict)  # (variant, path) -> [t / t(A) per round]

    def median(self, key) -> float:
        return statistics.median(self.times[key])

    def ratio(self, key) -> float:
        return statistics.median(self.ratios[key])

    def ratio_iqr(self, key) -> tuple[float, float]:
        q = statistics.quantiles(self.ratios[key], n=4)
        return q[0], q[2]


def measure(setup: Setup, step_fn, *, rounds: int | None = None, budget_s: float = 120.0, min_rounds: int = 5,
            max_rounds: int = 200, warmup: int = 1, variants=tuple(VARIANTS), paths=PATHS, log=print) -> Timings:
    """Interleaved timing of ``step_fn(model, opt, x, y, gen)`` for every (variant, path).

    Rounds continue until ``rounds`` (if given) or until ``budget_s`` is spent (at least
    ``min_rounds``). Returns every round's times and ratios to A (the mean of A's timings in
    the round, one per path).
    """
    x, y = make_batch(setup)
    models = {v: make_model(setup, v) for v in variants}
    opts = {v: make_optimizer(setup, m) for v, m in models.items()}
    keys = [(v, p) for v in variants for p in paths]
    out = Timings({k: [] for k in keys}, {k: [] for k in keys})
    t_start = time.perf_counter()
    r = -warmup
    while True:
        if rounds is not None and r >= rounds:
            break
        if rounds is None and r >= min_rounds and (time.perf_counter() - t_start > budget_s or r >= max_rounds):
            break
        order = keys[r % len(keys):] + keys[: r % len(keys)] if r >= 0 else keys
        this = {}
        for v, p in order:
            gen = torch.Generator().manual_seed(r)
            with smoothing_path(p):
                t0 = time.perf_counter()
                step_fn(models[v], opts[v], x, y, gen)
                this[(v, p)] = time.perf_counter() - t0
        if r >= 0:
            t_a = statistics.fmean(this[("A", p)] for p in paths) if "A" in variants else 1.0
            for k, t in this.items():
                out.times[k].append(t)
                out.ratios[k].append(t / t_a)
        if log and r >= 0 and (r % 5 == 0):
            log(f"  {setup.arch} round {r}: " + ", ".join(f"{v}/{p[:3]} {this[(v, p)]:.3f}s" for v, p in keys))
        r += 1
    return out


def table(results: dict[str, Timings], rounds_note: dict[str, int]) -> str:
    lines = ["| model | variant | issue, old path (x A) | old path (x A) | new path (x A) | "
             "old step [s] | new step [s] | new speed-up vs old | rounds |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for arch, res in results.items():
        for v in VARIANTS:
            ref, new = (v, "reference"), (v, "new")
            r_ref, r_new = res.ratio(ref), res.ratio(new)
            speedup = statistics.median(a / b for a, b in zip(res.times[ref], res.times[new]))
            issue = ISSUE_OLD[arch].get(v)
            lines.append(
                f"| {SETUPS[arch].label if v == 'A' else ''} | {v} | {'1.00x' if v == 'A' else f'{issue:.2f}x'} | "
                f"{r_ref:.2f}x | {r_new:.2f}x | {res.median(ref):.3f} | {res.median(new):.3f} | "
                f"{speedup:.2f}x | {rounds_note[arch]} |")
    return "\n".join(lines)


def overhead_table(results: dict[str, Timings]) -> str:
    """The SmoothBlock's own share: (ratio - 1) old vs new, with the interquartile range of the ratios."""
    lines = ["| model | variant | old overhead (IQR of ratio) | new overhead (IQR of ratio) | overhead cut |",
             "| --- | --- | --- | --- | --- |"]
    for arch, res in results.items():
        for v in ("G", "M1", "M2"):
            o_ref, o_new = res.ratio((v, "reference")) - 1, res.ratio((v, "new")) - 1
            (a, b), (c, d) = res.ratio_iqr((v, "reference")), res.ratio_iqr((v, "new"))
            cut = f"{(1 - o_new / o_ref) * 100:.0f} %" if o_ref > 0.02 else "n/a (old overhead < 2 %)"
            lines.append(f"| {arch} | {v} | {o_ref * 100:+.0f} % ({a:.2f}-{b:.2f}) | {o_new * 100:+.0f} % "
                         f"({c:.2f}-{d:.2f}) | {cut} |")
    return "\n".join(lines)


def write_section(doc: Path, name: str, body: str) -> None:
    begin, end = f"<!-- BEGIN {name} (generated) -->", f"<!-- END {name} -->"
    text = doc.read_text() if doc.exists() else "# SmoothBlock: speed and equivalence\n"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    ap.add_argument("--budget-lenet", type=float, default=150.0, help="seconds of interleaved rounds (LeNet)")
    ap.add_argument("--budget-resnet8", type=float, default=420.0, help="seconds of interleaved rounds (ResNet-8)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--write-doc", action="store_true")
    ap.add_argument("--context", default="other processes",
                    help="what else ran on the machine, for the doc (e.g. 'a training run on the same core')")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    budgets = {"lenet": args.budget_lenet, "resnet8": args.budget_resnet8}
    load_before = os.getloadavg()
    results, rounds, t0 = {}, {}, time.perf_counter()
    for arch in args.archs:
        setup = SETUPS[arch]
        print(f"{setup.label}: interleaved rounds for {budgets[arch]:.0f} s", flush=True)
        res = measure(setup, step_function(setup),
                      budget_s=budgets[arch], log=lambda s: print(s, flush=True))
        results[arch], rounds[arch] = res, len(res.times[("A", "new")])
    load_after = os.getloadavg()
    md = table(results, rounds)
    oh = overhead_table(results)
    print(md + "\n\n" + oh)
    for arch, res in results.items():
        print(f"{arch}: A(reference)/A(new) median ratio {res.ratio(('A', 'reference')) / res.ratio(('A', 'new')):.3f} "
              "(same model both times: how much noise to expect)")
    if args.write_doc:
        cmd = ".venv/bin/python benchmarks/smoothing_step_table.py --write-doc"
        if args.archs != list(SETUPS):
            cmd += " --archs " + " ".join(args.archs)
        for arch in args.archs:
            if budgets[arch] != ap.get_default(f"budget_{arch}"):
                cmd += f" --budget-{arch} {budgets[arch]:g}"
        a_check = "; ".join(f"{arch}: {res.ratio(('A', 'reference')):.2f}x vs {res.ratio(('A', 'new')):.2f}x"
                            for arch, res in results.items())
        body = (
            "## Cost of a SmoothBlock per adversarial training step\n\n"
            "One adversarial training step of `model_zoo.training.train` (eval, `pgd_linf` with random start, "
            "train, forward, cross-entropy, backward, optimizer step), relative to A (no SmoothBlock) on the "
            "same machine in the same round. *Old path*: `SmoothBlock.forward` as before 3315f5e, "
            "`x + mix(smooth_reference(x))` (reflect pad + depthwise 3x3 conv; median by unfold + sort; "
            "1x1 conv). *New path*: the committed `SmoothBlock.forward` (banded matmuls B_h @ x @ B_w^T; "
            "median by a fused C kernel (`model_zoo/smoothing_kernels.c`, a selection network and the stable-sort "
            f"gradient routing in one pass; this run: {native.status()}); 1x1 mixing as a matmul for maps <= 256 "
            "pixels). "
            "Ratios are medians over interleaved rounds of t(variant) / t(A of the same round); the step "
            "times are medians too.\n\n"
            + md + "\n\n"
            "The SmoothBlock's own share of the step (ratio - 1), with the interquartile range of the "
            "per-round ratios:\n\n" + oh + "\n\n"
            f"How it was measured: `{cmd}` ({time.perf_counter() - t0:.0f} s in all), "
            f"torch {torch.__version__}, Python {platform.python_version()}, "
            f"`torch.set_num_threads({args.threads})`, CPU only, on a 2-core machine shared with "
            f"{args.context} (1-minute load average {load_before[0]:.1f} before, {load_after[0]:.1f} after). Every round times each (variant, path) once in a "
            "rotated order; inputs are uniform random images with random labels, models freshly "
            "initialised (seed 0). A is timed under both paths (the same model, no SmoothBlock) as a "
            f"noise check, ratio to the round's mean A: {a_check}. The \"issue\" column is the old path as "
            "the performance issue reported it (measured separately, not in these rounds).\n"
        )
        write_section(DOC, "step-table", body)
        print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
