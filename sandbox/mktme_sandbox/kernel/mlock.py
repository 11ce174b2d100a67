"""mlock and munlock (mm/mlock.c) for private anonymous memory with KeyIDs.

Rules kept:
- ``mlock_fixup()`` sets or clears VM_LOCKED (0x2000, include/linux/mm.h) on
  the VMAs of the range, splitting at its ends; afterwards neighbours merge
  through ``vma_merge()``, which patch 01 makes compare KeyIDs ("mm: Do no
  merge VMAs with different encryption KeyIDs" adds the ``vma_keyid(vma)``
  argument at mlock_fixup's call), so locking a range never joins VMAs of
  two KeyIDs (switch ``vma_merge_keyid_check``).
- mlock populates (``__mm_populate()``): every page of an accessible VMA is
  faulted in, for write where the VMA is writable (``FOLL_WRITE`` for
  ``VM_WRITE`` private mappings), unless ``follow_page()`` finds it mapped
  with that access already (``mmap.mm_populate``), and marked PG_mlocked
  (``unevictable_pgs_mlocked``); pages faulted later in a locked VMA are
  marked as they are mapped. munlock clears PG_mlocked on the range's pages
  (``unevictable_pgs_munlocked``).
- Errnos as Linux's: EINVAL for an unaligned address or a bad length, ENOMEM
  for a range outside the user space or with a hole; an aligned zero length
  does nothing. ENOMEM, with nothing changed, when populating cannot get its
  pages.
- Reclaim and swap skip VM_LOCKED VMAs (``VM.LOCKED``).

Left out: MLOCK_ONFAULT, mlockall, RLIMIT_MEMLOCK, and re-marking a page that
another locked VMA still maps after munlock (``try_to_munlock``: only a fork
shares pages here, and a child never inherits VM_LOCKED).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mktme_sandbox.kernel.memory import mlock_vma_page, pte_page
from mktme_sandbox.kernel.mmap import (
    check_mapped,
    check_populate,
    check_range,
    mm_populate,
    nothing_to_do,
    vma_merge,
)
from mktme_sandbox.kernel.vma import VM, MmStruct

if TYPE_CHECKING:
    from mktme_sandbox.kernel.kernel import Kernel

__all__ = ["do_mlock", "do_munlock"]


def do_mlock(k: Kernel, mm: MmStruct, addr: int, length: int) -> None:
    if nothing_to_do(addr, length):
        return
    end = check_range("mlock", addr, length)
    check_mapped("mlock", mm, addr, end)
    check_populate(k, mm, addr, end, VM.WRITE, 0, "mlock")  # the worst case: every page new
    before = mm.isolate(addr, end)
    for vma in before:
        mm.replace(vma, vma.with_(vm_flags=vma.vm_flags | VM.LOCKED))
    try:
        mm_populate(k, mm, addr, end)
    except BaseException:
        for old, new in zip(before, mm.isolate(addr, end), strict=True):
            mm.replace(new, old)
        raise
    _mark_pages(k, mm, addr, end, True)
    vma_merge(k, mm, addr, end)


def do_munlock(k: Kernel, mm: MmStruct, addr: int, length: int) -> None:
    if nothing_to_do(addr, length):
        return
    end = check_range("munlock", addr, length)
    check_mapped("munlock", mm, addr, end)
    for vma in mm.isolate(addr, end):
        mm.replace(vma, vma.with_(vm_flags=vma.vm_flags & ~VM.LOCKED))
    _mark_pages(k, mm, addr, end, False)
    vma_merge(k, mm, addr, end)


def _mark_pages(k: Kernel, mm: MmStruct, start: int, end: int, lock: bool) -> None:
    """PG_mlocked on (``mlock_vma_page``) or off (``munlock_vma_page``) for the
    anonymous pages mapped in [start, end)."""
    for _, size, pte in k.pt.iter_present(mm.pgd, start, end):
        pfn = pte_page(k, pte, size)
        if pfn is None or not k.pages.PageAnon(pfn):
            continue
        if lock:
            mlock_vma_page(k, pfn)
        elif k.pages.PageMlocked(pfn):
            k.pages.ClearPageMlocked(pfn)
            k.vmstat.inc("unevictable_pgs_munlocked")
