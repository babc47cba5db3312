"""Decoding image files safely: `open_image(path)` gives a PIL RGB image or a one-line `BSRError`.

Shared by every command that reads user images (`bsr predict`, `bsr show-tokens`). Refused in one line: a missing
path, a file that is not an image, a truncated or corrupt one, and a decompression bomb (a small file whose header
claims more pixels than PIL's `Image.MAX_IMAGE_PIXELS`).
"""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import BSRError


def open_image(path: str | Path) -> Image.Image:
    """The image at `path`, fully decoded, as a PIL image in RGB mode (grey and palette images converted)."""
    path = Path(path)
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
