"""Exported programs (``torch.export.save`` ``.pt2`` files) loaded without running submitted code.

``torch.export.load`` is not safe for an untrusted file (read in torch 2.14's source,
``torch/export/pt2_archive/_package.py`` and ``torch/_export/serde/serialize.py``): it unpickles
weights and constants marked ``use_pickle`` with ``torch.load(weights_only=False)``, opaque
constants with ``pickle.loads``, the example inputs with ``weights_only=True`` *falling back to
``weights_only=False``*, parses every symbolic shape expression with ``sympy.sympify`` (an
``eval``), resolves node targets as any attribute path under ``torch``, ``operator`` or ``math``,
and loads AOTInductor shared libraries found in the archive. So SalBench reads the archive itself:

- the zip is opened with :mod:`zipfile`; declared (inflated) sizes are bounded before anything is
  read; the graph is the JSON member ``models/model.json``, the weights/constants configs are JSON;
- weights and constants are raw little-endian tensor records (dtype, sizes, strides from the JSON
  config), checked against the record's byte length; a record marked ``use_pickle`` (a tensor
  subclass) is read with ``torch.load(weights_only=True)`` and must give a plain dense tensor;
  custom/opaque objects, the example inputs and any AOTInductor member are never read;
- no symbolic expression is parsed: the only shape facts used are integer sizes;
- every node must call an ATen operator from :data:`ALLOWED_OPS` (tensor maths, shapes,
  normalisation, pooling, attention, ...) or integer arithmetic on sizes; any other target
  (a custom op, ``torch.os.system``, a higher-order op) is refused by name;
- the program must be a pure function: aliasing is tracked through every operator (a view, or an
  operator not known to return a new tensor, such as ``dropout`` in eval, ``type_as``,
  ``_unsafe_view``, is taken to alias its inputs), and no operator may write (in place, ``out=``,
  ``copy_``, any schema argument ``Tensor(a!)``) to a parameter, buffer, constant, the input or
  anything aliasing them; it may not run BatchNorm in training mode or dropout with
  ``train=True``, and must return one tensor. At run time a change of any of those tensors (their
  version counters) is refused too, and the loader calls the program 3 times on one probe image
  and requires identical outputs;
- its cost is bounded before anything runs (:class:`Limits`): the node count (counted in the
  archive before the graph is parsed), and, from the program's shapes worked out on the ``meta``
  device (no memory, no arithmetic) for one image, the largest single tensor and the FLOPs;
  every tensor may grow at most linearly with the batch; integer size arithmetic runs on
  bounded integers (:data:`MAX_SYM_VALUE`, :data:`MAX_SYM_EXPONENT`). Archive members must be
  stored or deflated, unencrypted.

The result is an :class:`ExportedModule`: an ``nn.Module`` that runs the graph's operators one by
one in eager mode, so autograd (``torch.autograd.grad``, captum) differentiates the same operators
the original module ran, and any batch size works when the batch dimension was exported as
dynamic. The program is always in inference form: ``train()``/``eval()`` change nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import io
import json
import math
import operator
import re
import stat
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from zlib import error as zlib_error

import torch
from torch import nn

from salbench.model_zoo.zoo import MAX_CHECKPOINT_BYTES, CheckpointError

ARCH = "exported"  # the card's ``arch`` for a submitted exported program
SCHEMA_MAJOR = 8  # torch.export serialisation schema major version this reader was written against (torch 2.14)
MAX_JSON_BYTES = 256 << 20
# caps on what a program may cost (defaults of :class:`Limits`; `salbench score --max-nodes`,
# `--max-tensor-bytes`, `--max-gflops-per-image` raise them for one command). Measured (README
# "Any architecture: export it"): the zoo architectures exported at their dataset's input size have
# 12-95 nodes, a largest tensor of 0.01-3.2 MB and cost 0.0006 (lenet) to 10.5 (wrn28_10) GFLOPs
# per image; a torchvision ResNet-18 at 224x224: 69 nodes, 3.2 MB, 3.6 GFLOPs.
MAX_NODES = 10_000
MAX_TENSOR_BYTES = 1 << 30  # any single tensor the program makes, for one image (batch 1)
MAX_GFLOPS_PER_IMAGE = 50.0  # one forward pass, one image (batch 1), multiply-add = 2 FLOPs
# integer size arithmetic (dynamic batch) runs on bounded numbers: |value| <= MAX_SYM_VALUE and
# exponents <= MAX_SYM_EXPONENT; beyond them the program is refused (not a bound a real model meets)
MAX_SYM_VALUE = 1 << 62
MAX_SYM_EXPONENT = 64
MAX_LIST_OUTPUTS = 4096  # pieces one split/chunk/unbind may return (beyond the names the graph gives them)
PROBE_CALLS = 3  # the loader calls each program this many times on one probe image: outputs must be identical

# ATen operator packets a program may call (every overload of each). Pure tensor computations:
# no randomness (dropout only with train=False), no I/O, no global state, no uninitialised memory
# (empty*). What they cost is bounded before they run (see Limits); an operator whose output size
# depends on the data (masked_select, one_hot without num_classes, ...) cannot be bounded and is refused.
ALLOWED_OPS: frozenset[str] = frozenset("""
    conv1d conv2d conv3d convolution _convolution conv_transpose1d conv_transpose2d conv_transpose3d
    linear matmul mm bmm addmm addmv baddbmm addbmm einsum t dot mv outer
    batch_norm _native_batch_norm_legit_no_training native_batch_norm layer_norm native_layer_norm group_norm
    native_group_norm instance_norm rms_norm _fused_rms_norm
    relu relu_ relu6 hardtanh hardtanh_ leaky_relu leaky_relu_ gelu gelu_ silu silu_ sigmoid sigmoid_ tanh tanh_
    elu elu_ selu selu_ celu celu_ softplus mish mish_ hardswish hardswish_ hardsigmoid hardsigmoid_ prelu
    _prelu_kernel glu log_sigmoid log_sigmoid_forward softmax _softmax log_softmax _log_softmax threshold threshold_
    clamp clamp_ clamp_min clamp_min_ clamp_max clamp_max_ clip clip_ hardshrink softshrink
    max_pool1d max_pool2d max_pool3d max_pool2d_with_indices max_pool3d_with_indices avg_pool1d avg_pool2d avg_pool3d
    adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d _adaptive_avg_pool2d _adaptive_avg_pool3d
    adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d
    add add_ sub sub_ rsub mul mul_ div div_ true_divide floor_divide remainder fmod neg pow pow_ sqrt rsqrt exp
    exp2 expm1 log log2 log10 log1p abs square reciprocal sin cos tan asin acos atan atan2 sinh cosh erf erfc erfinv
    where minimum maximum fmin fmax floor ceil round trunc frac sign sgn lerp addcmul addcdiv hypot logit xlogy
    eq ne lt le gt ge logical_not logical_and logical_or logical_xor isnan isinf isfinite bitwise_not
    mean sum nansum amax amin max min var std var_mean std_mean norm linalg_vector_norm frobenius_norm argmax
    argmin logsumexp prod cumsum cumprod any all count_nonzero
    view _unsafe_view reshape flatten unflatten permute transpose swapaxes movedim t contiguous clone expand
    expand_as view_as squeeze unsqueeze select slice narrow cat concat concatenate stack hstack vstack split
    split_with_sizes tensor_split chunk unbind repeat repeat_interleave tile flip roll rot90 diagonal tril triu
    constant_pad_nd pad reflection_pad1d reflection_pad2d reflection_pad3d replication_pad1d replication_pad2d
    replication_pad3d circular_pad2d _pad_circular pixel_shuffle pixel_unshuffle channel_shuffle native_channel_shuffle
    upsample_nearest1d upsample_nearest2d upsample_nearest3d upsample_bilinear2d upsample_bicubic2d
    upsample_linear1d upsample_trilinear3d _upsample_nearest_exact2d _upsample_bilinear2d_aa grid_sampler
    grid_sampler_2d affine_grid_generator index_select gather index masked_fill masked_fill_ masked_select
    take_along_dim scatter scatter_add embedding one_hot topk sort argsort alias detach lift_fresh_copy
    to _to_copy type_as zeros ones full arange zeros_like ones_like full_like new_zeros new_ones new_full
    scalar_tensor fill fill_ zero_ copy copy_
    scaled_dot_product_attention _scaled_dot_product_flash_attention_for_cpu _safe_softmax
    dropout dropout_ feature_dropout alpha_dropout feature_alpha_dropout native_dropout
    sym_size sym_numel sym_stride sym_storage_offset _assert_tensor_metadata _assert_scalar
    sym_constrain_range_for_size _assert_async
""".split())

# dropout-like packets: allowed only with their train flag a constant False (inference)
_TRAIN_FLAG = {"dropout": "train", "dropout_": "train", "feature_dropout": "train", "alpha_dropout": "train",
               "feature_alpha_dropout": "train", "native_dropout": "train", "batch_norm": "training",
               "native_batch_norm": "training"}

# integer arithmetic on sizes (dynamic batch): these targets, applied to plain Python numbers only
_SYM_OPS: dict[str, Any] = {
    "_operator.add": operator.add, "_operator.sub": operator.sub, "_operator.mul": operator.mul,
    "_operator.floordiv": operator.floordiv, "_operator.truediv": operator.truediv, "_operator.mod": operator.mod,
    "_operator.neg": operator.neg, "_operator.pow": operator.pow, "_operator.eq": operator.eq,
    "_operator.ne": operator.ne, "_operator.lt": operator.lt, "_operator.le": operator.le,
    "_operator.gt": operator.gt, "_operator.ge": operator.ge, "_operator.and_": operator.and_,
    "_operator.or_": operator.or_, "_operator.not_": operator.not_,
    "math.ceil": math.ceil, "math.floor": math.floor, "math.trunc": math.trunc, "math.sqrt": math.sqrt,
    "torch.sym_max": max, "torch.sym_min": min, "torch.sym_float": float, "torch.sym_int": int,
    "torch.sym_not": operator.not_, "torch.sym_sqrt": math.sqrt,
}

_DTYPES = {1: torch.uint8, 2: torch.int8, 3: torch.int16, 4: torch.int32, 5: torch.int64, 6: torch.float16,
           7: torch.float32, 8: torch.float64, 12: torch.bool, 13: torch.bfloat16}  # torch._export.serde.schema.ScalarType
_MEMORY_FORMATS = {1: torch.contiguous_format, 2: torch.channels_last, 3: torch.channels_last_3d,
                   4: torch.preserve_format}
_STRIDED = 7  # schema.Layout.Strided
_ATEN_TARGET = re.compile(r"^torch\.ops\.aten\.([A-Za-z0-9_]+)\.([A-Za-z0-9_]+)$")


class ExportedProgramError(CheckpointError):
    """A ``.pt2`` file is unreadable, unsafe, or not a program SalBench can score; the message says why."""


@dataclass(frozen=True)
class Limits:
    """Caps on what a program may cost; a program over one is refused with one line naming the cap,
    the estimate and the option that raises it. :func:`current_limits` gives the defaults (the
    module constants) or those set by :func:`limits`."""

    max_nodes: int
    max_tensor_bytes: int
    max_gflops_per_image: float


_LIMITS: contextvars.ContextVar[Limits | None] = contextvars.ContextVar("salbench_exported_limits", default=None)
# how each cap is raised: the `salbench score` option, and the Python way
_RAISE = {"max_nodes": "--max-nodes N", "max_tensor_bytes": "--max-tensor-bytes BYTES",
          "max_gflops_per_image": "--max-gflops-per-image G"}


def default_limits() -> Limits:
    """The module constants' caps."""
    return Limits(MAX_NODES, MAX_TENSOR_BYTES, MAX_GFLOPS_PER_IMAGE)


def current_limits() -> Limits:
    """The caps in force: those set by :func:`limits`, else the module constants."""
    return _LIMITS.get() or default_limits()


@contextlib.contextmanager
def limits(*, max_nodes: int | None = None, max_tensor_bytes: int | None = None,
           max_gflops_per_image: float | None = None):
    """Within the block, :func:`load_exported` uses these caps (None keeps the one in force).

    >>> with limits(max_gflops_per_image=200.0):
    ...     current_limits().max_gflops_per_image
    200.0
    """
    base = current_limits()
    new = Limits(max_nodes if max_nodes is not None else base.max_nodes,
                 max_tensor_bytes if max_tensor_bytes is not None else base.max_tensor_bytes,
                 float(max_gflops_per_image) if max_gflops_per_image is not None else base.max_gflops_per_image)
    token = _LIMITS.set(new)
    try:
        yield new
    finally:
        _LIMITS.reset(token)


def _over_cap(where: str, what: str, estimate: str, cap: str, field: str) -> ExportedProgramError:
    return ExportedProgramError(
        f"{where}: {what} {estimate}, more than the cap of {cap}; refused before running it (raise the cap with "
        f"`salbench score {_RAISE[field]}`, or salbench.model_zoo.exported.limits({field}=...))")


def is_exported_program(path: str | Path) -> bool:
    """Whether ``path`` names an exported-program file (by its ``.pt2`` suffix)."""
    return Path(path).suffix == ".pt2"


# ----------------------------------------------------------------------------- archive
_DRIVE = re.compile(r"^[A-Za-z]:")


def _member_problem(info: zipfile.ZipInfo) -> str | None:
    """Why an archive member is not one ``torch.export.save`` writes (a plain file, or an empty folder
    entry, under a relative name), or None. Nothing is ever extracted, but a name with ``..``, an
    absolute name or a link member says the archive was made to be unpacked somewhere else."""
    name = info.filename
    if "\\" in name or "\x00" in name or name.startswith("/") or _DRIVE.match(name):
        return "has an absolute or non-portable name"
    parts = name[:-1].split("/") if name.endswith("/") else name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return "has '..', '.' or an empty component in its name"
    ftype = stat.S_IFMT(info.external_attr >> 16)
    if ftype == stat.S_IFLNK:
        return "is a symbolic link"
    if ftype not in (0, stat.S_IFREG, stat.S_IFDIR):
        return "is not a file (a device, FIFO or socket entry)"
    if (ftype == stat.S_IFDIR or info.external_attr & 0x10) and not name.endswith("/"):  # unix / MS-DOS folder
        return "is a folder entry used as a file"
    if name.endswith("/") and info.file_size:
        return "is a folder entry that holds data"
    if info.flag_bits & 0x1:
        return "is flagged as encrypted (zip flag bit 0)"
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        method = {9: "deflate64", 12: "bzip2", 14: "lzma", 93: "zstandard"}.get(info.compress_type, "")
        return f"is compressed with method {info.compress_type}{f' ({method})' if method else ''} (stored or deflate only)"
    return None


class _Archive:
    """The members of a torch zip archive, by name relative to its single top-level folder."""

    def __init__(self, path: Path, limit: int) -> None:
        self.name = path.name
        try:
            self.zip = zipfile.ZipFile(path)
            infos = self.zip.infolist()
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            raise ExportedProgramError(f"{path.name} is not a torch.export archive (not a readable zip: {e})") from None
        total = sum(max(i.file_size, 0) for i in infos)
        if total > limit:
            raise ExportedProgramError(f"{path.name}: its members declare {total} bytes once inflated, more than the "
                                       f"{limit} bytes allowed; refused before reading it")
        for i in infos:  # before anything else is looked at: names, links, folder entries
            problem = _member_problem(i)
            if problem:
                raise ExportedProgramError(f"{path.name}: archive member {i.filename[:120]!r} {problem}; refused "
                                           "before reading it (torch.export.save writes plain files under one "
                                           "folder)")
        infos = [i for i in infos if not i.filename.endswith("/")]  # empty folder entries hold nothing
        roots = {i.filename.split("/", 1)[0] for i in infos}
        if len(roots) != 1 or any("/" not in i.filename for i in infos):
            raise ExportedProgramError(f"{path.name} is not a torch.export archive (expected one top-level folder, "
                                       f"found {sorted(roots)[:3]})")
        root = roots.pop() + "/"
        self.members = {i.filename[len(root):]: i for i in infos}
        if len(self.members) != len(infos):
            raise ExportedProgramError(f"{path.name}: duplicate member names in the archive")

    def has(self, name: str) -> bool:
        return name in self.members

    def read(self, name: str, max_bytes: int | None = None) -> bytes:
        info = self.members.get(name)
        if info is None:
            raise ExportedProgramError(f"{self.name}: member {name!r} is missing; save the program with "
                                       "torch.export.save(program, 'model.pt2')")
        if max_bytes is not None and info.file_size > max_bytes:
            raise ExportedProgramError(f"{self.name}: member {name!r} is {info.file_size} bytes (at most {max_bytes})")
        try:
            return self.zip.read(info)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, RuntimeError, NotImplementedError, zlib_error) as e:
            # CRC error, truncated member (compression method and encryption were checked on opening)
            raise ExportedProgramError(f"{self.name}: member {name!r} is corrupt ({str(e)[:160]})") from None

    def count(self, name: str, needle: bytes, stop: int) -> int:
        """Occurrences of ``needle`` in member ``name``, read in chunks (never whole), stopping past ``stop``."""
        info = self.members.get(name)
        if info is None:
            return 0
        n, tail = 0, b""
        try:
            with self.zip.open(info) as f:
                while n <= stop:
                    chunk = f.read(1 << 20)
                    if not chunk:
                        break
                    buf = tail + chunk
                    n += buf.count(needle)
                    tail = buf[-(len(needle) - 1):]  # shorter than needle: a match across chunks is counted once
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, RuntimeError, NotImplementedError, zlib_error) as e:
            raise ExportedProgramError(f"{self.name}: member {name!r} is corrupt ({str(e)[:160]})") from None
        return n

    def json(self, name: str) -> Any:
        raw = self.read(name, MAX_JSON_BYTES)
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise ExportedProgramError(f"{self.name}: member {name!r} is not valid JSON ({type(e).__name__})") from None


def _fail(where: str, message: str) -> ExportedProgramError:
    return ExportedProgramError(f"{where}: {message}")


def _int(v: Any, what: str, where: str) -> int:
    """A serialized concrete size (``{"as_int": n}``) as an int; anything else (a symbolic size) is refused."""
    n = v.get("as_int") if isinstance(v, dict) and set(v) == {"as_int"} else None
    if not isinstance(n, int) or isinstance(n, bool):
        raise _fail(where, f"{what} must be a concrete integer, got {str(v)[:80]}")
    return n


def _read_tensor(arc: _Archive, base: str, fqn: str, meta: dict) -> torch.Tensor:
    """One weight/constant record as a CPU tensor (a copy), from raw bytes or a weights_only pickle."""
    where = f"{arc.name}: tensor {fqn!r}"
    if not isinstance(meta, dict) or not isinstance(meta.get("path_name"), str):
        raise ExportedProgramError(f"{where} has no record name in its config")
    record = f"{base}{meta['path_name']}"
    if "/" in meta["path_name"] or not arc.has(record):
        raise ExportedProgramError(f"{where}: record {meta['path_name']!r} is missing from the archive")
    if meta.get("use_pickle"):
        raw = arc.read(record)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ExportedProgramError(
                f"{where} is a pickled record that is not a plain tensor ({first[:200]}); refused without running it "
                "(save plain tensors: no tensor subclasses, custom objects or quantized weights)") from None
        if type(t) not in (torch.Tensor, nn.Parameter):
            raise ExportedProgramError(f"{where} is a pickled {type(t).__name__}, not a plain tensor")
        t = t.detach()
    else:
        tm = meta.get("tensor_meta")
        if not isinstance(tm, dict):
            raise ExportedProgramError(f"{where} has no tensor metadata")
        dtype = _DTYPES.get(tm.get("dtype"))
        if dtype is None:
            raise ExportedProgramError(f"{where} has an unsupported dtype code {tm.get('dtype')!r} (supported: "
                                       "float16/32/64, bfloat16, integer and bool tensors)")
        if tm.get("layout", _STRIDED) != _STRIDED:
            raise ExportedProgramError(f"{where} is not a dense (strided) tensor")
        sizes = [_int(s, "a weight size", where) for s in tm.get("sizes", [])]
        strides = [_int(s, "a weight stride", where) for s in tm.get("strides", [])]
        offset = _int(tm.get("storage_offset", {"as_int": 0}), "a storage offset", where)
        if len(sizes) != len(strides) or min(sizes + strides + [offset], default=0) < 0:
            raise ExportedProgramError(f"{where}: inconsistent sizes {sizes} / strides {strides} / offset {offset}")
        raw = arc.read(record)
        esize = torch.empty(0, dtype=dtype).element_size()
        if len(raw) % esize:
            raise ExportedProgramError(f"{where}: record of {len(raw)} bytes is not a whole number of {dtype} elements")
        n = len(raw) // esize
        need = 0 if 0 in sizes else offset + 1 + sum((s - 1) * st for s, st in zip(sizes, strides))
        if need > n:
            raise ExportedProgramError(f"{where}: sizes {sizes} need {need} elements, its record holds {n} "
                                       "(truncated or corrupt)")
        flat = torch.frombuffer(bytearray(raw), dtype=dtype) if n else torch.empty(0, dtype=dtype)
        t = torch.as_strided(flat, sizes, strides, offset).clone() if need else torch.zeros(sizes, dtype=dtype)
    if t.layout != torch.strided or t.is_quantized or t.is_complex():
        raise ExportedProgramError(f"{where} is not a dense real tensor")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ExportedProgramError(f"{where} holds non-finite (NaN/inf) values")
    return t


def _payload(arc: _Archive, config_name: str, base: str, kind: str) -> dict[str, dict]:
    cfg = arc.json(config_name) if arc.has(config_name) else {"config": {}}
    entries = cfg.get("config") if isinstance(cfg, dict) else None
    if not isinstance(entries, dict):
        raise ExportedProgramError(f"{arc.name}: {config_name} is not a {kind} config")
    for fqn, meta in entries.items():
        pn = meta.get("path_name", "") if isinstance(meta, dict) else ""
        if kind == "constants" and not str(pn).startswith("tensor_"):
            raise ExportedProgramError(f"{arc.name}: constant {fqn!r} is a custom or opaque object ({pn!r}); only "
                                       "tensor constants are accepted (such objects are unpickled by "
                                       "torch.export.load, which SalBench never runs)")
    return entries


# ----------------------------------------------------------------------------- graph checks
def _resolve(target: Any, where: str):
    """An allowed callable for a node target, or a clear refusal naming it."""
    if not isinstance(target, str):
        raise _fail(where, f"node target {str(target)[:80]!r} is not an operator name")
    if target in _SYM_OPS:
        return target, None
    m = _ATEN_TARGET.match(target)
    if m and m.group(1) in ALLOWED_OPS:
        packet = getattr(torch.ops.aten, m.group(1), None)
        if packet is not None and m.group(2) in packet.overloads():
            return target, getattr(packet, m.group(2))
    raise _fail(where, f"the program calls {target[:120]!r}, which SalBench does not run: only ATen tensor "
                       "operators from salbench.model_zoo.exported.ALLOWED_OPS (and integer size arithmetic) are "
                       "allowed. Custom operators, Python callables and higher-order ops (torch.no_grad or "
                       "control flow inside forward) cannot be scored; re-export the model without them")


# Packets whose outputs are always newly allocated tensors: never a view of an input, never an input
# itself, whatever their arguments (structured/TensorIterator kernels, reductions, convolutions,
# matrix products, copies, factories). Every other operator (views, reshape, to, type_as,
# contiguous, dropout and the other composite ops that may return their input, _unsafe_view,
# split/chunk/unbind, einsum, pixel_shuffle, ...) is taken to alias all of its tensor inputs unless
# its schema says exactly what it aliases (an in-place or out= write: its written argument).
FRESH_OPS: frozenset[str] = frozenset("""
    conv1d conv2d conv3d convolution _convolution conv_transpose1d conv_transpose2d conv_transpose3d
    linear matmul mm bmm addmm addmv baddbmm addbmm dot mv outer
    batch_norm _native_batch_norm_legit_no_training native_batch_norm layer_norm native_layer_norm group_norm
    native_group_norm instance_norm rms_norm _fused_rms_norm
    relu relu6 hardtanh leaky_relu gelu silu sigmoid tanh elu selu celu softplus mish hardswish hardsigmoid prelu
    _prelu_kernel glu log_sigmoid log_sigmoid_forward softmax _softmax log_softmax _log_softmax _safe_softmax threshold
    clamp clamp_min clamp_max clip hardshrink softshrink
    max_pool1d max_pool2d max_pool3d max_pool2d_with_indices max_pool3d_with_indices avg_pool1d avg_pool2d avg_pool3d
    adaptive_avg_pool2d adaptive_avg_pool3d _adaptive_avg_pool2d _adaptive_avg_pool3d
    adaptive_max_pool2d adaptive_max_pool3d
    add sub rsub mul div true_divide floor_divide remainder fmod neg pow sqrt rsqrt exp exp2 expm1 log log2 log10
    log1p abs square reciprocal sin cos tan asin acos atan atan2 sinh cosh erf erfc erfinv
    where minimum maximum fmin fmax floor ceil round trunc frac sign sgn lerp addcmul addcdiv hypot logit xlogy
    eq ne lt le gt ge logical_not logical_and logical_or logical_xor isnan isinf bitwise_not
    mean sum nansum amax amin max min var std var_mean std_mean norm linalg_vector_norm argmax argmin logsumexp
    prod cumsum cumprod any all count_nonzero
    cat concat concatenate stack clone repeat repeat_interleave flip roll tril triu
    constant_pad_nd reflection_pad1d reflection_pad2d reflection_pad3d replication_pad1d replication_pad2d
    replication_pad3d upsample_nearest1d upsample_nearest2d upsample_nearest3d upsample_bilinear2d
    upsample_bicubic2d upsample_linear1d upsample_trilinear3d _upsample_nearest_exact2d _upsample_bilinear2d_aa
    grid_sampler grid_sampler_2d affine_grid_generator index_select gather index masked_fill masked_select scatter
    scatter_add embedding one_hot topk sort argsort lift_fresh_copy _to_copy zeros ones full arange zeros_like
    ones_like full_like new_zeros new_ones new_full scalar_tensor fill copy
    scaled_dot_product_attention _scaled_dot_product_flash_attention_for_cpu
""".split())


@functools.lru_cache(maxsize=None)
def _schema_info(op) -> tuple[frozenset[str], str, tuple[str, ...]]:
    """(names of the arguments the operator writes to, how its outputs alias, names of its Device
    arguments), read from the annotated schema, e.g.
    ``aten::add.out(Tensor self, ..., Tensor(a!) out) -> Tensor(a!)``. How outputs alias:
    ``"written"`` (every output is a written argument: in-place and out= ops), ``"none"`` (no
    output is annotated as an alias) or ``"inputs"`` (some output may alias an input)."""
    schema = op._schema
    written, written_sets = set(), set()
    for a in schema.arguments:
        info = a.alias_info
        if (info is not None and info.is_write) or _WRITTEN_ARG.match(str(a)):
            written.add(a.name)
            if info is not None:
                written_sets |= set(info.before_set)
    kinds = []
    for r in schema.returns:
        info = r.alias_info
        if info is not None and info.before_set and set(info.before_set) <= written_sets:
            kinds.append("written")
        elif (info is not None and info.before_set) or "(" in str(r.type) or "(" in str(r):
            kinds.append("inputs")
        else:
            kinds.append("none")
    how = "inputs" if "inputs" in kinds else ("written" if kinds and set(kinds) == {"written"} else "none")
    devices = tuple(a.name for a in schema.arguments if "Device" in str(a.type))
    return frozenset(written), how, devices


_WRITTEN_ARG = re.compile(r"^Tensor\([^)]*!")


def _positional(op) -> list[str]:
    return [a.name for a in op._schema.arguments if not a.kwarg_only]


# ----------------------------------------------------------------------------- bounded size arithmetic
def _sym_number(v: Any) -> bool:
    """Whether ``v`` is a number size arithmetic may hold: a bool, or an int/float within MAX_SYM_VALUE."""
    if isinstance(v, bool):
        return True
    if isinstance(v, int):
        return -MAX_SYM_VALUE <= v <= MAX_SYM_VALUE
    if isinstance(v, float):
        return math.isfinite(v) and abs(v) <= MAX_SYM_VALUE
    return False


def _shown(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, int):
        return str(v) if v.bit_length() <= 64 else f"a {v.bit_length()}-bit integer"
    return f"a {type(v).__name__}"


def _sym_apply(target: str, args: list, kwargs: dict) -> Any:
    """Integer (size) arithmetic on bounded numbers; any problem raises ``ValueError`` with a short
    reason (division by zero, an exponent or value beyond the bounds, an undefined result)."""
    values = (*args, *kwargs.values())
    for v in values:
        if not _sym_number(v):
            shown = _shown(v)
            raise ValueError(f"operand {shown} is beyond the bound {MAX_SYM_VALUE} (2**62) of size arithmetic "
                             "(MAX_SYM_VALUE), or not a number")
    name = target.rsplit(".", 1)[-1]
    if name in ("floordiv", "truediv", "mod") and len(args) == 2 and args[1] == 0:
        raise ValueError("divides by zero")
    if name == "pow" and len(args) == 2:
        if abs(args[1]) > MAX_SYM_EXPONENT:
            raise ValueError(f"raises to the power {args[1]:g}, beyond the bound {MAX_SYM_EXPONENT} of size "
                             "arithmetic (MAX_SYM_EXPONENT)")
        if args[0] == 0 and args[1] < 0:
            raise ValueError("divides by zero (0 to a negative power)")
    try:
        result = _SYM_OPS[target](*args, **kwargs)
    except (ArithmeticError, ValueError, TypeError) as e:  # OverflowError, ZeroDivisionError, sqrt(-1), ...
        raise ValueError(f"has no result ({type(e).__name__}: {str(e)[:80]})") from None
    if not _sym_number(result):
        raise ValueError(f"overflows: its result {_shown(result)} is beyond the bound {MAX_SYM_VALUE} (2**62) of size "
                         "arithmetic (MAX_SYM_VALUE), or not a real number")
    return result


def _bind_names(op, inputs: list[dict], label: str, where: str) -> dict[str, dict]:
    """Schema argument name -> serialized argument, as the call will bind them: positional inputs by
    their position in the operator's schema (never by the name the file gives them), keyword inputs
    by name (the call passes that name)."""
    positional = [a.name for a in op._schema.arguments if not a.kwarg_only]
    known = {a.name for a in op._schema.arguments}
    named, pos = {}, 0
    for a in inputs:
        kind = a.get("kind", 1)
        if kind in (None, 1):
            if pos >= len(positional):
                raise _fail(where, f"{label} passes more positional arguments than its schema takes")
            name, pos = positional[pos], pos + 1
        elif kind == 2:
            name = a.get("name")
            if name not in known:
                raise _fail(where, f"{label} passes an unknown keyword argument {str(name)[:40]!r}")
        else:
            raise _fail(where, f"{label} has an argument of unknown kind {kind!r}")
        if name in named:
            raise _fail(where, f"{label} passes argument {name!r} twice")
        named[name] = a["arg"]
    return named


def _arg_names(arg: dict) -> list[str]:
    """The tensor names an argument refers to."""
    if "as_tensor" in arg:
        return [arg["as_tensor"]["name"]]
    if "as_tensors" in arg:
        return [t["name"] for t in arg["as_tensors"]]
    if "as_optional_tensors" in arg:
        return [t["as_tensor"]["name"] for t in arg["as_optional_tensors"] if "as_tensor" in t]
    if "as_optional_tensor" in arg and "as_tensor" in arg["as_optional_tensor"]:
        return [arg["as_optional_tensor"]["as_tensor"]["name"]]
    return []


def _sym_names(arg: dict) -> list[str]:
    """The size/scalar names an argument refers to."""
    out = []
    for k in ("as_sym_int", "as_sym_float", "as_sym_bool"):
        if k in arg and "as_name" in arg[k]:
            out.append(arg[k]["as_name"])
    for k in ("as_sym_ints", "as_sym_floats", "as_sym_bools"):
        out += [s["as_name"] for s in arg.get(k, []) if "as_name" in s]
    return out


def _out_names(out: dict) -> list[str]:
    if "as_tensor" in out:
        return [out["as_tensor"]["name"]]
    if "as_tensors" in out:
        return [t["name"] for t in out["as_tensors"]]
    for k in ("as_sym_int", "as_sym_float", "as_sym_bool"):
        if k in out and "as_name" in out[k]:
            return [out[k]["as_name"]]
    if "as_none" in out:
        return []
    raise ValueError(f"unsupported output kind {sorted(out)}")


def _check_graph(graph: dict, state: set[str], user_input: str, where: str, cap: Limits | None = None) -> list[tuple]:
    """Resolve every node and check the rules of the module docstring; returns the node plan."""
    cap = cap or current_limits()
    nodes = graph.get("nodes")
    if not isinstance(nodes, list):
        raise _fail(where, "the graph has no node list")
    if len(nodes) > cap.max_nodes:
        raise _over_cap(where, "the graph has", f"{len(nodes)} nodes", f"{cap.max_nodes} nodes", "max_nodes")
    defined = set(state) | {user_input}
    # fresh[name]: the tensor was made during this call and aliases nothing that outlives it; False
    # for the parameters, buffers, constants and the input, and for anything that may alias them
    fresh: dict[str, bool] = {n: False for n in defined}
    plan = []
    for i, node in enumerate(nodes):
        if not isinstance(node, dict):
            raise _fail(where, f"node {i} is not an object")
        label = f"node {i} ({str(node.get('name'))[:40]})"
        target, op = _resolve(node.get("target"), where)
        inputs = node.get("inputs", [])
        if not isinstance(inputs, list) or not all(isinstance(a, dict) and isinstance(a.get("arg"), dict)
                                                   for a in inputs):
            raise _fail(where, f"{label} has malformed inputs")
        for a in inputs:
            for name in _arg_names(a["arg"]) + _sym_names(a["arg"]):
                if name not in defined:
                    raise _fail(where, f"{label} ({target}) reads {name!r} before it is defined")
        if op is not None:
            named = _bind_names(op, inputs, f"{label} ({target})", where)
            packet = target.split(".")[3]
            flag = _TRAIN_FLAG.get(packet)
            if flag and named.get(flag) != {"as_bool": False}:
                kind = "BatchNorm in training mode" if "norm" in packet else "dropout in training mode"
                raise _fail(where, f"{label} runs {kind} ({target}); call model.eval() before torch.export.export")
            if packet == "instance_norm" and named.get("use_input_stats") != {"as_bool": False} \
                    and _arg_names(named.get("running_mean", {})):
                raise _fail(where, f"{label} updates InstanceNorm running statistics; export in eval mode")
            if packet in ("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu") and \
                    named.get("dropout_p", {"as_float": 0.0}) not in ({"as_float": 0.0}, {"as_int": 0}):
                raise _fail(where, f"{label} runs attention dropout ({target}, dropout_p "
                                   f"{str(named.get('dropout_p'))[:40]}): a scored program may not be random; call "
                                   "model.eval() before torch.export.export")
            written, how, _ = _schema_info(op)
            for arg_name in written & set(named):
                for name in _arg_names(named[arg_name]):
                    if not fresh.get(name, False):
                        raise _fail(where, f"{label} ({target}) writes in place to {name!r}, a parameter, buffer, "
                                           "constant or the input (or a tensor that may alias one); the program may "
                                           "not change its state. Export the model in eval mode without in-place "
                                           "updates of its weights or input")
            srcs = [n for a in inputs for n in _arg_names(a["arg"])]
            if how == "written":  # an in-place or out= op returns the argument it wrote (fresh, checked above)
                out_fresh = True
            elif how == "none" and packet in FRESH_OPS:
                out_fresh = True
            else:  # a view, or an op that may return (a view of) an input: fresh only if all its inputs are
                out_fresh = all(fresh.get(n, False) for n in srcs)
        else:
            out_fresh = True
        outs = node.get("outputs", [])
        if not isinstance(outs, list) or not all(isinstance(o, dict) for o in outs):
            raise _fail(where, f"{label} has malformed outputs")
        try:
            names = [_out_names(o) for o in outs]
        except (ValueError, KeyError, TypeError) as e:
            raise _fail(where, f"{label} ({target}): {e}") from None
        for ns in names:
            for n in ns:
                if n in defined:
                    raise _fail(where, f"{label} redefines {n!r}")
                defined.add(n)
                fresh[n] = out_fresh
        plan.append((target, op, inputs, outs))
    return plan


# ----------------------------------------------------------------------------- the module
class ExportedModule(nn.Module):
    """A checked exported program as an ``nn.Module``: ``forward(x)`` runs the graph's ATen operators
    in order (eager, differentiable). Built by :func:`load_exported`; see the module docstring.

    Attributes:
        input_shape: the program's (C, H, W) for one image.
        fqns: parameter/buffer attribute -> the exported module's own name (e.g. ``p3 -> conv1.weight``).
    """

    def __init__(self, plan: list[tuple], inputs: list[tuple[str, str, torch.Tensor]], user_input: str,
                 output: str, input_shape: tuple[int, ...], name: str) -> None:
        super().__init__()
        self._plan, self._user_input, self._output, self._name = plan, user_input, output, name
        self.input_shape = tuple(input_shape)
        self.cost: dict[str, Any] = {}  # nodes, peak_tensor_bytes, gflops_per_image (set by load_exported)
        # names no later node reads, dropped from the environment after each node (memory of long graphs)
        keep = {user_input, output} | {g for g, _, _ in inputs}
        last: dict[str, int] = {}
        for i, (_, _, ins, outs) in enumerate(plan):
            for o in outs:
                for n in _out_names(o):
                    last[n] = i
            for a in ins:
                for n in _arg_names(a["arg"]) + _sym_names(a["arg"]):
                    last[n] = i
        self._dead: list[tuple[str, ...]] = [() for _ in plan]
        for n, i in last.items():
            if n not in keep:
                self._dead[i] += (n,)
        self._slots: dict[str, str] = {}  # graph input name -> attribute
        self.fqns: dict[str, str] = {}
        for i, (graph_name, kind, t) in enumerate(inputs):
            attr = f"{kind[0]}{i}"
            if kind == "parameter":
                self.register_parameter(attr, nn.Parameter(t, requires_grad=t.is_floating_point()))
            else:
                self.register_buffer(attr, t, persistent=True)
            self._slots[graph_name] = attr
        self.eval()

    def extra_repr(self) -> str:
        return f"{self._name}: {len(self._plan)} operators, input (B, {', '.join(map(str, self.input_shape))})"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(x) or tuple(x.shape[1:]) != self.input_shape:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"{self._name} takes (B, {', '.join(map(str, self.input_shape))}) images, got {shape}")
        env: dict[str, Any] = {g: getattr(self, a) for g, a in self._slots.items()}
        held = [*env.values(), x]  # what outlives the call: its version counters may not move
        before = _versions(held)
        env[self._user_input] = x
        dev = x.device
        for i, (target, op, inputs, outs) in enumerate(self._plan):
            args, kwargs = _call_args(inputs, env, dev)
            if op is None:
                try:
                    result = _sym_apply(target, args, kwargs)
                except ValueError as e:
                    raise ExportedProgramError(f"{self._name}: node {i} ({target}) {e}") from None
            else:
                result = op(*args, **kwargs)
            _bind(outs, result, env)
            for n in self._dead[i]:
                env.pop(n, None)
        if _versions(held) != before:
            raise ExportedProgramError(f"{self._name}: the program changed a parameter, buffer, constant or its input "
                                       "while running; a scored program must be a pure function")
        return env[self._output]


def _versions(tensors: list) -> list:
    """Version counters (bumped by every in-place write, views included); None where a tensor has none."""
    out = []
    for t in tensors:
        try:
            out.append(t._version)
        except (RuntimeError, AttributeError):  # an inference-mode tensor keeps no version counter
            out.append(None)
    return out


def _call_args(inputs: list[dict], env: dict, device: torch.device) -> tuple[list, dict]:
    args, kwargs = [], {}
    for a in inputs:
        v = _value(a["arg"], env, device)
        if a.get("kind", 1) == 2:
            kwargs[a["name"]] = v
        else:
            args.append(v)
    return args, kwargs


def _value(arg: dict, env: dict, device: torch.device) -> Any:
    """A serialized argument as a runtime value (tensors and sizes from ``env``)."""
    (kind, v), = arg.items()
    if kind == "as_none":
        return None
    if kind == "as_tensor":
        return env[v["name"]]
    if kind == "as_tensors":
        return [env[t["name"]] for t in v]
    if kind == "as_optional_tensors":
        return [env[t["as_tensor"]["name"]] if "as_tensor" in t else None for t in v]
    if kind == "as_optional_tensor":
        return env[v["as_tensor"]["name"]] if "as_tensor" in v else None
    if kind in ("as_int", "as_float", "as_bool", "as_string", "as_ints", "as_floats", "as_bools", "as_strings"):
        return list(v) if isinstance(v, list) else v
    if kind in ("as_sym_int", "as_sym_float", "as_sym_bool"):
        return _sym(v, env)
    if kind in ("as_sym_ints", "as_sym_floats", "as_sym_bools"):
        return [_sym(s, env) for s in v]
    if kind == "as_scalar_type":
        return _DTYPES[v]
    if kind == "as_memory_format":
        return _MEMORY_FORMATS[v]
    if kind == "as_layout":
        return torch.strided
    if kind == "as_device":
        return device  # the program runs where its input is
    raise ValueError(f"unsupported argument kind {kind}")


def _sym(v: dict, env: dict) -> Any:
    (kind, x), = v.items()
    return env[x] if kind == "as_name" else x


def _bind(outs: list[dict], result: Any, env: dict) -> None:
    if not outs:
        return
    results = [result] if len(outs) == 1 else list(result)
    for out, r in zip(outs, results):
        names = _out_names(out)
        if "as_tensors" in out:
            for n, t in zip(names, r):
                env[n] = t
        elif names:
            env[names[0]] = r


# ----------------------------------------------------------------------------- cost, before running
_CONV = {"conv1d", "conv2d", "conv3d", "convolution", "_convolution"}
_CONV_T = {"conv_transpose1d", "conv_transpose2d", "conv_transpose3d"}
_SPLITS = {"split", "split_with_sizes", "tensor_split", "chunk", "unbind"}
_SDPA = {"scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu"}


def _numel(shape) -> int:
    return math.prod(int(d) for d in shape)


def _einsum_flops(equation: Any, operands: list) -> int | None:
    """2 x the product of every index size of an einsum (its multiply-adds), or None if unreadable."""
    if not isinstance(equation, str) or not all(torch.is_tensor(t) for t in operands):
        return None
    lhs = equation.replace(" ", "").split("->")[0].split(",")
    if len(lhs) != len(operands):
        return None
    sizes: dict[str, int] = {}
    ellipsis = 1
    for term, t in zip(lhs, operands):
        letters = term.replace("...", "")
        n_ell = t.dim() - len(letters)
        if "..." in term:
            k = term.index("...")
            ellipsis = max(ellipsis, _numel(t.shape[k:k + n_ell]))
            dims = list(t.shape[:k]) + list(t.shape[k + n_ell:])
        else:
            dims = list(t.shape)
        for c, d in zip(letters, dims):
            sizes[c] = max(sizes.get(c, 1), int(d))
    return 2 * ellipsis * math.prod(sizes.values())


def _node_flops(packet: str, named: dict, result: Any) -> int:
    """FLOPs of one operator from its shapes: multiply-adds (x2) of convolutions, linear layers,
    matrix products and attention; any other operator one per output element."""
    outs = [t for t in (result if isinstance(result, (tuple, list)) else [result]) if torch.is_tensor(t)]
    out_numel = sum(t.numel() for t in outs)
    out = outs[0] if outs else None

    def get(*names):
        for n in names:
            if torch.is_tensor(named.get(n)):
                return named[n]
        return None

    try:
        if packet in _CONV | _CONV_T and get("weight") is not None:
            w = get("weight")
            per = int(w.shape[1]) * _numel(w.shape[2:])
            if packet in _CONV_T or named.get("transposed") is True:
                x = get("input")
                return 2 * (x.numel() if x is not None else out_numel) * per
            return 2 * out_numel * per
        if packet == "linear" and get("weight") is not None:
            return 2 * out_numel * int(get("weight").shape[-1])
        if packet in ("mm", "bmm", "matmul", "mv", "dot") and get("self") is not None:
            a = get("self")
            return 2 * max(out_numel, 1) * int(a.shape[-1] if a.dim() else 1)
        if packet in ("addmm", "addmv", "baddbmm") and get("mat1", "mat", "batch1") is not None:
            return 2 * out_numel * int(get("mat1", "mat", "batch1").shape[-1])
        if packet == "addbmm" and get("batch1") is not None:
            b = get("batch1")
            return 2 * out_numel * int(b.shape[0]) * int(b.shape[-1])
        if packet == "einsum":
            f = _einsum_flops(named.get("equation"), list(named.get("tensors") or []))
            if f is not None:
                return f
        if packet in _SDPA and out is not None and get("query") is not None and get("key") is not None:
            q, k, v = get("query"), get("key"), get("value")
            batch = _numel(out.shape[:-2])
            e_v = int(v.shape[-1]) if v is not None else int(q.shape[-1])
            return 2 * batch * int(q.shape[-2]) * int(k.shape[-2]) * (int(q.shape[-1]) + e_v)
    except (IndexError, TypeError, ValueError, RuntimeError):
        pass
    return max(out_numel, 1)


def _pieces(packet: str, named: dict) -> int | None:
    """How many tensors a split/chunk/unbind call returns, from its arguments (None: not such an op)."""
    x = named.get("self")
    if packet not in _SPLITS or not torch.is_tensor(x):
        return None
    dim = named.get("dim", 0)
    try:
        size = int(x.shape[dim]) if x.dim() else 1
    except (IndexError, TypeError):
        return None  # the call itself fails, with torch's own message
    if packet == "unbind":
        return size
    if packet == "chunk":
        chunks = named.get("chunks")
        return min(chunks, max(size, 1)) if isinstance(chunks, int) and chunks > 0 else None
    if packet == "split":
        ss = named.get("split_size", named.get("split_sizes"))
        if isinstance(ss, int):
            return -(-size // ss) if ss > 0 else None
        return len(ss) if isinstance(ss, (list, tuple)) else None
    if packet == "split_with_sizes":
        ss = named.get("split_sizes")
        return len(ss) if isinstance(ss, (list, tuple)) else None
    if packet == "tensor_split":
        sections = named.get("sections")
        if isinstance(sections, int):
            return sections
        indices = named.get("indices")
        return len(indices) + 1 if isinstance(indices, (list, tuple)) else None
    return None


def _shape_pass(plan: list[tuple], state: list[tuple[str, str, torch.Tensor]], user_input: str,
                input_shape: tuple[int, ...], batch: int, where: str) -> tuple[dict[str, int], tuple[int, str], int]:
    """Run the graph on ``meta`` tensors (shapes and dtypes only: no memory, no arithmetic) for a
    batch of ``batch`` images: (numel of every tensor the graph makes, (bytes, node) of the largest,
    estimated FLOPs). Size arithmetic is bounded; a node that fails, or a split into more pieces than
    MAX_LIST_OUTPUTS, is refused with one line."""
    meta = torch.device("meta")
    env: dict[str, Any] = {g: torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device=meta)
                           for g, _, t in state}
    env[user_input] = torch.empty((batch, *input_shape), dtype=torch.float32, device=meta)
    numels: dict[str, int] = {}
    peak, flops = (0, "none"), 0
    for i, (target, op, inputs, outs) in enumerate(plan):
        label = f"node {i} ({target})"
        try:
            args, kwargs = _call_args(inputs, env, meta)
        except (KeyError, TypeError, ValueError) as e:
            raise _fail(where, f"{label} has an argument SalBench cannot read ({type(e).__name__})") from None
        if op is None:
            try:
                result = _sym_apply(target, args, kwargs)
            except ValueError as e:
                raise _fail(where, f"{label}: size arithmetic {e}; refused before running it") from None
        else:
            packet = target.split(".")[3]
            if packet == "_assert_async":  # a check on tensor values: there are none on the meta device
                continue
            _, _, devices = _schema_info(op)
            given = set(_positional(op)[:len(args)]) | set(kwargs)
            for d in devices:  # a factory without a device would allocate on the CPU
                if d not in given:
                    kwargs[d] = meta
            named = dict(zip(_positional(op), args)) | kwargs
            n = _pieces(packet, named)
            declared = sum(len(_out_names(o)) for o in outs)
            if n is not None and n > max(MAX_LIST_OUTPUTS, declared):
                raise _fail(where, f"{label} splits a tensor into {n} pieces (at most {MAX_LIST_OUTPUTS}, or as "
                                   f"many as the graph names); refused before running it")
            try:
                result = op(*args, **kwargs)
            except ExportedProgramError:
                raise
            except Exception as e:  # noqa: BLE001 - torch's shape checks raise many types; one line each
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise _fail(where, f"{label} fails when its shapes are worked out for a batch of {batch} "
                                   f"({type(e).__name__}: {first[:160]}); refused before running it") from None
            flops += _node_flops(packet, named, result)
        _bind(outs, result, env)
        for o in outs:
            for name in _out_names(o):
                t = env.get(name)
                if torch.is_tensor(t):
                    numels[name] = t.numel()
                    size = t.numel() * t.element_size()
                    if size > peak[0]:
                        peak = (size, f"node {i} ({target.removeprefix('torch.ops.aten.')}, shape "
                                      f"{tuple(t.shape)})")
    return numels, peak, flops


def _check_cost(plan: list[tuple], state: list[tuple[str, str, torch.Tensor]], user_input: str,
                input_shape: tuple[int, ...], where: str, cap: Limits) -> dict[str, Any]:
    """The program's cost for one image, worked out before anything runs; refused over a cap, or
    when a tensor grows faster than the batch (a batch of 2 against 1)."""
    numels, (peak, at), flops = _shape_pass(plan, state, user_input, input_shape, 1, where)
    gflops = flops / 1e9
    over = []
    if peak > cap.max_tensor_bytes:
        over.append(_over_cap(where, f"the largest tensor it makes for one image, at {at}, is", f"{peak} bytes "
                              f"({peak / 2**30:.2f} GiB)", f"{cap.max_tensor_bytes} bytes "
                              f"({cap.max_tensor_bytes / 2**30:.2f} GiB)", "max_tensor_bytes"))
    if gflops > cap.max_gflops_per_image:
        over.append(_over_cap(where, "it needs an estimated", f"{gflops:.4g} GFLOPs per image (one forward pass)",
                              f"{cap.max_gflops_per_image:g} GFLOPs per image", "max_gflops_per_image"))
    if over:
        raise ExportedProgramError("; ".join(str(e) if i == 0 else str(e).removeprefix(f"{where}: ")
                                             for i, e in enumerate(over)))
    numels2, _, _ = _shape_pass(plan, state, user_input, input_shape, 2, where)
    for name, n2 in numels2.items():
        n1 = numels.get(name)
        if n1 is not None and n2 > 2 * n1:
            raise _fail(where, f"tensor {name!r} has {n1} elements for one image and {n2} for two: it grows faster "
                               "than the batch (each image must be computed on its own); refused before running it")
    return {"nodes": len(plan), "peak_tensor_bytes": peak, "peak_tensor_at": at, "gflops_per_image": gflops}


_ARG_KINDS = {"as_none", "as_tensor", "as_tensors", "as_optional_tensors", "as_optional_tensor", "as_int", "as_float",
              "as_bool", "as_string", "as_ints", "as_floats", "as_bools", "as_strings", "as_sym_int", "as_sym_float",
              "as_sym_bool", "as_sym_ints", "as_sym_floats", "as_sym_bools", "as_scalar_type", "as_memory_format",
              "as_layout", "as_device"}


def _check_args(plan: list[tuple], where: str) -> None:
    for target, _, inputs, _ in plan:
        for a in inputs:
            arg = a["arg"]
            if len(arg) != 1 or next(iter(arg)) not in _ARG_KINDS:
                raise _fail(where, f"{target} takes an argument of kind {sorted(arg)[:2]} SalBench does not read "
                                   "(custom objects, subgraphs and operator references are not accepted)")
            (kind, v), = arg.items()
            if kind == "as_scalar_type" and v not in _DTYPES:
                raise _fail(where, f"{target} uses an unsupported dtype code {v!r}")
            if kind == "as_memory_format" and v not in _MEMORY_FORMATS:
                raise _fail(where, f"{target} uses an unknown memory format code {v!r}")
            if kind == "as_layout" and v != _STRIDED:
                raise _fail(where, f"{target} asks for a non-dense tensor layout")
            if a.get("kind", 1) == 2 and not isinstance(a.get("name"), str):
                raise _fail(where, f"{target} has a keyword argument without a name")


def load_exported(path: str | Path, *, max_bytes: int | None = None, limits: Limits | None = None) -> ExportedModule:
    """Read a ``torch.export.save`` file into an :class:`ExportedModule`, running no code from it.

    Args:
        path: a ``.pt2`` file holding one program (``torch.export.save(torch.export.export(model, ...), path)``).
        max_bytes: bound on the archive's declared inflated size (default ``zoo.MAX_CHECKPOINT_BYTES``).
        limits: caps on nodes, the largest tensor and FLOPs per image (default :func:`current_limits`).

    Raises:
        ExportedProgramError: unreadable or unsafe file, a pickled member that is not a plain tensor,
            an operator outside :data:`ALLOWED_OPS`, state mutation (static, or seen while running the
            probe), outputs that change between calls, training-mode BatchNorm/dropout, more or fewer
            than one tensor input and output, a program over a cap of ``limits``, size arithmetic
            beyond its bounds.

    Example:
        >>> import tempfile, torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 26 * 26, 10)).eval()
        >>> ep = torch.export.export(net, (torch.rand(2, 1, 28, 28),), dynamic_shapes=({0: torch.export.Dim("b")},))
        >>> with tempfile.TemporaryDirectory() as d:
        ...     torch.export.save(ep, f"{d}/net.pt2")
        ...     m = load_exported(f"{d}/net.pt2")
        >>> x = torch.rand(5, 1, 28, 28)  # any batch size
        >>> torch.equal(m(x), net(x))
        True
    """
    path = Path(path)
    try:
        return _load(path, max_bytes, limits or current_limits())
    except ExportedProgramError:
        raise
    except (KeyError, TypeError, AttributeError, IndexError, ValueError, RecursionError, ArithmeticError) as e:
        # a file that is not what torch.export.save writes, in some way the checks above did not name
        raise ExportedProgramError(f"{path.name} is not a well-formed exported program ({type(e).__name__}: "
                                   f"{str(e)[:120]})") from None


def _load(path: Path, max_bytes: int | None, cap: Limits) -> ExportedModule:
    if not path.exists():
        raise ExportedProgramError(f"program {path} does not exist")
    if not path.is_file():
        raise ExportedProgramError(f"program {path} is not a regular file (a directory, FIFO or device)")
    limit = MAX_CHECKPOINT_BYTES if max_bytes is None else int(max_bytes)
    if path.stat().st_size > limit:
        raise ExportedProgramError(f"{path.name} is {path.stat().st_size} bytes, more than the {limit} allowed")
    arc = _Archive(path, limit)
    where = path.name
    if arc.has("archive_version") and arc.read("archive_version", 64).strip() not in (b"0",):
        raise _fail(where, f"archive version {arc.read('archive_version', 64)[:16]!r} is not one this reader knows (0)")
    if arc.has("byteorder") and arc.read("byteorder", 64).strip() != b"little":
        raise _fail(where, "only little-endian archives are read")
    models = sorted(n for n in arc.members if n.startswith("models/") and n.endswith(".json"))
    if models != ["models/model.json"]:
        raise _fail(where, f"expected exactly one exported program (models/model.json), found {models[:4] or 'none'}; "
                           "save one program with torch.export.save(torch.export.export(model, ...), 'model.pt2') "
                           "(AOTInductor packages and the legacy pre-2.7 format are not accepted)")
    # the node cap before the graph is parsed: every node has one "target" key (a parsed 200k-node
    # graph, then its plan, would take far more memory than its file)
    info = arc.members["models/model.json"]
    if info.file_size > MAX_JSON_BYTES:
        raise _fail(where, f"member 'models/model.json' is {info.file_size} bytes (at most {MAX_JSON_BYTES})")
    declared = arc.count("models/model.json", b'"target"', MAX_JSON_BYTES)
    if declared > cap.max_nodes:
        raise _over_cap(where, "the graph has", f"{declared} nodes (counted in models/model.json before parsing it)",
                        f"{cap.max_nodes} nodes", "max_nodes")
    doc = arc.json("models/model.json")
    try:
        major = doc["schema_version"]["major"]
        gm = doc["graph_module"]
        graph, sig = gm["graph"], gm["signature"]
        in_specs, out_specs = sig["input_specs"], sig["output_specs"]
    except (KeyError, TypeError):
        raise _fail(where, "models/model.json is not a serialized ExportedProgram") from None
    if major != SCHEMA_MAJOR:
        raise _fail(where, f"serialization schema {major} (torch {str(doc.get('torch_version'))[:20]}); this reader "
                           f"takes schema {SCHEMA_MAJOR} (torch {torch.__version__}); export with that torch version")
    weights = _payload(arc, "data/weights/model_weights_config.json", "data/weights/", "weights")
    constants = _payload(arc, "data/constants/model_constants_config.json", "data/constants/", "constants")

    state, user_inputs = [], []
    for spec in in_specs:
        if not isinstance(spec, dict) or len(spec) != 1:
            raise _fail(where, "malformed input spec")
        (kind, body), = spec.items()
        if kind == "parameter":
            state.append((body["arg"]["name"], "parameter", body["parameter_name"], weights))
        elif kind == "buffer":
            state.append((body["arg"]["name"], "buffer", body["buffer_name"],
                          weights if body["buffer_name"] in weights else constants))
        elif kind == "tensor_constant":
            state.append((body["arg"]["name"], "constant", body["tensor_constant_name"], constants))
        elif kind == "user_input":
            user_inputs.append(body.get("arg", {}))
        else:
            raise _fail(where, f"the program takes a {kind.replace('_', ' ')} input; only tensors are accepted")
    if len(user_inputs) != 1 or "as_tensor" not in user_inputs[0]:
        raise _fail(where, f"the program takes {len(user_inputs)} inputs; it must take exactly one: the image "
                           "batch (B, C, H, W) in [0, 1]")
    user_input = user_inputs[0]["as_tensor"]["name"]
    if len(out_specs) != 1 or "user_output" not in out_specs[0] \
            or "as_tensor" not in out_specs[0]["user_output"].get("arg", {}):
        kinds = [next(iter(s)) for s in out_specs if isinstance(s, dict)]
        raise _fail(where, f"the program's outputs are {kinds}; it must return one logits tensor and change no "
                           "buffer (export the model in eval mode: model.eval())")
    output = out_specs[0]["user_output"]["arg"]["as_tensor"]["name"]

    meta = graph.get("tensor_values", {}).get(user_input, {})
    sizes = meta.get("sizes") if isinstance(meta, dict) else None
    if not isinstance(sizes, list) or len(sizes) != 4:
        raise _fail(where, "the program's input must be a 4-d image batch (B, C, H, W)")
    if "as_expr" not in sizes[0]:
        raise _fail(where, f"the program was exported for batch size {sizes[0].get('as_int')} only; export with a "
                           "dynamic batch dimension: torch.export.export(model, (x,), "
                           "dynamic_shapes=({0: torch.export.Dim('batch')},))")
    input_shape = tuple(_int(s, "an image size", where) for s in sizes[1:])

    tensors = []
    for graph_name, kind, fqn, config in state:
        if fqn not in config:
            raise _fail(where, f"{kind} {fqn!r} has no record in the archive")
        tensors.append((graph_name, kind, _read_tensor(arc, "data/weights/" if config is weights else "data/constants/",
                                                       fqn, config[fqn])))
    plan = _check_graph(graph, {g for g, _, _ in tensors}, user_input, where, cap)
    _check_args(plan, where)
    if output not in {n for _, _, _, outs in plan for o in outs for n in _out_names(o)} | {user_input}:
        raise _fail(where, f"the output {output!r} is not computed by the graph")
    cost = _check_cost(plan, tensors, user_input, input_shape, where, cap)
    module = ExportedModule(plan, tensors, user_input, output, input_shape, where)
    module.fqns = {f"{kind[0]}{i}": fqn for i, (_, kind, fqn, _) in enumerate(state)}
    module.cost = cost
    _check_repeatable(module, where)
    return module


def _check_repeatable(module: ExportedModule, where: str) -> None:
    """Call the program PROBE_CALLS times on one probe image: it must run, change none of its
    tensors (the forward pass checks their version counters) and give identical outputs."""
    x = torch.rand(1, *module.input_shape, generator=torch.Generator().manual_seed(0))
    outs = []
    with torch.no_grad():
        for _ in range(PROBE_CALLS):
            try:
                outs.append(module(x))
            except ExportedProgramError:
                raise
            except Exception as e:  # noqa: BLE001 - whatever an operator raises, said in one line
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise _fail(where, f"the program fails on one probe image ({type(e).__name__}: {first[:160]})") \
                    from None
    if not torch.is_tensor(outs[0]):
        raise _fail(where, f"the program returns a {type(outs[0]).__name__}, not a tensor")
    first = outs[0]
    for k, o in enumerate(outs[1:], 2):
        same = torch.is_tensor(o) and o.shape == first.shape and o.dtype == first.dtype and \
            bool(((o == first) | (o.isnan() & first.isnan())).all())
        if not same:
            raise _fail(where, f"call {k} on the same probe image gave other outputs than call 1: the program keeps "
                               "hidden state or is random; a scored program must be a pure function")
