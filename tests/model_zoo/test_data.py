"""Dataset loading (PROTOCOL §1): every on-disk format, written here in tmp_path, plus the real
splits when they are installed."""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from salbench.model_zoo import data
from salbench.model_zoo.data import DatasetNotFoundError, Split, load_split, read_idx


# ----------------------------------------------------------------------------- writers
def write_idx(path: Path, arr: np.ndarray, *, gz: bool) -> Path:
    """The idx format: magic 0x0000 08 <ndim>, big-endian uint32 dims, then the uint8 data."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    raw = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape) + arr.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return path


def write_cifar_bin(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """CIFAR-10 binary records: <1 label byte><1024 R><1024 G><1024 B> per image."""
    recs = np.concatenate([labels.astype(np.uint8)[:, None], images.reshape(len(images), -1)], axis=1)
    assert recs.shape[1] == 3073
    path.write_bytes(recs.tobytes())


def _rng(seed):
    return np.random.default_rng(seed)


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No system copy, no env override, an empty $SALBENCH_DATA: only what a test writes exists."""
    for var in ("SALBENCH_FMNIST_DIR", "SALBENCH_CIFAR10_DIR", "SALBENCH_IMAGENETTE_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SALBENCH_DATA", str(tmp_path / "data_home"))
    monkeypatch.setattr(data, "FMNIST_SYSTEM_DIR", tmp_path / "no_system_fmnist")
    monkeypatch.setattr(data, "CIFAR10_OFFLINE_DIR", tmp_path / "no_offline_cifar")
    return tmp_path


# ----------------------------------------------------------------------------- FMNIST
@pytest.mark.parametrize("gz", [True, False], ids=["gz", "plain"])
def test_fmnist_idx(isolated, gz):
    root = isolated / "fm"
    root.mkdir()
    rng = _rng(0)
    imgs = {s: rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for s, n in (("test", 5), ("train", 7))}
    lbls = {s: rng.integers(0, 10, len(imgs[s]), dtype=np.uint8) for s in imgs}
    write_idx(root / "t10k-images-idx3-ubyte", imgs["test"], gz=gz)
    write_idx(root / "t10k-labels-idx1-ubyte", lbls["test"], gz=gz)
    write_idx(root / "train-images-idx3-ubyte", imgs["train"], gz=gz)
    write_idx(root / "train-labels-idx1-ubyte", lbls["train"], gz=gz)
    for split in ("test", "train"):
        s = load_split("fmnist", split, root=root, download=False)
        assert (s.dataset, s.split, s.source) == ("fmnist", split, str(root))
        assert s.images.dtype == torch.uint8 and s.images.shape == (len(imgs[split]), 1, 28, 28)
        assert s.labels.dtype == torch.int64
        np.testing.assert_array_equal(s.images[:, 0].numpy(), imgs[split])
        np.testing.assert_array_equal(s.labels.numpy(), lbls[split])
        assert len(s) == len(imgs[split])


def test_idx_truncated(tmp_path):
    p = write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((5, 28, 28), np.uint8), gz=False)
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(p)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(5, np.uint8), gz=False)
    with pytest.raises(ValueError, match="truncated"):
        load_split("fmnist", "test", root=tmp_path, download=False)


def test_idx_bad_magic(tmp_path):
    p = tmp_path / "x-idx3-ubyte"
    p.write_bytes(b"\x00\x00\x0d\x01" + (3).to_bytes(4, "big") + b"\x00" * 12)  # float idx
    with pytest.raises(ValueError, match="magic"):
        read_idx(p)


def test_fmnist_image_label_count_mismatch(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((5, 28, 28), np.uint8), gz=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(4, np.uint8), gz=True)
    with pytest.raises(ValueError, match="5 images but .* 4 labels"):
        load_split("fmnist", "test", root=tmp_path, download=False)


# ----------------------------------------------------------------------------- CIFAR-10
def _cifar(n, seed):
    rng = _rng(seed)
    return rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)


def test_cifar_binary_test_and_train_bin(isolated):
    root = isolated / "c"
    root.mkdir()
    (ti, tl), (ri, rl) = _cifar(4, 1), _cifar(6, 2)
    write_cifar_bin(root / "test_batch.bin", ti, tl)
    write_cifar_bin(root / "train.bin", ri, rl)
    te = load_split("cifar10", "test", root=root, download=False)
    tr = load_split("cifar10", "train", root=root, download=False)
    for s, imgs, lbls in ((te, ti, tl), (tr, ri, rl)):
        assert s.images.shape == (len(imgs), 3, 32, 32) and s.images.dtype == torch.uint8
        np.testing.assert_array_equal(s.images.numpy(), imgs)  # channel planes R, G, B in order
        np.testing.assert_array_equal(s.labels.numpy(), lbls)
        assert s.labels.dtype == torch.int64


def test_cifar_data_batches_in_order(isolated):
    root = isolated / "c"
    root.mkdir()
    parts = [_cifar(2, 10 + i) for i in range(5)]
    for i, (imgs, lbls) in enumerate(parts, 1):
        write_cifar_bin(root / f"data_batch_{i}.bin", imgs, lbls)
    tr = load_split("cifar10", "train", root=root, download=False)
    np.testing.assert_array_equal(tr.images.numpy(), np.concatenate([p[0] for p in parts]))
    np.testing.assert_array_equal(tr.labels.numpy(), np.concatenate([p[1] for p in parts]))
    # four of five batches is not a training split
    (root / "data_batch_5.bin").unlink()
    with pytest.raises(DatasetNotFoundError):
        load_split("cifar10", "train", root=root, download=False)


def test_cifar_corrupt_record_file(tmp_path):
    (tmp_path / "test_batch.bin").write_bytes(b"\x01" * 3000)
    with pytest.raises(ValueError, match="3073"):
        load_split("cifar10", "test", root=tmp_path, download=False)


# ----------------------------------------------------------------------------- ImageNette
WNIDS = ["n01440764", "n02102040", "n02979186", "n03000684", "n03028079",
         "n03394916", "n03417042", "n03425413", "n03445777", "n03888605"]
ODD_SIZES = [(301, 257), (257, 301), (500, 333), (333, 500), (241, 240), (320, 427), (427, 320), (260, 999),
             (999, 260), (300, 300)]  # (W, H)


def _colour(k):
    return (20 * k + 5, 250 - 20 * k, 100 + 3 * k)


def _imagenette(root: Path, sub: str) -> Path:
    folder = root / "imagenette2-320" / sub
    for k, (wnid, size) in enumerate(zip(WNIDS, ODD_SIZES)):
        d = folder / wnid
        d.mkdir(parents=True)
        ext = ".png" if k % 3 == 0 else (".jpg" if k % 3 == 1 else ".JPEG")
        Image.new("RGB", size, _colour(k)).save(d / f"img_{k}{ext}")
    (folder / WNIDS[0] / "README.txt").write_text("not an image")
    return folder


def test_imagenette_folder_resize_and_centre_crop(isolated):
    folder = _imagenette(isolated / "inet", "val")
    # a second image in class 3: 256 x 512 horizontal ramp (value = column // 2), already at the
    # resize target, so the centre crop must take columns 144..367 exactly
    ramp = (np.arange(512) // 2).astype(np.uint8)
    Image.fromarray(np.broadcast_to(ramp, (256, 512)).copy()).convert("RGB").save(folder / WNIDS[3] / "z_ramp.png")
    # and a tall one in class 5 whose rows must be 144..367
    Image.fromarray(np.broadcast_to(ramp[:, None], (512, 256)).copy()).convert("RGB").save(
        folder / WNIDS[5] / "z_tall.png")

    s = load_split("imagenette", "test", root=isolated / "inet", download=False)
    assert s.images.shape == (12, 3, 224, 224) and s.images.dtype == torch.uint8
    assert s.source == str(folder)
    assert s.labels.tolist() == [0, 1, 2, 3, 3, 4, 5, 5, 6, 7, 8, 9]  # sorted class folders, sorted files
    solid = [i for i in range(12) if i not in (4, 7)]
    for i in solid:
        k = int(s.labels[i])
        expected = torch.tensor(_colour(k), dtype=torch.int16).view(3, 1, 1)
        # solid colour survives resize + crop (JPEG may move a value by a step or two)
        assert (s.images[i].to(torch.int16) - expected).abs().max() <= 3, (i, k)
    expected_ramp = torch.from_numpy(ramp[144:368].copy())
    assert torch.equal(s.images[4][:, 0, :], expected_ramp.expand(3, 224))
    assert torch.equal(s.images[7][:, :, 0], expected_ramp.expand(3, 224))


def test_imagenette_resizes_short_side_to_256(tmp_path):
    """A 128 x 200 image: short side -> 256 (256 x 400), centre crop 224: a centred 2-pixel
    black bar in a white image stays centred and gets twice as wide."""
    arr = np.full((128, 200, 3), 255, np.uint8)
    arr[:, 99:101] = 0
    folder = tmp_path / "val"  # the plain `root/val/<class>/` layout
    for wnid in WNIDS:
        (folder / wnid).mkdir(parents=True)
        Image.fromarray(arr).save(folder / wnid / "a.png")
    s = load_split("imagenette", "test", root=tmp_path, download=False)
    assert s.images.shape == (10, 3, 224, 224)
    row = s.images[0, 0, 112].to(torch.int16)
    dark = (row < 128).nonzero().flatten().tolist()
    assert dark == [110, 111, 112, 113]
    assert (s.images[0, :, :, :100] == 255).all()


def test_imagenette_train_split_and_class_count(isolated):
    _imagenette(isolated / "inet", "train")
    s = load_split("imagenette", "train", root=isolated / "inet", download=False)
    assert len(s) == 10 and s.labels.tolist() == list(range(10))
    (isolated / "inet" / "imagenette2-320" / "train" / "extra_class").mkdir()
    with pytest.raises(ValueError, match="11 class folders"):
        load_split("imagenette", "train", root=isolated / "inet", download=False)


# ----------------------------------------------------------------------------- missing data
@pytest.mark.parametrize("dataset, command", [
    ("fmnist", "torchvision.datasets.FashionMNIST"),
    ("cifar10", "torchvision.datasets.CIFAR10"),
    ("imagenette", "SALBENCH_IMAGENETTE_DIR"),
])
def test_missing_dataset_says_where_and_how(isolated, dataset, command):
    with pytest.raises(DatasetNotFoundError) as info:
        load_split(dataset, "test", download=False)
    msg = str(info.value)
    assert str(isolated / "data_home") in msg  # the paths tried
    assert command in msg  # how to get it
    assert isinstance(info.value, FileNotFoundError)


@pytest.mark.parametrize("dataset", ["fmnist", "cifar10", "imagenette"])
def test_missing_dataset_with_root_names_the_root(isolated, dataset):
    root = isolated / "empty_root"
    root.mkdir()
    with pytest.raises(DatasetNotFoundError, match=str(root)):
        load_split(dataset, "test", root=root, download=True)  # an explicit root never downloads


def test_env_dir_is_used(isolated, monkeypatch):
    d = isolated / "env_fm"
    d.mkdir()
    write_idx(d / "t10k-images-idx3-ubyte", np.full((2, 28, 28), 7, np.uint8), gz=True)
    write_idx(d / "t10k-labels-idx1-ubyte", np.array([3, 4], np.uint8), gz=True)
    monkeypatch.setenv("SALBENCH_FMNIST_DIR", str(d))
    s = load_split("fmnist", "test", download=False)
    assert s.source == str(d) and s.labels.tolist() == [3, 4]


def test_unknown_dataset_or_split():
    with pytest.raises(ValueError, match="mnist"):
        load_split("mnist", "test")
    with pytest.raises(ValueError, match="val"):
        load_split("fmnist", "val")


# ----------------------------------------------------------------------------- Split
def _split():
    images = torch.arange(8, dtype=torch.uint8).view(2, 1, 2, 2)
    return Split("fmnist", "test", images, torch.tensor([1, 2]), "mem")


def test_split_sha256_is_the_bytes_in_index_order():
    s = _split()
    whole = hashlib.sha256(bytes(range(8))).hexdigest()
    assert whole == "8a851ff82ee7048ad09ec3847f1ddf44944104d2cbd17ef4e3db22c6785a0d45"
    assert s.sha256() == whole == s.sha256([0, 1]) == s.sha256(np.array([0, 1]))
    swapped = hashlib.sha256(bytes([4, 5, 6, 7, 0, 1, 2, 3])).hexdigest()
    assert s.sha256([1, 0]) == swapped != whole
    assert s.sha256([1]) == hashlib.sha256(bytes([4, 5, 6, 7])).hexdigest()


def test_split_sha256_of_a_non_contiguous_view():
    s = _split()
    t = Split("fmnist", "test", s.images.transpose(2, 3), s.labels, "mem")
    assert t.sha256() == hashlib.sha256(bytes([0, 2, 1, 3, 4, 6, 5, 7])).hexdigest()


def test_float_images():
    s = _split()
    f = s.float_images([1])
    assert f.dtype == torch.float32 and f.shape == (1, 1, 2, 2)
    torch.testing.assert_close(f.flatten(), torch.tensor([4, 5, 6, 7]) / 255)
    assert s.images.dtype == torch.uint8 and s.images.flatten().tolist() == list(range(8))


# ----------------------------------------------------------------------------- real data
def test_real_fmnist_test_split():
    try:
        s = load_split("fmnist", "test", download=False)
    except DatasetNotFoundError as e:
        pytest.skip(f"FMNIST not installed ({str(e)[:120]}...); `make data` or apt-get install dataset-fashion-mnist")
    assert len(s) == 10_000 and s.images.shape == (10_000, 1, 28, 28) and s.images.dtype == torch.uint8
    assert s.labels[:5].tolist() == [9, 2, 1, 1, 6]
    assert torch.bincount(s.labels).tolist() == [1000] * 10


def test_real_cifar10_test_split():
    env = os.environ.get("SALBENCH_CIFAR10_DIR")
    if not (env and Path(env).is_dir()) and not data.CIFAR10_OFFLINE_DIR.is_dir():
        pytest.skip(f"no CIFAR-10 copy: set SALBENCH_CIFAR10_DIR or provide {data.CIFAR10_OFFLINE_DIR}")
    try:
        s = load_split("cifar10", "test", download=False)
    except DatasetNotFoundError as e:
        pytest.skip(f"CIFAR-10 binary files not found: {str(e)[:160]}")
    assert len(s) == 10_000 and s.images.shape == (10_000, 3, 32, 32) and s.images.dtype == torch.uint8
    assert s.labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert torch.bincount(s.labels).tolist() == [1000] * 10
