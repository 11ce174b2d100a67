"""Who maps a page (mm/rmap.c, reduced to the one question the sandbox asks).

``keyids/N/mem`` lets the owner of KeyID N write physical memory through its
key. Written anywhere, that garbles other users' pages and page tables when
the lines are written back, so a user who is neither root nor the daemon's
user may write only memory that is its own (docs/spec.md 8): anonymous data
pages mapped by its own spaces and by no one else's. Not the zero page, a
page-table page, a free or reserved page, nor a page another user's space
maps too (a KSM page merged across users).

The kernel keeps no reverse map (Linux's ``page->mapping`` and the anon_vma
chains). ``first_foreign_page`` rebuilds the part it needs: it walks the
writer's own spaces, counts the PTEs that map each page (a huge leaf counts at
its head, as ``page_mapcount()`` of a compound page and ``mm/check`` do), and
asks that count to equal the page's map count, so that no one else maps it.
The walk is one numpy pass per PTE table (``PageTables.leaf_arrays``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from mktme_sandbox.kernel.memory import PTE_MAPPED
from mktme_sandbox.kernel.page import PG
from mktme_sandbox.kernel.pgtable_types import HPAGE_NR

if TYPE_CHECKING:
    from mktme_sandbox.kernel.kernel import Kernel

__all__ = ["first_foreign_page"]


def first_foreign_page(k: Kernel, uid: int, first: int, last: int, keyid: int) -> int | None:
    """The first PFN of ``first..last - 1`` that is not memory of ``uid`` alone
    under ``keyid``, or None.

    A page must also have ``keyid`` in page_ext: a line stored
    through another KeyID would stay dirty in the cache under that tag, which no
    flush of the page's own KeyID removes, and be written back over the page's
    next owner after the page changes hands.
    """
    if first >= last:
        return None
    pages = k.pages
    pfns = np.arange(first, last)
    flags = pages.flags_of(first, last)
    heads = np.where((flags & PG.TAIL) != 0, pfns & ~(HPAGE_NR - 1), pfns)
    lo = int(heads.min())
    mine = _ptes_per_page(k, uid, lo, last)[heads - lo]
    head_flags = pages.flags_of()[heads]
    mapcount = pages.mapcounts_of()[heads]
    owned = (
        ((head_flags & PG.ANON) != 0)
        & ((head_flags & (PG.ZERO | PG.PGTABLE | PG.BUDDY | PG.RESERVED)) == 0)
        & (mapcount > 0)
        & (mine == mapcount)
        & (pages.keyids_of(first, last) == keyid)
    )
    bad = np.flatnonzero(~owned)
    return int(first + bad[0]) if len(bad) else None


def _ptes_per_page(k: Kernel, uid: int, lo: int, hi: int) -> np.ndarray:
    """For each PFN in ``lo..hi - 1``: the leaves of ``uid``'s spaces that map it."""
    counts = np.zeros(hi - lo, dtype=np.int64)
    for mm in k.spaces.values():
        if mm.owner != uid:
            continue
        leaves = k.pt.leaf_arrays(mm.pgd)
        pfn = k.pte_layout.pte_pfns(leaves.pte, leaves.size)
        mapping = (leaves.pte & np.uint64(PTE_MAPPED)) != 0  # a swap entry maps no page
        inside = pfn[mapping & (pfn >= lo) & (pfn < hi)]
        counts += np.bincount(inside - lo, minlength=hi - lo)
    return counts
