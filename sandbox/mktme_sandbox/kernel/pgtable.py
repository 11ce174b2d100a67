"""x86-64 4-level page tables of the simulated kernel, stored in emulated memory.

What it models
    The page tables of one or more user address spaces, as the MMU reads them:
    512-entry tables of little-endian 64-bit entries, PGD -> PUD -> PMD -> PTE
    (P4D folded, as Linux does with 4-level paging), every table a 4 KiB page of
    emulated physical memory accessed with KeyID 0 (docs/spec.md 3.4, "Page
    tables"). A leaf is a PTE (4 KiB), a PMD entry with PSE (2 MiB) or a PUD
    entry with PSE (1 GiB). The user address space is the canonical lower half,
    ``0 .. USER_END - 1`` (``0x00007fffffffffff``). What an entry holds (bits,
    protections, the KeyID, the levels' geometry) is ``pgtable_types``.

One walker
    ``walk_page_range(cr3, start, end, ops)`` is the one range walker, in the
    shape of Linux's mm/pagewalk.c: it descends the tables under ``[start,
    end)`` in address order and calls the callbacks of a frozen ``MmWalkOps``:
    ``pte_table`` (every PTE table once, its non-empty entries in the range as
    numpy arrays: the bulk path), ``pte_entry`` (one PTE at a time),
    ``huge_entry`` (a leaf above the PTE level), ``pte_hole`` (a run of empty
    entries, at the level of the table it is in), ``pre_table``/``post_table``
    (a table before and after its entries, ``post_table`` told whether it is
    empty and able to unlink it) and ``bad_entry`` (an upper-level entry
    pointing to no page-table page, never followed). Every scan is a few lines
    of ops over it: ``iter_present``, ``leaf_arrays``, ``iter_spans``,
    ``iter_tables``, ``iter_bad_pointers``, ``free_empty_tables``,
    ``leaf_entries``, ``clear_range`` (zap), ``destroy``; and through those
    ptdump, zap, mprotect, fork, mremap, pageout, migration, pagemap, smaps,
    the audit, rmap, khugepaged and KSM. Single addresses go down with the
    ``pgd_offset`` ... ``pte_offset`` helpers (``get_pte``, ``set_pte``,
    ``walk``, and the fault's ``lookup``/``pte_alloc``/``set_pte_at``), which
    read only the entries on the way.

Rules it keeps
    - Intermediate entries are ``_PAGE_TABLE`` (PRESENT|RW|USER|ACCESSED|DIRTY)
      and never carry KeyID bits: page-table pages are KeyID-0 pages.
    - An entry is *none* when it is 0 (``pte_none``). A PUD/PMD entry is a table
      pointer when PRESENT is set and PSE is clear; any other non-zero entry
      there is a leaf (present or not, e.g. a PROT_NONE huge page).
    - Hot paths cost only the platform accesses a page walk needs: ``get_pte``
      and ``lookup`` 4 loads of 8 bytes; ``set_pte`` 3 loads + 1 store once
      the tables exist; ``clear_pte`` 4 loads + 1 store. A fault walks once,
      as Linux's ``__handle_mm_fault()`` does: ``lookup`` keeps the entry
      where the walk ended, ``pte_alloc`` allocates the missing tables below
      it (one load of the new entry per table) and ``set_pte_at`` stores the
      new PTE there, with no second walk. A range operation does the same
      per page: ``leaf_entries`` gives each leaf with its entry's address and
      the operation stores there (``set_pte_at``), one 8-byte store per page
      as ``change_pte_range()``, ``copy_pte_range()``, ``move_ptes()`` and
      ``try_to_unmap_one()`` store through the pointer they hold; a
      destination (fork's child, mremap's new place) is filled through a
      ``PteAllocMap``, which walks and allocates once per PTE table. The
      walker reads each table page it
      visits with one 4 KiB load and finds the non-empty entries with numpy,
      with no Python work per empty entry; it loads a PTE table only when a
      callback wants PTEs, holes or emptiness.

What it leaves out
    5-level paging (LA57), and PTI's user/kernel PGD pair: an address space
    has no kernel half. The kernel's own tables (the per-KeyID direct mappings,
    ``directmap``) are a ``PageTables`` made with ``va_end=TREE_END``, whose
    addresses are the 48-bit tree addresses (kernel ones not sign-extended).
    Swap entries are stored and walked as any non-empty entry; what they mean
    is kernel/swapfile.py's (migration entries are not used: migration is
    done under the machine lock). Also left out: protection keys (bits 59-62
    are kept as given, never interpreted), and locking: callers hold the
    machine lock.
    Setting a 4 KiB entry inside a huge leaf is refused: ``split_huge_pmd`` first,
    as Linux splits before it changes part of a THP.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple, NoReturn, Protocol

import numpy as np

from mktme_sandbox.errors import fail
from mktme_sandbox.kernel.pgtable_types import (
    PAGE_SHIFT,
    PAGE_SIZE,
    PAGE_TABLE,
    PTRS_PER_TABLE,
    SIZE_2M,
    SIZE_4K,
    USER_END,
    WALK_LEVELS,
    Level,
    PteFlags,
    PteLayout,
)

__all__ = [
    "TREE_END",
    "Leaf",
    "LeafArrays",
    "LeafEntry",
    "Lookup",
    "MmWalkOps",
    "PageTables",
    "PhysMem",
    "PteAllocMap",
    "PteTable",
    "Span",
    "TableRef",
    "WalkStep",
    "p4d_offset",
    "pgd_offset",
    "pmd_offset",
    "pte_offset",
    "pud_offset",
]

_U64 = (1 << 64) - 1
_TABLE = int(PAGE_TABLE)
_PRESENT = int(PteFlags.PRESENT)
_PSE = int(PteFlags.PSE)
_PRESENT_PSE = _PRESENT | _PSE
_PAT = int(PteFlags.PAT)
_PAT_LARGE = int(PteFlags.PAT_LARGE)
TREE_END = PTRS_PER_TABLE << Level.PGD.shift
"""The end of what one PGD maps: whole-tree walks cover the kernel-half slots too."""


def _size_name(size: int) -> str:
    """4096 -> "4K", 1 << 39 -> "512G"."""
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if size >= 1 << shift and not size & ((1 << shift) - 1):
            return f"{size >> shift}{unit}"
    return str(size)


# --- the entry of an address in a table of each level -----------------------------


def pgd_offset(cr3: int, va: int) -> int:
    """Physical address of the PGD entry of ``va`` in the PGD at ``cr3``."""
    return cr3 + 8 * Level.PGD.index(va)


def p4d_offset(pgd: int, va: int) -> int:
    """The P4D entry: with 4-level paging the P4D is folded, it is the PGD entry."""
    return pgd


def pud_offset(table: int, va: int) -> int:
    """Physical address of the PUD entry of ``va`` in the PUD table at ``table``."""
    return table + 8 * Level.PUD.index(va)


def pmd_offset(table: int, va: int) -> int:
    return table + 8 * Level.PMD.index(va)


def pte_offset(table: int, va: int) -> int:
    return table + 8 * Level.PTE.index(va)


_OFFSET = {
    Level.PGD: pgd_offset,
    Level.PUD: pud_offset,
    Level.PMD: pmd_offset,
    Level.PTE: pte_offset,
}
# The hot single-address descents (get_pte, _entry_pa) inline the offsets:
# (va >> (shift - 3)) & 0xFF8 is 8 * index, for each level below the PGD, with
# the bytes a leaf of that level maps.
_DESCENT = tuple((level.shift - 3, level.size) for level in WALK_LEVELS[1:])
_PGD_OFFSET_SHIFT = Level.PGD.shift - 3
_PGD_SIZE = Level.PGD.size
_NONE = bytes(8)  # pte_none


class PhysMem(Protocol):
    """The physical memory tables live in: the emulated platform's CPU view.

    A ``load_u64(pa)`` method, where it has one, reads an entry as a number
    (``Platform.load_u64``); otherwise entries are ``load(pa, 8)`` decoded.
    """

    def load(self, pa: int, length: int, keyid: int = 0) -> bytes: ...

    def store(self, pa: int, data: bytes, keyid: int = 0) -> None: ...


def _load_u64(load: Callable[[int, int], bytes], pa: int) -> int:
    """An entry through ``load``: its eight bytes, little-endian."""
    return int.from_bytes(load(pa, 8), "little")


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
        return Level.of_leaf_size(self.size)


class Leaf(NamedTuple):
    """One non-empty leaf entry found by ``iter_present``."""

    va: int
    size: int
    pte: int


class LeafEntry(NamedTuple):
    """One non-empty leaf entry found by ``leaf_entries``, with where it lies:
    what a Linux range walk holds as its ``pte_t *`` (or ``pmd_t *``)."""

    va: int
    size: int
    pte: int
    entry_pa: int
    """Physical address of the entry in its table page."""

    @property
    def ptep(self) -> Lookup:
        """The entry as ``set_pte_at`` takes it."""
        return Lookup(self.pte, self.size, self.entry_pa)


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


class PteTable(NamedTuple):
    """One PTE table as ``walk_page_range`` hands it to ``MmWalkOps.pte_table``:
    its non-empty entries inside the walked range, as arrays."""

    pa: int
    """Physical address of the table page."""
    base: int
    """The address its entry 0 maps."""
    indices: np.ndarray
    """The entries' indices (int64, ascending)."""
    pte: np.ndarray
    """Their values (uint64)."""

    @property
    def va(self) -> np.ndarray:
        """The address each entry maps (uint64)."""
        return (self.indices.astype(np.uint64) << np.uint64(PAGE_SHIFT)) + np.uint64(self.base)


class TableRef(NamedTuple):
    """A table page met by ``walk_page_range``."""

    level: Level
    """The level of its entries (a PUD table's entries are PUD entries)."""
    pa: int
    """Physical address of the table page."""
    base: int
    """The address its entry 0 maps."""
    entry_pa: int
    """Physical address of the entry that points to it (-1 for the PGD)."""


@dataclass(frozen=True)
class MmWalkOps:
    """The callbacks of one walk (Linux's ``struct mm_walk_ops``); each may be None.

    Addresses are virtual, entries are values, levels are ``Level``.
    """

    pte_table: Callable[[PteTable], None] | None = None
    """Every PTE table under the range that has non-empty entries in it, once,
    with those entries as arrays: the bulk path, no Python work per entry."""
    pte_entry: Callable[[int, int], None] | None = None
    """``(va, pte)`` for each non-empty PTE in the range, in address order."""
    huge_entry: Callable[[int, Level, int, int], None] | None = None
    """``(va, level, entry, entry_pa)`` for each non-empty entry above the PTE
    level that is not a table pointer: a 2M/1G leaf, present or not, and
    where it lies (Linux's ``pmd_entry``/``pud_entry`` on a huge entry, given
    the ``pmd_t *``)."""
    pte_hole: Callable[[int, int, Level], None] | None = None
    """``(start, end, level)`` for each run of empty entries in the range, at
    the level of the table it is in."""
    pre_table: Callable[[TableRef], None] | None = None
    """A table below the PGD, before the walk enters it."""
    post_table: Callable[[TableRef, bool], bool] | None = None
    """A table below the PGD after its entries in the range, with whether the
    whole table is now empty; returns True when it cleared the entry that
    points to the table (the parent then counts one entry fewer)."""
    bad_entry: Callable[[int, Level, int], None] | None = None
    """``(va, level, entry)`` for an entry that points to a table (PRESENT, no
    PSE) but not to a page-table page: the walk never follows it."""


class _PageWalk:
    """One ``walk_page_range``: the range, the callbacks, the tables seen.

    ``seen``: tables rewritten through ``keyids/0/mem`` may point back up or
    twice at one table; a table already walked is skipped, so a walk ends.
    """

    def __init__(
        self, pt: PageTables, start: int, end: int, ops: MmWalkOps, seen: set[int]
    ) -> None:
        self.pt, self.start, self.end, self.ops, self.seen = pt, start, end, ops, seen
        self.load, self.amask, self.is_table_page = pt._load, pt._amask, pt._is_table_page
        self.count = ops.post_table is not None
        self.pte_loop = ops.pte_entry is not None or ops.pte_hole is not None
        self.read_ptes = ops.pte_table is not None or self.pte_loop or self.count

    def table(self, table: TableRef) -> int:
        """Visit the entries of ``table`` overlapping the range; return how many
        entries of the whole table are non-empty afterwards (counted only for
        ``post_table``)."""
        level, base = table.level, table.base
        is_pte = level is Level.PTE
        if is_pte and not self.read_ptes:
            return 0
        shift = level.shift
        entries = np.frombuffer(self.load(table.pa, PAGE_SIZE), "<u8")
        left = int(np.count_nonzero(entries)) if self.count else 0
        lo = max(0, (self.start - base) >> shift)
        hi = min(PTRS_PER_TABLE, (self.end - base + (1 << shift) - 1) >> shift)
        if lo >= hi:
            return left
        window = entries[lo:hi]
        nonzero = np.flatnonzero(window)
        indices, values = nonzero + lo, window[nonzero].astype(np.uint64)
        ops = self.ops
        if is_pte:
            if ops.pte_table is not None and len(indices):
                ops.pte_table(PteTable(table.pa, base, indices, values))
            if self.pte_loop:
                self._ptes(base, indices, values)
            return left
        return left - self._entries(table, indices, values)

    def _ptes(self, base: int, indices: np.ndarray, values: np.ndarray) -> None:
        """The non-empty PTEs of one table in address order, with the holes between them."""
        pte_entry, hole, level = self.ops.pte_entry, self.ops.pte_hole, Level.PTE
        cursor = max(self.start, base)
        for va, e in zip(((indices << PAGE_SHIFT) + base).tolist(), values.tolist(), strict=True):
            if hole is not None and va > cursor:
                hole(cursor, va, level)
            cursor = va + PAGE_SIZE
            if pte_entry is not None:
                pte_entry(va, e)
        stop = min(self.end, base + (PTRS_PER_TABLE << PAGE_SHIFT))
        if hole is not None and stop > cursor:
            hole(cursor, stop, level)

    def _entries(self, table: TableRef, indices: np.ndarray, values: np.ndarray) -> int:
        """The non-empty entries of one table above the PTE level in address
        order, with the holes between them. Returns the entries ``post_table``
        unlinked."""
        ops, hole, level, base = self.ops, self.ops.pte_hole, table.level, table.base
        shift = level.shift
        size = 1 << shift
        cursor, unlinked = max(self.start, base), 0
        for i, e in zip(indices.tolist(), values.tolist(), strict=True):
            va = base + (i << shift)
            if hole is not None and va > cursor:
                hole(cursor, va, level)
            cursor = va + size
            if e & _PRESENT_PSE != _PRESENT:
                if ops.huge_entry is not None:
                    ops.huge_entry(va, level, e, table.pa + 8 * i)
            else:
                unlinked += self._child(table, i, e, va)
        stop = min(self.end, base + (PTRS_PER_TABLE << shift))
        if hole is not None and stop > cursor:
            hole(cursor, stop, level)
        return unlinked

    def _child(self, table: TableRef, i: int, e: int, va: int) -> int:
        """Walk the table entry ``i`` of ``table`` points to; 1 when
        ``post_table`` unlinked it, else 0."""
        child_pa = e & self.amask
        ops = self.ops
        if not self.is_table_page(child_pa):
            if ops.bad_entry is not None:
                ops.bad_entry(va, table.level, e)
            return 0
        if child_pa in self.seen:
            return 0
        self.seen.add(child_pa)
        child = TableRef(table.level.next, child_pa, va, table.pa + 8 * i)
        if ops.pre_table is not None:
            ops.pre_table(child)
        left = self.table(child)
        if ops.post_table is not None and ops.post_table(child, left == 0):
            return 1
        return 0


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
        va_end: int = USER_END,
    ) -> None:
        self.mem = mem
        self.va_end = va_end
        """Addresses walked: the user half (``USER_END``), or for the kernel's
        own tables (``directmap``) the whole tree, ``TREE_END``."""
        self.layout = layout
        self.table_pages = 0
        """Table pages allocated through this object and not yet freed."""
        self._alloc_table = alloc_table
        self._free_table = free_table
        self._load = mem.load
        self._load_u64: Callable[[int], int] = getattr(mem, "load_u64", None) or partial(
            _load_u64, mem.load
        )
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
        return self._free_tree(TableRef(Level.PGD, cr3, 0, -1))

    # -- one entry ------------------------------------------------------------

    def get_pte(self, cr3: int, va: int) -> Lookup | None:
        """The leaf entry mapping ``va``, or None when the walk meets an empty entry.

        An upper-level entry that points to no page table (one forged through
        ``keyids/0/mem``) ends the walk with EIO, as an access to an unmapped
        address does: the kernel never follows it (``mm/check`` reports it).
        """
        found = self.lookup(cr3, va)
        return found if found.pte and found.size != _PGD_SIZE else None

    def lookup(self, cr3: int, va: int) -> Lookup:
        """Where a walk of ``va`` ends: the leaf that maps it, or the first
        empty entry on the way (``pte`` 0, ``size`` the bytes that entry maps,
        ``entry_pa`` where it lies), as ``__handle_mm_fault()`` holds
        ``vmf->pud``, ``vmf->pmd`` and ``vmf->pte``; one 8-byte load per level.
        A non-present PGD entry ends the walk at the PGD (``size`` 512G; x86
        has no PGD leaves). EIO as ``get_pte``."""
        if not 0 <= va < self.va_end:
            self._bad_va("lookup", va)
        load, amask = self._load_u64, self._amask
        pa = cr3 + ((va >> _PGD_OFFSET_SHIFT) & 0xFF8)
        e = load(pa)
        if not e & _PRESENT:
            return Lookup(e, _PGD_SIZE, pa)
        for shift, size in _DESCENT:
            table = e & amask
            if not self._is_table_page(table):
                fail(errno.EIO, f"{va:#x}: the walk meets an entry {e:#x} that points to no table")
            pa = table + ((va >> shift) & 0xFF8)
            e = load(pa)
            if e & _PRESENT_PSE != _PRESENT or size == SIZE_4K:
                return Lookup(e, size, pa)
        raise AssertionError("unreachable")  # pragma: no cover

    def pte_alloc(self, va: int, at: Lookup, size: int = SIZE_4K) -> Lookup:
        """The entry of a ``size`` leaf at ``va``, from the empty entry ``at``
        that ``lookup`` found on the way: the tables between are allocated
        (``pud_alloc``, ``pmd_alloc``, ``pte_alloc``), each linked into the
        entry above it, and the entry of ``va`` in each new table is read, as
        Linux reads ``*pud``, ``*pmd`` and ``*pte`` after allocating. Returns
        that entry for ``set_pte_at``. EINVAL where ``at`` is not empty (the
        address lies inside a leaf) or lies below the level of ``size``."""
        e, entry_size, pa = at
        if entry_size == size:
            return at  # the tables exist: nothing to read or make
        while entry_size != size:
            if e or entry_size < size:
                what = f"a {_size_name(entry_size)} leaf" if e else "a smaller entry"
                fail(errno.EINVAL, f"pte_alloc: {va:#x} lies inside {what}")
            table = self._new_table()
            self._store(pa, (table | _TABLE).to_bytes(8, "little"))
            entry_size >>= 9
            pa = table + ((va >> (entry_size.bit_length() - 4)) & 0xFF8)
            e = self._load_u64(pa)
        return Lookup(e, size, pa)

    def set_pte_at(self, ptep: Lookup, pte: int) -> None:
        """Store ``pte`` in the entry ``ptep`` (from ``lookup`` or
        ``pte_alloc``) with one 8-byte store, no walk (``set_pte_at``/``set_pmd_at``
        through the pointer the fault holds). The entry must be empty or a leaf
        of that size: nothing is collapsed. EINVAL as ``set_pte``."""
        self._check_entry("set_pte_at", pte, ptep.size)
        self._store(ptep.entry_pa, pte.to_bytes(8, "little"))

    def set_pte(self, cr3: int, va: int, pte: int, size: int = SIZE_4K) -> None:
        """Store the leaf ``pte`` for ``va`` (``set_pte_at``/``set_pmd_at``).

        Missing tables are allocated. ``size`` 2M or 1G stores a huge leaf (it
        must have PSE unless it is 0); a table below it (collapse) is unlinked
        and freed, with any tables under it. A 4K/2M entry inside a bigger
        leaf is refused (EINVAL): split it first.
        """
        if va & (size - 1) or not 0 <= va < self.va_end or size not in _LEAF_SIZES:
            self._bad_leaf("set_pte", va, size)
        self._check_entry("set_pte", pte, size)
        pa = self._entry_pa(cr3, va, size, True, "set_pte")
        if size == SIZE_4K:
            self._store(pa, pte.to_bytes(8, "little"))
            return
        old = self._load_u64(pa)
        self._store(pa, pte.to_bytes(8, "little"))
        if old & _PRESENT_PSE == _PRESENT and self._is_table_page(old & self._amask):
            # collapse: the table below goes
            self._free_tree(TableRef(Level.of_leaf_size(size).next, old & self._amask, va, pa))

    def _check_entry(self, op: str, pte: int, size: int) -> None:
        """EINVAL unless ``pte`` may be stored as a ``size`` leaf: no reserved
        bits, and PSE on a 2M/1G leaf that is not 0."""
        if not 0 <= pte <= _U64 or pte & self._reserved:
            fail(errno.EINVAL, f"{op}: {pte:#x} sets reserved bits")
        if size != SIZE_4K and pte and not pte & _PSE:
            fail(errno.EINVAL, f"{op}: a {_size_name(size)} leaf needs PSE, {pte:#x} has none")

    def clear_pte(self, cr3: int, va: int, size: int = SIZE_4K) -> int:
        """Clear the leaf of ``size`` at ``va`` (``ptep_get_and_clear``); returns the old value.

        Returns 0 when nothing was there. Tables left empty stay until
        ``free_empty_tables``. Clearing a 2M/1G entry that points to a table,
        or a 4K entry inside a huge leaf, is refused (EINVAL).
        """
        if va & (size - 1) or not 0 <= va < self.va_end or size not in _LEAF_SIZES:
            self._bad_leaf("clear_pte", va, size)
        pa = self._entry_pa(cr3, va, size, False, "clear_pte")
        if pa < 0:
            return 0
        old = self._load_u64(pa)
        if size != SIZE_4K and old & _PRESENT_PSE == _PRESENT:
            fail(errno.EINVAL, f"clear_pte: {va:#x} maps a table, not a {_size_name(size)} leaf")
        if old:
            self._store(pa, bytes(8))
        return old

    def pte_alloc_one(self) -> int:
        """A zeroed table page, linked nowhere (``pte_alloc_one()``: what a
        THP fault deposits); its physical address. ENOMEM as any table."""
        return self._new_table()

    def pte_free(self, pa: int) -> None:
        """Free a table page that is linked nowhere (``pte_free()``)."""
        self._release(pa)

    def split_huge_pmd(self, cr3: int, va: int, table: int | None = None) -> int:
        """Replace the 2M leaf covering ``va`` with a PTE table of 512 entries.

        Like ``__split_huge_pmd``: same frames, flags and KeyID, PSE dropped and
        PAT_LARGE moved to PAT (``pgprot_large_2_4k``). The table is ``table``
        (the one deposited at fault: ``pgtable_trans_huge_withdraw()``), or a
        new one when None. Returns its physical address.
        """
        va &= -SIZE_2M
        if not 0 <= va < self.va_end:
            self._bad_va("split_huge_pmd", va)
        pa = self._entry_pa(cr3, va, SIZE_2M, False, "split_huge_pmd")
        old = self._load_u64(pa) if pa >= 0 else 0
        if not old or old & _PRESENT_PSE == _PRESENT:
            fail(errno.EINVAL, f"split_huge_pmd: no 2M leaf maps {va:#x}")
        base = old & ~(_PSE | _PAT_LARGE)
        if old & _PAT_LARGE:
            base |= _PAT
        if table is None:
            table = self._new_table()
        ptes = (np.arange(PTRS_PER_TABLE, dtype=np.uint64) << np.uint64(PAGE_SHIFT)) + np.uint64(
            base
        )
        self._store(table, ptes.astype("<u8").tobytes())
        self._store(pa, (table | _TABLE).to_bytes(8, "little"))
        return table

    def collapse_pmd(self, cr3: int, va: int, pmd: int) -> int:
        """Store the 2M leaf ``pmd`` in place of the PTE table that maps
        ``va``'s 2M range, and return that table, unlinked, emptied and not
        freed (khugepaged's ``pmdp_collapse_flush()``, ``pte_clear()`` of each
        entry copied, then ``pgtable_trans_huge_deposit()``). EINVAL where no
        PTE table is there."""
        va &= -SIZE_2M
        if not 0 <= va < self.va_end:
            self._bad_va("collapse_pmd", va)
        self._check_entry("collapse_pmd", pmd, SIZE_2M)
        pa = self._entry_pa(cr3, va, SIZE_2M, False, "collapse_pmd")
        old = self._load_u64(pa) if pa >= 0 else 0
        table = old & self._amask
        if old & _PRESENT_PSE != _PRESENT or not self._is_table_page(table):
            fail(errno.EINVAL, f"collapse_pmd: no PTE table maps {va:#x}")
        self._store(pa, pmd.to_bytes(8, "little"))
        self._store(table, bytes(PAGE_SIZE))
        return table

    def walk(self, cr3: int, va: int) -> list[WalkStep]:
        """The entries a hardware walk of ``va`` reads, to the first non-present or leaf one."""
        if not 0 <= va < self.va_end:
            self._bad_va("walk", va)
        steps = []
        table = cr3
        for level in WALK_LEVELS:
            pa = _OFFSET[level](table, va)
            e = self._load_u64(pa)
            steps.append(WalkStep(level, level.index(va), pa, e))
            if e & _PRESENT_PSE != _PRESENT or level == Level.PTE:
                break
            table = e & self._amask
        return steps

    # -- ranges: the one walker and the scans made of it ------------------------

    def walk_page_range(self, cr3: int, start: int, end: int, ops: MmWalkOps) -> None:
        """Walk the tables of ``cr3`` under ``[start, end)``, calling ``ops``
        (``walk_page_range()`` of mm/pagewalk.c)."""
        self._check_range("walk_page_range", start, end)
        self._walk(cr3, start, end, ops)

    def _walk(self, cr3: int, start: int, end: int, ops: MmWalkOps) -> None:
        """``walk_page_range`` without the range check: whole-tree walks pass
        ``TREE_END`` and meet the PGD's kernel-half slots too."""
        _PageWalk(self, start, end, ops, {cr3}).table(TableRef(Level.PGD, cr3, 0, -1))

    def iter_present(self, cr3: int, start: int = 0, end: int = USER_END) -> Iterator[Leaf]:
        """Every non-empty leaf overlapping ``[start, end)``, ascending by address.

        "Present" in the sense of ``!pte_none()``: PROT_NONE or other
        non-present values the kernel stored are yielded too; test PRESENT.
        A huge leaf that starts below ``start`` is yielded with its own address.
        """
        self._check_range("iter_present", start, end)
        return self._leaves(cr3, start, end)

    def _leaves(self, cr3: int, start: int, end: int) -> Iterator[Leaf]:
        for vas, size, ptes in self._leaf_chunks(cr3, start, end):
            for va, pte in zip(vas.tolist(), ptes.tolist(), strict=True):
                yield Leaf(va, size, pte)

    def leaf_entries(self, cr3: int, start: int = 0, end: int = USER_END) -> list[LeafEntry]:
        """``iter_present`` with each entry's physical address, in one walk: a
        range operation changes each entry through it (``set_pte_at``), as
        Linux's ``change_pte_range()``, ``copy_pte_range()`` and
        ``move_ptes()`` step a ``pte_t *`` through the table they walk, with no
        second walk per page."""
        self._check_range("leaf_entries", start, end)
        entries: list[LeafEntry] = []
        add = entries.append

        def ptes(table: PteTable) -> None:
            pa, base = table.pa, table.base
            for i, e in zip(table.indices.tolist(), table.pte.tolist(), strict=True):
                add(LeafEntry(base + (i << PAGE_SHIFT), SIZE_4K, e, pa + 8 * i))

        def huge(va: int, level: Level, e: int, pa: int) -> None:
            add(LeafEntry(va, level.size, e, pa))

        self._walk(cr3, start, end, MmWalkOps(pte_table=ptes, huge_entry=huge))
        return entries

    def clear_range(self, cr3: int, start: int, end: int) -> list[LeafEntry]:
        """Clear every non-empty leaf overlapping ``[start, end)`` and return
        them as ``leaf_entries`` finds them, in one walk (``zap_pte_range``
        clears each PTE through the pointer its walk holds): a leaf costs one
        8-byte store beyond its table's 4 KiB load. Tables left empty stay
        until ``free_empty_tables``."""
        entries = self.leaf_entries(cr3, start, end)
        store = self._store
        for entry in entries:
            store(entry.entry_pa, _NONE)
        return entries

    def leaf_arrays(self, cr3: int, start: int = 0, end: int = USER_END) -> LeafArrays:
        """``iter_present`` as arrays: one numpy array per PTE table, no Python
        work per entry (the audit and the reverse map count whole spaces)."""
        self._check_range("leaf_arrays", start, end)
        chunks = self._leaf_chunks(cr3, start, end)
        if not chunks:
            empty = np.zeros(0, dtype=np.uint64)
            return LeafArrays(empty, empty, empty)
        return LeafArrays(
            np.concatenate([va for va, _, _ in chunks]),
            np.concatenate([np.full(len(va), size, dtype=np.uint64) for va, size, _ in chunks]),
            np.concatenate([pte for _, _, pte in chunks]),
        )

    def _leaf_chunks(
        self, cr3: int, start: int, end: int
    ) -> list[tuple[np.ndarray, int, np.ndarray]]:
        """The leaves in address order: a whole PTE table as one chunk of
        (addresses, size, values), a huge leaf as a chunk of one."""
        chunks: list[tuple[np.ndarray, int, np.ndarray]] = []

        def huge(va: int, level: Level, e: int, _: int) -> None:
            one = np.array([va], dtype=np.uint64), level.size, np.array([e], dtype=np.uint64)
            chunks.append(one)

        def ptes(table: PteTable) -> None:
            chunks.append((table.va, SIZE_4K, table.pte))

        self._walk(cr3, start, end, MmWalkOps(pte_table=ptes, huge_entry=huge))
        return chunks

    def iter_spans(self, cr3: int, start: int = 0, end: int = USER_END) -> Iterator[Span]:
        """``[start, end)`` cut into leaves and runs of empty entries, each with its level.

        A run of empty entries has the level of the table it is in (an empty PGD
        slot is a PGD-level hole, an empty entry of a PTE table a PTE-level one),
        which is how arch/x86/mm/dump_pagetables.c reports holes.
        """
        self._check_range("iter_spans", start, end)
        spans: list[Span] = []
        add, pte = spans.append, Level.PTE
        ops = MmWalkOps(
            pte_entry=lambda va, e: add(Span(va, SIZE_4K, pte, e)),
            huge_entry=lambda va, level, e, _: add(Span(va, level.size, level, e)),
            pte_hole=lambda lo, hi, level: add(Span(lo, hi - lo, level, 0)),
        )
        self._walk(cr3, start, end, ops)
        return iter(spans)

    def iter_tables(self, cr3: int) -> Iterator[int]:
        """The physical address of every table page of the address space, PGD first."""
        return iter([cr3, *(t.pa for t in self._subtables(cr3))])

    def _subtables(self, cr3: int) -> list[TableRef]:
        """The tables under the PGD ``cr3``, each before the tables under it."""
        tables: list[TableRef] = []
        self._walk(cr3, 0, TREE_END, MmWalkOps(pre_table=tables.append))
        return tables

    def iter_bad_pointers(self, cr3: int) -> Iterator[Span]:
        """Every PGD, PUD or PMD entry that points to a table (PRESENT, no PSE)
        but not to a page-table page (``is_table``): what the walks skip. Each
        is a ``Span`` of the entry's level, address and value."""
        bad: list[Span] = []
        ops = MmWalkOps(bad_entry=lambda va, level, e: bad.append(Span(va, level.size, level, e)))
        self._walk(cr3, 0, TREE_END, ops)
        return iter(bad)

    def free_empty_tables(self, cr3: int, start: int = 0, end: int = USER_END) -> int:
        """Free the table pages under ``[start, end)`` that map nothing (``free_pgtables``).

        Works bottom-up, so a PMD table whose PTE tables were all empty goes too;
        the PGD stays. Returns the number of tables freed.
        """
        self._check_range("free_empty_tables", start, end)
        freed: list[int] = []

        def unlink_if_empty(table: TableRef, empty: bool) -> bool:
            if empty:
                self._store(table.entry_pa, bytes(8))
                self._release(table.pa)
                freed.append(table.pa)
            return empty

        self._walk(cr3, start, end, MmWalkOps(post_table=unlink_if_empty))
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
        load, amask = self._load_u64, self._amask
        pa = cr3 + ((va >> _PGD_OFFSET_SHIFT) & 0xFF8)
        for shift, entry_size in _DESCENT:
            e = load(pa)
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

    def _free_tree(self, table: TableRef) -> int:
        """Free ``table`` and every table under it, the lowest first."""
        children = self._subtables_of(table)
        for child in reversed(children):
            self._release(child.pa)
        self._release(table.pa)
        return len(children) + 1

    def _subtables_of(self, table: TableRef) -> list[TableRef]:
        tables: list[TableRef] = []
        end = table.base + (PTRS_PER_TABLE << table.level.shift)
        ops = MmWalkOps(pre_table=tables.append)
        _PageWalk(self, table.base, end, ops, {table.pa}).table(table)
        return tables

    def _bad_va(self, op: str, va: int) -> NoReturn:
        fail(errno.EINVAL, f"{op}: {va:#x} is not a user address (0..{self.va_end - 1:#x})")

    def _bad_leaf(self, op: str, va: int, size: int) -> NoReturn:
        if size not in _LEAF_SIZES:
            fail(errno.EINVAL, f"{op}: {size:#x} is not a page size (4K, 2M or 1G)")
        if not 0 <= va < self.va_end:
            self._bad_va(op, va)
        fail(errno.EINVAL, f"{op}: {va:#x} is not aligned to {_size_name(size)}")

    def _check_range(self, op: str, start: int, end: int) -> None:
        if not 0 <= start <= end <= self.va_end:
            fail(errno.EINVAL, f"{op}: [{start:#x}, {end:#x}) is not a user range")


_LEAF_SIZES = frozenset(level.size for level in WALK_LEVELS[1:])


class PteAllocMap:
    """The entries of ascending addresses in one address space, tables
    allocated as needed, for a range operation that fills a destination:
    ``copy_pte_range()`` and ``move_ptes()`` allocate the destination's PTE
    table once (``pte_alloc_map()``) and step a ``pte_t *`` through it. The
    first address of a PTE table is walked (``lookup``, ``pte_alloc``); the
    next ones in that table cost no platform access, and their ``Lookup``
    holds ``pte`` 0: the destination is empty (a new space, an unmapped
    range). Use one per operation: it keeps the last PTE table's address."""

    def __init__(self, pt: PageTables, cr3: int) -> None:
        self.pt, self.cr3 = pt, cr3
        self._base, self._table = -1, -1

    def __call__(self, va: int, size: int = SIZE_4K) -> Lookup:
        if size == SIZE_4K and va & -SIZE_2M == self._base:
            return Lookup(0, SIZE_4K, self._table + ((va >> 9) & 0xFF8))
        ptep = self.pt.pte_alloc(va, self.pt.lookup(self.cr3, va), size)
        if size == SIZE_4K:
            self._base, self._table = va & -SIZE_2M, ptep.entry_pa & -PAGE_SIZE
        return ptep
