"""One kernel direct mapping per KeyID, in real page tables ("x86/mm: Calculate
direct mapping size", "x86/mm: Implement sync_direct_mapping()", "x86/mm:
Handle encrypted memory in page_to_virt() and __pa()").

What it models
    The direct mapping of KeyID k starts at ``PAGE_OFFSET + k *
    direct_mapping_size``. The size is a power of two of at least 1 TiB and at
    least the physical memory, so ``__pa()`` is a mask and ``page_to_virt()``
    an add. If the 64 TiB direct-map area cannot hold ``nr_keyids + 1`` copies
    (KeyID 0 and every MKTME KeyID), MKTME is disabled at boot, as v5's
    ``calculate_direct_mapping_size()`` does (patch 16: "x86/mktme: Disabled.
    Not enough virtual address space", then ``mktme_disable()``). The padding
    it adds afterwards (``CONFIG_MEMORY_PHYSICAL_PADDING``, 0 without memory
    hotplug) is 0 here, so the size stays that power of two.

    The mappings are page tables in emulated memory (``init_mm``'s PGD,
    ``swapper_pg_dir``), walked by the one walker of ``pgtable``: boot maps
    KeyID 0's copy (``kernel_physical_mapping_init``) and
    ``sync_direct_mapping()`` makes every other KeyID's copy the same
    structure with the KeyID in the leaves' KeyID bits. Leaves are as Linux
    makes them on a CPU with GBPAGES (every MKTME part has them): a 1 GiB PUD
    leaf for each whole aligned GiB, 2 MiB PMD leaves for the rest
    (``split_mem_range``; ``phys_mem`` is a multiple of 2M), all
    ``PAGE_KERNEL_LARGE``. A 64 MiB machine with 63 KeyIDs needs one PUD and
    one PMD table per copy plus the PGD: 129 pages (516 KiB). Table pages are
    KeyID-0 pages from the allocator, ``PG_pgtable | PG_reserved``, charged
    to no one (memblock's, in Linux: not counted in ``nr_page_table_pages``).

Rules it keeps
    - Every kernel access to a page's contents (``copy_page``, zeroing and
      flushing in ``prep_encrypted_page``/``arch_free_page``, swap-out and
      swap-in, migration, khugepaged's copy, KSM's read) goes to
      ``page_address(pfn)`` (``page_to_virt`` with ``page_keyid``) and is
      translated through these tables to a frame and the KeyID of the leaf.
      A rewritten leaf therefore really misdirects the kernel.
    - The translation of each 2 MiB piece is cached with the leaf's address
      and value, and the leaf is read again (8 bytes) on every access: a leaf
      rewritten through ``keyids/0/mem`` takes effect at once; upper-level
      entries are cached, as the CPU's paging-structure caches hold them,
      until ``sync_direct_mapping`` drops the cache. Snapshots carry the
      cache, as they carry the TLB.
    - ``audit()`` (``mm/check``): every copy maps ``__pa()`` of each address
      with its own KeyID, the same ranges as KeyID 0's, and no upper-level
      entry points to a page that is no page table.

Left out: memory hotplug (the only later call of ``sync_direct_mapping`` in
v5), ``set_memory_*`` splits of the direct map, 4K leaves, KASLR of
``PAGE_OFFSET``.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple, Protocol

import numpy as np

from mktme_sandbox.errors import fail
from mktme_sandbox.kernel.page import MemMap
from mktme_sandbox.kernel.pgtable import PageTables
from mktme_sandbox.kernel.pgtable_types import (
    PAGE_KERNEL_LARGE,
    PAGE_SHIFT,
    PAGE_SIZE,
    SIZE_1G,
    SIZE_2M,
    PteFlags,
)

__all__ = [
    "DIRECT_MAP_AREA",
    "KERNEL_SPACE",
    "PAGE_OFFSET",
    "VMALLOC_START",
    "DirectMap",
    "DirectMapping",
    "direct_mapping_size",
    "normalize_addr",
    "tree_addr",
]

PAGE_OFFSET = 0xFFFF888000000000
DIRECT_MAP_AREA = 64 << 40  # 64 TiB between PAGE_OFFSET and the vmalloc area
KERNEL_SPACE = 0xFFFF800000000000
"""The first kernel address (the "Kernel Space" marker of dump_pagetables.c)."""
LDT_BASE_ADDR = 0xFFFF880000000000
"""The LDT remap area: 4-level ``LDT_PGD_ENTRY`` -240, empty in the sandbox."""
VMALLOC_START = 0xFFFFC90000000000
"""Where the vmalloc area begins (4-level, no KASLR); ``pagetables/kernel`` stops here."""
_MIN_SIZE = 1 << 40
_VA_BITS = 48
_VA_MASK = (1 << _VA_BITS) - 1
_U64 = (1 << 64) - 1
_PRESENT = int(PteFlags.PRESENT)
_CACHE_SHIFT = SIZE_2M.bit_length() - 1
_PIECE_MASK = SIZE_2M - 1


def direct_mapping_size(phys_mem: int) -> int:
    """The smallest power of two >= max(phys_mem, 1 TiB)."""
    return max(_MIN_SIZE, 1 << (phys_mem - 1).bit_length())


def tree_addr(vaddr: int) -> int:
    """A canonical address as the walker names it: its low 48 bits."""
    return vaddr & _VA_MASK


def normalize_addr(addr: int) -> int:
    """dump_pagetables.c's ``normalize_addr()``: a 48-bit tree address sign-extended."""
    return addr | (_U64 & ~_VA_MASK) if addr & (1 << (_VA_BITS - 1)) else addr


@dataclass(frozen=True)
class DirectMap:
    """The layout of the per-KeyID direct mappings of one kernel: arithmetic only."""

    phys_mem: int
    copies: int  # KeyIDs mapped: 1 without MKTME, nr_keyids + 1 with it

    @cached_property
    def size(self) -> int:
        """Computed once: every kernel access through the direct map adds it."""
        return direct_mapping_size(self.phys_mem)

    @staticmethod
    def fits(phys_mem: int, nr_keyids: int) -> bool:
        return (nr_keyids + 1) * direct_mapping_size(phys_mem) <= DIRECT_MAP_AREA

    def page_to_virt(self, pfn: int, keyid: int) -> int:
        return PAGE_OFFSET + keyid * self.size + (pfn << PAGE_SHIFT)

    def pa(self, vaddr: int) -> int:
        """``__pa()``: a mask, because the size is a power of two (v5)."""
        return (vaddr - PAGE_OFFSET) & (self.size - 1)

    def keyid_of(self, vaddr: int) -> int:
        return (vaddr - PAGE_OFFSET) // self.size

    def tables(self) -> Iterator[tuple[int, int, int]]:
        """KeyID 0's leaves, one table at a time: (physical address of the
        first, leaf size, leaves). A 1G leaf for each whole aligned GiB, 2M
        leaves for the rest (``split_mem_range`` with GBPAGES)."""
        gigs = self.phys_mem // SIZE_1G
        per_pud_table = SIZE_1G * 512
        for pa in range(0, gigs * SIZE_1G, per_pud_table):
            yield pa, SIZE_1G, min(512, gigs - pa // SIZE_1G)
        for pa in range(gigs * SIZE_1G, self.phys_mem, SIZE_1G):
            yield pa, SIZE_2M, min(SIZE_1G, self.phys_mem - pa) // SIZE_2M


class PhysMem(Protocol):
    """The platform's CPU view, as the direct mapping reaches it."""

    def load(self, pa: int, length: int, keyid: int = 0) -> bytes: ...
    def store(self, pa: int, data: bytes | memoryview, keyid: int = 0) -> None: ...
    def fill(self, pa: int, length: int, byte: int, keyid: int = 0) -> None: ...
    def flush_range(self, pa: int, length: int, keyid: int) -> int: ...


class _Piece(NamedTuple):
    """A cached translation of one 2 MiB piece of a direct mapping."""

    entry_pa: int
    entry: bytes
    pa: int
    keyid: int


class Finding(NamedTuple):
    """One broken rule of ``DirectMapping.audit``: the rule, the first case, how many."""

    invariant: str
    example: str
    nr: int


class DirectMapping:
    """The kernel's direct mappings: layout, page tables in memory, and access through them."""

    def __init__(self, layout: DirectMap, mem: PhysMem, pages: MemMap, pt: PageTables) -> None:
        self.layout = layout
        self.pt = pt
        self._mem = mem
        self._load = mem.load
        self._pages = pages
        self._pte = pt.layout
        self._translations: dict[int, _Piece] = {}
        self.pgd = pt.create()
        """``swapper_pg_dir``: the physical address of the kernel's PGD."""
        self._map_keyid(0)

    # --- the layout ----------------------------------------------------------------

    @property
    def size(self) -> int:
        return self.layout.size

    @property
    def copies(self) -> int:
        return self.layout.copies

    def page_to_virt(self, pfn: int, keyid: int) -> int:
        return self.layout.page_to_virt(pfn, keyid)

    def pa(self, vaddr: int) -> int:
        return self.layout.pa(vaddr)

    def keyid_of(self, vaddr: int) -> int:
        return self.layout.keyid_of(vaddr)

    def page_address(self, pfn: int) -> int:
        """``page_address()`` after patch 18: the page's own KeyID's mapping."""
        return self.layout.page_to_virt(pfn, self._pages.page_keyid(pfn))

    # --- building ------------------------------------------------------------------

    def _map_keyid(self, keyid: int) -> int:
        """Make KeyID ``keyid``'s copy map what KeyID 0's maps; returns the entries written.

        The leaves of one table are written with one store (``pmd_populate`` of
        a whole table), after ``set_pte`` of the first has made the tables.
        """
        written = 0
        for pa, size, nr in self.layout.tables():
            va = tree_addr(self.layout.page_to_virt(pa >> PAGE_SHIFT, keyid))
            first = self._pte.make_pte(pa >> PAGE_SHIFT, keyid, int(PAGE_KERNEL_LARGE))
            found = self.pt.get_pte(self.pgd, va)
            if found is None or found.size != size:
                self.pt.set_pte(self.pgd, va, first, size)
                found = self.pt.get_pte(self.pgd, va)
                assert found is not None
            want = (np.arange(nr, dtype=np.uint64) * np.uint64(size) + np.uint64(first)).astype(
                "<u8"
            )
            have = np.frombuffer(self._mem.load(found.entry_pa, 8 * nr), "<u8")
            if (have != want).any():
                written += int((have != want).sum())
                self._mem.store(found.entry_pa, want.tobytes())
        return written

    def sync_direct_mapping(self) -> int:
        """Every MKTME KeyID's copy made to match KeyID 0's (patch 17); returns
        the entries written (0 when already in sync)."""
        self._translations.clear()
        return sum(self._map_keyid(keyid) for keyid in range(1, self.copies))

    def flush(self) -> None:
        """Drop the cached translations (``__flush_tlb_all``)."""
        self._translations.clear()

    def export_state(self) -> np.ndarray:
        """The cached translations, as the TLB's are saved: one row per 2 MiB
        piece (piece, entry_pa, entry, pa, keyid), in the order they were made.
        The tables themselves are in memory."""
        rows = [
            (key, p.entry_pa, int.from_bytes(p.entry, "little"), p.pa, p.keyid)
            for key, p in self._translations.items()
        ]
        return np.array(rows, dtype=np.uint64).reshape(-1, 5)

    def import_state(self, rows: np.ndarray) -> None:
        self._translations = {
            key: _Piece(entry_pa, entry.to_bytes(8, "little"), pa, keyid)
            for key, entry_pa, entry, pa, keyid in rows.tolist()
        }

    def table_pages(self) -> list[int]:
        """The physical address of every table page, the PGD first."""
        return list(self.pt.iter_tables(self.pgd))

    def direct_pages_count(self) -> dict[str, int]:
        """Bytes of KeyID 0's copy mapped by each leaf size, under meminfo's
        names (``DirectMap4k``, ``DirectMap2M``, ``DirectMap1G``)."""
        start = tree_addr(PAGE_OFFSET)
        size = self.pt.leaf_arrays(self.pgd, start, start + self.size).size
        named = {"4k": PAGE_SIZE, "2M": SIZE_2M, "1G": SIZE_1G}
        return {name: int(size[size == leaf].sum()) for name, leaf in named.items()}

    # --- access --------------------------------------------------------------------

    def translate(self, vaddr: int) -> tuple[int, int, int]:
        """(physical address, KeyID, bytes left in the leaf) of a direct-map
        address, through the kernel's page tables. EFAULT (a kernel oops in
        Linux) when no present leaf maps it."""
        piece = self._translations.get(vaddr >> _CACHE_SHIFT)
        if piece is None or self._load(piece.entry_pa, 8) != piece.entry:
            piece = self._walk(vaddr)
        offset = vaddr & _PIECE_MASK
        return piece.pa + offset, piece.keyid, SIZE_2M - offset

    def _walk(self, vaddr: int) -> _Piece:
        found = self.pt.get_pte(self.pgd, tree_addr(vaddr))
        if found is None or not found.pte & _PRESENT or found.size < SIZE_2M:
            entry = 0 if found is None else found.pte
            fail(
                errno.EFAULT,
                f"BUG: unable to handle kernel paging request at {vaddr:#x} (entry {entry:#x})",
            )
        base = self._pte.pte_pfn(found.pte, found.size) << PAGE_SHIFT
        piece = _Piece(
            found.entry_pa,
            found.pte.to_bytes(8, "little"),
            base + (vaddr & (found.size - 1) & -SIZE_2M),
            self._pte.pte_keyid(found.pte),
        )
        self._translations[vaddr >> _CACHE_SHIFT] = piece
        return piece

    def _pieces(self, vaddr: int, length: int) -> Iterator[tuple[int, int, int]]:
        """(pa, keyid, length) of each leaf-contiguous part of ``[vaddr, vaddr + length)``."""
        while length > 0:
            pa, keyid, left = self.translate(vaddr)
            n = min(left, length)
            yield pa, keyid, n
            vaddr += n
            length -= n

    def read(self, vaddr: int, length: int) -> bytes:
        """``memcpy`` from the direct mapping."""
        pa, keyid, left = self.translate(vaddr)
        if length <= left:  # the common case: one leaf, no list
            return self._mem.load(pa, length, keyid)
        load = self._mem.load
        return b"".join(load(pa, n, keyid) for pa, keyid, n in self._pieces(vaddr, length))

    def write(self, vaddr: int, data: bytes) -> None:
        """``memcpy`` to the direct mapping."""
        pa, keyid, left = self.translate(vaddr)
        if len(data) <= left:
            self._mem.store(pa, data, keyid)
            return
        view, done = memoryview(data), 0
        for pa, keyid, n in self._pieces(vaddr, len(data)):
            self._mem.store(pa, view[done : done + n], keyid)
            done += n

    def memset(self, vaddr: int, length: int, byte: int) -> None:
        pa, keyid, left = self.translate(vaddr)
        if length <= left:
            self._mem.fill(pa, length, byte, keyid)
            return
        for pa, keyid, n in self._pieces(vaddr, length):
            self._mem.fill(pa, n, byte, keyid)

    def clflush_cache_range(self, vaddr: int, length: int) -> int:
        """Flush the lines of a direct-map range; returns the lines written back."""
        pa, keyid, left = self.translate(vaddr)
        if length <= left:  # one leaf: a page's flush
            return self._mem.flush_range(pa, length, keyid)
        flush = self._mem.flush_range
        return sum(flush(pa, n, keyid) for pa, keyid, n in self._pieces(vaddr, length))

    def read_page(self, pfn: int) -> bytes:
        return self.read(self.page_address(pfn), PAGE_SIZE)

    def write_page(self, pfn: int, data: bytes) -> None:
        self.write(self.page_address(pfn), data)

    def copy_page(self, src: int, dst: int) -> None:
        """``copy_page(page_address(dst), page_address(src))``."""
        self.write_page(dst, self.read_page(src))

    # The allocator's memory (``page_alloc.PhysicalMemory``): it names a page by
    # its physical address and the KeyID it has, which is what page_address() adds.

    def fill(self, pa: int, length: int, byte: int, keyid: int = 0) -> None:
        """``clear_highpage()`` of ``prep_encrypted_page``: through the KeyID's mapping."""
        self.memset(self.layout.page_to_virt(0, keyid) + pa, length, byte)

    def flush_range(self, pa: int, length: int, keyid: int) -> int:
        """``clflush_cache_range(page_address(page), ...)`` of prep_encrypted_page/arch_free_page."""
        return self.clflush_cache_range(self.layout.page_to_virt(0, keyid) + pa, length)

    # --- the audit -------------------------------------------------------------------

    def audit(self) -> list[Finding]:
        """The ``mm/check`` rules of the direct mappings (none broken: an empty list)."""
        start = tree_addr(PAGE_OFFSET)
        va, size, pte = self.pt.leaf_arrays(self.pgd, start, start + DIRECT_MAP_AREA)
        found = self._leaf_findings(va, size, pte)
        found += self._coverage_findings(va, size)
        for bad in self.pt.iter_bad_pointers(self.pgd):
            va_text = f"{normalize_addr(bad.va):#x}"
            found.append(Finding(f"{bad.level.name} entry points to no page table", va_text, 1))
        return found

    def _leaf_findings(self, va: np.ndarray, size: np.ndarray, pte: np.ndarray) -> list[Finding]:
        offset = va - np.uint64(tree_addr(PAGE_OFFSET))
        want_keyid = (offset // np.uint64(self.size)).astype(np.int64)
        want_pfn = ((offset & np.uint64(self.size - 1)) >> np.uint64(PAGE_SHIFT)).astype(np.int64)
        pfn, keyid = self._pte.pte_pfns(pte, size), self._pte.pte_keyids(pte)
        rules: list[tuple[str, np.ndarray, Callable[[int], str]]] = [
            (
                "entry maps another frame than __pa() of its address",
                (pfn != want_pfn) | ((pte & np.uint64(_PRESENT)) == 0),
                lambda i: f"{normalize_addr(int(va[i])):#x} -> pfn {int(pfn[i]):#x}",
            ),
            (
                "entry has another KeyID than its copy's (sync_direct_mapping)",
                keyid != want_keyid,
                lambda i: (
                    f"{normalize_addr(int(va[i])):#x}: KeyID {int(keyid[i])}, "
                    f"copy of KeyID {int(want_keyid[i])}"
                ),
            ),
        ]
        found = []
        for invariant, broken, example in rules:
            hits = np.flatnonzero(broken)
            if len(hits):
                found.append(Finding(invariant, example(int(hits[0])), len(hits)))
        return found

    def _coverage_findings(self, va: np.ndarray, size: np.ndarray) -> list[Finding]:
        """Each copy maps exactly ``[0, phys_mem)`` as KeyID 0's does; no slot past them maps."""
        slot = ((va - np.uint64(tree_addr(PAGE_OFFSET))) // np.uint64(self.size)).astype(np.int64)
        mapped = np.bincount(slot, weights=size.astype(np.float64), minlength=self.copies)
        wrong = [c for c, n in enumerate(mapped.astype(np.int64)) if n != self._expected(c)]
        if not wrong:
            return []
        first = wrong[0]
        example = (
            f"KeyID {first}: {int(mapped[first]):#x} bytes mapped of {self._expected(first):#x}"
        )
        return [Finding("copy does not map what KeyID 0's maps", example, len(wrong))]

    def _expected(self, slot: int) -> int:
        return self.layout.phys_mem if slot < self.copies else 0
