"""The page-fault throughput harness at a tiny size: its pairing and its arithmetic."""

from __future__ import annotations

import math

from mktme_sandbox.bench.faults import (
    FAULT_CONTENDERS,
    FaultSamples,
    fault_contenders,
    fault_samples,
)


def test_fault_samples_pair_every_contender_round_by_round() -> None:
    samples = fault_samples(fault_contenders(4), rounds=3)
    assert set(samples.seconds) == set(FAULT_CONTENDERS)
    assert all(len(rounds) == 3 for rounds in samples.seconds.values())
    assert all(rate > 0 and math.isfinite(rate) for rate in map(samples.rate, samples.seconds))
    assert samples.ratio("encrypted", "encrypted") == 1


def test_ratio_is_the_median_of_per_round_ratios() -> None:
    samples = FaultSamples({"a": [1.0, 2.0, 4.0], "b": [2.0, 2.0, 2.0]})
    assert samples.ratio("a", "b") == 1  # per round 2, 1, 0.5
    assert samples.rate("a") == 1
