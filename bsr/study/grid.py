"""The study file of `bsr study` (Sarkar et al., arXiv 2405.10951: every method and ablation, on several target
tasks, over several seeds): parsed and validated into a `Study` of `RunSpec`s, every run's `TrainConfig` resolved.

A study file holds:

    name: offline                      # optional; default out dir runs/study-<name>
    base: {TrainConfig options}        # the keys of `bsr train --config`
    datasets: [digits-embedded, ...]   # target tasks of every run entry (unless an entry names its own)
                                       # "a+b+c": one multi-task run (`bsr train --tasks a,b,c`)
    seeds: [0, 1, 2]
    per_dataset: {sklearn-digits: {epochs: 10}}   # options for one dataset, over base
    runs:                              # the grid points, each a name plus TrainConfig overrides
      - {name: full, method: full}
      - {name: bsr-keep0.3, method: bsr, bsr: {keep_rate: 0.3}, datasets: [digits-embedded]}
      - {name: bsr, method: bsr, priority: 1}   # priority: all its seeds run before other entries
    measure: {steps: 1, warmup: 1}     # memory/FLOP measurement settings (optional)
    sweep: {lr: [1.0e-4, 3.0e-4], seed: 0}   # learning rate chosen on validation, per entry and dataset (optional;
                                       # needs base.val_fraction > 0; an entry may say sweep: false or its own lr list,
                                       # or lr_from: <point> to train at the lr chosen for that swept point)
    quick: {base: {epochs: 1}, seeds: [0], runs: [full, bsr], datasets: [...],   # what --quick changes
            sweep: {full: [3.0e-5], bsr: [3.0e-4]}}   # a shorter lr list (or false) for a named entry
    x-anything: ...                    # ignored: a place for YAML anchors (&name) the entries merge (<<: *name)

With `sweep`, every entry that does not opt out first runs once per learning rate (`<point>@lr<value>`, seed
`sweep.seed`), and its seeds then train with the lr of the best validation top-1 (`bsr.study.runner.choose_lrs`);
the run of the sweep seed at that lr is reused, not trained again. Test top-1 never takes part in the choice.
An entry with `lr_from: bsr` (an ablation, say) is not swept itself: it trains at the lr chosen for point `bsr` on
the same dataset, once that sweep has finished (`bsr` must be swept there, at the same or a higher priority).

Options layer as defaults < recipe < base < per_dataset < run entry (the same layering as `bsr train`, with the
study's layers in the place of `--config`). Runs go to `OUT/runs/<point>-<dataset>-s<seed>/`; a run with a
`report.json` is skipped, one with only a checkpoint resumed (`bsr.study.runner`). Memory and FLOPs are measured
once per (point, dataset), seed-independent, each in a fresh process, by `bsr.measure.protocol` as `bsr bench`
measures them: peak above the pre-build baseline over one step after a warm-up step, glibc's mmap threshold fixed at
1 MiB, FLOPs of one whole training step by torch's `FlopCounterMode`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..errors import BSRError
from ..files import read_yaml
from ..train import merge_options, resolve_config

STUDY_KEYS = ("name", "base", "datasets", "seeds", "per_dataset", "runs", "measure", "quick", "sweep")
QUICK_KEYS = ("base", "datasets", "seeds", "runs", "per_dataset", "sweep")
MEASURE_DEFAULTS = {"warmup": 1, "steps": 1, "mmap_threshold": 1 << 20}
# Options that change how a run computes, not what: they may differ between a run and the study resuming it.
HOW_KEYS = ("threads", "device", "workers", "out")


@dataclass
class RunSpec:
    """One fine-tuning run of the grid: point name, dataset, seed and its resolved config (as a dict)."""

    point: str
    dataset: str
    seed: int
    config: dict
    priority: int = 0  # higher runs earlier (all its seeds before any other entry's)
    sweep: Optional[list[float]] = None  # learning rates tried first (lr is then the one chosen on validation)
    alias: Optional[str] = None  # run directory name when it is another run's (the chosen sweep run)
    waiting: bool = False  # its lr sweep has not finished: not run yet
    lr_from: Optional[str] = None  # the swept point whose chosen lr (on the same dataset) this run trains at

    @property
    def run_id(self) -> str:
        return f"{self.point}-{self.dataset}-s{self.seed}"

    @property
    def dir_name(self) -> str:
        return self.alias or self.run_id


@dataclass
class Study:
    """A parsed study file: the runs to do (in order) and the measurement settings."""

    name: str
    runs: list[RunSpec]
    measure: dict = field(default_factory=lambda: dict(MEASURE_DEFAULTS))
    points: list[str] = field(default_factory=list)  # point names in file order
    datasets: list[str] = field(default_factory=list)
    sweep_seed: int = 0

    def sweep_runs(self) -> list["RunSpec"]:
        """The runs of the lr sweep: one per (swept point, dataset, lr), at the sweep seed."""
        out, seen = [], set()
        for run in self.runs:
            if run.sweep and (run.point, run.dataset) not in seen:
                seen.add((run.point, run.dataset))
                out += [RunSpec(f"{run.point}@lr{lr:g}", run.dataset, self.sweep_seed,
                                {**run.config, "lr": lr, "seed": self.sweep_seed}, run.priority) for lr in run.sweep]
        return out

    def configs(self) -> dict[tuple[str, str], dict]:
        """One config per (point, dataset), the seed-0-most run's: what memory and FLOPs are measured on."""
        out: dict[tuple[str, str], dict] = {}
        for run in self.runs:
            out.setdefault((run.point, run.dataset), run.config)
        return out


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BSRError(f"{where} must be a mapping of options, not {type(value).__name__}")
    return dict(value)


def _names(value: Any, where: str, kind: type = str) -> list:
    if not isinstance(value, list) or not value or not all(isinstance(v, kind) and not isinstance(v, bool)
                                                           for v in value):
        raise BSRError(f"{where} must be a non-empty list of {kind.__name__}s, e.g. "
                       f"{'[0, 1, 2]' if kind is int else '[digits-embedded]'}")
    return list(value)


@dataclass
class _Grid:
    """The sections of a study file that every run entry expands against (after the `quick:` overlay)."""

    source: str
    base: dict
    per_dataset: dict
    datasets: list[str]
    seeds: list[int]
    quick: bool
    keep_points: Optional[list[str]] = None  # quick.runs
    sweep: Optional[dict] = None  # {lr: [...], seed: N}
    quick_sweeps: dict = field(default_factory=dict)  # quick.sweep: entry name -> its lr list (or False) under --quick


def parse_study(data: dict, *, quick: bool = False, source: str = "study") -> Study:
    """A `Study` from the mapping of a study file; every run's TrainConfig is resolved (and so validated) here.

    `quick` applies the file's `quick:` section. Nothing is read from disk or the network except what the configs
    name when they are resolved (no dataset is loaded).
    """
    unknown = [k for k in data if k not in STUDY_KEYS and not str(k).startswith("x-")]  # x-*: YAML anchors
    if unknown:
        raise BSRError(f"{source}: unknown study key {unknown[0]!r}; use {', '.join(STUDY_KEYS)}")
    grid = _grid(data, quick, source)
    entries = data.get("runs")
    if not isinstance(entries, list) or not entries:
        raise BSRError(f"{source}: runs must be a non-empty list of entries like {{name: bsr, method: bsr}}")
    runs: list[RunSpec] = []
    points: list[str] = []
    for i, entry in enumerate(entries):
        runs += _entry_runs(grid, i, entry, points)
    if grid.keep_points is not None:
        missing = [p for p in grid.keep_points if p not in points]
        if missing:
            raise BSRError(f"{source}: quick.runs names {missing[0]!r}, which is not a run name; use one of "
                           f"{', '.join(points)}")
        runs = [r for r in runs if r.point in grid.keep_points]
        points = [p for p in points if p in grid.keep_points]
    stray = [p for p in grid.quick_sweeps if p not in points]
    if stray:
        raise BSRError(f"{source}: quick.sweep names {stray[0]!r}, which is not a quick run; use one of "
                       f"{', '.join(points)}")
    _check_lr_from(runs, source)
    measure = merge_options(MEASURE_DEFAULTS, _mapping(data.get("measure"), f"{source}: measure"))
    bad = [k for k in measure if k not in MEASURE_DEFAULTS]
    if bad:
        raise BSRError(f"{source}: unknown key measure.{bad[0]}; use {', '.join(MEASURE_DEFAULTS)}")
    name = data.get("name", Path(source).stem)
    used = [d for d in grid.datasets if any(r.dataset == d for r in runs)]
    return Study(name=str(name), runs=runs, measure=measure, points=points, datasets=used,
                 sweep_seed=grid.sweep.get("seed", 0) if grid.sweep else 0)


def _check_lr_from(runs: list[RunSpec], source: str) -> None:
    """Every `lr_from` names a point swept on each of the run's datasets at the same or a higher priority (so that its
    lr is chosen before the run is due)."""
    swept = {(r.point, r.dataset): r.priority for r in runs if r.sweep}
    for run in runs:
        if run.lr_from is None:
            continue
        level = swept.get((run.lr_from, run.dataset))
        if level is None or level < run.priority:
            raise BSRError(f"{source}: runs.{run.point}.lr_from={run.lr_from!r} is not a run swept on {run.dataset} "
                           f"at priority >= {run.priority}; name an earlier entry with a sweep")


def _grid(data: dict, quick: bool, source: str) -> _Grid:
    """base, per_dataset, datasets and seeds of a study file, with its `quick:` section laid over them if `quick`."""
    quick_part = _mapping(data.get("quick"), f"{source}: quick")
    bad = [k for k in quick_part if k not in QUICK_KEYS]
    if bad:
        raise BSRError(f"{source}: unknown key quick.{bad[0]}; quick may set {', '.join(QUICK_KEYS)}")
    base = _mapping(data.get("base"), f"{source}: base")
    grid = _Grid(source, base, _mapping(data.get("per_dataset"), f"{source}: per_dataset"),
                 _names(data.get("datasets", [base.get("dataset", "digits-embedded")]), f"{source}: datasets"),
                 _names(data.get("seeds", [0]), f"{source}: seeds", int), quick)
    if quick:
        grid.base = merge_options(grid.base, _mapping(quick_part.get("base"), f"{source}: quick.base"))
        for name, values in _mapping(quick_part.get("per_dataset"), f"{source}: quick.per_dataset").items():
            own = _mapping(grid.per_dataset.get(name), f"{source}: per_dataset.{name}")
            grid.per_dataset[name] = merge_options(own, values)
        if "datasets" in quick_part:
            grid.datasets = _names(quick_part["datasets"], f"{source}: quick.datasets")
        if "seeds" in quick_part:
            grid.seeds = _names(quick_part["seeds"], f"{source}: quick.seeds", int)
        if "runs" in quick_part:
            grid.keep_points = _names(quick_part["runs"], f"{source}: quick.runs")
        grid.quick_sweeps = _mapping(quick_part.get("sweep"), f"{source}: quick.sweep")
    for name in grid.per_dataset:
        _mapping(grid.per_dataset[name], f"{source}: per_dataset.{name}")
    if "sweep" in data:
        grid.sweep = _mapping(data["sweep"], f"{source}: sweep")
        bad = [k for k in grid.sweep if k not in ("lr", "seed")]
        if bad:
            raise BSRError(f"{source}: unknown key sweep.{bad[0]}; sweep may set lr (a list) and seed")
        _lrs(grid.sweep.get("lr"), f"{source}: sweep.lr")
        seed = grid.sweep.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 63:
            raise BSRError(f"{source}: sweep.seed={seed!r} must be an integer in [0, 2**63), e.g. 0")
    return grid


def _lrs(value: Any, where: str) -> list[float]:
    if not isinstance(value, list) or not value or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value):
        raise BSRError(f"{where} must be a non-empty list of positive learning rates, e.g. [1.0e-4, 3.0e-4]")
    return [float(v) for v in value]


def _entry_runs(grid: _Grid, i: int, entry: Any, points: list[str]) -> list[RunSpec]:
    """The runs of entry `i` of `runs:` (one per dataset and seed), each config resolved; its name joins `points`."""
    source = grid.source
    entry = _mapping(entry, f"{source}: runs[{i}]")
    name = entry.pop("name", None)
    if not isinstance(name, str) or not name or any(c in name for c in "/\\ "):
        raise BSRError(f"{source}: runs[{i}] needs a name without spaces or slashes, e.g. name: bsr")
    if name in points:
        raise BSRError(f"{source}: run name {name!r} is used twice; give each entry its own name")
    points.append(name)
    datasets = _names(entry.pop("datasets"), f"{source}: runs.{name}.datasets") if "datasets" in entry \
        else grid.datasets
    seeds = _names(entry.pop("seeds"), f"{source}: runs.{name}.seeds", int) if "seeds" in entry else grid.seeds
    sweep = entry.pop("sweep", True)
    if grid.quick and name in grid.quick_sweeps:
        sweep = grid.quick_sweeps[name]
    if sweep is True:
        sweep = _lrs(grid.sweep["lr"], f"{source}: sweep.lr") if grid.sweep else None
    elif sweep is False:
        sweep = None
    else:
        sweep = _lrs(sweep, f"{source}: runs.{name}.sweep")
    priority = entry.pop("priority", 0)
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise BSRError(f"{source}: runs.{name}.priority={priority!r} must be an integer (higher runs earlier)")
    lr_from = entry.pop("lr_from", None)
    if lr_from is not None:
        if not isinstance(lr_from, str) or "lr" in entry or "sweep" in entry:
            raise BSRError(f"{source}: runs.{name}.lr_from must name an earlier swept run (e.g. lr_from: bsr) and "
                           f"replaces lr and sweep; remove those")
        sweep = None
    if grid.quick:
        datasets = [d for d in datasets if d in grid.datasets]
        seeds = [s for s in seeds if s in grid.seeds] or grid.seeds[:1]
    for key in ("dataset", "tasks", "seed", "out"):
        if key in entry or key in grid.base:
            raise BSRError(f"{source}: {key!r} is set by the study (datasets/seeds/--out); remove it from "
                           f"{'base' if key in grid.base else 'runs.' + name}")
    runs = []
    for dataset in datasets:
        for seed in seeds:
            values = merge_options(grid.base, _mapping(grid.per_dataset.get(dataset), f"per_dataset.{dataset}"),
                                   entry, {**dataset_options(dataset), "seed": seed})
            try:
                cfg = resolve_config(values)
            except BSRError as e:
                raise BSRError(f"{source}: run {name} on {dataset}: {e}") from None
            if sweep and cfg.val_fraction == 0:
                raise BSRError(f"{source}: run {name} sweeps the lr but has no validation split; set val_fraction "
                               f"(e.g. 0.1) in base")
            runs.append(RunSpec(name, dataset, seed, cfg.to_dict(), priority, sweep, waiting=lr_from is not None,
                                lr_from=lr_from))
    return runs


def dataset_options(label: str) -> dict:
    """TrainConfig options of a study dataset label: `{"dataset": label}`, or for a multi-task label "a+b+c"
    `{"tasks": [a, b, c]}` (trained together, as `bsr train --tasks a,b,c`)."""
    return {"tasks": label.split("+")} if "+" in label else {"dataset": label}


def load_study(path: str | Path, quick: bool = False) -> Study:
    """Parse and validate the study file at `path` (one-line `BSRError` on any problem)."""
    return parse_study(read_yaml(path, "study file"), quick=quick, source=str(path))
