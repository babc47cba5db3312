"""Per-item image transforms, in-memory datasets and stratified orders/splits (pure functions of labels and a seed).

Transforms follow the paper's ViT-B recipe (Sarkar et al., arXiv 2405.10951, which follows jeonsworld/ViT-pytorch):
training uses `RandomResizedCrop(S, scale=rrc_scale)` (plus a horizontal flip when asked), evaluation
`Resize((S, S))`; images are scaled to [0, 1], grey ones replicated to 3 channels, then normalised.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Subset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF


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
