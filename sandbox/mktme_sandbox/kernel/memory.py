"""Page faults, the zero page, and virtual memory access (mm/memory.c).

Models ``handle_mm_fault()`` for private anonymous memory and "mm: Do not use
zero page in encrypted pages": a read fault in a KeyID-0 VMA maps the shared
zero page; in an encrypted VMA it allocates a zeroed page of the VMA's KeyID,
because the zero page mapped with KeyID N would be read through key N and
come out as garbage (switch ``no_zero_page_encrypted`` off to watch that).
Write faults allocate with the VMA's KeyID (``vma_keyid``); a write to the zero
page or to a KSM page breaks copy-on-write.

PTEs are made as Linux makes them, ``pfn_pte(pfn, vma->vm_page_prot)``, so the
KeyID comes from the VMA's protection bits. Every access translates through
the page tables in emulated memory, via the TLB; like hardware, the CPU side
uses the KeyID found in the PTE, while kernel copies go through the direct
mapping of the page's own KeyID (``page_address()``, kernel/directmap.py).

A fault takes the page tables first and the page last, as
``__handle_mm_fault()`` allocates the PUD, PMD and PTE tables before
``do_anonymous_page()`` allocates the page, and one that fails (ENOMEM at any
step: memory exhausted, or the owner's ``max_pages_per_uid``) frees the
tables it left empty: it leaves the machine as it found it. Pages are charged
to the space's owner (``Kernel.charging``).

Transparent huge pages at fault (``do_huge_pmd_anonymous_page``): in a
``madvise hugepage`` VMA, a fault on an empty PMD whose 2M range lies inside
the VMA maps a 2M page allocated for the VMA's KeyID through the one
``alloc_hugepage_vma()`` (patch 04; khugepaged uses it too), or, for a read in
a KeyID-0 VMA only, the huge zero page (patch 02's huge_memory.c hunk). No 2M
page free: the fault falls back to 4K (``thp_fault_fallback``).

Every page a fault or a COW allocates comes from ``alloc_page_vma()``, which
gives it the VMA's KeyID (patch 05; switch ``alloc_page_vma_keyid``).

Swap (``do_swap_page``): a fault on a swap entry allocates a page for the
VMA's KeyID (prepared as any allocation), reads the slot into it through that
KeyID, frees the slot and maps the page, writable at once on a write fault
(the page is exclusive). Pages an access has translated stay pinned
(``Kernel.pinned``) until it has copied them, so that reclaim run by a later
page's fault cannot take them.

Userfaultfd (missing mode, ``kernel/userfaultfd.py``): a fault on an empty
entry of a registered VMA is queued and fails with EAGAIN
(``handle_userfault``) before any table or page is allocated.

Left out: file pages, the swap cache, accessed/dirty bits set by the
walker (PTEs are made young, and dirty on a write fault), sharing a THP across
fork (fork splits it first).
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn

from mktme_sandbox.config import PAGE_SIZE
from mktme_sandbox.errors import SandboxError, fail
from mktme_sandbox.kernel.page import PG
from mktme_sandbox.kernel.pgtable import Lookup
from mktme_sandbox.kernel.pgtable_types import HPAGE_SIZE, USER_END, Level, PteFlags
from mktme_sandbox.kernel.swapfile import PTE_MAPPED, is_swap_pte, swp_offset, swp_type
from mktme_sandbox.kernel.tlb import tlb_entry
from mktme_sandbox.kernel.vma import VM, MmStruct, Vma, vma_keyid, vma_policy_nodes

if TYPE_CHECKING:
    from mktme_sandbox.kernel.kernel import Kernel

__all__ = [
    "PTE_MAPPED",
    "UFFD_PAGEFAULT_FLAG_WRITE",
    "access_vm",
    "flush_tlb_mm",
    "get_user_pages",
    "handle_mm_fault",
    "movable_page",
    "pte_alloc_map",
    "pte_page",
    "split_huge_pages_in",
    "zap_page_range",
]

_WRITE_BITS = int(PteFlags.RW | PteFlags.DIRTY)
UFFD_PAGEFAULT_FLAG_WRITE = 1 << 0  # include/uapi/linux/userfaultfd.h
_PSE = int(PteFlags.PSE)
# the flags the fault and access paths test, as plain ints: ``int & IntFlag``
# builds an enum member each time, a microsecond per test on the fault path
_PRESENT = int(PteFlags.PRESENT)
_RW = int(PteFlags.RW)
_VM_READ, _VM_WRITE, _VM_LOCKED = int(VM.READ), int(VM.WRITE), int(VM.LOCKED)
_VM_UFFD_MISSING = int(VM.UFFD_MISSING)
_PGD_SIZE = Level.PGD.size
_VM_THP_MASK, _VM_THP = int(VM.HUGEPAGE | VM.NOHUGEPAGE), int(VM.HUGEPAGE)
_ANON = PG.ANON  # once: an enum member lookup per fault costs more than a global


def pte_page(k: Kernel, pte: int, size: int = PAGE_SIZE) -> int | None:
    """The PFN a leaf entry maps, or None when it lies beyond physical memory.

    Entries the kernel made are always valid; entries rewritten through
    ``keyids/0/mem`` may be anything, and every user of a PTE's frame goes
    through here so that such garbage is skipped, never indexed.
    """
    pfn = k.pte_layout.pte_pfn(pte, size)
    return pfn if pfn + (size >> 12) <= k.pages.nr_pages else None


# --- faults -----------------------------------------------------------------


def handle_mm_fault(k: Kernel, mm: MmStruct, vma: Vma, addr: int, write: bool) -> int:
    """Resolve a fault at ``addr``; return the new PTE. A fault that fails
    frees the tables it left empty."""
    k.vmstat.inc2("pgfault", "mktme_pgfault_write" if write else "mktme_pgfault_read")
    # ``with k.charging(mm.owner)`` written out: every fault enters it, and the
    # context manager's three calls cost more than the rest of this function
    alloc = k.alloc
    saved, alloc.charge_uid = alloc.charge_uid, mm.owner
    try:
        return _handle_mm_fault(k, mm, vma, addr, write)
    except BaseException:
        page = addr & ~(PAGE_SIZE - 1)
        k.pt.free_empty_tables(mm.pgd, page, page + PAGE_SIZE)
        raise
    finally:
        alloc.charge_uid = saved


def _handle_mm_fault(k: Kernel, mm: MmStruct, vma: Vma, addr: int, write: bool) -> int:
    """One walk (``__handle_mm_fault()``): ``found`` is the entry where it
    ended, and the handlers write the new entry there."""
    found = k.pt.lookup(mm.pgd, addr)
    pte = found.pte
    if not pte or found.size == _PGD_SIZE:  # pte_none, or a PGD entry (no leaf there)
        if int(vma.vm_flags) & _VM_UFFD_MISSING:
            handle_userfault(k, mm, addr, write)
        haddr = addr & ~(HPAGE_SIZE - 1)
        if found.size >= HPAGE_SIZE and transhuge_vma_suitable(vma, haddr):  # pmd_none
            found = k.pt.pte_alloc(haddr, found, HPAGE_SIZE)  # pmd_alloc: the empty PMD
            pmd = do_huge_pmd_anonymous_page(k, mm, vma, haddr, write, found)
            if pmd is not None:
                return pmd
            # VM_FAULT_FALLBACK: the 4K fault goes on from that PMD (the tables above
            # it exist now; starting again from the old entry would link a second one)
        return do_anonymous_page(k, mm, vma, addr, write, found)
    if is_swap_pte(pte):
        return do_swap_page(k, mm, vma, addr, found, write)
    if not pte & _PRESENT:
        fail(errno.EIO, f"{addr:#x}: the PTE {pte:#x} is neither present nor empty")
    if found.size == HPAGE_SIZE:
        return do_huge_pmd_wp_page(k, mm, vma, addr, found)
    return do_wp_page(k, mm, vma, addr, found)


def handle_userfault(k: Kernel, mm: MmStruct, addr: int, write: bool) -> NoReturn:
    """A missing fault in a VMA registered with userfaultfd (fs/userfaultfd.c
    ``handle_userfault()``, called by ``do_anonymous_page()`` and
    ``do_huge_pmd_anonymous_page()`` before they map anything): the fault is
    queued for ``spaces/NAME/uffd`` (the page address, as ``vmf->address``) and
    the access fails with EAGAIN until UFFDIO_COPY or UFFDIO_ZEROPAGE fills
    the page (Linux blocks the thread; a file access cannot wait)."""
    page = addr & ~(PAGE_SIZE - 1)
    flags = UFFD_PAGEFAULT_FLAG_WRITE if write else 0
    if page not in mm.uffd_pending:
        k.log.printk(
            f"userfaultfd: space {mm.name}: missing {'write' if write else 'read'} "
            f"fault at {page:#x} queued"
        )
    mm.uffd_pending[page] = mm.uffd_pending.get(page, 0) | flags
    fail(errno.EAGAIN, f"{addr:#x}: missing page in a userfaultfd range, not yet resolved")


# --- allocation for a VMA (patches 04 and 05) ------------------------------------


def _alloc_keyid(k: Kernel, vma: Vma) -> int:
    """The KeyID a page for ``vma`` is allocated with: the VMA's (patch 05,
    ``alloc_pages_vma()`` passes ``vma_keyid(vma)`` down to
    ``prep_encrypted_page()``); KeyID 0 with ``alloc_page_vma_keyid`` off."""
    return vma_keyid(vma, k.pte_layout) if k.mitigations["alloc_page_vma_keyid"] else 0


def alloc_page_vma(k: Kernel, vma: Vma, zero: bool = True) -> int:
    """``alloc_page_vma()``: one anonymous page for ``vma`` (faults, COW, swap-in),
    on the nodes of its ``MPOL_BIND`` policy if it has one."""
    nodes = vma_policy_nodes(vma) if vma.vm_policy else None  # no call for the default policy
    return k.alloc.alloc_page(_alloc_keyid(k, vma), _ANON, zero, nodes)


def alloc_hugepage_vma(
    k: Kernel, vma: Vma, zero: bool = True, keyid: int | None = None
) -> int | None:
    """``alloc_hugepage_vma()``: the one path for a 2M anonymous page of a VMA
    (patch 04 unifies it with ``alloc_pages_vma()``, so the KeyID follows);
    THP faults and khugepaged both come here. ``keyid`` overrides the VMA's
    (khugepaged with its switch off). None when no 2M page can be had."""
    nodes = vma_policy_nodes(vma) if vma.vm_policy else None  # alloc_pages_vma's nodemask
    keyid = _alloc_keyid(k, vma) if keyid is None else keyid
    return k.alloc.alloc_huge_page(keyid, zero, nodes=nodes)


# --- transparent huge pages at fault (mm/huge_memory.c) --------------------------


def transhuge_vma_suitable(vma: Vma, haddr: int) -> bool:
    """A ``madvise hugepage`` VMA that holds the whole 2M range at ``haddr``."""
    if int(vma.vm_flags) & _VM_THP_MASK != _VM_THP:
        return False
    return vma.start <= haddr and haddr + HPAGE_SIZE <= vma.end


def mm_get_huge_zero_page(k: Kernel) -> int | None:
    """The huge zero page with one more mapping, allocated (uncharged, KeyID 0)
    when none exists; None when no 2M page is free."""
    if k.huge_zero_pfn is None:
        with k.charging(None):
            pfn = k.alloc.alloc_huge_page(0, flags=PG.ZERO)  # a plain page (not reserved)
        if pfn is None:
            k.vmstat.inc("thp_zero_page_alloc_failed")
            return None
        k.vmstat.inc("thp_zero_page_alloc")
        k.huge_zero_pfn = pfn
    k.huge_zero_refs += 1
    return k.huge_zero_pfn


def put_huge_zero_page(k: Kernel) -> None:
    """One mapping of the huge zero page less; the last one frees it (Linux's
    shrinker frees it later, once unused: here at once, so that memory comes
    back as it was)."""
    k.huge_zero_refs -= 1
    if k.huge_zero_refs == 0 and k.huge_zero_pfn is not None:
        k.alloc.free_page(k.huge_zero_pfn)
        k.huge_zero_pfn = None


def _zap_huge_zero_pmd(k: Kernel, mm: MmStruct, haddr: int) -> None:
    k.pt.clear_pte(mm.pgd, haddr, HPAGE_SIZE)
    zap_deposited_table(k, mm)
    put_huge_zero_page(k)
    flush_tlb_range(k, mm, haddr, haddr + HPAGE_SIZE)


def do_huge_pmd_anonymous_page(
    k: Kernel, mm: MmStruct, vma: Vma, haddr: int, write: bool, pmdp: Lookup
) -> int | None:
    """A fault on the empty PMD ``pmdp`` of a hugepage VMA: the huge zero page
    for a read (only in a KeyID-0 VMA: patch 02's huge_memory.c hunk), else a
    2M page of the VMA's KeyID; None to fall back to 4K pages
    (``VM_FAULT_FALLBACK``), with nothing stored in the PMD."""
    keyid = vma_keyid(vma, k.pte_layout)
    if not write:
        if keyid == 0 or not k.mitigations["no_zero_page_encrypted"]:
            zero = mm_get_huge_zero_page(k)
            if zero is None:
                k.vmstat.inc("thp_fault_fallback")
                return None
            _deposit_or_release(k, mm, lambda: put_huge_zero_page(k))
            k.vmstat.inc("mktme_zero_page_map")
            pmd = k.pte_layout.pfn_pte(zero, vma.vm_page_prot) | _PSE
            k.pt.set_pte_at(pmdp, pmd)
            return pmd
        k.vmstat.inc("mktme_zero_page_refused_encrypted")
    head = alloc_hugepage_vma(k, vma)
    if head is None:
        k.vmstat.inc("thp_fault_fallback")
        return None
    _deposit_or_release(k, mm, lambda: k.alloc.free_page(head))
    k.vmstat.inc("thp_fault_alloc")
    return map_new_page(k, mm, vma, pmdp, haddr, head)


def _deposit_or_release(k: Kernel, mm: MmStruct, release: Callable[[], None]) -> None:
    """``pte_alloc_one()`` then ``pgtable_trans_huge_deposit()``: the PTE table
    a 2M mapping will need when it is split, allocated before the PMD is set
    (so that a split never needs memory). ENOMEM (``VM_FAULT_OOM``) after
    ``release`` gives the 2M page back when no table can be had."""
    try:
        mm.pmd_huge_pte.append(k.pt.pte_alloc_one())
    except SandboxError:
        release()
        raise


def zap_deposited_table(k: Kernel, mm: MmStruct) -> None:
    """Free the table a 2M mapping deposited, as the mapping goes
    (``zap_deposited_table()``). A PMD with none (one forged through
    ``keyids/0/mem``) frees nothing."""
    if mm.pmd_huge_pte:
        k.pt.pte_free(mm.pmd_huge_pte.pop())


def do_huge_pmd_wp_page(k: Kernel, mm: MmStruct, vma: Vma, addr: int, pmdp: Lookup) -> int:
    """A write to a read-only 2M mapping: the huge zero page goes and the fault
    starts again on an empty PMD; an exclusive THP is reused; otherwise the PMD
    is split and the 4K page copied (do_huge_pmd_wp_page's fallback)."""
    haddr, pmd = addr & ~(HPAGE_SIZE - 1), pmdp.pte
    head = pte_page(k, pmd, HPAGE_SIZE)
    if head is None:
        fail(errno.EIO, f"{addr:#x}: the PMD {pmd:#x} maps no page of this machine")
    if k.pages.is_zero_pfn(head):
        _zap_huge_zero_pmd(k, mm, haddr)
        return _handle_mm_fault(k, mm, vma, addr, True)
    if k.pages.page_exclusive(head):
        pmd |= _WRITE_BITS
        k.pt.set_pte_at(pmdp, pmd)
        k.tlb.flush_range(mm.asid, haddr, haddr + HPAGE_SIZE)
        return pmd
    split_huge_pmd(k, mm, addr, pmd)
    found = k.pt.get_pte(mm.pgd, addr)
    assert found is not None
    return do_wp_page(k, mm, vma, addr, found)


# --- 4K pages ---------------------------------------------------------------------


def do_anonymous_page(
    k: Kernel, mm: MmStruct, vma: Vma, addr: int, write: bool, found: Lookup
) -> int:
    """A fault on an empty entry (``found``): the tables below it first
    (``pte_alloc``), the page last."""
    page = addr & ~(PAGE_SIZE - 1)
    # ``pte_alloc()`` is a macro in Linux: ``__pte_alloc()`` only when the walk
    # stopped above the PTE level (``pmd_none``)
    ptep = found if found.size == PAGE_SIZE else k.pt.pte_alloc(page, found)
    if not write:
        if vma_keyid(vma, k.pte_layout) == 0 or not k.mitigations["no_zero_page_encrypted"]:
            return map_zero_page(k, vma, ptep)
        k.vmstat.inc("mktme_zero_page_refused_encrypted")
    return map_new_page(k, mm, vma, ptep, page, alloc_page_vma(k, vma))


def pte_alloc_map(k: Kernel, mm: MmStruct, addr: int) -> Lookup:
    """The 4K entry of ``addr``, the tables it needs allocated, in one walk
    (``pte_alloc_map()``); EINVAL inside a huge leaf."""
    return k.pt.pte_alloc(addr & ~(PAGE_SIZE - 1), k.pt.lookup(mm.pgd, addr))


def map_zero_page(k: Kernel, vma: Vma, ptep: Lookup) -> int:
    """``pte_mkspecial(pfn_pte(my_zero_pfn(addr), vma->vm_page_prot))``: the
    zero page through the VMA's protections, KeyID bits included (a read
    fault, and UFFDIO_ZEROPAGE's ``mfill_zeropage_pte()``), stored in the
    empty entry ``ptep``. Read-only: a write breaks copy-on-write."""
    k.vmstat.inc("mktme_zero_page_map")
    pte = k.pte_layout.pfn_pte(k.zero_pfn, vma.vm_page_prot)
    k.pt.set_pte_at(ptep, pte)
    return pte


def do_swap_page(k: Kernel, mm: MmStruct, vma: Vma, addr: int, ptep: Lookup, write: bool) -> int:
    """Swap-in: a page for the VMA's KeyID, the slot's data written through it."""
    pte = ptep.pte
    offset = swp_offset(pte)
    if swp_type(pte) != 0 or not k.swap.valid_slot(offset):
        fail(errno.EIO, f"{addr:#x}: the swap entry {pte:#x} names no slot in use (SIGBUS)")
    page = addr & ~(PAGE_SIZE - 1)
    pfn = alloc_page_vma(k, vma, zero=False)
    k.directmap.write_page(pfn, k.swap.readpage(offset))
    k.swap.swap_free(offset)
    k.vmstat.inc("pswpin")
    return map_new_page(k, mm, vma, ptep, page, pfn, writable=write)


def map_new_page(
    k: Kernel, mm: MmStruct, vma: Vma, ptep: Lookup, va: int, pfn: int, writable: bool = True
) -> int:
    """Map a page just allocated (or copied) for ``vma`` in the entry ``ptep``
    (a 4K or a 2M one), which the fault's walk found or made: writable and
    dirty where the VMA may be written (``maybe_mkwrite(pte_mkdirty())``),
    PG_mlocked in a VM_LOCKED VMA (``lru_cache_add_active_or_unevictable``)."""
    size = ptep.size
    pte = k.pte_layout.pfn_pte(pfn, vma.vm_page_prot) | (_PSE if size != PAGE_SIZE else 0)
    vm_flags = int(vma.vm_flags)
    if writable and vm_flags & _VM_WRITE:
        pte |= _WRITE_BITS
    k.pages.get_page(pfn)
    if vm_flags & _VM_LOCKED:
        mlock_vma_page(k, pfn)
    k.pt.set_pte_at(ptep, pte)
    k.tlb.flush_range(mm.asid, va, va + size)
    return pte


def mlock_vma_page(k: Kernel, pfn: int) -> None:
    """Set PG_mlocked (once) and count it as Linux does."""
    if not k.pages.PageMlocked(pfn):
        k.pages.SetPageMlocked(pfn)
        k.vmstat.inc("unevictable_pgs_mlocked")


def do_wp_page(k: Kernel, mm: MmStruct, vma: Vma, addr: int, ptep: Lookup) -> int:
    """A write to a present read-only page: reuse it or copy it.

    ``wp_page_copy()``: the new page comes from ``alloc_page_vma()`` (the VMA's
    KeyID, patch 05) and ``cow_user_page()`` copies through each page's own
    direct mapping (patch 18); the last mapper of an anonymous page reuses it
    (``wp_page_reuse()``), as does the child or parent left alone after a fork.
    """
    page, pte = addr & ~(PAGE_SIZE - 1), ptep.pte
    pfn = pte_page(k, pte)
    if pfn is None:
        fail(errno.EIO, f"{addr:#x}: the PTE {pte:#x} maps no page of this machine")
    if k.pages.page_exclusive(pfn):
        pte |= _WRITE_BITS  # exclusive: reuse (wp_page_reuse)
        k.pt.set_pte_at(ptep, pte)
        k.tlb.flush_range(mm.asid, page, page + PAGE_SIZE)
        return pte
    k.vmstat.inc("mktme_cow_fault")
    zero = k.pages.is_zero_pfn(pfn)
    new = alloc_page_vma(k, vma, zero=zero)
    if not zero:
        copy_page(k, src=pfn, dst=new)
    k.pages.put_page(pfn)
    return map_new_page(k, mm, vma, ptep, page, new)


def copy_page(k: Kernel, src: int, dst: int) -> None:
    """``copy_user_highpage()`` through each page's own direct mapping
    (``page_address()``, translated by the kernel's page tables)."""
    k.directmap.copy_page(src, dst)


# --- access -------------------------------------------------------------------


def get_user_pages(k: Kernel, mm: MmStruct, addr: int, write: bool) -> tuple[int, int]:
    """Translate ``addr`` as the CPU would, faulting as needed (Linux's
    ``get_user_pages()`` with ``FOLL_WRITE`` for a write, one page at a time;
    ``follow_page()`` would not fault).

    Returns (physical address, KeyID from the PTE). EIO where unmapped, where
    the VMA's protection forbids the access, or where a tampered PTE points
    outside physical memory or names a KeyID the hardware does not have.
    """
    vpn = addr >> 12
    hit = k.tlb.lookup(mm.asid, vpn)
    if hit is None or (write and not hit.pte & _RW):
        vma = _vma_for_access(mm, addr, write)
        found = k.pt.get_pte(mm.pgd, addr)
        if found is not None and found.pte & _PRESENT and (found.pte & _RW or not write):
            pte, size = found.pte, found.size
        else:
            handle_mm_fault(k, mm, vma, addr, write)
            done = k.pt.get_pte(mm.pgd, addr)
            assert done is not None
            pte, size = done.pte, done.size
        hit = tlb_entry(k.pte_layout, pte, size, vpn)
        k.tlb.insert(mm.asid, vpn, hit)
    if hit.pfn >= k.alloc.nr_pages or hit.keyid > k.platform.nr_keyids:
        fail(
            errno.EIO,
            f"{addr:#x}: the PTE maps pfn {hit.pfn:#x} KeyID {hit.keyid}, "
            "which this machine does not have (machine check)",
        )
    return (hit.pfn << 12) | (addr & 0xFFF), hit.keyid


def _vma_for_access(mm: MmStruct, addr: int, write: bool) -> Vma:
    vma = mm.find_vma(addr)
    if vma is None:
        fail(errno.EIO, f"{addr:#x} is not mapped")
    if not int(vma.vm_flags) & (_VM_WRITE if write else _VM_READ):
        what = "written" if write else "read"
        fail(errno.EIO, f"{addr:#x} is mapped {vma.perms()[:3]} and cannot be {what}")
    return vma


def accessible_prefix(mm: MmStruct, addr: int, length: int, write: bool) -> int:
    """How many bytes from ``addr`` on the VMAs let this access touch."""
    if not 0 <= addr < USER_END:
        return 0
    end = min(addr + length, USER_END)
    cursor = addr
    needed = VM.WRITE if write else VM.READ
    for vma in mm.overlapping(addr, end):
        if vma.start > cursor or not vma.vm_flags & needed:
            break
        cursor = vma.end
    return max(0, min(cursor, end) - addr)


def access_vm(k: Kernel, mm: MmStruct, addr: int, length: int, data: bytes | None) -> bytes:
    """Read up to ``length`` bytes at ``addr``, or write all of ``data`` there.

    Like /proc/PID/mem, a read stops short at the first byte it may not read
    and fails with EIO only when that is the first byte; a write is refused
    whole before any byte is written. Physically contiguous runs with one
    KeyID go to the platform in one call.
    """
    write = data is not None
    done = accessible_prefix(mm, addr, length, write)
    if done < length and (write or not done):
        _refuse(mm, addr + done, write)
    try:
        runs = _physical_runs(k, mm, addr, done, write)
        if data is None:
            return b"".join(k.platform.load(pa, n, keyid) for pa, n, keyid in runs)
        view = memoryview(data)
        for pa, n, keyid in runs:
            k.platform.store(pa, view[:n], keyid)
            view = view[n:]
        return b""
    finally:
        k.pinned.clear()


def _refuse(mm: MmStruct, addr: int, write: bool) -> NoReturn:
    """EIO, with the reason ``addr`` (the first bad byte) cannot be accessed."""
    if not 0 <= addr < USER_END:
        fail(errno.EIO, f"{addr:#x} is outside the user address space")
    _vma_for_access(mm, addr, write)  # raises with the reason
    raise AssertionError(f"{addr:#x} is accessible")  # pragma: no cover


def _physical_runs(
    k: Kernel, mm: MmStruct, addr: int, length: int, write: bool
) -> list[tuple[int, int, int]]:
    runs: list[tuple[int, int, int]] = []
    end = addr + length
    while addr < end:
        n = min(PAGE_SIZE - (addr & 0xFFF), end - addr)
        pa, keyid = get_user_pages(k, mm, addr, write)
        k.pinned.add(pa >> 12)
        if runs and runs[-1][2] == keyid and runs[-1][0] + runs[-1][1] == pa:
            runs[-1] = (runs[-1][0], runs[-1][1] + n, keyid)
        else:
            runs.append((pa, n, keyid))
        addr += n
    return runs


# --- unmapping ----------------------------------------------------------------


def zap_page_range(k: Kernel, mm: MmStruct, start: int, end: int) -> None:
    """Unmap and release every page in [start, end); free empty tables."""
    split_huge_pmds(k, mm, start, end)
    for va, size, pte, _ in k.pt.clear_range(mm.pgd, start, end):
        if is_swap_pte(pte):
            _free_swap_entry(k, mm, va, pte)
            continue
        pfn = pte_page(k, pte, size)
        if pfn is None or not mapped_page(k, pfn):
            k.log.printk(f"BUG: Bad page map in space {mm.name}: {va:#x} pte:{pte:#018x}")
            continue
        if size == HPAGE_SIZE:
            zap_deposited_table(k, mm)
            if k.pages.is_zero_pfn(pfn):
                put_huge_zero_page(k)
                continue
        k.pages.put_page(pfn)
    k.pt.free_empty_tables(mm.pgd, start, end)
    flush_tlb_range(k, mm, start, end)


def _free_swap_entry(k: Kernel, mm: MmStruct, va: int, pte: int) -> None:
    """``free_swap_and_cache()``; a forged entry is reported, as a bad page map is."""
    offset = swp_offset(pte)
    if swp_type(pte) == 0 and k.swap.valid_slot(offset):
        k.swap.swap_free(offset)
    else:
        k.log.printk(f"BUG: Bad swap entry in space {mm.name}: {va:#x} pte:{pte:#018x}")


def mapped_page(k: Kernel, pfn: int) -> bool:
    """A page a user PTE may map: the zero page or a mapped anonymous page
    (never a page table, a free page or a reserved one). A PTE rewritten to
    point anywhere else is reported and left alone, as Linux's
    vm_normal_page() reports a bad page map."""
    if k.pages.is_zero_pfn(pfn):
        return True
    return k.pages.PageAnon(pfn) and k.pages.page_mapped(pfn)


def flush_tlb_range(k: Kernel, mm: MmStruct, start: int, end: int) -> None:
    k.tlb.flush_range(mm.asid, start, end)
    k.vmstat.inc("mktme_tlb_flush")


def flush_tlb_mm(k: Kernel, mm: MmStruct) -> None:
    """Every translation of the address space (``spaces/NAME/tlb``)."""
    k.tlb.flush_all(mm.asid)
    k.vmstat.inc("mktme_tlb_flush")


def movable_page(k: Kernel, pte: int) -> int | None:
    """The PFN of a page that may leave its frame (swap-out, migration), or
    None: a mapped 4 KiB anonymous page mapped by this PTE only, neither the
    zero page nor KSM's, and not pinned by an access in progress."""
    if not pte & PTE_MAPPED:
        return None
    pfn = pte_page(k, pte)
    pages = k.pages
    if pfn is None or pfn in k.pinned or not pages.PageAnon(pfn) or pages.PageCompound(pfn):
        return None
    return pfn if pages.page_exclusive(pfn) else None


def split_huge_pages_in(k: Kernel, mm: MmStruct, start: int, end: int) -> None:
    """``split_huge_pmd()`` for every mapped 2M leaf of the range (pageout, move_pages)."""
    for va, size, pte in list(k.pt.iter_present(mm.pgd, start, end)):
        if size == HPAGE_SIZE and pte & PTE_MAPPED:
            split_huge_pmd(k, mm, va, pte)


def split_huge_pmds(k: Kernel, mm: MmStruct, start: int, end: int) -> None:
    """``split_huge_pmd()`` for huge mappings that [start, end) cuts."""
    for edge in (start, end):
        if not edge & (HPAGE_SIZE - 1) or edge >= USER_END:
            continue
        found = k.pt.get_pte(mm.pgd, edge)
        if found is not None and found.size == HPAGE_SIZE:
            split_huge_pmd(k, mm, edge, found.pte)


def split_huge_pmd(k: Kernel, mm: MmStruct, addr: int, pmd: int) -> None:
    """512 PTEs for one 2M mapping, in the table it deposited at fault
    (``pgtable_trans_huge_withdraw()``: a split needs no memory), and 512
    order-0 pages for its compound page. The huge zero page is not split:
    its PMD is cleared and its table freed, and the range faults again
    (Linux puts 512 small zero-page PTEs there; reading gives zeros either way)."""
    head = k.pte_layout.pte_pfn(pmd, HPAGE_SIZE)
    haddr = addr & ~(HPAGE_SIZE - 1)
    if k.pages.pfn_valid(head) and k.pages.is_zero_pfn(head):
        _zap_huge_zero_pmd(k, mm, haddr)
        return
    k.vmstat.inc("thp_split_pmd")
    deposited = mm.pmd_huge_pte[-1] if mm.pmd_huge_pte else None
    k.pt.split_huge_pmd(mm.pgd, addr, deposited)
    if deposited is not None:  # withdrawn once the split has taken it
        mm.pmd_huge_pte.pop()
    k.pages.split_huge_page(head)
    flush_tlb_range(k, mm, haddr, haddr + HPAGE_SIZE)
