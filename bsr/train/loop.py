"""The training loop of `bsr train` (Sarkar et al., arXiv 2405.10951): one `TrainConfig` in, a run directory out.

`_train_run` reads top to bottom: schedule, forward, backward, clip, step, log, evaluate, checkpoint. Setting up
(model, data, optimizer, resume) is `_setup`; the run's objects, files and report are `bsr.train.runs`; the data
order is `bsr.train.batches`. The loop never waits for the device inside a step: loss and top-1 stay on the device
(`bsr.train.meter`) until a log step or a checkpoint, where one sync moves them to the host and a non-finite loss
stops the run before anything is written, so the checkpoint on disk is the last good one.

Multi-task (SPEC section 5): a step takes one batch of each task in turn, each with its own forward, backward and
optimizer step. Data parallel (`torchrun --nproc-per-node N -m bsr train ...`, see `bsr.train.distributed`): each rank
takes its slice of every global batch and DDP averages the gradients; only rank 0 writes files and shows progress;
test counts are summed over ranks.
"""

from __future__ import annotations

import contextlib
import random
import statistics
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..allocator import release_freed_memory
from ..core.moe import set_moe_task
from ..core.patch import bsr_state, set_keep_rate
from ..errors import BSRError
from . import distributed
from .batches import build_tasks, test_loader, with_class_names
from .build import backbone, check_num_classes, image_size, pick_device, setup_model
from .checkpoint import CHECKPOINT_NAME, read_checkpoint, save_checkpoint
from .config import TrainConfig
from .distributed import Group
from .evaluate import evaluate
from .meter import StepMeter
from .methods import count_params, tokens_per_block
from .optim import autocast, build_optimizer, keep_rate_at, lr_at
from .runs import Progress, Run, RunFiles, build_report, default_out, refuse_without_optimizer_state, restore_state


def train(cfg: TrainConfig, resume: Optional[str | Path] = None, progress: bool = True) -> dict:
    """Run training as `cfg` says (continuing the checkpoint in `resume` if given); returns the report.

    Under torchrun this process joins the data-parallel group for the run and leaves it at the end.
    """
    with distributed.process_group(pick_device(cfg.device)) as group:
        return train_in_group(cfg, group, resume, progress)


def train_in_group(cfg: TrainConfig, dp: Group, resume: Optional[str | Path] = None, progress: bool = True) -> dict:
    """`train` as one rank of `dp` (a single-process `Group` trains alone); returns the report on every rank.

    An epoch is a pass over the largest task's training set; smaller tasks cycle their own seeded epochs faster.
    The run directory stays locked against other processes until the run ends, however it ends.
    """
    with contextlib.ExitStack() as held:
        return _train_run(_setup(cfg, dp, resume, held), progress)


def _train_run(run: Run, progress: bool) -> dict:
    """The loop itself, from `run`'s state to the end of its budget; returns the report."""
    cfg, dp = run.cfg, run.dp
    net, optimizer, scaler, device, state = run.net, run.optimizer, run.scaler, dp.device, run.progress
    trained = [p for group in optimizer.param_groups for p in group["params"]]
    meter = StepMeter([task.name for task in run.tasks], cfg.log_every, device, state.log_window)
    bar = tqdm(total=run.total_steps, initial=state.step, disable=not (progress and dp.is_main), dynamic_ncols=True,
               desc=cfg.method)
    step_times: list[float] = []
    while state.step < run.total_steps:
        # schedule: lr is a pure function of the step; timm's layer-decay groups carry their own scale
        lr = lr_at(state.step, lr=cfg.lr, total_steps=run.total_steps, warmup_steps=run.warmup, min_lr=cfg.min_lr,
                   schedule=cfg.schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        if run.keep_warmup:  # EViT's keep-rate warm-up, also a pure function of the step
            set_keep_rate(backbone(run.model), keep_rate_at(state.step, cfg.bsr.keep_rate, run.keep_warmup))
        for i, task in enumerate(run.tasks):
            images, labels = next(task.batches)
            t0 = time.perf_counter()
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)  # before the forward: no gradients held through it
            # --accumulate N: the batch in N micro-batches, each loss scaled 1/N, so the gradients sum to the batch's
            parts = list(zip(images.chunk(cfg.accumulate), labels.chunk(cfg.accumulate)))
            losses, outputs = [], []
            for k, (x, y) in enumerate(parts):
                # forward (loss and top-1 stay on the device: no sync here)
                with _no_sync(net, k < len(parts) - 1), autocast(cfg, device):
                    logits = net(x) if task.index is None else net(x, task.index)
                    loss = run.loss(logits, y, task)
                # backward (DDP all-reduces on the last micro-batch only)
                with _no_sync(net, k < len(parts) - 1):
                    scaler.scale(loss / len(parts) if len(parts) > 1 else loss).backward()
                losses.append(loss.detach())
                outputs.append(logits.detach())
            meter.add(state.step, i, losses[0] if len(parts) == 1 else torch.stack(losses).mean(),
                      outputs[0] if len(parts) == 1 else torch.cat(outputs), labels)

            # clip (unscale first so the norm is in real units)
            if cfg.clip_grad is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(trained, cfg.clip_grad)

            # step
            scaler.step(optimizer)
            scaler.update()
            step_times.append(time.perf_counter() - t0)  # host time: on CUDA, launch time until the queue fills
        state.step += 1
        bar.update(1)

        # log: the loop's only sync, every log_every steps and before a checkpoint; stops on a non-finite loss
        checkpoint_now = state.step % run.eval_every == 0 or state.step == run.total_steps
        if state.step % cfg.log_every == 0 or checkpoint_now:
            _collect(run, meter, bar)
        if state.step % cfg.log_every == 0:
            _log(run, meter, bar, lr, step_times, len(labels))

        # evaluate and checkpoint
        if checkpoint_now:
            _evaluate_and_checkpoint(run, bar, meter.state())
    bar.close()
    report = build_report(run, step_times)
    run.files.report(report)
    return report


def _no_sync(net: nn.Module, skip: bool):
    """DDP's `no_sync` when `skip` (a micro-batch before the last: gradients stay local), else nothing."""
    return net.no_sync() if skip and hasattr(net, "no_sync") else contextlib.nullcontext()


def seed_host_rngs(seed: int) -> None:
    """Seed Python's and numpy's global generators from the run's seed: they are saved in every checkpoint, and
    unseeded (drawn from the OS at start) they made two identical runs write different checkpoint bytes."""
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _setup(cfg: TrainConfig, dp: Group, resume: Optional[str | Path], held: contextlib.ExitStack) -> Run:
    """Everything the loop needs, with the checkpoint of `resume` restored. Everything that can fail on bad input
    happens before the first file is written. The run directory's lock goes on `held`."""
    if cfg.batch_size % dp.world_size:
        raise BSRError(f"batch_size={cfg.batch_size} is not divisible by the {dp.world_size} processes; each "
                       f"takes an equal slice of every batch")
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    released = cfg.release_memory and release_freed_memory()  # before any model or data is allocated
    seed_host_rngs(cfg.seed)  # a resumed run then restores the checkpoint's states over these
    if cfg.out is None:
        cfg.out = dp.broadcast(default_out(cfg))  # named after rank 0's clock: ranks may straddle a second
    files = RunFiles(Path(cfg.out), write=dp.is_main, held=held)
    saved = read_checkpoint(resume) if resume is not None else None
    files.check(resuming=saved is not None)
    if saved is not None:  # every file resume touches is checked before the first write
        files.check_config_file(saved[1]["config"])
        metrics = files.metrics_until(saved[1]["step"])
        refuse_without_optimizer_state(saved, resume, cfg.fresh_optimizer)
    if cfg.num_classes is not None and not cfg.tasks:
        check_num_classes(cfg.num_classes, cfg.dataset)
    cfg = with_class_names(cfg)

    model = setup_model(cfg, dp.device)
    tasks = build_tasks(cfg, image_size(model))
    tests = [test_loader(t.test_set, cfg, dp.device, dp) for t in tasks]
    vals = [test_loader(t.val_set, cfg, dp.device, dp) for t in tasks if t.val_set is not None]
    files.prepare(cfg)
    steps_per_epoch = max(task.steps_per_epoch for task in tasks)
    optimizer = build_optimizer(cfg, model)
    scaler = torch.amp.GradScaler(dp.device.type, enabled=cfg.amp == "fp16")
    params = count_params(model)
    state = Progress()
    if saved is not None:
        state = restore_state(saved, model, optimizer, scaler, resume)
        files.truncate_metrics(metrics)

    test_set = tasks[0].test_set
    probe = torch.stack([test_set[i][0] for i in range(min(2, len(test_set)))])  # a rank's test slice may be empty
    if tasks[0].index is not None:
        set_moe_task(backbone(model), 0)
    tokens = tokens_per_block(backbone(model), probe.to(dp.device))
    # after freezing: DDP all-reduces only the trainable parameters; a multi-task step leaves the other tasks' heads
    # and gates without gradient
    net = distributed.wrap(model, dp, find_unused=len(tasks) > 1)
    for task in tasks:
        task.start(cfg, dp, state.step)
    model.train()
    return Run(cfg, dp, files, model, net, optimizer, scaler, nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing),
               tasks, tests, steps_per_epoch, total_steps=cfg.steps or cfg.epochs * steps_per_epoch,
               warmup=cfg.warmup_steps + round(cfg.warmup_epochs * steps_per_epoch),
               eval_every=cfg.eval_every or steps_per_epoch, progress=state, params=params, tokens=tokens,
               checkpoint=files.out / CHECKPOINT_NAME if saved is not None else None, vals=vals,
               keep_warmup=round(cfg.keep_warmup_epochs * steps_per_epoch) if bsr_state(backbone(model)) else 0,
               released=released)


def _collect(run: Run, meter: StepMeter, bar: tqdm) -> None:
    """Bring the meter's steps to the host; stop with a one-line error at the first non-finite loss (every rank sees
    the same all-reduced values, so all stop together)."""
    bad = meter.collect(run.dp)
    if bad is None:
        return
    bar.close()
    loss, step, name = bad
    kept = f"last good checkpoint: {run.checkpoint}" if run.checkpoint else "no checkpoint was written yet"
    where = f" on task {name}" if run.cfg.tasks else ""
    raise BSRError(f"loss is {loss} at step {step}{where}; stopped ({kept}); lower --lr or set --clip-grad")


def _log(run: Run, meter: StepMeter, bar: tqdm, lr: float, step_times: list[float], batch: int) -> None:
    """One metrics line (loss and top-1: means over the steps since the last line) and the progress bar's figures."""
    loss, acc, per_task = meter.pop()
    step = run.progress.step
    bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.1f}", ips=f"{batch * run.dp.world_size / step_times[-1]:.0f}",
                    refresh=False)
    record = {"step": step, "epoch": (step - 1) // run.steps_per_epoch, "lr": lr, "loss": loss, "train_acc": acc,
              "step_time": sum(step_times[-len(run.tasks):])}
    if run.cfg.tasks:
        record["tasks"] = {name: {"loss": lv, "train_acc": a} for name, (lv, a) in per_task.items()}
    run.files.log(record)


def _evaluate_and_checkpoint(run: Run, bar: tqdm, log_window: list) -> None:
    """Test (and validation) top-1 of every task, the history, a metrics line, and (rank 0) the checkpoint."""
    cfg, state = run.cfg, run.progress
    accs = {task.name: evaluate(run.model, loader, run.dp.device, cfg, run.dp, task.index)
            for task, loader in zip(run.tasks, run.tests)}
    test_acc = statistics.fmean(accs.values())
    if test_acc > state.best:
        state.best, state.history["best_step"] = test_acc, state.step
    state.history["acc"] = test_acc
    for name, value in accs.items():
        seen = state.history["tasks"].get(name, {"best": 0.0})
        state.history["tasks"][name] = {"final": value, "best": max(seen["best"], value)}
    record = {"step": state.step, "epoch": (state.step - 1) // run.steps_per_epoch, "test_acc": test_acc,
              "best_acc": state.best}
    val_text = ""
    if run.vals:
        val_acc = statistics.fmean(evaluate(run.model, loader, run.dp.device, cfg, run.dp, task.index)
                                   for task, loader in zip(run.tasks, run.vals))
        val = state.history.setdefault("val", {"best": -1.0})
        if val_acc > val["best"]:  # the model selection a study reports: test top-1 at the best validation point
            val.update(best=val_acc, best_step=state.step, test_at_best=test_acc)
        val["final"] = val_acc
        record["val_acc"] = val_acc
        val_text = f", val {val_acc:.2f}%"
    if cfg.tasks:
        record["tasks"] = {name: {"test_acc": value} for name, value in accs.items()}
    run.files.log(record)
    if run.dp.is_main:  # the other ranks hold the same parameters and optimizer state
        per_task = f" [{', '.join(f'{n} {a:.2f}%' for n, a in accs.items())}]" if cfg.tasks else ""
        bar.write(f"step {state.step}/{run.total_steps}: test top-1 {test_acc:.2f}% (best {state.best:.2f}%)"
                  f"{val_text}{per_task}")
        save_checkpoint(run.files.out, run.model, run.optimizer, run.checkpoint_meta(run.scaler.state_dict(),
                                                                                     log_window))
    run.checkpoint = run.files.out / CHECKPOINT_NAME
