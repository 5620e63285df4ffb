"""AP@t and precision@t (KeyVID App. D), hand-worked."""

import math

from avsync.core.metrics import average_precision_at, match_rate, precision_at, precision_rate


def test_match_rate_hand_worked():
    gt, pred = [5, 20, 40], [7, 21, 30]
    assert match_rate(gt, pred, 1) == 1 / 3        # only 20 (21 is 1 away)
    assert match_rate(gt, pred, 2) == 2 / 3        # 5 (7) and 20
    assert match_rate(gt, pred, 10) == 1.0         # 40 (30)
    assert precision_rate(gt, pred, 2) == 2 / 3    # 7 and 21; 30 is 10 from 40
    assert precision_rate(gt, [5, 5, 6], 0) == 2 / 3


def test_edge_cases_follow_the_released_evaluation():
    assert match_rate([], [1, 2], 3) == 0.5
    assert match_rate([1], [], 3) == 0.0
    assert precision_rate([1], [], 3) == 0.5
    assert precision_rate([], [1], 3) == 0.0


def test_average_over_instances():
    inst = [([5, 20], [5, 21]), ([10], [30]), ([], [3])]
    assert math.isclose(average_precision_at(inst, 1), (1.0 + 0.0 + 0.5) / 3)
    assert math.isclose(precision_at(inst, 1), (1.0 + 0.0 + 0.0) / 3)
    assert math.isnan(average_precision_at([], 3))
