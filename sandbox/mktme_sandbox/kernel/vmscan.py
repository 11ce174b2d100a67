"""Page reclaim to swap (mm/vmscan.c, mm/rmap.c try_to_unmap, mm/madvise.c MADV_PAGEOUT).

Rules kept:
- A page leaves memory by ``madvise ADDR LEN pageout`` (``MADV_PAGEOUT``) or
  by reclaim, which runs when an allocation finds no free page
  (``__alloc_pages_slowpath`` -> direct reclaim) and only after it fails is
  the allocation refused with ENOMEM.
- What can be swapped: a present (or PROT_NONE) 4 KiB anonymous page mapped
  by exactly one PTE, neither the zero page nor a KSM page, in a VMA that is
  not ``VM_LOCKED`` (mlocked pages never leave memory), and not pinned by a
  ``get_user_pages()`` in progress (``Kernel.pinned``: the pages an access of
  ``spaces/NAME/mem`` has translated and not yet copied). Huge pages are
  split first by ``pageout``; reclaim skips them.
- A slot is charged to the page's uid; a uid with limits holds at most half
  the device (docs/spec.md 8), beyond which its pages stay in memory.
- ``pageout()``: the page is written to a free slot through the kernel's
  direct mapping of the page's own KeyID (so the device gets plaintext, unless
  encrypted swap is on: ``kernel/swapfile.py``), its PTE becomes a swap entry,
  the TLB is flushed, and the page is freed (``arch_free_page`` flushes it as
  any free of an encrypted page).
- Reclaim is an LRU approximation, the second-chance clock of
  ``shrink_active_list``/``page_referenced``: spaces in creation order, pages
  in address order; a page whose PTE is young (the accessed bit the kernel
  sets when it maps a page) loses the bit and is skipped once; an old one is
  swapped. ``SWAP_CLUSTER_MAX`` (32) pages per reclaim call.

Left out: kswapd and watermarks, the page cache, the active/inactive lists
themselves, swapping shared and KSM pages (they need the anon_vma chain), and
THP swap.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from typing import TYPE_CHECKING

from mktme_sandbox.config import PAGE_SIZE
from mktme_sandbox.errors import fail
from mktme_sandbox.kernel.memory import flush_tlb_range, movable_page, split_huge_pages_in
from mktme_sandbox.kernel.pgtable import LeafEntry
from mktme_sandbox.kernel.pgtable_types import PteFlags
from mktme_sandbox.kernel.swapfile import swp_entry_to_pte
from mktme_sandbox.kernel.vma import VM, MmStruct, Vma

if TYPE_CHECKING:
    from mktme_sandbox.kernel.kernel import Kernel

__all__ = ["SWAP_CLUSTER_MAX", "madvise_pageout", "try_to_free_pages"]

SWAP_CLUSTER_MAX = 32
_ACCESSED = int(PteFlags.ACCESSED)


def pageout(k: Kernel, mm: MmStruct, entry: LeafEntry) -> bool:
    """``try_to_unmap_one()`` + ``swap_writepage()`` for the page the 4 KiB
    ``entry`` maps: the swap entry is stored where the walk found the PTE
    (``set_pte_at(mm, address, pvmw.pte, swp_pte)``), one 8-byte store."""
    va = entry.va
    pfn = movable_page(k, entry.pte)
    if pfn is None:
        return False
    owner = k.alloc.charged_uid(pfn)
    if not k.swap.may_take(owner):
        return False
    offset = k.swap.get_swap_page(owner)
    if offset is None:
        return False
    k.swap.writepage(offset, k.directmap.read_page(pfn))
    k.pt.set_pte_at(entry.ptep, swp_entry_to_pte(0, offset))
    k.tlb.flush_range(mm.asid, va, va + PAGE_SIZE)
    k.pages.put_page(pfn)
    k.vmstat.inc("pswpout")
    return True


def _small_ptes(k: Kernel, mm: MmStruct, vma: Vma, start: int, end: int) -> Iterator[LeafEntry]:
    for entry in k.pt.leaf_entries(mm.pgd, max(vma.start, start), min(vma.end, end)):
        if entry.size == PAGE_SIZE:
            yield entry


def madvise_pageout(k: Kernel, mm: MmStruct, start: int, end: int) -> int:
    """``MADV_PAGEOUT`` over a mapped range: EINVAL, changing nothing, when a VMA
    in it is locked (``can_madv_lru_vma``); else swap out what can be, until the
    device is full. Returns the pages written."""
    vmas = list(mm.overlapping(start, end))
    locked = next((v for v in vmas if v.vm_flags & VM.LOCKED), None)
    if locked is not None:
        fail(errno.EINVAL, f"madvise: pageout: {locked.start:#x}-{locked.end:#x} is mlocked")
    split_huge_pages_in(k, mm, start, end)
    done = 0
    for vma in vmas:
        for entry in _small_ptes(k, mm, vma, start, end):
            if movable_page(k, entry.pte) is None:
                continue
            if not pageout(k, mm, entry):
                full = "the swap device is full" if not k.swap.free() else "its share of swap"
                k.log.printk(f"madvise: pageout: {mm.name}: {done} pages written, then {full}")
                return done
            done += 1
    return done


def try_to_free_pages(k: Kernel, nr: int = SWAP_CLUSTER_MAX) -> int:
    """Direct reclaim: swap out up to ``nr`` pages, old ones first; returns the
    pages freed (0: nothing could be, the allocation fails with ENOMEM)."""
    if not k.swap.free():
        return 0
    k.vmstat.inc("allocstall_normal")
    freed = 0
    for _ in range(2):  # the second pass finds the pages the first one aged
        for mm, entry in _clock(k):
            if entry.pte & _ACCESSED:
                k.pt.set_pte_at(entry.ptep, entry.pte & ~_ACCESSED)  # ptep_clear_flush_young
                flush_tlb_range(k, mm, entry.va, entry.va + PAGE_SIZE)
                continue
            if not pageout(k, mm, entry):
                if not k.swap.free():
                    return freed  # the device is full
                continue  # its owner's share of swap is used up
            freed += 1
            if freed >= nr:
                return freed
    return freed


def _clock(k: Kernel) -> Iterator[tuple[MmStruct, LeafEntry]]:
    """Every swappable page's PTE, spaces in creation order, addresses ascending."""
    for mm in list(k.spaces.values()):
        for vma in mm.vmas():
            if vma.vm_flags & VM.LOCKED:
                continue
            for entry in _small_ptes(k, mm, vma, vma.start, vma.end):
                if movable_page(k, entry.pte) is not None:
                    yield mm, entry
