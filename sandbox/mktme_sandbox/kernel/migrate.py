"""Page migration, NUMA policy and compaction (mm/migrate.c, mm/mempolicy.c, mm/compaction.c).

The series' rule, in "mm/page_alloc: Handle allocation for encrypted memory"
(patch 05, which changes these three files): "An encrypted page has to be
migrated to the same KeyID as the source page." The target page (a
``new_page_nodemask()`` for ``move_pages``/``mbind``, a free page taken by
compaction's free scanner) is allocated for ``page_keyid()`` of the source,
so ``prep_encrypted_page()`` prepares (flushes) it as any allocation; the
data is copied through each page's own KeyID (``migrate_page_copy`` via the
direct mappings), the PTE is rewritten to the new frame with every other
bit, the KeyID included, kept (``remove_migration_pte``), and the TLB entry
flushed. Switch ``migrate_keyid`` off and the target comes from KeyID 0 as
before the series: the copy writes the plaintext through KeyID 0, the PTE
still names KeyID N, and the process reads garbage (``mm/check``: "PTE KeyID
differs from its page's page_ext KeyID").

What moves: a present 4 KiB anonymous page mapped once (not the zero page,
not KSM, not pinned by an access in progress); ``move_pages`` splits huge
pages of its range first. ``migrate ADDR LEN NODE`` is ``move_pages()`` with
``MPOL_MF_MOVE`` for every page of the range; ``mbind ADDR LEN NODES`` sets
``MPOL_BIND`` on the range (VMAs split, and merged again under patch 01's
rule, KeyIDs compared, in ``mbind_range``), which later faults of the range
follow; ``compact_memory`` runs ``compact_node()`` on every node.

Compaction (``compact_zone``): the migrate scanner goes up from the node's
first page, the free scanner down from its last used page; each movable page
the first finds moves to a free page the second finds, until they meet.
``compact_success`` counts the nodes that end with more wholly free 2 MiB
blocks than they began with.

Left out: migration entries (the machine lock makes migration atomic),
``MPOL_MF_MOVE_ALL``, shared pages, THP migration, preferred and interleave
policies, kcompactd and compaction deferral.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from mktme_sandbox.config import PAGE_SIZE
from mktme_sandbox.errors import fail
from mktme_sandbox.kernel.memory import (
    PTE_MAPPED,
    copy_page,
    flush_tlb_range,
    movable_page,
    pte_page,
    split_huge_pages_in,
)
from mktme_sandbox.kernel.page import PG
from mktme_sandbox.kernel.pgtable import LeafEntry
from mktme_sandbox.kernel.pgtable_types import HPAGE_NR
from mktme_sandbox.kernel.vma import MmStruct

if TYPE_CHECKING:
    from mktme_sandbox.kernel.kernel import Kernel

__all__ = ["compact_memory", "do_mbind", "do_move_pages", "parse_nodelist"]


def _target_keyid(k: Kernel, src: int) -> int:
    """Patch 05: the source page's KeyID; before it, KeyID 0."""
    return k.pages.page_keyid(src) if k.mitigations["migrate_keyid"] else 0


def migrate_page(k: Kernel, mm: MmStruct, entry: LeafEntry, src: int, dst: int) -> None:
    """Move the page ``src`` that the 4 KiB ``entry`` maps to the allocated
    page ``dst``; the new PTE is stored where the walk found the old one
    (``remove_migration_pte()``: ``set_pte_at(vma->vm_mm, pvmw.address,
    pvmw.pte, pte)``), one 8-byte store."""
    copy_page(k, src=src, dst=dst)
    k.alloc.migrate_charge(src, dst)
    new = (entry.pte & ~k.pte_layout.pfn_mask) | (dst << 12)  # KeyID and flags kept
    k.pages.get_page(dst)
    k.pt.set_pte_at(entry.ptep, new)
    flush_tlb_range(k, mm, entry.va, entry.va + PAGE_SIZE)
    k.pages.put_page(src)
    k.vmstat.inc("pgmigrate_success")


# --- move_pages / mbind --------------------------------------------------------------


def parse_nodelist(k: Kernel, op: str, text: str) -> tuple[int, ...]:
    """``0``, ``0,1``, ``0-3`` (a nodelist as numactl and sysfs write it): EINVAL
    for a range whose end is below its start (``bitmap_parselist()``: "if (a >
    b) return -EINVAL"), ENODEV for a node this machine does not have."""
    nodes: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        if not _decimal(first) or (last and not _decimal(last)):
            fail(errno.EINVAL, f"{op}: nodes {text!r}: write N, N,M or N-M")
        low, high = int(first), int(last or first)
        if high < low:
            fail(errno.EINVAL, f"{op}: nodes {text!r}: range {part} ends below its start")
        if high >= k.alloc.numa_nodes:  # checked before the range is made: 0-99999999999
            fail(
                errno.ENODEV,
                f"{op}: node {max(low, k.alloc.numa_nodes)} does not exist "
                f"(this machine has {k.alloc.numa_nodes})",
            )
        nodes.extend(range(low, high + 1))
    return tuple(dict.fromkeys(nodes))


def _decimal(text: str) -> bool:
    """ASCII digits only (``str.isdigit`` also takes "²", which ``int`` refuses)."""
    return text.isascii() and text.isdigit()


def do_move_pages(k: Kernel, mm: MmStruct, start: int, end: int, nid: int) -> int:
    """``move_pages(MPOL_MF_MOVE)`` of every page of a mapped range to node
    ``nid`` (checked by ``parse_nodelist()``): ENOMEM, moving nothing, when
    the node lacks the free pages."""
    split_huge_pages_in(k, mm, start, end)
    moving, stuck = [], 0
    for entry in k.pt.leaf_entries(mm.pgd, start, end):
        pte = entry.pte
        pfn = movable_page(k, pte) if entry.size == PAGE_SIZE else None
        if pfn is None:
            page = pte_page(k, pte) if pte & PTE_MAPPED else None
            stuck += page is not None and not k.pages.is_zero_pfn(page)  # shared, KSM
        elif k.alloc.pfn_to_nid(pfn) != nid:
            moving.append((entry, pfn))
    lo, hi = k.alloc.node_span(nid)
    free = int(np.count_nonzero(k.alloc.free_mask(lo, hi)))
    if len(moving) > free:
        fail(errno.ENOMEM, f"migrate: {len(moving)} pages to move, node {nid} has {free} free")
    k.vmstat.inc("pgmigrate_fail", stuck)
    for entry, src in moving:  # uncharged until migrate_charge() moves the source's over
        dst = k.alloc.alloc_page(_target_keyid(k, src), PG.ANON, zero=False, nodes=(nid,))
        migrate_page(k, mm, entry, src, dst)
    return len(moving)


def do_mbind(k: Kernel, mm: MmStruct, start: int, end: int, nodes: tuple[int, ...]) -> None:
    """``mbind(MPOL_BIND)`` on a mapped range: the VMAs inside carry the node
    mask, which later faults allocate from; ``mbind_range`` merges neighbours
    with vma_merge(), which compares KeyIDs (patch 01)."""
    from mktme_sandbox.kernel.mmap import vma_merge

    mask = sum(1 << nid for nid in nodes)
    for vma in mm.isolate(start, end):
        mm.replace(vma, vma.with_(vm_policy=mask))
    vma_merge(k, mm, start, end)


# --- compaction --------------------------------------------------------------------


def _movable_pages(k: Kernel) -> dict[int, tuple[MmStruct, LeafEntry]]:
    """Every movable page's single mapping: PFN -> (space, its entry)."""
    found: dict[int, tuple[MmStruct, LeafEntry]] = {}
    for mm in k.spaces.values():
        for entry in k.pt.leaf_entries(mm.pgd):
            pfn = movable_page(k, entry.pte) if entry.size == PAGE_SIZE else None
            if pfn is not None:
                found[pfn] = (mm, entry)
    return found


def _free_scanner(k: Kernel, lo: int, hi: int) -> Iterator[int]:
    """Free pages from ``hi`` down (``isolate_freepages``), but none of a wholly
    free 2 MiB block: "If the page is a large free page, then disallow
    migration" (``suitable_migration_target``)."""
    free = k.alloc.free_mask(lo, hi)
    blocks = len(free) // HPAGE_NR
    whole = free[: blocks * HPAGE_NR].reshape(blocks, HPAGE_NR).all(axis=1)
    free[: blocks * HPAGE_NR] &= ~np.repeat(whole, HPAGE_NR)
    k.vmstat.inc("compact_free_scanned", hi - lo)
    yield from (int(pfn) + lo for pfn in np.flatnonzero(free)[::-1])


def compact_node(k: Kernel, nid: int) -> int:
    """``compact_zone()`` of one node; returns the pages moved."""
    lo, hi = k.alloc.node_span(nid)
    blocks_before = free_blocks(k, lo, hi)
    movable = _movable_pages(k)
    frees = _free_scanner(k, lo, hi)
    moved = 0
    dst = next(frees, None)
    for src in range(lo, min(hi, k.alloc.never_used)):
        if dst is None or src >= dst:
            break  # the scanners met
        k.vmstat.inc("compact_migrate_scanned")
        if src not in movable:
            continue
        mm, entry = movable[src]
        k.alloc.alloc_page_at(dst, _target_keyid(k, src))
        migrate_page(k, mm, entry, src, dst)
        moved += 1
        dst = next(frees, None)
    if free_blocks(k, lo, hi) > blocks_before:
        k.vmstat.inc("compact_success")
    return moved


def free_blocks(k: Kernel, lo: int, hi: int) -> int:
    """The wholly free 2 MiB blocks of ``[lo, hi)``."""
    blocks = (hi - lo) // HPAGE_NR
    free = k.alloc.free_mask(lo, lo + blocks * HPAGE_NR).reshape(blocks, HPAGE_NR)
    return int(free.all(axis=1).sum())


def compact_memory(k: Kernel) -> int:
    """``/proc/sys/vm/compact_memory``: every node compacted; the pages moved."""
    k.vmstat.inc("compact_stall")
    return sum(compact_node(k, nid) for nid in range(k.alloc.numa_nodes))
