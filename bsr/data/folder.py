"""The user's own images (SPEC section 9): `folder:PATH` (torchvision's ImageFolder layout) and `csv:PATH` datasets,
as `bsr_device.listing` lists them (its docstring gives the two layouts).

Without a `test` split of its own, a seeded class-stratified part (`test_fraction` of each class, seed `split_seed`)
of the training images is the test split; both are kept in the run's config so the split can be rebuilt. A `val`
split of its own wins over `val_fraction`. Images are decoded by `bsr_device.images.open_image` (greyscale, palette and
RGBA become RGB). An unreadable file is skipped and named (`ImageFiles.skipped`), or stops the run with one line when
`strict`. A missing path, no images, or a single class is a one-line `BSRError`. Listing and splitting live in the
torch-free `bsr_device.listing` (the device trainer splits the same way); this module decodes and serves the images.
"""

from __future__ import annotations

from typing import Callable, Optional

from torch.utils.data import Dataset

from bsr_device.images import open_image, readable
from bsr_device.listing import (LAYOUT, PREFIXES, Listing, Sample, dataset_slug, is_user_dataset, list_source,
                                parse_source, user_split)

from ..errors import BSRError
from .registry import DatasetInfo
from .registry import dataset_info as registered_info

__all__ = ["ImageFiles", "LAYOUT", "Listing", "PREFIXES", "build_user_dataset", "dataset_info", "dataset_slug",
           "is_user_dataset", "list_source", "user_split"]

def dataset_info(name: str) -> DatasetInfo:
    """The `DatasetInfo` of a registered dataset, or of a `folder:`/`csv:` dataset (built from its files: classes are
    its sub-folder names or labels); `BSRError` for an unknown name or a bad folder."""
    if not is_user_dataset(name):
        return registered_info(name)
    listing = list_source(name)
    kind, path = parse_source(name)
    counts = {split: len(samples) for split, samples in listing.splits.items()}
    return DatasetInfo(name, len(listing.classes), f"{'image folder' if kind == 'folder' else 'CSV list'} {path} "
                       f"({', '.join(f'{n} {s}' for s, n in counts.items())} images)", "the user's", 0, 3, None,
                       layout=LAYOUT, classes=listing.classes, title=str(path), val_split="val" in listing.splits)


class ImageFiles(Dataset):
    """Image files with labels, decoded by `open_image` (RGB) and transformed per item. `targets` (labels in item
    order), `classes` (names) and `skipped` ([(path, reason)] of the files left out as unreadable) as attributes."""

    def __init__(self, samples: list[Sample], classes: tuple[str, ...], transform: Callable,
                 skipped: Optional[list[tuple[str, str]]] = None) -> None:
        self.samples, self.transform = samples, transform
        self.classes, self.targets = list(classes), [label for _, label in samples]
        self.skipped = skipped or []

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        return self.transform(open_image(path)), label


def build_user_dataset(name: str, split: str, transform: Callable, *, limit: Optional[int], seed: int,
                       val_fraction: float, test_fraction: float, split_seed: int, strict: bool) -> ImageFiles:
    """Split `split` of a `folder:`/`csv:` dataset as an `ImageFiles` (unreadable files skipped, or refused when
    `strict`)."""
    listing = list_source(name)
    if split == "val" and "val" not in listing.splits and val_fraction == 0.0:
        raise BSRError(f"dataset {name} has no val split; set val_fraction above 0 (e.g. 0.1) or add a val/ folder")
    samples = user_split(listing, split, limit, seed, val_fraction, test_fraction, split_seed)
    if not samples:
        raise BSRError(f"dataset {name}: its {split} split is empty; add images or change --test-fraction / "
                       f"--val-fraction")
    good, skipped = readable(samples, strict)
    if not good:
        raise BSRError(f"dataset {name}: none of the {len(samples)} images of its {split} split can be read "
                       f"(first: {skipped[0][1]})")
    return ImageFiles(good, listing.classes, transform, skipped)
