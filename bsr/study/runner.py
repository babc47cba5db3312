"""Running a study: every measurement and training run of a `Study` as jobs, in parallel, resumable, then the outputs.

Jobs run in the standard library's process pools (`concurrent.futures`, `spawn` context), each job's output in its
own log file: measurements each in a fresh process (`max_tasks_per_child=1`: a process's peak RSS cannot be reset
below what earlier work left), training runs in worker processes that take one run after another (starting Python,
torch and timm costs several CPU seconds, a good part of a small run). Measurements go first (they are short), then
training runs by priority, then seed by seed, so that an interrupted study has every point with fewer seeds rather
than some points with none. A run with a `report.json` is skipped, one with only a checkpoint resumed. A worker that
dies (killed, out of memory) breaks its pool: the jobs not finished by then are reported failed, and running the
study again continues from what finished. A worker whose study process is gone exits too, rather than train on into
a run directory that the next study resumes.
"""

from __future__ import annotations

import contextlib
import gc
import json
import multiprocessing
import multiprocessing.connection
import os
import threading
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from ..errors import BSRError
from ..files import atomic_write_bytes, exclusive_dir, read_json
from ..measure.protocol import measure_config
from ..train import config_of_run, make_config, train
from ..train.checkpoint import CHECKPOINT_NAME
from ..train.runs import read_report
from .grid import HOW_KEYS, RunSpec, Study
from .report import MIB, collect, write_outputs
from .tokens import show_tokens

# Options that cannot change a step's memory or FLOPs: a measurement stays valid when only these differ.
_NOT_MEASURED = ("seed", "epochs", "steps", "lr", "min_lr", "warmup_steps", "warmup_epochs", "schedule", "eval_every",
                 "log_every", "limit", "data_dir", "download", "dataset", "out") + HOW_KEYS

Log = Callable[[str], None]


# ------------------------------------------------------------------------------------------------- one job


def _comparable(config: dict) -> dict:
    """`config` through today's `TrainConfig` (so options added since it was saved take their defaults), without
    the options that do not change results."""
    try:
        config = make_config(dict(config)).to_dict()
    except BSRError:
        pass  # an option this version does not know: compared as saved, so the difference is named
    return {k: v for k, v in config.items() if k not in HOW_KEYS}


def run_state(run_dir: Path, config: dict) -> str:
    """"done" (report.json), "resume" (checkpoint only) or "new"; refuses a directory holding another config."""
    if (run_dir / "report.json").is_file():
        saved, state = read_report(run_dir)["config"], "done"
    elif (run_dir / CHECKPOINT_NAME).is_file():
        saved, state = config_of_run(run_dir)[0].to_dict(), "resume"
    else:
        return "new"
    ours, theirs = _comparable(config), _comparable(saved)
    for key in ("mean", "std"):  # unset: the model's own, which the saved (resolved) config spells out
        if ours.get(key) is None:
            ours.pop(key, None), theirs.pop(key, None)
    if ours != theirs:
        key = next(k for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k))
        raise BSRError(f"{run_dir} holds a run with {key}={theirs.get(key)!r}, the study now says "
                       f"{ours.get(key)!r}; use another --out (or delete that run directory)")
    return state


@dataclass
class Job:
    """A unit of work: a training run or a measurement, its payload, and the log file its output goes to."""

    kind: str  # "train" or "measure"
    key: str  # run id, or "<point>-<dataset>" for a measurement
    payload: dict
    log_path: Path


def execute(kind: str, payload: dict) -> dict:
    """Do one job: a training run (its report.json written by `train`) or a measurement (written to
    `payload["path"]` with the config it measured, so a changed config is measured again). Returns a result dict."""
    try:
        if kind == "train":
            cfg = make_config({**payload["config"], "out": payload["run_dir"]})
            report = train(cfg, resume=payload["run_dir"] if payload["resume"] else None, progress=False)
            return {"ok": True, "best": report["accuracy"]["best"]}
        record = {**measure_config(payload["config"], **payload["measure"]), "config": payload["config"],
                  "measure": payload["measure"]}
        path = Path(payload["path"])
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, (json.dumps(record, indent=2) + "\n").encode())
        return {"ok": True, "record": record}
    except BSRError as e:
        return {"ok": False, "error": str(e)}


def _run_logged(kind: str, payload: dict, log_path: str) -> tuple[dict, float]:
    """`execute` in a pool process, everything it prints going to `log_path` (bugs leave their traceback there);
    returns (result, seconds)."""
    t0 = time.time()
    path = Path(log_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            result = execute(kind, payload)
        except Exception as e:  # a bug, not bad input: keep the traceback in the job's log
            traceback.print_exc()
            result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    gc.collect()  # the next run in this worker starts from a clean heap
    return result, time.time() - t0


# ------------------------------------------------------------------------------------------------- many jobs


def run_jobs(jobs: list[Job], n_parallel: int, log: Log, isolate: bool = True) -> dict[str, dict]:
    """Run `jobs` in their order, `n_parallel` at a time (measurements, then training runs, see the module
    docstring); everything in this process, one after another, if not `isolate` (tests, debugging)."""
    results: dict[str, dict] = {}
    done = 0
    for kind, per_child in (("measure", 1), ("train", None)):
        batch = [job for job in jobs if job.kind == kind]
        if not batch:
            continue
        for job, result, seconds in (_in_pool(batch, n_parallel, per_child) if isolate else _in_process(batch)):
            results[job.key] = result
            done += 1
            log(_done_line(done, len(jobs), job, result, seconds))
    return results


def _in_process(jobs: list[Job]) -> Iterator[tuple[Job, dict, float]]:
    """(job, result, seconds), one job after another in this process."""
    for job in jobs:
        t0 = time.time()
        yield job, execute(job.kind, dict(job.payload)), time.time() - t0


def new_pool(n_parallel: int, per_child: Optional[int]) -> ProcessPoolExecutor:
    """A pool of `n_parallel` fresh (`spawn`) processes, each ended when the study's process is gone."""
    return ProcessPoolExecutor(n_parallel, mp_context=multiprocessing.get_context("spawn"),
                               max_tasks_per_child=per_child, initializer=_exit_with_parent)


def _exit_with_parent() -> None:
    """In a pool process: exit as soon as the process that started it is gone. A study killed with `kill` or by the
    out-of-memory killer gets no chance to stop its pool, and a worker left running would go on training into a run
    directory that the next `bsr study` resumes in a second process."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])  # ready when the parent's end of the pipe closes
        os._exit(1)

    threading.Thread(target=watch, name="bsr-exit-with-parent", daemon=True).start()


def _in_pool(jobs: list[Job], n_parallel: int, per_child: Optional[int]) -> Iterator[tuple[Job, dict, float]]:
    """(job, result, seconds) as the jobs finish; the pool takes them in order."""
    pool = new_pool(n_parallel, per_child)
    try:
        started = time.time()
        futures = {pool.submit(_run_logged, job.kind, job.payload, str(job.log_path)): job for job in jobs}
        for future in as_completed(futures):
            job = futures[future]
            try:
                result, seconds = future.result()
            except BrokenProcessPool:  # a worker died (killed, out of memory): its job's log says what it printed
                tail = job.log_path.read_text(errors="replace").strip().splitlines() if job.log_path.is_file() else []
                result = {"ok": False, "error": f"worker died; {(tail or ['no output'])[-1][:300]}"}
                seconds = time.time() - started
            yield job, result, seconds
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # Ctrl-C: queued jobs never start


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


def plan(study: Study, out: Path, runs: Optional[list[RunSpec]] = None) -> list[Job]:
    """The jobs still to do, in the order they should run: measurements missing or stale, then unfinished runs by
    priority and seed (killed runs resume from their checkpoint). `runs`: only these training runs, no measurements
    (the lr sweep); by default the study's runs whose lr is known."""
    work: list[Job] = []
    if runs is None:
        for (point, dataset), config in study.configs().items():
            path = out / "measure" / f"{point}-{dataset}.json"
            if not _measured(path, config, study.measure):
                work.append(Job("measure", f"{point}-{dataset}", {"config": config, "measure": study.measure,
                                                                  "path": str(path)}, path.with_suffix(".log")))
        runs = [r for r in study.runs if not r.waiting]
    seeds = sorted({run.seed for run in runs})
    for run in sorted(runs, key=lambda r: (-r.priority, seeds.index(r.seed))):
        run_dir = out / "runs" / run.dir_name
        state = run_state(run_dir, run.config)
        if state == "done":
            continue
        if state == "new" and (run_dir / "metrics.jsonl").exists():
            (run_dir / "metrics.jsonl").unlink()  # killed before its first checkpoint: start clean
        work.append(Job("train", run.run_id, {"config": run.config, "run_dir": str(run_dir),
                                              "resume": state == "resume"}, run_dir / "train.log"))
    return work


def choose_lrs(study: Study, out: Path) -> dict[tuple[str, str], dict]:
    """For every swept (point, dataset): the validation top-1 (best over training) of each lr of the sweep and the
    chosen lr, the best one (ties: the first listed); the study's runs of that point then use it, and the run of the
    sweep seed is the sweep's own run. A point whose sweep has not finished gets lr None (its runs wait)."""
    sweeps = study.sweep_runs()
    chosen: dict[tuple[str, str], dict] = {}
    for run in study.runs:
        if not run.sweep:
            continue
        key = (run.point, run.dataset)
        if key not in chosen:
            variants = [v for v in sweeps if v.point.split("@")[0] == run.point and v.dataset == run.dataset]
            vals = {v.config["lr"]: _val_best(out / "runs" / v.run_id) for v in variants}
            done = all(v is not None for v in vals.values())
            lr = max(vals, key=lambda k: (vals[k], -list(vals).index(k))) if done else None
            chosen[key] = {"vals": vals, "lr": lr,
                           "run": next((v.run_id for v in variants if v.config["lr"] == lr), None)}
        run.waiting = chosen[key]["lr"] is None
        if not run.waiting:
            run.config = {**run.config, "lr": chosen[key]["lr"]}
            run.alias = chosen[key]["run"] if run.seed == study.sweep_seed else None
    for run in study.runs:  # lr_from: the lr chosen for another point on the same dataset
        if run.lr_from is not None:
            lr = chosen.get((run.lr_from, run.dataset), {}).get("lr")
            run.waiting = lr is None
            if lr is not None:
                run.config = {**run.config, "lr": lr}
    return chosen


def _log_lrs(lrs: dict, level: int, study: Study, log: Log) -> None:
    points = {r.point for r in study.runs if r.priority == level}
    for (point, dataset), c in lrs.items():
        if point in points:
            vals = ", ".join(f"{lr:g}: {'—' if v is None else f'{v:.2f}%'}" for lr, v in c["vals"].items())
            log(f"lr of {point} on {dataset}: {c['lr'] if c['lr'] is not None else 'not chosen yet'} "
                f"(validation top-1 {vals})")


def _val_best(run_dir: Path) -> Optional[float]:
    path = run_dir / "report.json"
    if not path.is_file():
        return None
    val = read_report(path)["accuracy"].get("val")
    if val is None:
        raise BSRError(f"{path} has no validation top-1; the sweep needs val_fraction > 0")
    return float(val["best"])


def run_study(study: Study, out: str | Path, *, jobs: int = 1, isolate: bool = True, tokens: bool = True,
              log: Log = print, execute_jobs: bool = True) -> dict:
    """Run (or resume) every run of `study` into `out`, measure every configuration, write the outputs.

    Returns the `study.json` content. Failed runs are reported in the outputs and raise a `BSRError` at the end.
    `execute_jobs=False` only renders the outputs from what has finished so far (unfinished runs show as missing
    seeds), also while a study runs; a second study running into the same `out` is refused in one line.
    """
    if jobs < 1:
        raise BSRError(f"jobs={jobs} must be at least 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as held:
        if execute_jobs:  # one study at a time in `out` (rendering what has finished may go on beside it)
            held.enter_context(exclusive_dir(out, "study directory"))
        return _run(study, out, jobs, isolate, tokens, log, execute_jobs)


def _run(study: Study, out: Path, jobs: int, isolate: bool, tokens: bool, log: Log, execute_jobs: bool) -> dict:
    t_start = time.time()
    done: list[Job] = []
    results: dict[str, dict] = {}
    log(f"study {study.name}: {len(study.runs)} runs, {len(study.sweep_runs())} of them lr-sweep runs, "
        f"{len(study.configs())} configurations, {jobs} jobs at a time -> {out}")
    levels = sorted({r.priority for r in study.runs}, reverse=True) if execute_jobs else []
    for level in levels:  # by priority: a level's lr sweep, then its runs (so the first points finish first)
        sweep = [r for r in study.sweep_runs() if r.priority == level]
        if sweep:
            jobs_now = plan(study, out, sweep)
            log(f"priority {level}: lr sweep, {len(sweep)} runs ({len(sweep) - len(jobs_now)} already finished)")
            results.update(run_jobs(jobs_now, jobs, log, isolate))
            done += jobs_now
            _log_lrs(choose_lrs(study, out), level, study, log)
        mine = {r.run_id for r in study.runs if r.priority == level}
        jobs_now = [j for j in plan(study, out) if j.kind == "measure" or j.key in mine]
        log(f"priority {level}: {len(jobs_now)} jobs ({sum(j.kind == 'train' for j in jobs_now)} runs)")
        results.update(run_jobs(jobs_now, jobs, log, isolate))
        done += jobs_now
    if not execute_jobs:
        log("not running them (--report-only): rendering what has finished")
    lrs = choose_lrs(study, out)

    data = collect(study, out, lrs)
    data["meta"]["wall_seconds_this_invocation"] = time.time() - t_start
    write_outputs(data, out)
    if tokens:
        for dataset in study.datasets:
            run_dir = token_run(study, out, dataset)
            if run_dir is not None:
                show_tokens(run_dir, dataset_images=4, out=out / f"tokens-{dataset}.png")
    failed = [j.key for j in done if not results[j.key]["ok"]]
    if failed:
        raise BSRError(f"{len(failed)} of {len(done)} jobs failed (first: {failed[0]}: "
                       f"{results[failed[0]]['error']}); see their logs under {out}, then run the study again")
    log(f"wrote {out / 'study.md'}, {out / 'study.json'}, {out / 'accuracy_vs_memory.png'} "
        f"({time.time() - t_start:.0f} s)")
    return data


def _measured(path: Path, config: dict, settings: dict) -> bool:
    """Whether `path` holds a measurement of `config` (up to options that do not matter) with `settings`."""
    if not path.is_file():
        return False
    try:
        saved = read_json(path, "measurement")
    except BSRError:
        return False  # unreadable: measured again, and replaced
    strip = lambda c: {k: v for k, v in c.items() if k not in _NOT_MEASURED}  # noqa: E731
    return saved.get("measure") == settings and strip(saved.get("config", {})) == strip(config)


def token_run(study: Study, out: Path, dataset: str) -> Optional[Path]:
    """Run directory of the first token-dropping point named like `bsr` (else the first `bsr`-method point) on
    `dataset`, lowest seed, if it finished."""
    candidates = [r for r in study.runs if r.dataset == dataset and r.config["method"] == "bsr"
                  and r.config["bsr"]["keep_rate"] < 1.0]
    candidates.sort(key=lambda r: (r.point != "bsr", study.points.index(r.point), r.seed))
    for run in candidates:
        run_dir = out / "runs" / run.dir_name
        if (run_dir / "report.json").is_file():
            return run_dir
    return None
