"""mremap (mm/mremap.c) for private anonymous memory with KeyIDs.

``mremap OLD OLDLEN NEWLEN [NEWADDR]``: without NEWADDR the mapping shrinks
or grows in place (no MREMAP_MAYMOVE); with NEWADDR it moves there
(MREMAP_MAYMOVE | MREMAP_FIXED), taking NEWLEN bytes.

Rules kept:
- ``move_vma()`` -> ``copy_vma()``: the new VMA is a copy of the old one,
  ``vm_page_prot`` and so the KeyID included, and ``copy_vma()`` first tries
  ``vma_merge()`` with the new place's neighbours, which patch 01 makes compare
  KeyIDs ("mm: Do no merge VMAs with different encryption KeyIDs" passes
  ``vma_keyid(vma)`` there): a moved encrypted VMA never joins a neighbour of
  another KeyID. With ``vma_merge_keyid_check`` off it does, and the merged
  VMA keeps the first one's KeyID: the moved pages keep theirs in the PTEs,
  later faults take the other.
- ``move_page_tables()`` moves the PTEs unchanged (frame, KeyID, flags); a
  huge PMD is split first. The old range is then unmapped.
- Growing in place needs free room after the VMA (ENOMEM otherwise, as
  without MREMAP_MAYMOVE); shrinking unmaps the tail.
- MREMAP_FIXED unmaps whatever the new range held (Linux's ``do_munmap()`` of
  it); the new range may not overlap the old one.
- Errnos as Linux's: EINVAL for an unaligned OLD or NEWADDR, a zero NEWLEN, a
  NEWLEN beyond TASK_SIZE, an overlap of the two ranges or a new range outside
  the user space (``mremap_to()``: "if (new_len > TASK_SIZE || new_addr >
  TASK_SIZE - new_len)"; v4.19 checks NEWLEN so only with NEWADDR and grows
  in place into ENOMEM, later kernels check it first in
  ``check_mremap_params()``: "Is the new length or address silly?"); EINVAL
  for an OLDLEN of 0 that would grow or move (``vma_to_resize()``: "!old_len
  is a special case where an attempt is made to 'duplicate' a mapping. This
  makes no sense for private mappings", and every mapping here is private);
  EFAULT when OLD is not mapped or OLDLEN runs past the end of its VMA
  (growing or moving); ENOMEM when growing in place finds no room (the next
  VMA, or the end of the user space) or the page tables for the move cannot
  be had. Every check runs before anything changes (v4.19 unmaps NEWADDR's
  range before ``vma_to_resize()`` refuses).

A moved VMA leaves its userfaultfd registration behind
(``mremap_userfaultfd_prep()`` without UFFD_FEATURE_EVENT_REMAP).

Left out: MREMAP_MAYMOVE without NEWADDR (the kernel choosing a place),
mremap of a locked VMA accounting (VM_LOCKED is moved with the VMA).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from mktme_sandbox.config import PAGE_SIZE
from mktme_sandbox.errors import fail
from mktme_sandbox.kernel.memory import flush_tlb_range, pte_page, split_huge_pmd
from mktme_sandbox.kernel.mmap import do_munmap, vma_merge
from mktme_sandbox.kernel.pgtable import PteAllocMap
from mktme_sandbox.kernel.pgtable_types import HPAGE_SIZE, TASK_SIZE
from mktme_sandbox.kernel.userfaultfd import dup_userfaultfd
from mktme_sandbox.kernel.vma import MMAP_MIN_ADDR, MmStruct, Vma

if TYPE_CHECKING:
    from mktme_sandbox.kernel.kernel import Kernel

__all__ = ["do_mremap"]


def _page_align(length: int) -> int:
    return (length + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


def do_mremap(
    k: Kernel, mm: MmStruct, old: int, old_len: int, new_len: int, new_addr: int | None
) -> None:
    if old & (PAGE_SIZE - 1):
        fail(errno.EINVAL, f"mremap: address {old:#x} is not page aligned")
    if new_len <= 0 or old_len < 0:
        fail(errno.EINVAL, f"mremap: lengths {old_len:#x} -> {new_len:#x}: NEWLEN must be positive")
    old_len, new_len = _page_align(old_len), _page_align(new_len)
    if new_len > TASK_SIZE:
        fail(errno.EINVAL, f"mremap: NEWLEN {new_len:#x} is beyond the user address space")
    if new_addr is not None:
        _check_fixed(old, old_len, new_addr, new_len)
        vma = _vma_to_resize(mm, old, old_len)
        _check_tables(k, mm, new_len)
        do_munmap(k, mm, new_addr, new_len)
        if old_len > new_len:
            do_munmap(k, mm, old + new_len, old_len - new_len)
        move_vma(k, mm, vma, old, min(old_len, new_len), new_addr, new_len)
        return
    if new_len <= old_len:
        if old_len > new_len:
            do_munmap(k, mm, old + new_len, old_len - new_len)
        return
    vma = _vma_to_resize(mm, old, old_len)
    end = old + new_len
    if end > TASK_SIZE:
        fail(errno.ENOMEM, f"mremap: {old:#x}+{new_len:#x} would end beyond the user address space")
    if old + old_len != vma.end or any(mm.overlapping(vma.end, end)):
        fail(
            errno.ENOMEM, f"mremap: no room to grow {old:#x}+{old_len:#x} to {new_len:#x} in place"
        )
    mm.replace(vma, vma.with_(end=end))  # vma_adjust()
    vma_merge(k, mm, vma.start, end)


def _check_fixed(old: int, old_len: int, new_addr: int, new_len: int) -> None:
    if new_addr & (PAGE_SIZE - 1):
        fail(errno.EINVAL, f"mremap: NEWADDR {new_addr:#x} is not page aligned")
    if new_addr < MMAP_MIN_ADDR or new_addr + new_len > TASK_SIZE:
        fail(errno.EINVAL, f"mremap: {new_addr:#x}+{new_len:#x} is outside the user address space")
    if new_addr < old + old_len and old < new_addr + new_len:
        fail(errno.EINVAL, f"mremap: {new_addr:#x}+{new_len:#x} overlaps {old:#x}+{old_len:#x}")


def _vma_to_resize(mm: MmStruct, old: int, old_len: int) -> Vma:
    """``vma_to_resize()``: the VMA holding [old, old + old_len), else EFAULT."""
    vma = mm.find_vma(old)
    if vma is None:
        fail(errno.EFAULT, f"mremap: {old:#x} is not mapped")
    if not old_len:
        fail(
            errno.EINVAL, f"mremap: OLDLEN 0 duplicates a mapping, only for shared ones ({old:#x})"
        )
    if old + old_len > vma.end:
        fail(errno.EFAULT, f"mremap: {old:#x}+{old_len:#x} runs past the end of its VMA")
    return vma


def _check_tables(k: Kernel, mm: MmStruct, new_len: int) -> None:
    """ENOMEM up front when the page tables of the new place may not be had:
    too few free pages, or more than the owner's page limit leaves (the
    tables are charged to it)."""
    wanted = -(-new_len // HPAGE_SIZE) + 2
    free = sum(k.alloc.free_pages_by_keyid().values())
    if wanted > free:
        fail(errno.ENOMEM, f"mremap: moving needs up to {wanted} page-table pages, {free} are free")
    with k.charging(mm.owner):
        k.alloc.check_limit(wanted, f"mremap: moving needs up to {wanted} page-table pages")


def move_vma(
    k: Kernel, mm: MmStruct, vma: Vma, old: int, length: int, new_addr: int, new_len: int
) -> None:
    """``copy_vma()`` at ``new_addr``, ``move_page_tables()``, then the old range goes."""
    moved = dup_userfaultfd(vma.with_(start=new_addr, end=new_addr + new_len))
    mm.insert(moved)  # copy_vma: same pgprot; mremap_userfaultfd_prep: unregistered
    move_page_tables(k, mm, old, new_addr, length)
    mm.wake_userfaults(old, old + length)
    for part in mm.isolate(old, old + length):
        mm.remove(part)
    k.pt.free_empty_tables(mm.pgd, old, old + length)
    flush_tlb_range(k, mm, old, old + length)
    vma_merge(k, mm, new_addr, new_addr + new_len)  # copy_vma's vma_merge (patch 01)


def move_page_tables(k: Kernel, mm: MmStruct, old: int, new_addr: int, length: int) -> None:
    """Every leaf of [old, old + length) to the same offset from ``new_addr``,
    unchanged: ``move_ptes()`` clears each old entry through the pointer its
    walk holds (``ptep_get_and_clear(mm, old_addr, old_pte)``) and stores it
    in the new table it allocated once (``set_pte_at(mm, new_addr, new_pte,
    pte)``), one 8-byte store each."""
    for va, size, pte in list(k.pt.iter_present(mm.pgd, old, old + length)):
        if size == HPAGE_SIZE:
            split_huge_pmd(k, mm, va, pte)
    with k.charging(mm.owner):
        new_ptep = PteAllocMap(k.pt, mm.pgd)
        for entry in k.pt.leaf_entries(mm.pgd, old, old + length):
            if pte_page(k, entry.pte, entry.size) is None:
                continue  # a forged entry stays behind and goes with the old range
            k.pt.set_pte_at(entry.ptep, 0)
            k.pt.set_pte_at(new_ptep(new_addr + (entry.va - old), entry.size), entry.pte)
