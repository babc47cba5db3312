"""Plan a run for a memory budget (SPEC section 9): `bsr plan --budget 1.5GiB` and `bsr train --memory-budget`.

The memory model: a configuration's peak is the traced tensor peak of its training step, of an evaluation batch or
of writing its checkpoint, whichever is largest (`bsr.measure.trace`: parameters, gradients, optimizer state, activations saved for backward per
block, exact, and the step's transients), plus what tracing cannot see, measured once per machine and cached
(`bsr.measure.overhead`: the process before it builds a model, and the allocator's and kernels' step overhead), plus
the images a dataset keeps in memory. On CPU that is the process's peak resident memory, what a memory cap sees; on
CUDA the allocator's peak (`max_memory_allocated`; the CUDA context is not in it).

The configurations tried, in order of expected accuracy (the study's evidence, STUDY.md):
1. tier 0, the same updates: the configuration as given, then with recomputation of the trained region (exact),
   each at the largest micro-batch that fits, with `--accumulate` keeping the effective batch (gradient accumulation
   gives the big batch's updates: tests/test_train_options.py). Among these, fewer micro-batches first (faster), then
   the configuration as given first.
2. tier 1, close to the same updates: BSR's lean preset (frozen weights in bfloat16, recomputation, no gradient
   through the token scores), then lean with int8 frozen weights; their gradients differ from the paper's by 1-8%
   (bf16) and 3-11% (int8) relative L2 per trained block (benchmarks/gradient_fidelity.py, BENCHMARKS.md).
3. tier 2 and on, accuracy traded for memory (lean, largest micro-batch that fits): keep rate 0.3 (3 points below
   0.5 in the study's ablations), the trainable blocks without the first (the study: BSR needs an early trainable
   block, last:3 lost 6 points), the last trainable block only (10 points).
`bsr train --memory-budget` writes the options that fit (`write_plan`), then, each in a fresh process (the planning
process replaces itself, so only one runs at a time), checks them in order with a real measured step
(`check_planned`) and trains the first that passes, in the process that checked it.

A budget is a promise about the whole training process's peak, so both judgements carry a margin, one-sided towards
safety (BENCHMARKS.md, "A memory budget is kept"): an option fits the plan when its prediction plus
`PREDICTION_MARGIN` (the model's largest measured under-prediction on ViT-B/16 and DeiT-S, -10.4%, 18 MiB, at small
peaks; -0.1% to -5.9% elsewhere) is within the budget, and passes the check when its measured step plus
`CHECK_MARGIN` (what training added above its own check step, measured inside real caps) is.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from ..core.config import PRESETS
from ..data import dataset_info
from ..errors import BSRError
from ..files import atomic_write_bytes, read_json
from ..train import pick_device
from ..train.build import build_model
from ..train.config import TrainConfig, make_config, with_values
from .overhead import Overhead, data_bytes, measure_step, overhead
from .trace import StepTrace, trace_config

MIB = 2 ** 20
_UNITS = {"": 1, "b": 1, "k": 2 ** 10, "kib": 2 ** 10, "kb": 10 ** 3, "m": 2 ** 20, "mib": 2 ** 20, "mb": 10 ** 6,
          "g": 2 ** 30, "gib": 2 ** 30, "gb": 10 ** 9, "t": 2 ** 40, "tib": 2 ** 40, "tb": 10 ** 12}
KEEP_RATE_LOW = 0.3
PREDICTION_MARGIN = (0.05, 24 * MIB)  # relative, absolute: an option fits when predicted * 1.05 + 24 MiB <= budget
CHECK_MARGIN = (0.06, 16 * MIB)  # a checked step fits when measured * 1.06 + 16 MiB <= budget


def with_margin(peak: int, margin: tuple[float, int]) -> int:
    """`peak` plus a (relative, absolute) safety margin, in bytes."""
    return int(peak * (1 + margin[0])) + margin[1]


def parse_size(text: str) -> int:
    """Bytes of a size like `1.5GiB`, `800MiB`, `2G` (K/M/G/T and KiB... are powers of 1024, KB/MB/GB of 1000)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match and match.group(2).lower()
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise BSRError(f"memory budget {text!r} is not a size; use e.g. 1.5GiB, 800MiB or 2G")
    return int(float(match.group(1)) * _UNITS[unit])


@dataclass
class Option:
    """One planned configuration: `cfg` (its micro-batch and `accumulate`), what it changes (`label`), its accuracy
    tier (0: the same updates), the traced step and the predicted peak in bytes."""

    label: str
    tier: int
    family: int
    cfg: TrainConfig
    trace: StepTrace
    predicted: int
    fits: bool

    def changes(self, base: TrainConfig) -> dict:
        """The options that differ from `base` (flags for `bsr train`)."""
        ours, theirs = self.cfg.to_dict(), base.to_dict()
        changed = {k: v for k, v in ours.items() if k not in ("bsr", "out") and v != theirs[k]}
        changed.update({f"bsr.{k}": v for k, v in ours["bsr"].items() if v != theirs["bsr"][k]})
        return changed


def flags_text(changes: dict) -> str:
    """`--batch-size 8 --accumulate 4 --frozen-dtype bfloat16 ...` for `changes`."""
    words = []
    for key, value in changes.items():
        flag = "--" + key.removeprefix("bsr.").replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + flag[2:])
        else:
            words += [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return " ".join(words) or "(as given)"


def micro_batches(batch_size: int) -> list[int]:
    """Micro-batch sizes tried, largest first: `batch_size` halved while it stays whole, then 1."""
    sizes = [batch_size]
    while sizes[-1] % 2 == 0:
        sizes.append(sizes[-1] // 2)
    return sizes if sizes[-1] == 1 else sizes + [1]


def families(cfg: TrainConfig, depth: int) -> list[tuple[int, str, dict]]:
    """(accuracy tier, label, config changes) of every configuration family tried for `cfg`, in order."""
    found = [(0, "as given", {})]
    if cfg.method != "bsr":
        return found
    ours = cfg.bsr.to_dict()
    if ours["recompute"] != "all":
        found.append((0, "recomputation (the same updates)", {"bsr": {**ours, "recompute": "all"}}))
    lean = {**ours, **PRESETS["lean"]}
    if lean != ours:
        found.append((1, "lean preset (bf16 frozen weights, recomputation, no score gradient: close updates)",
                      {"bsr": lean}))
    if ours["frozen_dtype"] != "int8":
        found.append((1, "lean with int8 frozen weights (close updates)", {"bsr": {**lean, "frozen_dtype": "int8"}}))
    if cfg.bsr.keep_rate > KEEP_RATE_LOW:
        found.append((2, f"lean, keep rate {KEEP_RATE_LOW}", {"bsr": {**lean, "keep_rate": KEEP_RATE_LOW}}))
    blocks = list(cfg.bsr.resolve(depth).trainable_blocks)
    if len(blocks) > 1:
        found.append((3, f"lean, trainable blocks {','.join(map(str, blocks[1:]))} (not {blocks[0]})",
                      {"bsr": {**lean, "trainable_blocks": blocks[1:]}}))
    if len(blocks) > 2:
        found.append((4, f"lean, trainable block {blocks[-1]} only",
                      {"bsr": {**lean, "trainable_blocks": blocks[-1:]}}))
    return found


class Planner:
    """Predicts peaks of configurations derived from `base` on this machine (see the module docstring)."""

    def __init__(self, base: TrainConfig, log: Callable[[str], None] = lambda _: None, refresh: bool = False):
        if base.tasks:
            raise BSRError("bsr plan plans single-task runs; drop --tasks")
        self.base, self.log = base, log
        self.device = pick_device(base.device)
        info = dataset_info(base.dataset)
        self.num_classes = base.num_classes or info.num_classes
        self.data = data_bytes(info) if self.device.type == "cpu" else 0
        self.overhead: Overhead = overhead(self.device, bool(base.release_memory), log, refresh)
        with torch.device("meta"):
            self.depth = len(build_model(with_values(base, checkpoint="none", pretrained=False), 10).blocks)

    def predict(self, cfg: TrainConfig, flops: bool = False) -> tuple[StepTrace, int]:
        """(the traced step, the predicted peak in bytes) of `cfg`."""
        trace = trace_config(cfg, self.num_classes, self.device, flops=flops,
                             eval_batch=cfg.eval_batch_size or max(cfg.batch_size, 256),
                             heap_factor=self.overhead.heap_factor, small_below=self.overhead.small_below)
        extra = self.overhead.step_for(cfg) + (self.overhead.process_bytes + self.data
                                               if self.device.type == "cpu" else 0)
        return trace, trace.peak_bytes + extra

    def at_micro_batch(self, cfg: TrainConfig, micro: int) -> TrainConfig:
        """`cfg` at micro-batch `micro`, `accumulate` keeping its effective batch; evaluation at the micro-batch
        unless the user chose an evaluation batch."""
        return with_values(cfg, batch_size=micro, accumulate=cfg.effective_batch // micro,
                           eval_batch_size=self.base.eval_batch_size or micro)

    def best_of(self, family: int, tier: int, label: str, cfg: TrainConfig, budget: int) -> Option:
        """The option of a family at the largest micro-batch that fits `budget` (binary search over
        `micro_batches`); the smallest micro-batch's option (not fitting) when none does."""
        sizes = micro_batches(cfg.batch_size)
        seen: dict[int, Option] = {}

        def option(i: int) -> Option:
            if i not in seen:
                planned = self.at_micro_batch(cfg, sizes[i])
                trace, peak = self.predict(planned)
                seen[i] = Option(label, tier, family, planned, trace, peak,
                                 with_margin(peak, PREDICTION_MARGIN) <= budget)
            return seen[i]

        if option(0).fits or not option(len(sizes) - 1).fits:
            return option(0) if option(0).fits else option(len(sizes) - 1)
        low, high = 0, len(sizes) - 1  # low does not fit, high fits
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (low, mid) if option(mid).fits else (mid, high)
        return option(high)

    def plan(self, budget: int) -> list[Option]:
        """Every family's best option: those that fit first, in the order of the module docstring, then the rest."""
        options = []
        for index, (tier, label, changes) in enumerate(families(self.base, self.depth)):
            cfg = with_values(self.base, **changes)
            self.log(f"planning: {label}")
            options.append(self.best_of(index, tier, label, cfg, budget))
        for opt in options:
            if opt.fits:
                opt.trace = self.predict(opt.cfg, flops=True)[0]
        return sorted(options, key=lambda o: (not o.fits, o.tier, o.cfg.accumulate if o.tier == 0 else 0, o.family))


def plan_lines(planner: Planner, options: list[Option], budget: int) -> list[str]:
    """The table `bsr plan` prints."""
    base, over = planner.base, planner.overhead
    lines = [f"budget {budget / MIB:,.0f} MiB for {base.model} at {base.effective_batch} images per step on "
             f"{planner.device.type}; overhead: {over.describe()}"
             + (f"; dataset in memory {planner.data / MIB:,.0f} MiB" if planner.data else ""),
             "", "| # | configuration | micro-batch x accumulate | predicted peak MiB | with margin | at | "
             "step MiB (saved) | GFLOP/step | fits | flags |", "|---|---|---|---:|---:|---|---:|---:|---|---|"]
    for rank, opt in enumerate(options, 1):
        t = opt.trace
        gflop = f"{t.train_flops / 1e9:,.1f}" if t.train_flops else "-"
        lines.append(f"| {rank if opt.fits else '-'} | {opt.label} | {opt.cfg.batch_size} x {opt.cfg.accumulate} | "
                     f"{opt.predicted / MIB:,.0f} | {with_margin(opt.predicted, PREDICTION_MARGIN) / MIB:,.0f} | "
                     f"{t.peak_phase} | "
                     f"{t.step_peak_bytes / MIB:,.0f} ({t.saved_bytes / MIB:,.0f}) | "
                     f"{gflop} | {'yes' if opt.fits else 'no'} | `{flags_text(opt.changes(base))}` |")
    if not any(opt.fits for opt in options):
        least = min(options, key=lambda o: o.predicted)
        lines.append(f"nothing fits: the least is {least.label} at micro-batch 1, {least.predicted / MIB:,.0f} MiB")
    return lines


def write_plan(base: TrainConfig, budget: int, path: Path, log: Callable[[str], None]) -> dict:
    """Plan `base` for `budget`, print the plan through `log` and write the options that fit, in order, to `path`
    (JSON: budget, options with their configs); refuses in one line when nothing fits."""
    planner = Planner(base, log)
    options = planner.plan(budget)
    for line in plan_lines(planner, options, budget):
        log(line)
    fitting = [o for o in options if o.fits]
    if not fitting:
        raise BSRError(f"no configuration of {base.model} at {base.effective_batch} images per step fits "
                       f"{budget / MIB:,.0f} MiB on this machine (see the plan above); raise the budget or lower "
                       f"--batch-size or --img-size")
    extra = planner.data  # the check's step holds no dataset
    record = {"budget_bytes": budget, "device": str(planner.device), "num_classes": planner.num_classes,
              "overhead": {"process_bytes": planner.overhead.process_bytes,
                           "step_bytes": planner.overhead.step_bytes, "key": planner.overhead.key},
              "options": [{"label": o.label, "changes": o.changes(base), "config": o.cfg.to_dict(),
                           "predicted_bytes": o.predicted, "trace": o.trace.to_dict(),
                           # the check measures the step and the checkpoint write; evaluation's excess is added
                           "check_extra_bytes": extra + o.trace.peak_bytes - max(o.trace.step_peak_bytes,
                                                                                 o.trace.checkpoint_peak_bytes)}
                          for o in fitting]}
    atomic_write_bytes(path, (json.dumps(record, indent=1) + "\n").encode())
    return record


def check_planned(path: Path, index: int, log: Callable[[str], None]) -> Optional[TrainConfig]:
    """Option `index` of the plan file `path`, checked with a real measured step and checkpoint in this process
    (`measure_step`: the process's peak, plus the dataset in memory and any evaluation peak above the step's and the
    checkpoint's): its config if that fits
    the budget (the choice is recorded in the file), else None (check the next one in a fresh process)."""
    record = read_json(path, "plan file")
    try:
        option, budget = record["options"][index], int(record["budget_bytes"])
        cfg = make_config(option["config"])
    except (KeyError, IndexError, TypeError, ValueError, BSRError) as e:
        raise BSRError(f"plan file {path} has no usable option {index} ({e}); plan again with --memory-budget") \
            from None
    measured = measure_step(cfg, int(record["num_classes"]), pick_device(cfg.device),
                            checkpoint=True)["process_peak_bytes"]
    measured += int(option["check_extra_bytes"])
    option["measured_bytes"] = measured
    fits = with_margin(measured, CHECK_MARGIN) <= budget
    log(f"checked option {index + 1} ({option['label']}, {cfg.batch_size} x {cfg.accumulate}) with a real step in a "
        f"fresh process: {measured / MIB:,.0f} MiB measured ({with_margin(measured, CHECK_MARGIN) / MIB:,.0f} MiB with "
        f"the margin training needs), {option['predicted_bytes'] / MIB:,.0f} MiB predicted: "
        f"{'fits' if fits else 'does not fit'} {budget / MIB:,.0f} MiB")
    if fits:
        record["chosen"] = index
    atomic_write_bytes(path, (json.dumps(record, indent=1) + "\n").encode())
    if fits:
        log(f"training option {index + 1}: {option['label']} ({flags_text(option['changes'])})")
        return cfg
    if index + 1 >= len(record["options"]):
        raise BSRError(f"no planned configuration passed its real step within {budget / MIB:,.0f} MiB (see {path}); "
                       f"raise the budget")
    return None


def record_trained_peak(path: Path, peak_bytes: int, log: Callable[[str], None]) -> None:
    """After the chosen option trained: its whole-process peak against the budget, in the plan file and one line (a
    run over its budget says so, loudly, rather than passing as kept)."""
    record = read_json(path, "plan file")
    budget = int(record["budget_bytes"])
    record["trained_peak_bytes"] = int(peak_bytes)
    record["budget_kept"] = peak_bytes <= budget
    atomic_write_bytes(path, (json.dumps(record, indent=1) + "\n").encode())
    if peak_bytes <= budget:
        log(f"trained within the budget: process peak {peak_bytes / MIB:,.0f} MiB of {budget / MIB:,.0f} MiB")
    else:
        log(f"warning: the run's process peak {peak_bytes / MIB:,.0f} MiB exceeded the {budget / MIB:,.0f} MiB budget; "
            f"please report it (bsr --version, {path}) and give the next run a lower --memory-budget")
