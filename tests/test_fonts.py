"""The built-in fonts set, built from two small Debian font packages: classes are whole typeface
families split disjointly, metric-compatible clones are dropped, and texts repeat across classes."""

from __future__ import annotations

import json
from itertools import combinations

import numpy as np
import pytest

from softtriple.data.builtin import fonts, prepare
from softtriple.data.formats import read_folder

PACKAGES = list(fonts.TEST_PACKAGES)  # Liberation and its metric clones (Croscore)


def test_missing_packages_are_one_clear_error(tmp_path, monkeypatch):
    from softtriple.data import DataError
    monkeypatch.setattr(fonts, "PACKAGES", ("fonts-no-such-package",))
    with pytest.raises(DataError, match=r"1 more Debian font package\(s\) \(fonts-no-such-"
                                        r"package\); install them with `make sources-fonts`"):
        prepare("fonts", tmp_path)


@pytest.mark.skipif(bool(fonts.missing_packages(PACKAGES)),
                    reason="needs the Debian packages fonts-liberation and fonts-croscore "
                           "(make sources installs them)")
def test_fonts_from_two_packages_drops_clones_and_splits_families(tmp_path, monkeypatch):
    monkeypatch.setattr(fonts, "PACKAGES", tuple(PACKAGES))
    folder = prepare("fonts", tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    families = {row["family"]: row for row in manifest["families"]}
    # Arimo / Liberation Sans, Cousine / Liberation Mono, Tinos / Liberation Serif are copies
    for a, b in [("Arimo", "Liberation Sans"), ("Cousine", "Liberation Mono"),
                 ("Liberation Serif", "Tinos")]:
        assert (a in families) != (b in families), (a, b)
    assert any("like" in d for d in manifest["dropped_clones"])
    by_family: dict[str, list[fonts.Face]] = {}
    for face in fonts.faces(PACKAGES):
        by_family.setdefault(face.family, []).append(face)
    for a, b in combinations(families, 2):
        ink_a, ink_b = (fonts._reference(fonts._regular(by_family[f])) for f in (a, b))
        assert np.corrcoef(ink_a, ink_b)[0, 1] <= fonts.CLONE_CORRELATION
    assert all(len(row["faces"]) >= fonts.MIN_FACES for row in families.values())
    assert all(row["images"] >= 40 for row in families.values())
    assert {s["package"] for s in manifest["sources"]} <= set(PACKAGES)
    table = read_folder(folder, 0.5)
    table.check_disjoint()
    train = {table.class_names[c] for c in table.labels[table.splits == "train"].tolist()}
    test = {table.class_names[c] for c in table.labels[table.splits == "test"].tolist()}
    assert train and test and not train & test
    assert sorted(train)[-1] < sorted(test)[0]  # split by family name
    # one pool of words for every family: each word is drawn in several classes
    words = [{w for t in row["texts"] for w in t.split()} for row in families.values()]
    shared = set.intersection(*words)
    assert len(shared) >= 10, shared
