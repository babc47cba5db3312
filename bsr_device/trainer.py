"""The reference device trainer: `bsr export --format ort-training` artifacts trained on folder/CSV images, no torch.

A device run directory holds `device-run.json` (what it trains: artifacts, dataset, recipe), `checkpoint` (ORT's
checkpoint: parameters, optimizer state and the trainer's step, written atomically at every evaluation), `metrics.jsonl`
(loss and train top-1 every `log_every` steps; test top-1 at every evaluation), `report.json` and, at the end,
`model.onnx`: the trained inference graph with bsr's metadata, which `bsr predict` takes. `bsr device-import` brings
the run home as a bsr run directory. The recipe is the one `bsr train` would use (`bsr-device.json`): the same
learning-rate function of the step (`bsr_device.schedule.lr_at`), epochs of a permutation seeded by (seed, epoch),
per-image augmentation seeded by (seed, epoch, index), so a resumed run sees the batches an uninterrupted one would.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .artifacts import read_json, read_metadata, write_json_atomic
from .errors import BSRError
from .images import image_array, open_image, readable
from .listing import list_source, user_split
from .process import peak_rss_mib
from .schedule import lr_at
from .session import DeviceSession

RUN_FILE, CHECKPOINT_FILE, METRICS, REPORT, MODEL = (
    "device-run.json", "checkpoint", "metrics.jsonl", "report.json", "model.onnx")


@dataclass
class ImageSet:
    """(path, label) samples decoded and transformed on demand at the artifacts' image size and normalisation."""

    samples: list[tuple[str, int]]
    size: int
    mean: list[float]
    std: list[float]

    def batch(self, indices, rng_of: Optional[Callable[[int], np.random.Generator]] = None, rrc_scale=None,
              hflip: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Images (B, 3, S, S) float32 and labels (B,) int64 of `indices`; with `rng_of(index)` the training
        augmentation of each image."""
        images = [image_array(open_image(self.samples[i][0]), self.size, self.mean, self.std,
                              rng_of(i) if rng_of else None, rrc_scale, hflip) for i in indices]
        return np.stack(images), np.array([self.samples[i][1] for i in indices], dtype=np.int64)


def readable_logged(samples: list[tuple[str, int]], log: Callable[[str], None]) -> list[tuple[str, int]]:
    """The samples whose image decodes; each other one is named in the log and left out."""
    good, skipped = readable(samples)
    for _, reason in skipped:
        log(f"skipped: {reason}")
    return good


def check_classes(meta: dict, classes: tuple[str, ...], dataset: str) -> None:
    """Refuse a dataset whose classes are not the artifacts' (names when the export recorded them, else the count)."""
    names, count = meta.get("class_names"), int(meta["num_classes"])
    if names and list(names) != list(classes):
        raise BSRError(f"dataset {dataset} has classes {', '.join(classes)}, the artifacts were exported for "
                       f"{', '.join(names)}; export them again for this dataset (bsr export --format ort-training "
                       f"--dataset {dataset})")
    if len(classes) != count:
        raise BSRError(f"dataset {dataset} has {len(classes)} classes, the artifacts' head has {count}; export them "
                       f"again with --num-classes {len(classes)}")


class DeviceRun:
    """A device run directory and its recipe (`setup` checks everything before the first step)."""

    def __init__(self, out: str | Path, artifacts: str | Path, dataset: str, overrides: dict, resume: bool) -> None:
        self.out = Path(out)
        if resume:
            saved = read_json(self.out / RUN_FILE, "the device run's description",
                              "resume a directory written by python -m bsr_device train, or start anew with a new "
                              "--out")
            artifacts, dataset = saved["artifacts"], saved["dataset"]
            overrides = {**saved["overrides"], **{k: v for k, v in overrides.items() if k == "threads"}}
            if not (self.out / CHECKPOINT_FILE).is_file():
                raise BSRError(f"{self.out} has no checkpoint yet; start it again without --resume")
        elif self.out.exists() and any(self.out.iterdir()):
            raise BSRError(f"{self.out} exists and is not empty; pick a new --out, or --resume to continue it")
        self.artifacts, self.dataset, self.overrides, self.resume = Path(artifacts), dataset, overrides, resume
        self.meta = read_metadata(self.artifacts)
        self.recipe = {**self.meta["recipe"], **{k: v for k, v in overrides.items() if v is not None}}
        self._order: tuple[Optional[int], Optional[np.ndarray]] = (None, None)  # the current epoch's permutation

    def setup(self, log: Callable[[str], None]) -> tuple[ImageSet, ImageSet]:
        """(train, test) images of the dataset, split as `bsr train` splits it, classes checked."""
        r = self.recipe
        listing = list_source(self.dataset)
        check_classes(self.meta, listing.classes, self.dataset)
        self.classes = listing.classes
        parts = {s: readable_logged(user_split(listing, s, None, 0, 0.0, r["test_fraction"], r["split_seed"]), log)
                 for s in ("train", "test")}
        size = int(self.meta["img_size"][0])
        train, test = (ImageSet(parts[s], size, self.meta["mean"], self.meta["std"]) for s in ("train", "test"))
        if len(train.samples) < r["batch_size"] or not test.samples:
            raise BSRError(f"dataset {self.dataset}: {len(train.samples)} training and {len(test.samples)} test "
                           f"images; it needs at least batch_size={r['batch_size']} training images and one test "
                           f"image")
        self.steps_per_epoch = len(train.samples) // r["batch_size"]
        self.total = int(r["steps"] or r["epochs"] * self.steps_per_epoch)
        self.warmup = int(r["warmup_steps"] + round(r["warmup_epochs"] * self.steps_per_epoch))
        self.eval_every = int(r["eval_every"] or self.steps_per_epoch)
        self.out.mkdir(parents=True, exist_ok=True)
        if not self.resume:
            write_json_atomic(self.out / RUN_FILE, {"artifacts": str(self.artifacts.resolve()), "dataset": self.dataset,
                                                    "overrides": self.overrides, "classes": list(self.classes)})
        return train, test

    def batch_indices(self, step: int, n: int) -> tuple[int, np.ndarray]:
        """(epoch, indices) of training step `step`: batch `step % steps_per_epoch` of the epoch's seeded
        permutation (drop_last)."""
        epoch, b = divmod(step, self.steps_per_epoch)
        if self._order[0] != epoch:  # one permutation per epoch, not per step
            self._order = (epoch, np.random.default_rng([self.recipe["seed"], epoch]).permutation(n))
        size = self.recipe["batch_size"]
        return epoch, self._order[1][b * size:(b + 1) * size]


def evaluate(session: DeviceSession, images: ImageSet, batch_size: int) -> float:
    """Top-1 (%) of the eval graph on every image of `images`."""
    correct = 0
    for start in range(0, len(images.samples), batch_size):
        x, y = images.batch(range(start, min(start + batch_size, len(images.samples))))
        correct += int((session.logits(x).argmax(1) == y).sum())
    return 100.0 * correct / len(images.samples)


def _metrics(out: Path, upto: Optional[int]) -> list[str]:
    """The metrics lines of a run up to step `upto` (a resumed run drops what came after its checkpoint)."""
    path = out / METRICS
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return [line for line in lines if upto is None or json.loads(line).get("step", 0) <= upto]


def train(artifacts: str | Path, dataset: str, out: str | Path, *, resume: bool = False, steps: Optional[int] = None,
          batch_size: Optional[int] = None, epochs: Optional[int] = None, lr: Optional[float] = None,
          threads: Optional[int] = None, graph_format: str = "onnx", arena: bool = True, block_torch: bool = True,
          log: Callable[[str], None] = print) -> dict:
    """Train the artifacts on `dataset` (`folder:PATH` or `csv:PATH`) into the device run `out`; returns the report.
    `block_torch` (the default) makes `import torch` fail in this process first (`bsr_device.runtime`)."""
    run = DeviceRun(out, artifacts, dataset, {"steps": steps, "batch_size": batch_size, "epochs": epochs, "lr": lr,
                                             "threads": threads}, resume)
    train_set, test_set = run.setup(log)
    r = run.recipe
    session = DeviceSession(run.artifacts, run.out / CHECKPOINT_FILE if resume else None, graph_format,
                            block_torch=block_torch, threads=r.get("threads"), arena=arena)
    props = session.properties() if resume else {}
    step, best, best_step = int(props.get("step", 0)), float(props.get("best", -1.0)), int(props.get("best_step", 0))
    window = [tuple(w) for w in json.loads(props.get("log_window", "[]"))]  # the steps since the last log line
    lines = _metrics(run.out, step if resume else None)
    (run.out / METRICS).write_text("".join(line + "\n" for line in lines))
    log(f"training {run.total} steps ({run.steps_per_epoch}/epoch, batch {r['batch_size']}) from step {step}: "
        f"{len(train_set.samples)} train / {len(test_set.samples)} test images of {dataset}")
    times, final = [], None

    def rng_of(epoch: int):
        return lambda index: np.random.default_rng([r["seed"], epoch, index])

    with open(run.out / METRICS, "a") as metrics:
        while step < run.total:
            rate = lr_at(step, lr=r["lr"], total_steps=run.total, warmup_steps=run.warmup, min_lr=r["min_lr"],
                         schedule=r["schedule"])
            epoch, indices = run.batch_indices(step, len(train_set.samples))
            x, y = train_set.batch(indices, rng_of(epoch), r.get("rrc_scale"), r.get("hflip", False))
            start = time.perf_counter()
            loss, logits = session.train_step(x, y, rate)
            times.append(time.perf_counter() - start)
            if not math.isfinite(loss):
                raise BSRError(f"the loss became {loss} at step {step}; lower --lr (now {r['lr']}) and start again")
            window.append((loss, float((logits.argmax(1) == y).mean())))
            step += 1
            if step % r["log_every"] == 0 or step == run.total:
                metrics.write(json.dumps({"step": step, "lr": rate, "loss": float(np.mean([w[0] for w in window])),
                                          "train_top1": 100 * float(np.mean([w[1] for w in window]))}) + "\n")
                window = []
            if step % run.eval_every == 0 or step == run.total:
                final = evaluate(session, test_set, r["batch_size"])
                if final > best:
                    best, best_step = final, step
                metrics.write(json.dumps({"step": step, "test_top1": final}) + "\n")
                metrics.flush()
                session.save(run.out / CHECKPOINT_FILE, {"step": step, "best": best, "best_step": best_step,
                                                         "log_window": json.dumps(window)})
                log(f"step {step}/{run.total}: loss {loss:.4f}, test top-1 {final:.2f}% (best {best:.2f}%)")
    if final is None:
        final = evaluate(session, test_set, r["batch_size"])
    tmp = run.out / f".{MODEL}.tmp"
    session.export_inference(tmp)
    os.replace(tmp, run.out / MODEL)
    report = {"artifacts": str(run.artifacts), "dataset": dataset, "steps": run.total, "final_top1": final,
              "best_top1": best, "best_step": best_step, "classes": list(run.classes),
              "step_ms_median": 1000 * float(np.median(times)) if times else None,
              "peak_rss_mib": peak_rss_mib(), "graph_format": graph_format, "recipe": r,
              "runtime_version": session.meta["runtime_version"]}
    write_json_atomic(run.out / REPORT, report)
    return report


def evaluate_run(out: str | Path, log: Callable[[str], None] = print, block_torch: bool = True) -> float:
    """Test top-1 (%) of a device run's checkpoint on its dataset's test split."""
    run = DeviceRun(out, "", "", {}, resume=True)
    _, test_set = run.setup(log)
    session = DeviceSession(run.artifacts, run.out / CHECKPOINT_FILE, block_torch=block_torch)
    return evaluate(session, test_set, run.recipe["batch_size"])
