"""RQ2's center usage: which of its class's centers each training example is nearest to."""

import numpy as np
import torch

from softtriple.analysis.centers import center_wins


def test_center_wins_counts_the_nearest_center_of_the_own_class():
    centers = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]],   # class 0
                            [[0.0, -1.0], [1.0, 1.0], [0.0, 2.0]]])  # class 1 (unnormalized)
    x = np.array([[2.0, 0.1], [0.1, 3.0], [1.0, 0.0], [0.0, -1.0], [0.1, 1.0], [1.0, 0.9]])
    y = np.array([0, 0, 0, 1, 1, 1])
    wins = center_wins(x, y, centers)
    # class 0: two near (1, 0), one near (0, 1); class 1: (0, -1), (0, 2), and (1, 1)
    np.testing.assert_array_equal(wins, [[2, 1, 0], [1, 1, 1]])
    assert wins.sum() == len(y)
