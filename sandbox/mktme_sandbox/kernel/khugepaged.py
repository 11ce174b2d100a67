"""khugepaged: one collapse pass (mm/khugepaged.c, reduced).

Models "[PATCHv5 06/19] mm/khugepaged: Handle encrypted pages": "khugepaged
allocates page in advance, before we found a VMA for collapse. [...] The page
is allocated with KeyID-0. Once we know that the VMA is suitable for
collapsing, we prepare the page for KeyID we need, based on vma_keyid()."
Each small page is copied through its own KeyID (``page_keyid()``, patch 18);
a small page whose KeyID differs from the VMA's is no reason to refuse the
collapse (v5 has no such check). Switch ``khugepaged_keyid_check`` off and the
patch goes: the huge page keeps KeyID 0 and is mapped through the VMA's KeyID,
so the process reads its memory as garbage.

A pass: for every VM_HUGEPAGE VMA, each 2M-aligned range inside it whose 512
PTEs are present and map exclusive anonymous pages is copied into one 2M page
(through each page's own direct mapping) and mapped with a PMD.

Left out: the max_ptes_none/max_ptes_shared tunables (all 512 must be present
and exclusive), collapse of read-only or shared ranges, scan throttling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from mktme_sandbox.config import PAGE_SIZE
from mktme_sandbox.kernel.memory import (
    alloc_hugepage_vma,
    flush_tlb_range,
    mlock_vma_page,
    pte_page,
)
from mktme_sandbox.kernel.pgtable_types import HPAGE_NR, HPAGE_SIZE, PteFlags
from mktme_sandbox.kernel.vma import VM, MmStruct, Vma

if TYPE_CHECKING:
    from mktme_sandbox.kernel.kernel import Kernel

__all__ = ["KHUGEPAGED_TUNABLES", "KhugepagedStats", "khugepaged_scan", "khugepaged_sysfs"]


@dataclass
class KhugepagedStats:
    full_scans: int = 0
    pages_collapsed: int = 0
    collapse_alloc_failed: int = 0


# khugepaged.c's defaults for the timers; max_ptes_* as this model collapses:
# every PTE present and exclusive, nothing swapped
KHUGEPAGED_TUNABLES = {
    "pages_to_scan": 4096,
    "scan_sleep_millisecs": 10000,
    "alloc_sleep_millisecs": 60000,
    "max_ptes_none": 0,
    "max_ptes_swap": 0,
    "max_ptes_shared": 0,
}
_LINUX_COUNTERS = ("full_scans", "pages_collapsed")


def khugepaged_sysfs(k: Kernel) -> dict[str, int]:
    """The files of /sys/kernel/mm/transparent_hugepage/khugepaged/
    (Documentation/admin-guide/mm/transhuge.rst), one value each; the
    sandbox's own counters under ``mktme_``."""
    counts = vars(k.khugepaged)
    own = {f"mktme_{n}": v for n, v in counts.items() if n not in _LINUX_COUNTERS}
    return {n: counts[n] for n in _LINUX_COUNTERS} | KHUGEPAGED_TUNABLES | own


def khugepaged_scan(k: Kernel) -> int:
    """One full pass; returns the number of huge pages made."""
    done = 0
    for mm in list(k.spaces.values()):
        for vma in mm.vmas():
            if vma.vm_flags & VM.HUGEPAGE and vma.vm_flags & VM.WRITE:
                done += _scan_vma(k, mm, vma)
    k.khugepaged.full_scans += 1
    k.khugepaged.pages_collapsed += done
    return done


def _scan_vma(k: Kernel, mm: MmStruct, vma: Vma) -> int:
    first = -(-vma.start // HPAGE_SIZE) * HPAGE_SIZE
    done = 0
    for haddr in range(first, vma.end - HPAGE_SIZE + 1, HPAGE_SIZE):
        pfns = _collapsible(k, mm, haddr)
        if pfns is not None:
            done += _collapse(k, mm, vma, haddr, pfns)
    return done


def _collapsible(k: Kernel, mm: MmStruct, haddr: int) -> list[int] | None:
    """The 512 PFNs when every PTE is present, 4K and exclusive, else None."""
    entries = list(k.pt.iter_present(mm.pgd, haddr, haddr + HPAGE_SIZE))
    if len(entries) != HPAGE_NR or any(size != PAGE_SIZE for _, size, _ in entries):
        return None
    pfns = [pte_page(k, pte) for _, _, pte in entries]
    if any(p is None for p in pfns) or any(not pte & PteFlags.PRESENT for _, _, pte in entries):
        return None
    pages = [p for p in pfns if p is not None]
    if any(not k.pages.PageAnon(p) or not k.pages.page_exclusive(p) for p in pages):
        return None
    return pages


def _collapse(k: Kernel, mm: MmStruct, vma: Vma, haddr: int, pfns: list[int]) -> int:
    patched = k.mitigations["khugepaged_keyid_check"]
    with k.charging(mm.owner):  # the THP fault's path (patch 04); KeyID 0 before patch 06
        head = alloc_hugepage_vma(k, vma, zero=False, keyid=None if patched else 0)
    if head is None:
        k.khugepaged.collapse_alloc_failed += 1
        k.vmstat.inc("thp_collapse_alloc_failed")
        return 0
    for i, pfn in enumerate(pfns):  # each through its own direct mapping (patch 18)
        k.directmap.copy_page(pfn, head + i)
    pmd = k.pte_layout.pfn_pte(head, vma.vm_page_prot | PteFlags.PSE | PteFlags.RW | PteFlags.DIRTY)
    mm.pmd_huge_pte.append(k.pt.collapse_pmd(mm.pgd, haddr, pmd))  # the old table, deposited
    k.pages.get_page(head)
    if vma.vm_flags & VM.LOCKED:
        mlock_vma_page(k, head)
    for pfn in pfns:
        k.pages.put_page(pfn)
    flush_tlb_range(k, mm, haddr, haddr + HPAGE_SIZE)
    k.vmstat.inc("thp_collapse_alloc")
    return 1
