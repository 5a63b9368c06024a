"""Key maps: state dicts saved under another library's names -> a registry architecture's names.

One entry per (name, arch). ``torchvision`` maps ``torchvision.models.resnet18(num_classes=K)``'s
state dict onto ``resnet18`` (same layers, same order; torchvision's model expects normalised
input, ours normalises first, so pass the normalisation it was trained with via ``--mean/--std``):

=================================  ======================================
torchvision                        salbench ``resnet18``
=================================  ======================================
``conv1.weight``                   ``stages.0.0.0.weight`` (7x7 stem)
``bn1.*``                          ``stages.0.0.1.*``
``layer1.<b>.<rest>``              ``stages.0.1.<b>.<rest>``
``layer<k>.<b>.<rest>`` (k=2..4)   ``stages.<k-1>.<b>.<rest>``
``...downsample.0|1.*``            ``...shortcut.0|1.*``
``fc.weight``, ``fc.bias``         ``head.2.weight``, ``head.2.bias``
=================================  ======================================
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch


def _torchvision_resnet(key: str) -> str:
    """One torchvision ResNet (BasicBlock) key under our names.

    >>> _torchvision_resnet("layer2.0.downsample.1.running_var")
    'stages.1.0.shortcut.1.running_var'
    >>> _torchvision_resnet("conv1.weight"), _torchvision_resnet("fc.bias")
    ('stages.0.0.0.weight', 'head.2.bias')
    """
    if key.startswith("conv1."):
        return "stages.0.0.0." + key[len("conv1."):]
    if key.startswith("bn1."):
        return "stages.0.0.1." + key[len("bn1."):]
    if key.startswith("fc."):
        return "head.2." + key[len("fc."):]
    m = re.match(r"layer([1-4])\.(\d+)\.(.+)$", key)
    if m:
        layer, block, rest = int(m.group(1)), m.group(2), m.group(3).replace("downsample.", "shortcut.", 1)
        return f"stages.0.1.{block}.{rest}" if layer == 1 else f"stages.{layer - 1}.{block}.{rest}"
    return key


# (map name, registry arch) -> key function
KEY_MAPS: dict[tuple[str, str], Callable[[str], str]] = {
    ("torchvision", "resnet18"): _torchvision_resnet,
}


def key_maps_for(arch: str) -> list[str]:
    """Names of the key maps that target ``arch``."""
    return [name for name, a in KEY_MAPS if a == arch]


def apply_key_map(state_dict: dict[str, torch.Tensor], arch: str, name: str) -> dict[str, torch.Tensor]:
    """``state_dict`` with its keys renamed by the map ``name`` for ``arch``.

    Raises:
        ValueError: no such map for this architecture, or two keys mapping to one.
    """
    fn = KEY_MAPS.get((name, arch))
    if fn is None:
        have = ", ".join(key_maps_for(arch)) or "none"
        raise ValueError(f"no key map {name!r} for architecture {arch!r} (maps for it: {have})")
    out: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        new = fn(k)
        if new in out:
            raise ValueError(f"key map {name!r}: two keys map to {new!r}")
        out[new] = v
    return out
