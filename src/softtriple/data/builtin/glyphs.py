"""``glyphs``: CJK characters drawn in clearly different typefaces from Debian font packages
(Ming/Song, Mincho, Hei, Gothic, Kai, handwriting and rounded styles). One class per character,
one image per typeface that really draws it (in its cmap, not blank, not its .notdef box);
near-duplicate typefaces are dropped. Characters: the 3,755 of GB2312 level 1, kept when at least
``MIN_FONTS`` typefaces draw them; classes split 50/50 by code point."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from softtriple.data.builtin.base import Builtin, debian_version
from softtriple.data.table import DataError

SIZE = 64  # image side, pixels
MIN_FONTS = 4
DUPLICATE_CORRELATION = 0.9  # typefaces this alike (mean pixel correlation) count as one


@dataclass(frozen=True)
class Typeface:
    name: str
    package: str
    path: str
    style: str
    licence: str
    index: int = 0


TYPEFACES = [
    Typeface("uming", "fonts-arphic-uming", "/usr/share/fonts/truetype/arphic/uming.ttc",
             "Ming (Song)", "Arphic Public License"),
    Typeface("ipamincho", "fonts-ipafont-mincho",
             "/usr/share/fonts/opentype/ipafont-mincho/ipam.ttf", "Mincho", "IPA Font License"),
    Typeface("hanamin", "fonts-hanazono", "/usr/share/fonts/truetype/hanazono/HanaMinA.ttf",
             "Mincho", "Hanazono Font License / OFL"),
    Typeface("zenhei", "fonts-wqy-zenhei", "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
             "Hei", "GPL-2 with font exception"),
    Typeface("ipagothic", "fonts-ipafont-gothic",
             "/usr/share/fonts/opentype/ipafont-gothic/ipag.ttf", "Gothic", "IPA Font License"),
    Typeface("ukai", "fonts-arphic-ukai", "/usr/share/fonts/truetype/arphic/ukai.ttc", "Kai",
             "Arphic Public License"),
    Typeface("wenkai", "fonts-lxgw-wenkai",
             "/usr/share/fonts/truetype/lxgw-wenkai/LXGWWenKai-Regular.ttf", "Kai (handwritten)",
             "OFL-1.1"),
    Typeface("klee", "fonts-klee", "/usr/share/fonts/truetype/klee/KleeOne-Regular.ttf",
             "pen handwriting", "OFL-1.1"),
    Typeface("seto", "fonts-seto", "/usr/share/fonts/truetype/seto/setofont.ttf",
             "handwriting", "OFL-1.1"),
    Typeface("yen", "fonts-cwtex-yen", "/usr/share/fonts/truetype/cwtex/cwyen.ttf", "rounded",
             "GPL-2 with font exception"),
]
INSTALL = "apt-get install " + " ".join(t.package for t in TYPEFACES)


def missing_packages() -> list[str]:
    """The Debian packages of TYPEFACES whose font file is not installed."""
    return [t.package for t in TYPEFACES if not Path(t.path).is_file()]


def characters() -> list[str]:
    """GB2312 level-1 hanzi (rows 16-55), in the standard's order."""
    return _all_characters()


def _all_characters() -> list[str]:
    out = []
    for row in range(0xB0, 0xD8):
        for cell in range(0xA1, 0xFF):
            try:
                out.append(bytes([row, cell]).decode("gb2312"))
            except UnicodeDecodeError:
                continue
    return out


def render(font: ImageFont.FreeTypeFont, char: str) -> np.ndarray | None:
    """(SIZE, SIZE) uint8 ink (0 = paper) of ``char`` centered, or None when blank."""
    left, top, right, bottom = font.getbbox(char)
    if right <= left or bottom <= top:
        return None
    image = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(image).text(((SIZE - (right - left)) / 2 - left,
                                (SIZE - (bottom - top)) / 2 - top), char, fill=255, font=font)
    ink = np.asarray(image)
    return ink if ink.max() > 0 else None


def _cmap(face: Typeface) -> set[int]:
    from fontTools.ttLib import TTFont

    font = TTFont(face.path, fontNumber=face.index, lazy=True)
    return set(font.getBestCmap() or {})


def build(folder: Path, limit: int | None = None) -> dict[str, Any]:
    missing = missing_packages()
    if missing:
        raise DataError(f"glyphs needs the Debian font packages {', '.join(missing)}; install "
                        f"them with: {INSTALL}")
    chars = characters()[:limit]  # looked up at call time, so a test can shrink it
    fonts = {t.name: ImageFont.truetype(t.path, int(SIZE * 0.8), index=t.index)
             for t in TYPEFACES}
    cmaps = {t.name: _cmap(t) for t in TYPEFACES}
    inks: dict[str, dict[str, np.ndarray]] = {t.name: {} for t in TYPEFACES}
    for t in TYPEFACES:
        notdef = render(fonts[t.name], "\U0010fffd")  # a code point no font here draws
        for char in chars:
            if ord(char) not in cmaps[t.name]:
                continue
            ink = render(fonts[t.name], char)
            if ink is not None and (notdef is None or not np.array_equal(ink, notdef)):
                inks[t.name][char] = ink
    kept, dropped = _drop_near_duplicates(inks)
    counts: dict[str, int] = {name: 0 for name in kept}
    classes = 0
    for char in chars:
        drawn = [name for name in kept if char in inks[name]]
        if len(drawn) < MIN_FONTS:
            continue
        classes += 1
        out = folder / f"u{ord(char):05x}"
        out.mkdir(parents=True, exist_ok=True)
        for name in drawn:
            Image.fromarray(255 - inks[name][char]).save(out / f"{name}.png")
            counts[name] += 1
    by_name = {t.name: t for t in TYPEFACES}
    return {
        "sources": [{"package": by_name[n].package, "version": debian_version(by_name[n].package),
                     "file": by_name[n].path, "style": by_name[n].style,
                     "licence": by_name[n].licence, "images": counts[n]} for n in kept],
        "dropped_near_duplicates": dropped, "classes": classes,
        "images": sum(counts.values()), "min_fonts_per_class": MIN_FONTS,
    }


def _drop_near_duplicates(inks: dict[str, dict[str, np.ndarray]]) -> tuple[list[str], list[str]]:
    """Keep typefaces in order, dropping any whose drawings correlate above the threshold with a
    kept one (mean over up to 200 shared characters)."""
    kept: list[str] = []
    dropped: list[str] = []
    for name in inks:
        duplicate = False
        for other in kept:
            shared = sorted(set(inks[name]) & set(inks[other]))[:200]
            if not shared:
                continue
            corr = np.mean([np.corrcoef(inks[name][c].ravel(), inks[other][c].ravel())[0, 1]
                            for c in shared])
            if corr > DUPLICATE_CORRELATION:
                duplicate = True
                dropped.append(f"{name} (like {other}: {corr:.2f})")
                break
        if not duplicate:
            kept.append(name)
    return kept, dropped


BUILTIN = Builtin("glyphs", "CJK characters in up to 10 typefaces (Debian fonts); 50/50 class "
                  "split", build)
