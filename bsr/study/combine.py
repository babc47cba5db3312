"""`bsr study-combine`: one study's outputs from the `study.json` of several studies that ran the same points with
different seeds (a study too long for one session or one machine, split into study files that each train some
seeds). The run records are pooled and every aggregate recomputed from them, so the tables give mean ± std over all
the seeds; nothing is trained or measured again.

A point (name and dataset) found in several inputs must have been trained with the same options in each (every
option both record; a study.json written before aggregates carried their config: the same method, BSR settings,
learning rate and step budget), and no seed may come from two of them. Memory and FLOPs, measured per configuration, are taken from
the first input that measured the point (the same configuration measured twice differs only by the noise of the
allocator); the lr-sweep records of every input are kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..errors import BSRError
from ..files import read_json, refuse_writing_inputs
from .report import OUTPUT_NAMES, aggregate, compare_to_full, write_outputs

SAME = ("method", "bsr", "lr", "steps")  # what must agree when an input's aggregates carry no config
MEASURED = ("trainable_params", "train_peak_bytes", "saved_activation_bytes", "train_flops_per_step")


def combine_studies(paths: Sequence[str | Path], name: str) -> dict:
    """The `study.json` content of the studies at `paths` (each a study.json or the directory holding it) pooled."""
    if len(paths) < 2:
        raise BSRError(f"study-combine needs at least two study.json files, got {len(paths)}; name every study "
                       "whose seeds belong together")
    inputs = [(str(p), read_json(_json_path(p), "study output")) for p in paths]
    try:
        return _combine(inputs, name)
    except (KeyError, TypeError, AttributeError) as e:
        raise BSRError(f"{', '.join(s for s, _ in inputs)}: one is not a study.json as `bsr study` writes it "
                       f"({type(e).__name__}: {e}); give the study.json of each study, or render it again with "
                       "`bsr study ... --report-only`") from None


def _combine(inputs: list[tuple[str, dict]], name: str) -> dict:
    runs, seen, points, datasets, configs, sweep = [], {}, [], [], {}, []
    for source, data in inputs:
        _pool(source, data, runs, seen, points, datasets, configs)
        sweep += data.get("sweep", [])
    aggregates = []
    for dataset in datasets:
        for point in points:
            if (point, dataset) not in configs:
                continue
            mine = [a for _, d in inputs for a in d["aggregates"] if (a["point"], a["dataset"]) == (point, dataset)]
            first = configs[(point, dataset)][1]
            config = next((a["config"] for a in mine if a.get("config")), None) or \
                {k: first[k] for k in ("method", "bsr", "lr", "epochs")}
            measured = next(({k: a.get(k) for k in MEASURED} for a in mine if a.get("train_peak_bytes")), {})
            aggregates.append(aggregate(point, dataset, config, runs, measured))
    compare_to_full(aggregates, datasets)
    meta = {"name": name, "datasets": datasets, "points": points,
            "combined_from": [{"path": source, "name": d["meta"].get("name"), "versions": d["meta"].get("versions"),
                               "machine": d["meta"].get("machine")} for source, d in inputs]}
    return {"meta": meta, "runs": runs, "aggregates": aggregates, "sweep": sweep}


def _pool(source: str, data: dict, runs: list, seen: dict, points: list, datasets: list, configs: dict) -> None:
    """Add one input's points (checked against the same points of earlier inputs) and finished runs."""
    for key in ("meta", "runs", "aggregates"):
        if key not in data:
            raise BSRError(f"{source}: no {key!r} in this study.json; give the study.json that `bsr study` wrote")
    for a in data["aggregates"]:
        key = (a["point"], a["dataset"])
        if key not in configs:
            configs[key] = (source, a)
            points += [a["point"]] if a["point"] not in points else []
            datasets += [a["dataset"]] if a["dataset"] not in datasets else []
            continue
        first_source, first = configs[key]
        for field, ours, theirs in _compared(a, first):
            if ours != theirs:
                raise BSRError(f"{source}: point {a['point']} on {a['dataset']} has {field}={ours!r}, but "
                               f"{first_source} ran it with {theirs!r}; combine only studies of the same "
                               "configuration (rename the point in one study file if it is another one)")
    for r in data["runs"]:
        if not r["finished"]:
            continue
        key = (r["point"], r["dataset"], r["seed"])
        if key in seen:
            raise BSRError(f"{source}: seed {r['seed']} of point {r['point']} on {r['dataset']} is also in "
                           f"{seen[key]}; each seed must come from one study only (leave one of them out)")
        seen[key] = source
        runs.append(r)


def _compared(a: dict, b: dict) -> list[tuple[str, object, object]]:
    """(option, a's value, b's value) for what two aggregates of one point must agree on: every training option both
    recorded (studies written since aggregates carry their `config`), else the method, BSR settings, lr and steps."""
    if a.get("config") is not None and b.get("config") is not None:
        return [(k, a["config"][k], b["config"][k]) for k in a["config"] if k in b["config"]]
    return [(k, a[k], b[k]) for k in SAME if a[k] is not None and b[k] is not None]


def _json_path(path: str | Path) -> Path:
    path = Path(path)
    path = path / "study.json" if path.is_dir() else path
    if not path.is_file():
        raise BSRError(f"{path}: no such study output; give a study.json written by `bsr study` (or its directory)")
    return path


def write_combined(paths: Sequence[str | Path], out: str | Path, name: str | None = None) -> dict:
    """Combine the studies at `paths` and write study.json, study.md and accuracy_vs_memory.png into `out`."""
    out = Path(out)
    inputs = [_json_path(p) for p in paths]
    refuse_writing_inputs([out, *(out / n for n in OUTPUT_NAMES)], [*inputs, *(p.parent for p in inputs)], "--out")
    data = combine_studies(paths, name or out.name)
    out.mkdir(parents=True, exist_ok=True)
    write_outputs(data, out)
    return data
