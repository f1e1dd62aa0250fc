"""``fonts``: a fine-grained, CUB-like set. One class per Latin typeface **family** from Debian's
font packages; its faces (Regular, Bold, Italic, Condensed, ... and the named instances of a
variable font) are the class's modes. An image is two three-letter words in one face, fitted into
the square; the words come from one shared pool, so the same text appears in many classes and
cannot identify the class.

Families are read from the Debian packages ``PACKAGES`` (``make sources-fonts`` installs them; a
missing one is an error, as other packages would make another data set). A face counts when its
cmap covers every letter used. Families with fewer than ``MIN_FACES`` faces are dropped, and so
are clones: families whose upright face, drawn on the same reference text, correlates above
``CLONE_CORRELATION`` (pixels, after cropping to the ink and a slight blur) with a family
kept before it in name order (metric-compatible
copies such as Liberation Sans / Arimo / Nimbus Sans, or TeX Gyre Heros, are one design).
Classes split 50/50 by family name (the image-folder rule).
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from softtriple.data.builtin.base import Builtin, debian_version
from softtriple.data.table import DataError

SIZE = 96  # image side, pixels
IMAGES_PER_CLASS = 48  # spread over the faces: ceil(48 / faces) words per face
MIN_FACES = 2
MAX_INSTANCES = 6  # named instances taken from one variable font
# measured on 18 known copies (TeX Gyre vs URW, Liberation vs Croscore, FreeFont, Verana...):
# 0.88-1.00; on 13 distinct but similar designs (Noto Sans / Cantarell, Go / Arimo, ...): <= 0.89
CLONE_CORRELATION = 0.88
REFERENCE_TEXT = "Hamburgefonstiv Rag 0123"
WORDS = ("art bay cog dew elm fig gym hut ink jaw key lux mop nod oak pyx quo rye sky tux urn "
         "vex wax yak zip Ace Bog Cut Dip Eve Fox Gap Hum Ivy Jet Kit Lab Mud Net Orb Pub Quiz "
         "Rex Sun Toy Urb Vow Wig Xen Yew Zoo").split()
PACKAGES = (
    "fonts-adf-accanthis fonts-adf-baskervald fonts-adf-berenis fonts-adf-gillius "
    "fonts-adf-ikarius fonts-adf-irianis fonts-adf-libris fonts-adf-mekanus fonts-adf-oldania "
    "fonts-adf-romande fonts-adf-solothurn fonts-adf-switzera fonts-adf-tribun "
    "fonts-adf-universalis fonts-adf-verana fonts-urw-base35 fonts-texgyre fonts-liberation "
    "fonts-liberation2 fonts-croscore fonts-freefont-ttf fonts-dejavu-core fonts-dejavu-extra "
    "fonts-noto-core fonts-roboto-unhinted fonts-roboto-slab fonts-open-sans fonts-lato "
    "fonts-cantarell fonts-ebgaramond fonts-linuxlibertine fonts-sil-gentium "
    "fonts-sil-gentium-basic fonts-sil-charis fonts-sil-andika fonts-go fonts-hack "
    "fonts-crosextra-carlito fonts-crosextra-caladea fonts-cmu fonts-paratype fonts-oldstandard "
    "fonts-vollkorn fonts-cabin fonts-dosis fonts-karla fonts-quattrocento fonts-stix "
    "fonts-cardo fonts-averia-gwf fonts-averia-sans-gwf fonts-averia-serif-gwf fonts-lobstertwo "
    "fonts-yanone-kaffeesatz fonts-b612 fonts-courier-prime fonts-fantasque-sans "
    "fonts-mononoki fonts-clear-sans fonts-play fonts-tuffy fonts-gfs-artemisia fonts-gfs-didot "
    "fonts-gfs-neohellenic fonts-oxygen fonts-anonymous-pro fonts-opendyslexic fonts-comic-neue "
    "fonts-jura fonts-junicode fonts-alee fonts-arkpandora fonts-century-catalogue "
    "fonts-fanwood fonts-prociono fonts-isabella fonts-levien-museum fonts-lindenhill "
    "fonts-femkeklaver fonts-gemunu-libre fonts-uralic fonts-komatuna fonts-elstob "
    "fonts-comfortaa fonts-quicksand fonts-firacode fonts-jetbrains-mono fonts-inconsolata "
    "fonts-monoid").split()
FONT_SUFFIXES = (".ttf", ".otf")
TEST_PACKAGES = ("fonts-liberation", "fonts-croscore")  # two small ones with clones, for tests


@dataclass(frozen=True)
class Face:
    family: str
    style: str
    path: str
    package: str
    instance: bytes | None = None  # a variable font's named instance

    def font(self, size: int) -> ImageFont.FreeTypeFont:
        font = ImageFont.truetype(self.path, size)
        if self.instance is not None:
            font.set_variation_by_name(self.instance)
        return font


def installed(package: str) -> bool:
    return bool(package_files(package))


def missing_packages(packages: tuple[str, ...] | list[str] = PACKAGES) -> list[str]:
    return [p for p in packages if not installed(p)]


def package_files(package: str) -> list[Path]:
    """The font files (.ttf, .otf) an installed Debian package ships; [] when not installed."""
    if shutil.which("dpkg-query") is None:
        return []
    done = subprocess.run(["dpkg-query", "-L", package], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        return []
    return sorted(Path(line) for line in done.stdout.splitlines()
                  if line.lower().endswith(FONT_SUFFIXES) and Path(line).is_file())


def _licence(package: str) -> str:
    copyright_file = Path("/usr/share/doc") / package / "copyright"
    if not copyright_file.is_file():
        return "unknown"
    for line in copyright_file.read_text(errors="replace").splitlines():
        if line.startswith("License:") and line.split(":", 1)[1].strip():
            return line.split(":", 1)[1].strip()
    return "see /usr/share/doc/" + package + "/copyright"


def _covers(path: Path, letters: set[int]) -> bool:
    from fontTools.ttLib import TTFont

    try:
        cmap = TTFont(str(path), lazy=True, fontNumber=0).getBestCmap() or {}
    except Exception:  # a file fontTools cannot read is not a usable face
        return False
    return letters <= set(cmap)


def faces(packages: list[str]) -> list[Face]:
    """Every usable face of the installed ``packages``, de-duplicated by (family, style)."""
    letters = {ord(c) for c in "".join(WORDS) + REFERENCE_TEXT if not c.isspace()}
    found: dict[tuple[str, str], Face] = {}
    for package in packages:
        for path in package_files(package):
            if not _covers(path, letters):
                continue
            try:
                font = ImageFont.truetype(str(path), 24)
                family, style = font.getname()
            except OSError:
                continue
            if not family:
                continue
            try:
                instances = font.get_variation_names()
            except OSError:
                instances = []
            if instances:
                step = max(1, math.ceil(len(instances) / MAX_INSTANCES))
                for name in instances[::step]:
                    key = (family, name.decode(errors="replace"))
                    found.setdefault(key, Face(family, key[1], str(path), package, name))
            else:
                found.setdefault((family, style or "Regular"),
                                 Face(family, style or "Regular", str(path), package))
    return sorted(found.values(), key=lambda f: (f.family, f.style))


def _regular(members: list[Face]) -> Face:
    """The family's upright text face (Regular, Book, Roman, Light...), else its first."""
    for wanted in ("regular", "book", "roman", "normal", "light", "medium"):
        for face in members:
            if face.style.lower() == wanted:
                return face
    return members[0]


def _reference(face: Face) -> np.ndarray:
    """The reference text at 40 px, cropped to its ink, scaled to 600 x 40 and blurred (radius
    0.7 px, so that hinting and sub-pixel offsets do not hide a copied design): (24000,)."""
    image = Image.new("L", (1200, 80), 0)
    ImageDraw.Draw(image).text((4, 8), REFERENCE_TEXT, fill=255, font=face.font(40))
    box = image.getbbox() or (0, 0, 1200, 80)
    image = image.crop(box).resize((600, 40), Image.Resampling.BILINEAR)
    return np.asarray(image.filter(ImageFilter.GaussianBlur(0.7)), dtype=np.float64).ravel()


def drop_clones(families: dict[str, list[Face]]) -> tuple[list[str], list[str]]:
    """Families in name order, dropping any whose regular face correlates above
    CLONE_CORRELATION with a kept family's: (kept, ['X (like Y: 0.97)', ...])."""
    kept: list[str] = []
    dropped: list[str] = []
    inks: dict[str, np.ndarray] = {}
    for name in sorted(families):
        ink = _reference(_regular(families[name]))
        like = [(float(np.corrcoef(ink, inks[k])[0, 1]), k) for k in kept]
        worst = max(like, default=(0.0, ""))
        if worst[0] > CLONE_CORRELATION:
            dropped.append(f"{name} (like {worst[1]}: {worst[0]:.2f})")
            continue
        kept.append(name)
        inks[name] = ink
    return kept, dropped


def render(face: Face, text: str) -> Image.Image | None:
    """``text`` (may hold a newline) in ``face``, black on white, fitted into SIZE x SIZE with a
    4-pixel margin, aspect kept; None when nothing is drawn."""
    font = face.font(64)
    canvas = Image.new("L", (640, 320), 0)
    ImageDraw.Draw(canvas).multiline_text((20, 20), text, fill=255, font=font, align="center",
                                          spacing=8)
    box = canvas.getbbox()
    if box is None:
        return None
    ink = canvas.crop(box)
    scale = (SIZE - 8) / max(ink.size)
    ink = ink.resize((max(1, round(ink.width * scale)), max(1, round(ink.height * scale))),
                     Image.Resampling.LANCZOS)
    out = Image.new("L", (SIZE, SIZE), 0)
    out.paste(ink, ((SIZE - ink.width) // 2, (SIZE - ink.height) // 2))
    return Image.eval(out, lambda v: 255 - v).convert("RGB")


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "x"


def build(folder: Path, packages: list[str] | None = None) -> dict[str, Any]:
    chosen = list(PACKAGES if packages is None else packages)
    present = [p for p in chosen if installed(p)]
    missing = [p for p in chosen if p not in present]
    if missing:  # another set of packages would be another data set
        raise DataError(f"fonts needs {len(missing)} more Debian font package(s) "
                        f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}); "
                        f"install them with `make sources-fonts` (or apt-get install)")
    by_family: dict[str, list[Face]] = {}
    for face in faces(present):
        by_family.setdefault(face.family, []).append(face)
    few = sorted(f for f, members in by_family.items() if len(members) < MIN_FACES)
    families = {f: m for f, m in by_family.items() if len(m) >= MIN_FACES}
    kept, clones = drop_clones(families)
    rng = np.random.default_rng(0)
    images = 0
    rows: list[dict[str, Any]] = []
    for name in kept:
        members = families[name]
        per_face = math.ceil(IMAGES_PER_CLASS / len(members))
        out = folder / slug(name)
        out.mkdir(parents=True, exist_ok=True)
        made, texts = 0, []
        for face in members:
            for i in range(per_face):
                first, second = rng.choice(len(WORDS), 2, replace=False)
                image = render(face, f"{WORDS[first]}\n{WORDS[second]}")
                if image is None:
                    continue
                image.save(out / f"{slug(face.style)}_{i:02d}.png")
                made += 1
                texts.append(f"{WORDS[first]} {WORDS[second]}")
        images += made
        rows.append({"family": name, "faces": [f.style for f in members], "images": made,
                     "packages": sorted({f.package for f in members}), "texts": texts})
    used = sorted({p for row in rows for p in row["packages"]})
    return {
        "sources": [{"package": p, "version": debian_version(p), "licence": _licence(p)}
                    for p in used],
        "families": rows, "classes": len(rows), "images": images,
        "dropped_clones": clones, "dropped_single_face": few,
        "clone_correlation": CLONE_CORRELATION, "min_faces": MIN_FACES,
        "text": "two words of " + ", ".join(WORDS),
    }


BUILTIN = Builtin("fonts", "Latin typeface families (Debian fonts), faces as modes, two words an "
                  "image; 50/50 class split", build)
