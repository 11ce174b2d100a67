"""KSM: one merge pass over mergeable VMAs (mm/ksm.c, reduced).

Models "mm/ksm: Do not merge pages with different KeyIDs". KSM compares page
contents through the kernel's mapping of each page, which with per-KeyID
direct mappings is the page's own KeyID, so it sees plaintext. Two pages with
equal plaintext but different KeyIDs must not merge: the surviving page is
encrypted with one key, while the other tenant's PTE (made from its own
VMA's pgprot) carries the other KeyID and would read it as garbage. Switch
``ksm_keyid_check`` off to watch exactly that.

A pass: hash every present, exclusive, anonymous 4K page of every
VM_MERGEABLE VMA; among pages with equal contents (and equal KeyIDs), keep one
as the KSM page, map it read-only in place of the others and free them. A
later write breaks copy-on-write (memory.do_wp_page).

Left out: the stable/unstable red-black trees and their two-scan rule (one
pass merges at once), KSM's page-count and sleep tunables, merging of huge pages.
"""

from __future__ import annotations

import errno
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mktme_sandbox.config import PAGE_SIZE
from mktme_sandbox.errors import fail
from mktme_sandbox.kernel.memory import do_wp_page, pte_page
from mktme_sandbox.kernel.page import PG
from mktme_sandbox.kernel.pgtable import LeafEntry
from mktme_sandbox.kernel.pgtable_types import PteFlags
from mktme_sandbox.kernel.vma import VM, MmStruct, Vma

if TYPE_CHECKING:
    from mktme_sandbox.kernel.kernel import Kernel

__all__ = ["KSM_TUNABLES", "KsmStats", "ksm_do_scan", "ksm_sysfs", "unmerge_ksm_pages"]


@dataclass
class KsmStats:
    full_scans: int = 0
    pages_merged: int = 0
    merge_refused_keyid: int = 0
    pages_unshared: int = 0  # unique pages left by the last pass (Linux's unstable tree)


KSM_TUNABLES = {"pages_to_scan": 100, "sleep_millisecs": 20}  # ksm.c's defaults; a pass takes all


def ksm_sysfs(k: Kernel) -> dict[str, int]:
    """The files of /sys/kernel/mm/ksm/ (Documentation/admin-guide/mm/ksm.rst)
    this model has, one value each: ``run`` is 0 (no ksmd; writing 1 runs one
    pass), ``pages_shared`` the KSM pages, ``pages_sharing`` the mappings of
    them beyond the first, ``pages_volatile`` 0 (a pass merges at once); then
    the sandbox's own counters under ``mktme_``."""
    kpages = (k.pages.flags_of() & PG.KSM) != 0
    shared = int(kpages.sum())
    return {
        "run": 0,
        "pages_shared": shared,
        "pages_sharing": int(k.pages.mapcounts_of()[kpages].sum()) - shared,
        "pages_unshared": k.ksm.pages_unshared,
        "pages_volatile": 0,
        "full_scans": k.ksm.full_scans,
        **KSM_TUNABLES,
        "mktme_pages_merged": k.ksm.pages_merged,
        "mktme_merge_refused_keyid": k.ksm.merge_refused_keyid,
    }


@dataclass(frozen=True)
class _Candidate:
    mm: MmStruct
    vma: Vma
    entry: LeafEntry
    """The PTE as the scan's walk found it: ``replace_page()`` stores there."""
    pfn: int


def ksm_do_scan(k: Kernel) -> int:
    """One full pass; returns the number of pages merged."""
    groups: dict[bytes, list[_Candidate]] = defaultdict(list)
    for cand in _candidates(k):
        groups[k.directmap.read_page(cand.pfn)].append(cand)
    merged = sum(_merge_group(k, group) for group in groups.values() if len(group) > 1)
    k.ksm.full_scans += 1
    k.ksm.pages_merged += merged
    k.ksm.pages_unshared = sum(not k.pages.PageKsm(c.pfn) for c in _candidates(k))
    k.vmstat.inc("mktme_ksm_pages_merged", merged)
    return merged


def _candidates(k: Kernel) -> list[_Candidate]:
    found = []
    for mm in k.spaces.values():
        for vma in mm.vmas():
            if not vma.vm_flags & VM.MERGEABLE:
                continue
            for entry in k.pt.leaf_entries(mm.pgd, vma.start, vma.end):
                pfn = pte_page(k, entry.pte, entry.size)
                if pfn is None or entry.size != PAGE_SIZE or not entry.pte & PteFlags.PRESENT:
                    continue
                if k.pages.is_zero_pfn(pfn) or not k.pages.PageAnon(pfn):
                    continue
                if k.pages.PageKsm(pfn) or k.pages.page_mapcount(pfn) == 1:
                    found.append(_Candidate(mm, vma, entry, pfn))
    return found


def _merge_group(k: Kernel, group: list[_Candidate]) -> int:
    """Merge pages of equal content; partition by KeyID when the check is on."""
    by_keyid: dict[int, list[_Candidate]] = defaultdict(list)
    for cand in group:
        keyid = k.pages.page_keyid(cand.pfn)
        by_keyid[keyid if k.mitigations["ksm_keyid_check"] else 0].append(cand)
    if len(by_keyid) > 1:
        refused = sum(len(c) for c in by_keyid.values()) - max(len(c) for c in by_keyid.values())
        k.ksm.merge_refused_keyid += refused
        k.vmstat.inc("mktme_ksm_merge_refused_keyid", refused)
    return sum(_merge_into_one(k, cands) for cands in by_keyid.values() if len(cands) > 1)


def _merge_into_one(k: Kernel, cands: list[_Candidate]) -> int:
    ksm_pages = [c for c in cands if k.pages.PageKsm(c.pfn)]
    kpage = (ksm_pages or cands)[0].pfn
    k.pages.SetPageKsm(kpage)
    merged = 0
    for cand in cands:
        # replace_page(): the new PTE is made from the sharer's own pgprot
        pte = k.pte_layout.pfn_pte(kpage, cand.vma.vm_page_prot)
        k.pt.set_pte_at(cand.entry.ptep, pte)  # set_pte_at_notify(mm, addr, ptep, newpte)
        va = cand.entry.va
        k.tlb.flush_range(cand.mm.asid, va, va + PAGE_SIZE)
        if cand.pfn != kpage:
            k.pages.get_page(kpage)
            k.pages.put_page(cand.pfn)
            merged += 1
    return merged


def unmerge_ksm_pages(k: Kernel, mm: MmStruct, start: int, end: int) -> None:
    """MADV_UNMERGEABLE: break every KSM page mapped in [start, end).

    Each break takes a new page, charged to the space's owner: ENOMEM before
    the first one when there are not enough free or the owner's page limit
    cannot cover them, so the range is never left half unmerged.
    """
    shared = []
    for entry in k.pt.leaf_entries(mm.pgd, start, end):
        pfn = pte_page(k, entry.pte, entry.size)
        if pfn is not None and entry.size == PAGE_SIZE and k.pages.PageKsm(pfn):
            shared.append(entry)
    free = sum(k.alloc.free_pages_by_keyid().values())
    if len(shared) > free:
        fail(errno.ENOMEM, f"madvise: unmerging needs {len(shared)} pages, {free} are free")
    with k.charging(mm.owner):
        k.alloc.check_limit(len(shared), f"madvise: unmerging needs {len(shared)} pages")
        for entry in shared:
            vma = mm.find_vma(entry.va)
            assert vma is not None
            ptep = entry.ptep  # the entry the walk found: do_wp_page writes there
            do_wp_page(k, mm, vma, entry.va, ptep._replace(pte=entry.pte & ~int(PteFlags.RW)))
