"""Readers for the on-disk formats of the paper's benchmarks and for generic folders and CSVs.

Each returns an ImageTable with the standard class-disjoint metric-learning split:
- CUB-200-2011: ``images.txt``, ``image_class_labels.txt``, ``images/``; classes 1-100 train,
  101-200 test.
- Cars196: ``cars_annos.mat`` and ``car_ims/``; classes 1-98 train, 99-196 test (the file's own
  ``test`` flag is the classification split and is ignored).
- Stanford Online Products: ``Ebay_train.txt`` and ``Ebay_test.txt`` (``image_id class_id
  super_class_id path``), paths relative to the root.
- folder: one subfolder per class; classes split by sorted name, the first ``train_fraction``
  for training.
- csv: ``path,label[,split]`` with a header; paths relative to the CSV's folder.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import numpy as np

from softtriple.data.table import DataError, ImageTable

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _require(path: Path, what: str, fmt: str) -> Path:
    if not path.exists():
        raise DataError(f"{path} not found: is {path.parent} a {fmt} folder? it should hold {what}")
    return path


def _root(root: str | Path) -> Path:
    path = Path(root).expanduser().resolve()
    if not path.is_dir():
        raise DataError(f"data set root {path} does not exist or is not a folder")
    return path


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not a text file (byte {error.start} is not UTF-8); "
                        f"restore it from the data set's archive") from error


def _rows(path: Path, columns: int, integer: tuple[int, ...] = ()) -> list[list[str]]:
    """The whitespace-separated rows of a listing, each with ``columns`` fields, those at the
    positions ``integer`` checked to be integers; DataError names the file and the line."""
    rows = []
    for number, line in enumerate(_text(path).splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != columns:
            raise DataError(f"{path}:{number}: expected {columns} fields, got {len(parts)}: "
                            f"{line.strip()[:80]!r}")
        for position in integer:
            if not parts[position].lstrip("-").isdigit():
                raise DataError(f"{path}:{number}: field {position + 1} must be an integer; "
                                f"got {parts[position][:40]!r}")
        rows.append(parts)
    return rows


def read_cub(root: str | Path) -> ImageTable:
    """CUB-200-2011 (Wah et al. 2011): classes 1-100 train (5,864 images), 101-200 test (5,924)."""
    base = _root(root)
    what = "images.txt, image_class_labels.txt and images/"
    images = dict(_rows(_require(base / "images.txt", what, "CUB-200-2011"), 2, (0,)))
    labels = dict(_rows(_require(base / "image_class_labels.txt", what, "CUB-200-2011"), 2,
                        (0, 1)))
    if set(images) != set(labels):
        odd = sorted(set(images) ^ set(labels))[0]
        raise DataError(f"image id {odd} is in only one of images.txt and image_class_labels.txt")
    ids = sorted(images, key=int)
    y = np.array([int(labels[i]) for i in ids])
    classes = base / "classes.txt"  # "1 001.Black_footed_Albatross": names, when present
    names = {int(c): n for c, n in _rows(classes, 2, (0,))} if classes.is_file() else {}
    table = ImageTable([base / "images" / images[i] for i in ids], y,
                       np.where(y <= 100, "train", "test"), base, names)
    table.check_files()
    return table


def read_cars(root: str | Path) -> ImageTable:
    """Cars196 (Krause et al. 2013): classes 1-98 train (8,054 images), 99-196 test (8,131)."""
    from scipy.io import loadmat

    base = _root(root)
    mat_path = _require(base / "cars_annos.mat", "cars_annos.mat and car_ims/", "Cars196")
    try:
        mat = loadmat(str(mat_path), squeeze_me=True)
        annotations = mat["annotations"]
        paths = [base / str(a["relative_im_path"]) for a in annotations]
        y = np.array([int(a["class"]) for a in annotations])
    except (ValueError, KeyError, IndexError, TypeError) as error:
        raise DataError(f"{mat_path} is not a readable cars_annos.mat ({error}); "
                        f"download it again") from error
    names = {i + 1: str(n) for i, n in enumerate(np.atleast_1d(mat.get("class_names", [])))}
    table = ImageTable(paths, y, np.where(y <= 98, "train", "test"), base, names)
    table.check_files()
    return table


def read_sop(root: str | Path) -> ImageTable:
    """Stanford Online Products (Song et al. 2016): Ebay_train.txt (11,318 classes, 59,551
    images) and Ebay_test.txt (11,316 classes, 60,502 images)."""
    base = _root(root)
    paths: list[Path] = []
    labels: list[int] = []
    splits: list[str] = []
    for split in ("train", "test"):
        listing = _require(base / f"Ebay_{split}.txt", "Ebay_train.txt and Ebay_test.txt",
                           "Stanford Online Products")
        rows = _rows(listing, 4)
        if not rows or rows[0][0] != "image_id":
            raise DataError(f"{listing}: first line must be the header "
                            f"'image_id class_id super_class_id path'")
        for row in rows[1:]:
            paths.append(base / row[3])
            labels.append(int(row[1]))
            splits.append(split)
    table = ImageTable(paths, np.array(labels), np.array(splits), base)
    table.check_files()
    return table


def read_folder(root: str | Path, train_fraction: float = 0.5) -> ImageTable:
    """One subfolder per class; the first ``train_fraction`` of classes by sorted name train."""
    base = _root(root)
    if not 0.0 < train_fraction < 1.0:
        raise DataError(f"train_fraction must be in (0, 1); got {train_fraction}")
    classes = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise DataError(f"{base} holds {len(classes)} class folder(s); an image folder needs one "
                        f"subfolder per class and at least two classes")
    n_train = min(max(1, round(len(classes) * train_fraction)), len(classes) - 1)
    paths, labels, splits = [], [], []
    for index, folder in enumerate(classes):
        images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        paths += images
        labels += [index] * len(images)
        splits += ["train" if index < n_train else "test"] * len(images)
    if not paths:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {base}")
    return ImageTable(paths, np.array(labels), np.array(splits), base,
                      {i: f.name for i, f in enumerate(classes)})


def read_csv(path: str | Path, train_fraction: float = 0.5) -> ImageTable:
    """A CSV with header ``path,label[,split]``; without a split column, classes are split by
    sorted label at ``train_fraction``."""
    csv_path = Path(path).expanduser().resolve()
    if csv_path.is_dir():
        csv_path = csv_path / "images.csv"
    if not csv_path.is_file():
        raise DataError(f"CSV file {csv_path} not found")
    reader = csv.DictReader(_text(csv_path).splitlines())
    fields = reader.fieldnames or []
    if "path" not in fields or "label" not in fields:
        raise DataError(f"{csv_path}: header must be path,label[,split]; "
                        f"got {','.join(fields)}")
    rows = []
    for row in reader:
        where = f"{csv_path}:{reader.line_num}"
        if any(row.get(name) in (None, "") for name in fields):
            missing = [name for name in fields if row.get(name) in (None, "")]
            raise DataError(f"{where}: no {', '.join(missing)} (every row needs "
                            f"{','.join(fields)})")
        if not str(row["label"]).strip().lstrip("-").isdigit():
            raise DataError(f"{where}: label must be an integer; got {row['label'][:40]!r}")
        rows.append(row)
    y = np.array([int(r["label"]) for r in rows], dtype=np.int64)
    if "split" in fields:
        splits = np.array([r["split"] for r in rows])
    else:
        classes = np.unique(y)
        n_train = min(max(1, round(len(classes) * train_fraction)), len(classes) - 1)
        splits = np.where(np.isin(y, classes[:n_train]), "train", "test")
    table = ImageTable([csv_path.parent / r["path"] for r in rows], y, splits, csv_path.parent)
    table.check_files()
    return table


def read_builtin(name: str | Path) -> ImageTable:
    """A built-in data set by name (softtriple.data.builtin), prepared under the data root
    first when it is not there yet; its classes split at the set's own fraction."""
    from softtriple.data.builtin import BUILTINS, default_root, prepare, prepared

    name = str(name)
    if name not in BUILTINS:
        raise DataError(f"unknown built-in data set {name!r}; valid: {', '.join(BUILTINS)}")
    if prepared(name) is None:
        prepare(name)
    return read_folder(default_root() / name, BUILTINS[name].train_fraction)


FORMATS: dict[str, Callable[..., ImageTable]] = {
    "builtin": read_builtin, "cub": read_cub, "cars": read_cars, "sop": read_sop,
    "folder": read_folder, "csv": read_csv,
}
SPLIT_BY_FRACTION = ("folder", "csv")  # the formats whose classes split at train_fraction


def read_table(fmt: str, root: str | Path, train_fraction: float = 0.5,
               check_disjoint: bool = True) -> ImageTable:
    """Read a data set in format ``fmt`` (one of FORMATS) from ``root`` (a built-in set's name
    for ``builtin``); ``train_fraction`` splits the classes of the formats without a split of
    their own (folder, csv)."""
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}; valid: {', '.join(FORMATS)}")
    reader = FORMATS[fmt]
    table = reader(root, train_fraction) if fmt in SPLIT_BY_FRACTION else reader(root)
    if check_disjoint:
        table.check_disjoint()
    return table
