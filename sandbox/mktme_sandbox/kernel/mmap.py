"""mmap, munmap, mprotect, encrypt_mprotect and madvise (mm/mmap.c,
mm/mprotect.c, mm/madvise.c) for private anonymous memory with KeyIDs.

Rules kept:
- Every call checks all of its arguments and the whole range before it
  changes anything: a rejected call leaves no trace (docs/spec.md 7, "Nothing is
  half-applied"). Errnos are Linux's: EINVAL for bad arguments and unaligned
  addresses, ENOMEM for ranges outside the user address space or with holes
  (mprotect, madvise), EINVAL for a fixed mapping over an existing one (we
  never replace silently), ENOKEY for a KeyID that is not programmed.
- ``mprotect`` keeps the KeyID: the new vm_page_prot and every PTE go through
  ``pte_modify()``, which with patch 09 ("Preserve KeyID on pte_modify() and
  pgprot_modify()") keeps the KeyID bits; switch
  ``pte_modify_preserve_keyid`` off and they are dropped.
- ``madvise pageout`` (``MADV_PAGEOUT``) swaps the range's pages out
  (``kernel/vmscan.py``); mprotect leaves swap entries as they are.
- ``encrypt_mprotect`` is mprotect plus a KeyID; it discards the pages of the
  range (the data is not preserved, as in the proposed Linux API).
- After a change, neighbours are merged by ``vma_merge()``, which refuses
  different KeyIDs ("mm: Do no merge VMAs with different encryption KeyIDs")
  unless ``vma_merge_keyid_check`` is off.

Left out: MAP_SHARED, file mappings, hint addresses (every mapping is fixed),
mremap, mlock.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

import numpy as np

from mktme_sandbox.config import PAGE_SIZE
from mktme_sandbox.errors import fail
from mktme_sandbox.kernel.memory import (
    flush_tlb_range,
    handle_mm_fault,
    pte_page,
    split_huge_pmds,
    transhuge_vma_suitable,
    zap_page_range,
)
from mktme_sandbox.kernel.pgtable_types import HPAGE_SIZE, PAGE_SHIFT, TASK_SIZE, PteFlags
from mktme_sandbox.kernel.swapfile import is_swap_pte
from mktme_sandbox.kernel.vma import (
    MMAP_MIN_ADDR,
    VM,
    MmStruct,
    Vma,
    vm_get_page_prot,
    vma_keyid,
)

if TYPE_CHECKING:
    from mktme_sandbox.kernel.kernel import Kernel

__all__ = [
    "ADVICE",
    "PROTS",
    "do_encrypt_mprotect",
    "do_madvise",
    "do_mmap",
    "do_mprotect",
    "do_munmap",
    "vma_merge",
]

PROTS: dict[str, VM] = {
    "---": VM.NONE, "none": VM.NONE,
    "r--": VM.READ, "r": VM.READ,
    "rw-": VM.READ | VM.WRITE, "rw": VM.READ | VM.WRITE,
    "r-x": VM.READ | VM.EXEC, "rx": VM.READ | VM.EXEC,
    "rwx": VM.READ | VM.WRITE | VM.EXEC,
}  # fmt: skip
ADVICE = ("mergeable", "unmergeable", "hugepage", "dontneed", "pageout")
_ACCESS = VM.READ | VM.WRITE | VM.EXEC
_PRESENT, _RW, _PSE = int(PteFlags.PRESENT), int(PteFlags.RW), int(PteFlags.PSE)


def check_range(op: str, addr: int, length: int) -> int:
    """Alignment and bounds as Linux checks them; returns the aligned end."""
    if addr & (PAGE_SIZE - 1):
        fail(errno.EINVAL, f"{op}: address {addr:#x} is not page aligned")
    if length <= 0:
        fail(errno.EINVAL, f"{op}: length must be positive, not {length}")
    end = addr + ((length + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1))
    if addr < MMAP_MIN_ADDR or end > TASK_SIZE:
        fail(
            errno.ENOMEM,
            f"{op}: {addr:#x}-{end:#x} is outside the user address space "
            f"{MMAP_MIN_ADDR:#x}-{TASK_SIZE:#x}",
        )
    return end


def check_mapped_range(op: str, mm: MmStruct, addr: int, length: int) -> int:
    """A range a command needs mapped whole (mbind, migrate): EINVAL/ENOMEM as
    madvise; returns the aligned end."""
    end = check_range(op, addr, length)
    check_mapped(op, mm, addr, end)
    return end


def check_mapped(op: str, mm: MmStruct, addr: int, end: int) -> None:
    if not mm.covers(addr, end):
        fail(errno.ENOMEM, f"{op}: {addr:#x}-{end:#x} is not fully mapped")


def _prot_for(k: Kernel, vm_flags: VM, keyid: int) -> int:
    return vm_get_page_prot(vm_flags) | k.pte_layout.keyid_prot(keyid)


# --- mmap / munmap ------------------------------------------------------------


def do_mmap(
    k: Kernel,
    mm: MmStruct,
    addr: int,
    length: int,
    prot: VM,
    keyid: int,
    populate: bool,
    uid: int = 0,
) -> None:
    end = check_range("mmap", addr, length)
    if any(True for _ in mm.overlapping(addr, end)):
        fail(errno.EINVAL, f"mmap: {addr:#x}-{end:#x} overlaps an existing mapping")
    k.keys.check_usable(keyid, "mmap", uid)
    if populate and prot & _ACCESS:
        check_populate(k, mm, addr, end, prot, keyid)
    mm.insert(Vma(addr, end, prot, _prot_for(k, prot, keyid)))
    if populate:
        try:
            mm_populate(k, mm, addr, end)
        except BaseException:
            do_munmap(k, mm, addr, end - addr)
            raise
    vma_merge(k, mm, addr, end)


def check_populate(
    k: Kernel, mm: MmStruct, start: int, end: int, prot: VM, keyid: int, op: str = "mmap"
) -> None:
    """ENOMEM before faulting when the pages cannot all be had, from memory or
    within the owner's ``max_pages_per_uid``: a populate that fails late would
    hold the machine for minutes, then be undone."""
    pages = (end - start) >> 12
    needs_pages = bool(prot & VM.WRITE) or keyid != 0  # else the zero page
    tables = -(-(end - start) // HPAGE_SIZE) + 2
    wanted = (pages if needs_pages else 0) + tables
    free = sum(k.alloc.free_pages_by_keyid().values())
    if wanted > free:
        fail(errno.ENOMEM, f"{op}: populate needs {wanted} pages, {free} are free")
    with k.charging(mm.owner):
        k.alloc.check_limit(wanted, f"{op}: populate")


def mm_populate(k: Kernel, mm: MmStruct, start: int, end: int) -> None:
    """MAP_POPULATE and mlock (``populate_vma_page_range()`` ->
    ``__get_user_pages()``): fault every page that ``follow_page_mask()`` does
    not find mapped with the access wanted, for write where the VMA is
    writable. A THP a fault maps covers the rest of its 2M (``page_mask``)."""
    for vma in list(mm.overlapping(start, end)):
        if not vma.vm_flags & _ACCESS:
            continue
        write = bool(vma.vm_flags & VM.WRITE)
        skip_to = 0
        for page in _pages_to_fault(k, mm, max(vma.start, start), min(vma.end, end), write):
            if page < skip_to:
                continue
            pte = handle_mm_fault(k, mm, vma, page, write)
            haddr = page & ~(HPAGE_SIZE - 1)
            if pte & _PSE and transhuge_vma_suitable(vma, haddr):  # only a PMD has PSE there
                skip_to = haddr + HPAGE_SIZE  # do_huge_pmd_anonymous_page mapped it whole


def _pages_to_fault(k: Kernel, mm: MmStruct, start: int, end: int, write: bool) -> list[int]:
    """The pages of ``[start, end)`` that ``follow_page_mask()`` would not
    return: no present leaf maps them, or (for ``FOLL_WRITE``) not a writable
    one. One walk of the range, one numpy pass per PTE table."""
    leaves = k.pt.leaf_arrays(mm.pgd, start, end)
    need = _PRESENT | (_RW if write else 0)
    ok = (leaves.pte & np.uint64(need)) == np.uint64(need)
    va = leaves.va[ok].astype(np.int64)
    lo = np.maximum(va, start)
    hi = np.minimum(va + leaves.size[ok].astype(np.int64), end)
    first, count = (lo - start) >> PAGE_SHIFT, (hi - lo) >> PAGE_SHIFT
    # every page index of every leaf: each leaf's first, plus 0..count-1
    offsets = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
    mapped = np.zeros((end - start) >> PAGE_SHIFT, dtype=bool)
    mapped[np.repeat(first, count) + offsets] = True
    pages: list[int] = (start + (np.flatnonzero(~mapped) << PAGE_SHIFT)).tolist()
    return pages


def do_munmap(k: Kernel, mm: MmStruct, addr: int, length: int) -> None:
    if addr & (PAGE_SIZE - 1) or length <= 0 or addr + length > TASK_SIZE:
        fail(errno.EINVAL, f"munmap: bad range {addr:#x}+{length:#x}")
    end = addr + ((length + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1))
    zap_page_range(k, mm, addr, end)
    mm.wake_userfaults(addr, end)
    for vma in mm.isolate(addr, end):
        mm.remove(vma)


# --- mprotect / encrypt_mprotect ------------------------------------------------


MAX_MAP_COUNT = 65530
"""``vm.max_map_count`` at its default (``DEFAULT_MAX_MAP_COUNT``: USHRT_MAX
minus MAPCOUNT_ELF_CORE_MARGIN): the most VMAs one space may have."""


def check_map_count(op: str, mm: MmStruct, added: int) -> None:
    """ENOMEM, before anything changes, when ``added`` more VMAs would take the
    space past ``MAX_MAP_COUNT`` (mm/mmap.c: do_mmap()'s "Too many
    mappings?", split_vma(), do_munmap() when it cuts a hole in one VMA;
    mremap's move_vma() asks for room for 3). Nothing added (a munmap of
    whole VMAs) always passes, so a space at the limit can shrink."""
    if added and mm.map_count + added > MAX_MAP_COUNT:
        fail(
            errno.ENOMEM,
            f"{op}: the space has {mm.map_count} mappings, and {added} more would "
            f"pass vm.max_map_count ({MAX_MAP_COUNT})",
        )


def vmas_cut(mm: MmStruct, start: int, end: int) -> int:
    """How many VMAs a change of ``[start, end)`` splits (mprotect, madvise, mlock
    ...): one per edge that falls strictly inside a VMA. 0 for an unaligned
    ``start``, which the command's own checks refuse (EINVAL comes first)."""
    if start % PAGE_SIZE:
        return 0
    cuts = 0
    for edge in (start, end):
        vma = mm.find_vma(edge)
        cuts += vma is not None and vma.start < edge
    return cuts


def vmas_holed(mm: MmStruct, start: int, end: int) -> int:
    """1 when unmapping ``[start, end)`` leaves one VMA in two pieces (a hole
    inside it: do_munmap()'s ``end < vma->vm_end`` case), else 0."""
    vma = None if start % PAGE_SIZE else mm.find_vma(start)
    return int(vma is not None and vma.start < start and end < vma.end)


def nothing_to_do(addr: int, length: int) -> bool:
    """Linux: an aligned zero-length mprotect or madvise succeeds doing nothing."""
    return length == 0 and not addr & (PAGE_SIZE - 1)


def do_mprotect(k: Kernel, mm: MmStruct, addr: int, length: int, prot: VM) -> None:
    if nothing_to_do(addr, length):
        return
    end = check_range("mprotect", addr, length)
    check_mapped("mprotect", mm, addr, end)
    split_huge_pmds(k, mm, addr, end)
    preserve = k.mitigations["pte_modify_preserve_keyid"]
    for vma in mm.isolate(addr, end):
        flags = (vma.vm_flags & ~_ACCESS) | prot
        new_prot = k.pte_layout.pgprot_modify(vma.vm_page_prot, vm_get_page_prot(flags), preserve)
        new = vma.with_(vm_flags=flags, vm_page_prot=new_prot)
        mm.replace(vma, new)
        _change_protection(k, mm, new, preserve)
    flush_tlb_range(k, mm, addr, end)
    vma_merge(k, mm, addr, end)


def _change_protection(k: Kernel, mm: MmStruct, vma: Vma, preserve: bool) -> None:
    """change_pte_range(): every present PTE through pte_modify(), stored where
    the walk found it (``ptep_modify_prot_commit(vma, addr, pte, ptent)``)."""
    base = vm_get_page_prot(vma.vm_flags)
    for entry in k.pt.leaf_entries(mm.pgd, vma.start, vma.end):
        pte, size = entry.pte, entry.size
        if is_swap_pte(pte):
            continue  # a swap entry holds no protection: the page gets the VMA's at swap-in
        new = k.pte_layout.pte_modify(pte, base, preserve, size)
        pfn = pte_page(k, pte, size)
        if (
            pfn is not None
            and vma.vm_flags & VM.WRITE
            and _exclusive(k, pfn)
            and pte & PteFlags.DIRTY
        ):
            new |= int(PteFlags.RW)
        k.pt.set_pte_at(entry.ptep, new)


def _exclusive(k: Kernel, pfn: int) -> bool:
    return k.pages.page_exclusive(pfn)


def do_encrypt_mprotect(
    k: Kernel, mm: MmStruct, addr: int, length: int, prot: VM, keyid: int, uid: int = 0
) -> None:
    if nothing_to_do(addr, length):
        k.keys.check_usable(keyid, "encrypt_mprotect", uid)
        return
    end = check_range("encrypt_mprotect", addr, length)
    k.keys.check_usable(keyid, "encrypt_mprotect", uid)
    check_mapped("encrypt_mprotect", mm, addr, end)
    zap_page_range(k, mm, addr, end)
    for vma in mm.isolate(addr, end):
        flags = (vma.vm_flags & ~_ACCESS) | prot
        mm.replace(vma, vma.with_(vm_flags=flags, vm_page_prot=_prot_for(k, flags, keyid)))
    vma_merge(k, mm, addr, end)


# --- madvise ------------------------------------------------------------------


def do_madvise(k: Kernel, mm: MmStruct, addr: int, length: int, advice: str) -> None:
    if advice not in ADVICE:
        fail(errno.EINVAL, f"madvise: unknown advice {advice!r} (one of {', '.join(ADVICE)})")
    if nothing_to_do(addr, length):
        return
    end = check_range("madvise", addr, length)
    check_mapped("madvise", mm, addr, end)
    if advice == "dontneed":
        zap_page_range(k, mm, addr, end)
        return
    if advice == "pageout":
        from mktme_sandbox.kernel.vmscan import madvise_pageout

        madvise_pageout(k, mm, addr, end)
        return
    if advice == "unmergeable":
        from mktme_sandbox.kernel.ksm import unmerge_ksm_pages

        unmerge_ksm_pages(k, mm, addr, end)  # checks it can break every KSM page first
    flag = VM.HUGEPAGE if advice == "hugepage" else VM.MERGEABLE
    for vma in mm.isolate(addr, end):
        flags = vma.vm_flags & ~flag if advice == "unmergeable" else vma.vm_flags | flag
        mm.replace(vma, vma.with_(vm_flags=flags))
    vma_merge(k, mm, addr, end)


# --- vma_merge ----------------------------------------------------------------


def vma_merge(k: Kernel, mm: MmStruct, start: int, end: int) -> None:
    """Merge neighbours in and around [start, end) where Linux would."""
    merged: list[Vma] = []
    for vma in list(mm.overlapping(max(start - 1, 0), end + 1)):
        prev = merged[-1] if merged else None
        if prev is not None and _can_merge(k, prev, vma):
            mm.remove(prev)
            mm.remove(vma)
            vma = prev.with_(end=vma.end)  # the merged VMA keeps prev's pgprot
            mm.insert(vma)
            merged[-1] = vma
            k.vmstat.inc("mktme_vma_merge")
        else:
            merged.append(vma)


def _merge_key(vma: Vma) -> tuple[VM, int, int]:
    """What two neighbours must share besides the KeyID: ``vm_flags``, the
    policy (``mpol_equal()``) and the userfaultfd context
    (``is_mergeable_vm_userfaultfd_ctx()``)."""
    return vma.vm_flags, vma.vm_policy, vma.vm_userfaultfd_ctx


def _can_merge(k: Kernel, prev: Vma, vma: Vma) -> bool:
    if prev.end != vma.start or _merge_key(prev) != _merge_key(vma):
        return False
    if vma_keyid(prev, k.pte_layout) == vma_keyid(vma, k.pte_layout):
        return True
    if k.mitigations["vma_merge_keyid_check"]:
        k.vmstat.inc("mktme_vma_merge_refused_keyid")
        return False
    return True
