"""`bsr show-tokens`: which patches a trained BSR run keeps after each drop block (Sarkar et al., arXiv 2405.10951:
tokens ranked by the class token's attention, or the attention they receive: `bsr.core.ops`), drawn over the
images, one row per image."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from bsr_device.images import open_image

from ..core.patch import bsr_state, kept_patch_indices, record_kept_tokens
from ..data import ImageTransform
from ..errors import BSRError
from ..files import refuse_writing_inputs
from ..train import load_run
from ..train.batches import build_data
from ..train.build import backbone, image_size
from ..train.config import TrainConfig
from ..train.runs import refuse_run_file


def _load_image_files(paths: Sequence[str], size: int, mean: Sequence[float],
                      std: Sequence[float]) -> tuple[torch.Tensor, list[str]]:
    """Image files as a normalised batch (B, 3, size, size) and their names."""
    transform = ImageTransform(size, train=False, mean=mean, std=std)
    images = [transform(open_image(p)) for p in paths]
    return torch.stack(images), [Path(p).name for p in paths]


# How the vector formats matplotlib writes begin (a raster picture is recognised by PIL instead).
_VECTOR_STARTS = (b"%PDF", b"%!PS", b"<?xml", b"<svg", b"\x1f\x8b", b"%% Creator: Matplotlib")


def check_picture_out(out: Path, run_dir: str | Path, images: Sequence[str] = ()) -> None:
    """Refuse, before any work, an `--out` that matplotlib cannot write (by its extension), that is a file of a run
    directory or one of the input `images`, or that exists and is not a picture (a picture from an earlier call may
    be replaced, nothing else)."""
    from matplotlib.backend_bases import FigureCanvasBase

    refuse_run_file(run_dir, out, "--out")
    refuse_writing_inputs([out], [Path(p) for p in images], "--out")
    formats = FigureCanvasBase.get_supported_filetypes()
    extension = out.suffix[1:].lower()
    if extension not in formats:
        what = f"a .{extension} file" if extension else "a file without an extension"
        raise BSRError(f"--out {out}: matplotlib cannot write {what}; use .png (or {', '.join(sorted(formats))})")
    if out.is_dir() or (out.exists() and not _is_picture(out)):
        raise BSRError(f"--out {out} exists and is not a picture; show-tokens replaces only pictures: move it or "
                       f"pick another --out")


def _is_picture(path: Path) -> bool:
    with path.open("rb") as f:
        if f.read(64).startswith(_VECTOR_STARTS):
            return True
    try:
        with Image.open(path):
            return True
    except Image.DecompressionBombError:
        return True  # a (huge) picture all the same
    except Exception:  # noqa: BLE001 - anything PIL cannot open is not a picture it would replace
        return False


def show_tokens(run_dir: str | Path, images: Sequence[str] = (), dataset_images: int = 0,
                out: str | Path = "tokens.png") -> Path:
    """Draw, for each image (one row), the image and the patches kept after each drop block (dropped ones greyed).

    `images` are image files; `dataset_images` N adds N test images of the run's dataset (spread over the split); a
    multi-task run is shown on its first task (images, gates and head). Returns the written PNG's path.
    """
    if not images and dataset_images < 1:
        raise BSRError("no images: pass image files or --dataset-images N")
    check_picture_out(Path(out), run_dir, images)
    cfg, model = load_run(run_dir, torch.device("cpu"))
    vit = backbone(model)
    state = bsr_state(vit)
    if state is None or not state.drop_blocks:
        raise BSRError(f"run {run_dir} drops no tokens (method {cfg.method}); pick a bsr or tokendrop run")
    x, names, classes = _batch(cfg, image_size(model), images, dataset_images)
    with torch.no_grad(), record_kept_tokens(vit) as records:
        preds = (model(x, 0) if cfg.tasks else model(x)).argmax(-1).tolist()
    grid = tuple(vit.patch_embed.grid_size)
    blocks = sorted(records)
    kept = kept_patch_indices([records[b][0] for b in blocks], grid[0] * grid[1])
    pictures = (x * torch.tensor(cfg.std).view(3, 1, 1) + torch.tensor(cfg.mean).view(3, 1, 1)).clamp(0, 1)
    rows = [(f"{name}\npred {_class_name(classes, pred)}", picture)
            for name, pred, picture in zip(names, preds, pictures)]
    title = (f"patches kept ({cfg.method}, keep rate {state.keep_rate}, drop blocks {state.drop_blocks}); "
             f"grey: dropped")
    return _draw(rows, blocks, kept, grid, title, Path(out))


def _class_name(classes: Sequence[str], index: int) -> str:
    return str(classes[index]) if index < len(classes) else str(index)


def _batch(cfg: TrainConfig, size: int, images: Sequence[str],
           dataset_images: int) -> tuple[torch.Tensor, list[str], list[str]]:
    """The image files, then `dataset_images` test images of the run's (first) dataset spread over the split, as one
    normalised batch (B, 3, size, size), a caption per image, and the class names (empty when the run has none)."""
    batch, names, classes = [], [], list(cfg.class_names or [])
    if images:
        x, names = _load_image_files(images, size, cfg.mean, cfg.std)
        batch.append(x)
    if dataset_images > 0:
        _, _, test_set = build_data(replace(cfg, dataset=cfg.task_names[0]), size, train=False)
        picks = np.linspace(0, len(test_set) - 1, min(dataset_images, len(test_set))).round().astype(int)
        items = [test_set[int(i)] for i in picks]
        batch.append(torch.stack([im for im, _ in items]))
        classes = list(getattr(test_set, "classes", None) or classes)
        names += [f"test #{i}, label {_class_name(classes, y)}" for i, (_, y) in zip(picks, items)]
    return torch.cat(batch), names, classes


def _draw(rows: list[tuple[str, torch.Tensor]], blocks: list[int], kept: list[torch.Tensor], grid: tuple[int, int],
          title: str, out: Path) -> Path:
    """One row per (caption, picture (3, H, W) in [0, 1]): the picture, then after each block its kept patches
    (`kept[c][row]`: patch indices, -1 for the fused token) with a grey veil over the dropped ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 1 + len(blocks)
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.0 * cols, 2.1 * len(rows)), squeeze=False)
    for r, (caption, picture) in enumerate(rows):
        image = picture.permute(1, 2, 0).numpy()  # (H, W, 3)
        ph, pw = image.shape[0] // grid[0], image.shape[1] // grid[1]
        axes[r][0].imshow(image)
        axes[r][0].set_title(caption, fontsize=7)
        for c, b in enumerate(blocks, 1):
            mask = np.zeros(grid, dtype=bool)
            idx = kept[c - 1][r]
            idx = idx[idx >= 0].numpy()
            mask.flat[idx] = True
            shown = image.copy()
            dropped = np.repeat(np.repeat(~mask, ph, 0), pw, 1)  # (H, W)
            shown[dropped] = 0.35 + 0.3 * shown[dropped]  # grey veil over dropped patches
            axes[r][c].imshow(shown)
            fused = " + fused" if (kept[c - 1][r] < 0).any() else ""
            axes[r][c].set_title(f"after block {b}: {len(idx)}/{grid[0] * grid[1]}{fused}", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
