"""Results over seeds: the seed list, mean ± std, metric blocks, differences against the noise."""

from __future__ import annotations

import math

import pytest

from pipeline.evaluation.seeds import (
    compare,
    format_mean_std,
    mean_block,
    seed_list,
    spread,
)


def test_seed_list_is_consecutive_and_refuses_nonsense():
    assert seed_list(0, 3) == [0, 1, 2]
    assert seed_list(7, 1) == [7]
    with pytest.raises(ValueError, match="seeds=0"):
        seed_list(0, 0)


def test_spread_of_identical_seeds_is_zero_and_keeps_every_value():
    s = spread([25.0, 25.0, 25.0])
    assert s.mean == 25.0 and s.std == 0.0 and s.values == (25.0, 25.0, 25.0) and s.n == 3
    one = spread([3.5])
    assert one.mean == 3.5 and one.std == 0.0 and one.format() == "3.5"  # no ± for one value


def test_spread_is_the_sample_std_and_skips_undefined_values():
    s = spread([1.0, 2.0, 3.0, None, float("nan")])
    assert s.mean == pytest.approx(2.0) and s.std == pytest.approx(1.0)  # ddof = 1
    assert s.n == 5 and s.values[3] is None and s.values[4] is None
    assert s.format() == "2.0 ± 1.0"
    assert spread([None, None]).format() == "-" and spread([]).mean is None
    assert format_mean_std(27.14, 0.91, 3) == "27.1 ± 0.9"


def test_mean_block_averages_numbers_and_per_class_lists():
    blocks = [{"cluster_miou": 20.0, "per_class_iou": {"cluster": [10.0, None]}, "tag": "a"},
              {"cluster_miou": 30.0, "per_class_iou": {"cluster": [20.0, None]}, "tag": "a"},
              {"cluster_miou": 25.0, "per_class_iou": {"cluster": [30.0, None]}, "tag": "a"}]
    m = mean_block(blocks)
    assert m["cluster_miou"] == pytest.approx(25.0) and m["cluster_miou_std"] == pytest.approx(5.0)
    assert m["per_class_iou"]["cluster"] == [pytest.approx(20.0), None]
    assert m["per_class_iou_std"]["cluster"] == [pytest.approx(10.0), None]
    assert m["tag"] == "a"
    same = mean_block([blocks[0]] * 4)
    assert same["cluster_miou"] == 20.0 and same["cluster_miou_std"] == 0.0
    with pytest.raises(ValueError):
        mean_block([])


def test_compare_measures_the_difference_in_std_of_single_runs():
    frozen, trained = spread([27.0, 27.2, 26.8]), spread([30.0, 31.0, 29.0])
    d = compare(frozen, trained)
    assert d.delta == pytest.approx(3.0)
    assert d.std == pytest.approx(math.sqrt(0.2 ** 2 + 1.0 ** 2))
    assert d.exceeds and "(> 2 std)" in d.format()
    noisy = compare(frozen, spread([26.0, 30.0, 28.0]))
    assert not noisy.exceeds and "std)" not in noisy.format()
    assert compare(spread([None]), trained).format() == "-"
