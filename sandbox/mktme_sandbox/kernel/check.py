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
- the zero page is never mapped in an encrypted VMA;
- each page's map count equals the number of PTEs that map it, and no
  anonymous page is allocated without a mapping;
- the per-KeyID page counts equal a recount of page_ext;
- free pages are tagged as their pool says (KeyID 0 without pools), each is
  on exactly one free list and marked free, and no free page is lost;
- every page-table page hangs in exactly one address space's tree;
- every cached TLB translation equals a fresh walk of the tables.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import TYPE_CHECKING

import numpy as np

from mktme_sandbox.kernel.memory import pte_page
from mktme_sandbox.kernel.page_alloc import PG
from mktme_sandbox.kernel.pgtable import PteFlags
from mktme_sandbox.kernel.tlb import tlb_entry
from mktme_sandbox.kernel.vma import MmStruct, vma_keyid

if TYPE_CHECKING:
    from mktme_sandbox.kernel.kernel import Kernel

__all__ = ["check"]


class _Findings:
    """Violations grouped by (where, invariant): a count and the first case."""

    def __init__(self) -> None:
        self._first: dict[tuple[str, str], str] = {}
        self._count: Counter[tuple[str, str]] = Counter()

    def add(self, where: str, invariant: str, example: str) -> None:
        self._first.setdefault((where, invariant), example)
        self._count[(where, invariant)] += 1

    def lines(self) -> list[str]:
        return [
            f"{where}: {invariant}: {n} (first: {self._first[(where, invariant)]})"
            for (where, invariant), n in self._count.items()
        ]


def check(k: Kernel) -> list[str]:
    found = _Findings()
    mapped: Counter[int] = Counter()
    for mm in k.spaces.values():
        _check_vmas(k, mm, found)
        _check_ptes(k, mm, found, mapped)
        _check_tlb(k, mm, found)
    _check_pages(k, found, mapped)
    _check_pools(k, found)
    _check_tables(k, found)
    return found.lines()


def _check_tables(k: Kernel, found: _Findings) -> None:
    """Every page-table page belongs to exactly one address space's tree."""
    owners: Counter[int] = Counter()
    for mm in k.spaces.values():
        owners.update(pa >> 12 for pa in k.pt.iter_tables(mm.pgd))
    for pfn, n in owners.items():
        if n > 1:
            found.add("page tables", "table page reachable more than once", f"pfn {pfn:#x} x{n}")
        if pfn >= k.alloc.nr_pages or not k.alloc.flags[pfn] & PG.PGTABLE:
            found.add(
                "page tables", "table entry points to a page that is no table", f"pfn {pfn:#x}"
            )
    tables = np.flatnonzero((k.alloc.flags & PG.PGTABLE) != 0)
    for pfn in tables.tolist():
        if pfn not in owners:
            found.add("page tables", "table page in no address space (leaked)", f"pfn {pfn:#x}")


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


def _check_ptes(k: Kernel, mm: MmStruct, found: _Findings, mapped: Counter[int]) -> None:
    where = f"space {mm.name}"
    layout = k.pte_layout
    for va, size, pte in k.pt.iter_present(mm.pgd):
        vma = mm.find_vma(va)
        pfn, keyid = layout.pte_pfn(pte, size), layout.pte_keyid(pte)
        if vma is None or va + size > vma.end:
            found.add(where, "PTE outside any VMA", f"{va:#x}")
            continue
        if pte_page(k, pte, size) is None or k.alloc.is_free(pfn):
            found.add(where, "PTE maps a free or missing page", f"{va:#x} -> pfn {pfn:#x}")
            continue
        vkeyid = vma_keyid(vma, layout)
        if k.alloc.flags[pfn] & PG.ZERO:
            if vkeyid:
                found.add(
                    where, "zero page mapped in an encrypted VMA", f"{va:#x} VMA KeyID {vkeyid}"
                )
            continue
        mapped[pfn] += 1
        pkeyid = int(k.alloc.page_keyid[pfn])
        if keyid != pkeyid:
            found.add(
                where,
                "PTE KeyID differs from its page's page_ext KeyID",
                f"{va:#x}: PTE KeyID {keyid}, page KeyID {pkeyid}",
            )
        if keyid != vkeyid:
            found.add(
                where,
                "PTE KeyID differs from its VMA's KeyID",
                f"{va:#x}: PTE KeyID {keyid}, VMA KeyID {vkeyid}",
            )


def _check_tlb(k: Kernel, mm: MmStruct, found: _Findings) -> None:
    """A cached translation must be what a walk of the tables gives now: the
    kernel flushes the TLB wherever it changes a PTE. (A PTE rewritten through
    keyids/0/mem shows here until `echo flush > spaces/NAME/tlb`.)"""
    where = f"space {mm.name}"
    for vpn, entry in k.tlb.entries(mm.asid):
        found_pte = k.pt.get_pte(mm.pgd, vpn << 12)
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


def _check_pages(k: Kernel, found: _Findings, mapped: Counter[int]) -> None:
    alloc = k.alloc
    anon = np.flatnonzero((alloc.flags & PG.ANON) != 0)
    for pfn in anon.tolist():
        if alloc.flags[pfn] & PG.TAIL:
            continue
        if alloc.mapcount[pfn] != mapped.get(pfn, 0):
            found.add(
                "pages",
                "map count differs from the PTEs mapping the page",
                f"pfn {pfn:#x}: mapcount {alloc.mapcount[pfn]}, PTEs {mapped.get(pfn, 0)}",
            )
    counts: dict[int, int] = defaultdict(int)
    in_use = np.flatnonzero((alloc.flags != 0) & ((alloc.flags & PG.BUDDY) == 0))
    for keyid, n in Counter(alloc.page_keyid[in_use].tolist()).items():
        counts[int(keyid)] = n
    for keyid in set(counts) | set(alloc.allocated_by_keyid):
        if counts.get(keyid, 0) != alloc.allocated_by_keyid.get(keyid, 0):
            found.add(
                "pages",
                "per-KeyID page count differs from page_ext",
                f"KeyID {keyid}: counted {alloc.allocated_by_keyid.get(keyid, 0)}, "
                f"page_ext {counts.get(keyid, 0)}",
            )


def _check_pools(k: Kernel, found: _Findings) -> None:
    pools = k.alloc.pools()
    pooled = [p for pfns in pools.values() for p in pfns]
    counts = Counter(pooled)
    for pfn, n in counts.items():
        if n > 1:
            found.add("free pools", "page on the free lists more than once", f"pfn {pfn:#x} x{n}")
        if not k.alloc.flags[pfn] & PG.BUDDY:
            found.add("free pools", "page on a free list is not marked free", f"pfn {pfn:#x}")
    buddy = np.flatnonzero((k.alloc.flags[: k.alloc.never_used] & PG.BUDDY) != 0)
    for pfn in buddy.tolist():
        if pfn not in counts:
            found.add("free pools", "free page on no free list (leaked)", f"pfn {pfn:#x}")
    for keyid, pfns in pools.items():
        wrong = [p for p in pfns if int(k.alloc.page_keyid[p]) != keyid]
        if wrong:
            found.add(
                f"free pool {keyid}",
                "free page tagged with another KeyID",
                f"pfn {wrong[0]:#x} has KeyID {int(k.alloc.page_keyid[wrong[0]])}",
            )
