"""Robust accuracy under AutoAttack, standard version, L∞ (Croce & Hein 2020), from
torchattacks' components (PROTOCOL §3 "Accuracy", AutoAttack row).

torchattacks 3.5.1's ``AutoAttack(version="standard")`` does NOT run the standard version: it
builds APGD, APGD-T and FAB without a ``steps`` argument, so they run their default 10
iterations instead of the reference's 100 (read in ``torchattacks/attacks/autoattack.py``,
``apgd.py``, ``apgdt.py``, ``fab.py`` of 3.5.1). :func:`standard_autoattack` assembles the
reference's standard L∞ ensemble from the same components with the reference settings
(fra31/auto-attack ``autoattack.py``, ``version='standard'``):

- APGD-CE: 100 iterations, 1 restart, rho 0.75;
- APGD-T (targeted DLR loss): 100 iterations, 1 restart, the 9 top non-true classes;
- FAB-T: 100 iterations, 1 restart, 9 target classes;
- Square: 5000 queries, 1 restart, p_init 0.8;

each later attack run only on the images every earlier one failed on (torchattacks'
``MultiAttack``). Robust accuracy = the fraction of images still classified correctly.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

STANDARD = {"apgd_ce_steps": 100, "apgd_t_steps": 100, "fab_t_steps": 100, "square_queries": 5000,
            "restarts": 1, "target_classes": 9}


def standard_autoattack(model: nn.Module, *, eps: float, n_classes: int, seed: int = 0, steps: int | None = None,
                        queries: int | None = None):
    """The standard L∞ AutoAttack ensemble (see the module docstring). ``steps`` / ``queries``
    override the iteration / query counts (tests only: a scaled-down attack is not AutoAttack)."""
    try:
        from torchattacks import APGD, APGDT, FAB, MultiAttack, Square
    except ImportError as e:  # pragma: no cover - a core dependency
        raise ImportError("AutoAttack needs torchattacks: pip install 'torchattacks==3.5.1'") from e
    if n_classes < 2:
        raise ValueError(f"AutoAttack needs at least 2 classes, got {n_classes}")
    s = steps or STANDARD["apgd_ce_steps"]
    targets = min(STANDARD["target_classes"], n_classes - 1)
    apgd = APGD(model, norm="Linf", eps=eps, steps=s, n_restarts=1, seed=seed, loss="ce", rho=0.75)
    apgdt = APGDT(model, norm="Linf", eps=eps, steps=s, n_restarts=1, seed=seed, n_classes=targets + 1, rho=0.75)
    fab = FAB(model, norm="Linf", eps=eps, steps=s, n_restarts=1, seed=seed, multi_targeted=True,
              n_classes=targets + 1)
    square = Square(model, norm="Linf", eps=eps, n_queries=queries or STANDARD["square_queries"], n_restarts=1,
                    p_init=0.8, seed=seed)
    return MultiAttack([apgd, apgdt, fab, square])


#: Images per attack batch: 500 FMNIST images (the zoo's FMNIST cards were attacked so), 127 CIFAR-10
#: ones. One thread, per image, ResNet-8 (CIFAR-10): fwd+bwd 1.34 ms at batch 128 vs 3.40 ms at
#: 1024, forward 0.58 ms at 128 vs 1.23 ms at 512 (interleaved sweep; the activations of large
#: batches fall out of cache); the LeNet is flat up to ~500.
BATCH_ELEMENTS = 500 * 28 * 28


def default_batch_size(x: Tensor) -> int:
    return max(1, BATCH_ELEMENTS // max(1, x[0].numel()))


def autoattack_accuracy(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, n_classes: int, seed: int = 0,
                        batch_size: int | None = None, progress: bool = False, steps: int | None = None,
                        queries: int | None = None) -> float:
    """Robust accuracy of ``model`` on (x, y) under standard L∞ AutoAttack of radius ``eps``.

    Args:
        x: (N, C, H, W) uint8 or float in [0, 1]; y: (N,) true labels.

    Returns:
        the fraction of images whose adversarial version is still classified correctly.

    Raises:
        ValueError: on an empty batch, a label/batch mismatch or a negative radius.
    """
    if x.ndim != 4 or len(x) != len(y) or len(x) == 0:
        raise ValueError(f"expected images (N, C, H, W) and labels (N,), got {tuple(x.shape)} and {tuple(y.shape)}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if batch_size is None:
        batch_size = default_batch_size(x)
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    attack = standard_autoattack(model, eps=eps, n_classes=n_classes, seed=seed, steps=steps, queries=queries)
    correct = 0
    try:
        for i in tqdm(range(0, len(x), batch_size), desc="AutoAttack", disable=not progress, leave=False):
            xb = x[i : i + batch_size].to(device)
            xb = xb.float().div(255) if xb.dtype == torch.uint8 else xb.float()
            yb = y[i : i + batch_size].to(device)
            adv = attack(xb, yb).detach()
            if float((adv - xb).abs().max()) > eps + 1e-5 or adv.min() < 0 or adv.max() > 1:
                raise RuntimeError("AutoAttack returned images outside the ε-ball or [0, 1]")
            with torch.no_grad():
                correct += int((model(adv).argmax(1) == yb).sum())
    finally:
        model.train(was_training)
    return correct / len(x)


def autoattack_card_entry(model: nn.Module, test_x: Tensor, test_y: Tensor, *, eps: float, n_classes: int,
                          pgd_robust_accuracy: float | None = None, images: int = 1000, seed: int = 0,
                          progress: bool = True) -> dict:
    """The card's ``autoattack`` block: AutoAttack robust accuracy on the first ``images`` test
    images, its settings, and the PGD-minus-AutoAttack gap (a large gap flags gradient masking
    or a weak PGD)."""
    import torchattacks

    m = min(images, len(test_x))
    acc = autoattack_accuracy(model, test_x[:m], test_y[:m], eps=eps, n_classes=n_classes, seed=seed,
                              progress=progress)
    entry = {"robust_accuracy": round(acc, 6), "eps": eps, "norm": "Linf", "version": "standard",
             "settings": dict(STANDARD), "images": f"first {m} test images", "seed": seed,
             "batch_size": default_batch_size(test_x),
             "implementation": f"torchattacks {torchattacks.__version__} components (salbench.model_zoo.autoattack)"}
    if pgd_robust_accuracy is not None:
        entry["pgd_minus_autoattack"] = round(pgd_robust_accuracy - acc, 6)
    return entry
