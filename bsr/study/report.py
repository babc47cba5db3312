"""The outputs of `bsr study`: records of every run and one aggregate per (point, dataset), rendered from the run
directories and measurements on disk into `study.json`, `study.md` (tables) and `accuracy_vs_memory.png` (with the
Pareto front of accuracy against training memory, the trade-off the BSR paper, Sarkar et al., arXiv 2405.10951, is
about). Nothing here trains or measures.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..files import atomic_write_bytes, read_json, read_json_lines
from ..measure.bench import machine
from ..train.runs import environment, read_report
from .grid import HOW_KEYS, RunSpec, Study

MIB = 2 ** 20


def _mean_std(values: list[float]) -> tuple[Optional[float], Optional[float]]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def collect(study: Study, out: Path, lrs: Optional[dict] = None) -> dict:
    """Every run's record plus one aggregate per (point, dataset): mean/std over seeds, measured memory/FLOPs; with
    an lr sweep (`lrs`, from `bsr.study.runner.choose_lrs`) its validation top-1 per lr and the choice."""
    runs = [run_record(run, out) for run in study.runs]
    configs = study.configs()
    aggregates = [aggregate(point, dataset, configs[(point, dataset)], runs, _measured(out, point, dataset))
                  for dataset in study.datasets for point in study.points if (point, dataset) in configs]
    compare_to_full(aggregates, study.datasets)
    cpu = torch.device("cpu")
    meta = {"name": study.name, "measure": study.measure, "datasets": study.datasets, "points": study.points,
            **environment(cpu)}
    meta["machine"]["cpu"] = machine(cpu)["cpu"]
    sweep = [{"point": point, "dataset": dataset, "lr": lr, "val_best": val, "chosen": lr == c["lr"]}
             for (point, dataset), c in (lrs or {}).items() for lr, val in c["vals"].items()]
    return {"meta": meta, "runs": runs, "aggregates": aggregates, "sweep": sweep}


def _measured(out: Path, point: str, dataset: str) -> dict:
    path = out / "measure" / f"{point}-{dataset}.json"
    return read_json(path, "measurement") if path.is_file() else {}


def compare_to_full(aggregates: list[dict], datasets: list[str]) -> None:
    """Set each aggregate's `memory_ratio_vs_full` and `minus_full` (accuracy minus full fine-tuning's, in the measure
    the tables report) against the point named "full" on its dataset, else the first point whose method is full."""
    for dataset in datasets:
        rows = [a for a in aggregates if a["dataset"] == dataset]
        full = next((a for a in rows if a["point"] == "full"), None) or \
            next((a for a in rows if a["method"] == "full"), None)
        key, _ = accuracy_keys(rows)
        for a in rows:
            ok = full is not None and full["train_peak_bytes"] and a["train_peak_bytes"]
            a["memory_ratio_vs_full"] = full["train_peak_bytes"] / a["train_peak_bytes"] if ok else None
            a["minus_full"] = (a[key] - full[key] if full is not None and a[key] is not None
                               and full[key] is not None else None)


def accuracy_keys(aggregates: list[dict]) -> tuple[str, str]:
    """The (mean, std) keys of the accuracy a study reports: the test top-1 at the best validation point where the
    study had a validation split, else the best test top-1 over training (one measure for all its aggregates)."""
    if any(a.get("test_at_val_mean") is not None for a in aggregates):
        return "test_at_val_mean", "test_at_val_std"
    return "best_mean", "best_std"


def run_record(run: RunSpec, out: Path) -> dict:
    """One run's record: what it is, and (once its report.json exists) its accuracy, size, speed and test curve."""
    path = out / "runs" / run.dir_name / "report.json"
    record = {"id": run.run_id, "point": run.point, "dataset": run.dataset, "seed": run.seed,
              "method": run.config["method"], "finished": path.is_file()}
    if path.is_file():
        report = read_report(path)
        metrics = path.parent / "metrics.jsonl"
        evals = [r for r in read_json_lines(metrics, "metrics file") if "test_acc" in r] if metrics.is_file() else []
        record.update({"best": report["accuracy"]["best"], "final": report["accuracy"]["final"],
                       "best_step": report["accuracy"]["best_step"], "steps": report["steps"],
                       "trainable_params": report["params"]["trainable"],
                       "total_params": report["params"]["total"],
                       "median_step_time_s": report["median_step_time_s"],
                       "peak_memory_mib_run": report["peak_memory_mib"],
                       "tasks": tasks_at_val_best(report["accuracy"], evals),
                       "val_best": report["accuracy"].get("val", {}).get("best"),
                       "test_at_val_best": report["accuracy"].get("val", {}).get("test_at_best"),
                       "test_curve": [(r["step"], r["test_acc"]) for r in evals]})
    return record


def tasks_at_val_best(accuracy: dict, evals: list[dict]) -> Optional[dict]:
    """A multi-task run's per-task best and final test top-1, plus `at_val`: each task's test top-1 at the evaluation
    with the best (mean) validation top-1, the point the tables report (None for single-task runs)."""
    tasks = accuracy.get("tasks")
    step = accuracy.get("val", {}).get("best_step")
    at = next((r.get("tasks") for r in evals if r["step"] == step), None) if step is not None else None
    if not tasks or not at:
        return tasks
    return {name: {**t, "at_val": at[name]["test_acc"]} for name, t in tasks.items()}


def aggregate(point: str, dataset: str, config: dict, runs: list[dict], measured: dict) -> dict:
    """The aggregate of (point, dataset): means/stds over its finished seeds (from the run records `runs`), and its
    memory and FLOPs (`measured`: the configuration's measurement, {} when it has none)."""
    mine = [r for r in runs if r["point"] == point and r["dataset"] == dataset and r["finished"]]
    best, best_std = _mean_std([r["best"] for r in mine])
    final, final_std = _mean_std([r["final"] for r in mine])
    val, val_std = _mean_std([r["val_best"] for r in mine if r.get("val_best") is not None])
    at_val, at_val_std = _mean_std([r["test_at_val_best"] for r in mine if r.get("test_at_val_best") is not None])
    times = [r["median_step_time_s"] for r in mine if r["median_step_time_s"] is not None]
    gains = [c[-1][1] - c[-2][1] for r in mine if len(c := r["test_curve"]) >= 2]
    return {
        "point": point, "dataset": dataset, "method": config["method"],
        "config": {k: v for k, v in config.items() if k not in ("seed",) + HOW_KEYS},  # what the point trains
        "bsr": config["bsr"] if config["method"] in ("bsr", "tokendrop") else None,
        "lr": config["lr"], "epochs": config["epochs"], "steps": mine[0]["steps"] if mine else None,
        "seeds": [r["seed"] for r in mine],
        "seeds_planned": sum(1 for r in runs if r["point"] == point and r["dataset"] == dataset),
        "trainable_params": mine[0]["trainable_params"] if mine else measured.get("trainable_params"),
        "best_mean": best, "best_std": best_std, "final_mean": final, "final_std": final_std,
        "val_best_mean": val, "val_best_std": val_std, "test_at_val_mean": at_val, "test_at_val_std": at_val_std,
        "last_eval_gain": statistics.fmean(gains) if gains else None,  # plateau check: last - previous
        "step_time_s": statistics.fmean(times) if times else None,
        "train_peak_bytes": measured.get("train_peak_bytes"),
        "saved_activation_bytes": measured.get("saved_activation_bytes"),
        "train_flops_per_step": measured.get("train_flops_per_step"),
        "tasks": task_means(mine),
    }


def task_means(runs: list[dict]) -> Optional[dict]:
    """Per-task mean/std over seeds of multi-task runs' best and final top-1, and of the top-1 at the best validation
    point where every run has it (None for single-task runs)."""
    if not runs or not runs[0].get("tasks"):
        return None
    means = {}
    for name in runs[0]["tasks"]:
        best, best_std = _mean_std([r["tasks"][name]["best"] for r in runs])
        final, final_std = _mean_std([r["tasks"][name]["final"] for r in runs])
        at = [r["tasks"][name].get("at_val") for r in runs]
        at_val, at_val_std = _mean_std(at) if None not in at else (None, None)
        means[name] = {"best_mean": best, "best_std": best_std, "final_mean": final, "final_std": final_std,
                       "at_val_mean": at_val, "at_val_std": at_val_std}
    return means


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
    if data["meta"].get("combined_from"):
        lines += ["Combined by `bsr study-combine` from the runs of " +
                  ", ".join(f"`{s['path']}` (study {s['name']})" for s in data["meta"]["combined_from"]) +
                  "; memory and FLOPs as the first of them measured each point.", ""]
    for dataset in data["meta"]["datasets"]:
        rows = [a for a in data["aggregates"] if a["dataset"] == dataset]
        lines += [f"## {dataset}", "",
                  "| point | method | lr | trainable params | test top-1 at best val (mean ± std) | val top-1 best | "
                  "test top-1 best | test top-1 final | seeds | last-eval gain | train peak MiB | memory ratio vs full "
                  "| step ms | GFLOPs/step |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for a in rows:
            peak = f"{a['train_peak_bytes'] / MIB:,.1f}" if a["train_peak_bytes"] else "—"
            ratio = f"{a['memory_ratio_vs_full']:.2f}x" if a["memory_ratio_vs_full"] else "—"
            ms = f"{1000 * a['step_time_s']:.1f}" if a["step_time_s"] else "—"
            flops = f"{a['train_flops_per_step'] / 1e9:,.2f}" if a["train_flops_per_step"] else "—"
            params = f"{a['trainable_params']:,}" if a["trainable_params"] else "—"
            gain = f"{a['last_eval_gain']:+.2f}" if a.get("last_eval_gain") is not None else "—"
            lines.append(f"| {a['point']} | {a['method']} | {a['lr']:g} | {params} | "
                         f"{_pm(a.get('test_at_val_mean'), a.get('test_at_val_std'))} | "
                         f"{_pm(a.get('val_best_mean'), a.get('val_best_std'))} | "
                         f"{_pm(a['best_mean'], a['best_std'])} | {_pm(a['final_mean'], a['final_std'])} | "
                         f"{len(a['seeds'])}/{a['seeds_planned']} | {gain} | {peak} | {ratio} | {ms} | {flops} |")
        lines.append("")
        tasks = next((a["tasks"] for a in rows if a.get("tasks")), None)
        if tasks:
            at_val = all(t.get("at_val_mean") is not None for a in rows if a.get("tasks") for t in a["tasks"].values())
            key, total = ("at_val", "test_at_val") if at_val else ("final", "final")
            lines += [f"Per task, test top-1 {'at the best validation point' if at_val else 'final'} "
                      f"(mean ± std over seeds):", "",
                      "| point | " + " | ".join(tasks) + " | mean |", "|---|" + "---:|" * (len(tasks) + 1)]
            for a in (a for a in rows if a.get("tasks")):
                cells = [_pm(t[f"{key}_mean"], t[f"{key}_std"]) for t in a["tasks"].values()]
                mean = _pm(a[f"{total}_mean"], a[f"{total}_std"])
                lines.append(f"| {a['point']} | " + " | ".join(cells) + f" | {mean} |")
            lines.append("")
    if data.get("sweep"):
        lines += ["## Learning rates, chosen on validation", "",
                  "Validation top-1 (best over training, seed of the sweep) of every lr tried; **bold**: chosen.", "",
                  "| point | dataset | " + " | ".join(f"lr {lr:g}" for lr in _sweep_lrs(data)) + " |",
                  "|---|---|" + "---:|" * len(_sweep_lrs(data))]
        for point, dataset in dict.fromkeys((r["point"], r["dataset"]) for r in data["sweep"]):
            cells = {r["lr"]: ("—" if r["val_best"] is None else
                               (f"**{r['val_best']:.2f}**" if r["chosen"] else f"{r['val_best']:.2f}"))
                     for r in data["sweep"] if (r["point"], r["dataset"]) == (point, dataset)}
            lines.append(f"| {point} | {dataset} | " + " | ".join(cells.get(lr, "") for lr in _sweep_lrs(data)) + " |")
        lines.append("")
    return "\n".join(lines)


def _sweep_lrs(data: dict) -> list[float]:
    return sorted({r["lr"] for r in data["sweep"]})


def plot_accuracy_vs_memory(data: dict, path: str | Path) -> None:
    """One panel per dataset: mean best top-1 against training peak memory, every point labelled, Pareto front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean, std = accuracy_keys(data["aggregates"])
    with_val = mean == "test_at_val_mean"
    datasets = data["meta"]["datasets"]
    fig, axes = plt.subplots(1, len(datasets), figsize=(7 * len(datasets), 5.5), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        rows = [a for a in data["aggregates"] if a["dataset"] == dataset
                and a.get(mean) is not None and a["train_peak_bytes"]]
        xs = [a["train_peak_bytes"] / MIB for a in rows]
        ys = [a[mean] for a in rows]
        for a, x, y in zip(rows, xs, ys):
            # BSR's own point is named after it ("bsr", or "moe-bsr" on a MoE model); other bsr points are ablations
            main_bsr = a["point"] == "bsr" or a["point"].endswith("-bsr")
            ablation = a["method"] == "bsr" and not main_bsr
            ax.errorbar(x, y, yerr=a[std] or 0, fmt="s" if ablation else "o", ms=5, capsize=2,
                        color="tab:orange" if ablation else ("tab:red" if main_bsr else "tab:blue"))
            ax.annotate(a["point"], (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
        front = pareto_front(list(zip(xs, ys)))
        if front:
            fx = [xs[i] for i in front]
            fy = [ys[i] for i in front]
            ax.step(fx + [max(xs)], fy + [fy[-1]], where="post", color="grey", lw=1, ls="--",
                    label="Pareto front (highest top-1 at ≤ memory)")
            ax.legend(loc="lower right", fontsize=8)
        ax.margins(x=0.08, y=0.12)  # room for the labels of the outermost points
        ax.set_title(dataset)
        ax.set_xlabel("training peak memory (MiB, measured RSS above baseline)")
        ax.set_ylabel(("test top-1 at the best validation point" if with_val else "top-1 best") +
                      " (%), mean over seeds")
        ax.grid(alpha=0.3)
    fig.suptitle(f"study {data['meta']['name']}: accuracy vs training memory\n"
                 f"(circles: methods, BSR in red; squares: BSR ablations)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


OUTPUT_NAMES = ("study.json", "study.md", "accuracy_vs_memory.png")  # what `write_outputs` writes


def write_outputs(data: dict, out: Path) -> None:
    """study.json, study.md and accuracy_vs_memory.png (`OUTPUT_NAMES`) in `out`."""
    atomic_write_bytes(out / "study.json", (json.dumps(data, indent=2) + "\n").encode())
    atomic_write_bytes(out / "study.md", study_markdown(data).encode())
    plot_accuracy_vs_memory(data, out / "accuracy_vs_memory.png")
