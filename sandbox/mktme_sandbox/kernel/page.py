"""struct page and page_ext of every PFN (``mem_map``), behind the kernel's accessors.

Linux keeps one ``struct page`` per physical page (``mem_map``) and, with
``CONFIG_PAGE_EXTENSION``, a ``page_ext`` beside it; the MKTME series stores a
page's KeyID there ("x86/mm: Implement page_keyid() using page_ext"). This
module holds that state as three private numpy arrays indexed by PFN and is
the only code that indexes them. Everything else asks through the kernel's
vocabulary:

- page_ext: ``page_keyid(pfn)``, ``set_page_keyid(pfn, keyid, nr)``;
- page->flags: ``page_flags(pfn)`` and the predicates ``PageBuddy``,
  ``PageAnon``, ``PageTable``, ``PageKsm``, ``PageHead``, ``PageTail``,
  ``PageTransHuge``, ``PageCompound``, ``PageReserved``, ``is_zero_pfn``;
  ``SetPageKsm``/``ClearPageBuddy`` and friends where a writer needs them;
- the map count: ``page_mapcount(pfn)``, ``page_mapped(pfn)``,
  ``page_exclusive(pfn)``; ``get_page``/``put_page`` take and drop one
  mapping of a page (its compound head), and ``put_page`` frees the page
  when the last one goes. The model keeps no separate reference count: a page
  is referenced exactly by the PTEs that map it (no GUP pins, no page cache),
  so ``page_count()`` and ``page_mapcount()`` are one number here;
- compound pages: ``compound_head(pfn)``, ``prep_compound_page``,
  ``split_huge_page``;
- bulk readers (``mm/kpageflags``, ``mm/page_keyid``, ``mm/check``, the KeyID
  map, rmap): ``keyids_of``, ``flags_of``, ``mapcounts_of``, read-only views
  of a PFN range that numpy can index and compare at once.

The allocator (``page_alloc``) owns the one ``MemMap`` and writes the
allocation state through ``prep_new_page`` and ``free_pages_prepare``; the
kernel shares it as ``Kernel.pages``.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import IntFlag
from typing import Any

import numpy as np

from mktme_sandbox.kernel.pgtable_types import HPAGE_NR, HPAGE_ORDER

__all__ = ["PG", "MemMap", "set_pages"]


class PG(IntFlag):
    """The page->flags this model keeps (a subset of Linux's)."""

    BUDDY = 1 << 0  # free
    ANON = 1 << 1
    PGTABLE = 1 << 2
    ZERO = 1 << 3  # the shared zero page
    KSM = 1 << 4
    HEAD = 1 << 5  # first page of a 2M compound page
    TAIL = 1 << 6
    RESERVED = 1 << 7
    MLOCKED = 1 << 8  # PG_mlocked: mapped by a VM_LOCKED VMA (kept on the head of a THP)


# The flags as plain ints: the predicates below run once per page in faults and
# scans on Python ints (``item()``), where an enum member lookup or numpy
# scalar arithmetic costs more than the test itself.
_BUDDY = int(PG.BUDDY)
_ANON = int(PG.ANON)
_PGTABLE = int(PG.PGTABLE)
_ZERO = int(PG.ZERO)
_KSM = int(PG.KSM)
_HEAD = int(PG.HEAD)
_TAIL = int(PG.TAIL)
_RESERVED = int(PG.RESERVED)
_MLOCKED = int(PG.MLOCKED)
_ZERO_OR_KSM = _ZERO | _KSM
_HEAD_MASK = ~(HPAGE_NR - 1)


def set_pages(array: np.ndarray, pfn: int, nr: int, value: int) -> None:
    """``array[pfn:pfn + nr] = value`` for a per-PFN array; one page (a
    fault's) by an item store, which costs a third of a slice's."""
    if nr == 1:
        array[pfn] = value
    else:
        array[pfn : pfn + nr] = value


def _read_only(array: np.ndarray) -> np.ndarray:
    view = array.view()
    view.flags.writeable = False
    return view


class MemMap:
    """The struct page and page_ext of every PFN. ``free_page`` is the
    allocator's, called by ``put_page`` when a page's last mapping goes."""

    def __init__(self, nr_pages: int, free_page: Callable[[int], None]) -> None:
        self.nr_pages = nr_pages
        self._free_page = free_page
        # one entry per PFN (np.zeros is lazily backed)
        self._keyid = np.zeros(nr_pages, dtype=np.uint16)
        self._mapcount = np.zeros(nr_pages, dtype=np.int32)
        self._flags = np.zeros(nr_pages, dtype=np.uint32)

    def pfn_valid(self, pfn: int) -> bool:
        return 0 <= pfn < self.nr_pages

    # --- page_ext: the KeyID ----------------------------------------------------

    def page_keyid(self, pfn: int) -> int:
        return int(self._keyid.item(pfn))

    def set_page_keyid(self, pfn: int, keyid: int, nr: int = 1) -> None:
        """The KeyID of ``nr`` pages from ``pfn`` (prep_encrypted_page, arch_free_page)."""
        set_pages(self._keyid, pfn, nr, keyid)

    # --- page->flags ------------------------------------------------------------

    def page_flags(self, pfn: int) -> PG:
        return PG(self._flags.item(pfn))

    def _test(self, pfn: int, flag: int) -> bool:
        return bool(self._flags.item(pfn) & flag)

    def PageBuddy(self, pfn: int) -> bool:
        return self._test(pfn, _BUDDY)

    def PageAnon(self, pfn: int) -> bool:
        return self._test(pfn, _ANON)

    def PageTable(self, pfn: int) -> bool:
        return self._test(pfn, _PGTABLE)

    def page_table_at(self, pa: int) -> bool:
        """``PageTable()`` of the page at physical address ``pa``; False beyond
        memory. Every step of every walk asks it: one call, no enum."""
        pfn = pa >> 12
        return 0 <= pfn < self.nr_pages and bool(self._flags.item(pfn) & _PGTABLE)

    def PageKsm(self, pfn: int) -> bool:
        return self._test(pfn, _KSM)

    def PageHead(self, pfn: int) -> bool:
        return self._test(pfn, _HEAD)

    def PageTail(self, pfn: int) -> bool:
        return self._test(pfn, _TAIL)

    def PageCompound(self, pfn: int) -> bool:
        return self._test(pfn, _HEAD | _TAIL)

    def PageTransHuge(self, pfn: int) -> bool:
        """The head of a 2M anonymous page (Linux asks it of heads only)."""
        return self._test(pfn, _HEAD)

    def PageReserved(self, pfn: int) -> bool:
        return self._test(pfn, _RESERVED)

    def is_zero_pfn(self, pfn: int) -> bool:
        """The shared zero page."""
        return self._test(pfn, _ZERO)

    def PageMlocked(self, pfn: int) -> bool:
        """PG_mlocked, asked of the compound head (PF_NO_TAIL)."""
        return self._test(self.compound_head(pfn), _MLOCKED)

    def SetPageMlocked(self, pfn: int) -> None:
        self._flags[self.compound_head(pfn)] |= np.uint32(PG.MLOCKED)

    def ClearPageMlocked(self, pfn: int) -> None:
        self._flags[self.compound_head(pfn)] &= np.uint32(0xFFFFFFFF ^ PG.MLOCKED)

    def SetPageKsm(self, pfn: int) -> None:
        self._flags[pfn] |= np.uint32(_KSM)

    def ClearPageBuddy(self, pfn: int) -> None:
        self._flags[pfn] &= np.uint32(0xFFFFFFFF ^ _BUDDY)

    # --- the map count ------------------------------------------------------------

    def page_mapcount(self, pfn: int) -> int:
        """The PTEs (or the PMD) that map ``pfn``; a compound page counts at its head."""
        return int(self._mapcount.item(pfn))

    def page_mapped(self, pfn: int) -> bool:
        """Mapped anywhere: the map count of its compound head is positive."""
        return int(self._mapcount.item(self.compound_head(pfn))) > 0

    def page_exclusive(self, pfn: int) -> bool:
        """Mapped once and neither the zero page nor KSM's: a write may reuse it
        (``wp_page_reuse``) and pagemap calls it exclusive."""
        return not self._flags.item(pfn) & _ZERO_OR_KSM and self._mapcount.item(pfn) == 1

    def get_page(self, pfn: int) -> None:
        """One more mapping of the page ``pfn`` belongs to (the zero page is not counted)."""
        flags = self._flags.item(pfn)
        if flags & _ZERO:
            return
        head = pfn & _HEAD_MASK if flags & _TAIL else pfn
        self._mapcount[head] += 1

    def put_page(self, pfn: int) -> None:
        """Drop one mapping of a page; free it when none is left."""
        flags = self._flags.item(pfn)
        if flags & _ZERO:
            return
        head = pfn & _HEAD_MASK if flags & _TAIL else pfn
        self._mapcount[head] -= 1
        if self._mapcount.item(head) <= 0:
            self._free_page(head)

    # --- compound pages -------------------------------------------------------------

    def compound_head(self, pfn: int) -> int:
        """The first page of the 2M page ``pfn`` is part of, or ``pfn`` itself."""
        return pfn & _HEAD_MASK if self._flags.item(pfn) & _TAIL else pfn

    def compound_order(self, pfn: int) -> int:
        """The order of the page headed by ``pfn`` (0 unless it is a head)."""
        return HPAGE_ORDER if self.PageHead(pfn) else 0

    def prep_compound_page(self, head: int, order: int) -> None:
        nr = 1 << order
        self._flags[head] |= np.uint32(PG.HEAD)
        self._flags[head + 1 : head + nr] |= np.uint32(PG.TAIL)

    def split_huge_page(self, head: int) -> None:
        """512 order-0 anonymous pages, each mapped once (by the PTEs that
        replace the huge page's one PMD); PG_mlocked goes to every page."""
        mlocked = self._flags[head] & np.uint32(PG.MLOCKED)
        self._flags[head : head + HPAGE_NR] = np.uint32(PG.ANON) | mlocked
        self._mapcount[head : head + HPAGE_NR] = 1

    # --- the allocator's writers ------------------------------------------------------

    def prep_new_page(self, pfn: int, nr: int, flags: PG) -> None:
        """``nr`` pages from ``pfn`` leave the free lists with ``flags``."""
        set_pages(self._flags, pfn, nr, int(flags))

    def free_pages_prepare(self, pfn: int, nr: int) -> None:
        """``nr`` pages from ``pfn`` become free: PG_buddy, no mapping."""
        self._flags[pfn : pfn + nr] = PG.BUDDY
        self._mapcount[pfn : pfn + nr] = 0

    # --- bulk readers -------------------------------------------------------------------

    def keyids_of(self, first: int = 0, last: int | None = None) -> np.ndarray:
        """page_keyid of PFNs ``first..last - 1`` (all by default), read-only."""
        return _read_only(self._keyid[first:last])

    def flags_of(self, first: int = 0, last: int | None = None) -> np.ndarray:
        """page->flags of PFNs ``first..last - 1`` as ``PG`` bits, read-only."""
        return _read_only(self._flags[first:last])

    def mapcounts_of(self, first: int = 0, last: int | None = None) -> np.ndarray:
        """page_mapcount of PFNs ``first..last - 1``, read-only."""
        return _read_only(self._mapcount[first:last])

    # --- snapshots ----------------------------------------------------------------------

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"page_keyid": self._keyid, "mapcount": self._mapcount, "flags": self._flags}

    def export_state(self, used: int) -> dict[str, Any]:
        """PFNs ``0..used - 1``; every array is all zeros from ``used`` up."""
        return {name: array[:used].copy() for name, array in self._arrays().items()}

    def import_state(self, state: dict[str, Any], used: int) -> None:
        for name, array in self._arrays().items():
            array[:] = 0
            array[:used] = state[name]
