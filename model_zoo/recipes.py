"""Training recipes as data (PROTOCOL §5).

A *preset* fixes the architecture and the hyper-parameters of the natural (N) and the
adversarial (A) recipe of one dataset; G, M1 and M2 are A plus a SmoothBlock. Scaled-down
presets are named as such and the name travels onto every card and leaderboard row.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from salbench.model_zoo.datasets import get_spec

VARIANTS = ("N", "A", "G", "M1", "M2")
# variant -> SmoothBlock filter (None: no SmoothBlock)
VARIANT_FILTER = {"N": None, "A": None, "G": "gaussian", "M1": "mean", "M2": "median"}


@dataclass(frozen=True)
class Recipe:
    """Everything a training run depends on. ``asdict(recipe)`` is stored on the card."""

    dataset: str
    arch: str
    preset: str
    variant: str
    optimizer: str  # "adam" | "sgd" | "ranger"
    lr: float
    batch_size: int
    epochs: int
    weight_decay: float = 0.0
    momentum: float = 0.0
    nesterov: bool = False
    lr_milestones: tuple[int, ...] = ()  # in optimiser steps; lr *= lr_gamma at each
    lr_gamma: float = 0.1
    augment: str = "none"  # "none" | "crop_flip" (CIFAR: 4-px pad random crop + h-flip)
    attack_eps: float = 0.0  # 0: natural training
    attack_alpha: float = 0.0
    attack_steps: int = 0
    smoothing_filter: str | None = None
    smoothing_placement: int = 1
    train_subset: int | None = None  # first n training images (tests / tiny presets only)
    # the data-randomisation control (Adebayo et al. 2018; PROTOCOL §9.2): the training labels
    # permuted by a generator seeded with the recipe's seed; such a model is a control, never scored
    permute_labels: bool = False
    seed: int = 0
    # which epoch is published: "last", or "best_val" (the epoch with the best accuracy on the
    # held-out split; PROTOCOL §5 ImageNette: "best val checkpoint")
    select: str = "last"
    # robust-accuracy protocol of the dataset (PROTOCOL §3)
    eval_eps: float = 0.0
    eval_alpha: float = 0.0
    eval_steps: int = 0
    notes: str = ""

    @property
    def adversarial(self) -> bool:
        return self.attack_steps > 0

    @property
    def smoothing(self) -> dict | None:
        if self.smoothing_filter is None:
            return None
        return {"filter": self.smoothing_filter, "placement": self.smoothing_placement}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lr_milestones"] = list(self.lr_milestones)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        d = dict(d)
        d["lr_milestones"] = tuple(d.get("lr_milestones", ()))
        return cls(**d)


@dataclass(frozen=True)
class Preset:
    dataset: str
    name: str
    natural: Recipe
    adversarial: Recipe
    description: str = ""
    scaled_down: bool = False
    extra: dict = field(default_factory=dict)


def _eval(dataset: str) -> dict:
    """The dataset's robust-accuracy attack (its spec, PROTOCOL §3) as recipe fields."""
    r = get_spec(dataset).robust_eval
    return dict(eval_eps=r["eps"], eval_alpha=r["alpha"], eval_steps=r["steps"])


def _preset(dataset, name, arch, natural: dict, adversarial: dict, description, scaled_down=False, common=None):
    common = {**(common or {}), **_eval(dataset)}
    n = Recipe(dataset=dataset, arch=arch, preset=name, variant="N", **common, **natural)
    a = Recipe(dataset=dataset, arch=arch, preset=name, variant="A", **common, **adversarial)
    return Preset(dataset, name, n, a, description, scaled_down)


_FMNIST_N = dict(optimizer="adam", lr=1e-3, batch_size=32, epochs=50)
_FMNIST_A = dict(optimizer="adam", lr=1e-4, batch_size=32, epochs=40, attack_eps=0.1, attack_alpha=0.01, attack_steps=40)
_CIFAR_SGD = dict(optimizer="sgd", momentum=0.9, nesterov=True, weight_decay=5e-4, lr=0.1, batch_size=128,
                  augment="crop_flip")
_CIFAR_PGD = dict(attack_eps=8 / 255, attack_alpha=2 / 255, attack_steps=7)

PRESETS: dict[tuple[str, str], Preset] = {
    p.dataset + "/" + p.name: p
    for p in [
        _preset("fmnist", "paper", "lenet", _FMNIST_N, _FMNIST_A, "PROTOCOL §5 FMNIST recipe, the authors' LeNet"),
        _preset("fmnist", "paper-10ep", "lenet", _FMNIST_N, {**_FMNIST_A, "epochs": 10},
                "the paper recipe with 10 PGD-40 epochs for A/G/M1/M2 (CPU budget); N unchanged", True),
        _preset("fmnist", "tiny", "lenet", {**_FMNIST_N, "epochs": 2, "train_subset": 256},
                {**_FMNIST_A, "epochs": 2, "attack_steps": 3, "train_subset": 256},
                "a seconds-long recipe for tests; not a benchmark model", True),
        _preset("cifar10", "paper", "wrn28_10",
                {**_CIFAR_SGD, "epochs": 180, "lr_milestones": (40_000, 50_000)},
                {**_CIFAR_SGD, **_CIFAR_PGD, "epochs": 180, "lr_milestones": (40_000, 50_000)},
                "PROTOCOL §5 CIFAR-10 recipe: WRN-28-10, 70k steps (= 180 epochs at batch 128), GPU scale"),
        _preset("cifar10", "cpu-resnet8", "resnet8",
                {**_CIFAR_SGD, "epochs": 50, "lr_milestones": (30 * 391, 42 * 391)},
                {**_CIFAR_SGD, **_CIFAR_PGD, "attack_steps": 5, "attack_alpha": 2.5 / 255, "epochs": 8,
                 "lr_milestones": (5 * 391, 7 * 391)},
                "CPU-scale CIFAR-10: ResNet-8; N 50 epochs (~45 min), A/G 8 epochs of PGD-5 training (ε 8/255, ~30 min)", True),
        _preset("imagenette", "paper", "resnet18",
                dict(optimizer="ranger", lr=1e-3, batch_size=64, epochs=200, select="best_val"),
                dict(optimizer="ranger", lr=1e-3, batch_size=64, epochs=200, attack_eps=1 / 255,
                     attack_alpha=2 / 255, attack_steps=20, select="best_val"),
                "PROTOCOL §5 ImageNette recipe: ResNet-18 from scratch, Ranger, GPU scale"),
    ]
}


def list_presets(dataset: str | None = None) -> list[str]:
    return sorted(k for k, p in PRESETS.items() if dataset is None or p.dataset == dataset)


def get_recipe(dataset: str, preset: str, variant: str, *, placement: int | None = None, seed: int = 0,
               epochs: int | None = None, permute_labels: bool = False) -> Recipe:
    """The recipe of (dataset, preset, variant); G/M1/M2 = A + SmoothBlock (PROTOCOL §5).

    ``epochs`` makes a short (or longer) real run of the recipe: when it differs from the preset's
    epochs for this variant, the recipe's preset becomes ``<preset>-e<epochs>``, so the run's id,
    epoch checkpoints and card are its own (``fmnist-lenet-A-paper-10ep-e1``; a seed suffix still
    comes last) and it is never mistaken for, nor overwrites, the preset's full run. The preset's own
    count is the full run (plain id). Learning-rate milestones (in optimiser steps) stay as they are.

    ``permute_labels`` gives the data-randomisation control of the recipe (its training labels
    permuted), preset ``<preset>-randlabels``: a zoo model marked as a control, used by the sanity
    gates and never scored on a board.

    >>> get_recipe("fmnist", "paper", "G").smoothing
    {'filter': 'gaussian', 'placement': 1}
    >>> r = get_recipe("fmnist", "paper-10ep", "A", epochs=1, seed=2)
    >>> r.preset, r.epochs, get_recipe("fmnist", "paper-10ep", "A", epochs=10).preset
    ('paper-10ep-e1', 1, 'paper-10ep')
    """
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        raise ValueError(f"the number of epochs must be an integer >= 1, got {epochs!r}")
    key = f"{dataset}/{preset}"
    if key not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} for {dataset!r}; known: {', '.join(list_presets(dataset))}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"the training seed must be an integer >= 0, got {seed!r}")
    if placement is not None and variant in ("N", "A"):
        raise ValueError(f"--placement applies to SmoothBlock variants (G, M1, M2), not {variant}")
    p = PRESETS[key]
    base = p.natural if variant == "N" else p.adversarial
    recipe = replace(base, variant=variant, smoothing_filter=VARIANT_FILTER[variant],
                     smoothing_placement=placement or base.smoothing_placement, seed=seed)
    if epochs is not None and epochs != base.epochs:
        recipe = replace(recipe, epochs=epochs, preset=f"{preset}-e{epochs}")
    if permute_labels:
        recipe = replace(recipe, permute_labels=True, preset=f"{recipe.preset}-randlabels")
    return recipe


def is_control_card(card: dict) -> bool:
    """Is this zoo card a control model (trained on permuted labels), kept off the boards?"""
    return bool((card.get("recipe") or {}).get("permute_labels"))
