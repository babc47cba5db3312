"""Training (Sarkar et al., arXiv 2405.10951): `train(TrainConfig)` fine-tunes a timm ViT and writes a run directory.

Modules, bottom up: `recipes` and `methods` (the paper's recipes and fine-tuning methods), `config` (`TrainConfig`
and its layering), `distributed`, `checkpoint`, `build` (the one model builder), `batches` (seeded data order),
`optim` (schedule, optimizer, autocast), `meter` (device-side metrics), `runs` (run directory, resume, report,
export), `evaluate`, and `loop` (the loop itself).
"""

from .build import build_model, pick_device, setup_model
from .config import TrainConfig, load_yaml, make_config, merge_options, resolve_config
from .evaluate import evaluate_run
from .loop import train, train_in_group
from .optim import build_optimizer, lr_at
from .runs import config_of_run, export_weights, load_run, resume_config, summary_lines

__all__ = ["TrainConfig", "build_model", "build_optimizer", "config_of_run", "evaluate_run", "export_weights",
           "load_run", "load_yaml", "lr_at", "make_config", "merge_options", "pick_device", "resolve_config",
           "resume_config", "setup_model", "summary_lines", "train", "train_in_group"]
