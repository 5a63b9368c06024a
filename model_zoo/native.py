"""Optional native kernels, built on first use with the system C compiler (no torch headers).

The M2 SmoothBlock's 3x3 median (``smoothing_kernels.c``) is a fused C loop: one pass reads the nine
neighbours once and writes the median and the neighbour its gradient goes to, where the pure-torch
path makes ~110 element-wise passes over the map (docs/performance/smoothblock.md). Its results are
bit-identical to the torch path (tests/model_zoo/test_smoothing.py), so a machine without a
compiler gets the same numbers, only slower.

The library is compiled once per source version into ``$SALBENCH_NATIVE_CACHE`` (default
``~/.cache/salbench/native``), written atomically, and loaded with ``ctypes``. Set
``SALBENCH_NATIVE=0`` to force the torch path. If compiling or loading fails, the torch path is
used and :func:`status` says why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

_SOURCE = Path(__file__).with_name("smoothing_kernels.c")
_FLAGS = ["-O3", "-std=c99", "-shared", "-fPIC"]
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_status: str = "not built yet"
_tried = False


def _cache_dir() -> Path:
    env = os.environ.get("SALBENCH_NATIVE_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "salbench" / "native"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _build() -> ctypes.CDLL:
    source = _SOURCE.read_bytes()
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (tried $CC, cc, gcc, clang)")
    key = hashlib.sha256(source + " ".join([cc, *_FLAGS, sys.platform]).encode()).hexdigest()[:16]
    suffix = ".dll" if sys.platform == "win32" else ".so"
    target = _cache_dir() / f"smoothing_kernels-{key}{suffix}"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = Path(tmp) / target.name
            proc = subprocess.run([cc, *_FLAGS, str(_SOURCE), "-o", str(out)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{cc} failed to build {_SOURCE.name}: {proc.stderr.strip()[:500]}")
            os.replace(out, target)  # atomic: a concurrent process sees no library or a whole one
    lib = ctypes.CDLL(str(target))
    i64, p = ctypes.c_int64, ctypes.c_void_p
    lib.median3x3_forward.argtypes = [p, p, p, i64, i64, i64]
    lib.median3x3_forward.restype = ctypes.c_int
    lib.median3x3_backward.argtypes = [p, p, p, i64, i64, i64]
    lib.median3x3_backward.restype = None
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded native library, or ``None`` (disabled, no compiler, build failed)."""
    global _lib, _status, _tried
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            if os.environ.get("SALBENCH_NATIVE", "1") == "0":
                _status = "disabled by SALBENCH_NATIVE=0"
            else:
                try:
                    _lib = _build()
                    _status = "native"
                except Exception as exc:  # any failure falls back to the (equal, slower) torch path
                    _lib, _status = None, f"torch path: {exc}"
            _tried = True
    return _lib


def status() -> str:
    """``"native"`` when the C kernels are in use, else why not."""
    library()
    return _status


def usable(x: Tensor) -> bool:
    """Whether the native median can take this padded map: float32 on CPU, compiler available."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() >= 2 and library() is not None


def median3x3_forward(xp: Tensor, with_which: bool) -> tuple[Tensor, Tensor | None] | None:
    """Median of each 3x3 window of a padded float32 CPU map ``(..., H + 2, W + 2)`` and, when
    asked, the uint8 index (0..8, raster order) of the neighbour a stable sort puts at rank 4.
    ``None`` if the map holds a NaN (the C min/max do not propagate it as torch's do)."""
    lib = library()
    xp = xp.contiguous()
    h, w = xp.shape[-2] - 2, xp.shape[-1] - 2
    planes = xp.numel() // ((h + 2) * (w + 2))
    med = torch.empty(*xp.shape[:-2], h, w, dtype=xp.dtype)
    which = torch.empty(med.shape, dtype=torch.uint8) if with_which else None
    if lib.median3x3_forward(xp.data_ptr(), med.data_ptr(), which.data_ptr() if with_which else None,
                             planes, h, w):
        return None
    return med, which


def median3x3_backward(grad: Tensor, which: Tensor) -> Tensor:
    """Gradient with respect to the padded map: each output gradient routed to its ``which``."""
    lib = library()
    grad = grad.contiguous()
    h, w = which.shape[-2:]
    planes = which.numel() // (h * w)
    gp = torch.empty(*which.shape[:-2], h + 2, w + 2, dtype=grad.dtype)
    lib.median3x3_backward(grad.data_ptr(), which.data_ptr(), gp.data_ptr(), planes, h, w)
    return gp

