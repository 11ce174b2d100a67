"""The translation lookaside buffer: translations cached per address space.

What it models
    The CPU's TLB as software sees it (docs/spec.md 3.4): a cache
    of 4 KiB translations tagged by address space (ASID, like a PCID) and
    virtual page number. Like hardware it knows nothing of the page tables in
    memory: after a PTE changes, a cached translation keeps being served, stale,
    until the kernel flushes it, as Linux does with ``flush_tlb_mm_range()`` /
    ``flush_tlb_mm()`` after changing PTEs. Forgetting a flush is therefore an
    observable bug, as on a real machine (e.g. an old KeyID kept after
    ``encrypt_mprotect``).

Rules it keeps
    - One entry per (asid, vpn); a 2 MiB or 1 GiB leaf is cached as the 4 KiB
      pieces that were used (``TlbEntry.pfn`` is the 4 KiB frame of that vpn).
    - Optional capacity with first-in-first-out replacement, deterministic.
    - ``flush_range`` takes virtual addresses, like ``flush_tlb_range()``.

What it leaves out
    Separate instruction/data and per-size TLBs, global pages surviving a CR3
    switch, Linux's ``tlb_single_page_flush_ceiling`` (a range flush here drops
    exactly the range), and page-walk caches.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from mktme_sandbox.kernel.pgtable_types import PAGE_SHIFT, PteLayout

__all__ = ["Tlb", "TlbEntry", "TlbStats", "tlb_entry"]


class TlbEntry(NamedTuple):
    """One cached translation of a 4 KiB virtual page."""

    pfn: int
    """The 4 KiB physical frame backing this virtual page (KeyID bits excluded)."""
    keyid: int
    """The KeyID the access uses, from the PTE's upper bits."""
    pte: int
    """The leaf entry it was made from, for the permission bits (RW, USER, NX ...)."""


def tlb_entry(layout: PteLayout, pte: int, size: int, vpn: int) -> TlbEntry:
    """The entry for ``vpn`` made from a leaf ``pte`` that maps ``size`` bytes."""
    offset = vpn & ((size >> PAGE_SHIFT) - 1)
    return TlbEntry(layout.pte_pfn(pte, size) + offset, layout.pte_keyid(pte), pte)


@dataclass(frozen=True)
class TlbStats:
    hits: int
    misses: int
    flushes: int
    """Flush operations (``flush_all``, ``flush_range``, ``flush_everything``)."""
    entries_flushed: int
    evictions: int
    entries: int
    """Translations cached now."""


class Tlb:
    """Translations keyed by (asid, vpn); ``capacity`` None means unbounded."""

    def __init__(self, capacity: int | None = None) -> None:
        if capacity is not None and capacity < 1:
            raise ValueError(f"TLB capacity must be at least 1, not {capacity}")
        self.capacity = capacity
        # oldest first; an OrderedDict drops its first item in O(1) (a dict's
        # next(iter()) scans the holes its deletions left at the front)
        self._entries: OrderedDict[tuple[int, int], TlbEntry] = OrderedDict()
        self.hits = self.misses = self.flushes = 0
        self.entries_flushed = self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, asid: int, vpn: int) -> TlbEntry | None:
        """The cached translation, or None (a miss: the caller walks the tables)."""
        entry = self._entries.get((asid, vpn))
        if entry is None:
            self.misses += 1
        else:
            self.hits += 1
        return entry

    def insert(self, asid: int, vpn: int, entry: TlbEntry) -> None:
        """Cache a translation the caller just walked to (``tlb_entry`` makes one)."""
        key = (asid, vpn)
        entries = self._entries
        if key not in entries and self.capacity is not None and len(entries) >= self.capacity:
            entries.popitem(last=False)
            self.evictions += 1
        entries[key] = entry

    def entries(self, asid: int) -> list[tuple[int, TlbEntry]]:
        """(vpn, entry) of every translation cached for one address space."""
        return [(vpn, entry) for (a, vpn), entry in self._entries.items() if a == asid]

    def flush_all(self, asid: int) -> int:
        """Drop every translation of one address space (``flush_tlb_mm``); returns the count."""
        doomed = [key for key in self._entries if key[0] == asid]
        return self._drop(doomed)

    def flush_range(self, asid: int, start: int, end: int) -> int:
        """Drop the translations of virtual addresses ``[start, end)`` (``flush_tlb_range``)."""
        first, last = start >> PAGE_SHIFT, (end + (1 << PAGE_SHIFT) - 1) >> PAGE_SHIFT
        if last - first == 1:  # one page: a fault's flush, ``_drop`` of at most one entry
            self.flushes += 1
            if self._entries.pop((asid, first), None) is None:
                return 0
            self.entries_flushed += 1
            return 1
        if last - first <= len(self._entries):
            doomed = [(asid, vpn) for vpn in range(first, last) if (asid, vpn) in self._entries]
        else:
            doomed = [k for k in self._entries if k[0] == asid and first <= k[1] < last]
        return self._drop(doomed)

    def flush_everything(self) -> int:
        """Drop every translation of every address space (a CR4.PGE toggle)."""
        return self._drop(list(self._entries))

    @property
    def stats(self) -> TlbStats:
        return TlbStats(
            self.hits,
            self.misses,
            self.flushes,
            self.entries_flushed,
            self.evictions,
            len(self._entries),
        )

    def export_state(self) -> dict[str, Any]:
        """Entries in insertion order (the order replacement follows), and counters."""
        rows = [(a, vpn, *entry) for (a, vpn), entry in self._entries.items()]
        return {
            "capacity": self.capacity,
            "entries": np.array(rows, dtype=np.uint64).reshape(-1, 5),
            "counters": [
                self.hits,
                self.misses,
                self.flushes,
                self.entries_flushed,
                self.evictions,
            ],
        }

    def import_state(self, state: dict[str, Any]) -> None:
        self.capacity = state["capacity"]
        self._entries = OrderedDict(
            ((asid, vpn), TlbEntry(pfn, keyid, pte))
            for asid, vpn, pfn, keyid, pte in state["entries"].tolist()
        )
        self.hits, self.misses, self.flushes, self.entries_flushed, self.evictions = state[
            "counters"
        ]

    def _drop(self, keys: list[tuple[int, int]]) -> int:
        for key in keys:
            del self._entries[key]
        self.flushes += 1
        self.entries_flushed += len(keys)
        return len(keys)
