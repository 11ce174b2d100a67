"""The fork, COW and THP figures of the ``kernel`` suite at a tiny size: every
key is there, and a ratio is throughput over KeyID 0's, round by round."""

from __future__ import annotations

import math

import pytest

from mktme_sandbox.bench import Goal
from mktme_sandbox.bench.faults import FaultSamples
from mktme_sandbox.bench.forks import FORK_CONTENDERS, compared, fork_results
from mktme_sandbox.bench.kernel import TINY
from mktme_sandbox.config import PAGE_SIZE


def test_fork_cow_and_thp_report_a_rate_per_contender_and_a_ratio_per_keyid1() -> None:
    lines: list[str] = []
    results = {r.name: r for r in fork_results(TINY.forks, lines.append)}
    assert all(math.isfinite(r.value) and r.value > 0 for r in results.values())
    for label in ("keyid0", "keyid1"):
        assert {f"fork_{label}_ms", f"fork_{label}_pages_per_s"} <= set(results)
    for step in ("cow", "thp"):
        assert {f"{step}_{label}_faults_per_s" for label in FORK_CONTENDERS} <= set(results)
        assert f"{step}_keyid1_pools_vs_keyid0_ratio" in results
    goals = {name: r.goal for name, r in results.items() if r.goal}
    assert goals == {
        "fork_keyid1_vs_keyid0_ratio": Goal(0.9),
        "cow_keyid1_vs_keyid0_ratio": Goal(0.9),
    }
    assert "thp_keyid1_vs_keyid0_ratio" in results
    pages = TINY.forks.fork_bytes // PAGE_SIZE
    ms = results["fork_keyid0_ms"].value
    assert ms == pytest.approx(pages / results["fork_keyid0_pages_per_s"].value * 1e3)
    assert any(line.startswith("kernel: COW faults") for line in lines)


def test_a_ratio_is_the_median_of_each_rounds_throughput_over_keyid0s() -> None:
    samples = FaultSamples({"keyid0": [1.0, 2.0, 4.0], "keyid1": [2.0, 2.0, 5.0]})
    rate0, rate1, ratio = compared("cow", samples, "faults", Goal(0.9))
    assert (rate0.name, rate0.value, rate0.unit) == ("cow_keyid0_faults_per_s", 1.0, "faults/s")
    assert (rate1.name, rate1.value) == ("cow_keyid1_faults_per_s", 0.5)
    assert ratio.name == "cow_keyid1_vs_keyid0_ratio"
    assert ratio.value == 0.8  # per round 0.5, 1, 0.8
    assert ratio.verdict == "MISS"
