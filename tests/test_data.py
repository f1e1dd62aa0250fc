"""Readers of the benchmarks' on-disk formats on miniature copies, built-in data, bad data."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from softtriple.cli import main
from softtriple.data import (
    DataError,
    ImageDataset,
    ImageTable,
    eval_transform,
    read_table,
    train_transform,
    verify_images,
)
from softtriple.data.builtin import folder_checksum, prepare
from softtriple.data.decoded import decoded_bytes, split_fixed_head


def _image(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(path)


def make_cub(root: Path, per_class: int = 2) -> Path:
    base = root / "CUB_200_2011"
    images, labels = [], []
    for c in range(1, 201):
        for j in range(per_class):
            rel = f"{c:03d}.Bird_{c}/Bird_{c}_{j}.jpg"
            _image(base / "images" / rel, c * 10 + j)
            n = len(images) + 1
            images.append(f"{n} {rel}")
            labels.append(f"{n} {c}")
    (base / "images.txt").write_text("\n".join(images) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (base / "classes.txt").write_text("".join(f"{c} {c:03d}.Bird_{c}\n" for c in range(1, 201)))
    return base


def make_cars(root: Path) -> Path:
    from scipy.io import savemat
    base = root / "cars196"
    records = []
    for c in range(1, 197):
        for j in range(2):
            rel = f"car_ims/{c:03d}{j}.jpg"
            _image(base / rel, c + j)
            records.append((rel, 0, 0, 5, 5, c, j))  # the file's test flag is not our split
    dtype = [("relative_im_path", "O"), ("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"),
             ("bbox_y2", "O"), ("class", "O"), ("test", "O")]
    annotations = np.array(records, dtype=dtype)
    names = np.array([f"Car {c}" for c in range(1, 197)], dtype=object)
    savemat(base / "cars_annos.mat", {"annotations": annotations[None, :],
                                      "class_names": names[None, :]})
    return base


def make_sop(root: Path) -> Path:
    base = root / "Stanford_Online_Products"
    for split, classes in (("train", range(1, 6)), ("test", range(6, 10))):
        lines = ["image_id class_id super_class_id path"]
        for c in classes:
            for j in range(3 if c != 9 else 1):  # class 9 has a single image
                rel = f"bicycle_final/{c}_{j}.JPG"
                _image(base / rel, c * 3 + j)
                lines.append(f"{len(lines)} {c} 1 {rel}")
        (base / f"Ebay_{split}.txt").write_text("\n".join(lines) + "\n")
    return base


def test_cub_split_and_counts(tmp_path):
    table = read_table("cub", make_cub(tmp_path))
    summary = table.summary()
    assert summary["train"]["images"] == 200 and summary["train"]["classes"] == 100
    assert summary["test"]["images"] == 200 and summary["test"]["classes"] == 100
    assert set(table.split("train").labels) == set(range(1, 101))
    assert set(table.split("test").labels) == set(range(101, 201))
    assert table.class_names[7] == "007.Bird_7"  # classes.txt, when the copy has it
    (tmp_path / "CUB_200_2011" / "classes.txt").unlink()
    assert read_table("cub", tmp_path / "CUB_200_2011").class_names == {}


def test_cars_split_from_a_real_mat_file(tmp_path):
    table = read_table("cars", make_cars(tmp_path))
    assert set(table.split("train").labels) == set(range(1, 99))
    assert set(table.split("test").labels) == set(range(99, 197))
    assert len(table) == 392 and table.class_names[1] == "Car 1"


def test_sop_and_single_image_classes(tmp_path, capsys):
    base = make_sop(tmp_path)
    table = read_table("sop", base)
    assert table.summary()["test"] == {"images": 10, "classes": 4, "min_per_class": 1,
                                       "median_per_class": 3.0, "max_per_class": 3,
                                       "single_image_classes": 1}
    assert main(["data", "summary", "--format", "sop", str(base), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["train"]["images"] == 15 and printed["test"]["classes"] == 4
    assert main(["data", "summary", "--format", "sop", str(base)]) == 0
    assert "1 class(es) have one image" in capsys.readouterr().out


def test_folder_and_csv(tmp_path):
    for c in "abcd":
        for j in range(2):
            _image(tmp_path / "f" / c / f"{j}.png", j)
    table = read_table("folder", tmp_path / "f")
    assert table.class_names == {0: "a", 1: "b", 2: "c", 3: "d"}
    assert list(table.split("train").labels) == [0, 0, 1, 1]
    csv = tmp_path / "f" / "images.csv"
    csv.write_text("path,label,split\na/0.png,1,train\nb/0.png,2,test\nb/1.png,2,test\n")
    table = read_table("csv", csv)
    assert list(table.splits) == ["train", "test", "test"]


@pytest.mark.parametrize("setup,fmt,message", [
    (lambda p: p / "absent", "cub", "does not exist"),
    (lambda p: p, "cub", "images.txt not found: is .* a CUB-200-2011 folder"),
    (lambda p: p, "cars", "cars_annos.mat not found"),
    (lambda p: p, "sop", "Ebay_train.txt not found"),
    (lambda p: p, "imagenet", "unknown data format 'imagenet'; valid: builtin, cub"),
])
def test_bad_roots(tmp_path, setup, fmt, message):
    with pytest.raises(DataError, match=message):
        read_table(fmt, setup(tmp_path))


def test_label_file_naming_an_absent_image(tmp_path):
    base = make_cub(tmp_path, per_class=1)
    (base / "images" / "005.Bird_5" / "Bird_5_0.jpg").unlink()
    with pytest.raises(DataError, match="1 listed image.*missing, e.g. .*Bird_5_0.jpg"):
        read_table("cub", base)


def test_duplicate_paths(tmp_path):
    base = make_sop(tmp_path)
    listing = base / "Ebay_test.txt"
    lines = listing.read_text().splitlines()
    listing.write_text("\n".join([*lines, lines[1]]) + "\n")
    with pytest.raises(DataError, match="listed twice"):
        read_table("sop", base)


def test_classes_in_both_splits(tmp_path):
    base = make_sop(tmp_path)
    listing = base / "Ebay_test.txt"
    listing.write_text(listing.read_text().replace(" 6 1 ", " 1 1 "))
    with pytest.raises(DataError, match="appear in both train and test"):
        read_table("sop", base)


def test_corrupt_image_is_named(tmp_path):
    base = make_sop(tmp_path)
    bad = base / "bicycle_final" / "2_1.JPG"
    bad.write_bytes(b"not a jpeg")
    table = read_table("sop", base)
    with pytest.raises(DataError, match="2_1.JPG is corrupt or not an image"):
        verify_images(table)
    dataset = ImageDataset(table, np.zeros(len(table), dtype=np.int64), eval_transform(8))
    with pytest.raises(DataError, match="2_1.JPG"):
        dataset[[str(p) for p in table.paths].index(str(bad))]


def test_digits_builtin_is_idempotent(tmp_path):
    folder = prepare("digits", tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["images"] == 1797 and manifest["classes"] == 10
    assert manifest["sources"][0]["package"] == "scikit-learn"
    stamp = (folder / "manifest.json").stat().st_mtime_ns
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert prepare("digits", tmp_path) == folder
    assert (folder / "manifest.json").stat().st_mtime_ns == stamp
    assert manifest["checksum"] == folder_checksum(folder)
    # a run's caches next to the data (image checks, features, baselines) change no checksum:
    # the set is not rebuilt because of them
    (folder / ".softtriple-cache").mkdir(exist_ok=True)
    (folder / ".softtriple-cache" / "image-checks.json").write_text("{}")
    assert prepare("digits", tmp_path) == folder
    assert (folder / "manifest.json").stat().st_mtime_ns == stamp
    table = read_table("folder", folder)
    assert sorted(set(table.split("train").labels)) == [0, 1, 2, 3, 4]


@pytest.mark.skipif(bool(__import__("softtriple.data.builtin.emoji", fromlist=["x"])
                         .missing_sources()), reason="emoji sources not installed (make sources)")
def test_emoji_builder_on_a_subset(tmp_path):
    from softtriple.data.builtin import emoji
    manifest = emoji.build(tmp_path, limit=25)
    assert manifest["classes"] >= 15
    folders = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    for folder in folders:
        files = sorted(f.stem for f in folder.glob("*.png"))
        assert len(files) >= emoji.MIN_SOURCES
        assert set(files) <= {"twemoji", "emojione", "noto", "openmoji", "symbola"}
    with Image.open(folders[0] / "twemoji.png") as image:
        assert image.size == (emoji.SIZE, emoji.SIZE) and image.mode == "RGB"
        assert np.asarray(image).std() > 10


def test_glyphs_builder_on_a_subset(tmp_path):
    from softtriple.data.builtin import glyphs
    if glyphs.missing_packages():
        pytest.skip("Debian CJK fonts not installed (make sources)")
    manifest = glyphs.build(tmp_path, limit=30)
    assert manifest["classes"] == 30 and len(manifest["sources"]) == 10
    for folder in (p for p in tmp_path.iterdir() if p.is_dir()):
        assert len(list(folder.glob("*.png"))) >= glyphs.MIN_FONTS


def test_raw_pixels_are_mean_free_ink_vectors(tmp_path):
    from softtriple.data.baseline import raw_pixels
    _image(tmp_path / "a.png", 1)
    Image.new("L", (10, 10), 255).save(tmp_path / "blank.png")
    x = raw_pixels([tmp_path / "a.png", tmp_path / "blank.png"], size=8)
    assert x.shape == (2, 64) and x.dtype == np.float32
    np.testing.assert_allclose(x.mean(axis=1), 0, atol=1e-4)
    assert np.all(x[1] == 0)  # white paper has no ink


def _mixed_images(root: Path) -> ImageTable:
    """Images of several sizes and modes (RGB, grey, palette with transparency, RGBA)."""
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w, mode) in enumerate([(12, 10, "RGB"), (30, 17, "L"), (9, 40, "P"),
                                      (25, 25, "RGBA"), (64, 48, "RGB")]):
        pixels = rng.integers(0, 255, (h, w, 4 if mode == "RGBA" else 3), dtype=np.uint8)
        image = Image.fromarray(pixels, "RGBA" if mode == "RGBA" else "RGB")
        image = image.convert(mode) if mode != "P" else image.quantize(8)
        if mode == "P":
            image.info["transparency"] = 0
        path = root / f"{i}.png"
        image.save(path, **({"transparency": 0} if mode == "P" else {}))
        paths.append(path)
    return ImageTable(paths, np.arange(5), np.array(["train"] * 5), root)


@pytest.mark.parametrize("transform, seed", [(train_transform(16, flip=True), 3),
                                             (train_transform(24, flip=False), 0),
                                             (eval_transform(20), None)])
def test_images_decoded_once_give_the_same_items_bit_for_bit(tmp_path, transform, seed):
    table = _mixed_images(tmp_path)
    labels = np.arange(len(table))
    files = ImageDataset(table, labels, transform, seed=seed)
    once = ImageDataset(table, labels, transform, seed=seed, decode_once=2**20)
    assert files.decoded is None and once.decoded is not None
    for epoch in (0, 1, 5):
        files.set_epoch(epoch)
        once.set_epoch(epoch)
        for i in range(len(table)):
            a, b = files[i], once[i]
            assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
    assert once.decoded.nbytes == decoded_bytes(table.paths, split_fixed_head(transform)[0])


def test_decoding_once_stays_within_its_budget_and_names_a_bad_file(tmp_path):
    table = _mixed_images(tmp_path)
    need = decoded_bytes(table.paths, split_fixed_head(train_transform(16))[0])
    small = ImageDataset(table, np.arange(5), train_transform(16), seed=0, decode_once=need - 1)
    assert small.decoded is None  # over budget: each item reads its file, as before
    assert ImageDataset(table, np.arange(5), train_transform(16), seed=0,
                        decode_once=need).decoded is not None
    table.paths[2].write_bytes(b"not a png")
    broken = ImageDataset(table, np.arange(5), train_transform(16), seed=0, decode_once=need)
    assert broken.decoded is None
    with pytest.raises(DataError, match="2.png is corrupt or not an image"):
        broken[2]


def test_a_transform_without_a_fixed_head_or_tail_is_split_into_identities(tmp_path):
    """The test transform is all fixed head (its tail an Identity); a Compose that starts with a
    random step has no head to decode once, and its items read their files."""
    from torchvision.transforms import v2

    tail = split_fixed_head(eval_transform(20))[1]
    assert [type(t) for t in tail.transforms] == [v2.Identity]
    random_first = v2.Compose([v2.RandomHorizontalFlip(), v2.ToImage()])
    assert [type(t) for t in split_fixed_head(random_first)[0].transforms] == [v2.Identity]
    table = _mixed_images(tmp_path)
    dataset = ImageDataset(table, np.arange(5), random_first, seed=0, decode_once=2**20)
    assert dataset.decoded is None and dataset[1][0].dtype == torch.uint8
