"""Training on the device (SPEC section 10): a run's or a config's model as ONNX Runtime on-device training artifacts
(`export_device`), the check that they train as PyTorch does (`verify_device`), and a device-trained checkpoint
brought home as a bsr run directory (`import_device_run`), so `bsr eval`, `bsr export` and `bsr predict` take it.

The usual flow starts on the device from the pretrained backbone: `bsr export --format ort-training OUT --model ...`
exports a config (the same options as `bsr train`); `bsr export RUN OUT --format ort-training` continues a run. The
artifacts carry `bsr train`'s recipe for the device trainer (`bsr_device`): optimizer (bsr's own ORT graphs: AdamW or
SGD with momentum, clipping, weight decay on the tensors `bsr train` decays), learning-rate schedule, batch size,
epochs, augmentation, splits, seed. What the device graphs cannot do is refused in one line (`device_problem`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bsr_device.artifacts import read_json, read_metadata
from bsr_device.schedule import lr_at
from bsr_device.session import DeviceSession, checkpoint_parameters
from bsr_device.trainer import CHECKPOINT_FILE, REPORT, RUN_FILE

from ..core import bsr_state
from ..core.frozen import FrozenInt8Linear, FrozenLowPrecisionLinear
from ..deploy.onnx_export import export_copy
from ..deploy.ort_optim import OptimizerSpec, decay_matches
from ..deploy.ort_training import export_ort_training
from ..errors import BSRError
from .build import backbone, image_size, setup_model
from .checkpoint import save_checkpoint
from .deploy import run_class_names, verify_images
from .config import TrainConfig, make_config, with_values
from .methods import host
from .optim import build_optimizer
from .runs import RunFiles, load_run, refuse_run_file

DEVICE_METHODS = ("bsr", "full", "head", "bitfit", "last-k", "tokendrop")
RECIPE_KEYS = ("batch_size", "epochs", "steps", "lr", "min_lr", "schedule", "warmup_steps", "warmup_epochs",
               "eval_every", "log_every", "seed", "rrc_scale", "hflip", "test_fraction", "split_seed")
VERIFY_TOLERANCE = 1e-4  # largest loss difference accepted over the verify steps


def _quiet(_: str) -> None:
    pass


def device_problem(cfg: TrainConfig) -> Optional[str]:
    """Why `cfg` cannot train on the device (ORT's training graphs), with the fix; None if it can."""
    if cfg.tasks:
        return "multi-task runs (task heads, MoE routing) have no on-device export; train one --dataset"
    if cfg.method not in DEVICE_METHODS:
        return f"method {cfg.method} has no on-device export; use one of {', '.join(DEVICE_METHODS)}"
    if cfg.layer_decay is not None:
        return ("layer-wise lr decay needs each tensor's name, which ORT's optimizer graph does not see; export with "
                "--layer-decay none")
    if cfg.amp != "off":
        return f"ORT's CPU training kernels are float32: export with --amp off (not {cfg.amp})"
    if cfg.accumulate != 1:
        return "gradient accumulation is not in the device trainer; export with --accumulate 1"
    if cfg.keep_warmup_epochs > 0:
        return "the device graph's keep rate is fixed: export with --keep-warmup-epochs 0"
    if cfg.method in ("bsr", "tokendrop") and not cfg.bsr.drop_in_eval:
        return "the device's eval graph is its training forward, which drops tokens: export with drop_in_eval on"
    return None


def _stepwise_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """`bsr train`'s optimizer of `cfg` for `model` as one optimizer stepped after backward (what the device graph
    reproduces; the fused step and bf16 state are PyTorch-side memory options)."""
    return build_optimizer(with_values(cfg, fused_step=False, optimizer_state="fp32"), model)


def _no_decay_names(cfg: TrainConfig, model: nn.Module) -> set[str]:
    """Names of the trained parameters `bsr train`'s optimizer does not decay."""
    ids = {id(p): n for n, p in model.named_parameters()}
    optimizer = _stepwise_optimizer(cfg, model)
    return {ids[id(p)] for group in optimizer.param_groups if group.get("weight_decay", 0) == 0
            for p in group["params"]}


def optimizer_spec(cfg: TrainConfig, model: nn.Module) -> OptimizerSpec:
    """The device optimizer of `cfg` for `model`, checked to decay exactly the tensors `bsr train` decays."""
    spec = OptimizerSpec(kind=cfg.optimizer, weight_decay=cfg.weight_decay, clip_grad=cfg.clip_grad,
                         momentum=cfg.momentum)
    if cfg.weight_decay > 0:
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        odd = decay_matches(params, _no_decay_names(cfg, model))
        if odd is not None:
            raise BSRError(f"the device optimizer decays tensors by rank, bsr train decays {odd} otherwise; export "
                           f"with --weight-decay 0")
    return spec


def export_device(source: str | Path | TrainConfig, out: str | Path, *, ort_format: bool = True,
                  verify_steps: int = 0, log: Callable[[str], None] = _quiet) -> dict:
    """Write on-device training artifacts of a run directory (its trained model) or of a config (its base weights
    with the method applied) into the new folder `out`; with `verify_steps`, then train them that many steps in ORT
    and in PyTorch from the same start (`verify_device`). Returns `export_ort_training`'s record with `config` (and
    `verify`)."""
    if isinstance(source, TrainConfig):
        cfg = source
        model = setup_model(cfg, torch.device("cpu"))
    else:
        refuse_run_file(source, out)
        cfg, model = load_run(source, torch.device("cpu"))
        model.train()
    problem = device_problem(cfg)
    if problem:
        raise BSRError(problem)
    vit = host(model)
    spec = optimizer_spec(cfg, vit)
    num_classes = int(vit.num_classes)
    mean, std = cfg.mean or list(vit.pretrained_cfg.get("mean")), cfg.std or list(vit.pretrained_cfg.get("std"))
    resolved = bsr_state(vit)
    metadata = {"num_classes": num_classes, "class_names": run_class_names(cfg, num_classes), "mean": list(mean),
                "std": list(std), "config": cfg.to_dict(), "source": None if isinstance(source, TrainConfig)
                else str(source), "recipe": {k: getattr(cfg, k) for k in RECIPE_KEYS},
                "bsr": None if resolved is None else dataclasses.asdict(resolved)}
    record = export_ort_training(vit, out, optimizer=spec, metadata=metadata, label_smoothing=cfg.label_smoothing,
                                 ort_format=ort_format, log=log)
    record["config"] = cfg
    if verify_steps:
        log(f"verifying: {verify_steps} steps in onnxruntime and in PyTorch from the same start")
        record["verify"] = verify_device(out, cfg, model, steps=verify_steps)
    return record


def _verify_batches(cfg: TrainConfig, size: int, steps: int, batch: int, classes: int) -> list[tuple[np.ndarray, ...]]:
    """`steps` seeded batches: the dataset's test images when it can be read here, else seeded noise images."""
    rng = np.random.default_rng(cfg.seed)
    try:
        images = verify_images(cfg, size, steps * batch)[0].numpy()
    except BSRError:
        images = rng.standard_normal((steps * batch, 3, size, size)).astype(np.float32)
    images = np.resize(images, (steps * batch, 3, size, size)).astype(np.float32)
    labels = rng.integers(0, classes, steps * batch)
    return [(images[i * batch:(i + 1) * batch], labels[i * batch:(i + 1) * batch]) for i in range(steps)]


def verify_device(artifacts: str | Path, cfg: TrainConfig, model: nn.Module, steps: int = 50, batch: int = 8,
                  graph_format: str = "onnx") -> dict:
    """Train the artifacts `steps` steps in ORT and `model` (the exported model, same start) in PyTorch with `bsr
    train`'s optimizer, on the same batches and learning rates; {max_loss_diff, losses_ort, losses_torch, reference}.

    Frozen weights stored in bf16/fp16 (the lean preset) are float32 Linears in the graph (ORT's CPU kernels have no
    bf16 matmul), so the reference is then the exported copy, whose frozen Linears compute in float32 with the same
    rounded weights; PyTorch's own lean step computes them in bf16 and differs from both by that rounding."""
    session = DeviceSession(artifacts, graph_format=graph_format)
    low_precision = any(isinstance(m, (FrozenLowPrecisionLinear, FrozenInt8Linear)) for m in model.modules())
    vit = export_copy(model, train=True) if low_precision else host(model)
    vit.train()
    optimizer = _stepwise_optimizer(cfg, vit)
    trained = [p for p in vit.parameters() if p.requires_grad]
    size, classes = image_size(model), int(vit.num_classes)
    ort_losses, torch_losses = [], []
    for step, (x, y) in enumerate(_verify_batches(cfg, size, steps, batch, classes)):
        lr = lr_at(step, lr=cfg.lr, total_steps=steps, warmup_steps=0, min_lr=cfg.min_lr, schedule=cfg.schedule)
        ort_losses.append(session.train_step(x, y, lr)[0])
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(vit(torch.from_numpy(x)), torch.from_numpy(y), label_smoothing=cfg.label_smoothing)
        loss.backward()
        if cfg.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(trained, cfg.clip_grad)
        optimizer.step()
        torch_losses.append(loss.item())
    diff = max(abs(a - b) for a, b in zip(ort_losses, torch_losses))
    return {"steps": steps, "batch": batch, "max_loss_diff": diff, "losses_ort": ort_losses,
            "losses_torch": torch_losses, "reference": "float32 frozen weights" if low_precision else "the model"}


def import_device_run(device_run: str | Path, out: str | Path, log: Callable[[str], None] = _quiet) -> dict:
    """Bring a device run home: its checkpoint's trained parameters into the model its artifacts were exported from,
    written as a bsr run directory `out` (config.yaml, checkpoint.safetensors, report.json). The frozen parameters
    of the checkpoint must equal the rebuilt model's (the same base weights)."""
    device_run, out = Path(device_run), Path(out)
    saved = read_json(device_run / RUN_FILE, "the device run's description",
                      "pass a directory written by bsr-device train")
    artifacts = Path(saved["artifacts"])
    meta = read_metadata(artifacts)
    files = RunFiles(out)
    files.check(resuming=False)  # not a file, not another run, writable
    cfg = make_config({**meta["config"], "dataset": saved["dataset"], "class_names": list(saved["classes"]),
                       "out": str(out)})
    model = setup_model(cfg, torch.device("cpu"))
    session_params = checkpoint_parameters(device_run / CHECKPOINT_FILE)
    params = dict(host(model).named_parameters())
    constants = {f"{n}.weight" for n, m in host(model).named_modules() if isinstance(m, FrozenInt8Linear)}
    missing = sorted(set(params) - set(session_params) - constants)  # int8 frozen weights are graph constants
    if missing:
        raise BSRError(f"the device checkpoint lacks {missing[0]}; it was not trained from {artifacts}")
    with torch.no_grad():
        for name, p in params.items():
            if name not in session_params:
                continue
            value = torch.from_numpy(session_params[name]).to(p.dtype)
            if not p.requires_grad and not torch.allclose(value.float(), p.float(), rtol=1e-2, atol=1e-3):
                raise BSRError(f"frozen parameter {name} of the device checkpoint differs from the base weights "
                               f"rebuilt here ({cfg.checkpoint or cfg.model}); import on a machine with the base "
                               f"weights the artifacts were exported from")
            if p.requires_grad:
                p.copy_(value)
    report = read_json(device_run / REPORT, "the device run's report", "finish the device run first")
    files.prepare(cfg)  # the directory and its config.yaml
    optimizer = _stepwise_optimizer(cfg, backbone(model))
    save_checkpoint(out, model, optimizer, {"config": cfg.to_dict(), "step": int(report["steps"]),
                                            "best_acc": float(report["best_top1"]),
                                            "history": {"acc": float(report["final_top1"]),
                                                        "best_step": int(report["best_step"])}})
    files.report({**report, "source": "device", "device_run": str(device_run)})
    log(f"imported {len(params)} parameters ({sum(p.requires_grad for p in params.values())} trained)")
    return {"path": str(out), "config": cfg, "report": report}
