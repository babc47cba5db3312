"""Checkpoints that survive a kill: one safetensors file, written atomically, never pickled.

A checkpoint holds only what training changed: the trainable parameters (frozen ones come back from the base
weights), the optimizer state tensors (flattened to `optim.<param index>.<key>`), the RNG states, and a JSON block of
metadata (resolved config, step, epoch, best accuracy, optimizer param groups, scheduler state). Everything sits in one
file so that it is replaced in a single `os.replace`: a reader sees the old checkpoint or the new one, never a mix.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import torch
from safetensors.torch import load as st_load

from ..errors import BSRError
from ..tensorfile import save_tensors

CHECKPOINT_NAME = "checkpoint.safetensors"
FORMAT = "bsr-checkpoint-1"


# ----------------------------------------------------------------------------------------------------------- RNG


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """All RNG states as (uint8/int tensors, JSON-able values)."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, gauss = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(cached)], "python": [version, list(internal), gauss]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Inverse of `rng_state` (CUDA states are restored for the devices present)."""
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if states:
            torch.cuda.set_rng_state_all(states[: torch.cuda.device_count()])
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


# ----------------------------------------------------------------------------------------------------- optimizer


def flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """`optimizer.state_dict()` -> (tensors keyed `optim.<idx>.<key>`, JSON: param_groups + non-tensor state)."""
    tensors, scalars = {}, {}
    for idx, per_param in state["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Inverse of `flatten_optimizer`."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": dict(sorted(state.items())), "param_groups": meta["param_groups"]}


# ------------------------------------------------------------------------------------------------- save and load


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that training changes (requires_grad), by their name in `model`."""
    return {f"param.{n}": p.detach() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, meta: dict) -> Path:
    """Write `directory/checkpoint.safetensors` atomically; `meta` must be JSON-able (config, step, ...)."""
    opt_tensors, opt_meta = flatten_optimizer(optimizer.state_dict())
    rng_tensors, rng_meta = rng_state()
    # sorted names: a resumed optimizer holds its per-parameter state in another order; the file must not differ
    tensors = dict(sorted({**trainable_state(model), **opt_tensors, **rng_tensors}.items()))
    header = {"format": FORMAT, **meta, "optimizer": opt_meta, "rng": rng_meta}
    path = Path(directory) / CHECKPOINT_NAME
    # sorted keys: a resumed run rebuilds some dicts in another order, and its file must be the same bytes
    save_tensors(path, tensors, metadata={"bsr": json.dumps(header, sort_keys=True)})  # tensor by tensor, no copy
    return path


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a checkpoint file or run directory; a one-line `BSRError` if missing or corrupt."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise BSRError(f"no checkpoint at {path}; pass a run directory written by `bsr train --out`")
    try:
        data = path.read_bytes()
        tensors = st_load(data)
        with safetensors.safe_open(path, framework="pt") as f:
            header = json.loads((f.metadata() or {})["bsr"])
    except (safetensors.SafetensorError, KeyError, ValueError, json.JSONDecodeError, OSError) as e:
        raise BSRError(f"checkpoint {path} is corrupt or not a bsr checkpoint ({type(e).__name__}); "
                       f"re-run training or point to another run") from None
    problem = checkpoint_problem(tensors, header)
    if problem:
        raise BSRError(f"checkpoint {path} is corrupt or not a bsr checkpoint ({problem}); re-run training or "
                       f"point to another run")
    return tensors, header


# Metadata of a checkpoint and its JSON types: what `save_checkpoint` always writes, then what a training run adds
# (`bsr.train.runs.Run.checkpoint_meta`), checked whenever present.
_REQUIRED = {"config": dict, "step": int, "optimizer": dict, "rng": dict}
_OPTIONAL = {"best_acc": (int, float), "epoch": (int, float), "history": dict, "scheduler": dict, "scaler": dict,
             "log_window": list}
_KIND_NAMES = {dict: "a mapping", int: "an integer", list: "a list"}


def checkpoint_problem(tensors: dict[str, torch.Tensor], header: Any) -> str:
    """What is wrong with the shape of a checkpoint ("" if nothing): everything eval and resume read is checked here,
    once, so neither meets a missing key or a wrong type later."""
    if not isinstance(header, dict):
        return f"its metadata is a {type(header).__name__}, not a mapping"
    if header.get("format") != FORMAT:
        return f"format {header.get('format')!r}, expected {FORMAT}"
    for key, kind in {**_REQUIRED, **{k: v for k, v in _OPTIONAL.items() if k in header}}.items():
        value = header.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"metadata {key} is {json.dumps(value)[:40]}, expected {_KIND_NAMES.get(kind, 'a number')}"
    if header["step"] < 0:
        return f"step {header['step']} is negative"
    optimizer, rng = header["optimizer"], header["rng"]
    if not isinstance(optimizer.get("param_groups"), list) or not isinstance(optimizer.get("scalars"), dict):
        return "the optimizer metadata lacks param_groups or scalars"
    if not (isinstance(rng.get("numpy"), list) and len(rng["numpy"]) == 4 and isinstance(rng.get("python"), list)
            and len(rng["python"]) == 3):
        return "the RNG metadata lacks the numpy or python state"
    history = header.get("history", {"acc": None, "best_step": 0})
    if "acc" not in history or not isinstance(history.get("best_step"), int):
        return "the history metadata lacks acc or best_step"
    for name, dtype in (("rng.torch", torch.uint8), ("rng.numpy", torch.int64)):
        if name not in tensors or tensors[name].dtype != dtype:
            return f"tensor {name} is missing or not {dtype}"
    return ""


def load_trainable(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: Path | str) -> None:
    """Copy the saved trainable parameters into `model` (built and reprogrammed the same way)."""
    params = dict(model.named_parameters())
    saved = {k[len("param."):]: v for k, v in tensors.items() if k.startswith("param.")}
    for name in [k for k in saved if k not in params and f"{k}.0" in params and saved[k].dim() > 0]:
        for i, part in enumerate(saved.pop(name).unbind(0)):  # a stacked MoE expert weight (older checkpoints)
            saved[f"{name}.{i}"] = part
    unknown = [k for k in saved if k not in params]
    if unknown:
        raise BSRError(f"checkpoint {source} has parameter {unknown[0]!r} that the model lacks; "
                       f"it was trained with another model or method")
    missing = [k for k, p in params.items() if p.requires_grad and k not in saved]
    if missing:  # the base weight would silently stand in for what training learned
        raise BSRError(f"checkpoint {source} lacks the trained parameter {missing[0]!r} ({len(missing)} missing): it "
                       f"is incomplete; restore it from a copy or train again")
    with torch.no_grad():
        for name, value in saved.items():
            if params[name].shape != value.shape:
                raise BSRError(f"checkpoint {source}: {name} has shape {tuple(value.shape)}, the model "
                               f"{tuple(params[name].shape)}")
            params[name].copy_(value)
