"""Evaluation helpers against hand-computed values."""
import math

import pytest

from instructrl.evaluate import spearman, toxic


def test_spearman_by_hand():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks a = [1, 2, 3], b with a tie = [1.5, 1.5, 3]: centred (-1, 0, 1) · (-0.5, -0.5, 1) = 1.5
    assert spearman([1, 2, 3], [5, 5, 9]) == pytest.approx(1.5 / (math.sqrt(2) * math.sqrt(1.5)))
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_toxic_matches_whole_words():
    assert toxic("Go away, you idiot.", ["idiot"])
    assert not toxic("idiotic is not in the lexicon", ["idiot"])
