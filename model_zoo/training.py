"""The zoo's trainer: natural (N), PGD adversarial (A) and A + SmoothBlock (G, M1, M2) training
(PROTOCOL §5), seeded, resumable after a crash, writing a safetensors checkpoint + card.

Every epoch draws its data order, augmentation and PGD random starts from generators seeded
by ``(recipe.seed, epoch)``, so a run resumed from its last epoch checkpoint continues exactly
as an uninterrupted run would (on CPU, bit for bit).
"""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from salbench.model_zoo import zoo
from salbench.model_zoo.architectures import build
from salbench.model_zoo.attacks import natural_accuracy, pgd_linf, robust_accuracy
from salbench.model_zoo.data import NUM_CLASSES, Split, load_split
from salbench.model_zoo.recipes import Recipe

CKPT_NAME = "last.pt"
BEST_NAME = "best.pt"  # weights of the best epoch, for recipes that publish it (Recipe.select)
ROBUST_EVAL_IMAGES = 1000  # PROTOCOL §3: robust accuracy on the first 1000 test images


def model_id_for(recipe: Recipe) -> str:
    """The zoo id of a recipe: ``<dataset>-<arch>-<variant>-<preset>``, then ``-p<k>`` for a
    SmoothBlock placement other than the preset's and ``-s<seed>`` for a training seed other
    than 0 (seed 0 keeps the original ids). A short run (``get_recipe(..., epochs=N)``, ``salbench
    train --epochs N``) has ``-e<N>`` in its preset name, so in its id before any seed suffix.

    >>> from model_zoo.recipes import get_recipe
    >>> model_id_for(get_recipe("fmnist", "paper-10ep", "A", seed=1))
    'fmnist-lenet-A-paper-10ep-s1'
    >>> model_id_for(get_recipe("cifar10", "cpu-resnet8", "G", placement=2))
    'cifar10-resnet8-G-cpu-resnet8-p2'
    """
    mid = f"{recipe.dataset}-{recipe.arch}-{recipe.variant}-{recipe.preset}"
    if recipe.smoothing_filter is not None and recipe.smoothing_placement != 1:
        mid += f"-p{recipe.smoothing_placement}"
    if recipe.seed:
        mid += f"-s{recipe.seed}"
    return mid


class Lookahead(torch.optim.Optimizer):
    """Lookahead (Zhang et al. 2019) around an inner optimiser; with RAdam this is "Ranger"."""

    def __init__(self, inner: torch.optim.Optimizer, k: int = 6, alpha: float = 0.5) -> None:
        self.inner, self.k, self.alpha = inner, k, alpha
        self.param_groups = inner.param_groups
        self.defaults = inner.defaults
        self.state = inner.state
        self._steps = 0
        self._slow = [[p.detach().clone() for p in g["params"]] for g in self.param_groups]

    def step(self, closure=None):
        loss = self.inner.step(closure)
        self._steps += 1
        if self._steps % self.k == 0:
            with torch.no_grad():
                for g, slow in zip(self.param_groups, self._slow):
                    for p, s in zip(g["params"], slow):
                        s.add_(p - s, alpha=self.alpha)
                        p.copy_(s)
        return loss

    def zero_grad(self, set_to_none: bool = True):
        self.inner.zero_grad(set_to_none)

    def state_dict(self):
        return {"inner": self.inner.state_dict(), "steps": self._steps, "slow": self._slow}

    def load_state_dict(self, sd):
        self.inner.load_state_dict(sd["inner"])
        self._steps = sd["steps"]
        with torch.no_grad():
            for mine, theirs in zip(self._slow, sd["slow"]):
                for s, t in zip(mine, theirs):
                    s.copy_(t)


def make_optimizer(recipe: Recipe, params) -> torch.optim.Optimizer:
    if recipe.optimizer == "adam":
        return torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.nesterov,
                               weight_decay=recipe.weight_decay)
    if recipe.optimizer == "ranger":
        return Lookahead(torch.optim.RAdam(list(params), lr=recipe.lr, weight_decay=recipe.weight_decay))
    raise ValueError(f"unknown optimizer {recipe.optimizer!r}; expected adam, sgd or ranger")


def _augment(x: Tensor, kind: str, gen: torch.Generator) -> Tensor:
    if kind == "none":
        return x
    if kind != "crop_flip":
        raise ValueError(f"unknown augmentation {kind!r}")
    b, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (b,), generator=gen)
    dx = torch.randint(0, 9, (b,), generator=gen)
    flip = torch.rand(b, generator=gen) < 0.5
    rows = (dy[:, None] + torch.arange(h)[None]).to(x.device)
    cols = (dx[:, None] + torch.arange(w)[None]).to(x.device)
    out = padded[torch.arange(b, device=x.device)[:, None, None, None], torch.arange(x.shape[1], device=x.device)[None, :, None, None],
                 rows[:, None, :, None], cols[:, None, None, :]]
    return torch.where(flip.to(x.device)[:, None, None, None], out.flip(-1), out)


def _epoch_gen(seed: int, epoch: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch * 101 + stream)


def _dist() -> tuple[int, int]:
    """(rank, world size) of the initialised torch.distributed group, (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _share(n: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s contiguous share of a global batch of ``n`` (sizes differ by at most 1)."""
    bounds = [(n * r) // world for r in range(world + 1)]
    return slice(bounds[rank], bounds[rank + 1])


def train(
    recipe: Recipe,
    *,
    work_dir: str | Path = "runs",
    out_dir: str | Path | None = None,
    resume: bool = True,
    device: str = "cpu",
    progress: bool = True,
    train_split: Split | None = None,
    test_split: Split | None = None,
    stop_after_epoch: int | None = None,
) -> dict | None:
    """Train ``recipe``; checkpoint every epoch to ``work_dir/<id>/last.pt``; at the end write
    ``<out_dir>/checkpoints/<id>-<sha8>.safetensors`` and ``<out_dir>/cards/<id>.json`` atomically.

    Args:
        recipe: what to train (see ``model_zoo.recipes.get_recipe``).
        work_dir: where epoch checkpoints live (resumed from when ``resume``).
        out_dir: the zoo folder receiving weights + card (default: the package's zoo).
        stop_after_epoch: stop (without publishing) after this epoch; for tests of resume.

    Under torch.distributed (``torchrun ... salbench train`` or ``salbench --procs K train``) with K > 1
    processes: DistributedDataParallel, each global batch of ``recipe.batch_size`` (the same seeded
    order, augmentation and PGD random starts as one process) split into K contiguous shares of
    batch/K (an error if K does not divide the batch), PGD on each rank's share, the loss scaled so
    that the averaged gradient is the global batch's mean; SyncBatchNorm for architectures with
    BatchNorm. Rank 0 alone writes epoch checkpoints, the weights and the card (which records
    ``world_size``); every rank resumes from the same checkpoint. The weights equal a one-process run
    up to the order of float reductions.

    Returns:
        The card written, or None when stopped early (and on ranks other than 0).
    """
    rank, world = _dist()
    if world > 1 and recipe.batch_size % world:
        raise ValueError(f"the recipe's batch size {recipe.batch_size} is not divisible by the {world} processes")
    if rank:
        progress = False
    mid = model_id_for(recipe)
    run_dir = Path(work_dir) / mid
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / CKPT_NAME
    train_split = train_split or load_split(recipe.dataset, "train")
    test_split = test_split or load_split(recipe.dataset, "test")
    x_all, y_all = train_split.images, train_split.labels
    if recipe.train_subset:
        x_all, y_all = x_all[: recipe.train_subset], y_all[: recipe.train_subset]
    n = len(y_all)
    if recipe.permute_labels:  # the data-randomisation control: same images, labels shuffled among them
        y_all = y_all[torch.randperm(n, generator=torch.Generator().manual_seed(1_000_003 + recipe.seed))]

    torch.manual_seed(recipe.seed)
    model = build(recipe.arch, num_classes=NUM_CLASSES[recipe.dataset], dataset=recipe.dataset,
                  smoothing=recipe.smoothing).to(device)
    net = model  # what the training step calls: the model itself, or its DDP wrapper
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # same state-dict keys
        dev = torch.device(device)
        net = DDP(model, device_ids=[dev.index if dev.index is not None else torch.cuda.current_device()]
                  if dev.type == "cuda" else None)
    opt = make_optimizer(recipe, model.parameters())
    base_opt = opt.inner if isinstance(opt, Lookahead) else opt
    sched = torch.optim.lr_scheduler.MultiStepLR(base_opt, milestones=list(recipe.lr_milestones), gamma=recipe.lr_gamma)
    start_epoch, history = 0, []
    best = None  # {"epoch", "test_acc"} of the best epoch so far (recipe.select == "best_val")
    if recipe.select not in ("last", "best_val"):
        raise ValueError(f"unknown checkpoint selection {recipe.select!r}; expected 'last' or 'best_val'")
    if resume and ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        if Recipe.from_dict(state["recipe"]) != recipe:  # fields added later take their defaults
            raise ValueError(f"{ckpt_path} was written by a different recipe; delete it or use --no-resume")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"].cpu())
        start_epoch, history = state["epoch"], state["history"]
        best = state.get("best")
        if progress:
            print(f"[{mid}] resumed after epoch {start_epoch}")

    for epoch in range(start_epoch, recipe.epochs):
        model.train()
        order = torch.randperm(n, generator=_epoch_gen(recipe.seed, epoch, 0))
        aug_gen = _epoch_gen(recipe.seed, epoch, 1)
        atk_gen = torch.Generator(device=device).manual_seed(_epoch_gen(recipe.seed, epoch, 2).initial_seed())
        tot_loss = tot_correct = seen = 0
        t0 = time.time()
        bar = tqdm(range(0, n, recipe.batch_size), desc=f"{mid} ep {epoch + 1}/{recipe.epochs}",
                   disable=not progress, leave=False, mininterval=2.0)
        for i in bar:
            idx = order[i : i + recipe.batch_size]
            x = _augment(x_all[idx].to(device).float().div_(255), recipe.augment, aug_gen)
            y = y_all[idx].to(device)
            if world > 1:  # this rank's share of the global batch; the random starts drawn for all of it
                sh = _share(len(idx), rank, world)
                start = None
                if recipe.adversarial and recipe.attack_eps > 0:
                    noise = torch.rand(x.shape, generator=atk_gen, device=x.device, dtype=x.dtype)
                    start = (x + (2 * noise - 1) * recipe.attack_eps).clamp_(0, 1)[sh]
                x, y = x[sh], y[sh]
                if recipe.adversarial:
                    model.eval()
                    x = pgd_linf(model, x, y, eps=recipe.attack_eps, alpha=recipe.attack_alpha,
                                 steps=recipe.attack_steps, generator=atk_gen, start=start)
                    model.train()
                logits = net(x)
                ce_sum = F.cross_entropy(logits, y, reduction="sum")
                loss = ce_sum * (world / len(idx))  # DDP averages over ranks: the global batch's mean
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                tot_loss += float(ce_sum.detach())
                tot_correct += int((logits.argmax(1) == y).sum())
                seen += len(y)
                continue
            if recipe.adversarial:
                model.eval()
                x = pgd_linf(model, x, y, eps=recipe.attack_eps, alpha=recipe.attack_alpha,
                             steps=recipe.attack_steps, generator=atk_gen)
                model.train()
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot_loss += float(loss.detach()) * len(y)
            tot_correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            bar.set_postfix(loss=f"{tot_loss / seen:.4f}", acc=f"{tot_correct / seen:.3f}", refresh=False)
        if world > 1:  # the epoch's statistics over every rank's shares (each rank computed the same test_acc)
            import torch.distributed as dist

            stats = [None] * world
            dist.all_gather_object(stats, (tot_loss, tot_correct, seen))
            tot_loss, tot_correct, seen = (sum(v) for v in zip(*stats))
        test_acc = natural_accuracy(model, test_split.images, test_split.labels)
        history.append({"epoch": epoch + 1, "train_loss": tot_loss / seen, "train_acc": tot_correct / seen,
                        "test_acc": test_acc, "seconds": round(time.time() - t0, 1)})
        if progress:
            h = history[-1]
            print(f"[{mid}] epoch {h['epoch']}/{recipe.epochs} loss {h['train_loss']:.4f} "
                  f"train acc {h['train_acc']:.4f} test acc {h['test_acc']:.4f} ({h['seconds']} s)", flush=True)
        if recipe.select == "best_val" and (best is None or test_acc > best["test_acc"]):
            best = {"epoch": epoch + 1, "test_acc": test_acc}
            if rank == 0:
                tmp = (run_dir / BEST_NAME).with_suffix(".tmp")
                torch.save(model.state_dict(), tmp)
                tmp.replace(run_dir / BEST_NAME)
        state = {"epoch": epoch + 1, "model": model.state_dict(), "optimizer": opt.state_dict(),
                 "scheduler": sched.state_dict(), "history": history, "recipe": recipe.to_dict(),
                 "torch_rng": torch.get_rng_state(), "best": best}
        if rank == 0:
            tmp = ckpt_path.with_suffix(".tmp")
            torch.save(state, tmp)
            tmp.replace(ckpt_path)
        if world > 1:
            torch.distributed.barrier()  # every rank past the epoch once its checkpoint is on disk
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and epoch + 1 < recipe.epochs:
            return None

    if rank:
        return None  # rank 0 publishes
    if recipe.select == "best_val" and best is not None:
        model.load_state_dict(torch.load(run_dir / BEST_NAME, map_location=device, weights_only=True))
        if progress:
            print(f"[{mid}] publishing epoch {best['epoch']} (best held-out accuracy {best['test_acc']:.4f})")
    return publish(model, recipe, history, out_dir=out_dir, test_split=test_split, progress=progress,
                   selected_epoch=best["epoch"] if best is not None else len(history), world_size=world)


def publish(model: nn.Module, recipe: Recipe, history: list, *, out_dir=None, test_split: Split,
            progress: bool = True, selected_epoch: int | None = None, world_size: int = 1) -> dict:
    """Measure natural (full test split) and robust (first 1000 test images) accuracy and write
    the weights + card atomically (PROTOCOL §3 "Accuracy")."""
    mid = model_id_for(recipe)
    out = Path(out_dir) if out_dir is not None else zoo.zoo_dir()
    model.eval()
    nat = natural_accuracy(model, test_split.images, test_split.labels)
    m = min(ROBUST_EVAL_IMAGES, len(test_split))
    rob = robust_accuracy(model, test_split.images[:m], test_split.labels[:m], eps=recipe.eval_eps,
                          alpha=recipe.eval_alpha, steps=recipe.eval_steps, progress=progress)
    payload = zoo.state_dict_bytes(model)
    digest = hashlib.sha256(payload).hexdigest()
    fname = f"{mid}-{digest[:8]}.safetensors"
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    for old in (out / "checkpoints").glob(f"{mid}-*.safetensors"):
        # only this id's previous weights (another preset's id may share the prefix)
        if old.name != fname and re.fullmatch(re.escape(mid) + r"-[0-9a-f]{8}\.safetensors", old.name):
            old.unlink()
    zoo.atomic_write_bytes(out / "checkpoints" / fname, payload)
    card = zoo.make_card(
        model_id=mid, model=model, weights_file=fname, sha256=digest, dataset=recipe.dataset, arch=recipe.arch,
        variant=recipe.variant, preset=recipe.preset, recipe=recipe.to_dict(), smoothing=recipe.smoothing,
        natural_accuracy=nat, robust_accuracy=rob, num_classes=NUM_CLASSES[recipe.dataset],
        robust_protocol={"attack": "pgd_linf", "eps": recipe.eval_eps, "alpha": recipe.eval_alpha,
                         "steps": recipe.eval_steps, "random_start": True, "images": f"first {m} test images",
                         "seed": 0},
        extra={"history": history, **({"selected_epoch": selected_epoch} if recipe.select != "last" else {}),
               **({"world_size": world_size} if world_size > 1 else {})},
    )
    zoo.atomic_write_json(out / "cards" / f"{mid}.json", card)
    if progress:
        print(f"[{mid}] natural acc {nat:.4f}, robust acc {rob:.4f} -> {out / 'cards' / (mid + '.json')}")
    return card
