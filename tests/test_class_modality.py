"""benchmarks/class_modality.py, RQ2's measure of multi-modal classes: two separated modes are
found, one Gaussian blob is not, and a class's best K is the largest K found."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from class_modality import best_k, modality


def _classes() -> tuple[np.ndarray, np.ndarray]:
    """Class 0: two modes 6 standard deviations apart along 4 of 8 dimensions; class 1: one
    Gaussian blob, as elongated; 40 rows each."""
    rng = np.random.default_rng(0)
    centre = np.zeros(8)
    centre[:4] = 3.0
    modes = np.concatenate([rng.normal(centre, 1.0, (20, 8)), rng.normal(-centre, 1.0, (20, 8))])
    blob = rng.normal(0.0, 1.0, (40, 8)) * np.where(np.arange(8) < 4, 3.0, 1.0)
    return np.concatenate([modes, blob]), np.repeat([0, 1], 40)


def test_two_modes_are_found_and_a_blob_is_not():
    x, labels = _classes()
    result = modality(x, labels, 2)
    assert result is not None and result["classes"] == 2
    assert result["found"] == [True, False]
    assert result["found_share"] == 0.5
    assert modality(x, labels, 21) is None  # no class has 42 rows


def test_best_k_is_the_largest_k_found_and_1_when_none_is():
    labels = np.repeat([0, 1, 2], [12, 12, 4])
    per_k = {2: {"found": [True, False, True]}, 3: {"found": [True, True]},
             4: {"found": [False, False]}, 5: None}
    summary = best_k(per_k, labels)  # class 2 has 4 rows: only K = 2 applies to it
    assert summary == {"share_best_k_above_1": 1.0, "mean_best_k": (3 + 3 + 2) / 3}
    assert best_k({2: {"found": [False, False, False]}}, labels)["share_best_k_above_1"] == 0.0
