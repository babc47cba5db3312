"""The user's own images, listed and split without PyTorch: `folder:PATH` and `csv:PATH` datasets (SPEC section 9).

- `folder:PATH`: one sub-folder of images per class (`PATH/<class>/<image>`), class names are the sub-folder names,
  sorted (as torchvision's `ImageFolder` numbers them). With `PATH/train/` (and optionally `PATH/val/`,
  `PATH/test/`) each split has that layout and its own images.
- `csv:PATH`: lines `path,label` (a `path,label` header is allowed), paths relative to the CSV's folder (or absolute);
  an optional third column `split` (train, val or test) gives the rows' own splits. Class names are the labels, sorted.

Without a `test` split of its own, a seeded class-stratified part (`test_fraction` of each class, seed `split_seed`)
of the training images is the test split. `bsr train` (`bsr.data.folder`) and the device trainer (`bsr_device`) both
list and split through this module, so they see the same images in the same splits. Stratified orders and splits are
pure functions of labels and a seed.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import BSRError

# torchvision's list of image extensions (`torchvision.datasets.folder.IMG_EXTENSIONS`), here without importing it
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
PREFIXES = ("folder:", "csv:")
LAYOUT = "PATH/<class>/<image>.png (or PATH/train/<class>/..., PATH/val/..., PATH/test/...)"
Sample = tuple[str, int]  # (image path, label)


def is_user_dataset(name: str) -> bool:
    """True for `folder:PATH` and `csv:PATH` names."""
    return isinstance(name, str) and name.startswith(PREFIXES)


def parse_source(name: str) -> tuple[str, Path]:
    kind, _, path = name.partition(":")
    if not path:
        raise BSRError(f"dataset {name!r} names no path; use {kind}:PATH")
    return kind, Path(path).expanduser()


def dataset_slug(name: str) -> str:
    """A file-name-safe short name of a dataset: `folder:/data/my pets` -> `folder-my-pets`."""
    if is_user_dataset(name):
        kind, path = parse_source(name)
        name = f"{kind}-{path.stem if kind == 'csv' else path.name}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "dataset"


@dataclass(frozen=True)
class Listing:
    """What a folder or CSV holds: class names and (path, label) samples per split of its own (`all` when it has
    none: the train/test split is then drawn by `build_user_dataset`)."""

    classes: tuple[str, ...]
    splits: dict[str, list[Sample]]


def _images_in(folder: Path) -> list[str]:
    """Image files below `folder` (recursively, sorted; hidden files and folders skipped), by torchvision's list of
    image extensions. Broken symbolic links (target missing, or a loop) are listed too, so that decoding names them
    among the unreadable files instead of their vanishing unnamed."""
    return sorted(str(p) for p in folder.rglob("*") if (p.is_file() or p.is_symlink()) and not p.is_dir()
                  and p.suffix.lower() in IMG_EXTENSIONS
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _class_dirs(folder: Path) -> list[Path]:
    return sorted((d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)


def _list_folder(path: Path, name: str) -> Listing:
    if not path.exists():
        raise BSRError(f"dataset {name}: {path} does not exist; pass a folder laid out as {LAYOUT}")
    if not path.is_dir():
        raise BSRError(f"dataset {name}: {path} is not a folder; pass a folder laid out as {LAYOUT} "
                       f"(or csv:FILE for a CSV of path,label lines)")
    subdirs = {d.name: d for d in _class_dirs(path)}
    split_layout = "train" in subdirs and set(subdirs) <= {"train", "val", "test"}
    roots = {s: subdirs[s] for s in ("train", "val", "test") if s in subdirs} if split_layout else {"all": path}
    main = roots["train" if split_layout else "all"]
    class_dirs = _class_dirs(main)
    classes = tuple(d.name for d in class_dirs)
    if not any(_images_in(d) for d in class_dirs):
        raise BSRError(f"dataset {name}: no images in class sub-folders of {main}; lay it out as {LAYOUT}")
    if len(classes) < 2:
        raise BSRError(f"dataset {name}: {main} has one class ({classes[0]}); a classifier needs at least two class "
                       f"sub-folders")
    splits: dict[str, list[Sample]] = {}
    for split, root in roots.items():
        samples = []
        for d in _class_dirs(root):
            if d.name not in classes:
                raise BSRError(f"dataset {name}: class folder {d} is not a class of {main} ({', '.join(classes)}); "
                               f"every split must use the training split's classes")
            files = _images_in(d)
            if not files and split in ("all", "train"):
                raise BSRError(f"dataset {name}: class folder {d} holds no images "
                               f"({', '.join(sorted(set(IMG_EXTENSIONS)))}); add some or remove it")
            samples += [(f, classes.index(d.name)) for f in files]
        splits[split] = samples
    return Listing(classes, splits)


def _list_csv(path: Path, name: str) -> Listing:
    if not path.is_file():
        raise BSRError(f"dataset {name}: {path} does not exist or is not a file; pass a CSV of path,label lines")
    try:
        rows = list(csv.reader(path.read_text(encoding="utf-8-sig").splitlines()))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise BSRError(f"dataset {name}: cannot read {path} ({type(e).__name__}); pass a UTF-8 CSV of path,label "
                       f"lines") from None
    rows = [(n, [c.strip() for c in row]) for n, row in enumerate(rows, 1) if any(c.strip() for c in row)]
    if rows and [c.lower() for c in rows[0][1][:2]] == ["path", "label"]:
        rows = rows[1:]
    for n, row in rows:
        if len(row) not in (2, 3) or not all(row) or (len(row) == 3 and row[2] not in ("train", "val", "test")):
            raise BSRError(f"dataset {name}: {path} line {n} is {','.join(row)!r}; expected path,label (or "
                           f"path,label,split with split train, val or test)")
    if not rows:
        raise BSRError(f"dataset {name}: {path} lists no images; write one path,label line per image")
    classes = tuple(sorted({row[1] for _, row in rows}))
    if len(classes) < 2:
        raise BSRError(f"dataset {name}: {path} has one class ({classes[0]}); a classifier needs at least two labels")
    with_split = {len(row) == 3 for _, row in rows}
    if len(with_split) > 1:
        raise BSRError(f"dataset {name}: {path} gives a split on some lines only; give it on every line or none")
    splits: dict[str, list[Sample]] = {}
    for _, row in rows:
        file = Path(row[0]).expanduser()
        sample = (str(file if file.is_absolute() else path.parent / file), classes.index(row[1]))
        splits.setdefault(row[2] if len(row) == 3 else "all", []).append(sample)
    if "all" not in splits and "train" not in splits:
        raise BSRError(f"dataset {name}: {path} has no train lines; mark the training images with split train")
    return Listing(classes, splits)


def list_source(name: str) -> Listing:
    """The classes and samples of a `folder:`/`csv:` dataset; one-line `BSRError`s for a missing path, no images, a
    single class or a malformed CSV."""
    kind, path = parse_source(name)
    return _list_folder(path, name) if kind == "folder" else _list_csv(path, name)



def user_split(listing: Listing, split: str, limit: Optional[int], seed: int, val_fraction: float,
               test_fraction: float, split_seed: int) -> list[Sample]:
    """The samples of `split` ("train", "val", "test"): the source's own split when it has one, else the seeded
    stratified parts (test: `test_fraction` of each class by `split_seed`; val: `val_fraction` of the rest, seed 0);
    `limit` keeps the first items of a stratified order seeded by `seed`, as for the registered datasets."""
    own = listing.splits
    if split != "train" and split in own:  # its own val/test split: only limited
        pool, fraction = own[split], 0.0
    else:
        pool = own["train"] if "train" in own else own["all"]
        if "test" not in own:
            train_part, test_part = stratified_split(_labels(pool), test_fraction, split_seed)
            pool = [pool[i] for i in (test_part if split == "test" else train_part)]
        fraction = 0.0 if split == "test" or "val" in own else val_fraction
    keep = split_selection(_labels(pool), split if fraction else "test", limit, seed, fraction)
    return pool if keep is None else [pool[i] for i in keep]


def _labels(samples: list[Sample]) -> np.ndarray:
    return np.array([label for _, label in samples], dtype=np.int64)



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


def split_selection(labels: np.ndarray, split: str, limit: int | None, seed: int,
                    val_fraction: float) -> np.ndarray | None:
    """Indices of `split` within its source split's `labels`: the `limit` first of the seeded stratified order, then
    (train/val) the seed-0 stratified validation part or the rest. None: every item, in order."""
    keep = stratified_order(labels, seed)[:limit] if limit is not None else None
    if split == "test" or val_fraction == 0.0:
        return keep
    pool = keep if keep is not None else np.arange(len(labels))
    train_part, val_part = stratified_split(np.asarray(labels)[pool], val_fraction, seed=0)
    return pool[val_part if split == "val" else train_part]
