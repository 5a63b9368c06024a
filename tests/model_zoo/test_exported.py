"""Exported programs (.pt2): loaded equal to the module (outputs and gradients), and hostile files
refused without running anything from them (model_zoo/exported.py)."""

from __future__ import annotations

import json
import zipfile

import pytest
import torch
from torch import nn

from salbench import metrics
from salbench.model_zoo.exported import ExportedModule, ExportedProgramError, load_exported

from .pt2_craft import PlainLeNet, export_to, nodes, pickled_payload, rewrite


@pytest.fixture(scope="module")
def lenet_pt2(tmp_path_factory):
    torch.manual_seed(0)
    model = PlainLeNet().eval()
    return model, export_to(model, tmp_path_factory.mktemp("pt2") / "lenet.pt2")


def test_loaded_program_equals_the_module_at_other_batch_sizes(lenet_pt2):
    model, path = lenet_pt2
    loaded = load_exported(path)
    assert isinstance(loaded, ExportedModule) and loaded.input_shape == (1, 28, 28)
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())
    # the program and the eager module are two computation paths: oneDNN may pick other kernels for
    # each (and per CPU), so they agree to float32 rounding, not bit for bit (PROTOCOL §8.7)
    for b in (1, 3, 7):  # exported with batch 2
        x = torch.rand(b, 1, 28, 28, generator=torch.Generator().manual_seed(b))
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-6)
    loaded.train()  # the program is inference-only: train() changes nothing
    x = torch.rand(4, 1, 28, 28)
    torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"takes \(B, 1, 28, 28\) images"):
        loaded(torch.rand(2, 3, 28, 28))


def test_vg_and_ig_maps_equal_the_modules(lenet_pt2):
    """Gradients through the loaded program equal those through the original module (PROTOCOL §2)."""
    model, path = lenet_pt2
    loaded = load_exported(path)
    x = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    vg_m, vg_l = metrics.vanilla_gradient(model, x, y), metrics.vanilla_gradient(loaded, x, y)
    ig_m, ig_l = metrics.integrated_gradients(model, x, y), metrics.integrated_gradients(loaded, x, y)
    assert vg_m.abs().sum() > 0 and ig_m.abs().sum() > 0
    # two computation paths (program vs eager module): float32 rounding, not bit-identity (PROTOCOL §8.7)
    torch.testing.assert_close(vg_l, vg_m, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ig_l, ig_m, rtol=1e-5, atol=1e-7)
    # captum's internal batching calls the program with yet other batch sizes
    ig_chunked = metrics.integrated_gradients(loaded, x, y, internal_batch_size=7)
    torch.testing.assert_close(ig_chunked, ig_m, rtol=1e-5, atol=1e-7)


class TinyAttention(nn.Module):
    """Patches -> LayerNorm -> multi-head attention (scaled_dot_product_attention) -> GELU MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3 * 8 * 8, 32)
        self.attn = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, activation="gelu")
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        b = x.shape[0]
        p = x.reshape(b, 3, 4, 8, 4, 8).permute(0, 2, 4, 1, 3, 5).reshape(b, 16, -1)
        return self.head(self.attn(self.embed(p)).mean(1))


@pytest.mark.parametrize("arch", ["torchvision_resnet18", "attention"])
def test_other_architectures_load_and_match(tmp_path, arch):
    import torchvision

    torch.manual_seed(0)
    model = (torchvision.models.resnet18(num_classes=10) if arch != "attention" else TinyAttention()).eval()
    loaded = load_exported(export_to(model, tmp_path / f"{arch}.pt2", shape=(3, 32, 32)))
    x = torch.rand(3, 3, 32, 32)
    # two computation paths (exported program vs eager module; oneDNN may pick other kernels for each,
    # and per CPU): float32 rounding, not bit-identity (PROTOCOL §8.7). Logits are ~0.3-0.7 here.
    torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)
    y = torch.tensor([1, 2, 3])
    # VG entries are <= ~0.04 (median ~0.005): atol 1e-6 is ~3e-5 of the largest, far below a real defect
    torch.testing.assert_close(metrics.vanilla_gradient(loaded, x, y), metrics.vanilla_gradient(model, x, y),
                               rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- hostile files
def _weights_mark_pickled(fqn):
    def edit(cfg):
        cfg["config"][fqn]["use_pickle"] = True
    return edit


def test_pickled_member_with_a_payload_is_refused_and_never_runs(lenet_pt2, tmp_path):
    _, path = lenet_pt2
    marker = tmp_path / "pwned"
    cfg = json.loads(zipfile.ZipFile(path).read("lenet/data/weights/model_weights_config.json"))
    record = cfg["config"]["conv1.weight"]["path_name"]
    evil = rewrite(path, tmp_path / "evil.pt2", weights_config=_weights_mark_pickled("conv1.weight"),
                   replace={f"data/weights/{record}": pickled_payload(marker)})
    with pytest.raises(ExportedProgramError, match=r"tensor 'conv1.weight' is a pickled record that is not a plain "
                                                   r"tensor.*refused without running it"):
        load_exported(evil)
    assert not marker.exists()
    # the file is live: torch's own loader unpickles it with weights_only=False and runs the payload
    try:
        torch.export.load(evil)
    except Exception:
        pass
    assert marker.exists(), "torch.export.load no longer runs this payload; the crafted file is not hostile"


def test_payloads_in_members_salbench_never_reads_stay_inert(lenet_pt2, tmp_path):
    """The example inputs (torch falls back to weights_only=False for them) and a symbolic size
    expression (torch parses it with sympy.sympify, an eval) carry payloads; neither is read."""
    model, path = lenet_pt2
    marker_inputs, marker_expr = tmp_path / "inputs", tmp_path / "expr"

    def evil_expr(doc):
        x = doc["graph_module"]["graph"]["tensor_values"]["x"]
        x["sizes"][0]["as_expr"]["expr_str"] = f"__import__('os').system('touch {marker_expr}')"

    evil = rewrite(path, tmp_path / "evil.pt2", graph=evil_expr,
                   replace={"data/sample_inputs/model.pt": pickled_payload(marker_inputs)})
    loaded = load_exported(evil)
    x = torch.rand(3, 1, 28, 28)
    # program vs eager module: two paths, float32 rounding (PROTOCOL §8.7); logits ~0.1
    torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-6)
    assert not marker_inputs.exists() and not marker_expr.exists()
    try:  # both are live for torch's own loader
        torch.export.load(evil)
    except Exception:
        pass
    assert marker_inputs.exists() or marker_expr.exists()


def test_opaque_or_custom_object_constants_are_refused(lenet_pt2, tmp_path):
    _, path = lenet_pt2
    marker = tmp_path / "pwned"

    def add(cfg):
        cfg["config"]["obj"] = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}

    evil = rewrite(path, tmp_path / "evil.pt2", constants_config=add,
                   replace={"data/constants/opaque_obj_0": pickled_payload(marker)})
    with pytest.raises(ExportedProgramError, match="custom or opaque object"):
        load_exported(evil)
    assert not marker.exists()


@pytest.mark.parametrize("target", ["torch.ops.mylib.evil.default", "torch.os.system", "builtins.exec",
                                    "torch.ops.aten.from_file.default", "torch.ops.aten.relu.__call__"])
def test_a_graph_calling_an_unknown_op_is_refused_by_name(lenet_pt2, tmp_path, target):
    _, path = lenet_pt2

    def edit(doc):
        next(n for n in nodes(doc) if n["target"] == "torch.ops.aten.relu.default")["target"] = target

    with pytest.raises(ExportedProgramError, match=rf"calls '{target}', which SalBench does not run"):
        load_exported(rewrite(path, tmp_path / "op.pt2", graph=edit))


def test_in_place_write_to_a_parameter_is_refused_even_under_a_false_argument_name(lenet_pt2, tmp_path):
    """relu_ on a weight, its argument renamed so that a name-based check would miss it: arguments
    bind by schema position."""
    _, path = lenet_pt2

    def edit(doc):
        n = next(n for n in nodes(doc) if n["target"] == "torch.ops.aten.relu.default")
        n["target"] = "torch.ops.aten.relu_.default"
        n["inputs"] = [{"name": "not_self", "arg": {"as_tensor": {"name": "p_fc1_weight"}}, "kind": 1}]

    with pytest.raises(ExportedProgramError, match="writes in place to 'p_fc1_weight'"):
        load_exported(rewrite(path, tmp_path / "mut.pt2", graph=edit))


class Counting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))
        self.fc = nn.Linear(784, 10)

    def forward(self, x):
        self.calls.add_(1)
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("case, expected", [
    ("buffer_update", "writes in place to 'b_calls'"),
    ("batchnorm_train", "BatchNorm in training mode"),
    ("dropout_train", "dropout in training mode"),
    ("static_batch", r"exported for batch size 2 only; export with a dynamic batch dimension"),
])
def test_programs_that_change_state_or_fix_the_batch_are_refused(tmp_path, case, expected):
    torch.manual_seed(0)
    if case == "buffer_update":
        model = Counting()
    elif case == "batchnorm_train":
        model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False), nn.Flatten(),
                              nn.Linear(2 * 26 * 26, 10)).train()
    elif case == "dropout_train":
        model = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(784, 10)).train()
    else:
        model = PlainLeNet().eval()
    path = export_to(model, tmp_path / "m.pt2", dynamic=case != "static_batch")
    with pytest.raises(ExportedProgramError, match=expected):
        load_exported(path)


def test_damaged_files_are_refused_with_a_reason(lenet_pt2, tmp_path):
    _, path = lenet_pt2
    raw = path.read_bytes()
    (tmp_path / "trunc.pt2").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ExportedProgramError, match="not a torch.export archive"):
        load_exported(tmp_path / "trunc.pt2")
    cfg = json.loads(zipfile.ZipFile(path).read("lenet/data/weights/model_weights_config.json"))
    record = cfg["config"]["fc1.weight"]["path_name"]
    short = rewrite(path, tmp_path / "short.pt2", replace={f"data/weights/{record}": b"\0" * 40})
    with pytest.raises(ExportedProgramError, match="'fc1.weight'.*truncated or corrupt"):
        load_exported(short)
    nan = rewrite(path, tmp_path / "nan.pt2",
                  replace={f"data/weights/{record}": torch.full((120 * 256,), float("nan")).numpy().tobytes()})
    with pytest.raises(ExportedProgramError, match="'fc1.weight' holds non-finite"):
        load_exported(nan)
    bomb = tmp_path / "bomb.pt2"  # small on disk, declares 64 MiB once inflated
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("bomb/models/model.json", b"\0" * (64 << 20))
    assert bomb.stat().st_size < (1 << 20)
    with pytest.raises(ExportedProgramError, match="declare 67108864 bytes once inflated"):
        load_exported(bomb, max_bytes=1 << 20)
    (tmp_path / "dir.pt2").mkdir()
    with pytest.raises(ExportedProgramError, match="not a regular file"):
        load_exported(tmp_path / "dir.pt2")
    with pytest.raises(ExportedProgramError, match="does not exist"):
        load_exported(tmp_path / "none.pt2")


def _set(path: list, value):
    def edit(doc):
        node = doc
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
    return edit


@pytest.mark.parametrize("path, value", [
    (["graph_module", "graph", "nodes"], {"not": "a list"}),
    (["graph_module", "graph", "nodes", 0, "inputs"], "text"),
    (["graph_module", "graph", "nodes", 0, "inputs", 0, "arg"], {"as_tensor": {"name": 7}}),
    (["graph_module", "graph", "nodes", 0, "outputs"], [{"as_tensor": "x"}]),
    (["graph_module", "signature", "input_specs"], [1, 2]),
    (["graph_module", "signature"], None),
    (["graph_module", "graph", "tensor_values", "x", "sizes"], [{"as_expr": {}}, 1, 2, 3]),
    (["schema_version"], "8"),
])
def test_malformed_graph_documents_are_refused_not_crashed_on(lenet_pt2, tmp_path, path, value):
    _, src = lenet_pt2
    with pytest.raises(ExportedProgramError):
        load_exported(rewrite(src, tmp_path / "bad.pt2", graph=_set(path, value)))
