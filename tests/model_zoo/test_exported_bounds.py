"""Exported programs (.pt2) that are pure and bounded (issue 30 items 1, 3, 5; model_zoo/exported.py):
hidden state through undeclared aliases refused, every accepted program gives identical outputs
call after call; resource bombs (a huge tensor, a FLOP chain, a node flood, unbounded size
arithmetic, zip members the reader cannot or may not inflate) refused in one line, fast, in little
memory; malformed list options refused at parse time."""

# Bit-equality (torch.equal) below is the designed property, not a cross-path comparison: the same
# program called again on the same input in the same process must compute the same bits (a pure
# function); a stateful program differs by design. No other CPU or code path is compared.

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from salbench.benchmark.cli import build_parser, main
from salbench.model_zoo import exported as E
from salbench.model_zoo.exported import ExportedProgramError, load_exported

from .pt2_craft import export_to, members, rewrite

REPO = Path(__file__).resolve().parents[2]
BOMB_SECONDS = 10.0  # issue 30: each bomb refused in under 10 s ...
BOMB_RSS_BYTES = 1.5 * 2**30  # ... with a peak RSS under 1.5 GiB


class Base(nn.Module):
    """What the crafted programs start from: a parameter, a buffer, a tensor constant and the input
    (graph names p_fc_weight, p_fc_bias, b_calls, c_k, x)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))
        self.k = torch.ones(10)  # lifted by torch.export as the tensor constant c_k
        self.fc = nn.Linear(784, 10)

    def forward(self, x):
        return self.fc(x.flatten(1)) * (self.calls + 1) * self.k


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    torch.manual_seed(0)
    return export_to(Base().eval(), tmp_path_factory.mktemp("base") / "base.pt2")


# ----------------------------------------------------------------------------- crafting graphs
def T(name):
    return {"as_tensor": {"name": name}}


def SYM(name):
    return {"as_sym_int": {"as_name": name}}


def INT(v):
    return {"as_int": v}


def FLOAT(v):
    return {"as_float": v}


def BOOL(v):
    return {"as_bool": v}


def INTS(v):
    return {"as_ints": list(v)}


def node(target: str, args: list, out: str | None, kwargs: dict | None = None, out_kind: str = "tensor") -> dict:
    """One serialized node; ``target`` without ``torch.ops.aten.`` for ATen operators."""
    if not target.startswith(("_operator.", "math.", "torch.")):
        target = f"torch.ops.aten.{target}"
    inputs = [{"name": f"arg{i}", "arg": a, "kind": 1} for i, a in enumerate(args)]
    inputs += [{"name": k, "arg": v, "kind": 2} for k, v in (kwargs or {}).items()]
    outputs = [] if out is None else [{"as_tensor": {"name": out}} if out_kind == "tensor"
                                      else {"as_sym_int": {"as_name": out}}]
    return {"target": target, "inputs": inputs, "outputs": outputs, "metadata": {}, "name": out or "none"}


LOGITS = [node("flatten.using_ints", [T("x"), INT(1)], "flat"),
          node("linear.default", [T("flat"), T("p_fc_weight"), T("p_fc_bias")], "logits")]


def program(base: Path, dst: Path, nodes: list[dict], output: str = "logits") -> Path:
    """``base`` with its graph replaced by ``nodes`` (returning ``output``)."""
    def edit(doc):
        gm = doc["graph_module"]
        gm["graph"]["nodes"] = nodes
        gm["graph"]["outputs"] = [T(output)]
        gm["signature"]["output_specs"] = [{"user_output": {"arg": T(output)}}]

    return rewrite(base, dst, graph=edit)


def write_program(base: Path, dst: Path, nodes: list[dict], output: str = "logits") -> Path:
    """Like :func:`program`, with the JSON written straight (no parse of a big node list in the test)."""
    old = members(base)
    root = next(iter(old)).split("/", 1)[0] + "/"
    doc = json.loads(old[root + "models/model.json"])
    gm = doc["graph_module"]
    gm["graph"]["nodes"] = []
    gm["graph"]["outputs"] = [T(output)]
    gm["signature"]["output_specs"] = [{"user_output": {"arg": T(output)}}]
    head, tail = json.dumps(doc).split('"nodes": []', 1)
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as z:
        for name, data in old.items():
            if name != root + "models/model.json":
                z.writestr(name, data)
        with z.open(root + "models/model.json", "w", force_zip64=True) as f:
            f.write(head.encode() + b'"nodes": [')
            for i, n in enumerate(nodes):
                f.write((b", " if i else b"") + json.dumps(n).encode())
            f.write(b"]" + tail.encode())
    return dst


# ----------------------------------------------------------------------------- item 1: pure programs
def _counter(alias_op: list[dict]) -> list[dict]:
    """The known attack: a call counter in the buffer b_calls, reached through ``alias_op`` (which
    defines ``alias``); logits switched off after 40 calls."""
    return [*LOGITS, *alias_op,
            node("add_.Scalar", [T("alias"), FLOAT(1.0)], "bumped"),
            node("le.Scalar", [T("b_calls"), FLOAT(40.0)], "gate"),
            node("mul.Tensor", [T("logits"), T("gate")], "out")]


ALIASES = {  # operators that may return their input (or a view of it), declared by their schema or not
    "dropout_eval": [node("dropout.default", [T("b_calls"), FLOAT(0.0), BOOL(False)], "alias")],
    "type_as": [node("type_as.default", [T("b_calls"), T("b_calls")], "alias")],
    "_unsafe_view": [node("_unsafe_view.default", [T("b_calls"), INTS([1])], "alias")],
    "contiguous": [node("contiguous.default", [T("b_calls")], "alias")],
    "detach": [node("detach.default", [T("b_calls")], "alias")],
    "alias": [node("alias.default", [T("b_calls")], "alias")],
    "to": [node("to.dtype", [T("b_calls"), {"as_scalar_type": 7}], "alias")],
    "view": [node("view.default", [T("b_calls"), INTS([1])], "alias")],
    "reshape": [node("reshape.default", [T("b_calls"), INTS([1, 1])], "alias")],
    "expand": [node("expand.default", [T("b_calls"), INTS([1])], "alias")],
    "unsqueeze_t": [node("unsqueeze.default", [T("b_calls"), INT(0)], "u"),
                    node("unsqueeze.default", [T("u"), INT(0)], "u2"), node("t.default", [T("u2")], "alias")],
    "chain": [node("dropout.default", [T("b_calls"), FLOAT(0.0), BOOL(False)], "a1"),  # an alias of an alias
              node("type_as.default", [T("a1"), T("a1")], "a2"),
              node("_unsafe_view.default", [T("a2"), INTS([1])], "alias")],
}


@pytest.mark.parametrize("how", sorted(ALIASES))
def test_a_counter_kept_through_an_alias_of_a_buffer_is_refused(base, tmp_path, how):
    with pytest.raises(ExportedProgramError, match=r"node \d+ \(bumped\) \(torch.ops.aten.add_.Scalar\) writes in place to "
                                                   r"'alias', a parameter, buffer, constant or the input \(or a "
                                                   r"tensor that may alias one\)"):
        load_exported(program(base, tmp_path / "counter.pt2", _counter(ALIASES[how]), "out"))


def test_the_40_call_counter_is_live_and_each_layer_catches_it(base, tmp_path, monkeypatch):
    """The attack works against a reader that trusts undeclared aliases (dropout in eval): then the
    run-time check (version counters of what outlives a call) refuses it on the first probe call;
    with that off too, it passes the 3 probe calls and switches its logits off after 40 calls."""
    path = program(base, tmp_path / "counter.pt2", _counter(ALIASES["dropout_eval"]), "out")
    with pytest.raises(ExportedProgramError, match="writes in place to 'alias'"):
        load_exported(path)
    monkeypatch.setattr(E, "FRESH_OPS", E.FRESH_OPS | {"dropout"})  # the old rule: no alias declared, none taken
    with pytest.raises(ExportedProgramError, match="changed a parameter, buffer, constant or its input while "
                                                   "running; a scored program must be a pure function"):
        load_exported(path)
    monkeypatch.setattr(E, "_versions", lambda tensors: [0] * len(tensors))
    model = load_exported(path)  # 3 identical probe calls: the counter is at 3
    x = torch.rand(2, 1, 28, 28)
    outs = [model(x) for _ in range(45)]
    assert all(torch.equal(o, outs[0]) for o in outs[:37]) and outs[0].abs().sum() > 0
    assert torch.equal(outs[-1], torch.zeros_like(outs[-1]))  # "a different function" from call 41 on


@pytest.mark.parametrize("case", ["param_view_mul_", "input_view_relu_", "constant_type_as_add_", "copy_into_buffer",
                                  "out_variant_into_param", "fill_param_alias", "zero_constant"])
def test_writes_to_parameters_constants_and_the_input_are_refused(base, tmp_path, case):
    nodes = {
        "param_view_mul_": [node("view.default", [T("p_fc_bias"), INTS([10])], "v"),
                            node("mul_.Scalar", [T("v"), FLOAT(1.5)], "w")],
        "input_view_relu_": [node("view.default", [T("x"), INTS([-1])], "v"), node("relu_.default", [T("v")], "w")],
        "constant_type_as_add_": [node("type_as.default", [T("c_k"), T("c_k")], "v"),
                                  node("add_.Scalar", [T("v"), FLOAT(1.0)], "w")],
        "copy_into_buffer": [node("copy_.default", [T("b_calls"), T("b_calls")], "w")],
        "out_variant_into_param": [node("add.out", [T("p_fc_bias"), T("p_fc_bias")], "w",
                                        kwargs={"out": T("p_fc_bias")})],
        "fill_param_alias": [node("dropout.default", [T("p_fc_weight"), FLOAT(0.0), BOOL(False)], "v"),
                             node("fill_.Scalar", [T("v"), FLOAT(0.0)], "w")],
        "zero_constant": [node("detach.default", [T("c_k")], "v"), node("zero_.default", [T("v")], "w")],
    }[case]
    with pytest.raises(ExportedProgramError, match="writes in place to"):
        load_exported(program(base, tmp_path / "w.pt2", [*nodes, *LOGITS]))


def test_in_place_ops_on_fresh_tensors_are_accepted_and_repeatable(base, tmp_path):
    """What torchvision's ResNet does (ReLU(inplace=True), out += identity), also with a parameter
    added in place to a fresh tensor and an alias of a fresh tensor written to."""
    nodes = [*LOGITS,
             node("add_.Tensor", [T("logits"), T("p_fc_bias")], "a"),  # in place on a fresh tensor
             node("relu_.default", [T("a")], "r"),
             node("view.default", [T("r"), INTS([-1])], "v"),  # a view of a fresh tensor
             node("mul_.Scalar", [T("v"), FLOAT(2.0)], "m"),
             node("dropout.default", [T("r"), FLOAT(0.0), BOOL(False)], "d"),
             node("mul.Tensor", [T("d"), T("c_k")], "out")]
    model = load_exported(program(base, tmp_path / "ok.pt2", nodes, "out"))
    x = torch.rand(3, 1, 28, 28)
    w, b = model.state_dict()["p0"], model.state_dict()["p1"]
    expected = torch.relu(x.flatten(1) @ w.T + b + b) * 2
    outs = [model(x) for _ in range(5)]
    assert all(torch.equal(o, outs[0]) for o in outs)
    torch.testing.assert_close(outs[0], expected)  # same operators, same order: float32 rounding at most


def test_attention_dropout_is_refused(base, tmp_path):
    q = [node("view.default", [T("x"), INTS([-1, 1, 28, 28])], "q")]
    nodes = [*q, node("scaled_dot_product_attention.default", [T("q"), T("q"), T("q")], "att",
                      kwargs={"dropout_p": FLOAT(0.5)}), *LOGITS]
    with pytest.raises(ExportedProgramError, match="runs attention dropout"):
        load_exported(program(base, tmp_path / "sdpa.pt2", nodes))


def _storage(t):
    return t.untyped_storage().data_ptr()


def test_fresh_operators_never_return_an_input_even_in_their_identity_cases():
    """FRESH_OPS is the list the alias analysis trusts: spot-check each family where it could be
    tempted to hand its input back (zero padding, repeat by 1, power 1, floor of integers, ...),
    and that the operators it leaves out do return their input."""
    A = torch.ops.aten
    x, xi = torch.rand(2, 3, 4, 4), torch.randint(0, 5, (2, 3, 4, 4))
    fresh = {
        "constant_pad_nd": lambda: A.constant_pad_nd.default(x, [0, 0]), "repeat": lambda: A.repeat.default(x, [1] * 4),
        "pow": lambda: A.pow.Tensor_Scalar(x, 1), "floor": lambda: A.floor.default(xi), "round": lambda: A.round.default(xi),
        "sum": lambda: A.sum.dim_IntList(x, []), "roll": lambda: A.roll.default(x, [0]), "flip": lambda: A.flip.default(x, []),
        "cat": lambda: A.cat.default([x]), "adaptive_avg_pool2d": lambda: A.adaptive_avg_pool2d.default(x, [4, 4]),
        "max_pool2d": lambda: A.max_pool2d.default(x, [1, 1]), "matmul": lambda: A.matmul.default(x, torch.eye(4)),
        "linear": lambda: A.linear.default(x, torch.eye(4)), "mul": lambda: A.mul.Scalar(x, 1),
        "softmax": lambda: A.softmax.int(x, 1, torch.float32), "_to_copy": lambda: A._to_copy.default(x),
        "batch_norm": lambda: A.batch_norm.default(x, None, None, torch.zeros(3), torch.ones(3), False, 0.1, 0.0, False),
        "tril": lambda: A.tril.default(x, 100), "index_select": lambda: A.index_select.default(x, 0, torch.arange(2)),
        "clamp": lambda: A.clamp.default(x, -10.0, 10.0), "repeat_interleave": lambda: A.repeat_interleave.self_int(x, 1),
        "upsample_nearest2d": lambda: A.upsample_nearest2d.vec(x, [4, 4], None), "copy": lambda: A.copy.default(x, x),
        "scaled_dot_product_attention": lambda: A.scaled_dot_product_attention.default(x, x, x),
    }
    assert set(fresh) <= E.FRESH_OPS <= E.ALLOWED_OPS
    for name, call in fresh.items():
        assert _storage(call()) not in (_storage(x), _storage(xi)), name
    returns_input = {"dropout": lambda: A.dropout.default(x, 0.0, False), "type_as": lambda: A.type_as.default(x, x),
                     "contiguous": lambda: A.contiguous.default(x), "to": lambda: A.to.dtype(x, torch.float32),
                     "_unsafe_view": lambda: A._unsafe_view.default(x, [-1]), "reshape": lambda: A.reshape.default(x, [-1]),
                     "flatten": lambda: A.flatten.using_ints(x, 0, 0)}
    for name, call in returns_input.items():
        assert name not in E.FRESH_OPS and _storage(call()) == _storage(x), name


# ----------------------------------------------------------------------------- every real program still loads
def _zoo_archs():
    from salbench.model_zoo.architectures import registry

    return registry.list_archs()


@pytest.mark.parametrize("arch", _zoo_archs())
def test_every_zoo_architecture_exported_loads_under_the_default_caps(tmp_path, arch):
    from salbench.model_zoo.architectures import registry
    from salbench.model_zoo.datasets import get_spec

    spec = registry.arch_spec(arch)
    shape = tuple(get_spec(spec.datasets[0]).input_shape)
    torch.manual_seed(0)
    model = registry.build(arch, dataset=spec.datasets[0]).eval()
    loaded = load_exported(export_to(model, tmp_path / f"{arch}.pt2", shape=shape))
    cost, caps = loaded.cost, E.current_limits()
    assert cost["nodes"] <= caps.max_nodes and cost["peak_tensor_bytes"] <= caps.max_tensor_bytes
    assert 0 < cost["gflops_per_image"] <= caps.max_gflops_per_image / 4  # a margin of 4x at least
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(1))
    outs = [loaded(x) for _ in range(4)]
    assert all(torch.equal(o, outs[0]) for o in outs)
    with torch.no_grad():  # program vs eager module: two computation paths, float32 rounding (PROTOCOL §8.7)
        torch.testing.assert_close(outs[0], model(x), rtol=1e-4, atol=1e-5)


def test_torchvision_resnet18_at_224_loads_under_the_default_caps(tmp_path):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    loaded = load_exported(export_to(model, tmp_path / "r18.pt2", shape=(3, 224, 224)))
    cost = loaded.cost
    assert cost["nodes"] == 69
    assert 3.5 < cost["gflops_per_image"] < 3.8  # torch.utils.flop_counter says 3.63 (convolutions and fc)
    assert cost["peak_tensor_bytes"] == 64 * 112 * 112 * 4  # the stem's output
    caps = E.current_limits()
    assert cost["gflops_per_image"] * 10 < caps.max_gflops_per_image and cost["peak_tensor_bytes"] * 100 < caps.max_tensor_bytes
    x = torch.rand(1, 3, 224, 224)
    outs = [loaded(x) for _ in range(3)]
    assert all(torch.equal(o, outs[0]) for o in outs)


# ----------------------------------------------------------------------------- item 3: caps, in-process
def test_caps_are_refused_naming_the_estimate_and_the_option_and_raising_them_admits(base, tmp_path):
    chain = [node("full.default", [INTS([512, 512]), FLOAT(0.001)], "m0")]
    for i in range(3):
        chain.append(node("mm.default", [T(f"m{i}"), T("m0")], f"m{i + 1}"))
    path = program(base, tmp_path / "chain.pt2", [*chain, *LOGITS])  # 3 x 2 x 512^3 = 0.805 GFLOPs
    assert load_exported(path).cost["gflops_per_image"] == pytest.approx(0.805, abs=0.001)
    with pytest.raises(ExportedProgramError) as e:
        load_exported(path, limits=E.Limits(E.MAX_NODES, E.MAX_TENSOR_BYTES, 0.5))
    msg = str(e.value)
    assert re.search(r"it needs an estimated 0\.80\d* GFLOPs per image", msg) and "cap of 0.5 GFLOPs per image" in msg
    assert "salbench score --max-gflops-per-image G" in msg and len(msg.splitlines()) == 1
    with E.limits(max_nodes=3):
        with pytest.raises(ExportedProgramError, match=r"has 6 nodes .* cap of 3 nodes.*--max-nodes N"):
            load_exported(path)
    big = program(base, tmp_path / "big.pt2", [node("full.default", [INTS([16 << 20]), FLOAT(1.0)], "big"),
                                               *LOGITS])  # 64 MiB
    with E.limits(max_tensor_bytes=32 << 20):
        with pytest.raises(ExportedProgramError, match=r"largest tensor it makes for one image, at node 0 \(full.default, "
                                                       r"shape \(16777216,\)\), is 67108864 bytes.*--max-tensor-bytes"):
            load_exported(big)
    with E.limits(max_tensor_bytes=128 << 20):
        assert load_exported(big).cost["peak_tensor_bytes"] == 64 << 20


def test_score_options_reach_the_loader(base, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SALBENCH_LEADERBOARDS_DIR", str(tmp_path / "lb"))
    path = program(base, tmp_path / "p.pt2", LOGITS)
    for option, value, said in (("--max-gflops-per-image", "1e-6", "GFLOPs per image"),
                                ("--max-nodes", "1", "has 2 nodes"),
                                ("--max-tensor-bytes", "100", "bytes")):
        rc = main(["score", str(path), "--dataset", "fmnist", "--name", "p", "--quiet", option, value])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and said in err and option in err and len(err.splitlines()) == 1, err
    assert E.current_limits() == E.Limits(E.MAX_NODES, E.MAX_TENSOR_BYTES, E.MAX_GFLOPS_PER_IMAGE)  # left as it was
    helps = {a.dest: a.help for a in next(a for a in build_parser()._actions if a.dest == "command").choices["score"]._actions}
    assert f"(default: {E.MAX_NODES})" in helps["max_nodes"]
    assert f"(default: {E.MAX_TENSOR_BYTES}," in helps["max_tensor_bytes"]
    assert f"(default: {E.MAX_GFLOPS_PER_IMAGE:g})" in helps["max_gflops_per_image"]


def test_a_tensor_growing_faster_than_the_batch_is_refused(base, tmp_path):
    nodes = [*LOGITS, node("t.default", [T("flat")], "ft"), node("mm.default", [T("flat"), T("ft")], "gram")]
    with pytest.raises(ExportedProgramError, match="tensor 'gram' has 1 elements for one image and 4 for two: it grows "
                                                   "faster than the batch"):
        load_exported(program(base, tmp_path / "gram.pt2", nodes))


@pytest.mark.parametrize("nodes, expected", [
    ([node("sym_size.int", [T("x"), INT(0)], "s", out_kind="sym"),
      node("_operator.pow", [SYM("s"), INT(3)], "p", out_kind="sym"),
      node("_operator.pow", [SYM("p"), INT(65)], "q", out_kind="sym")], "raises to the power 65, beyond the bound 64"),
    ([node("sym_size.int", [T("x"), INT(0)], "s", out_kind="sym"),
      node("_operator.mod", [SYM("s"), INT(0)], "q", out_kind="sym")], "divides by zero"),
    ([node("sym_size.int", [T("x"), INT(0)], "s", out_kind="sym"),
      node("_operator.add", [SYM("s"), INT(2**62)], "q", out_kind="sym")], "overflows"),
    ([node("sym_size.int", [T("x"), INT(0)], "s", out_kind="sym"),
      node("_operator.add", [SYM("s"), INT(2**70)], "q", out_kind="sym")], "operand a 71-bit integer is beyond the bound"),
    ([node("sym_size.int", [T("x"), INT(0)], "s", out_kind="sym"),
      node("torch.sym_float", [SYM("s")], "f", out_kind="sym"),
      node("_operator.sub", [SYM("s"), INT(2)], "n", out_kind="sym"),
      node("math.sqrt", [SYM("n")], "r", out_kind="sym")], "has no result"),
    ([node("full.default", [INTS([1 << 28]), INT(0)], "ints", kwargs={"dtype": {"as_scalar_type": 2}}),
      node("split.Tensor", [T("ints"), INT(1)], "pieces")], "splits a tensor into 268435456 pieces"),
    ([node("view.default", [T("x"), INTS([5, -1])], "v")], "fails when its shapes are worked out for a batch of 1"),
])
def test_size_arithmetic_and_shapes_are_bounded(base, tmp_path, nodes, expected):
    with pytest.raises(ExportedProgramError, match=expected) as e:
        load_exported(program(base, tmp_path / "sym.pt2", [*nodes, *LOGITS]))
    assert len(str(e.value).splitlines()) == 1


# ----------------------------------------------------------------------------- bombs, through `salbench score`
# One child process runs `salbench score` (cli.main) on every bomb after a warm-up call that imports
# the scoring stack: per bomb, its exit code, output, wall and CPU seconds and the process's peak RSS
# during that call (VmHWM, reset before each call through /proc/self/clear_refs), plus what the
# start-up cost; a cold `salbench score` of a bomb costs start-up + bomb.
_CHILD = """
import contextlib, io, json, os, resource, sys, time, traceback

def hwm():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))

def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime

def call(argv):
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak RSS starts again from the current RSS
    out, err = io.StringIO(), io.StringIO()
    t0, c0 = time.monotonic(), cpu()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
        except BaseException:
            rc = "crashed"
            err.write(traceback.format_exc())
    return {"rc": rc, "out": out.getvalue(), "err": err.getvalue(), "wall": time.monotonic() - t0,
            "cpu": cpu() - c0, "rss": hwm()}

t0 = time.monotonic()
from salbench.benchmark.cli import main
jobs = json.loads(os.environ["BOUNDS_JOBS"])
startup = call(jobs.pop("warm-up"))
startup["wall"], startup["cpu"] = time.monotonic() - t0, cpu()
report = {"startup": startup, "bombs": {name: call(argv) for name, argv in jobs.items()}}
with open(os.environ["BOUNDS_REPORT"], "w") as f:
    json.dump(report, f)
"""


@pytest.fixture(scope="module")
def bomb_runs(base, tmp_path_factory):
    """Every bomb through `salbench score` in one child process (see _CHILD)."""
    tmp = tmp_path_factory.mktemp("bombs")
    made = {kind: _bomb(kind, base, tmp) for kind in BOMBS}
    paths = {kind: path for kind, (path, _) in made.items()}
    argv = ["--threads", "1", "score", "{}", "--dataset", "fmnist", "--name", "bomb", "--quiet"]
    jobs = {"warm-up": [a.format(tmp / "none.pt2") for a in argv]}
    jobs |= {kind: [a.format(path) for a in argv] for kind, path in paths.items()}
    env = dict(os.environ, SALBENCH_LEADERBOARDS_DIR=str(tmp / "lb"), SALBENCH_ZOO_DIR=str(tmp / "zoo"),
               SALBENCH_IMAGESETS_DIR=str(tmp / "sets"), BOUNDS_JOBS=json.dumps(jobs),
               BOUNDS_REPORT=str(tmp / "report.json"))
    p = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads((tmp / "report.json").read_text())
    report["lb"], report["made"] = tmp / "lb", made
    return report


def _patch_member(src: Path, dst: Path, suffix: str, *, method: int | None = None, flags: int = 0) -> Path:
    """``src`` with one member's compression method and/or general-purpose flags changed in both its
    local header and its central directory record (what a deflate64 or encrypting zip tool writes)."""
    raw = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(suffix))
    name = info.filename.encode()
    local = info.header_offset
    assert raw[local:local + 4] == b"PK\x03\x04"
    central = [i for i in range(len(raw)) if raw.startswith(b"PK\x01\x02", i)
               and raw[i + 46:i + 46 + struct.unpack_from("<H", raw, i + 28)[0]] == name]
    assert len(central) == 1
    for flag_at, method_at in ((local + 6, local + 8), (central[0] + 8, central[0] + 10)):
        struct.pack_into("<H", raw, flag_at, struct.unpack_from("<H", raw, flag_at)[0] | flags)
        if method is not None:
            struct.pack_into("<H", raw, method_at, method)
    dst.write_bytes(bytes(raw))
    return dst


def _bomb(kind: str, base: Path, tmp: Path) -> tuple[Path, str]:
    s = [node("sym_size.int", [T("x"), INT(0)], "s", out_kind="sym")]
    if kind == "full_3GB":
        return (program(base, tmp / "full.pt2", [node("full.default", [INTS([750_000_000]), FLOAT(1.0)], "big"),
                                                 *LOGITS]),
                "is 3000000000 bytes (2.79 GiB), more than the cap of 1073741824 bytes")
    if kind == "matmul_chain_400x2048":
        chain = [node("full.default", [INTS([2048, 2048]), FLOAT(0.001)], "m0")]
        chain += [node("mm.default", [T(f"m{i}"), T("m0")], f"m{i + 1}") for i in range(400)]
        return program(base, tmp / "chain.pt2", [*chain, *LOGITS]), "an estimated 6872 GFLOPs per image"
    if kind == "sym_huge_power":
        return (program(base, tmp / "pow.pt2", [*s, node("_operator.pow", [SYM("s"), INT(10**9)], "p", out_kind="sym"),
                                                node("view.default", [T("x"), {"as_sym_ints": [{"as_name": "p"}, {"as_int": -1}]}],
                                                     "v"), *LOGITS]),
                "size arithmetic raises to the power 1e+09, beyond the bound 64")
    if kind == "sym_division_by_zero":
        return (program(base, tmp / "div0.pt2", [*s, node("_operator.sub", [SYM("s"), SYM("s")], "z", out_kind="sym"),
                                                 node("_operator.floordiv", [SYM("s"), SYM("z")], "q", out_kind="sym"),
                                                 *LOGITS]),
                "size arithmetic divides by zero")
    if kind == "sym_overflow":
        big = [node("_operator.mul", [SYM("s"), INT(2**40)], "a", out_kind="sym"),
               node("_operator.mul", [SYM("a"), SYM("a")], "b", out_kind="sym")]
        return program(base, tmp / "ovf.pt2", [*s, *big, *LOGITS]), "size arithmetic overflows: its result a 81-bit"
    if kind == "sym_float_overflow":
        f = [node("torch.sym_float", [SYM("s")], "f", out_kind="sym"),
             node("_operator.mul", [SYM("f"), FLOAT(2.0**61)], "g", out_kind="sym"),
             node("_operator.mul", [SYM("g"), SYM("g")], "h", out_kind="sym")]
        return program(base, tmp / "fovf.pt2", [*s, *f, *LOGITS]), "size arithmetic overflows: its result 5.32e+36"
    if kind == "deflate64_member":
        return (_patch_member(base, tmp / "d64.pt2", "models/model.json", method=9),
                "is compressed with method 9 (deflate64) (stored or deflate only)")
    if kind == "encrypted_member":
        return (_patch_member(base, tmp / "enc.pt2", "data/weights/model_weights_config.json", flags=0x1),
                "is flagged as encrypted (zip flag bit 0)")
    if kind == "relu_chain_199900":
        chain = [node("relu.default", [T("logits" if i == 0 else f"r{i - 1}")], f"r{i}") for i in range(199_900)]
        return (write_program(base, tmp / "relus.pt2", [*LOGITS, *chain], "r199899"),
                "the graph has 199902 nodes (counted in models/model.json before parsing it), more than the cap of "
                "10000 nodes")
    if kind == "split_flood":
        return (program(base, tmp / "split.pt2", [node("full.default", [INTS([1 << 28]), INT(0)], "i8",
                                                       kwargs={"dtype": {"as_scalar_type": 2}}),
                                                  node("split.Tensor", [T("i8"), INT(1)], "pieces"), *LOGITS]),
                "splits a tensor into 268435456 pieces")
    raise AssertionError(kind)


BOMBS = ["full_3GB", "matmul_chain_400x2048", "sym_huge_power", "sym_division_by_zero", "sym_overflow",
         "sym_float_overflow", "deflate64_member", "encrypted_member", "relu_chain_199900", "split_flood"]


@pytest.mark.parametrize("kind", BOMBS)
def test_bombs_are_refused_in_one_line_fast_and_small(bomb_runs, kind):
    path, expected = bomb_runs["made"][kind]
    t0 = time.monotonic()
    with pytest.raises(ExportedProgramError, match=re.escape(expected)):
        load_exported(path)  # the reader alone, in this process
    reader = time.monotonic() - t0
    run, start = bomb_runs["bombs"][kind], bomb_runs["startup"]
    assert start["rc"] == 2 and "does not exist" in start["err"], start
    # pytest -s shows the measurements. A cold `salbench score` of the bomb costs the start-up (importing
    # torch and the scoring stack, once) plus the bomb; on a machine whose cores are busy the wall time
    # stretches, so the bound is on CPU time (and the bomb's own wall time)
    print(f"{kind}: reader {reader:.3f} s; salbench score: start-up {start['wall']:.1f} s wall / {start['cpu']:.1f} s "
          f"CPU, then the bomb {run['wall']:.3f} s wall / {run['cpu']:.3f} s CPU, peak RSS {run['rss'] / 2**20:.0f} MiB")
    assert run["rc"] == 2, run
    lines = run["err"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("salbench: rejected: ") and expected in lines[0], run["err"]
    assert "Traceback" not in run["out"] + run["err"] and not run["out"].strip()
    assert reader < 2.0 and run["wall"] < BOMB_SECONDS and start["cpu"] + run["cpu"] < BOMB_SECONDS, (reader, run)
    assert run["rss"] < BOMB_RSS_BYTES, run
    assert not bomb_runs["lb"].exists()  # nothing written


# ----------------------------------------------------------------------------- item 5: list options
@pytest.mark.parametrize("argv, said", [
    (["score", "m.pt2", "--dataset", "fmnist", "--name", "a", "--methods", ""], "got '' (empty)"),
    (["score", "m.pt2", "--dataset", "fmnist", "--name", "a", "--methods", ",,"], "got ',,' (empty)"),
    (["score", "m.pt2", "--dataset", "fmnist", "--name", "a", "--methods", "VG,,IG"], "'VG,,IG' has an empty item"),
    (["score", "m.pt2", "--dataset", "fmnist", "--name", "a", "--methods", "VG,"], "'VG,' has an empty item"),
    (["score", "m.pt2", "--dataset", "fmnist", "--name", "a", "--methods", "VG,XG"], "unknown attribution method 'XG'"),
    (["score", "m.pt2", "--dataset", "fmnist", "--name", "a", "--methods", "IG,IG"], "names 'IG' more than once"),
    (["leaderboard", "--dataset", "fmnist", "--methods", " "], "(empty)"),
    (["run", "--dataset", "fmnist", "--only", ""], "argument --only: expected a comma-separated list of ids"),
    (["leaderboard", "--dataset", "fmnist", "--only", "a,,b"], "'a,,b' has an empty item"),
    (["zoo", "autoattack", "--only", ","], "argument --only"),
    (["imageset", "build", "--dataset", "fmnist", "--ref", "N"], "expected VARIANT=ID"),
    (["imageset", "build", "--dataset", "fmnist", "--ref", "=x"], "expected VARIANT=ID"),
    (["score", "m.pt2", "--dataset", "fmnist", "--name", "a", "--max-gflops-per-image", "0"], "positive number"),
    (["score", "m.pt2", "--dataset", "fmnist", "--name", "a", "--max-nodes", "-1"], "must be >= 1"),
])
def test_empty_or_malformed_list_options_are_refused_at_parse_time(argv, said, capsys):
    t0 = time.monotonic()
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and said in err and len(err.splitlines()) == 1, err
    assert time.monotonic() - t0 < 10


def test_well_formed_lists_are_normalised():
    args = build_parser().parse_args(["score", "m.pt2", "--dataset", "fmnist", "--name", "a", "--methods", " VG , IG"])
    assert args.methods == "VG,IG"
    args = build_parser().parse_args(["leaderboard", "--dataset", "fmnist", "--only", "a, b", "--only", "c"])
    assert args.only == ["a,b", "c"]


def test_raised_caps_travel_with_the_card_to_verify_and_the_site(base, tmp_path, monkeypatch):
    """A program scored under raised caps records them on its card (``exported_limits``), and
    ``load_submission`` (what `salbench verify` and the site's galleries use) reads it under them."""
    from salbench.benchmark import submit as S

    monkeypatch.setenv("SALBENCH_LEADERBOARDS_DIR", str(tmp_path / "lb"))
    path = program(base, tmp_path / "p.pt2", LOGITS)
    sub = tmp_path / "subs"
    _, plain, _ = S.prepare_submission(path, arch=None, dataset="fmnist", name="plain", submissions_dir=sub)
    assert "exported_limits" not in plain and S.card_limits(plain) == {}
    with E.limits(max_nodes=E.MAX_NODES * 2):
        _, card, payload = S.prepare_submission(path, arch=None, dataset="fmnist", name="raised", submissions_dir=sub)
    assert card["exported_limits"] == {"max_nodes": E.MAX_NODES * 2, "max_tensor_bytes": E.MAX_TENSOR_BYTES,
                                       "max_gflops_per_image": E.MAX_GFLOPS_PER_IMAGE}
    S.store_submission(card, payload, sub)
    assert S.load_submission(card, sub) is not None  # loads under the recorded caps
    card["exported_limits"] = {"max_nodes": 1}  # the card's caps are the ones applied: now refused
    with pytest.raises(S.SubmissionError, match="cap of 1 nodes"):
        S.load_submission(card, sub)
    for bad in ({"max_nodes": -1}, {"max_nodes": True}, {"other": 3}, [1]):
        card["exported_limits"] = bad
        with pytest.raises(S.SubmissionError, match="malformed exported_limits"):
            S.load_submission(card, sub)
