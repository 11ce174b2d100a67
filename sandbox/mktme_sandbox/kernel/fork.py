"""fork(): a copy of an address space, its pages shared copy-on-write (kernel/fork.c
``dup_mmap()``, mm/memory.c ``copy_page_range()``).

Rules kept:
- The child gets a copy of every VMA, ``vm_page_prot`` and so the KeyID
  included; VM_LOCKED is not inherited (``dup_mmap()``: ``tmp->vm_flags &=
  ~(VM_LOCKED | VM_LOCKONFAULT)``), nor a userfaultfd registration
  (``dup_userfaultfd()`` without UFFD_FEATURE_EVENT_FORK).
- ``copy_one_pte()``: "If it's a COW mapping, write protect it both in the
  parent and the child" (``ptep_set_wrprotect(src_mm, addr, src_pte); pte =
  pte_wrprotect(pte)``); the child's PTE is the parent's, KeyID bits
  included, and the page gains a mapping (``get_page``, ``page_dup_rmap``).
  The zero page is shared without a count, the huge zero page with one. A
  swap entry is copied as it is and its slot gains a reference
  (``swap_duplicate()``): both sides swap the page back in from that slot.
- The first write on either side breaks COW in ``do_wp_page()`` (memory.py):
  a new page from ``alloc_page_vma()`` with the VMA's KeyID, filled through
  each page's own KeyID; the last mapper reuses the page.
- The child belongs to the caller; its name follows ``create_space``'s rules
  (EINVAL, EEXIST). A fork that cannot get its page tables (ENOMEM) leaves
  no child.

Left out: sharing a THP across fork (``copy_huge_pmd()``): the parent's huge
PMDs are split first, so both sides share 4K pages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mktme_sandbox.kernel.memory import flush_tlb_range, mapped_page, pte_page, split_huge_pmd
from mktme_sandbox.kernel.pgtable import LeafEntry, Lookup, PteAllocMap
from mktme_sandbox.kernel.pgtable_types import HPAGE_SIZE, PteFlags
from mktme_sandbox.kernel.swapfile import is_swap_pte, swp_offset, swp_type
from mktme_sandbox.kernel.userfaultfd import dup_userfaultfd
from mktme_sandbox.kernel.vma import VM, MmStruct, Vma

if TYPE_CHECKING:
    from mktme_sandbox.kernel.kernel import Kernel

__all__ = ["dup_mm"]

_RW = int(PteFlags.RW)


def dup_mm(k: Kernel, parent: MmStruct, name: str, uid: int) -> MmStruct:
    """The space ``name``, owned by ``uid``: a copy-on-write copy of ``parent``."""
    child = k.create_space(name, uid)
    try:
        with k.charging(uid):
            for vma in parent.vmas():
                child.insert(dup_userfaultfd(vma.with_(vm_flags=vma.vm_flags & ~VM.LOCKED)))
                copy_page_range(k, parent, child, vma)
    except BaseException:
        k.destroy_space(name)
        raise
    k.log.printk(f"fork: space {parent.name} -> {name} ({len(parent.vmas())} VMAs)")
    return child


def copy_page_range(k: Kernel, src: MmStruct, dst: MmStruct, vma: Vma) -> None:
    """Share every mapped page of ``vma``, write-protected on both sides:
    ``copy_pte_range()`` allocates the child's PTE table once
    (``pte_alloc_map_lock(dst_mm, dst_pmd, addr)``) and steps both pointers
    through the tables (``copy_one_pte(dst_mm, src_mm, dst_pte, src_pte,
    ...)``), one 8-byte store per entry on each side. The parent's entries
    are read again after an allocation of the child's tables that ran direct
    reclaim (which swaps pages out), as Linux reads ``src_pte`` only after
    ``pte_alloc_map_lock()``."""
    for va, size, pte in list(k.pt.iter_present(src.pgd, vma.start, vma.end)):
        page = pte_page(k, pte, size)
        if size == HPAGE_SIZE and page is not None and not k.pages.is_zero_pfn(page):
            split_huge_pmd(k, src, va, pte)
    dst_ptep = PteAllocMap(k.pt, dst.pgd)
    entries = k.pt.leaf_entries(src.pgd, vma.start, vma.end)
    i = 0
    while i < len(entries):
        entry = entries[i]
        stalls = k.vmstat["allocstall_normal"]
        dst_pte = dst_ptep(entry.va, entry.size)  # the child's table before the parent's PTEs
        if k.vmstat["allocstall_normal"] != stalls:
            # its allocation ran direct reclaim, which may have swapped out pages
            # of the rest of the range: read their entries again
            entries[i:] = k.pt.leaf_entries(src.pgd, entry.va, vma.end)
            continue
        copy_one_pte(k, src, entry, dst_pte)
        i += 1
    flush_tlb_range(k, src, vma.start, vma.end)


def copy_one_pte(k: Kernel, src: MmStruct, entry: LeafEntry, dst_pte: Lookup) -> None:
    """``copy_one_pte(dst_mm, src_mm, dst_pte, src_pte, ...)``: the parent's
    entry write-protected where it lies, the child's stored in ``dst_pte``."""
    va, size, pte = entry.va, entry.size, entry.pte
    if is_swap_pte(pte):
        copy_swap_entry(k, src, dst_pte, va, pte)
        return
    pfn = pte_page(k, pte, size)
    if pfn is None or not mapped_page(k, pfn):
        k.log.printk(f"BUG: Bad page map in space {src.name}: {va:#x} pte:{pte:#018x}")
        return
    if pte & _RW:
        pte &= ~_RW
        k.pt.set_pte_at(entry.ptep, pte)  # ptep_set_wrprotect(src_mm, addr, src_pte)
    k.pt.set_pte_at(dst_pte, pte)
    if size == HPAGE_SIZE and k.pages.is_zero_pfn(pfn):
        k.huge_zero_refs += 1  # mm_get_huge_zero_page()
    k.pages.get_page(pfn)


def copy_swap_entry(k: Kernel, src: MmStruct, dst_pte: Lookup, va: int, pte: int) -> None:
    """``copy_one_pte()`` of a swap entry: ``swap_duplicate()`` and the same entry
    in the child, so both read the page back from the one slot."""
    offset = swp_offset(pte)
    if swp_type(pte) != 0 or not k.swap.valid_slot(offset):
        k.log.printk(f"BUG: Bad swap entry in space {src.name}: {va:#x} pte:{pte:#018x}")
        return
    k.swap.swap_duplicate(offset)
    k.pt.set_pte_at(dst_pte, pte)
