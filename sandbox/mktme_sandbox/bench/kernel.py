"""Suite ``kernel``: page-fault throughput and what the MKTME flushes cost.

Everything runs in-process through the ``Machine`` API, on seeded 256 MiB
machines (``mktme_sandbox.bench.machines``), and every ratio is measured side
by side in one run. This module is the suite only; it composes three parts,
each of which says what it measures:

- ``mktme_sandbox.bench.faults``: page-fault throughput, four machines faulting
  a mapping in turn (``keyid0_on``, ``keyid0_off``, ``encrypted``,
  ``encrypted_pools``; the ``..._4m`` figures past the cache).
- ``mktme_sandbox.bench.trace``: a kernel-build-like trace of short-lived
  address spaces, replayed on the cover letter's five machines, its counters
  and its table (the ``trace_...`` figures).
- ``mktme_sandbox.bench.moves``: swap-out, swap-in and migration throughput,
  KeyID 0 against KeyID 1 (the ``swap_...`` and ``migrate_...`` figures).
- ``mktme_sandbox.bench.forks``: fork of a populated space, COW faults in its
  child and THP faults, KeyID 0 against KeyID 1 (the ``fork_...``, ``cow_...``
  and ``thp_...`` figures).
- ``mktme_sandbox.bench.scale``: cost per page as one space grows from 64 MiB
  mapped (the ``scale_...`` figures; rows up to ``$MKTME_BENCH_SCALE_TO``).
- ``mktme_sandbox.bench.flush_model``: the flush-cost model, calibrated on the
  cover letter's own ``perf stat`` (the ``model_...`` and ``letter_...``
  figures); pure arithmetic, no machine.

``Sizes`` says how much each part does: ``FULL`` for ``mktme-sandbox bench
kernel``, ``TINY`` for the tests. The full table is printed through
``progress`` (the framework shows progress on stderr); the figures are also
results, so ``--json`` has them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from mktme_sandbox.bench import Progress, Result
from mktme_sandbox.bench.faults import fault_contenders, fault_results, fault_samples
from mktme_sandbox.bench.forks import ForkSizes, fork_results
from mktme_sandbox.bench.moves import move_results
from mktme_sandbox.bench.scale import scale_results, scale_rows_to
from mktme_sandbox.bench.trace import TraceShape, build_trace, run_trace, trace_results, trace_table
from mktme_sandbox.config import PAGE_SIZE

__all__ = ["FULL", "TINY", "Sizes", "run"]


@dataclass(frozen=True)
class Sizes:
    """How much the suite does: fault rounds, pages per round, trace passes and shape."""

    fault_pages: int = 256
    fault_rounds: int = 41
    past_cache_pages: int = 1024  # twice the 2 MiB cache: zeroing evicts dirty lines
    past_cache_rounds: int = 5
    trace: TraceShape = field(default_factory=TraceShape)
    trace_passes: int = 3
    move_pages: int = 256
    move_rounds: int = 5
    forks: ForkSizes = field(default_factory=ForkSizes)
    scale_rows: tuple[int, ...] | None = None
    """The mapped sizes of the scale table; None: up to ``$MKTME_BENCH_SCALE_TO``."""


FULL = Sizes()
TINY = Sizes(
    fault_pages=8,
    fault_rounds=1,
    past_cache_pages=8,
    past_cache_rounds=1,
    trace=replace(
        TraceShape(),
        processes=3,
        concurrency=2,
        heap_kib=(32, 64),
        bss_kib=(16, 32),
        buffer_kib=(16, 32),
    ),
    trace_passes=1,
    move_pages=8,
    move_rounds=1,
    forks=ForkSizes(
        fork_bytes=16 * PAGE_SIZE,
        fork_rounds=1,
        cow_pages=8,
        cow_rounds=1,
        thp_faults=1,
        thp_rounds=1,
    ),
    scale_rows=(1 << 20,),
)


def run(progress: Progress, sizes: Sizes = FULL) -> list[Result]:
    progress(f"kernel: fault throughput, {sizes.fault_rounds} rounds of {sizes.fault_pages} pages")
    warm = fault_samples(fault_contenders(sizes.fault_pages), sizes.fault_rounds)
    progress(
        f"kernel: the same past the cache, {sizes.past_cache_rounds} rounds of "
        f"{sizes.past_cache_pages} pages"
    )
    past_cache = fault_samples(
        fault_contenders(sizes.past_cache_pages, ("keyid0_on", "encrypted")),
        sizes.past_cache_rounds,
    )
    trace = build_trace(sizes.trace)
    runs = run_trace(trace, sizes.trace_passes, progress)
    for line in trace_table(runs, trace, sizes.trace_passes):
        progress(line)
    progress(f"kernel: swap and migration, {sizes.move_rounds} rounds of {sizes.move_pages} pages")
    moves = move_results(sizes.move_pages, sizes.move_rounds)
    forks = fork_results(sizes.forks, progress)
    rows = scale_rows_to() if sizes.scale_rows is None else sizes.scale_rows
    scale = scale_results(rows, progress)
    return fault_results(warm, past_cache) + trace_results(runs) + moves + forks + scale
