"""ONNX Runtime's on-device training API, imported without PyTorch.

`onnxruntime-training-cpu` imports torch twice on the way to its training API: `import onnxruntime` probes for
ORTModule (`onnxruntime.training.ortmodule`), and the package `onnxruntime.training` imports its PyTorch-side optimizers
and loss scalers. Neither is needed on a device, and where torch happens to be installed they load it (hundreds of MiB).
`import_onnxruntime` skips the probe; `training_api(block=True)` also makes `import torch` fail in this process, then
loads `onnxruntime.training.api` (checkpoint, module, optimizer) without running `onnxruntime/training/__init__.py`.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType

from .errors import BSRError

INSTALL = "pip install 'onnxruntime-training-cpu==1.19.2' (it replaces the onnxruntime package)"


class _NoTorch(importlib.abc.MetaPathFinder):
    """Refuses `import torch` (and its submodules) in this process."""

    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"{name} is blocked in the torch-free device trainer")
        return None


def block_torch() -> None:
    """Make every later `import torch` in this process raise ImportError (refused if torch is already loaded)."""
    if sys.modules.get("torch") is not None:
        raise BSRError("torch is already imported in this process; run the device trainer in a process of its own "
                       "(python -m bsr_device)")
    if not any(isinstance(f, _NoTorch) for f in sys.meta_path):
        sys.meta_path.insert(0, _NoTorch())


def import_onnxruntime() -> ModuleType:
    """`onnxruntime`, imported without its ORTModule probe: `onnxruntime-training-cpu`'s `import onnxruntime` tries
    `onnxruntime.training.ortmodule` (PyTorch-side training bsr never uses), which costs 1.5 s and a warning from
    torch in a process that has torch; marking that module absent makes ORT take the "no ORTModule" path at once."""
    sys.modules.setdefault("onnxruntime.training.ortmodule", None)
    try:
        import onnxruntime
    except ImportError:
        raise BSRError(f"onnxruntime is not installed; {INSTALL}") from None
    return onnxruntime


def training_api(block: bool = False) -> ModuleType:
    """`onnxruntime.training.api`, loaded without the `onnxruntime.training` package's PyTorch imports (`block`: and
    with torch blocked in this process first)."""
    if block:
        block_torch()
    onnxruntime = import_onnxruntime()
    name = "onnxruntime.training"
    if name not in sys.modules:
        spec = importlib.util.find_spec(name)
        if spec is None:
            raise BSRError(f"onnxruntime {onnxruntime.__version__} has no training API; {INSTALL}")
        sys.modules[name] = importlib.util.module_from_spec(spec)  # the package's folder, its __init__ not run
    try:
        return importlib.import_module("onnxruntime.training.api")
    except ImportError as e:
        raise BSRError(f"onnxruntime {onnxruntime.__version__} has no on-device training API ({e}); {INSTALL}") \
            from None


def runtime_version() -> str:
    """The version of the onnxruntime in this process."""
    return import_onnxruntime().__version__
