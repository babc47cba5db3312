"""Test top-1 of a model (during training, and of a finished run for `bsr eval`)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..data import dataset_info, is_user_dataset
from ..errors import BSRError
from .batches import build_tasks, test_loader
from .build import image_size, pick_device
from .config import TrainConfig, with_values
from .distributed import Group
from .methods import host
from .optim import autocast
from .runs import load_run


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, cfg: TrainConfig,
             group: Optional[Group] = None, task: Optional[int] = None) -> float:
    """Top-1 accuracy (%) of `model` over `loader`; in a group, over the union of the ranks' loaders. `task`: the
    head of a multi-task model to evaluate. Counts stay on the device until the end (one sync)."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    total = 0
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast(cfg, device):
            logits = model(images) if task is None else model(images, task)
        correct += (logits.argmax(-1) == labels).sum()
        total += labels.numel()
    model.train(was_training)
    counts = [int(correct), total]
    if group is not None:
        counts = group.all_reduce_sum(counts)  # exact: counts stay far below 2**53
    return 100.0 * counts[0] / max(counts[1], 1)


def evaluate_run(run: str | Path, dataset: Optional[str] = None, data_dir: Optional[str] = None,
                 limit: Optional[int] = None, device: str = "auto", batch_size: Optional[int] = None) -> dict:
    """Top-1 of a run's checkpoint on `dataset` (default: the one it was trained on); a multi-task run is evaluated
    on each of its tasks (`top1` is their mean, `tasks` the per-task figures)."""
    dev = pick_device(device)
    cfg, model = load_run(run, dev)
    if cfg.tasks and dataset is not None:
        raise BSRError(f"run {run} is multi-task ({','.join(cfg.tasks)}): it is evaluated on its own tasks; drop "
                       f"--dataset")
    changes = {"dataset": dataset, "data_dir": data_dir, "limit": limit, "eval_batch_size": batch_size}
    cfg = with_values(cfg, **{key: value for key, value in changes.items() if value is not None})
    if not cfg.tasks and dataset_info(cfg.dataset).num_classes != host(model).num_classes:
        raise BSRError(f"dataset {cfg.dataset!r} has {dataset_info(cfg.dataset).num_classes} classes but the "
                       f"model's head has {host(model).num_classes}")
    if not cfg.tasks and cfg.class_names and is_user_dataset(cfg.dataset) and \
            list(dataset_info(cfg.dataset).classes) != cfg.class_names:
        raise BSRError(f"{cfg.dataset} has classes {', '.join(dataset_info(cfg.dataset).classes)} but the run was "
                       f"trained on {', '.join(cfg.class_names)}; evaluate on images of the run's classes")
    tasks = build_tasks(cfg, image_size(model), train=False)
    if not cfg.tasks and cfg.class_names:  # named classes: top-1 per class too
        correct, total = class_counts(model, test_loader(tasks[0].test_set, cfg, dev), dev, cfg,
                                      len(cfg.class_names))
        per_class = {name: (100.0 * c / t if t else None, t) for name, c, t in zip(cfg.class_names, correct, total)}
        return {"top1": 100.0 * sum(correct) / max(sum(total), 1), "dataset": cfg.dataset,
                "images": len(tasks[0].test_set), "method": cfg.method, "classes": per_class}
    accs = {t.name: evaluate(model, test_loader(t.test_set, cfg, dev), dev, cfg, task=t.index) for t in tasks}
    result = {"top1": statistics.fmean(accs.values()), "dataset": "+".join(accs),
              "images": sum(len(t.test_set) for t in tasks), "method": cfg.method}
    if cfg.tasks:
        result["tasks"] = accs
    return result


@torch.no_grad()
def class_counts(model: nn.Module, loader: DataLoader, device: torch.device, cfg: TrainConfig,
                 num_classes: int) -> tuple[list[int], list[int]]:
    """(correct, total) test images per class of `model` over `loader`."""
    model.eval()
    correct = torch.zeros(num_classes, dtype=torch.int64, device=device)
    total = torch.zeros(num_classes, dtype=torch.int64, device=device)
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        with autocast(cfg, device):
            hit = (model(images).argmax(-1) == labels).long()
        correct.index_add_(0, labels, hit)
        total.index_add_(0, labels, torch.ones_like(labels))
    return correct.tolist(), total.tolist()
