"""x86-64 page-table types: entry bits, protections, levels, and the MKTME PTE layout.

Linux's ``arch/x86/include/asm/pgtable_types.h`` and ``pgtable_64_types.h``:
what an entry holds and what one entry of each level maps, with no page table
in sight. ``pgtable.py`` builds and walks the tables from these; ``vma``,
``tlb``, ``ptdump``, ``memory`` and the audit read entries with them.

- ``PteFlags``: the bits, at Linux's positions (``_PAGE_BIT_PRESENT`` 0 ...
  ``_PAGE_BIT_NX`` 63), and the protections built from them (``PAGE_SHARED``,
  ``PAGE_TABLE``, ...).
- ``Level``: the levels of the walk, the one table of their geometry
  (``PGDIR_SHIFT`` 39, ``PUD_SHIFT`` 30, ``PMD_SHIFT`` 21, ``PAGE_SHIFT`` 12;
  P4D folded onto the PGD as with 4-level paging), each level's entry index of
  an address and the level below it.
- ``PteLayout``: where the frame number, the KeyID and the flags sit in an
  entry of a machine with ``maxphyaddr`` physical-address bits and
  ``keyid_bits`` KeyID bits; ``pfn_pte`` is the one constructor of an entry.
- ``USER_END``: the top of the user half (``TASK_SIZE`` is its last page
  excluded); ``HPAGE_SIZE``/``HPAGE_ORDER``/``HPAGE_NR``: a PMD leaf, the
  transparent huge page.

The KeyID in the entry (MKTME)
    A present leaf holds ``PFN | keyid << (keyid_shift - 12)`` in its address
    field, bits 12 and up: the KeyID takes the top ``keyid_bits`` physical-address
    bits, entry bits ``keyid_shift .. maxphyaddr - 1``. ``PteLayout`` follows two
    patches of the MKTME v5 series:

    - "x86/mm: Mask out KeyID bits from page table entry pfn" (07): the KeyID
      bits are not part of the physical address, so ``PTE_PFN_MASK`` (here
      ``PteLayout.pfn_mask``) excludes them and ``pte_pfn()`` never sees them.
      Example of the patch: 52 physical bits, 6 KeyID bits -> bits 51:46.
    - "x86/mm: Preserve KeyID on pte_modify() and pgprot_modify()" (09):
      ``_PAGE_CHG_MASK`` is built from ``PTE_PFN_MASK_MAX`` (every bit below
      ``__PHYSICAL_MASK_SHIFT`` = 52) so the KeyID survives ``pte_modify()``
      (mprotect) and ``pgprot_modify()`` (vm_page_prot). ``preserve_keyid=False``
      gives the behaviour before the patch: the KeyID bits are taken from the new
      protection, which for mprotect has none, so the KeyID is dropped. This is
      the ``pte_modify_preserve_keyid`` mitigation switch of docs/spec.md section 3.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from itertools import pairwise

import numpy as np

from mktme_sandbox.config import PAGE_SHIFT, PAGE_SIZE
from mktme_sandbox.errors import fail

__all__ = [
    "HPAGE_NR",
    "HPAGE_ORDER",
    "HPAGE_SHIFT",
    "HPAGE_SIZE",
    "PAGE_COPY",
    "PAGE_COPY_EXEC",
    "PAGE_KERNEL",
    "PAGE_KERNEL_LARGE",
    "PAGE_NONE",
    "PAGE_READONLY",
    "PAGE_READONLY_EXEC",
    "PAGE_SHARED",
    "PAGE_SHARED_EXEC",
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "PAGE_TABLE",
    "PHYSICAL_MASK_SHIFT",
    "PTRS_PER_TABLE",
    "SIZE_1G",
    "SIZE_2M",
    "SIZE_4K",
    "TASK_SIZE",
    "USER_END",
    "WALK_LEVELS",
    "Level",
    "PteFlags",
    "PteLayout",
]

PTRS_PER_TABLE = 512
"""Entries per table at every level (``PTRS_PER_PGD`` ... ``PTRS_PER_PTE``)."""
PHYSICAL_MASK_SHIFT = 52
"""Linux ``__PHYSICAL_MASK_SHIFT`` on x86-64: the architectural limit of the address field."""

_U64 = (1 << 64) - 1


class PteFlags(IntFlag):
    """Bits of a page-table entry, ``arch/x86/include/asm/pgtable_types.h``.

    Aliases, as in Linux: PAT is bit 7 on 4 KiB PTEs where PSE is bit 7 of a
    PMD/PUD; PROTNONE is GLOBAL on an entry whose PRESENT bit is clear (a
    PROT_NONE mapping); PAT_LARGE (bit 12) is PAT on 2M/1G leaves, where bit 12
    is not part of the frame number. SPECIAL (``_PAGE_BIT_SOFTW1``) marks a pte
    with no struct page behind it in the sandbox's sense: Linux sets it with
    ``pte_mkspecial()`` when it maps the shared zero page (``vm_normal_page``
    then skips it). SOFT_DIRTY is ``_PAGE_BIT_SOFTW3``.
    """

    PRESENT = 1 << 0
    RW = 1 << 1
    USER = 1 << 2
    PWT = 1 << 3
    PCD = 1 << 4
    ACCESSED = 1 << 5
    DIRTY = 1 << 6
    PSE = 1 << 7
    PAT = 1 << 7
    GLOBAL = 1 << 8
    PROTNONE = 1 << 8
    SPECIAL = 1 << 9
    SOFT_DIRTY = 1 << 11
    PAT_LARGE = 1 << 12
    NX = 1 << 63


_P = PteFlags
PAGE_TABLE = _P.PRESENT | _P.RW | _P.USER | _P.ACCESSED | _P.DIRTY
"""Linux ``_PAGE_TABLE``: the flags of every intermediate entry."""
# The protections of pgtable_types.h (x86-64, NX supported).
PAGE_NONE = _P.PROTNONE | _P.ACCESSED
PAGE_SHARED = _P.PRESENT | _P.RW | _P.USER | _P.ACCESSED | _P.NX
PAGE_SHARED_EXEC = _P.PRESENT | _P.RW | _P.USER | _P.ACCESSED
PAGE_COPY = _P.PRESENT | _P.USER | _P.ACCESSED | _P.NX
PAGE_COPY_EXEC = _P.PRESENT | _P.USER | _P.ACCESSED
PAGE_READONLY = _P.PRESENT | _P.USER | _P.ACCESSED | _P.NX
PAGE_READONLY_EXEC = _P.PRESENT | _P.USER | _P.ACCESSED
PAGE_KERNEL = _P.PRESENT | _P.RW | _P.DIRTY | _P.ACCESSED | _P.GLOBAL | _P.NX
PAGE_KERNEL_LARGE = PAGE_KERNEL | _P.PSE

_CHG_FLAGS = int(_P.PCD | _P.PWT | _P.SPECIAL | _P.ACCESSED | _P.DIRTY | _P.SOFT_DIRTY)
_PSE = int(_P.PSE)
_PAT_LARGE = int(_P.PAT_LARGE)


class Level(IntEnum):
    """Page-table levels, numbered as ``level_name[]`` of arch/x86/mm/dump_pagetables.c.

    P4D is folded with 4-level paging: no entry of the sandbox is at that level
    (its shift is the PGD's, and a walk goes PGD -> PUD, ``WALK_LEVELS``).
    """

    PGD = 1
    P4D = 2
    PUD = 3
    PMD = 4
    PTE = 5

    @property
    def shift(self) -> int:
        """log2 of the bytes one entry of this level maps (PGD 39 ... PTE 12)."""
        return _SHIFT[self]

    @property
    def size(self) -> int:
        """The bytes one entry of this level maps (a leaf there is that big)."""
        return 1 << _SHIFT[self]

    @property
    def next(self) -> Level:
        """The level of the tables this level's entries point to (PTE: itself)."""
        return _NEXT[self]

    def index(self, va: int) -> int:
        """``pgd_index()`` ... ``pte_index()``: the entry of ``va`` in a table of this level."""
        return (va >> _SHIFT[self]) & (PTRS_PER_TABLE - 1)

    @classmethod
    def of_leaf_size(cls, size: int) -> Level:
        """The level whose leaf maps ``size`` bytes (4K PTE, 2M PMD, 1G PUD); KeyError else."""
        return _LEAF_LEVEL[size]


# The one table of the geometry: what an entry of each level maps.
_SHIFT = {Level.PGD: 39, Level.P4D: 39, Level.PUD: 30, Level.PMD: 21, Level.PTE: PAGE_SHIFT}
WALK_LEVELS = (Level.PGD, Level.PUD, Level.PMD, Level.PTE)
"""The levels a walk descends, top down (P4D folded)."""
_NEXT = {
    **dict(pairwise(WALK_LEVELS)),
    Level.P4D: Level.PUD,
    Level.PTE: Level.PTE,
}
_LEAF_LEVEL = {level.size: level for level in WALK_LEVELS[1:]}

SIZE_4K = Level.PTE.size
SIZE_2M = Level.PMD.size
SIZE_1G = Level.PUD.size
USER_END = 1 << (Level.PGD.shift + 8)
"""End (exclusive) of the user half, 256 PGD slots: the last user address is 0x00007fffffffffff."""
TASK_SIZE = USER_END - PAGE_SIZE
"""Linux ``TASK_SIZE_MAX`` with 4-level paging: the last user page is never mapped."""
HPAGE_SHIFT = Level.PMD.shift
HPAGE_SIZE = Level.PMD.size
"""A transparent huge page: what one PMD leaf maps (``HPAGE_PMD_SIZE``)."""
HPAGE_ORDER = HPAGE_SHIFT - PAGE_SHIFT
HPAGE_NR = 1 << HPAGE_ORDER
"""Base pages in a huge page (``HPAGE_PMD_NR``)."""


@dataclass(frozen=True)
class PteLayout:
    """Where the frame number, the KeyID and the flags sit in an entry.

    ``keyid_shift = maxphyaddr - keyid_bits``; the KeyID is entry bits
    ``keyid_shift .. maxphyaddr - 1`` (physical-address bits; the entry's
    address field keeps each physical-address bit at its own position).
    ``keyid_bits == 0`` is a kernel without MKTME (never enabled, or disabled
    after enumeration): as v5's ``mktme_disable()`` leaves it, shift and mask
    are 0 and ``physical_mask`` is the full ``(1 << 52) - 1``.
    The derived masks have Linux's names in their docstrings.
    """

    maxphyaddr: int
    keyid_bits: int
    keyid_shift: int = field(init=False)
    """``mktme_keyid_shift``: the lowest KeyID bit (physical-address bit number)."""
    keyid_mask: int = field(init=False)
    """``mktme_keyid_mask``: the KeyID bits, in entry (= physical-address) terms."""
    physical_mask: int = field(init=False)
    """``__PHYSICAL_MASK`` after patch 07: the usable physical-address bits."""
    pfn_mask: int = field(init=False)
    """``PTE_PFN_MASK``: the frame-number bits of an entry, KeyID excluded."""
    pfn_mask_max: int = field(init=False)
    """``PTE_PFN_MASK_MAX`` (patch 09): bits 12..51, frame number and KeyID together."""
    reserved_mask: int = field(init=False)
    """Address-field bits at or above MAXPHYADDR: must be 0 (the MMU faults otherwise)."""

    def __post_init__(self) -> None:
        if not 32 <= self.maxphyaddr <= PHYSICAL_MASK_SHIFT:
            raise ValueError(f"maxphyaddr must be 32..52, not {self.maxphyaddr}")
        if not 0 <= self.keyid_bits < self.maxphyaddr - PAGE_SHIFT:
            raise ValueError(
                f"keyid_bits must leave frame-number bits below maxphyaddr "
                f"{self.maxphyaddr}, not {self.keyid_bits}"
            )
        shift = self.maxphyaddr - self.keyid_bits if self.keyid_bits else 0
        physical_bits = shift or PHYSICAL_MASK_SHIFT
        derived = {
            "keyid_shift": shift,
            "keyid_mask": ((1 << self.keyid_bits) - 1) << shift,
            "physical_mask": (1 << physical_bits) - 1,
            "pfn_mask": ((1 << physical_bits) - 1) & ~(PAGE_SIZE - 1),
            "pfn_mask_max": ((1 << PHYSICAL_MASK_SHIFT) - 1) & ~(PAGE_SIZE - 1),
            "reserved_mask": ((1 << PHYSICAL_MASK_SHIFT) - 1) & ~((1 << self.maxphyaddr) - 1),
        }
        for name, value in derived.items():
            object.__setattr__(self, name, value)

    @property
    def max_keyid(self) -> int:
        """The largest KeyID the entry can hold: ``2**keyid_bits - 1``."""
        return (1 << self.keyid_bits) - 1

    def chg_mask(self, preserve_keyid: bool = True) -> int:
        """``_PAGE_CHG_MASK``: the bits ``pte_modify()`` keeps from the old entry.

        With ``preserve_keyid`` (patch 09) it is built on ``PTE_PFN_MASK_MAX`` and
        covers the KeyID; without, on ``PTE_PFN_MASK`` as before the patch.
        """
        return (self.pfn_mask_max if preserve_keyid else self.pfn_mask) | _CHG_FLAGS

    def pfn_pte(self, pfn: int, prot: int) -> int:
        """``pfn_pte()``: the one constructor of an entry, ``pfn << 12 | prot``.

        ``prot`` is a pgprot value: flags plus, for an encrypted VMA, the KeyID
        bits its ``vm_page_prot`` carries (``keyid_prot``), as Linux makes a PTE
        from ``vma->vm_page_prot``. For a 2M/1G leaf pass the head pfn (aligned)
        and PSE in ``prot``. EINVAL when the frame does not fit below the KeyID
        bits or ``prot`` has frame-number or reserved bits.
        """
        self._check_pfn(pfn)
        prot = int(prot)
        if prot & (self.pfn_mask | self.reserved_mask) & ~_PAT_LARGE or not 0 <= prot <= _U64:
            fail(errno.EINVAL, f"pgprot {prot:#x} overlaps the frame number")
        return pfn << PAGE_SHIFT | prot

    def make_pte(self, pfn: int, keyid: int, flags: int) -> int:
        """``pfn_pte(pfn, keyid_prot(keyid) | flags)``: ``(pfn | keyid << (keyid_shift
        - 12)) << 12 | flags``, with ``flags`` outside the address field."""
        self._check_pfn(pfn)
        self.check_keyid(keyid)
        flags = int(flags)
        if flags & self.pfn_mask_max & ~_PAT_LARGE or not 0 <= flags <= _U64:
            fail(errno.EINVAL, f"flags {flags:#x} overlap the address field")
        return self.pfn_pte(pfn, self.keyid_prot(keyid) | flags)

    def _check_pfn(self, pfn: int) -> None:
        if not 0 <= pfn <= (self.physical_mask & ~self.reserved_mask) >> PAGE_SHIFT:
            fail(errno.EINVAL, f"pfn {pfn:#x} does not fit below the KeyID bits")

    def check_keyid(self, keyid: int) -> None:
        """EINVAL unless ``keyid`` fits in the entry's KeyID bits (0..``max_keyid``)."""
        if not 0 <= keyid <= self.max_keyid:
            fail(errno.EINVAL, f"KeyID {keyid} does not fit in {self.keyid_bits} KeyID bits")

    def pte_pfn(self, pte: int, size: int = SIZE_4K) -> int:
        """``pte_pfn()``/``pmd_pfn()`` after patch 07: the frame number, KeyID bits masked out.

        This is what /proc/PID/pagemap reports in bits 0-54
        (Documentation/admin-guide/mm/pagemap.rst): never the KeyID.
        """
        return (pte & self.pfn_mask & -size) >> PAGE_SHIFT

    def pte_keyid(self, pte: int) -> int:
        """The KeyID of an entry (or of a pgprot value carrying one, as ``vma_keyid()``)."""
        return (pte & self.keyid_mask) >> self.keyid_shift

    def pte_pfns(self, ptes: np.ndarray, sizes: np.ndarray | int = SIZE_4K) -> np.ndarray:
        """``pte_pfn`` of many leaves at once (uint64 entries and sizes): int64 PFNs."""
        u64 = np.uint64
        frame = ptes & u64(self.pfn_mask) & ~(np.asarray(sizes, dtype=u64) - u64(1))
        pfns: np.ndarray = (frame >> u64(PAGE_SHIFT)).astype(np.int64)
        return pfns

    def pte_keyids(self, ptes: np.ndarray) -> np.ndarray:
        """``pte_keyid`` of many entries at once (uint64): int64 KeyIDs."""
        u64 = np.uint64
        keyids: np.ndarray = ((ptes & u64(self.keyid_mask)) >> u64(self.keyid_shift)).astype(
            np.int64
        )
        return keyids

    def pte_flags(self, pte: int, size: int = SIZE_4K) -> PteFlags:
        """The flag bits: everything outside bits 12..51 (and bit 12 on a 2M/1G leaf).

        Linux's ``pte_flags()`` after patch 07 also returns the KeyID bits (its
        ``PTE_FLAGS_MASK`` is ``~PTE_PFN_MASK``); here the KeyID has its own
        accessor, so ``make_pte(pte_pfn(p), pte_keyid(p), pte_flags(p)) == p``.
        """
        return PteFlags(pte & ~(self.pfn_mask_max & -size) & _U64)

    def keyid_prot(self, keyid: int) -> int:
        """The KeyID bits of a pgprot value, as an encrypted VMA's ``vm_page_prot`` holds them."""
        self.check_keyid(keyid)
        return keyid << self.keyid_shift

    def pte_modify(
        self, pte: int, newprot: int, preserve_keyid: bool = True, size: int = SIZE_4K
    ) -> int:
        """``pte_modify()`` (``pmd_modify()`` with ``size`` 2M/1G, which also keeps PSE).

        Keeps the ``_PAGE_CHG_MASK`` bits of ``pte`` (frame number, PCD, PWT,
        SPECIAL, ACCESSED, DIRTY, SOFT_DIRTY, and with ``preserve_keyid`` the
        KeyID) and takes every other bit from ``newprot``.
        """
        chg = self.chg_mask(preserve_keyid) | (_PSE if size != SIZE_4K else 0)
        return (pte & chg) | (int(newprot) & ~chg & _U64)

    def pgprot_modify(self, oldprot: int, newprot: int, preserve_keyid: bool = True) -> int:
        """``pgprot_modify()``: how mprotect recomputes ``vm_page_prot``.

        Without ``preserve_keyid`` the KeyID of ``oldprot`` is lost, the bug
        patch 09 fixes ("they are going to be stripped from vm_page_prot on the
        first pgprot_modify()").
        """
        chg = self.chg_mask(preserve_keyid)
        return (int(oldprot) & chg) | (int(newprot) & ~chg & _U64)
