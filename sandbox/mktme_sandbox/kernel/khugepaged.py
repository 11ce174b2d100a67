"""khugepaged: one collapse pass (mm/khugepaged.c, reduced).

Models "mm/khugepaged: Handle encrypted pages". khugepaged allocates its huge
page before it knows which VMA it will collapse, so it used to get a KeyID-0
page; the series gives the new page the VMA's KeyID (prep_encrypted_page) and
collapses only when all 512 small pages have that KeyID. Switch
``khugepaged_keyid_check`` off and the collapse uses a KeyID-0 huge page mapped
through the VMA's KeyID: the process then reads its memory as garbage.

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
from mktme_sandbox.kernel.memory import flush_tlb_range, pte_page
from mktme_sandbox.kernel.pgtable_types import HPAGE_NR, HPAGE_SIZE, PteFlags
from mktme_sandbox.kernel.vma import VM, MmStruct, Vma, vma_keyid

if TYPE_CHECKING:
    from mktme_sandbox.kernel.kernel import Kernel

__all__ = ["KhugepagedStats", "khugepaged_scan", "khugepaged_stats"]


@dataclass
class KhugepagedStats:
    full_scans: int = 0
    pages_collapsed: int = 0
    collapse_refused_keyid: int = 0
    collapse_alloc_failed: int = 0

    def text(self) -> str:
        return "".join(f"{name} {value}\n" for name, value in vars(self).items())


def khugepaged_stats(k: Kernel) -> str:
    """``mm/khugepaged``: the pass counters."""
    return k.khugepaged.text()


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
        if pfns is not None and _keyids_allow(k, vma, pfns):
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


def _keyids_allow(k: Kernel, vma: Vma, pfns: list[int]) -> bool:
    keyid = vma_keyid(vma, k.pte_layout)
    if not k.mitigations["khugepaged_keyid_check"]:
        return True
    if all(k.pages.page_keyid(p) == keyid for p in pfns):
        return True
    k.khugepaged.collapse_refused_keyid += 1
    k.vmstat.inc("thp_collapse_refused_keyid")
    return False


def _collapse(k: Kernel, mm: MmStruct, vma: Vma, haddr: int, pfns: list[int]) -> int:
    checked = k.mitigations["khugepaged_keyid_check"]
    keyid = vma_keyid(vma, k.pte_layout) if checked else 0
    with k.charging(mm.owner):
        head = k.alloc.alloc_huge_page(keyid, zero=False)
    if head is None:
        k.khugepaged.collapse_alloc_failed += 1
        k.vmstat.inc("thp_collapse_alloc_failed")
        return 0
    for i, pfn in enumerate(pfns):
        data = k.platform.load(pfn * PAGE_SIZE, PAGE_SIZE, k.pages.page_keyid(pfn))
        k.platform.store((head + i) * PAGE_SIZE, data, keyid)
    pmd = k.pte_layout.pfn_pte(head, vma.vm_page_prot | PteFlags.PSE | PteFlags.RW | PteFlags.DIRTY)
    k.pt.set_pte(mm.pgd, haddr, pmd, HPAGE_SIZE)
    k.pages.get_page(head)
    for pfn in pfns:
        k.pages.put_page(pfn)
    flush_tlb_range(k, mm, haddr, haddr + HPAGE_SIZE)
    k.vmstat.inc("thp_collapse_alloc")
    return 1
