"""The kernel-build-like trace at a tiny size: its shape and its counter arithmetic, no timing."""

from __future__ import annotations

from dataclasses import replace

import pytest

from mktme_sandbox.bench.flush_model import MODEL
from mktme_sandbox.bench.kernel import TINY
from mktme_sandbox.bench.machines import CONFIGS, TraceConfig, boot, vmstat
from mktme_sandbox.bench.trace import TraceCounts, build_trace, trace_counts
from mktme_sandbox.kernel.vmstat import VMSTAT_ITEMS
from mktme_sandbox.machine import Machine

TRACE = build_trace(TINY.trace)
V5_LINES_PER_FAULT = 128


def test_counts_between_two_vmstat_snapshots() -> None:
    before = dict.fromkeys(VMSTAT_ITEMS, 0)
    after = before | {
        "pgfault": 10, "pgalloc_normal": 14, "mktme_pgalloc_encrypted": 10, "mktme_prep_encrypted_flush": 4,
        "mktme_arch_free_page_flush": 3, "mktme_keyid_pool_flush": 1, "mktme_flush_avoided_pool": 6,
        "mktme_flush_lines": 100,
    }  # fmt: skip
    counts = TraceCounts.between(before, after)
    assert counts == TraceCounts(10, 14, 10, 8, 6, 100)
    assert counts.lines_flushed == 8 * 64
    assert counts.flush_per_1k == 800
    assert counts.model_pct() == pytest.approx(MODEL.overhead_pct(8 * 64, 10))
    assert counts + counts == TraceCounts(20, 28, 20, 16, 12, 200)


def test_trace_is_deterministic_and_every_process_exits() -> None:
    assert build_trace(TINY.trace) == TRACE
    assert build_trace(replace(TINY.trace, seed=2)) != TRACE
    spawned = [op.space for op in TRACE if op.kind == "spawn"]
    exited = [op.space for op in TRACE if op.kind == "exit"]
    assert sorted(spawned) == sorted(exited)
    assert len(spawned) == TINY.trace.processes


def _two_passes(config: TraceConfig) -> tuple[TraceCounts, TraceCounts, Machine]:
    machine = boot(config.mktme, bool(config.pools), phys_mem="32M")
    cold, _ = trace_counts(machine, TRACE, config.keyid)
    warm, _ = trace_counts(machine, TRACE, config.keyid)
    return cold, warm, machine


@pytest.fixture(scope="module", params=CONFIGS, ids=lambda c: c.label)
def passes(request: pytest.FixtureRequest) -> tuple[TraceConfig, TraceCounts, TraceCounts]:
    cold, warm, machine = _two_passes(request.param)
    assert machine.space_names() == []
    assert machine.check() == []
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
    stats = vmstat(machine)
    assert stats["mktme_prep_encrypted_flush"] == stats["mktme_arch_free_page_flush"]
    assert stats["mktme_prep_encrypted_flush"] == stats["mktme_pgalloc_encrypted"]


def test_pools_flush_only_while_they_fill() -> None:
    cold, warm, _ = _two_passes(next(c for c in CONFIGS if c.label == "enc_pools"))
    assert 0 < cold.pages_flushed < cold.faults
    assert warm.pages_flushed == 0
    assert warm.flushes_avoided == warm.pgalloc_encrypted == warm.faults
    assert warm.model_pct() == 0
