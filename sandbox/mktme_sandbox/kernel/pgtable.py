"""x86-64 4-level page tables of the simulated kernel, stored in emulated memory.

What it models
    The page tables of one or more user address spaces, as the MMU reads them:
    512-entry tables of little-endian 64-bit entries, PGD -> PUD -> PMD -> PTE
    (P4D folded, as Linux does with 4-level paging), every table a 4 KiB page of
    emulated physical memory accessed with KeyID 0 (docs/spec.md 3.4, "Page
    tables"). A leaf is a PTE (4 KiB), a PMD entry with PSE (2 MiB) or a PUD
    entry with PSE (1 GiB). The user address space is the canonical lower half,
    ``0 .. USER_END - 1`` (``0x00007fffffffffff``).

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

Rules it keeps
    - Bit positions as in Linux ``arch/x86/include/asm/pgtable_types.h``
      (``_PAGE_BIT_PRESENT`` 0 ... ``_PAGE_BIT_NX`` 63), declared once in
      ``PteFlags`` and used by the tables, ``ptdump`` and the tools.
    - Intermediate entries are ``_PAGE_TABLE`` (PRESENT|RW|USER|ACCESSED|DIRTY)
      and never carry KeyID bits: page-table pages are KeyID-0 pages.
    - An entry is *none* when it is 0 (``pte_none``). A PUD/PMD entry is a table
      pointer when PRESENT is set and PSE is clear; any other non-zero entry
      there is a leaf (present or not, e.g. a PROT_NONE huge page).
    - Hot paths cost only the platform accesses a page walk needs: ``get_pte``
      4 loads of 8 bytes; ``set_pte`` 3 loads + 1 store once the tables exist;
      ``clear_pte`` 4 loads + 1 store. Scans (``iter_present``, ``iter_spans``,
      ``free_empty_tables``) read each table page with one 4 KiB load and find
      the non-empty entries with numpy, with no Python work per empty entry.

What it leaves out
    5-level paging (LA57), the kernel half and PTI's user/kernel PGD pair (the
    per-KeyID direct mappings are rendered by ``ptdump.render`` from synthetic
    runs), swap and migration entries, protection keys (bits 59-62 are kept as
    given, never interpreted), and locking: callers hold the machine lock.
    Setting a 4 KiB entry inside a huge leaf is refused: ``split_huge_pmd`` first,
    as Linux splits before it changes part of a THP.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from typing import NamedTuple, NoReturn, Protocol

import numpy as np

from mktme_sandbox.errors import fail

__all__ = [
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
    "USER_END",
    "Leaf",
    "LeafArrays",
    "Level",
    "Lookup",
    "PageTables",
    "PhysMem",
    "PteFlags",
    "PteLayout",
    "Span",
    "WalkStep",
]

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PTRS_PER_TABLE = 512
SIZE_4K = 1 << 12
SIZE_2M = 1 << 21
SIZE_1G = 1 << 30
USER_END = 1 << 47
"""End (exclusive) of the user half: the last user address is 0x00007fffffffffff."""
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
_TABLE = int(PAGE_TABLE)
_PRESENT = int(_P.PRESENT)
_PSE = int(_P.PSE)
_PRESENT_PSE = _PRESENT | _PSE
_PAT = int(_P.PAT)
_PAT_LARGE = int(_P.PAT_LARGE)


class Level(IntEnum):
    """Page-table levels, numbered as ``level_name[]`` of arch/x86/mm/dump_pagetables.c.

    P4D is folded with 4-level paging: no entry of the sandbox is at that level.
    """

    PGD = 1
    P4D = 2
    PUD = 3
    PMD = 4
    PTE = 5

    @property
    def shift(self) -> int:
        """log2 of the bytes one entry of this level maps (PGD 39 ... PTE 12)."""
        return _LEVEL_SHIFT[self]


_LEVEL_SHIFT = {Level.PGD: 39, Level.P4D: 39, Level.PUD: 30, Level.PMD: 21, Level.PTE: 12}
_SHIFT_LEVEL = {39: Level.PGD, 30: Level.PUD, 21: Level.PMD, 12: Level.PTE}
_LEAF_LEVEL = {SIZE_4K: Level.PTE, SIZE_2M: Level.PMD, SIZE_1G: Level.PUD}


def _size_name(size: int) -> str:
    """4096 -> "4K", 1 << 39 -> "512G"."""
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if size >= 1 << shift and not size & ((1 << shift) - 1):
            return f"{size >> shift}{unit}"
    return str(size)


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

    def make_pte(self, pfn: int, keyid: int, flags: int) -> int:
        """``pfn_pte()`` with a KeyID: ``(pfn | keyid << (keyid_shift - 12)) << 12 | flags``.

        For a 2M/1G leaf pass the head pfn (aligned) and PSE in ``flags``.
        """
        if not 0 <= pfn <= (self.physical_mask & ~self.reserved_mask) >> PAGE_SHIFT:
            fail(errno.EINVAL, f"pfn {pfn:#x} does not fit below the KeyID bits")
        if not 0 <= keyid <= self.max_keyid:
            fail(errno.EINVAL, f"KeyID {keyid} does not fit in {self.keyid_bits} KeyID bits")
        flags = int(flags)
        if flags & self.pfn_mask_max & ~_PAT_LARGE or not 0 <= flags <= _U64:
            fail(errno.EINVAL, f"flags {flags:#x} overlap the address field")
        return pfn << PAGE_SHIFT | keyid << self.keyid_shift | flags

    def pte_pfn(self, pte: int, size: int = SIZE_4K) -> int:
        """``pte_pfn()``/``pmd_pfn()`` after patch 07: the frame number, KeyID bits masked out.

        This is what /proc/PID/pagemap reports in bits 0-54
        (Documentation/admin-guide/mm/pagemap.rst): never the KeyID.
        """
        return (pte & self.pfn_mask & -size) >> PAGE_SHIFT

    def pte_keyid(self, pte: int) -> int:
        """The KeyID of an entry (or of a pgprot value carrying one, as ``vma_keyid()``)."""
        return (pte & self.keyid_mask) >> self.keyid_shift

    def pte_flags(self, pte: int, size: int = SIZE_4K) -> PteFlags:
        """The flag bits: everything outside bits 12..51 (and bit 12 on a 2M/1G leaf).

        Linux's ``pte_flags()`` after patch 07 also returns the KeyID bits (its
        ``PTE_FLAGS_MASK`` is ``~PTE_PFN_MASK``); here the KeyID has its own
        accessor, so ``make_pte(pte_pfn(p), pte_keyid(p), pte_flags(p)) == p``.
        """
        return PteFlags(pte & ~(self.pfn_mask_max & -size) & _U64)

    def keyid_prot(self, keyid: int) -> int:
        """The KeyID bits of a pgprot value, as an encrypted VMA's ``vm_page_prot`` holds them."""
        if not 0 <= keyid <= self.max_keyid:
            fail(errno.EINVAL, f"KeyID {keyid} does not fit in {self.keyid_bits} KeyID bits")
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


class PhysMem(Protocol):
    """The physical memory tables live in: the emulated platform's CPU view."""

    def load(self, pa: int, length: int, keyid: int = 0) -> bytes: ...

    def store(self, pa: int, data: bytes, keyid: int = 0) -> None: ...


class Lookup(NamedTuple):
    """The leaf entry that maps an address (immutable; a NamedTuple to stay cheap)."""

    pte: int
    """The entry's value (not ``pte_none``; PRESENT may be clear, e.g. PROT_NONE)."""
    size: int
    """The bytes the leaf maps: ``SIZE_4K``, ``SIZE_2M`` or ``SIZE_1G``."""
    entry_pa: int
    """Physical address of the entry in its table page."""

    @property
    def level(self) -> Level:
        return _LEAF_LEVEL[self.size]


class Leaf(NamedTuple):
    """One non-empty leaf entry found by ``iter_present``."""

    va: int
    size: int
    pte: int


class LeafArrays(NamedTuple):
    """Every non-empty leaf of a range as three parallel arrays (``leaf_arrays``)."""

    va: np.ndarray
    """The address each leaf maps (uint64)."""
    size: np.ndarray
    """The bytes it maps (uint64: 4K, 2M or 1G)."""
    pte: np.ndarray
    """Its value (uint64)."""


class Span(NamedTuple):
    """A leaf (``pte != 0``) or a run of empty entries of one level (``pte == 0``)."""

    va: int
    size: int
    level: Level
    pte: int


@dataclass(frozen=True)
class WalkStep:
    """One entry read by a page walk (``PageTables.walk``)."""

    level: Level
    index: int
    entry_pa: int
    entry: int

    @property
    def table_pa(self) -> int:
        return self.entry_pa - 8 * self.index


_WALK_LEVELS = ((Level.PGD, 39), (Level.PUD, 30), (Level.PMD, 21), (Level.PTE, 12))
# (va >> s) & 0xFF8 is the byte offset of the entry (index * 8) in the table of
# the level below the one whose leaf maps `size` bytes.
_DESCENT = ((27, SIZE_1G), (18, SIZE_2M), (9, SIZE_4K))
_FROM = int.from_bytes


class PageTables:
    """The page tables of address spaces, each named by its ``cr3`` (the PGD's address).

    ``alloc_table()`` returns the physical address of a zeroed 4 KiB page for a
    new table; ``free_table(pa)`` takes one back. Leaf pages are the caller's:
    nothing here allocates or frees a page a leaf points to. ``is_table(pa)``
    says whether ``pa`` is a page-table page: scans, walks that free and
    ``destroy`` follow an upper-level entry only to such a page, so a PGD, PUD
    or PMD entry rewritten through ``keyids/0/mem`` to point outside memory, at
    a free page or at a data page is skipped (``iter_bad_pointers`` lists them).
    """

    def __init__(
        self,
        mem: PhysMem,
        layout: PteLayout,
        alloc_table: Callable[[], int],
        free_table: Callable[[int], None],
        is_table: Callable[[int], bool] = lambda pa: True,
    ) -> None:
        self.mem = mem
        self.layout = layout
        self.table_pages = 0
        """Table pages allocated through this object and not yet freed."""
        self._alloc_table = alloc_table
        self._free_table = free_table
        self._load = mem.load
        self._store = mem.store
        self._amask = layout.pfn_mask
        self._reserved = layout.reserved_mask
        self._is_table_page = is_table

    # -- address spaces -------------------------------------------------------

    def create(self) -> int:
        """A new, empty address space; returns its cr3 (the PGD's physical address)."""
        return self._new_table()

    def destroy(self, cr3: int) -> int:
        """Free every table of the address space, the PGD last; returns the count."""
        return self._free_tree(cr3, 39)

    # -- one entry ------------------------------------------------------------

    def get_pte(self, cr3: int, va: int) -> Lookup | None:
        """The leaf entry mapping ``va``, or None when the walk meets an empty entry.

        An upper-level entry that points to no page table (one forged through
        ``keyids/0/mem``) ends the walk with EIO, as an access to an unmapped
        address does: the kernel never follows it (``mm/check`` reports it).
        """
        if not 0 <= va < USER_END:
            self._bad_va("get_pte", va)
        load, amask = self._load, self._amask
        e = _FROM(load(cr3 + ((va >> 36) & 0xFF8), 8), "little")
        if not e & _PRESENT:
            return None
        for shift, size in _DESCENT:
            table = e & amask
            if not self._is_table_page(table):
                fail(errno.EIO, f"{va:#x}: the walk meets an entry {e:#x} that points to no table")
            pa = table + ((va >> shift) & 0xFF8)
            e = _FROM(load(pa, 8), "little")
            if e & _PRESENT_PSE != _PRESENT or size == SIZE_4K:
                return Lookup(e, size, pa) if e else None
        raise AssertionError("unreachable")  # pragma: no cover

    def set_pte(self, cr3: int, va: int, pte: int, size: int = SIZE_4K) -> None:
        """Store the leaf ``pte`` for ``va`` (``set_pte_at``/``set_pmd_at``).

        Missing tables are allocated. ``size`` 2M or 1G stores a huge leaf (it
        must have PSE unless it is 0); a table below it (collapse) is unlinked
        and freed, with any tables under it. A 4K/2M entry inside a bigger
        leaf is refused (EINVAL): split it first.
        """
        if va & (size - 1) or not 0 <= va < USER_END or size not in _LEAF_LEVEL:
            self._bad_leaf("set_pte", va, size)
        if not 0 <= pte <= _U64 or pte & self._reserved:
            fail(errno.EINVAL, f"set_pte: {pte:#x} sets reserved bits")
        pa = self._entry_pa(cr3, va, size, True, "set_pte")
        if size == SIZE_4K:
            self._store(pa, pte.to_bytes(8, "little"))
            return
        if pte and not pte & _PSE:
            fail(errno.EINVAL, f"set_pte: a {_size_name(size)} leaf needs PSE, {pte:#x} has none")
        old = _FROM(self._load(pa, 8), "little")
        self._store(pa, pte.to_bytes(8, "little"))
        if old & _PRESENT_PSE == _PRESENT and self._is_table_page(old & self._amask):
            # collapse: the table below goes
            self._free_tree(old & self._amask, size.bit_length() - 1 - 9)

    def alloc_tables(self, cr3: int, va: int, size: int = SIZE_4K) -> None:
        """Allocate the tables a ``size`` leaf at ``va`` needs (``pud_alloc``,
        ``pmd_alloc``, ``pte_alloc``); a fault does this before it takes a page."""
        if va & (size - 1) or not 0 <= va < USER_END or size not in _LEAF_LEVEL:
            self._bad_leaf("alloc_tables", va, size)
        self._entry_pa(cr3, va, size, True, "alloc_tables")

    def clear_pte(self, cr3: int, va: int, size: int = SIZE_4K) -> int:
        """Clear the leaf of ``size`` at ``va`` (``ptep_get_and_clear``); returns the old value.

        Returns 0 when nothing was there. Tables left empty stay until
        ``free_empty_tables``. Clearing a 2M/1G entry that points to a table,
        or a 4K entry inside a huge leaf, is refused (EINVAL).
        """
        if va & (size - 1) or not 0 <= va < USER_END or size not in _LEAF_LEVEL:
            self._bad_leaf("clear_pte", va, size)
        pa = self._entry_pa(cr3, va, size, False, "clear_pte")
        if pa < 0:
            return 0
        old = _FROM(self._load(pa, 8), "little")
        if size != SIZE_4K and old & _PRESENT_PSE == _PRESENT:
            fail(errno.EINVAL, f"clear_pte: {va:#x} maps a table, not a {_size_name(size)} leaf")
        if old:
            self._store(pa, bytes(8))
        return old

    def split_huge_pmd(self, cr3: int, va: int) -> int:
        """Replace the 2M leaf covering ``va`` with a PTE table of 512 entries.

        Like ``__split_huge_pmd``: same frames, flags and KeyID, PSE dropped and
        PAT_LARGE moved to PAT (``pgprot_large_2_4k``). Returns the new table's
        physical address.
        """
        va &= -SIZE_2M
        if not 0 <= va < USER_END:
            self._bad_va("split_huge_pmd", va)
        pa = self._entry_pa(cr3, va, SIZE_2M, False, "split_huge_pmd")
        old = _FROM(self._load(pa, 8), "little") if pa >= 0 else 0
        if not old or old & _PRESENT_PSE == _PRESENT:
            fail(errno.EINVAL, f"split_huge_pmd: no 2M leaf maps {va:#x}")
        base = old & ~(_PSE | _PAT_LARGE)
        if old & _PAT_LARGE:
            base |= _PAT
        table = self._new_table()
        ptes = (np.arange(PTRS_PER_TABLE, dtype=np.uint64) << np.uint64(PAGE_SHIFT)) + np.uint64(
            base
        )
        self._store(table, ptes.astype("<u8").tobytes())
        self._store(pa, (table | _TABLE).to_bytes(8, "little"))
        return table

    def walk(self, cr3: int, va: int) -> list[WalkStep]:
        """The entries a hardware walk of ``va`` reads, to the first non-present or leaf one."""
        if not 0 <= va < USER_END:
            self._bad_va("walk", va)
        steps = []
        table = cr3
        for level, shift in _WALK_LEVELS:
            index = (va >> shift) & 511
            pa = table + 8 * index
            e = _FROM(self._load(pa, 8), "little")
            steps.append(WalkStep(level, index, pa, e))
            if e & _PRESENT_PSE != _PRESENT or level == Level.PTE:
                break
            table = e & self._amask
        return steps

    # -- ranges ---------------------------------------------------------------

    def iter_present(self, cr3: int, start: int = 0, end: int = USER_END) -> Iterator[Leaf]:
        """Every non-empty leaf overlapping ``[start, end)``, ascending by address.

        "Present" in the sense of ``!pte_none()``: PROT_NONE or other
        non-present values the kernel stored are yielded too; test PRESENT.
        A huge leaf that starts below ``start`` is yielded with its own address.
        """
        self._check_range("iter_present", start, end)
        return self._leaves(cr3, 39, 0, start, end, {cr3})

    def leaf_arrays(self, cr3: int, start: int = 0, end: int = USER_END) -> LeafArrays:
        """``iter_present`` as arrays: one numpy array per PTE table, no Python
        work per entry (the audit and the reverse map count whole spaces)."""
        self._check_range("leaf_arrays", start, end)
        chunks = list(self._leaf_chunks(cr3, 39, 0, start, end, {cr3}))
        if not chunks:
            empty = np.zeros(0, dtype=np.uint64)
            return LeafArrays(empty, empty, empty)
        return LeafArrays(
            np.concatenate([va for va, _, _ in chunks]),
            np.concatenate([np.full(len(va), size, dtype=np.uint64) for va, size, _ in chunks]),
            np.concatenate([pte for _, _, pte in chunks]),
        )

    def iter_spans(self, cr3: int, start: int = 0, end: int = USER_END) -> Iterator[Span]:
        """``[start, end)`` cut into leaves and runs of empty entries, each with its level.

        A run of empty entries has the level of the table it is in (an empty PGD
        slot is a PGD-level hole, an empty entry of a PTE table a PTE-level one),
        which is how arch/x86/mm/dump_pagetables.c reports holes.
        """
        self._check_range("iter_spans", start, end)
        return self._spans(cr3, 39, 0, start, end, {cr3})

    def iter_tables(self, cr3: int) -> Iterator[int]:
        """The physical address of every table page of the address space, PGD first."""
        yield cr3
        yield from self._subtables(cr3, 39, {cr3})

    def iter_bad_pointers(self, cr3: int) -> Iterator[Span]:
        """Every PGD, PUD or PMD entry that points to a table (PRESENT, no PSE)
        but not to a page-table page (``is_table``): what the walks skip. Each
        is a ``Span`` of the entry's level, address and value."""
        return self._bad_pointers(cr3, 39, 0, {cr3})

    def free_empty_tables(self, cr3: int, start: int = 0, end: int = USER_END) -> int:
        """Free the table pages under ``[start, end)`` that map nothing (``free_pgtables``).

        Works bottom-up, so a PMD table whose PTE tables were all empty goes too;
        the PGD stays. Returns the number of tables freed.
        """
        self._check_range("free_empty_tables", start, end)
        freed: list[int] = []
        self._prune(cr3, 39, 0, start, end, freed, {cr3})
        return len(freed)

    # -- internals ------------------------------------------------------------

    def _new_table(self) -> int:
        pa = self._alloc_table()
        if pa & (PAGE_SIZE - 1) or not 0 <= pa <= self._amask:
            fail(errno.EINVAL, f"page table at {pa:#x}: not a page below the KeyID bits")
        self.table_pages += 1
        return pa

    def _release(self, pa: int) -> None:
        self.table_pages -= 1
        self._free_table(pa)

    def _entry_pa(self, cr3: int, va: int, size: int, alloc: bool, op: str) -> int:
        """Physical address of the entry for a ``size`` leaf at ``va``; -1 if a table is missing."""
        load, amask = self._load, self._amask
        pa = cr3 + ((va >> 36) & 0xFF8)
        for shift, entry_size in _DESCENT:
            e = _FROM(load(pa, 8), "little")
            if e & _PRESENT_PSE != _PRESENT:  # not a table pointer
                if e:
                    fail(
                        errno.EINVAL,
                        f"{op}: {va:#x} lies inside a {_size_name(entry_size << 9)} leaf",
                    )
                if not alloc:
                    return -1
                e = self._new_table() | _TABLE
                self._store(pa, e.to_bytes(8, "little"))
            pa = (e & amask) + ((va >> shift) & 0xFF8)
            if entry_size == size:
                return pa
        raise AssertionError("unreachable")  # pragma: no cover

    def _entries(
        self, table: int, shift: int, base: int, start: int, end: int
    ) -> tuple[list[int], list[int]]:
        """Indices and values of the non-empty entries of ``table`` overlapping ``[start, end)``.

        ``table`` maps ``[base, base + 512 << shift)``; one 4 KiB load.
        """
        indices, values = self._entry_array(table, shift, base, start, end)
        return indices.tolist(), values.tolist()

    def _entry_array(
        self, table: int, shift: int, base: int, start: int, end: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """``_entries`` as numpy arrays (int64 indices, uint64 values)."""
        lo = max(0, (start - base) >> shift)
        hi = min(PTRS_PER_TABLE, (end - base + (1 << shift) - 1) >> shift)
        if lo >= hi:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.uint64)
        entries = np.frombuffer(self._load(table, PAGE_SIZE), "<u8")[lo:hi]
        nonzero = np.flatnonzero(entries)
        return nonzero + lo, entries[nonzero].astype(np.uint64)

    @staticmethod
    def _is_table(e: int, shift: int) -> bool:
        """True when ``e``, an entry of a table with ``1 << shift``-byte entries, points to a table."""
        return shift != PAGE_SHIFT and e & _PRESENT_PSE == _PRESENT

    def _child(self, e: int, shift: int, seen: set[int]) -> int | None:
        """The table ``e`` points to, once per walk.

        In tables the kernel built every table hangs from exactly one entry;
        tables rewritten through ``keyids/0/mem`` may point back up or twice at
        one table, and a walk must still end: a table already seen is skipped.
        """
        if not self._is_table(e, shift):
            return None
        child = e & self._amask
        if child in seen or not self._is_table_page(child):
            return None
        seen.add(child)
        return child

    def _leaves(
        self, table: int, shift: int, base: int, start: int, end: int, seen: set[int]
    ) -> Iterator[Leaf]:
        for vas, size, ptes in self._leaf_chunks(table, shift, base, start, end, seen):
            for va, pte in zip(vas.tolist(), ptes.tolist(), strict=False):
                yield Leaf(va, size, pte)

    def _leaf_chunks(
        self, table: int, shift: int, base: int, start: int, end: int, seen: set[int]
    ) -> Iterator[tuple[np.ndarray, int, np.ndarray]]:
        """The leaves under ``table`` in address order: a whole PTE table as one
        chunk of (addresses, size, values), a huge leaf as a chunk of one."""
        indices, values = self._entry_array(table, shift, base, start, end)
        if shift == PAGE_SHIFT:
            if len(indices):
                yield (
                    (indices.astype(np.uint64) << np.uint64(PAGE_SHIFT)) + np.uint64(base),
                    SIZE_4K,
                    values,
                )
            return
        for i, e in zip(indices.tolist(), values.tolist(), strict=False):
            va = base + (i << shift)
            if not self._is_table(e, shift):
                yield np.array([va], dtype=np.uint64), 1 << shift, np.array([e], dtype=np.uint64)
                continue
            child = self._child(e, shift, seen)
            if child is not None:
                yield from self._leaf_chunks(child, shift - 9, va, start, end, seen)

    def _bad_pointers(self, table: int, shift: int, base: int, seen: set[int]) -> Iterator[Span]:
        if shift == PAGE_SHIFT:
            return
        indices, values = self._entries(table, shift, base, base, base + (PTRS_PER_TABLE << shift))
        for i, e in zip(indices, values, strict=False):
            va = base + (i << shift)
            if not self._is_table(e, shift):
                continue
            if not self._is_table_page(e & self._amask):
                yield Span(va, 1 << shift, _SHIFT_LEVEL[shift], e)
                continue
            child = self._child(e, shift, seen)
            if child is not None:
                yield from self._bad_pointers(child, shift - 9, va, seen)

    def _spans(
        self, table: int, shift: int, base: int, start: int, end: int, seen: set[int]
    ) -> Iterator[Span]:
        indices, values = self._entries(table, shift, base, start, end)
        size, level = 1 << shift, _SHIFT_LEVEL[shift]
        cursor, stop = max(start, base), min(end, base + (PTRS_PER_TABLE << shift))
        for i, e in zip(indices, values, strict=False):
            va = base + (i << shift)
            if va > cursor:
                yield Span(cursor, va - cursor, level, 0)
            if self._is_table(e, shift):
                child = self._child(e, shift, seen)
                if child is not None:
                    yield from self._spans(child, shift - 9, va, start, end, seen)
            else:
                yield Span(va, size, level, e)
            cursor = va + size
        if stop > cursor:
            yield Span(cursor, stop - cursor, level, 0)

    def _subtables(self, table: int, shift: int, seen: set[int]) -> Iterator[int]:
        if shift == 12:
            return
        _, values = self._entries(table, shift, 0, 0, PTRS_PER_TABLE << shift)
        for e in values:
            child = self._child(e, shift, seen)
            if child is not None:
                yield child
                yield from self._subtables(child, shift - 9, seen)

    def _free_tree(self, table: int, shift: int) -> int:
        """Free ``table`` (entries of ``1 << shift`` bytes) and every table under it."""
        children = list(self._subtables(table, shift, {table}))
        for child in reversed(children):
            self._release(child)
        self._release(table)
        return len(children) + 1

    def _prune(
        self,
        table: int,
        shift: int,
        base: int,
        start: int,
        end: int,
        freed: list[int],
        seen: set[int],
    ) -> bool:
        """Free the empty tables under ``table`` within the range; True if ``table`` is empty."""
        indices, values = self._entries(table, shift, base, base, base + (PTRS_PER_TABLE << shift))
        left = len(values)
        for i, e in zip(indices, values, strict=False):
            va = base + (i << shift)
            if va >= end or va + (1 << shift) <= start:
                continue
            child = self._child(e, shift, seen)
            if child is not None and self._prune(child, shift - 9, va, start, end, freed, seen):
                self._store(table + 8 * i, bytes(8))
                self._release(child)
                freed.append(child)
                left -= 1
        return left == 0

    @staticmethod
    def _bad_va(op: str, va: int) -> NoReturn:
        fail(errno.EINVAL, f"{op}: {va:#x} is not a user address (0..{USER_END - 1:#x})")

    @staticmethod
    def _bad_leaf(op: str, va: int, size: int) -> NoReturn:
        if size not in _LEAF_LEVEL:
            fail(errno.EINVAL, f"{op}: {size:#x} is not a page size (4K, 2M or 1G)")
        if not 0 <= va < USER_END:
            PageTables._bad_va(op, va)
        fail(errno.EINVAL, f"{op}: {va:#x} is not aligned to {_size_name(size)}")

    @staticmethod
    def _check_range(op: str, start: int, end: int) -> None:
        if not 0 <= start <= end <= USER_END:
            fail(errno.EINVAL, f"{op}: [{start:#x}, {end:#x}) is not a user range")
