"""Checkpoint tensor kinds and sizes (issue 15): sparse, complex, quantized or integer weights and a
small compressed .pt that declares gigabytes are refused with a one-line CheckpointError, the
latter before torch.load inflates anything; a directory is not "missing"."""

from __future__ import annotations

import io
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from salbench.model_zoo import zoo
from salbench.model_zoo.architectures import build
from salbench.model_zoo.zoo import CheckpointError, load_checkpoint, read_state_dict


def _sd():
    torch.manual_seed(0)
    return build("lenet").state_dict()


@pytest.mark.parametrize("kind,expected", [
    ("sparse_coo", "sparse_coo tensor"),
    ("sparse_csr", "sparse_csr tensor"),
    ("complex", "complex tensor"),
    ("quantized", "quantized tensor"),
])
def test_non_dense_or_complex_tensors_are_refused(tmp_path, kind, expected):
    sd = _sd()
    w = sd["head.1.weight"]
    if kind == "sparse_coo":
        sd["head.1.weight"] = w.to_sparse()
    elif kind == "sparse_csr":
        sd["head.1.weight"] = w.to_sparse_csr()
    elif kind == "complex":
        sd["head.1.weight"] = torch.complex(w, torch.ones_like(w))
    else:
        sd["head.1.weight"] = torch.quantize_per_tensor(w, 0.01, 0, torch.qint8)
    p = tmp_path / f"{kind}.pt"
    torch.save(sd, p)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(p, "lenet")
    msg = str(e.value)
    assert expected in msg and "head.1.weight" in msg and len(msg.splitlines()) == 1, msg


def test_complex_safetensors_is_refused_not_truncated_to_real(tmp_path):
    sd = _sd()
    sd["head.1.weight"] = torch.complex(sd["head.1.weight"], torch.ones_like(sd["head.1.weight"]))
    p = tmp_path / "c.safetensors"
    try:
        save_file(sd, str(p))
    except Exception as e:  # a safetensors without complex support cannot even write it
        pytest.skip(f"safetensors cannot store complex tensors here ({e})")
    with pytest.raises(CheckpointError, match="complex tensor"):
        load_checkpoint(p, "lenet")


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
def test_integer_weights_where_floats_belong_are_refused(tmp_path, dtype):
    sd = _sd()
    sd["head.1.weight"] = sd["head.1.weight"].to(dtype)
    p = tmp_path / "int.safetensors"
    save_file(sd, str(p))
    with pytest.raises(CheckpointError, match="dtype mismatch.*head.1.weight"):
        load_checkpoint(p, "lenet")


def test_float64_weights_are_still_accepted(tmp_path):
    sd = {k: v.double() for k, v in _sd().items()}
    p = tmp_path / "f64.pt"
    torch.save(sd, p)
    m = load_checkpoint(p, "lenet")
    assert m.state_dict()["head.1.weight"].dtype == torch.float32


def _deflated_bomb(path, inflated_bytes: int) -> None:
    """A torch zip checkpoint whose one big record is deflated: a small file declaring
    ``inflated_bytes`` once inflated."""
    sd = _sd()
    sd["extra"] = torch.zeros(inflated_bytes // 4)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    with zipfile.ZipFile(buf) as src, zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info), compress_type=zipfile.ZIP_DEFLATED)


def test_compressed_pt_declaring_too_much_is_refused_before_inflating(tmp_path, monkeypatch):
    p = tmp_path / "bomb.pt"
    _deflated_bomb(p, 64 << 20)
    assert p.stat().st_size < 1 << 20  # a small file ...
    limit = zoo.arch_bytes_limit(build("lenet").state_dict())
    assert limit < 64 << 20  # ... that declares more than a LeNet can take

    def no_load(*a, **k):
        raise AssertionError("torch.load ran on a checkpoint whose declared size is over the limit")

    monkeypatch.setattr(zoo.torch, "load", no_load)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(p, "lenet")
    msg = str(e.value)
    assert "declare" in msg and "refused before reading" in msg and len(msg.splitlines()) == 1, msg
    with pytest.raises(CheckpointError, match="declare"):
        read_state_dict(p, max_bytes=1 << 20)


def test_file_larger_than_the_architecture_can_take_is_refused_unread(tmp_path, monkeypatch):
    p = tmp_path / "big.safetensors"
    limit = zoo.arch_bytes_limit(build("lenet").state_dict())
    with open(p, "wb") as f:
        f.truncate(limit + 1)  # sparse file: no disk used
    with pytest.raises(CheckpointError, match="more than the"):
        load_checkpoint(p, "lenet")


def test_a_directory_or_fifo_is_not_reported_missing(tmp_path):
    d = tmp_path / "dir.pt"
    d.mkdir()
    with pytest.raises(CheckpointError, match="not a regular file"):
        read_state_dict(d)
    import os

    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match="not a regular file"):
        read_state_dict(fifo)
