"""The data pipeline of training: seeded epochs, per-item seeded augmentation, data-parallel slices, and tasks.

Reproducibility: the data order of an epoch is a permutation seeded by (seed, epoch), and each training image's
augmentation is seeded by (seed, epoch, index), so a run resumed mid-epoch from a checkpoint sees exactly the batches
the uninterrupted run would have seen, whatever the number of workers. Data parallel: every process takes its
contiguous slice of each global batch of `batch_size` images, so the union over ranks at step s is the single-process
batch of step s.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from typing import Any, Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from ..data import build_dataset, dataset_info, is_user_dataset
from ..errors import BSRError
from . import distributed
from .config import TrainConfig, with_values
from .distributed import Group


class EpochBatches(Sampler):
    """Batches of one epoch: a permutation seeded by (seed, epoch), drop_last, starting at batch `skip`.

    Yields lists of `(epoch, index)` keys for `SeededItems`. With `world_size` > 1 it yields this `rank`'s contiguous
    slice of each global batch of `batch_size` (which the world size must divide): the ranks' slices of step s
    together are exactly the single-process batch of step s.
    """

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, skip: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        self.n, self.batch_size, self.seed, self.epoch, self.skip = n, batch_size, seed, epoch, skip
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return self.n // self.batch_size - self.skip

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        part = self.batch_size // self.world_size
        for b in range(self.skip, self.n // self.batch_size):
            start = b * self.batch_size + self.rank * part
            yield [(self.epoch, i) for i in order[start:start + part]]


class SeededItems(Dataset):
    """Training items whose random augmentation is a pure function of (seed, epoch, index)."""

    def __init__(self, base: Dataset, seed: int) -> None:
        self.base, self.seed = base, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        # torchvision's random transforms draw from torch's default CPU generator.
        torch.default_generator.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + index)
        return self.base[index]


def build_data(cfg: TrainConfig, img_size: int,
               train: bool = True) -> tuple[Optional[Dataset], Optional[Dataset], Dataset]:
    """(train set or None, validation set or None, test set) of `cfg.dataset` at `img_size`.

    `limit` subsets are chosen with seed 0, not the run's seed, so that every seed of a study trains and is tested on
    the same images; the validation split (`val_fraction`) is fixed the same way."""
    common = dict(img_size=img_size, data_dir=cfg.data_dir, download=cfg.download, mean=tuple(cfg.mean),
                  std=tuple(cfg.std), limit=cfg.limit, seed=0, val_fraction=cfg.val_fraction,
                  test_fraction=cfg.test_fraction, split_seed=cfg.split_seed, strict=cfg.strict)
    train_set = val_set = None
    if train:
        scale = tuple(cfg.rrc_scale) if cfg.rrc_scale else None
        train_set = build_dataset(cfg.dataset, "train", train=True, rrc_scale=scale, hflip=cfg.hflip, **common)
        if cfg.val_fraction > 0 or dataset_info(cfg.dataset).val_split:  # a folder's own val/ wins
            val_set = build_dataset(cfg.dataset, "val", train=False, **common)
    test_set = build_dataset(cfg.dataset, "test", train=False, **common)
    for split, data in (("train", train_set), ("val", val_set), ("test", test_set)):
        report_skipped(cfg.dataset, split, getattr(data, "skipped", []))
    return train_set, val_set, test_set


def report_skipped(dataset: str, split: str, skipped: list[tuple[str, str]], shown: int = 10) -> None:
    """Name the unreadable images a folder/CSV split left out (the first `shown`), with their count, on stderr."""
    if not skipped or not distributed.is_main():
        return
    lines = [f"bsr: skipped {len(skipped)} unreadable image(s) of the {split} split of {dataset} (--strict stops "
             f"instead):"] + [f"bsr:   {reason}" for _, reason in skipped[:shown]]
    if len(skipped) > shown:
        lines.append(f"bsr:   ... and {len(skipped) - shown} more")
    print("\n".join(lines), file=sys.stderr, flush=True)


def train_loader(items: SeededItems, cfg: TrainConfig, epoch: int, skip: int, group: Group) -> DataLoader:
    """This rank's slices of the batches of `epoch` from batch `skip` on."""
    sampler = EpochBatches(len(items), cfg.effective_batch, cfg.seed, epoch, skip, group.rank, group.world_size)
    return DataLoader(items, batch_sampler=sampler, num_workers=cfg.workers, pin_memory=group.device.type == "cuda")


def test_loader(test_set: Dataset, cfg: TrainConfig, device: torch.device, group: Optional[Group] = None) -> DataLoader:
    """The test set in order; in a group, this rank's contiguous slice of it (every image on exactly one rank)."""
    if group is not None and group.enabled:
        test_set = Subset(test_set, group.shard(len(test_set)))
    return DataLoader(test_set, batch_size=eval_batch(cfg), shuffle=False, num_workers=cfg.workers,
                      pin_memory=device.type == "cuda")



def eval_batch(cfg: TrainConfig) -> int:
    """Images per evaluation batch: `eval_batch_size`, else the larger of `batch_size` and 256."""
    return cfg.eval_batch_size or max(cfg.batch_size, 256)


def iterate_batches(items: SeededItems, cfg: TrainConfig, group: Group, start: int,
                    steps_per_epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (images, labels) batches (this rank's slices) from global step `start` on; epochs restart the seeded
    order."""
    epoch, skip = divmod(start, steps_per_epoch)
    while True:
        yield from train_loader(items, cfg, epoch, skip, group)
        epoch, skip = epoch + 1, 0


@dataclass
class Task:
    """One dataset of a run: its data, its head (`index` into a multi-task model's heads; None: single-task) and its
    endless training batches (`items` is None when only the test set was built)."""

    name: str
    index: Optional[int]
    items: Optional[SeededItems]
    test_set: Dataset
    val_set: Optional[Dataset] = None
    steps_per_epoch: int = 0
    batches: Any = None
    skipped: int = 0  # unreadable images left out of its splits (folder/CSV datasets)

    def start(self, cfg: TrainConfig, group: Group, step: int) -> None:
        """Batches from global step `step` on: in a multi-task run every step takes one batch of every task, so
        each task has consumed `step` batches of its own seeded epochs."""
        self.batches = iterate_batches(self.items, cfg, group, step, self.steps_per_epoch)


def build_tasks(cfg: TrainConfig, img_size: int, train: bool = True) -> list[Task]:
    """The `Task`s of `cfg`: one per `--tasks` dataset, or the single `--dataset`. With `train`, refuses a training
    set smaller than a batch."""
    multi = bool(cfg.tasks)
    tasks = []
    for index, name in enumerate(cfg.task_names):
        train_set, val_set, test_set = build_data(replace(cfg, dataset=name) if multi else cfg, img_size, train)
        task = Task(name, index if multi else None, None, test_set, val_set,
                    skipped=sum(len(getattr(d, "skipped", [])) for d in (train_set, val_set, test_set)))
        if train:
            task.items = SeededItems(train_set, cfg.seed)
            task.steps_per_epoch = len(task.items) // cfg.effective_batch
            if task.steps_per_epoch == 0:
                batch = f" x accumulate={cfg.accumulate}" if cfg.accumulate > 1 else ""
                raise BSRError(f"the training set of {name} has {len(task.items)} images, fewer than "
                               f"batch_size={cfg.batch_size}{batch}")
        tasks.append(task)
    return tasks


def with_class_names(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with `class_names` set from a folder/CSV dataset (kept with the run, so `bsr eval` and `bsr predict`
    name classes even where the images are gone); refuses names that do not match the dataset's classes (a folder
    whose classes changed since the run started, or names of the wrong count)."""
    if cfg.tasks:
        return cfg
    info = dataset_info(cfg.dataset)
    names = list(info.classes)
    if cfg.class_names is None:
        return with_values(cfg, class_names=names) if is_user_dataset(cfg.dataset) else cfg
    if is_user_dataset(cfg.dataset) and cfg.class_names != names:
        raise BSRError(f"{cfg.dataset} has classes {', '.join(names)} but the run's class_names are "
                       f"{', '.join(cfg.class_names)}; restore the folder's classes or start a new run")
    if len(cfg.class_names) != (cfg.num_classes or info.num_classes):
        raise BSRError(f"class_names gives {len(cfg.class_names)} names for {cfg.num_classes or info.num_classes} "
                       f"classes; give one name per class, in label order")
    return cfg
