"""The consistency audit behind ``mm/check``.

Walks every address space's page tables and compares them with the VMAs, the
page_ext KeyIDs, the map counts, the free pools and the key table. Each
invariant that the state breaks gives one line: which space or pool, how many
entries break it, and the first offender. With every mitigation on, no
sequence of commands may produce a line; with one off, the failure that its
patch prevents shows up here.

Invariants:
- VMAs are page-aligned, ordered, and use a programmed KeyID (or 0);
- every present PTE lies in a VMA and maps an allocated page;
- its KeyID equals the page's page_ext KeyID and the VMA's KeyID;
- the zero page (and the huge zero page) is never mapped in an encrypted VMA;
- a page mapped more than once (shared by fork) is never writable through a
  PTE (copy-on-write), and every page of a VM_LOCKED VMA is PG_mlocked;
- each page's map count equals the number of PTEs that map it, and no
  anonymous page is allocated without a mapping;
- the per-KeyID page counts equal a recount of page_ext;
- free pages are tagged as their pool says (KeyID 0 without pools), each is
  on exactly one free list and marked free, and no free page is lost;
- every KeyID's direct mapping maps ``__pa()`` of each of its addresses with
  its own KeyID and the same ranges as KeyID 0's (``DirectMapping.audit``);
- every page-table page hangs in exactly one address space's tree (or the
  kernel's, ``directmap``), and every
  PGD, PUD and PMD entry that points to a table points to a page-table page
  (not outside memory, to a free page or to any other page);
- every cached TLB translation equals a fresh walk of the tables;
- every swap entry names a slot of the one swap device that is in use, and
  each slot's ``swap_map`` count equals the swap entries that name it (a
  slot no entry names is leaked).

The audit runs under the machine lock, so it is vectorized: each space's
leaves come as arrays (``PageTables.leaf_arrays``) and every rule over pages
is one numpy expression; Python work is per table page, VMA and finding.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from mktme_sandbox.errors import SandboxError
from mktme_sandbox.kernel.memory import PTE_MAPPED
from mktme_sandbox.kernel.page import PG
from mktme_sandbox.kernel.pgtable_types import HPAGE_SIZE, PAGE_SIZE, PteFlags
from mktme_sandbox.kernel.swapfile import SWP_OFFSET_FIRST_BIT, SWP_TYPE_BITS
from mktme_sandbox.kernel.tlb import tlb_entry
from mktme_sandbox.kernel.vma import VM, MmStruct, vma_keyid

if TYPE_CHECKING:
    from mktme_sandbox.kernel.kernel import Kernel

__all__ = ["check"]


class _Findings:
    """Violations grouped by (where, invariant): a count and the first case."""

    def __init__(self) -> None:
        self._first: dict[tuple[str, str], str] = {}
        self._count: Counter[tuple[str, str]] = Counter()

    def add(self, where: str, invariant: str, example: str, n: int = 1) -> None:
        self._first.setdefault((where, invariant), example)
        self._count[(where, invariant)] += n

    def add_where(
        self, where: str, invariant: str, broken: np.ndarray, example: Callable[[int], str]
    ) -> None:
        """One finding for the ``True`` entries of ``broken``; ``example(i)``
        describes the first of them."""
        hits = np.flatnonzero(broken)
        if len(hits):
            self.add(where, invariant, example(int(hits[0])), len(hits))

    def lines(self) -> list[str]:
        return [
            f"{where}: {invariant}: {n} (first: {self._first[(where, invariant)]})"
            for (where, invariant), n in self._count.items()
        ]


def check(k: Kernel) -> list[str]:
    found = _Findings()
    mapped = np.zeros(k.pages.nr_pages, dtype=np.int64)
    swapped = np.zeros(max(k.swap.nr_pages, 1), dtype=np.int64)
    for mm in k.spaces.values():
        _check_vmas(k, mm, found)
        _check_ptes(k, mm, found, mapped, swapped)
        _check_tlb(k, mm, found)
    _check_swap(k, found, swapped)
    _check_pages(k, found, mapped)
    _check_pools(k, found)
    _check_tables(k, found)
    for invariant, example, nr in k.directmap.audit():
        found.add("direct mapping", invariant, example, nr)
    return found.lines()


def _check_tables(k: Kernel, found: _Findings) -> None:
    """Every page-table page belongs to exactly one address space's tree, and
    every upper-level entry that points to a table points to one."""
    owners: Counter[int] = Counter(pa >> 12 for pa in k.directmap.table_pages())
    for mm in k.spaces.values():
        owners.update(pa >> 12 for pa in k.pt.iter_tables(mm.pgd))
        owners.update(pa >> 12 for pa in mm.pmd_huge_pte)
        _check_deposits(k, mm, found)
        for bad in k.pt.iter_bad_pointers(mm.pgd):
            found.add(
                f"space {mm.name}",
                f"{bad.level.name} entry points {_not_a_table(k, bad.pte)}",
                f"{bad.va:#x}: entry {bad.pte:#018x}",
            )
    for pfn, n in owners.items():
        if n > 1:
            found.add("page tables", "table page reachable more than once", f"pfn {pfn:#x} x{n}")
    tables = np.flatnonzero((k.pages.flags_of() & PG.PGTABLE) != 0)
    leaked = tables[~np.isin(tables, np.fromiter(owners, dtype=np.int64, count=len(owners)))]
    found.add_where(
        "page tables",
        "table page in no address space (leaked)",
        np.ones(len(leaked), dtype=bool),
        lambda i: f"pfn {int(leaked[i]):#x}",
    )


def _check_deposits(k: Kernel, mm: MmStruct, found: _Findings) -> None:
    """A deposited table is a page-table page, and no more are deposited than
    the space has huge PMDs (``mm->pmd_huge_pte``: one each, freed with it)."""
    where = f"space {mm.name}"
    for pa in mm.pmd_huge_pte:
        if not k.pages.pfn_valid(pa >> 12) or not k.pages.PageTable(pa >> 12):
            found.add(where, "deposited page table is no page table", f"{pa:#x}")
    huge = int(np.count_nonzero(k.pt.leaf_arrays(mm.pgd).size == HPAGE_SIZE))
    if len(mm.pmd_huge_pte) > huge:
        found.add(
            where,
            "more page tables deposited than huge PMDs",
            f"{len(mm.pmd_huge_pte)} deposited, {huge} huge PMDs",
        )


def _not_a_table(k: Kernel, entry: int) -> str:
    """Where an upper-level entry points instead of a page table."""
    pfn = k.pte_layout.pte_pfn(entry)
    if not k.pages.pfn_valid(pfn):
        return "outside physical memory"
    return "to a free page" if k.alloc.is_free(pfn) else "to a page that is no page table"


def _check_vmas(k: Kernel, mm: MmStruct, found: _Findings) -> None:
    where = f"space {mm.name}"
    prev_end = 0
    for vma in mm.vmas():
        if vma.start & 0xFFF or vma.end & 0xFFF or vma.start >= vma.end:
            found.add(where, "VMA not page aligned", f"{vma.start:#x}-{vma.end:#x}")
        if vma.start < prev_end:
            found.add(where, "VMAs overlap", f"{vma.start:#x}")
        prev_end = vma.end
        keyid = vma_keyid(vma, k.pte_layout)
        if keyid and k.keys.slot(keyid).state != "programmed":
            found.add(where, "VMA uses a KeyID without a key", f"{vma.start:#x} KeyID {keyid}")


def _check_ptes(
    k: Kernel, mm: MmStruct, found: _Findings, mapped: np.ndarray, swapped: np.ndarray
) -> None:
    """The PTE rules over all of the space's leaves at once; adds to ``mapped``
    the PTEs that map each page (a huge leaf at its head), to ``swapped`` the
    swap entries that name each slot."""
    where, layout, pages = f"space {mm.name}", k.pte_layout, k.pages
    va, size, pte = k.pt.leaf_arrays(mm.pgd)
    if not len(va):
        return
    vmas = mm.vmas()
    starts = np.array([v.start for v in vmas] or [0], dtype=np.uint64)
    ends = np.array([v.end for v in vmas] or [0], dtype=np.uint64)
    vma_keyids = np.array([vma_keyid(v, layout) for v in vmas] or [0], dtype=np.int64)
    vma_locked = np.array([bool(v.vm_flags & VM.LOCKED) for v in vmas] or [False], dtype=bool)
    at = np.searchsorted(starts, va, side="right") - 1
    at_vma = np.maximum(at, 0)
    outside = (at < 0) | (va + size > ends[at_vma]) | (va < starts[at_vma]) | (len(vmas) == 0)
    found.add_where(where, "PTE outside any VMA", outside, lambda i: f"{int(va[i]):#x}")
    swap = _swap_entries(k, mm, found, va, pte, swapped)
    pfn = layout.pte_pfns(pte, size)
    nr = (size // PAGE_SIZE).astype(np.int64)
    known = pfn + nr <= pages.nr_pages
    page = np.where(known, pfn, 0)
    missing = ~outside & ~swap & (~known | k.alloc.free_mask()[page])
    found.add_where(
        where,
        "PTE maps a free or missing page",
        missing,
        lambda i: f"{int(va[i]):#x} -> pfn {int(pfn[i]):#x}",
    )
    ok = ~outside & ~missing & ~swap
    vkeyid = vma_keyids[at_vma]
    zero = ok & ((pages.flags_of()[page] & PG.ZERO) != 0)
    found.add_where(
        where,
        "zero page mapped in an encrypted VMA",
        zero & (vkeyid != 0),
        lambda i: f"{int(va[i]):#x} VMA KeyID {int(vkeyid[i])}",
    )
    ok &= ~zero
    mapped += np.bincount(page[ok], minlength=len(mapped))
    keyid = layout.pte_keyids(pte)
    pkeyid = pages.keyids_of()[page].astype(np.int64)
    found.add_where(
        where,
        "PTE KeyID differs from its page's page_ext KeyID",
        ok & (keyid != pkeyid),
        lambda i: f"{int(va[i]):#x}: PTE KeyID {int(keyid[i])}, page KeyID {int(pkeyid[i])}",
    )
    found.add_where(
        where,
        "PTE KeyID differs from its VMA's KeyID",
        ok & (keyid != vkeyid),
        lambda i: f"{int(va[i]):#x}: PTE KeyID {int(keyid[i])}, VMA KeyID {int(vkeyid[i])}",
    )
    _check_cow_and_mlock(k, where, va, pte, page, ok, vma_locked[at_vma], found)


def _check_cow_and_mlock(
    k: Kernel,
    where: str,
    va: np.ndarray,
    pte: np.ndarray,
    page: np.ndarray,
    ok: np.ndarray,
    locked: np.ndarray,
    found: _Findings,
) -> None:
    """A page mapped more than once (fork) is never writable through any of its
    PTEs, and every page of a VM_LOCKED VMA is PG_mlocked."""
    mapcount = k.pages.mapcounts_of()[page]
    writable = (pte & np.uint64(PteFlags.RW)) != 0
    found.add_where(
        where,
        "writable PTE maps a shared page (a missed copy-on-write)",
        ok & writable & (mapcount > 1),
        lambda i: f"{int(va[i]):#x} -> pfn {int(page[i]):#x}, mapcount {int(mapcount[i])}",
    )
    mlocked = (k.pages.flags_of()[page] & PG.MLOCKED) != 0
    found.add_where(
        where,
        "page of a VM_LOCKED VMA is not mlocked",
        ok & locked & ~mlocked,
        lambda i: f"{int(va[i]):#x} -> pfn {int(page[i]):#x}",
    )


def _swap_entries(
    k: Kernel, mm: MmStruct, found: _Findings, va: np.ndarray, pte: np.ndarray, swapped: np.ndarray
) -> np.ndarray:
    """Which leaves are swap entries; counts the valid ones into ``swapped``."""
    u64 = np.uint64
    swap: np.ndarray = (pte & u64(PTE_MAPPED)) == 0
    offset = ((pte & u64((1 << (64 - SWP_TYPE_BITS)) - 1)) >> u64(SWP_OFFSET_FIRST_BIT)).astype(
        np.int64
    )
    typed = (pte >> u64(64 - SWP_TYPE_BITS)) == 0
    known = typed & (offset > 0) & (offset < k.swap.nr_pages)
    slot = np.where(known, offset, 0)
    swap_map = np.append(k.swap.swap_map, np.uint8(0))  # never empty: no swap has no slot
    in_use = known & (swap_map[slot] > 0)
    found.add_where(
        f"space {mm.name}",
        "swap entry names no slot in use",
        swap & ~in_use,
        lambda i: f"{int(va[i]):#x}: entry {int(pte[i]):#018x}",
    )
    swapped += np.bincount(slot[swap & in_use], minlength=len(swapped))[: len(swapped)]
    return swap


def _check_swap(k: Kernel, found: _Findings, swapped: np.ndarray) -> None:
    if not k.swap.nr_pages:
        return
    counts = k.swap.swap_map.astype(np.int64)
    counts[0] = 0  # the header
    found.add_where(
        "swap",
        "slot count differs from the swap entries naming it",
        counts != swapped,
        lambda slot: f"slot {slot}: swap_map {counts[slot]}, entries {swapped[slot]}",
    )


def _check_tlb(k: Kernel, mm: MmStruct, found: _Findings) -> None:
    """A cached translation must be what a walk of the tables gives now: the
    kernel flushes the TLB wherever it changes a PTE. (A PTE rewritten through
    keyids/0/mem shows here until `echo flush > spaces/NAME/tlb`.)"""
    where = f"space {mm.name}"
    for vpn, entry in k.tlb.entries(mm.asid):
        try:
            found_pte = k.pt.get_pte(mm.pgd, vpn << 12)
        except SandboxError:  # the hardware walk ran off a forged upper-level entry
            found_pte = None
        now = (
            None
            if found_pte is None
            else tlb_entry(k.pte_layout, found_pte.pte, found_pte.size, vpn)
        )
        if now is None or (now.pfn, now.keyid, now.pte & PteFlags.RW) != (
            entry.pfn,
            entry.keyid,
            entry.pte & PteFlags.RW,
        ):
            found.add(
                where,
                "TLB entry differs from the page tables (a missing TLB flush)",
                f"{vpn << 12:#x}",
            )


def _check_pages(k: Kernel, found: _Findings, mapped: np.ndarray) -> None:
    alloc, flags, mapcount = k.alloc, k.pages.flags_of(), k.pages.mapcounts_of()
    heads = ((flags & PG.ANON) != 0) & ((flags & PG.TAIL) == 0)
    found.add_where(
        "pages",
        "map count differs from the PTEs mapping the page",
        heads & (mapcount != mapped),
        lambda pfn: f"pfn {pfn:#x}: mapcount {mapcount[pfn]}, PTEs {mapped[pfn]}",
    )
    in_use = (flags != 0) & ((flags & PG.BUDDY) == 0)
    recount = np.bincount(k.pages.keyids_of()[in_use].astype(np.int64))
    counts = {int(keyid): int(n) for keyid, n in enumerate(recount) if n}
    for keyid in sorted(set(counts) | set(alloc.allocated_by_keyid)):
        if counts.get(keyid, 0) != alloc.allocated_by_keyid.get(keyid, 0):
            found.add(
                "pages",
                "per-KeyID page count differs from page_ext",
                f"KeyID {keyid}: counted {alloc.allocated_by_keyid.get(keyid, 0)}, "
                f"page_ext {counts.get(keyid, 0)}",
            )


def _check_pools(k: Kernel, found: _Findings) -> None:
    alloc, flags, keyids = k.alloc, k.pages.flags_of(), k.pages.keyids_of()
    pools = {keyid: np.array(pfns, dtype=np.int64) for keyid, pfns in alloc.pools().items()}
    pooled = np.concatenate([np.zeros(0, dtype=np.int64), *pools.values()])
    times = np.bincount(pooled, minlength=k.pages.nr_pages)
    found.add_where(
        "free pools",
        "page on the free lists more than once",
        times > 1,
        lambda pfn: f"pfn {pfn:#x} x{times[pfn]}",
    )
    found.add_where(
        "free pools",
        "page on a free list is not marked free",
        (times > 0) & ((flags & PG.BUDDY) == 0),
        lambda pfn: f"pfn {pfn:#x}",
    )
    buddy = (flags & PG.BUDDY) != 0
    buddy[alloc.never_used :] = False
    found.add_where(
        "free pools",
        "free page on no free list (leaked)",
        buddy & (times == 0),
        lambda pfn: f"pfn {pfn:#x}",
    )
    for keyid, pfns in pools.items():
        wrong = pfns[keyids[pfns] != keyid]
        if len(wrong):
            found.add(
                f"free pool {keyid}",
                "free page tagged with another KeyID",
                f"pfn {int(wrong[0]):#x} has KeyID {int(keyids[wrong[0]])}",
            )
