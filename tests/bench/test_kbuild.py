"""The replayer on the recorded sample, and the kbuild table's arithmetic on a hand-sized trace."""

from __future__ import annotations

from pathlib import Path

import pytest

from mktme_sandbox.bench.flush_model import MODEL
from mktme_sandbox.bench.kbuild import TenantRow, boot, config_rows, tenant_rows
from mktme_sandbox.bench.perf_trace import Event, parse_perf_script
from mktme_sandbox.bench.replay import Replayer, merge_tenants, subsample, trace_stats

SAMPLE = Path(__file__).parent / "data" / "perf-script-sample.txt"
EVENTS = list(parse_perf_script(SAMPLE.read_text().splitlines()))

# one process faults three anonymous pages (one of them twice) and one file page, and exits
HAND = [
    Event("F", 0, 7, 0),
    Event("E", 1, 7, name="cc1"),
    *(Event("a", 2 + i, 7, page) for i, page in enumerate((0x10000, 0x10001, 0x7FFF0, 0x10000))),
    Event("f", 9, 7, 0x400),
    Event("X", 10, 7),
]


def test_the_replayer_counts_every_fault_of_the_sample_and_mm_check_is_clean_after_each_exit() -> (
    None
):
    machine = boot(True, False, "64M")
    done = Replayer(machine, keyid=1, check=True).run(EVENTS)
    stats = trace_stats(EVENTS)
    assert (done.anon_faults, done.file_faults) == (stats.anon_faults, stats.file_faults)
    assert done.processes == stats.processes == 4
    assert done.problems == []
    assert machine.space_names() == []
    assert machine.vmstat_counts()["pgfault"] <= stats.anon_faults


def test_every_encrypted_page_is_flushed_on_allocation_and_on_free_without_pools() -> None:
    rows = {row.config.label: row.counts for row in config_rows(HAND, "16M")}
    enc = rows["enc"]
    assert enc.faults == 5  # the trace's: four anonymous, one file-backed
    assert enc.pgalloc_encrypted == 3  # the second fault on page 0x10000 allocates nothing
    assert enc.pages_flushed == 6
    assert enc.flush_per_1k == 1200
    assert enc.lines_flushed == 6 * 64
    assert enc.model_pct(MODEL) == pytest.approx(
        100 * 384 * MODEL.line_cycles / (5 * MODEL.fault_cycles)
    )


def test_warm_pools_flush_nothing_and_unencrypted_machines_never_flush() -> None:
    rows = {row.config.label: row.counts for row in config_rows(HAND, "16M")}
    assert rows["enc_pools"].pgalloc_encrypted == 3
    assert [rows[c].pages_flushed for c in ("off", "plain", "enc_pools")] == [0, 0, 0]


def test_saved_flushes_are_a_percentage_of_v5s() -> None:
    row = TenantRow(4, 8, 2000, {"v5": 200, "pools": 50, "coldest": 80}, {}, 1000)
    assert row.saved_pct("pools") == 75
    assert row.saved_pct("coldest") == 60


def test_one_tenant_from_boot_saves_half_the_flushes_with_pools() -> None:
    (row,) = tenant_rows(HAND, (1,))
    assert row.flushed == {"v5": 6, "pools": 3, "coldest": 3}  # pools: the allocation flush only


def test_tenants_start_staggered_and_subsampling_keeps_whole_processes() -> None:
    merged = list(merge_tenants(HAND, 2, 10))
    assert [k for k, _ in merged[:3]] == [0, 0, 0]
    assert sorted(k for k, _ in merged).count(1) == len(HAND)
    kept = list(subsample(EVENTS, 2))
    assert {e.pid for e in kept} == {1267, 1274}
    assert kept == [e for e in EVENTS if e.pid in (1267, 1274)]


@pytest.mark.parametrize(("steal", "robbed"), [("fullest", 2), ("coldest", 1)])
def test_with_memory_exhausted_pools_steal_from_the_fullest_or_the_coldest_keyid(
    steal: str, robbed: int
) -> None:
    alloc = boot(True, True, "4M", 3).kernel.alloc
    alloc.pool_steal = steal
    for pfn in [alloc.alloc_page(1) for _ in range(10)] + [alloc.alloc_page(2) for _ in range(20)]:
        alloc.free_page(pfn)  # KeyID 1 allocated first: the colder; KeyID 2's pool the fuller
    while alloc.never_used < alloc.nr_pages or alloc.pools()[0]:
        alloc.alloc_page(0)
    before = alloc.free_pages_by_keyid()
    alloc.alloc_page(3)
    assert alloc.free_pages_by_keyid()[robbed] == before[robbed] - 1
