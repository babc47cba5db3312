"""Write the shipped digits (`digits-embedded`: 4,000 train / 1,000 test real MNIST digits) as an image folder,
`OUT/train/<digit>/<n>.png` and `OUT/test/<digit>/<n>.png`, the layout `--dataset folder:OUT` reads (bsr train and
the device trainer alike).

    python benchmarks/digits_folder.py OUT
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def write_digits_folder(out: Path, npz: Path) -> dict:
    data = np.load(npz)
    counts = {}
    for split in ("train", "test"):
        images, labels = data[f"x_{split}"], data[f"y_{split}"]
        for n, (image, label) in enumerate(zip(images, labels)):
            folder = out / split / str(int(label))
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image, mode="L").save(folder / f"{n:05d}.png")
        counts[split] = len(labels)
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    args = p.parse_args()
    npz = Path(__file__).resolve().parents[1] / "bsr" / "assets" / "digits_embedded.npz"
    print(write_digits_folder(args.out, npz))


if __name__ == "__main__":
    main()
