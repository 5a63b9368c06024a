"""Optional C kernels, built on first use with the system C compiler (no torch headers), loaded with ctypes.

A :class:`NativeLibrary` names one C source file shipped in the package and the functions it
exports. On first use the source is compiled once per (source, compiler, flags, CPU) into
``$SALBENCH_NATIVE_CACHE`` (default ``~/.cache/salbench/native``), written atomically (a
concurrent process sees no library or a whole one), and loaded. ``-march=native`` tunes it to the
machine it runs on (the CPU is part of the cache key); ``-ffp-contract=off`` keeps the arithmetic
free of fused multiply-adds, so a build on any x86 or ARM CPU computes the same sums. Every caller
keeps a pure-torch path and falls back to it when the library is unavailable: no compiler, a
failed build, ``SALBENCH_NATIVE=0``, or inputs the kernel does not take; :meth:`status` says which.

Used by ``metrics.stability.ssim`` (``ssim_kernel.c``) and by the zoo's median SmoothBlock
(``salbench.model_zoo.native``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

_BASE_FLAGS = ["-O3", "-std=c99", "-shared", "-fPIC", "-ffp-contract=off"]
_TUNE_FLAGS = ["-march=native"]

P, I64, F64, I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int


def cache_dir() -> Path:
    env = os.environ.get("SALBENCH_NATIVE_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "salbench" / "native"


def compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_fingerprint() -> str:
    """What ``-march=native`` depends on: the machine type and, on Linux, the CPU model and flags."""
    parts = [platform.machine(), sys.platform]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    parts.append(line.strip())
                if len(parts) > 6:
                    break
    except OSError:
        pass
    return "\n".join(parts)


class NativeLibrary:
    """One C source compiled on first use; ``functions`` maps each exported name to
    ``(argtypes, restype)``."""

    def __init__(self, source: Path, functions: dict[str, tuple[list, object]]) -> None:
        self.source = Path(source)
        self.functions = functions
        self._lock = threading.Lock()
        self._lib: ctypes.CDLL | None = None
        self._status = "not built yet"
        self._tried = False

    def _compile(self, cc: str, flags: list[str], target: Path) -> str | None:
        """Build into ``target`` atomically; the compiler's error text on failure."""
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = Path(tmp) / target.name
            proc = subprocess.run([cc, *flags, str(self.source), "-o", str(out)], capture_output=True, text=True)
            if proc.returncode != 0:
                return proc.stderr.strip()[:500] or f"exit status {proc.returncode}"
            os.replace(out, target)
        return None

    def _build(self) -> ctypes.CDLL:
        source = self.source.read_bytes()
        cc = compiler()
        if cc is None:
            raise RuntimeError("no C compiler found (tried $CC, cc, gcc, clang)")
        suffix = ".dll" if sys.platform == "win32" else ".so"
        lib = None
        errors = []
        for flags in (_BASE_FLAGS + _TUNE_FLAGS, _BASE_FLAGS):  # untuned if the compiler refuses -march=native
            key = hashlib.sha256(source + "\0".join([cc, *flags, _cpu_fingerprint()]).encode()).hexdigest()[:16]
            target = cache_dir() / f"{self.source.stem}-{key}{suffix}"
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                err = self._compile(cc, flags, target)
                if err is not None:
                    errors.append(f"{cc} {' '.join(flags)}: {err}")
                    continue
            lib = ctypes.CDLL(str(target))
            break
        if lib is None:
            raise RuntimeError(f"could not build {self.source.name}: " + " | ".join(errors))
        for name, (argtypes, restype) in self.functions.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, restype
        return lib

    def library(self) -> ctypes.CDLL | None:
        """The loaded library, or ``None`` (disabled, no compiler, build failed)."""
        if self._tried:
            return self._lib
        with self._lock:
            if not self._tried:
                if os.environ.get("SALBENCH_NATIVE", "1") == "0":
                    self._status = "disabled by SALBENCH_NATIVE=0"
                else:
                    try:
                        self._lib = self._build()
                        self._status = "native"
                    except Exception as exc:  # any failure: the caller's (equal, slower) torch path
                        self._lib, self._status = None, f"torch path: {exc}"
                self._tried = True
        return self._lib

    def status(self) -> str:
        """``"native"`` when the C kernels are in use, else why not."""
        self.library()
        return self._status

    def reset(self) -> None:
        """Forget the loaded library (tests: build again under other settings)."""
        with self._lock:
            self._lib, self._status, self._tried = None, "not built yet", False
