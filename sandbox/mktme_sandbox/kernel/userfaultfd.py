"""userfaultfd in missing mode (fs/userfaultfd.c, mm/userfaultfd.c) for
private anonymous memory with KeyIDs.

Each space has one userfaultfd (its context, named by the space's ASID), driven
by ``uffd register|unregister|copy|zeropage`` in ``spaces/NAME/ctl``; the faults
it reports are ``spaces/NAME/uffd``.

Rules kept:
- ``userfaultfd_register()`` (UFFDIO_REGISTER_MODE_MISSING) sets
  VM_UFFD_MISSING (0x200) and ``vm_userfaultfd_ctx`` on the VMAs of the range,
  splitting them at its ends; ``userfaultfd_unregister()`` clears both. Both
  then call ``vma_merge()``, which merges neighbours only when their flags,
  userfaultfd context and (patch 01, "mm: Do no merge VMAs with different
  encryption KeyIDs", passes ``vma_keyid(vma)`` at both calls in
  fs/userfaultfd.c) KeyIDs are equal (switch ``vma_merge_keyid_check``).
- A fault on an empty entry of a registered VMA is queued as one
  ``struct uffd_msg`` (``UFFD_EVENT_PAGEFAULT``, flags
  ``UFFD_PAGEFAULT_FLAG_WRITE`` for a write, the page address) and the access
  fails with EAGAIN until resolved (``memory.handle_userfault``).
- UFFDIO_COPY (``mcopy_atomic_pte()``): each page of the destination is a new
  page from ``alloc_page_vma()``, so it has the VMA's KeyID (patch 05), filled
  through that KeyID with the bytes read from SRC in the same space, and mapped
  writable where the VMA is.
- UFFDIO_ZEROPAGE (``mfill_zeropage_pte()``): v5 maps the zero page with the
  VMA's ``vm_page_prot``, with no ``vma_keyid()`` check, so in an encrypted VMA
  the zero page is read through key N and comes out as garbage (patch 02 only
  changed ``do_anonymous_page()`` and ``do_huge_pmd_anonymous_page()``). The
  switch ``uffd_zeropage_encrypted_check`` adds the check a later posting made:
  an encrypted VMA gets a zeroed page of its KeyID instead. It is OFF by
  default, as v5 was posted (docs/mktme-series.md, "The gap in v5").
- Errnos as Linux's: EINVAL for an unaligned address or length or a zero
  length, and (register) a range with no VMA at some page; ENOENT when the
  destination is not inside one registered VMA; EEXIST when a destination page
  is already mapped (checked for every page before any is filled, where Linux
  stops at the first); EFAULT when SRC cannot be read whole; ENOMEM when the
  pages or tables cannot be had. Every check runs before anything changes.

Left out: write-protect mode, UFFDIO_WAKE and DONTWAKE, the non-cooperative
events (fork, remap, remove, unmap: a forked child's and a moved VMA's
registration is kept by ``dup_userfaultfd()``/``mremap_userfaultfd_prep()``
only with features this model has not), huge pages (a registered hugepage VMA
is filled 4K at a time), and pending faults across a snapshot.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from mktme_sandbox.config import PAGE_SIZE
from mktme_sandbox.errors import SandboxError, fail
from mktme_sandbox.kernel.memory import (
    UFFD_PAGEFAULT_FLAG_WRITE,
    access_vm,
    alloc_page_vma,
    map_new_page,
    map_zero_page,
    pte_alloc_map,
    zap_page_range,
)
from mktme_sandbox.kernel.mmap import check_populate, check_range, vma_merge
from mktme_sandbox.kernel.vma import VM, MmStruct, Vma, vma_keyid

if TYPE_CHECKING:
    from mktme_sandbox.kernel.kernel import Kernel

__all__ = [
    "UFFD_EVENT_PAGEFAULT",
    "UFFD_PAGEFAULT_FLAG_WRITE",
    "UffdMsg",
    "dup_userfaultfd",
    "mcopy_atomic",
    "mfill_zeropage",
    "pending_messages",
    "userfaultfd_register",
    "userfaultfd_unregister",
]

UFFD_EVENT_PAGEFAULT = 0x12  # include/uapi/linux/userfaultfd.h


@dataclass(frozen=True)
class UffdMsg:
    """The fields of ``struct uffd_msg`` a missing fault fills."""

    flags: int
    address: int
    event: ClassVar[int] = UFFD_EVENT_PAGEFAULT

    def line(self) -> str:
        return f"event={self.event:#x} flags={self.flags:#x} address={self.address:#x}"


def pending_messages(mm: MmStruct) -> list[UffdMsg]:
    """The faults waiting on the space's userfaultfd, by address."""
    return [UffdMsg(flags, addr) for addr, flags in sorted(mm.uffd_pending.items())]


def uffd_ctx(mm: MmStruct) -> int:
    """The space's one userfaultfd, named by its ASID (never 0)."""
    return mm.asid


def dup_userfaultfd(vma: Vma) -> Vma:
    """A VMA as fork or mremap leaves it without UFFD_FEATURE_EVENT_FORK or
    _REMAP: no longer registered."""
    return vma.with_(vm_flags=vma.vm_flags & ~VM.UFFD_MISSING, vm_userfaultfd_ctx=0)


# --- register / unregister -----------------------------------------------------


def userfaultfd_register(k: Kernel, mm: MmStruct, addr: int, length: int) -> None:
    end = _check_aligned("uffd register", addr, length)
    _check_covered("uffd register", mm, addr, end)
    for vma in mm.isolate(addr, end):
        flags = vma.vm_flags | VM.UFFD_MISSING
        mm.replace(vma, vma.with_(vm_flags=flags, vm_userfaultfd_ctx=uffd_ctx(mm)))
    vma_merge(k, mm, addr, end)


def userfaultfd_unregister(k: Kernel, mm: MmStruct, addr: int, length: int) -> None:
    end = _check_aligned("uffd unregister", addr, length)
    _check_covered("uffd unregister", mm, addr, end)
    for vma in mm.isolate(addr, end):
        mm.replace(vma, dup_userfaultfd(vma))
    mm.wake_userfaults(addr, end)
    vma_merge(k, mm, addr, end)


def _check_aligned(op: str, addr: int, length: int) -> int:
    """``validate_range()``: a page-aligned start and length, not zero."""
    if length & (PAGE_SIZE - 1):
        fail(errno.EINVAL, f"{op}: length {length:#x} is not a multiple of the page size")
    return check_range(op, addr, length)


def _check_covered(op: str, mm: MmStruct, addr: int, end: int) -> None:
    if not mm.covers(addr, end):
        fail(errno.EINVAL, f"{op}: {addr:#x}-{end:#x} is not fully mapped")


# --- UFFDIO_COPY / UFFDIO_ZEROPAGE ---------------------------------------------------


def mcopy_atomic(k: Kernel, mm: MmStruct, dst: int, src: int, length: int) -> None:
    """UFFDIO_COPY: fill [dst, dst+length) with new pages of the VMA's KeyID
    holding the bytes at ``src``."""
    vma, end = _dst_vma(k, mm, "uffd copy", dst, length)
    data = _read_src(k, mm, src, length)
    check_populate(k, mm, dst, end, VM.WRITE, 0, "uffd copy")
    with _filling(k, mm, dst, end):
        for i, page in enumerate(range(dst, end, PAGE_SIZE)):
            ptep = pte_alloc_map(k, mm, page)
            pfn = alloc_page_vma(k, vma, zero=False)
            chunk = data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
            k.platform.store(pfn * PAGE_SIZE, chunk, k.pages.page_keyid(pfn))
            map_new_page(k, mm, vma, ptep, page, pfn)


def mfill_zeropage(k: Kernel, mm: MmStruct, dst: int, length: int) -> None:
    """UFFDIO_ZEROPAGE: map the zero page over [dst, dst+length) as v5 does,
    or, with ``uffd_zeropage_encrypted_check`` on and an encrypted VMA, a
    zeroed page of the VMA's KeyID (as ``do_anonymous_page()`` after patch 02)."""
    vma, end = _dst_vma(k, mm, "uffd zeropage", dst, length)
    own_pages = vma_keyid(vma, k.pte_layout) != 0 and k.mitigations["uffd_zeropage_encrypted_check"]
    check_populate(k, mm, dst, end, VM.WRITE if own_pages else VM.READ, 0, "uffd zeropage")
    with _filling(k, mm, dst, end):
        for page in range(dst, end, PAGE_SIZE):
            ptep = pte_alloc_map(k, mm, page)
            if own_pages:
                k.vmstat.inc("mktme_zero_page_refused_encrypted")
                map_new_page(k, mm, vma, ptep, page, alloc_page_vma(k, vma))
            else:
                map_zero_page(k, vma, ptep)


def _dst_vma(k: Kernel, mm: MmStruct, op: str, dst: int, length: int) -> tuple[Vma, int]:
    """The one registered VMA holding the destination, every page of it empty."""
    end = _check_aligned(op, dst, length)
    vma = mm.find_vma(dst)
    if vma is None or end > vma.end or vma.vm_userfaultfd_ctx != uffd_ctx(mm):
        fail(errno.ENOENT, f"{op}: {dst:#x}-{end:#x} is not inside one registered VMA")
    for page in range(dst, end, PAGE_SIZE):
        if k.pt.get_pte(mm.pgd, page) is not None:
            fail(errno.EEXIST, f"{op}: {page:#x} is already mapped")
    return vma, end


def _read_src(k: Kernel, mm: MmStruct, src: int, length: int) -> bytes:
    """``copy_from_user()`` of the source: EFAULT unless every byte reads."""
    try:
        data = access_vm(k, mm, src, length, None)
    except SandboxError as err:
        fail(errno.EFAULT, f"uffd copy: SRC {src:#x}: {err.reason}")
    if len(data) != length:
        fail(errno.EFAULT, f"uffd copy: SRC {src:#x}+{length:#x} is not readable whole")
    return data


@contextmanager
def _filling(k: Kernel, mm: MmStruct, start: int, end: int) -> Iterator[None]:
    """Fill [start, end) as the owner; a failure unmaps what was filled (the
    range was empty), a success wakes the faults waiting there."""
    try:
        with k.charging(mm.owner):
            yield
    except BaseException:
        zap_page_range(k, mm, start, end)
        raise
    mm.wake_userfaults(start, end)
