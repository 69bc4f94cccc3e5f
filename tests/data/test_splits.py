"""Held-out splits as pure functions: stratified shares, no class emptied, groups kept whole, seeds."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data import splits
from pipeline.errors import ConfigError
from pipeline.sources.base import InputError


def test_stratified_shares_settle_rounding_by_largest_remainder():
    odd = splits.hold_out(np.array([0] * 7 + [1] * 3), 5, 0)  # shares 3.5 and 1.5: one more for the first class
    assert (int((odd < 7).sum()), int((odd >= 7).sum())) == (4, 1)


def test_no_class_is_held_out_whole():
    labels = np.array([0] * 20 + [1] + [2] * 2)  # a class of one case would take the remainder's place
    held = splits.hold_out(labels, 3, 0)
    assert len(held) == 3 and 20 not in held and (labels[held] == 2).sum() <= 1


def test_groups_stay_whole_and_seeds_differ():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 600)
    groups = np.arange(600) // 20
    codes, made = splits.assign(labels, groups.astype(str), None, 0.2, 0.1, seed=0)
    for g in np.unique(groups):
        assert len(set(codes[groups == g])) == 1
    assert made["test"].grouped_by == "group" and abs((codes == splits.TEST).sum() - 120) <= 20
    other, _ = splits.assign(labels, groups.astype(str), None, 0.2, 0.1, seed=1)
    assert not np.array_equal(codes, other)


def test_a_source_split_that_leaks_a_group_is_refused():
    given = np.array([splits.TRAIN, splits.TEST, splits.TRAIN, splits.TEST])
    with pytest.raises(InputError, match="group 'a' has cases in both the train and test"):
        splits.assign(np.array([0, 1, 0, 1]), np.array(["a", "a", "b", "c"]), given, 0.2, 0, seed=0)


@pytest.mark.parametrize("size", [1.5, 100, -1])
def test_impossible_sizes_are_config_errors(size):
    with pytest.raises(ConfigError, match="--test-size"):
        splits.assign(np.arange(100) % 2, None, None, size, 0.1, seed=0)
