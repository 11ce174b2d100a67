"""A recorded trace (``mktme_sandbox.bench.perf_trace``) replayed through ``Machine``.

Every process of the trace becomes a space (``create_space``), named
``PREFIX + pid``; one ``Replayer`` per tenant, each with its own prefix and
KeyID, so several builds can share one machine. Rules kept:

- An anonymous fault is a write (``write_virt``) to its page in an anonymous
  VMA of the tenant's KeyID (0: nothing encrypted). The VMA is mapped on the
  first fault of each 2 MiB-aligned region of the process (``mmap ... rw-
  keyid=K``; no ``populate``: only faulted pages are allocated); the page
  tables are those the simulated kernel allocates for the fault.
- A file-backed fault is counted, not replayed: it maps page cache (KeyID 0,
  never encrypted) and allocates no anonymous memory.
- An exec destroys the space and creates an empty one; an exit destroys it,
  which frees its memory (perf records no munmap, so exit and exec are the
  only frees). With ``check`` set, ``Machine.check()`` (``mm/check``) must be
  clean after every exit.
- A fork is a new, empty space: the child's faults allocate its own pages
  (copy-on-write sharing with the parent is not modelled).

A fault on a page the space already holds (perf counts a second fault on a
page, e.g. a write after a read, or copy-on-write in the parent after a fork)
allocates nothing in the sandbox: the sandbox's ``pgfault`` is at most the
trace's anonymous faults. ``subsample`` keeps every Nth process whole, so that
each kept process still allocates and frees all its memory.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from mktme_sandbox.bench.machines import mmap_command
from mktme_sandbox.bench.perf_trace import Event
from mktme_sandbox.config import PAGE_SIZE, MiB
from mktme_sandbox.kernel.pgtable_types import TASK_SIZE
from mktme_sandbox.kernel.vma import MMAP_MIN_ADDR
from mktme_sandbox.machine import Machine

__all__ = [
    "REGION",
    "Replayer",
    "TraceStats",
    "TraceTally",
    "merge_tenants",
    "subsample",
    "trace_stats",
]

REGION = 2 * MiB  # an anonymous VMA is mapped per 2 MiB-aligned region faulted
PAYLOAD = b"kbuild"


@dataclass(frozen=True)
class TraceStats:
    """What a trace holds: processes (forks), anonymous and file-backed faults, duration."""

    processes: int = 0
    anon_faults: int = 0
    file_faults: int = 0
    duration_us: int = 0

    @property
    def faults(self) -> int:
        return self.anon_faults + self.file_faults


@dataclass
class TraceTally:
    """Counts the events that stream through ``tally``."""

    kinds: dict[str, int] = field(default_factory=dict)
    last: int = 0

    def tally(self, events: Iterable[Event]) -> Iterator[Event]:
        for event in events:
            self.kinds[event.kind] = self.kinds.get(event.kind, 0) + 1
            self.last = event.time
            yield event

    def stats(self) -> TraceStats:
        k = self.kinds
        return TraceStats(k.get("F", 0), k.get("a", 0), k.get("f", 0), self.last)


def trace_stats(events: Iterable[Event]) -> TraceStats:
    tally = TraceTally()
    for _ in tally.tally(events):
        pass
    return tally.stats()


def subsample(events: Iterable[Event], every: int) -> Iterator[Event]:
    """The events of every ``every``-th process (counted by fork), whole."""
    kept: dict[int, bool] = {}
    forks = 0
    for event in events:
        if event.kind == "F":
            kept[event.pid] = forks % every == 0
            forks += 1
        if kept.get(event.pid, False):
            yield event


def merge_tenants(
    events: Sequence[Event], tenants: int, spread_us: int
) -> Iterator[tuple[int, Event]]:
    """``tenants`` copies of ``events`` by time, tenant k started ``k * spread_us / tenants`` later."""

    def shifted(k: int) -> Iterator[tuple[int, int, Event]]:
        offset = k * spread_us // tenants
        for i, event in enumerate(events):
            yield event.time + offset, k * len(events) + i, event

    for _, order, event in heapq.merge(*(shifted(k) for k in range(tenants))):
        yield order // len(events), event


@dataclass
class Replayer:
    """One tenant's processes on ``machine``, anonymous memory in ``keyid``."""

    machine: Machine
    keyid: int = 0
    prefix: str = "p"
    check: bool = False
    regions: dict[int, set[int]] = field(default_factory=dict)  # pid -> 2 MiB regions mapped
    anon_faults: int = 0
    file_faults: int = 0
    processes: int = 0
    problems: list[str] = field(default_factory=list)  # mm/check lines after exits

    def run(self, events: Iterable[Event]) -> Replayer:
        for event in events:
            self.apply(event)
        self.finish()
        return self

    def apply(self, event: Event) -> None:
        if event.kind == "a":
            self.fault(event.pid, event.value * PAGE_SIZE)
        elif event.kind == "f":
            self.file_faults += 1
        elif event.kind == "F":
            self.processes += 1
            self.exit(event.pid)  # a pid reused without a recorded exit
            self.spawn(event.pid)
        elif event.kind == "E":
            self.exit(event.pid)
            self.spawn(event.pid)
        elif event.kind == "X":
            self.exit(event.pid)

    def finish(self) -> None:
        """Every process still alive exits."""
        for pid in list(self.regions):
            self.exit(pid)

    def spawn(self, pid: int) -> None:
        self.machine.create_space(self.space(pid), 0)
        self.regions[pid] = set()

    def exit(self, pid: int) -> None:
        if self.regions.pop(pid, None) is None:
            return
        self.machine.destroy_space(self.space(pid), 0)
        if self.check:
            self.problems += self.machine.check()

    def fault(self, pid: int, addr: int) -> None:
        if not MMAP_MIN_ADDR <= addr < TASK_SIZE:
            self.file_faults += 1  # outside user space (no VMA can hold it): not anonymous memory
            return
        self.anon_faults += 1
        if pid not in self.regions:
            self.spawn(pid)
        region = addr // REGION
        if region not in self.regions[pid]:
            start, end = max(region * REGION, MMAP_MIN_ADDR), min((region + 1) * REGION, TASK_SIZE)
            self.machine.space_command(
                self.space(pid), mmap_command(start, end - start, self.keyid), 0
            )
            self.regions[pid].add(region)
        self.machine.write_virt(self.space(pid), addr & ~(PAGE_SIZE - 1), PAYLOAD, 0)

    def space(self, pid: int) -> str:
        return f"{self.prefix}{pid}"
