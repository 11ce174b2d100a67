"""fork, copy-on-write and THP at fault: throughput, KeyID 0 against KeyID 1.

Three seeded 256 MiB machines take turns, the order reversed every round,
after one warm-up round (``fault_samples``): ``keyid0`` maps with KeyID 0,
``keyid1`` with KeyID 1 (pools off, the v5 behaviour), ``keyid1_pools`` with
KeyID 1 and ``keyid_free_pools`` on. Each times, per round:

- fork (``keyid0`` and ``keyid1``): ``fork CHILD`` of a space with
  ``fork_bytes`` populated (64 MiB in the full run): every PTE write-protected
  on both sides and shared, no page copied; the child's destruction after it
  is not timed. Figures: ms per fork and pages per second.
- COW: ``fork CHILD`` of a space with ``cow_pages`` populated (not timed), then
  a one-byte write to every page of the child (timed): a COW fault per page,
  a new page allocated for the VMA's KeyID and the old one copied into it
  through each page's KeyID. Figures: faults per second.
- THP: ``thp_faults`` write faults, one per 2 MiB, in a ``madvise ...
  hugepage`` VMA: a 2 MiB page of the VMA's KeyID allocated and zeroed through
  it (``thp_fault_alloc`` is checked to count every one). Figures: faults per
  second.

A rate is a contender's best round; a ratio is the median over rounds of a
contender's per-round throughput over ``keyid0``'s (``FaultSamples.ratio``).
The goal, >= 0.9 for ``keyid1`` in fork and COW, is the issue's: copying
encrypted pages costs at most a tenth more than copying plain ones.
"""

from __future__ import annotations

from dataclasses import dataclass

from mktme_sandbox.bench import Goal, Progress, Result
from mktme_sandbox.bench.faults import FaultContender, FaultSamples, fault_samples
from mktme_sandbox.bench.machines import KEYID, boot, mmap_command, timed
from mktme_sandbox.config import PAGE_SIZE
from mktme_sandbox.machine import Machine

__all__ = ["FORK_CONTENDERS", "ForkSizes", "fork_results"]

BASE = 0x10000000
HBASE = 0x80000000  # 2 MiB-aligned, clear of the other mappings
HPAGE_SIZE = 2 << 20
CHILD = "child"

FORK_CONTENDERS = {"keyid0": (0, False), "keyid1": (KEYID, False), "keyid1_pools": (KEYID, True)}
GOAL = Goal(0.9)


@dataclass(frozen=True)
class ForkSizes:
    """How much each part does (``kernel.Sizes`` holds one)."""

    fork_bytes: int = 64 << 20
    fork_rounds: int = 3
    cow_pages: int = 512  # the child's 2 MiB and the parent's: past the 2 MiB cache
    cow_rounds: int = 5
    thp_faults: int = 8
    thp_rounds: int = 3


@dataclass
class Forker:
    """A space of ``pages`` pages populated under ``keyid``, forked each round;
    ``cow``: the child's write to every page and the child's end (which frees
    the copies: v5 flushes each encrypted one) are timed, not the fork. A
    fault timed without the free would credit KeyID N with the write-backs
    its flush on free did before the next fault (KeyID 0 pays them in the
    next fault's zeroing)."""

    machine: Machine
    keyid: int
    pages: int
    cow: bool
    space: str

    def __post_init__(self) -> None:
        self.machine.create_space(self.space, 0)
        length = self.pages * PAGE_SIZE
        self.machine.space_command(self.space, mmap_command(BASE, length, self.keyid, True), 0)

    def round(self) -> float:
        """Seconds per page of one fork, or per COW fault in its child."""
        m = self.machine
        if self.cow:
            m.fork(self.space, CHILD, 0)
            with timed() as watch:
                for n in range(self.pages):
                    m.write_virt(CHILD, BASE + n * PAGE_SIZE, b"x")
                m.destroy_space(CHILD, 0)
        else:
            with timed() as watch:
                m.fork(self.space, CHILD, 0)
            m.destroy_space(CHILD, 0)
        return watch.seconds / self.pages


@dataclass
class ThpFaulter(FaultContender):
    """``pages`` write faults, one per 2 MiB, in a ``hugepage`` VMA of ``keyid``,
    and the munmap that frees the huge pages (timed together, as for COW)."""

    space: str = "thp"

    def round(self) -> float:
        """Seconds per THP fault and its free; the mapping is not timed."""
        m, length = self.machine, self.pages * HPAGE_SIZE
        m.space_command(self.space, mmap_command(HBASE, length, self.keyid), 0)
        m.space_command(self.space, f"madvise {HBASE:#x} {length} hugepage", 0)
        before = m.vmstat_counts()["thp_fault_alloc"]
        with timed() as watch:
            for n in range(self.pages):
                m.write_virt(self.space, HBASE + n * HPAGE_SIZE, b"x")
            m.space_command(self.space, f"munmap {HBASE:#x} {length}", 0)
        allocated = m.vmstat_counts()["thp_fault_alloc"] - before
        if allocated != self.pages:
            raise RuntimeError(f"{allocated} THP allocations for {self.pages} faults")
        return watch.seconds / self.pages


def compared(step: str, samples: FaultSamples, unit: str, goal: Goal | None) -> list[Result]:
    """``STEP_LABEL_UNIT`` per contender, ``STEP_LABEL_vs_keyid0_ratio`` per
    encrypted one (``goal`` for ``keyid1``)."""
    rates = [
        Result(f"{step}_{label}_{unit}_per_s", samples.rate(label), f"{unit}/s")
        for label in samples.seconds
    ]
    ratios = [
        Result(
            f"{step}_{label}_vs_keyid0_ratio",
            samples.ratio(label, "keyid0"),
            "x",
            goal if label == "keyid1" else None,
        )
        for label in samples.seconds
        if label != "keyid0"
    ]
    return rates + ratios


def fork_results(sizes: ForkSizes, progress: Progress) -> list[Result]:
    machines = {label: boot(True, pools) for label, (_, pools) in FORK_CONTENDERS.items()}
    keyids = {label: keyid for label, (keyid, _) in FORK_CONTENDERS.items()}
    fork_pages = sizes.fork_bytes // PAGE_SIZE
    progress(
        f"kernel: fork of {sizes.fork_bytes / 2**20:g} MiB populated, {sizes.fork_rounds} rounds"
    )
    forks = fault_samples(
        {
            label: Forker(machines[label], keyids[label], fork_pages, False, "fork")
            for label in ("keyid0", "keyid1")
        },
        sizes.fork_rounds,
    )
    progress(f"kernel: COW faults, {sizes.cow_rounds} rounds of {sizes.cow_pages} pages")
    cows = fault_samples(
        {
            label: Forker(machine, keyids[label], sizes.cow_pages, True, "cow")
            for label, machine in machines.items()
        },
        sizes.cow_rounds,
    )
    progress(f"kernel: THP faults, {sizes.thp_rounds} rounds of {sizes.thp_faults}")
    thps = fault_samples(
        {
            label: ThpFaulter(machine, keyids[label], sizes.thp_faults)
            for label, machine in machines.items()
        },
        sizes.thp_rounds,
    )
    fork_ms = [
        Result(f"fork_{label}_ms", min(seconds) * fork_pages * 1e3, "ms")
        for label, seconds in forks.seconds.items()
    ]
    return (
        fork_ms
        + compared("fork", forks, "pages", GOAL)
        + compared("cow", cows, "faults", GOAL)
        + compared("thp", thps, "faults", None)
    )
