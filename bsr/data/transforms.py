"""Per-item image transforms, in-memory datasets and stratified orders/splits (pure functions of labels and a seed).

Transforms follow the paper's ViT-B recipe (Sarkar et al., arXiv 2405.10951, which follows jeonsworld/ViT-pytorch):
training uses `RandomResizedCrop(S, scale=rrc_scale)` (plus a horizontal flip when asked), evaluation
`Resize((S, S))`; images are scaled to [0, 1], grey ones replicated to 3 channels, then normalised.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset, Subset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from bsr_device.listing import split_selection, stratified_order, stratified_split  # noqa: F401  (re-exported)


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
