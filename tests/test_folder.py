"""The user's own images (issue 12): `folder:PATH` and `csv:PATH` datasets train, evaluate and predict with class
names; the held-out split is fixed by its seed; unreadable images are skipped by name (or stop the run with
--strict); bad folders are one line, exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from PIL import Image

from bsr.cli import EXIT_USER_ERROR, main
from bsr.data import build_dataset, dataset_info

TINY = ["--model", "vit_micro_patch4_28", "--batch-size", "4", "--steps", "2", "--eval-every", "2", "--threads", "1",
        "--no-progress"]
CLASSES = ("cat", "dog", "owl")


def make_folder(root, per_class: int = 8, classes=CLASSES, corrupt: bool = True):
    """`root/<class>/<i>.png|jpg`: small colour images (one greyscale, one RGBA, every third a JPEG) and one corrupt
    file; returns `root`."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = Image.fromarray((rng.random((20, 24, 3)) * 60 + 60 * c).astype(np.uint8))
            image = image.convert("L") if i == 0 else image.convert("RGBA") if i == 1 else image
            image.save(root / name / f"{i}.{'jpg' if i % 3 == 2 else 'png'}")
    if corrupt:
        (root / classes[0] / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bsr: error: ") and "Traceback" not in err[0], err
    return err[0]


def test_a_folder_trains_evaluates_and_predicts_with_class_names(tmp_path, capsys):
    data = make_folder(tmp_path / "pets")
    out = tmp_path / "run"
    assert main(["train", *TINY, "--dataset", f"folder:{data}", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "broken.png" in printed.err and "skipped 1 unreadable image" in printed.err
    report = json.loads((out / "report.json").read_text())
    assert report["dataset"]["skipped_images"] == 1 and report["dataset"]["class_names"] == list(CLASSES)
    # 24 images + 1 corrupt: 5 held out for test (0.2 of each class of 8 or 9, rounded), the rest trains
    assert report["dataset"]["test_images"] == 6 and report["dataset"]["train_images"] == 18
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["class_names"] == list(CLASSES) and config["split_seed"] == 0 and config["test_fraction"] == 0.2

    assert main(["eval", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "on folder:" in shown and all(f"  {name}" in shown for name in CLASSES)

    assert main(["predict", str(out), str(data / "dog" / "3.png"), str(data / "owl" / "0.png"), "--top-k", "3"]) == 0
    shown = capsys.readouterr().out
    assert all(name in shown for name in CLASSES)


def test_strict_stops_at_the_unreadable_image_in_one_line(tmp_path, capsys):
    data = make_folder(tmp_path / "pets")
    argv = ["train", *TINY, "--dataset", f"folder:{data}", "--strict", "--out", str(tmp_path / "run")]
    assert main(argv) == EXIT_USER_ERROR
    assert "broken.png" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_the_csv_form_with_relative_paths_and_a_header(tmp_path):
    data = make_folder(tmp_path / "images", corrupt=False)
    lines = ["path,label"] + [f"images/{p.parent.name}/{p.name},{p.parent.name}" for p in sorted(data.rglob("*.*"))]
    (tmp_path / "list.csv").write_text("\n".join(lines) + "\nimages/missing.png,cat\n")
    name = f"csv:{tmp_path / 'list.csv'}"
    assert dataset_info(name).classes == CLASSES
    train = build_dataset(name, "train", img_size=16, train=True)
    test = build_dataset(name, "test", img_size=16, train=False)
    assert len(train) + len(test) == 24 and sorted(set(test.targets)) == [0, 1, 2]
    assert [p for p, _ in train.skipped + test.skipped] == [str(tmp_path / "images" / "missing.png")]
    image, label = train[0]
    assert image.shape == (3, 16, 16) and label in (0, 1, 2)


def test_the_held_out_split_is_fixed_by_its_seed_and_stratified(tmp_path):
    name = f"folder:{make_folder(tmp_path / 'pets', per_class=10, corrupt=False)}"

    def files(split, **kw):
        return [p for p, _ in build_dataset(name, split, img_size=8, train=False, **kw).samples]

    test, train = files("test"), files("train")
    assert test == files("test") and train == files("train")  # the same split every time
    assert not set(test) & set(train) and len(test) + len(train) == 30
    assert [sum(f"/{c}/" in p for p in test) for c in CLASSES] == [2, 2, 2]  # 0.2 of each class
    assert files("test", split_seed=1) != test
    assert len(files("test", test_fraction=0.5)) == 15
    val = files("val", val_fraction=0.25)
    assert set(val) <= set(train) and not set(val) & set(files("train", val_fraction=0.25))


def test_a_folders_own_splits_win(tmp_path):
    root = tmp_path / "data"
    for split, n in (("train", 6), ("val", 2), ("test", 3)):
        make_folder(root / split, per_class=n, corrupt=False)
    name = f"folder:{root}"
    info = dataset_info(name)
    assert info.classes == CLASSES and info.val_split
    sizes = {split: len(build_dataset(name, split, img_size=8, train=False, val_fraction=0.5))
             for split in ("train", "val", "test")}
    assert sizes == {"train": 18, "val": 6, "test": 9}  # val/ wins over val_fraction, nothing held out of train/


@pytest.mark.parametrize("setup,words", [
    (lambda d: d.mkdir(), "no images"),
    (lambda d: make_folder(d, classes=("cat",), corrupt=False), "one class (cat)"),
    (lambda d: None, "does not exist"),
    (lambda d: (d.mkdir(), (d / "a").mkdir(), (d / "b").mkdir(), (d / "a" / "x.txt").write_text("x")), "no images"),
])
def test_bad_folders_are_one_line(tmp_path, capsys, setup, words):
    data = tmp_path / "pets"
    setup(data)
    assert main(["train", *TINY, "--dataset", f"folder:{data}", "--out", str(tmp_path / "run")]) == EXIT_USER_ERROR
    assert words in one_error_line(capsys)


def test_a_bad_csv_line_is_one_line(tmp_path, capsys):
    (tmp_path / "list.csv").write_text("a.png,cat\nb.png\n")
    assert main(["train", *TINY, "--dataset", f"csv:{tmp_path / 'list.csv'}"]) == EXIT_USER_ERROR
    assert "line 2" in one_error_line(capsys)
