"""A training run and its directory: the live objects of a run, its files (config.yaml, metrics.jsonl, report.json,
the checkpoint), resume, the report and its summary, and rebuilding or exporting a finished run's model.

Resume: every rank reads the checkpoint (so the run directory must be on a filesystem all nodes see). With
`workers=0` resumed runs are bitwise those of an uninterrupted run of the same world size, dropout included: loading a
training item reseeds torch's generator by (seed, epoch, index), so the generator state at each forward depends only
on the rank's last item. With `workers>0` every rank restores rank 0's saved generator, so the dropout masks of the
other ranks (none of the shipped methods uses dropout by default) differ from the uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import timm
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

from bsr_device.process import peak_rss_mib

from ..allocator import DEFAULT_THRESHOLD
from ..core.moe import moe_aux_loss
from ..core.patch import bsr_state, restore
from ..data import dataset_slug
from ..errors import BSRError
from ..files import (OUTPUT_FIX, atomic_write_bytes, exclusive_dir, read_json, read_json_lines, read_yaml,
                     refuse_writing_inputs, remove_stale_temps)
from ..tensorfile import save_tensors
from ..version import __version__
from . import distributed
from .batches import Task
from .build import backbone, setup_model
from .checkpoint import CHECKPOINT_NAME, load_trainable, read_checkpoint, set_rng_state, unflatten_optimizer
from .config import TrainConfig, make_config, with_values
from .distributed import Group
from .methods import ParamCount, format_tokens, merge_lora


class RunFiles:
    """The run directory: config.yaml, metrics.jsonl, report.json and the checkpoint.

    `write=False` (data-parallel ranks other than 0) checks the directory like rank 0 but writes nothing. With `held`,
    the directory is locked (`bsr.files.exclusive_dir`) from the moment it exists until `held` closes.
    """

    def __init__(self, out: Path, write: bool = True, held: Optional[contextlib.ExitStack] = None) -> None:
        self.out, self.write, self.held = out, write, held
        self.metrics = out / "metrics.jsonl"
        self.locked = False

    def _hold(self) -> None:
        """With `held` (training), lock the directory until `held` closes, so that a second process (a study run
        twice, the same --resume in two terminals) stops with one line instead of writing the same run."""
        if self.held is not None and self.write and not self.locked and self.out.is_dir():
            self.held.enter_context(exclusive_dir(self.out, "run directory"))
            self.locked = True
            remove_stale_temps(self.out)  # a write killed mid-way (kill -9) left its temporary file

    def check(self, resuming: bool) -> None:
        """Refuse an out path that is a file, or that holds another run (never overwrite one)."""
        if self.out.exists() and not self.out.is_dir():
            raise BSRError(f"out={str(self.out)!r} exists and is not a directory")
        if not resuming and (self.out / CHECKPOINT_NAME).exists():
            raise BSRError(f"out={str(self.out)!r} already holds a run; continue it with --resume {self.out} "
                           f"or pick another --out")
        existing = self.out
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise BSRError(f"out={str(self.out)!r} cannot be created: {existing} is not a directory")
        if not os.access(existing, os.W_OK):
            raise BSRError(f"out={str(self.out)!r} is not writable ({existing}); pick another --out")
        self._hold()

    def prepare(self, cfg: TrainConfig) -> None:
        """Create the directory and write the resolved config."""
        if not self.write:
            return
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BSRError(f"cannot create out dir {self.out}: {e.strerror or e}") from None
        self._hold()
        atomic_write_bytes(self.out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())

    def metrics_until(self, step: int) -> Optional[list[dict]]:
        """The metric lines of steps up to `step` (a killed run's later lines are written again; a last line cut
        short by the kill is dropped); None without a metrics file. Refuses, naming the file, one that is not JSON
        lines of objects: resume checks it before it writes anything."""
        if not self.metrics.exists():
            return None
        records = read_json_lines(self.metrics, "metrics file")
        for number, record in enumerate(records, 1):
            if not isinstance(record.get("step", 0), int):
                raise BSRError(f"metrics file {self.metrics}: record {number} has step {record['step']!r}, not an "
                               f"integer; restore the file or delete it")
        return [record for record in records if record.get("step", 0) <= step]

    def truncate_metrics(self, records: Optional[list[dict]]) -> None:
        """Rewrite the metrics file with `records` (from `metrics_until`; None: there is none)."""
        if self.write and records is not None:
            atomic_write_bytes(self.metrics, "".join(json.dumps(r) + "\n" for r in records).encode())

    def check_config_file(self, saved: dict) -> dict:
        """Compare the run's config.yaml with `saved`, the checkpoint's config (what resume continues): the file is
        checked like flags, and it must agree on everything but `RESUME_OPTIONS` (and `out`), else a one-line error
        names the file and the first option that differs, so that a user's edit is never silently overwritten.
        Returns the file's `RESUME_OPTIONS` (they apply to the resumed run, flags win); {} without the file."""
        path = self.out / "config.yaml"
        if not path.exists():
            return {}
        what = f"{path} (read on resume)"
        values = read_yaml(path, "run config", fix=OUTPUT_FIX)
        try:
            ours = make_config({k: v for k, v in values.items() if k != "out"}).to_dict()
        except BSRError as e:
            raise BSRError(f"{what}: {e}") from None
        theirs = make_config({k: v for k, v in saved.items() if k != "out"}).to_dict()
        for key in ours:
            if key not in RESUME_OPTIONS + ("out",) and ours[key] != theirs[key]:
                raise BSRError(f"{what} says {key}={ours[key]!r} but the checkpoint was trained with {theirs[key]!r}; "
                               f"a run continues with its checkpoint's config: restore {key} in config.yaml (only "
                               f"{', '.join(RESUME_OPTIONS)} may change, there or as flags)")
        return {key: ours[key] for key in RESUME_OPTIONS}

    def log(self, record: dict) -> None:
        if not self.write:
            return
        try:
            with self.metrics.open("a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise BSRError(f"cannot write {self.metrics}: {e.strerror or e}") from None

    def report(self, report: dict) -> None:
        if not self.write:
            return
        atomic_write_bytes(self.out / "report.json", (json.dumps(report, indent=2) + "\n").encode())


def read_report(path: str | Path) -> dict:
    """A run's `report.json` (the file, or its run directory), checked to hold what readers take from it: a mapping
    with `config` and `accuracy` (best, final, best_step) mappings; else a one-line error naming the file."""
    path = Path(path)
    path = path / "report.json" if path.is_dir() else path
    report = read_json(path, "run report")
    accuracy = report.get("accuracy")
    if not isinstance(report.get("config"), dict) or not isinstance(accuracy, dict) or \
            any(key not in accuracy for key in ("best", "final", "best_step")):
        raise BSRError(f"run report {path} lacks its config or accuracy; delete it (a run with a checkpoint writes it "
                       f"again when continued) or restore it")
    return report


RUN_FILE_NAMES = (CHECKPOINT_NAME, "config.yaml", "metrics.jsonl", "report.json")
# how a run computes, not what: they may change on resume
RESUME_OPTIONS = ("device", "workers", "threads", "release_memory", "fresh_optimizer")


def refuse_run_file(run: str | Path, out: str | Path, option: str = "OUT") -> None:
    """Refuse (one line) an output path that is one of the files of run directory `run`, however spelled (relative,
    symlink, hard link), or the run directory itself, or a run file of any other run directory (one holding a
    checkpoint): writing it destroys that run."""
    run_path = Path(run).expanduser().resolve()
    refuse_writing_inputs([Path(out).expanduser()], [run_path, *(run_path / name for name in RUN_FILE_NAMES)], option)
    out_path = Path(out).expanduser().resolve()
    if out_path.name in RUN_FILE_NAMES and (out_path.parent / CHECKPOINT_NAME).is_file():
        raise BSRError(f"{option} {out} is the {out_path.name} of the run in {out_path.parent}; writing it would "
                       f"destroy that run, pick another path")


def default_out(cfg: TrainConfig) -> str:
    return str(Path("runs") / f"{cfg.method}-{dataset_slug(cfg.dataset)}-{time.strftime('%Y%m%d-%H%M%S')}")



@dataclass
class Progress:
    """Where a run stands (what its checkpoint carries besides tensors): the step, the best and last test top-1 with
    their per-task history, and the metrics of steps taken since the last metrics line."""

    step: int = 0
    best: float = 0.0
    history: dict = field(default_factory=lambda: {"acc": None, "best_step": 0, "tasks": {}})
    log_window: list = field(default_factory=list)


@dataclass
class Run:
    """What a training run holds while it runs: config, group, files, model (`net`: the same in DDP), optimizer,
    tasks and their test loaders, the schedule's lengths and the progress."""

    cfg: TrainConfig
    dp: Group
    files: RunFiles
    model: nn.Module
    net: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    tasks: list[Task]
    tests: list[DataLoader]
    steps_per_epoch: int
    total_steps: int
    warmup: int
    eval_every: int
    progress: Progress
    params: ParamCount
    tokens: list[tuple[int, int]]
    checkpoint: Optional[Path] = None  # the last good checkpoint, once there is one
    vals: list[DataLoader] = field(default_factory=list)  # validation loaders (`val_fraction` > 0), one per task
    keep_warmup: int = 0  # steps of the keep-rate warm-up (0: constant keep rate)
    released: bool = False  # glibc's mmap threshold fixed (`bsr.allocator`) for this run

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, task: Task) -> torch.Tensor:
        """Cross-entropy of logits (B, C) against labels (B,), plus the MoE load-balancing loss if asked."""
        loss = self.criterion(logits.float(), labels)
        if task.index is not None and self.cfg.moe_aux_loss > 0:
            loss = loss + moe_aux_loss(self.model)
        return loss

    def checkpoint_meta(self, scaler_state: dict, log_window: list) -> dict:
        """The metadata saved with the checkpoint of the current step."""
        p = self.progress
        # the config without `out`: the same run written elsewhere gives the same bytes (resume sets out itself)
        return {"config": {**self.cfg.to_dict(), "out": None}, "step": p.step, "epoch": p.step / self.steps_per_epoch,
                "best_acc": p.best, "history": p.history, "log_window": log_window,
                "scheduler": {"total_steps": self.total_steps, "warmup_steps": self.warmup},
                "scaler": {k: float(v) if torch.is_tensor(v) else v for k, v in scaler_state.items()}}


def refuse_without_optimizer_state(saved: tuple[dict, dict], source: Any, fresh_optimizer: bool) -> None:
    """Refuse to resume from a checkpoint past step 0 without optimizer state (a run brought home from the device,
    an edited file) unless `fresh_optimizer`: the run would no longer equal an uninterrupted one."""
    tensors, meta = saved
    if meta["step"] > 0 and not unflatten_optimizer(tensors, meta["optimizer"])["state"] and not fresh_optimizer:
        raise BSRError(f"checkpoint {source} has no optimizer state at step {meta['step']}: resuming would train on "
                       f"with a fresh optimizer, unlike an uninterrupted run; add --fresh-optimizer to accept that")


def restore_state(saved: tuple[dict, dict], model: nn.Module, optimizer: torch.optim.Optimizer,
                  scaler: torch.amp.GradScaler, source: Any) -> Progress:
    """Load a checkpoint's parameters, optimizer, scaler and RNG states; returns its `Progress`."""
    tensors, meta = saved
    load_trainable(model, tensors, source)
    device = next(model.parameters()).device
    try:
        optimizer.load_state_dict(unflatten_optimizer(tensors, meta["optimizer"]))
    except (ValueError, KeyError) as e:
        raise BSRError(f"checkpoint {source}: optimizer state does not fit ({e}); was the config changed?") from None
    for state in optimizer.state.values():  # optimizer tensors were saved on CPU
        for key, value in state.items():
            if torch.is_tensor(value) and key != "step":
                state[key] = value.to(device)
    if meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    set_rng_state(tensors, meta["rng"])
    history = {"tasks": {}, **meta.get("history", {"acc": None, "best_step": 0})}
    return Progress(meta["step"], float(meta.get("best_acc", 0.0)), history, meta.get("log_window", []))


def build_report(run: Run, step_times: list[float]) -> dict:
    """The `report.json` of a finished run: accuracy, data, method, parameters, tokens, speed, memory, machine."""
    cfg, tasks, p, device = run.cfg, run.tasks, run.progress, run.dp.device
    report = {
        "accuracy": {"final": p.history["acc"], "best": p.best, "best_step": p.history["best_step"]},
        "dataset": {"name": "+".join(cfg.task_names), "train_images": sum(len(t.items) for t in tasks),
                    "test_images": sum(len(t.test_set) for t in tasks),
                    "skipped_images": sum(t.skipped for t in tasks), "class_names": cfg.class_names},
        "method": cfg.method, "model": cfg.model, "steps": run.total_steps,
        "params": {"trainable": run.params.trainable, "total": run.params.total},
        "tokens_per_block": [{"attn": a, "mlp": m} for a, m in run.tokens],
        "median_step_time_s": statistics.median(step_times) if step_times else None,
        "images_per_s": cfg.effective_batch / statistics.median(step_times) if step_times else None,
        "peak_memory_mib": peak_memory_mib(device),
        "allocator": {"release_memory": cfg.release_memory, "applied": run.released,
                      "mmap_threshold": DEFAULT_THRESHOLD if run.released else None},
        "data_parallel": data_parallel_record(run.dp, run.model),
        "config": cfg.to_dict(), **environment(device),
    }
    if "val" in p.history:
        report["accuracy"]["val"] = p.history["val"]
        report["dataset"]["val_images"] = sum(len(t.val_set) for t in tasks if t.val_set is not None)
    if cfg.tasks:
        report["accuracy"]["tasks"] = p.history["tasks"]
        report["dataset"]["tasks"] = [{"name": t.name, "train_images": len(t.items), "test_images": len(t.test_set)}
                                      for t in tasks]
    return report


def summary_lines(report: dict) -> list[str]:
    """The short summary printed at the end of `bsr train`."""
    acc, p = report["accuracy"], report["params"]
    tokens = [(t["attn"], t["mlp"]) for t in report["tokens_per_block"]]
    step_time = "no steps taken in this process (the run had finished)"
    if report["median_step_time_s"] is not None:
        step_time = f"{1000 * report['median_step_time_s']:.1f} ms median ({report['images_per_s']:.0f} img/s)"
    lines = [
        f"method {report['method']} on {report['dataset']['name']} ({report['model']}, {report['steps']} steps)",
        f"  test top-1     final {acc['final']:.2f}%  best {acc['best']:.2f}% (step {acc['best_step']})"
        + (" (mean over tasks)" if "tasks" in acc else ""),
        f"  trainable      {p['trainable']:,} / {p['total']:,} params ({100 * p['trainable'] / p['total']:.1f}%)",
        f"  tokens/block   {format_tokens(tokens)}  (attention/MLP)",
        f"  step time      {step_time}",
        f"  peak memory    {report['peak_memory_mib']:.0f} MiB ({allocator_text(report.get('allocator'))})",
        f"  run dir        {report['config']['out']}",
    ]
    lines[2:2] = [f"    {name:<16} final {t['final']:.2f}%  best {t['best']:.2f}%"  # under the mean's line
                  for name, t in acc.get("tasks", {}).items()]
    if report["dataset"].get("skipped_images"):
        lines.insert(-1, f"  skipped        {report['dataset']['skipped_images']} unreadable images (named above)")
    if "val" in acc:
        v = acc["val"]
        lines.insert(2, f"  val top-1      final {v['final']:.2f}%  best {v['best']:.2f}% (step {v['best_step']}, "
                        f"test there {v['test_at_best']:.2f}%)")
    dp = report["data_parallel"]
    if dp["world_size"] > 1:
        lines.insert(-1, f"  data parallel  {dp['world_size']} processes ({dp['backend']}), "
                         f"{dp['allreduce_bytes_per_step'] / 2**20:.2f} MiB of gradients all-reduced per step")
    return lines


def allocator_text(record: Optional[dict]) -> str:
    """How a run's allocator was set, for its summary."""
    if record and record["applied"]:
        return f"glibc mmap threshold fixed at {record['mmap_threshold'] >> 20} MiB; --no-release-memory: glibc's " \
               f"default"
    if record and record["release_memory"]:
        return "glibc's default allocator: the mmap threshold cannot be fixed here (not glibc)"
    return "glibc's default allocator (--no-release-memory); its heap may keep freed activations"


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory so far: CUDA allocator peak on GPU, else the process's peak RSS (Linux VmHWM)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mib()


def environment(device: torch.device) -> dict:
    env = {"versions": {"bsr": __version__, "python": platform.python_version(), "torch": torch.__version__,
                        "timm": timm.__version__},
           "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                       "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device)}}
    if device.type == "cuda":
        env["machine"]["gpu"] = torch.cuda.get_device_name(device)
    return env



def data_parallel_record(group: Group, model: nn.Module) -> dict:
    """World size, backend and gradient bytes per step: what DDP all-reduces (nothing in a single process)."""
    grad_bytes = distributed.gradient_bytes(model)
    return {"world_size": group.world_size, "backend": group.backend, "gradient_bytes": grad_bytes,
            "allreduce_bytes_per_step": grad_bytes if group.enabled else 0}


def config_of_run(run: str | Path) -> tuple[TrainConfig, tuple[dict, dict]]:
    """The resolved config and the checkpoint (tensors, metadata) of a run directory, both checked."""
    saved = read_checkpoint(run)
    try:
        cfg = make_config(saved[1]["config"])
    except BSRError as e:
        raise BSRError(f"checkpoint of {run}: {e}") from None
    return cfg, saved


def resume_config(run: str | Path, flags: Optional[dict] = None) -> TrainConfig:
    """The config that continues `run`: its checkpoint's, with the `RESUME_OPTIONS` of its config.yaml and then of
    `flags` over it (any other flag is refused), every value checked as `bsr train` checks flags."""
    extra = [k for k in flags or {} if k not in RESUME_OPTIONS]
    if extra:
        raise BSRError(f"--resume continues the saved config; drop --{extra[0].replace('_', '-')} (only "
                       f"{', '.join('--' + k for k in RESUME_OPTIONS)} may change)")
    cfg, (_, meta) = config_of_run(run)
    how = RunFiles(Path(run)).check_config_file(meta["config"])
    return with_values(cfg, **{**how, **(flags or {}), "out": str(run)})


def load_run(run: str | Path, device: torch.device, **overrides) -> tuple[TrainConfig, nn.Module]:
    """Rebuild the trained model of a run: base weights + method + the checkpoint's trained parameters (`overrides`
    that are not None replace config values, checked like flags)."""
    cfg, (tensors, _) = config_of_run(run)
    cfg = with_values(cfg, **{k: v for k, v in overrides.items() if v is not None})
    model = setup_model(cfg, device)
    load_trainable(model, tensors, run)
    model.eval()
    return cfg, model



def export_weights(run: str | Path, out: str | Path, dtype: str = "fp32") -> dict:
    """Write a run's trained model as a plain timm state dict (patch undone, LoRA merged) to `out` (.safetensors).

    A multi-task run's state dict is the `MultiTaskViT`'s: `backbone.*` (with the MoE keys of `bsr.core.moe`) and
    `heads.{t}.*`, the task order and names in the metadata."""
    refuse_run_file(run, out)
    cfg, model = load_run(run, torch.device("cpu"))
    model = merge_lora(model)  # peft's layers and the MoE experts' adapters
    if bsr_state(backbone(model)) is not None:
        restore(backbone(model))
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(dtype)
    if torch_dtype is None:
        raise BSRError(f"dtype={dtype!r} is not valid; use fp32, fp16 or bf16")
    state = {k: v.detach().to(torch_dtype) for k, v in model.state_dict().items()}
    out = Path(out)
    meta = {"source_run": str(run), "dtype": dtype, **({"tasks": ",".join(cfg.tasks)} if cfg.tasks else {})}
    save_tensors(out, state, metadata=meta)
    return {"path": str(out), "tensors": len(state), "bytes": out.stat().st_size}
