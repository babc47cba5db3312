"""bsr: Block Selective Reprogramming of timm Vision Transformers (Sarkar et al., arXiv 2405.10951).

The method (`bsr.core`) is imported with the package; the training and bench entry points (`TrainConfig`,
`run_bench`, `BenchSpec`) and `bsr.load(path)` (a file of `bsr export`: the model rebuilt with its token dropping,
`bsr.deploy.load_model`) load on first use, so `import bsr` stays light. `bsr.train.train(cfg)` trains (`bsr.train`
is the training package). docs/ARCHITECTURE.md maps the layers.
"""

import importlib

from .core import (BSRConfig, bsr_state, kept_patch_indices, parse_blocks, record_kept_tokens, reprogram, restore,
                   summary)
from .errors import BSRError
from .version import __version__

_LAZY = {"TrainConfig": "bsr.train.config", "run_bench": "bsr.measure.bench", "BenchSpec": "bsr.measure.bench_spec",
         "load": "bsr.deploy"}

__all__ = ["BSRConfig", "BSRError", "BenchSpec", "TrainConfig", "__version__", "bsr_state", "kept_patch_indices",
           "load", "parse_blocks", "record_kept_tokens", "reprogram", "restore", "run_bench", "summary"]


def __getattr__(name: str):
    """`bsr.TrainConfig`, `bsr.run_bench`, `bsr.BenchSpec`, `bsr.load`: imported when first asked for."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bsr' has no attribute {name!r}")
