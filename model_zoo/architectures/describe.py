"""What a submitter needs to know about each registered architecture: input size, datasets and the
state-dict keys its weights must have (``salbench zoo archs``)."""

from __future__ import annotations

import re
from collections import OrderedDict

from salbench.model_zoo.architectures.registry import arch_spec, build, list_archs


def expected_state_dict(arch: str, dataset: str | None = None, smoothing: dict | None = None):
    """The state dict (names -> tensors) a submitted checkpoint of ``arch`` must match."""
    spec = arch_spec(arch)
    return build(arch, dataset=dataset or spec.datasets[0], smoothing=smoothing).state_dict()


def abbreviate_keys(keys: list[str]) -> list[str]:
    """Key names grouped into patterns: the parameters of one module in braces, and modules that
    differ only in numeric indices (blocks, stages) merged with the indices in braces.

    >>> abbreviate_keys(["a.0.conv.weight", "a.0.conv.bias", "a.1.conv.weight", "a.1.conv.bias", "fc.weight"])
    ['a.{0,1}.conv.{weight,bias}', 'fc.weight']
    >>> abbreviate_keys(["s.0.0.w", "s.0.3.w", "s.1.0.w", "s.1.3.w", "s.1.6.w"])  # never a key that is not there
    ['s.0.{0,3}.w', 's.1.{0,3,6}.w']
    """
    modules: OrderedDict[str, list[str]] = OrderedDict()
    for k in keys:
        mod, _, leaf = k.rpartition(".")
        modules.setdefault(mod, []).append(leaf)
    groups: OrderedDict[tuple, list[list[str]]] = OrderedDict()
    for mod, leaves in modules.items():
        parts = mod.split(".") if mod else []
        template = tuple("#" if re.fullmatch(r"\d+", p) else p for p in parts)
        groups.setdefault((template, tuple(leaves)), []).append(parts)
    out = []
    for (template, leaves), members in groups.items():
        leaf = leaves[0] if len(leaves) == 1 else "{" + ",".join(leaves) + "}"
        for shown in _patterns(template, members):
            out.append(".".join([*shown, leaf]) if shown else leaf)
    return out


def _patterns(template: tuple[str, ...], members: list[list[str]]) -> list[list[str]]:
    """Module paths of one template as brace patterns, each pattern exactly the members it stands
    for (a cartesian product of its index sets; otherwise split, e.g. VGG stages of 2 and 3 convs)."""
    wild = [i for i, p in enumerate(template) if p == "#"]
    values = {i: sorted({int(m[i]) for m in members}, key=int) for i in wild}
    size = 1
    for i in wild:
        size *= len(values[i])
    if size == len({tuple(m) for m in members}):
        return [[p if p != "#" else (str(values[i][0]) if len(values[i]) == 1
                                     else "{" + ",".join(map(str, values[i])) + "}")
                 for i, p in enumerate(template)]]
    last = wild[-1]
    lasts: OrderedDict[tuple, set] = OrderedDict()
    for m in members:
        lasts.setdefault(tuple(m[i] for i in wild if i != last), set()).add(m[last])
    buckets: OrderedDict[frozenset, list] = OrderedDict()
    for m in members:
        buckets.setdefault(frozenset(lasts[tuple(m[i] for i in wild if i != last)]), []).append(m)
    if len(buckets) == 1:  # split by the first index instead
        first = wild[0]
        buckets = OrderedDict()
        for m in members:
            buckets.setdefault(frozenset([m[first]]), []).append(m)
    return [pat for group in buckets.values() for pat in _patterns(template, group)]


def describe(arch: str, *, keys: bool = False) -> str:
    """A few lines on ``arch``: input size, datasets, parameter count, the key maps that target it,
    and its state-dict keys (abbreviated; every key with its shape when ``keys``)."""
    from salbench.model_zoo.keymaps import key_maps_for

    spec = arch_spec(arch)
    sd = expected_state_dict(arch)
    n = sum(v.numel() for k, v in sd.items() if v.is_floating_point() and "running_" not in k)
    maps = key_maps_for(arch)
    head = (f"{arch}: {spec.input_size}x{spec.input_size} input, datasets {', '.join(spec.datasets)}, "
            f"{len(sd)} state-dict keys, {n:,} weights" + (f"; key maps: {', '.join(maps)}" if maps else ""))
    if keys:
        body = [f"  {k} {tuple(v.shape)}" for k, v in sd.items()]
    else:
        body = [f"  {k}" for k in abbreviate_keys(list(sd))]
    return "\n".join([head, *body])


def describe_all(*, keys_for: str | None = None) -> str:
    """Every architecture (``describe``), with full keys for ``keys_for``; then the notes that apply
    to all and the ``exported`` format."""
    names = [keys_for] if keys_for else list_archs()
    parts = [describe(a, keys=bool(keys_for)) for a in names]
    parts.append("Every registry model takes [0, 1] images and normalises them in its first layer (the dataset's "
                 "mean/std, or --mean/--std on `salbench score`); the normalisation is not in the state dict. "
                 "A SmoothBlock (--smoothing FILTER:PLACEMENT) adds smooth.* keys.\n"
                 "exported: any architecture, as a torch.export .pt2 program with a dynamic batch dimension and its "
                 "normalisation inside (README, 'Submit a model').")
    return "\n\n".join(parts)
