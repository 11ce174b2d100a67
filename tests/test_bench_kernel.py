"""The ``kernel`` bench suite at a tiny size: shapes and counter arithmetic, no timing."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from mktme_sandbox.bench import kernel
from mktme_sandbox.bench.kernel import CONFIGS, LETTER, MODEL, TINY, TraceConfig, TraceCounts
from mktme_sandbox.kernel.vmstat import VMSTAT_ITEMS
from mktme_sandbox.machine import Machine

TRACE = kernel.build_trace(TINY.trace)
V5_LINES_PER_FAULT = 128


def test_model_is_calibrated_on_the_cover_letters_counters() -> None:
    assert MODEL.line_cycles == pytest.approx(305.6, abs=0.1)
    assert MODEL.fault_cycles == pytest.approx(161_100, rel=1e-4)
    assert MODEL.v5_pct() == pytest.approx(24.3, abs=0.05)
    assert LETTER.cycles_pct() == pytest.approx(24.3, abs=0.05)
    assert LETTER.elapsed_pct() == pytest.approx(20.6, abs=0.05)


def test_model_scales_with_lines_per_fault() -> None:
    assert MODEL.overhead_pct(64, 1) == pytest.approx(MODEL.v5_pct() / 2)
    assert MODEL.overhead_pct(0, 1000) == 0
    assert MODEL.overhead_pct(0, 0) == 0


def test_counts_between_two_vmstat_snapshots() -> None:
    before = dict.fromkeys(VMSTAT_ITEMS, 0)
    after = before | {
        "pgfault": 10, "pgalloc": 14, "pgalloc_encrypted": 10, "prep_encrypted_flush": 4,
        "arch_free_page_flush": 3, "keyid_pool_flush": 1, "flush_avoided_pool": 6,
        "flush_lines": 100,
    }  # fmt: skip
    counts = TraceCounts.between(before, after)
    assert counts == TraceCounts(10, 14, 10, 8, 6, 100)
    assert counts.lines_flushed == 8 * 64
    assert counts.flush_per_1k == 800
    assert counts.model_pct() == pytest.approx(MODEL.overhead_pct(8 * 64, 10))
    assert counts + counts == TraceCounts(20, 28, 20, 16, 12, 200)


def test_trace_is_deterministic_and_every_process_exits() -> None:
    assert kernel.build_trace(TINY.trace) == TRACE
    assert kernel.build_trace(replace(TINY.trace, seed=2)) != TRACE
    spawned = [op.space for op in TRACE if op.kind == "spawn"]
    exited = [op.space for op in TRACE if op.kind == "exit"]
    assert sorted(spawned) == sorted(exited) and len(spawned) == TINY.trace.processes


def _two_passes(config: TraceConfig) -> tuple[TraceCounts, TraceCounts, Machine]:
    machine = kernel.boot(config.mktme, bool(config.pools), phys_mem="32M")
    cold, _ = kernel.trace_counts(machine, TRACE, config.keyid)
    warm, _ = kernel.trace_counts(machine, TRACE, config.keyid)
    return cold, warm, machine


@pytest.fixture(scope="module", params=CONFIGS, ids=lambda c: c.label)
def passes(request: pytest.FixtureRequest) -> tuple[TraceConfig, TraceCounts, TraceCounts]:
    cold, warm, machine = _two_passes(request.param)
    assert machine.space_names() == [] and machine.check() == []
    return request.param, cold, warm


class TestTraceCounters:
    """The same checks over the five configurations of the cover letter's table."""

    def test_every_pass_faults_the_same(
        self, passes: tuple[TraceConfig, TraceCounts, TraceCounts]
    ) -> None:
        _, cold, warm = passes
        assert cold.faults == warm.faults > 0

    def test_flushes_only_where_memory_is_encrypted(
        self, passes: tuple[TraceConfig, TraceCounts, TraceCounts]
    ) -> None:
        config, cold, warm = passes
        if config.keyid == 0:
            assert cold.pgalloc_encrypted == warm.pages_flushed == cold.pages_flushed == 0
        else:  # no zero page in encrypted VMAs: every fault allocates a KeyID-1 page
            assert warm.pgalloc_encrypted == warm.faults

    def test_lines_found_in_cache_never_exceed_lines_flushed(
        self, passes: tuple[TraceConfig, TraceCounts, TraceCounts]
    ) -> None:
        _, cold, warm = passes
        assert cold.lines_in_cache <= cold.lines_flushed
        assert warm.lines_in_cache <= warm.lines_flushed


def test_v5_flushes_every_encrypted_alloc_and_free() -> None:
    _, warm, machine = _two_passes(next(c for c in CONFIGS if c.label == "enc"))
    assert warm.pages_flushed == 2 * warm.faults
    assert warm.flush_per_1k == 2000
    assert warm.lines_flushed == V5_LINES_PER_FAULT * warm.faults
    assert warm.model_pct() == pytest.approx(MODEL.v5_pct())
    stats = kernel.vmstat(machine)
    assert stats["prep_encrypted_flush"] == stats["arch_free_page_flush"]
    assert stats["prep_encrypted_flush"] == stats["pgalloc_encrypted"]


def test_pools_flush_only_while_they_fill() -> None:
    cold, warm, _ = _two_passes(next(c for c in CONFIGS if c.label == "enc_pools"))
    assert 0 < cold.pages_flushed < cold.faults
    assert warm.pages_flushed == 0
    assert warm.flushes_avoided == warm.pgalloc_encrypted == warm.faults
    assert warm.model_pct() == 0


def test_fault_samples_pair_every_contender_round_by_round() -> None:
    samples = kernel.fault_samples(kernel.fault_contenders(4), rounds=3)
    assert set(samples.seconds) == set(kernel.FAULT_CONTENDERS)
    assert all(len(rounds) == 3 for rounds in samples.seconds.values())
    assert all(rate > 0 and math.isfinite(rate) for rate in map(samples.rate, samples.seconds))
    assert samples.ratio("encrypted", "encrypted") == 1


def test_ratio_is_the_median_of_per_round_ratios() -> None:
    samples = kernel.FaultSamples({"a": [1.0, 2.0, 4.0], "b": [2.0, 2.0, 2.0]})
    assert samples.ratio("a", "b") == 1  # per round 2, 1, 0.5
    assert samples.rate("a") == 1


def test_run_reports_each_metric_once_with_the_issues_goals() -> None:
    lines: list[str] = []
    results = kernel.run(lines.append, TINY)
    names = [r.name for r in results]
    assert len(names) == len(set(names))
    assert all(math.isfinite(r.value) for r in results)
    goals = {r.name: (r.goal.bound, r.goal.at_least) for r in results if r.goal}
    assert goals == {
        "keyid0_on_vs_off_ratio": (0.98, True),
        "encrypted_faults_per_s": (20_000, True),
    }
    for config in CONFIGS:
        assert f"trace_{config.label}_flush_per_1k" in names
        assert (f"trace_{config.label}_vs_off_ratio" in names) == config.mktme
    assert any(line.startswith("calibration") for line in lines)
    assert sum(line.startswith("MKTME") and "%" in line for line in lines) == len(CONFIGS)
