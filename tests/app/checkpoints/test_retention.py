"""The retention rule: which steps `keep_checkpoints` keeps, case by case."""

from __future__ import annotations

import math

from app.checkpoints.retention import Candidate, ranking, steps_to_keep


def evaluated(*pairs: tuple[int, float | None]) -> list[Candidate]:
    """Checkpoints with eval losses; train losses that would rank them the other way."""
    return [Candidate(step, 1.0 / step, value) for step, value in pairs]


def trained(*pairs: tuple[int, float | None]) -> list[Candidate]:
    """Checkpoints of a job without evaluation: train losses only."""
    return [Candidate(step, value, None) for step, value in pairs]


def test_last_only_keeps_the_newest_steps() -> None:
    checkpoints = trained((1, 0.1), (2, 0.2), (3, 0.3), (4, 0.4))
    # best 0 still keeps the single best: step 1
    assert steps_to_keep(checkpoints, last=2, best=0) == {1, 3, 4}


def test_last_one_best_zero_keeps_the_latest_and_the_best() -> None:
    checkpoints = evaluated((2, 0.5), (4, 0.2), (6, 0.9))
    assert steps_to_keep(checkpoints, last=1, best=0) == {4, 6}


def test_the_latest_is_kept_when_it_is_also_the_best() -> None:
    checkpoints = evaluated((2, 0.5), (4, 0.4), (6, 0.1))
    assert steps_to_keep(checkpoints, last=1, best=0) == {6}
    assert steps_to_keep(checkpoints, last=1, best=1) == {6}


def test_best_m_keeps_the_m_lowest_eval_losses() -> None:
    checkpoints = evaluated((1, 0.7), (2, 0.3), (3, 0.5), (4, 0.1), (5, 0.9), (6, 0.8))
    assert steps_to_keep(checkpoints, last=1, best=2) == {2, 4, 6}
    assert steps_to_keep(checkpoints, last=1, best=3) == {2, 3, 4, 6}


def test_eval_loss_ranks_even_when_train_loss_says_otherwise() -> None:
    # Train losses fall with the step (1/step); eval losses rise.
    checkpoints = evaluated((1, 0.1), (2, 0.2), (3, 0.3))
    assert [c.step for c in ranking(checkpoints)] == [1, 2, 3]


def test_ties_go_to_the_newer_step() -> None:
    checkpoints = evaluated((2, 0.5), (3, 0.5), (4, 0.5), (5, 0.9))
    assert [c.step for c in ranking(checkpoints)] == [4, 3, 2, 5]
    assert steps_to_keep(checkpoints, last=1, best=2) == {3, 4, 5}


def test_checkpoints_before_the_first_evaluation_are_not_ranked() -> None:
    # Steps 1 and 2 came before the first eval; their low train losses do not count.
    before = [Candidate(1, 0.01, None), Candidate(2, 0.02, None)]
    checkpoints = [*before, *evaluated((3, 0.6), (4, 0.4), (5, 0.5))]
    assert [c.step for c in ranking(checkpoints)] == [4, 5, 3]
    assert steps_to_keep(checkpoints, last=1, best=5) == {3, 4, 5}


def test_without_any_evaluation_train_loss_ranks() -> None:
    checkpoints = trained((1, 0.9), (2, 0.3), (3, None), (4, 0.6))
    assert [c.step for c in ranking(checkpoints)] == [2, 4, 1]
    assert steps_to_keep(checkpoints, last=1, best=1) == {2, 4}


def test_without_any_ranking_value_only_the_newest_are_kept() -> None:
    checkpoints = trained((1, None), (2, None), (3, None))
    assert ranking(checkpoints) == []
    assert steps_to_keep(checkpoints, last=1, best=2) == {3}


def test_non_finite_losses_rank_nothing() -> None:
    checkpoints = evaluated((1, math.nan), (2, math.inf), (3, 0.5), (4, 0.7))
    assert [c.step for c in ranking(checkpoints)] == [3, 4]
    assert steps_to_keep(checkpoints, last=1, best=1) == {3, 4}
    # Only non-finite eval losses: as if none, train loss ranks.
    only_nan = [Candidate(1, 0.2, math.nan), Candidate(2, 0.4, None), Candidate(3, 0.3, None)]
    assert [c.step for c in ranking(only_nan)] == [1, 3, 2]


def test_the_latest_is_kept_whatever_its_rank_and_order_of_input() -> None:
    checkpoints = evaluated((9, 5.0), (3, 0.1), (7, 0.2), (5, 0.3))
    assert steps_to_keep(checkpoints, last=1, best=1) == {3, 9}


def test_keeping_more_than_exist_keeps_all() -> None:
    checkpoints = evaluated((1, 0.3), (2, None), (3, 0.2))
    assert steps_to_keep(checkpoints, last=10, best=10) == {1, 2, 3}
    assert steps_to_keep([], last=1, best=1) == set()
