"""One training session over an artifacts folder: ORT's checkpoint state, training module and optimizer.

`DeviceSession` is what every device front end does in its own language (ORT's C, C++, Java, Swift or Python API):
load the checkpoint, build the module from the training and eval graphs and the optimizer from its graph, then per
step set the learning rate, run `train_step` (forward, loss, backward; gradients accumulate in the module), step the
optimizer and reset the gradients. `bsr device-import` and `bsr export --verify` use it too.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

import numpy as np

from .artifacts import CHECKPOINT, EVAL_MODEL, OPTIMIZER_MODEL, TRAINING_MODEL, read_metadata
from .errors import BSRError
from .runtime import import_onnxruntime, runtime_version, training_api

ORT_SUFFIXES = {"onnx": ".onnx", "ort": ".ort"}


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


def checkpoint_parameters(path: str | Path) -> dict[str, np.ndarray]:
    """Every parameter of an ORT checkpoint file, by name (numpy copies), without building a session; one-line
    errors."""
    api = training_api()
    try:
        state = api.CheckpointState.load_checkpoint(str(path))
    except Exception as e:
        raise BSRError(f"cannot read the device checkpoint {path} ({_one_line(e)}); it is missing or corrupt") \
            from None
    return {name: np.array(param.data) for name, param in state.parameters}


class DeviceSession:
    """ORT's training module and optimizer over the artifacts in `artifacts`, from `checkpoint` (default: the
    artifacts' own, i.e. the pretrained start) with graphs in `graph_format` ("onnx" or "ort")."""

    def __init__(self, artifacts: str | Path, checkpoint: Optional[str | Path] = None, graph_format: str = "onnx",
                 block_torch: bool = False, threads: Optional[int] = None, arena: bool = True) -> None:
        self.api = training_api(block=block_torch)
        onnxruntime = import_onnxruntime()

        onnxruntime.set_default_logger_severity(3)  # errors only: ORT warns about every unused initializer
        options = onnxruntime.SessionOptions()
        options.enable_cpu_mem_arena = arena  # off: ~40 MiB less resident, ~10% more CPU time (measured notes)
        if threads is not None:
            options.intra_op_num_threads, options.inter_op_num_threads = int(threads), 1
        self.dir = Path(artifacts)
        self.meta = read_metadata(self.dir, runtime_version())
        if graph_format not in ORT_SUFFIXES:
            raise BSRError(f"graph format {graph_format!r} is unknown; use onnx or ort")
        suffix = ORT_SUFFIXES[graph_format]
        graphs = [self.dir / Path(name).with_suffix(suffix) for name in (TRAINING_MODEL, EVAL_MODEL, OPTIMIZER_MODEL)]
        for path in graphs:
            if not path.is_file():
                raise BSRError(f"{path} is missing; export the artifacts again (ORT format needs the .ort graphs)")
        ckpt = Path(checkpoint) if checkpoint is not None else self.dir / CHECKPOINT
        try:
            self.state = self.api.CheckpointState.load_checkpoint(str(ckpt))
        except Exception as e:
            raise BSRError(f"cannot load the checkpoint {ckpt} ({_one_line(e)}); it is corrupt or not an ORT "
                           f"checkpoint: resume from another or start from the artifacts") from None
        try:
            self.module = self.api.Module(str(graphs[0]), self.state, str(graphs[1]), device="cpu",
                                          session_options=options)
            self.optimizer = self.api.Optimizer(str(graphs[2]), self.module)
        except Exception as e:
            raise BSRError(f"onnxruntime cannot load the artifacts in {self.dir} ({_one_line(e)}); export them "
                           f"again with bsr export --format ort-training") from None

    def train_step(self, images: np.ndarray, labels: np.ndarray, lr: float) -> tuple[float, np.ndarray]:
        """One optimizer step on a batch: (loss, logits (B, classes))."""
        self.module.train()
        self.optimizer.set_learning_rate(float(lr))
        loss, logits = self.module(images, labels)
        self.optimizer.step()
        self.module.lazy_reset_grad()
        return float(loss), logits

    def logits(self, images: np.ndarray) -> np.ndarray:
        """Eval-mode logits of a batch (the eval graph; labels are a dummy input of its loss)."""
        self.module.eval()
        _, logits = self.module(images, np.zeros(len(images), dtype=np.int64))
        return logits

    def properties(self) -> dict:
        """The checkpoint's properties (the trainer's step, seed, ...)."""
        return dict(self.state.properties)

    def parameters(self) -> dict[str, np.ndarray]:
        """Every parameter of the checkpoint, by name, as numpy arrays (copies)."""
        return {name: np.array(param.data) for name, param in self.state.parameters}

    def save(self, path: str | Path, properties: dict) -> None:
        """Write the checkpoint (parameters, optimizer state, `properties`) to `path` atomically: a temporary file in
        the same folder, fsynced, then renamed over it; on any error the previous checkpoint is left as it was."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        for key, value in properties.items():
            self.state.properties[key] = value
        try:
            if tmp.exists():
                shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
            self.api.CheckpointState.save_checkpoint(self.state, str(tmp), include_optimizer_state=True)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except Exception as e:
            if tmp.is_file():
                tmp.unlink(missing_ok=True)
            raise BSRError(f"cannot write the checkpoint {path} ({_one_line(e)}); free disk space or pick another "
                           f"--out (the previous checkpoint is intact)") from None

    def export_inference(self, path: str | Path) -> None:
        """Write the trained model's inference graph (logits only) to `path` (ORT's `export_model_for_inferencing`)."""
        self.module.export_model_for_inferencing(str(path), ["logits"])
