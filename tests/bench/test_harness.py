"""The side-by-side harness every suite measures with: rounds and ratios."""

from __future__ import annotations

from mktme_sandbox.bench import interleaved_rounds, median_ratio


def test_a_ratio_is_the_median_of_the_per_round_ratios_not_of_two_best_rounds() -> None:
    # per round: reference/ours = 5, 0.5, 0.5. Two best rounds (1 s and 5 s) would
    # say 5: a lucky round of one contender alone would decide the ratio.
    assert median_ratio([1.0, 10.0, 10.0], [5.0, 5.0, 5.0]) == 0.5
    assert median_ratio([1.0, 2.0, 4.0], [2.0, 2.0, 2.0]) == 1  # per round 2, 1, 0.5


def test_rounds_alternate_the_contenders_and_keep_every_round() -> None:
    calls: list[str] = []
    contenders = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    seconds = interleaved_rounds(contenders, rounds=3, round_time=0.0)
    assert {name: len(samples) for name, samples in seconds.items()} == {"a": 3, "b": 3}
    timed = calls[-6:]  # calibration calls come first; then one call each per round
    assert timed == ["a", "b", "a", "b", "a", "b"]
