"""`bsr study`: a grid of fine-tuning runs from one YAML file, collected into one table and plot.

Does Block Selective Reprogramming (Sarkar et al., arXiv 2405.10951) keep the accuracy of full fine-tuning? A study
answers that on real data: every method of SPEC section 2 and any BSR ablation, on several target tasks, over several
seeds, each run through `bsr.train.train` exactly as `bsr train` runs it, next to the training memory, FLOPs and step
time of its configuration.

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
    quick: {base: {epochs: 1}, seeds: [0], runs: [full, bsr], datasets: [...]}   # what --quick changes
    x-anything: ...                    # ignored: a place for YAML anchors (&name) the entries merge (<<: *name)

Options layer as defaults < recipe < base < per_dataset < run entry (the same layering as `bsr train`, with the
study's layers in the place of `--config`). Runs go to `OUT/runs/<point>-<dataset>-s<seed>/`; a run with a
`report.json` is skipped, one with only a checkpoint resumed. Memory and FLOPs are measured once per (point,
dataset), seed-independent, each in a fresh process (peak RSS cannot be reset below what earlier work left), as
`bsr bench` measures them: peak above the pre-build baseline over one step after a warm-up step, glibc's mmap
threshold fixed at 1 MiB, FLOPs of one whole training step by torch's `FlopCounterMode`.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .errors import BSRError

MIB = 2 ** 20
STUDY_KEYS = ("name", "base", "datasets", "seeds", "per_dataset", "runs", "measure", "quick")
QUICK_KEYS = ("base", "datasets", "seeds", "runs", "per_dataset")
ENTRY_KEYS = ("name", "datasets", "seeds", "priority")  # keys of a run entry that are not TrainConfig options
MEASURE_DEFAULTS = {"warmup": 1, "steps": 1, "mmap_threshold": 1 << 20}
# Options that change how a run computes, not what: they may differ between a run and the study resuming it.
HOW_KEYS = ("threads", "device", "workers", "out")

Log = Callable[[str], None]


# ------------------------------------------------------------------------------------------------- the study file


@dataclass
class RunSpec:
    """One fine-tuning run of the grid: point name, dataset, seed and its resolved config (as a dict)."""

    point: str
    dataset: str
    seed: int
    config: dict
    priority: int = 0  # higher runs earlier (all its seeds before any other entry's)

    @property
    def run_id(self) -> str:
        return f"{self.point}-{self.dataset}-s{self.seed}"


@dataclass
class Study:
    """A parsed study file: the runs to do (in order) and the measurement settings."""

    name: str
    runs: list[RunSpec]
    measure: dict = field(default_factory=lambda: dict(MEASURE_DEFAULTS))
    points: list[str] = field(default_factory=list)  # point names in file order
    datasets: list[str] = field(default_factory=list)

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


def parse_study(data: dict, *, quick: bool = False, source: str = "study") -> Study:
    """A `Study` from the mapping of a study file; every run's TrainConfig is resolved (and so validated) here.

    `quick` applies the file's `quick:` section. Nothing is read from disk or the network except what the configs
    name when they are resolved (no dataset is loaded).
    """
    from .train import merge_options, resolve_config

    unknown = [k for k in data if k not in STUDY_KEYS and not str(k).startswith("x-")]  # x-*: YAML anchors
    if unknown:
        raise BSRError(f"{source}: unknown study key {unknown[0]!r}; use {', '.join(STUDY_KEYS)}")
    quick_part = _mapping(data.get("quick"), f"{source}: quick")
    bad = [k for k in quick_part if k not in QUICK_KEYS]
    if bad:
        raise BSRError(f"{source}: unknown key quick.{bad[0]}; quick may set {', '.join(QUICK_KEYS)}")
    base = _mapping(data.get("base"), f"{source}: base")
    per_dataset = _mapping(data.get("per_dataset"), f"{source}: per_dataset")
    datasets = _names(data.get("datasets", [base.get("dataset", "digits-embedded")]), f"{source}: datasets")
    seeds = _names(data.get("seeds", [0]), f"{source}: seeds", int)
    entries = data.get("runs")
    if not isinstance(entries, list) or not entries:
        raise BSRError(f"{source}: runs must be a non-empty list of entries like {{name: bsr, method: bsr}}")
    keep_points: Optional[list[str]] = None
    if quick:
        base = merge_options(base, _mapping(quick_part.get("base"), f"{source}: quick.base"))
        for name, values in _mapping(quick_part.get("per_dataset"), f"{source}: quick.per_dataset").items():
            own = _mapping(per_dataset.get(name), f"{source}: per_dataset.{name}")
            per_dataset[name] = merge_options(own, values)
        if "datasets" in quick_part:
            datasets = _names(quick_part["datasets"], f"{source}: quick.datasets")
        if "seeds" in quick_part:
            seeds = _names(quick_part["seeds"], f"{source}: quick.seeds", int)
        if "runs" in quick_part:
            keep_points = _names(quick_part["runs"], f"{source}: quick.runs")
    for name in per_dataset:
        _mapping(per_dataset[name], f"{source}: per_dataset.{name}")

    runs: list[RunSpec] = []
    points: list[str] = []
    for i, entry in enumerate(entries):
        entry = _mapping(entry, f"{source}: runs[{i}]")
        name = entry.pop("name", None)
        if not isinstance(name, str) or not name or any(c in name for c in "/\\ "):
            raise BSRError(f"{source}: runs[{i}] needs a name without spaces or slashes, e.g. name: bsr")
        if name in points:
            raise BSRError(f"{source}: run name {name!r} is used twice; give each entry its own name")
        points.append(name)
        entry_datasets = _names(entry.pop("datasets"), f"{source}: runs.{name}.datasets") \
            if "datasets" in entry else datasets
        entry_seeds = _names(entry.pop("seeds"), f"{source}: runs.{name}.seeds", int) if "seeds" in entry else seeds
        priority = entry.pop("priority", 0)
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise BSRError(f"{source}: runs.{name}.priority={priority!r} must be an integer (higher runs earlier)")
        if quick:
            entry_datasets = [d for d in entry_datasets if d in datasets]
            entry_seeds = [s for s in entry_seeds if s in seeds] or seeds[:1]
        for key in ("dataset", "tasks", "seed", "out"):
            if key in entry or key in base:
                raise BSRError(f"{source}: {key!r} is set by the study (datasets/seeds/--out); remove it from "
                               f"{'base' if key in base else 'runs.' + name}")
        for dataset in entry_datasets:
            for seed in entry_seeds:
                values = merge_options(base, _mapping(per_dataset.get(dataset), f"per_dataset.{dataset}"), entry,
                               {**dataset_options(dataset), "seed": seed})
                try:
                    cfg = resolve_config(values)
                except BSRError as e:
                    raise BSRError(f"{source}: run {name} on {dataset}: {e}") from None
                runs.append(RunSpec(name, dataset, seed, cfg.to_dict(), priority))
    if keep_points is not None:
        missing = [p for p in keep_points if p not in points]
        if missing:
            raise BSRError(f"{source}: quick.runs names {missing[0]!r}, which is not a run name; use one of "
                           f"{', '.join(points)}")
        runs = [r for r in runs if r.point in keep_points]
        points = [p for p in points if p in keep_points]
    measure = merge_options(MEASURE_DEFAULTS, _mapping(data.get("measure"), f"{source}: measure"))
    bad = [k for k in measure if k not in MEASURE_DEFAULTS]
    if bad:
        raise BSRError(f"{source}: unknown key measure.{bad[0]}; use {', '.join(MEASURE_DEFAULTS)}")
    name = data.get("name", Path(source).stem)
    used = [d for d in datasets if any(r.dataset == d for r in runs)]
    return Study(name=str(name), runs=runs, measure=measure, points=points, datasets=used)


def dataset_options(label: str) -> dict:
    """TrainConfig options of a study dataset label: `{"dataset": label}`, or for a multi-task label "a+b+c"
    `{"tasks": [a, b, c]}` (trained together, as `bsr train --tasks a,b,c`)."""
    return {"tasks": label.split("+")} if "+" in label else {"dataset": label}


def load_study(path: str | Path, quick: bool = False) -> Study:
    """Parse and validate the study file at `path` (one-line `BSRError` on any problem)."""
    from .train import load_yaml

    return parse_study(load_yaml(path), quick=quick, source=str(path))


# ------------------------------------------------------------------------------------------------- one run


def _comparable(config: dict) -> dict:
    """`config` through today's `TrainConfig` (so options added since it was saved take their defaults), without
    the options that do not change results."""
    from .train import make_config

    try:
        config = make_config(dict(config)).to_dict()
    except BSRError:
        pass  # an option this version does not know: compared as saved, so the difference is named
    return {k: v for k, v in config.items() if k not in HOW_KEYS}


def run_state(run_dir: Path, config: dict) -> str:
    """"done" (report.json), "resume" (checkpoint only) or "new"; refuses a directory holding another config."""
    from .train.checkpoint import CHECKPOINT_NAME

    saved = None
    if (run_dir / "report.json").is_file():
        saved, state = json.loads((run_dir / "report.json").read_text()).get("config", {}), "done"
    elif (run_dir / CHECKPOINT_NAME).is_file():
        from .train import config_of_run

        saved, state = config_of_run(run_dir)[0].to_dict(), "resume"
    else:
        return "new"
    ours, theirs = _comparable(config), _comparable(saved)
    if ours != theirs:
        key = next(k for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k))
        raise BSRError(f"{run_dir} holds a run with {key}={theirs.get(key)!r}, the study now says "
                       f"{ours.get(key)!r}; use another --out (or delete that run directory)")
    return state


def train_run(config: dict, run_dir: str | Path, resume: bool) -> dict:
    """One study run: `bsr.train.train` on `config` into `run_dir` (continuing its checkpoint if `resume`)."""
    from .train import make_config, train

    cfg = make_config({**config, "out": str(run_dir)})
    return train(cfg, resume=run_dir if resume else None, progress=False)


# ------------------------------------------------------------------------------------------------- processes

_WORKER_PREFIX = "BSR_STUDY_RESULT "


def execute(kind: str, payload: dict) -> dict:
    """Do one job: a training run (its report.json written by `train`) or a measurement (written to
    `payload["path"]` with the config it measured, so a changed config is measured again). Returns a result dict."""
    try:
        if kind == "train":
            report = train_run(payload["config"], payload["run_dir"], payload["resume"])
            return {"ok": True, "best": report["accuracy"]["best"]}
        from .files import atomic_write_bytes

        from .measure.protocol import measure_config

        record = {**measure_config(payload["config"], **payload["measure"]), "config": payload["config"],
                  "measure": payload["measure"]}
        path = Path(payload["path"])
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, (json.dumps(record, indent=2) + "\n").encode())
        return {"ok": True, "record": record}
    except BSRError as e:
        return {"ok": False, "error": str(e)}


def _worker_main(argv: Sequence[str]) -> int:
    """`python -m bsr.study worker` reads one JSON job on stdin, runs it, prints one result line.

    `worker --serve` runs training jobs one after another, one JSON line each on stdin, each job's output going to
    its own log file and one result line per job to stdout: starting Python, torch and timm costs several CPU
    seconds, a good part of a small run. (Measurements always get a fresh process: peak RSS needs one.)
    """
    if "--serve" in argv:
        results = sys.stdout
        for line in sys.stdin:
            job = json.loads(line)
            log_path = Path(job.pop("log"))
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with log_path.open("a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                try:
                    result = execute(job.pop("kind"), job)
                except Exception as e:  # a bug, not bad input: keep the traceback in the job's log
                    traceback.print_exc()
                    result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            gc.collect()
            results.write(json.dumps(result) + "\n")
            results.flush()
        return 0
    job = json.loads(sys.stdin.read())
    result = execute(job.pop("kind"), job)
    print(_WORKER_PREFIX + json.dumps(result), flush=True)
    return 0 if result["ok"] else 2


class _Server:
    """A `worker --serve` process that runs training jobs in turn (started on first use, restarted if it died)."""

    def __init__(self, log_path: Path) -> None:
        self.log_path, self.proc = log_path, None

    def run(self, job: "Job") -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with self.log_path.open("a") as log:
                self.proc = subprocess.Popen([sys.executable, "-m", "bsr.study", "worker", "--serve"],
                                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.proc.stdin.write(json.dumps({"kind": job.kind, **job.payload, "log": str(job.log_path)}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:  # the worker died (killed, out of memory): the job's log holds what it said
            self.proc.wait()
            self.proc = None
            tail = job.log_path.read_text(errors="replace").strip().splitlines() if job.log_path.is_file() else []
            return {"ok": False, "error": f"worker died; {(tail or ['no output'])[-1][:300]}"}
        return json.loads(line)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait()


@dataclass
class Job:
    """A unit of work for one fresh process: a training run or a measurement."""

    kind: str  # "train" or "measure"
    key: str  # run id, or "<point>-<dataset>" for a measurement
    payload: dict
    log_path: Path
    started: float = 0.0
    proc: Optional[subprocess.Popen] = None


def _start(job: Job) -> None:
    job.log_path.parent.mkdir(parents=True, exist_ok=True)
    log = job.log_path.open("a")
    job.proc = subprocess.Popen([sys.executable, "-m", "bsr.study", "worker"], stdin=subprocess.PIPE, stdout=log,
                                stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log.close()
    job.proc.stdin.write(json.dumps({"kind": job.kind, **job.payload}))
    job.proc.stdin.close()
    job.started = time.time()


def _result(job: Job) -> dict:
    lines = [ln[len(_WORKER_PREFIX):] for ln in job.log_path.read_text(errors="replace").splitlines()
             if ln.startswith(_WORKER_PREFIX)]
    if lines:
        return json.loads(lines[-1])
    tail = (job.log_path.read_text(errors="replace").strip().splitlines() or ["no output"])[-1]
    return {"ok": False, "error": f"exit {job.proc.returncode}: {tail[:300]}"}


def run_jobs(jobs: list[Job], n_parallel: int, log: Log, isolate: bool = True,
             workdir: Path = Path(".")) -> dict[str, dict]:
    """Run `jobs`, `n_parallel` at a time: training runs in `n_parallel` worker processes (`worker --serve`), each
    measurement in a fresh process; everything in this process if not `isolate` (tests, debugging)."""
    results: dict[str, dict] = {}
    total = len(jobs)
    if not isolate:
        for i, job in enumerate(jobs, 1):
            t0 = time.time()
            results[job.key] = execute(job.kind, dict(job.payload))
            log(_done_line(i, total, job, results[job.key], time.time() - t0))
        return results
    queue, lock, done = list(jobs), threading.Lock(), [0]

    def slot(server: _Server) -> None:
        while True:
            with lock:
                if not queue:
                    break
                job = queue.pop(0)
            started = time.time()
            if job.kind == "train":
                result = server.run(job)
            else:
                _start(job)
                job.proc.wait()
                result = _result(job)
            with lock:
                results[job.key] = result
                done[0] += 1
                log(_done_line(done[0], total, job, result, time.time() - started))
        server.close()

    threads = [threading.Thread(target=slot, args=(_Server(workdir / f"worker-{i}.log"),), daemon=True)
               for i in range(n_parallel)]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(timeout=1.0)  # a timeout keeps Ctrl-C working
    return results


def _done_line(i: int, total: int, job: Job, result: dict, seconds: float) -> str:
    if not result["ok"]:
        what = f"FAILED: {result['error']}"
    elif job.kind == "train":
        what = f"best top-1 {result['best']:.2f}%"
    else:
        what = (f"train peak {result['record']['train_peak_bytes'] / MIB:,.0f} MiB, "
                f"{result['record']['train_flops_per_step'] / 1e9:,.2f} GFLOP/step")
    return f"[{i}/{total}] {job.kind} {job.key}: {what} ({seconds:.0f} s)"


# ------------------------------------------------------------------------------------------------- the whole study


def run_study(study: Study, out: str | Path, *, jobs: int = 1, isolate: bool = True, tokens: bool = True,
              log: Log = print, execute_jobs: bool = True) -> dict:
    """Run (or resume) every run of `study` into `out`, measure every configuration, write the outputs.

    Returns the `study.json` content. Failed runs are reported in the outputs and raise a `BSRError` at the end.
    `execute_jobs=False` only renders the outputs from what has finished so far (unfinished runs show as missing
    seeds).
    """
    if jobs < 1:
        raise BSRError(f"jobs={jobs} must be at least 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    # Measurements first (short), then training runs by priority, then seed by seed, so that an interrupted study
    # has every point with fewer seeds rather than some points with none. Finished runs are skipped, killed ones
    # resumed.
    work: list[Job] = []
    for (point, dataset), config in study.configs().items():
        path = out / "measure" / f"{point}-{dataset}.json"
        if not _measured(path, config, study.measure):
            work.append(Job("measure", f"{point}-{dataset}", {"config": config, "measure": study.measure,
                                                              "path": str(path)}, path.with_suffix(".log")))
    seeds = sorted({run.seed for run in study.runs})
    for run in sorted(study.runs, key=lambda r: (-r.priority, seeds.index(r.seed))):
        run_dir = out / "runs" / run.run_id
        state = run_state(run_dir, run.config)
        if state == "done":
            continue
        if state == "new" and (run_dir / "metrics.jsonl").exists():
            (run_dir / "metrics.jsonl").unlink()  # killed before its first checkpoint: start clean
        work.append(Job("train", run.run_id, {"config": run.config, "run_dir": str(run_dir),
                                              "resume": state == "resume"}, run_dir / "train.log"))
    skipped = len(study.runs) - sum(1 for j in work if j.kind == "train")
    log(f"study {study.name}: {len(study.runs)} runs ({skipped} already finished), "
        f"{len(study.configs())} configurations; {len(work)} jobs, {jobs} at a time -> {out}")
    if not execute_jobs:
        log("not running them (--report-only): rendering what has finished")
        work = []
    results = run_jobs(work, jobs, log, isolate, workdir=out)

    data = collect(study, out)
    data["meta"]["wall_seconds_this_invocation"] = time.time() - t_start
    write_outputs(data, out)
    if tokens:
        for dataset in study.datasets:
            run_dir = token_run(study, out, dataset)
            if run_dir is not None:
                show_tokens(run_dir, dataset_images=4, out=out / f"tokens-{dataset}.png")
    failed = [j.key for j in work if not results[j.key]["ok"]]
    if failed:
        raise BSRError(f"{len(failed)} of {len(work)} jobs failed (first: {failed[0]}: "
                       f"{results[failed[0]]['error']}); see their logs under {out}, then run the study again")
    log(f"wrote {out / 'study.md'}, {out / 'study.json'}, {out / 'accuracy_vs_memory.png'} "
        f"({time.time() - t_start:.0f} s)")
    return data


# Options that cannot change a step's memory or FLOPs: a measurement stays valid when only these differ.
_NOT_MEASURED = ("seed", "epochs", "steps", "lr", "min_lr", "warmup_steps", "warmup_epochs", "schedule", "eval_every",
                 "log_every", "limit", "data_dir", "download", "dataset", "out") + HOW_KEYS


def _measured(path: Path, config: dict, settings: dict) -> bool:
    """Whether `path` holds a measurement of `config` (up to options that do not matter) with `settings`."""
    if not path.is_file():
        return False
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError:
        return False
    strip = lambda c: {k: v for k, v in c.items() if k not in _NOT_MEASURED}  # noqa: E731
    return saved.get("measure") == settings and strip(saved.get("config", {})) == strip(config)


def token_run(study: Study, out: Path, dataset: str) -> Optional[Path]:
    """Run directory of the first token-dropping point named like `bsr` (else the first `bsr`-method point) on
    `dataset`, lowest seed, if it finished."""
    candidates = [r for r in study.runs if r.dataset == dataset and r.config["method"] == "bsr"
                  and r.config["bsr"]["keep_rate"] < 1.0]
    candidates.sort(key=lambda r: (r.point != "bsr", study.points.index(r.point), r.seed))
    for run in candidates:
        run_dir = out / "runs" / run.run_id
        if (run_dir / "report.json").is_file():
            return run_dir
    return None


# ------------------------------------------------------------------------------------------------- records


def _mean_std(values: list[float]) -> tuple[Optional[float], Optional[float]]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def collect(study: Study, out: Path) -> dict:
    """Every run's record plus one aggregate per (point, dataset): mean/std over seeds, measured memory/FLOPs."""
    runs, aggregates = [], []
    for run in study.runs:
        path = out / "runs" / run.run_id / "report.json"
        record = {"id": run.run_id, "point": run.point, "dataset": run.dataset, "seed": run.seed,
                  "method": run.config["method"], "finished": path.is_file()}
        if path.is_file():
            report = json.loads(path.read_text())
            record.update({"best": report["accuracy"]["best"], "final": report["accuracy"]["final"],
                           "best_step": report["accuracy"]["best_step"], "steps": report["steps"],
                           "trainable_params": report["params"]["trainable"],
                           "total_params": report["params"]["total"],
                           "median_step_time_s": report["median_step_time_s"],
                           "peak_memory_mib_run": report["peak_memory_mib"],
                           "tasks": report["accuracy"].get("tasks"),
                           "test_curve": test_curve(path.parent / "metrics.jsonl")})
        runs.append(record)
    configs = study.configs()
    for dataset in study.datasets:
        for point in study.points:
            if (point, dataset) not in configs:
                continue
            mine = [r for r in runs if r["point"] == point and r["dataset"] == dataset and r["finished"]]
            mpath = out / "measure" / f"{point}-{dataset}.json"
            measured = json.loads(mpath.read_text()) if mpath.is_file() else {}
            best, best_std = _mean_std([r["best"] for r in mine])
            final, final_std = _mean_std([r["final"] for r in mine])
            times = [r["median_step_time_s"] for r in mine if r["median_step_time_s"] is not None]
            gains = [c[-1][1] - c[-2][1] for r in mine if len(c := r["test_curve"]) >= 2]
            config = configs[(point, dataset)]
            aggregates.append({
                "point": point, "dataset": dataset, "method": config["method"],
                "bsr": config["bsr"] if config["method"] in ("bsr", "tokendrop") else None,
                "lr": config["lr"], "epochs": config["epochs"], "steps": mine[0]["steps"] if mine else None,
                "seeds": [r["seed"] for r in mine],
                "seeds_planned": sum(1 for r in runs if r["point"] == point and r["dataset"] == dataset),
                "trainable_params": mine[0]["trainable_params"] if mine else measured.get("trainable_params"),
                "best_mean": best, "best_std": best_std, "final_mean": final, "final_std": final_std,
                "last_eval_gain": statistics.fmean(gains) if gains else None,  # plateau check: last - previous
                "step_time_s": statistics.fmean(times) if times else None,
                "train_peak_bytes": measured.get("train_peak_bytes"),
                "saved_activation_bytes": measured.get("saved_activation_bytes"),
                "train_flops_per_step": measured.get("train_flops_per_step"),
                "tasks": task_means(mine),
            })
    for dataset in study.datasets:
        rows = [a for a in aggregates if a["dataset"] == dataset]
        full = next((a for a in rows if a["point"] == "full"), None) or \
            next((a for a in rows if a["method"] == "full"), None)
        for a in rows:
            ok = full is not None and full["train_peak_bytes"] and a["train_peak_bytes"]
            a["memory_ratio_vs_full"] = full["train_peak_bytes"] / a["train_peak_bytes"] if ok else None
            a["best_minus_full"] = (a["best_mean"] - full["best_mean"]
                                    if full is not None and a["best_mean"] is not None
                                    and full["best_mean"] is not None else None)
    import torch

    from .measure.bench import machine
    from .train.runs import environment

    cpu = torch.device("cpu")
    meta = {"name": study.name, "measure": study.measure, "datasets": study.datasets, "points": study.points,
            **environment(cpu)}
    meta["machine"]["cpu"] = machine(cpu)["cpu"]
    return {"meta": meta, "runs": runs, "aggregates": aggregates}


def task_means(runs: list[dict]) -> Optional[dict]:
    """Per-task mean/std over seeds of multi-task runs' best and final top-1 (None for single-task runs)."""
    if not runs or not runs[0].get("tasks"):
        return None
    means = {}
    for name in runs[0]["tasks"]:
        best, best_std = _mean_std([r["tasks"][name]["best"] for r in runs])
        final, final_std = _mean_std([r["tasks"][name]["final"] for r in runs])
        means[name] = {"best_mean": best, "best_std": best_std, "final_mean": final, "final_std": final_std}
    return means


def test_curve(metrics: Path) -> list[tuple[int, float]]:
    """(step, test top-1) of every evaluation a run logged."""
    curve = []
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "test_acc" in record:
                curve.append((record["step"], record["test_acc"]))
    return curve


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (memory, accuracy) points no other point beats: none has memory <= and accuracy >= with one
    of them strictly better. Sorted by memory. Ties (equal memory and accuracy) keep the first."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1], i))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


# ------------------------------------------------------------------------------------------------- outputs


def _pm(mean: Optional[float], std: Optional[float]) -> str:
    return "—" if mean is None else f"{mean:.2f} ± {std:.2f}"


def study_markdown(data: dict) -> str:
    """One table per dataset of the aggregates (rendered from `study.json`'s records). "last-eval gain" is the mean
    change of test top-1 between a run's last two evaluations: near zero when the run has reached its plateau."""
    lines = [f"# Study {data['meta']['name']}", ""]
    for dataset in data["meta"]["datasets"]:
        rows = [a for a in data["aggregates"] if a["dataset"] == dataset]
        lines += [f"## {dataset}", "",
                  "| point | method | trainable params | top-1 best (mean ± std) | top-1 final (mean ± std) | seeds "
                  "| last-eval gain | train peak MiB | memory ratio vs full | step ms | GFLOPs/step |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for a in rows:
            peak = f"{a['train_peak_bytes'] / MIB:,.1f}" if a["train_peak_bytes"] else "—"
            ratio = f"{a['memory_ratio_vs_full']:.2f}x" if a["memory_ratio_vs_full"] else "—"
            ms = f"{1000 * a['step_time_s']:.1f}" if a["step_time_s"] else "—"
            flops = f"{a['train_flops_per_step'] / 1e9:,.2f}" if a["train_flops_per_step"] else "—"
            params = f"{a['trainable_params']:,}" if a["trainable_params"] else "—"
            gain = f"{a['last_eval_gain']:+.2f}" if a.get("last_eval_gain") is not None else "—"
            lines.append(f"| {a['point']} | {a['method']} | {params} | {_pm(a['best_mean'], a['best_std'])} | "
                         f"{_pm(a['final_mean'], a['final_std'])} | {len(a['seeds'])}/{a['seeds_planned']} | "
                         f"{gain} | {peak} | {ratio} | {ms} | {flops} |")
        lines.append("")
        tasks = next((a["tasks"] for a in rows if a.get("tasks")), None)
        if tasks:
            lines += ["Per task, final top-1 (mean ± std over seeds):", "",
                      "| point | " + " | ".join(tasks) + " | mean |", "|---|" + "---:|" * (len(tasks) + 1)]
            for a in (a for a in rows if a.get("tasks")):
                cells = [_pm(t["final_mean"], t["final_std"]) for t in a["tasks"].values()]
                lines.append(f"| {a['point']} | " + " | ".join(cells) + f" | {_pm(a['final_mean'], a['final_std'])} |")
            lines.append("")
    return "\n".join(lines)


def plot_accuracy_vs_memory(data: dict, path: str | Path) -> None:
    """One panel per dataset: mean best top-1 against training peak memory, every point labelled, Pareto front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = data["meta"]["datasets"]
    fig, axes = plt.subplots(1, len(datasets), figsize=(7 * len(datasets), 5.5), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        rows = [a for a in data["aggregates"] if a["dataset"] == dataset
                and a["best_mean"] is not None and a["train_peak_bytes"]]
        xs = [a["train_peak_bytes"] / MIB for a in rows]
        ys = [a["best_mean"] for a in rows]
        for a, x, y in zip(rows, xs, ys):
            ablation = a["point"] not in (a["method"],) and a["method"] == "bsr"
            ax.errorbar(x, y, yerr=a["best_std"] or 0, fmt="s" if ablation else "o", ms=5, capsize=2,
                        color="tab:orange" if ablation else ("tab:red" if a["point"] == "bsr" else "tab:blue"))
            ax.annotate(a["point"], (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
        front = pareto_front(list(zip(xs, ys)))
        if front:
            fx = [xs[i] for i in front]
            fy = [ys[i] for i in front]
            ax.step(fx + [max(xs)], fy + [fy[-1]], where="post", color="grey", lw=1, ls="--",
                    label="Pareto front (best top-1 at ≤ memory)")
            ax.legend(loc="upper left", fontsize=8)
        ax.set_title(dataset)
        ax.set_xlabel("training peak memory (MiB, measured RSS above baseline)")
        ax.set_ylabel("top-1 best (%), mean over seeds")
        ax.grid(alpha=0.3)
    fig.suptitle(f"study {data['meta']['name']}: accuracy vs training memory "
                 f"(circles: methods, squares: BSR ablations)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(data: dict, out: Path) -> None:
    """study.json, study.md and accuracy_vs_memory.png in `out`."""
    from .files import atomic_write_bytes

    atomic_write_bytes(out / "study.json", (json.dumps(data, indent=2) + "\n").encode())
    atomic_write_bytes(out / "study.md", study_markdown(data).encode())
    plot_accuracy_vs_memory(data, out / "accuracy_vs_memory.png")


# ------------------------------------------------------------------------------------------------- show tokens


def _load_image_files(paths: Sequence[str], size: int, mean: Sequence[float], std: Sequence[float]):
    import torch
    from PIL import Image, UnidentifiedImageError

    from .data import ImageTransform

    transform = ImageTransform(size, train=False, mean=mean, std=std)
    images = []
    for p in paths:
        try:
            with Image.open(p) as im:
                images.append(transform(im.convert("RGB")))
        except (OSError, UnidentifiedImageError) as e:
            raise BSRError(f"cannot read image {p}: {e}; pass PNG/JPEG files") from None
    return torch.stack(images), [Path(p).name for p in paths]


def show_tokens(run_dir: str | Path, images: Sequence[str] = (), dataset_images: int = 0,
                out: str | Path = "tokens.png") -> Path:
    """Draw, for each image (one row), the image and the patches kept after each drop block (dropped ones greyed).

    `images` are image files; `dataset_images` N adds N test images of the run's dataset (spread over the split); a
    multi-task run is shown on its first task (images, gates and head). Returns the written PNG's path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import torch

    from .core.patch import bsr_state, kept_patch_indices, record_kept_tokens
    from .train import load_run
    from .train.batches import build_data
    from .train.build import backbone, image_size

    if not images and dataset_images < 1:
        raise BSRError("no images: pass image files or --dataset-images N")
    cfg, model = load_run(run_dir, torch.device("cpu"))
    vit = backbone(model)
    state = bsr_state(vit)
    if state is None or not state.drop_blocks:
        raise BSRError(f"run {run_dir} drops no tokens (method {cfg.method}); pick a bsr or tokendrop run")
    size = image_size(model)
    batch, names = [], []
    if images:
        x, names = _load_image_files(images, size, cfg.mean, cfg.std)
        batch.append(x)
    if dataset_images > 0:
        _, test_set = build_data(replace(cfg, dataset=cfg.task_names[0]), size, train=False)
        picks = np.linspace(0, len(test_set) - 1, min(dataset_images, len(test_set))).round().astype(int)
        items = [test_set[int(i)] for i in picks]
        batch.append(torch.stack([im for im, _ in items]))
        classes = getattr(test_set, "classes", None) or []
        names += [f"test #{i}, label {classes[y] if y < len(classes) else y}" for i, (_, y) in zip(picks, items)]
    x = torch.cat(batch)
    with torch.no_grad(), record_kept_tokens(vit) as records:
        preds = (model(x, 0) if cfg.tasks else model(x)).argmax(-1).tolist()
    grid = vit.patch_embed.grid_size
    blocks = sorted(records)
    kept = kept_patch_indices([records[b][0] for b in blocks], grid[0] * grid[1])

    mean = torch.tensor(cfg.mean).view(3, 1, 1)
    std = torch.tensor(cfg.std).view(3, 1, 1)
    pictures = (x * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()  # (B, H, W, 3)
    ph, pw = size // grid[0], size // grid[1]
    cols = 1 + len(blocks)
    fig, axes = plt.subplots(len(x), cols, figsize=(2.0 * cols, 2.1 * len(x)), squeeze=False)
    for r in range(len(x)):
        axes[r][0].imshow(pictures[r])
        axes[r][0].set_title(f"{names[r]}\npred {preds[r]}", fontsize=7)
        for c, b in enumerate(blocks, 1):
            mask = np.zeros(grid, dtype=bool)
            idx = kept[c - 1][r]
            idx = idx[idx >= 0].numpy()
            mask.flat[idx] = True
            shown = pictures[r].copy()
            dropped = np.repeat(np.repeat(~mask, ph, 0), pw, 1)  # (H, W)
            shown[dropped] = 0.35 + 0.3 * shown[dropped]  # grey veil over dropped patches
            axes[r][c].imshow(shown)
            fused = " + fused" if (kept[c - 1][r] < 0).any() else ""
            axes[r][c].set_title(f"after block {b}: {len(idx)}/{grid[0] * grid[1]}{fused}", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"patches kept ({cfg.method}, keep rate {state.keep_rate}, drop blocks {state.drop_blocks}); "
                 f"grey: dropped", fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        sys.exit(_worker_main(sys.argv[2:]))
    sys.exit("usage: python -m bsr.study worker  (internal; use `bsr study`)")
