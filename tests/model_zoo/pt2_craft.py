"""Build ``.pt2`` files for tests: real exports, and hostile variants edited member by member."""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn


class PlainLeNet(nn.Module):
    """A plain-PyTorch LeNet (not a registry architecture: its own key names) with its
    normalisation inside, as a newcomer would write it."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.2860]).view(1, 1, 1, 1))
        self.register_buffer("std", torch.tensor([0.3530]).view(1, 1, 1, 1))
        self.conv1, self.conv2 = nn.Conv2d(1, 6, 5), nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2, self.fc3 = nn.Linear(256, 120), nn.Linear(120, 84), nn.Linear(84, 10)

    def forward(self, x):
        x = (x - self.mean) / self.std
        x = torch.relu(nn.functional.max_pool2d(self.conv1(x), 2))
        x = torch.relu(nn.functional.max_pool2d(self.conv2(x), 2))
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x.flatten(1))))))


def export_to(model: nn.Module, path: Path, shape=(1, 28, 28), dynamic: bool = True) -> Path:
    x = torch.rand(2, *shape)
    dyn = ({0: torch.export.Dim("batch")},) if dynamic else None
    torch.export.save(torch.export.export(model, (x,), dynamic_shapes=dyn), str(path))
    return path


def members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {i.filename: z.read(i) for i in z.infolist()}


def rewrite(src: Path, dst: Path, *, graph: Callable[[dict], None] | None = None,
            weights_config: Callable[[dict], None] | None = None,
            constants_config: Callable[[dict], None] | None = None,
            replace: dict[str, bytes] | None = None) -> Path:
    """Copy ``src`` to ``dst`` with ``models/model.json`` / the configs edited by the callables and
    members (names relative to the archive root) replaced or added."""
    old = members(src)
    root = next(iter(old)).split("/", 1)[0] + "/"
    out = {k[len(root):]: v for k, v in old.items()}
    for name, fn in (("models/model.json", graph), ("data/weights/model_weights_config.json", weights_config),
                     ("data/constants/model_constants_config.json", constants_config)):
        if fn is not None:
            doc = json.loads(out[name])
            fn(doc)
            out[name] = json.dumps(doc).encode()
    out.update(replace or {})
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as z:
        for name, data in out.items():
            z.writestr(root + name, data)
    return dst


class Payload:
    """Unpickling this runs ``touch <marker>`` (what a hostile file would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def pickled_payload(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save({"w": Payload(marker)}, buf)
    return buf.getvalue()


def nodes(doc: dict) -> list[dict]:
    return doc["graph_module"]["graph"]["nodes"]
