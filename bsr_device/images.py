"""Image files for training and prediction without PyTorch: safe decoding, resizing, normalising, seeded augmentation.

`open_image(path)` gives a PIL RGB image or a one-line `BSRError`; shared by every command that reads user
images (`bsr train` on folder/CSV datasets, `bsr predict`, `bsr show-tokens`, the device trainer). Refused in one
line: a missing path, a file that is not an image, a truncated or corrupt one, and a decompression bomb (a small
file whose header claims more pixels than PIL's `Image.MAX_IMAGE_PIXELS`).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import BSRError
from .listing import Sample


def open_image(path: str | Path) -> Image.Image:
    """The image at `path`, fully decoded, as a PIL image in RGB mode (grey and palette images converted)."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise BSRError(f"image {path} is a broken symbolic link (its target is missing, or the links loop); fix or "
                       f"remove the link")
    if not path.is_file():
        raise BSRError(f"image {path} does not exist or is not a file; pass PNG/JPEG files")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # above MAX_IMAGE_PIXELS: refuse, too
            with Image.open(path) as image:
                return image.convert("RGB")  # convert() decodes the whole image, so truncation shows here
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BSRError(f"image {path} claims more pixels than PIL decodes safely ({Image.MAX_IMAGE_PIXELS:,}); "
                       f"it is a decompression bomb or far too large, pass a smaller image") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, EOFError) as e:
        reason = " ".join(str(e).split())[:160] or type(e).__name__
        raise BSRError(f"cannot read image {path} ({reason}); pass PNG/JPEG files") from None


def _crop_box(width: int, height: int, scale: tuple[float, float],
              rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A RandomResizedCrop box (torchvision's rule: area in `scale`, aspect ratio in [3/4, 4/3] log-uniform, 10 tries,
    then the centre crop of the clamped ratio) as (left, top, right, bottom)."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ratio = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
        w, h = int(round(np.sqrt(target * ratio))), int(round(np.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    ratio = width / height
    w, h = (width, int(round(width / (4 / 3)))) if ratio > 4 / 3 else (
        (int(round(height * 3 / 4)), height) if ratio < 3 / 4 else (width, height))
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def image_array(image: Image.Image, size: int, mean, std, rng: np.random.Generator | None = None,
                rrc_scale: tuple[float, float] | None = None, hflip: bool = False) -> np.ndarray:
    """An RGB PIL image as a normalised float32 array (3, size, size): `Resize((size, size))` (PIL bilinear, as
    torchvision's resize of a PIL image), or with `rng` the training geometry of `bsr train` (`RandomResizedCrop` with
    `rrc_scale`, a horizontal flip with `hflip`)."""
    if rng is not None and rrc_scale is not None:
        image = image.resize((size, size), Image.BILINEAR, box=_crop_box(*image.size, tuple(rrc_scale), rng))
    else:
        image = image.resize((size, size), Image.BILINEAR)
    if rng is not None and hflip and rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    x = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
    return (x - np.asarray(mean, np.float32)[:, None, None]) / np.asarray(std, np.float32)[:, None, None]


def readable(samples: list[Sample], strict: bool = False) -> tuple[list[Sample], list[tuple[str, str]]]:
    """Decode every (path, label) sample's image once: (the readable samples, [(path, reason)] of the others);
    `strict` stops at the first unreadable one."""
    good, skipped = [], []
    for path, label in samples:
        try:
            open_image(path)
        except BSRError as e:
            if strict:
                raise BSRError(f"{e} (--strict stops at an unreadable image; fix or remove it, or drop --strict to "
                               f"skip such files)") from None
            skipped.append((path, str(e)))
            continue
        good.append((path, label))
    return good, skipped
