"""The /proc formats: maps, smaps, pagemap, kpageflags, and page_keyid.

Formats follow fs/proc/task_mmu.c and Documentation/admin-guide/mm/pagemap.rst
(checked against a live /proc/self/smaps): ``maps`` lines end in ``0 `` for
anonymous memory, smaps values are right-aligned to column 24 with `` kB``,
``VmFlags`` ends in a space. Additions of docs/spec.md: a ``KeyID:`` line in each smaps
entry (before ``VmFlags``), and ``mm/page_keyid`` (one u64 KeyID per PFN).

pagemap: bits 0-54 PFN (KeyID bits masked out, docs/spec.md section 4), 56 exclusively
mapped, 63 present; a swapped page has bit 62 and, in bits 0-4, the swap type
and, in bits 5-54, the offset. ``swaps`` is /proc/swaps. PFNs are shown to every reader: this is a sandbox for
looking at physical memory (Linux hides them without CAP_SYS_ADMIN).
Zero-page and non-present entries follow Linux: the zero page is present with
its PFN but neither exclusive nor counted in Rss.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from mktme_sandbox.config import PAGE_SIZE
from mktme_sandbox.kernel.memory import pte_page
from mktme_sandbox.kernel.page import PG
from mktme_sandbox.kernel.pgtable import LeafArrays, MmWalkOps, PteTable
from mktme_sandbox.kernel.pgtable_types import HPAGE_NR, HPAGE_SIZE, USER_END, Level, PteFlags
from mktme_sandbox.kernel.swapfile import (
    PTE_MAPPED,
    SWP_TYPE_BITS,
    swp_offsets,
)
from mktme_sandbox.kernel.vma import VM, MmStruct, Vma, vma_keyid, vma_policy_nodes

if TYPE_CHECKING:
    from mktme_sandbox.kernel.kernel import Kernel

__all__ = [
    "KPF",
    "PAGEMAP_ENTRY",
    "PM_MMAP_EXCLUSIVE",
    "PM_PRESENT",
    "PM_SWAP",
    "kpageflags",
    "maps",
    "numa_maps",
    "page_keyid",
    "pagemap",
    "smaps",
    "swaps",
    "vma_name",
]

PAGEMAP_ENTRY = 8
PSS_SHIFT = 12  # fs/proc/task_mmu.c: Pss is summed in bytes << PSS_SHIFT
PM_PFN_MASK = (1 << 55) - 1
PM_MMAP_EXCLUSIVE = 1 << 56
PM_SWAP = 1 << 62
MAX_SWAPFILES_SHIFT = 5
PM_PRESENT = 1 << 63


class KPF(IntEnum):
    """/proc/kpageflags bit numbers (include/uapi/linux/kernel-page-flags.h)."""

    REFERENCED = 2
    UPTODATE = 3
    DIRTY = 4
    LRU = 5
    BUDDY = 10
    MMAP = 11
    ANON = 12
    SWAPBACKED = 14
    COMPOUND_HEAD = 15
    COMPOUND_TAIL = 16
    HUGE = 17
    NOPAGE = 20
    KSM = 21
    THP = 22
    ZERO_PAGE = 24
    PGTABLE = 26
    RESERVED = 32  # a "kernel hacking" flag, exported as is (PG_reserved)
    MLOCKED = 33


_VMFLAG_MNEMONICS = (  # mm/proc task_mmu.c order; mr mw me always for anon private
    (VM.READ, "rd"), (VM.WRITE, "wr"), (VM.EXEC, "ex"),
    (None, "mr"), (None, "mw"), (None, "me"), (VM.LOCKED, "lo"),
    (VM.WRITE, "ac"),
    (VM.HUGEPAGE, "hg"), (VM.NOHUGEPAGE, "nh"), (VM.MERGEABLE, "mg"),
    (VM.UFFD_MISSING, "um"),
)  # fmt: skip


# --- maps / smaps ---------------------------------------------------------------


def vma_name(vma: Vma) -> str:
    """``START-END`` as a maps line begins: lowercase hex, at least 8 digits."""
    return f"{vma.start:08x}-{vma.end:08x}"


def _maps_line(vma: Vma) -> str:
    return f"{vma_name(vma)} {vma.perms()} 00000000 00:00 0 \n"


def maps(mm: MmStruct) -> str:
    return "".join(_maps_line(vma) for vma in mm.vmas())


def smaps(k: Kernel, mm: MmStruct) -> str:
    return "".join(_maps_line(vma) + _smaps_fields(k, mm, vma) for vma in mm.vmas())


def smaps_rollup(k: Kernel, mm: MmStruct) -> str:
    """``/proc/PID/smaps_rollup``: one header from the first VMA's start to the
    last one's end (``00000000-00000000`` without VMAs), padded to column 73
    and ``[rollup]``, then the smaps fields summed over every VMA (show_smaps_rollup)."""
    vmas = mm.vmas()
    start, end = (vmas[0].start, vmas[-1].end) if vmas else (0, 0)
    header = f"{start:08x}-{end:08x} ---p 00000000 00:00 0"
    mss = MemSizeStats()
    for vma in vmas:
        _account_vma(k, mm, vma, mss)
    return f"{header:<72} [rollup]\n" + _show_smap(mss, rollup=True)


def _smaps_fields(k: Kernel, mm: MmStruct, vma: Vma) -> str:
    mss = MemSizeStats()
    _account_vma(k, mm, vma, mss)
    lines = [_kb("Size", len(vma)), _kb("KernelPageSize", PAGE_SIZE), _kb("MMUPageSize", PAGE_SIZE)]
    thp = int(bool(vma.vm_flags & VM.HUGEPAGE) and len(vma) >= HPAGE_SIZE)
    flags = " ".join(m for bit, m in _VMFLAG_MNEMONICS if bit is None or vma.vm_flags & bit)
    return (
        "".join(lines)
        + _show_smap(mss, rollup=False)
        + (
            f"{'THPeligible:':<16}{thp:>8}\n"
            f"{'ProtectionKey:':<16}{0:>8}\n"
            f"{'KeyID:':<16}{vma_keyid(vma, k.pte_layout):>8}\n"
            f"VmFlags: {flags} \n"
        )
    )


def _kb(name: str, nbytes: int) -> str:
    """``Name:`` padded to 16, the value in kB right-aligned in 8 (SEQ_PUT_DEC)."""
    return f"{name + ':':<16}{nbytes >> 10:>8} kB\n"


@dataclass
class MemSizeStats:
    """struct mem_size_stats of fs/proc/task_mmu.c: bytes, and ``pss`` in
    bytes << PSS_SHIFT so that a page shared by three adds exactly a third."""

    resident: int = 0
    pss: int = 0
    pss_dirty: int = 0
    shared_clean: int = 0
    shared_dirty: int = 0
    private_clean: int = 0
    private_dirty: int = 0
    anonymous: int = 0
    ksm: int = 0
    anonymous_thp: int = 0
    locked: int = 0  # << PSS_SHIFT, as pss
    swap: int = 0
    swap_pss: int = 0  # << PSS_SHIFT


def _show_smap(mss: MemSizeStats, rollup: bool) -> str:
    """__show_smap(): the fields from ``Rss`` to ``Locked``; ``Pss_Anon``,
    ``Pss_File``, ``Pss_Shmem`` only in smaps_rollup."""
    pss, pss_dirty = mss.pss >> PSS_SHIFT, mss.pss_dirty >> PSS_SHIFT
    fields = [("Rss", mss.resident), ("Pss", pss), ("Pss_Dirty", pss_dirty)]
    if rollup:
        fields += [("Pss_Anon", pss), ("Pss_File", 0), ("Pss_Shmem", 0)]
    fields += [
        ("Shared_Clean", mss.shared_clean), ("Shared_Dirty", mss.shared_dirty),
        ("Private_Clean", mss.private_clean), ("Private_Dirty", mss.private_dirty),
        ("Referenced", mss.resident), ("Anonymous", mss.anonymous), ("KSM", mss.ksm),
        ("LazyFree", 0), ("AnonHugePages", mss.anonymous_thp), ("ShmemPmdMapped", 0),
        ("FilePmdMapped", 0), ("Shared_Hugetlb", 0), ("Private_Hugetlb", 0),
        ("Swap", mss.swap), ("SwapPss", mss.swap_pss >> PSS_SHIFT),
        ("Locked", mss.locked >> PSS_SHIFT),
    ]  # fmt: skip
    return "".join(_kb(name, value) for name, value in fields)


def _account_vma(k: Kernel, mm: MmStruct, vma: Vma, mss: MemSizeStats) -> None:
    """smaps_pte_entry() / smaps_account() over the VMA's present pages, as
    arrays: every leaf of the VMA at once, no Python work per page."""
    leaves = k.pt.leaf_arrays(mm.pgd, vma.start, vma.end)
    _account_swap(k, leaves.pte[_swapped(leaves)], mss)
    size, pfn, pte, flags = _normal_pages(k, leaves)
    ksm = (flags & PG.KSM) != 0
    count = np.maximum(k.pages.mapcounts_of()[pfn].astype(np.int64), 1)
    # a KSM page is PageDirty (ksm.c: set_page_dirty on merge), whatever its PTE says
    dirty = ((pte & np.uint64(PteFlags.DIRTY)) != 0) | ksm
    pss = (size << PSS_SHIFT) // count
    shared = count > 1
    mss.resident += int(size.sum())
    mss.pss += int(pss.sum())
    mss.pss_dirty += int(pss[dirty].sum())
    mss.shared_clean += int(size[shared & ~dirty].sum())
    mss.shared_dirty += int(size[shared & dirty].sum())
    mss.private_clean += int(size[~shared & ~dirty].sum())
    mss.private_dirty += int(size[~shared & dirty].sum())
    mss.anonymous += int(size[(flags & PG.ANON) != 0].sum())
    mss.ksm += int(size[ksm].sum())
    mss.locked += int(pss.sum()) if vma.vm_flags & VM.LOCKED else 0
    mss.anonymous_thp += int(size[size != PAGE_SIZE].sum())


def _swapped(leaves: LeafArrays) -> np.ndarray:
    """Which leaves are swap entries (leaves are never pte_none: is_swap_pte())."""
    swapped: np.ndarray = (leaves.pte & np.uint64(PTE_MAPPED)) == 0
    return swapped


class NormalPages(NamedTuple):
    """The pages present leaves map that vm_normal_page() returns, as arrays."""

    size: np.ndarray
    """Bytes each leaf maps (int64)."""
    pfn: np.ndarray
    """Its first frame (int64)."""
    pte: np.ndarray
    """Its value (uint64)."""
    flags: np.ndarray
    """The page flags of that frame."""


def _normal_pages(k: Kernel, leaves: LeafArrays) -> NormalPages:
    """The mapped leaves whose frames are pages of this machine (pte_page()),
    the zero page left out (vm_normal_page() is NULL for it)."""
    mapped = ~_swapped(leaves)
    size, pte = leaves.size[mapped].astype(np.int64), leaves.pte[mapped]
    pfn = k.pte_layout.pte_pfns(pte, leaves.size[mapped])
    known = pfn + (size >> 12) <= k.pages.nr_pages
    size, pfn, pte = size[known], pfn[known], pte[known]
    flags = k.pages.flags_of()[pfn]
    normal = (flags & PG.ZERO) == 0
    return NormalPages(size[normal], pfn[normal], pte[normal], flags[normal])


def _account_swap(k: Kernel, ptes: np.ndarray, mss: MemSizeStats) -> None:
    """smaps_pte_entry() on swap entries: each one's share of its slot."""
    users = np.maximum(k.swap.swap_counts(swp_offsets(ptes)), 1)
    mss.swap += PAGE_SIZE * len(ptes)
    mss.swap_pss += int(((PAGE_SIZE << PSS_SHIFT) // users).sum())


# --- status ---------------------------------------------------------------------


def status(k: Kernel, mm: MmStruct) -> str:
    """``/proc/PID/status``: ``Name:`` and the lines of task_mem() (fs/proc/task_mmu.c),
    each ``Name:\\t`` and the value in kB right-aligned in 8."""
    vm = sum(len(v) for v in mm.vmas())
    locked = sum(len(v) for v in mm.vmas() if v.vm_flags & VM.LOCKED)  # mm->locked_vm
    rss, swapped = _rss_and_swap(k, mm)
    data = sum(len(v) for v in mm.vmas() if v.vm_flags & VM.WRITE)  # is_data_mapping
    lib = sum(
        len(v) for v in mm.vmas() if v.vm_flags & (VM.EXEC | VM.WRITE) == VM.EXEC
    )  # is_exec_mapping
    ptes = (sum(1 for _ in k.pt.iter_tables(mm.pgd)) - 1) * PAGE_SIZE  # the PGD is not counted
    lines = (
        ("VmPeak", vm), ("VmSize", vm), ("VmLck", locked), ("VmPin", 0), ("VmHWM", rss),
        ("VmRSS", rss), ("RssAnon", rss), ("RssFile", 0), ("RssShmem", 0), ("VmData", data),
        ("VmStk", 0), ("VmExe", 0), ("VmLib", lib), ("VmPTE", ptes), ("VmSwap", swapped),
        ("HugetlbPages", 0),
    )  # fmt: skip
    return f"Name:\t{mm.name[:15]}\n" + "".join(f"{n}:\t{b >> 10:>8} kB\n" for n, b in lines)


def _rss_and_swap(k: Kernel, mm: MmStruct) -> tuple[int, int]:
    """Bytes of MM_ANONPAGES (the zero page is not one) and of MM_SWAPENTS,
    over every leaf of the space at once."""
    leaves = k.pt.leaf_arrays(mm.pgd)
    rss = int(_normal_pages(k, leaves).size.sum())
    return rss, PAGE_SIZE * int(np.count_nonzero(_swapped(leaves)))


# --- pagemap --------------------------------------------------------------------


def pagemap(k: Kernel, mm: MmStruct, offset: int, length: int) -> bytes:
    """The bytes of /proc/PID/pagemap at ``offset`` (8 bytes per virtual page);
    nothing past the last user page (end of file, as Linux's pagemap_read)."""
    first = offset // PAGEMAP_ENTRY
    last = min(-(-(offset + length) // PAGEMAP_ENTRY), USER_END >> 12)
    if first >= last:
        return b""
    entries = np.zeros(max(last - first, 0), dtype="<u8")
    k.pt.walk_page_range(mm.pgd, first << 12, last << 12, _pagemap_ops(k, entries, first))
    skip = offset - first * PAGEMAP_ENTRY
    return entries.tobytes()[skip : skip + length]


def _pagemap_ops(k: Kernel, entries: np.ndarray, first: int) -> MmWalkOps:
    """pagemap_pmd_range(): a PTE table at once, a huge leaf page by page.

    Every entry that maps a page is reported present with its frame
    (PROT_NONE included); exclusive when it maps a page of this machine, not
    the zero page, mapped once. A swap entry is reported as Linux's
    pte_to_pagemap_entry() does: PM_SWAP, the type in bits 0-4, the offset above.
    """
    start, end = first << 12, (first + len(entries)) << 12
    pfn_mask, nr_pages = np.uint64(k.pte_layout.pfn_mask), k.pages.nr_pages

    def pte_table(table: PteTable) -> None:
        pfn = ((table.pte & pfn_mask) >> np.uint64(12)).astype(np.int64)
        known = pfn < nr_pages
        page = np.where(known, pfn, 0)
        exclusive = (
            known
            & ((k.pages.flags_of()[page] & PG.ZERO) == 0)
            & (k.pages.mapcounts_of()[page] == 1)
        )
        value = np.uint64(PM_PRESENT) | (pfn.astype(np.uint64) & np.uint64(PM_PFN_MASK))
        value[exclusive] |= np.uint64(PM_MMAP_EXCLUSIVE)
        swapped = (table.pte & np.uint64(PTE_MAPPED)) == 0
        if swapped.any():
            value[swapped] = _swap_pagemap_entries(table.pte[swapped])
        entries[(table.va >> np.uint64(12)).astype(np.int64) - first] = value

    def huge_entry(va: int, level: Level, pte: int, _: int) -> None:
        size = level.size
        pfn = k.pte_layout.pte_pfn(pte, size)
        page = pte_page(k, pte, size)
        exclusive = (
            page is not None and not k.pages.is_zero_pfn(page) and k.pages.page_mapcount(page) == 1
        )
        base = PM_PRESENT | (PM_MMAP_EXCLUSIVE if exclusive else 0)
        lo, hi = max(va, start), min(va + size, end)
        for addr in range(lo, hi, PAGE_SIZE):
            entries[(addr >> 12) - first] = base | ((pfn + ((addr - va) >> 12)) & PM_PFN_MASK)

    return MmWalkOps(pte_table=pte_table, huge_entry=huge_entry)


def _swap_pagemap_entries(ptes: np.ndarray) -> np.ndarray:
    """pte_to_pagemap_entry() of swap entries (uint64): PM_SWAP, the type in
    bits 0-4, the offset above."""
    u64 = np.uint64
    types = ptes >> u64(64 - SWP_TYPE_BITS)
    offsets = swp_offsets(ptes).astype(u64) << u64(MAX_SWAPFILES_SHIFT)
    entries: np.ndarray = u64(PM_SWAP) | types | offsets
    return entries


# --- kpageflags / page_keyid --------------------------------------------------------

_PG_TO_KPF = (
    (PG.BUDDY, (KPF.BUDDY,)),
    (PG.ANON, (KPF.ANON, KPF.SWAPBACKED, KPF.UPTODATE, KPF.LRU)),
    (PG.PGTABLE, (KPF.PGTABLE,)),
    (PG.ZERO, (KPF.ZERO_PAGE, KPF.UPTODATE)),
    (PG.KSM, (KPF.KSM,)),
    (PG.HEAD, (KPF.COMPOUND_HEAD, KPF.THP)),
    (PG.TAIL, (KPF.COMPOUND_TAIL, KPF.THP)),
    (PG.RESERVED, (KPF.RESERVED,)),
)


def _pfn_window(k: Kernel, offset: int, length: int) -> tuple[int, int, int]:
    first = offset // 8
    last = min(-(-(offset + length) // 8), k.pages.nr_pages)
    return first, max(last, first), offset - first * 8


def kpageflags(k: Kernel, offset: int, length: int) -> bytes:
    """/proc/kpageflags bytes at ``offset``: one u64 of KPF bits per PFN."""
    first, last, skip = _pfn_window(k, offset, length)
    flags = k.pages.flags_of(first, last)
    out = np.zeros(last - first, dtype="<u8")
    for pg, kpfs in _PG_TO_KPF:
        bits = sum(1 << int(b) for b in kpfs)
        out[(flags & pg) != 0] |= np.uint64(bits)
    out[k.alloc.free_mask(first, last)] |= np.uint64(1 << KPF.BUDDY)
    out[_mapcounts(k, first, last) > 0] |= np.uint64(1 << KPF.MMAP)  # page_mapped()
    # PageMlocked() of a tail page answers for its compound head
    pfns = np.arange(first, last)
    heads = np.where((flags & PG.TAIL) != 0, pfns & ~(HPAGE_NR - 1), pfns)
    mlocked = (k.pages.flags_of()[heads] & PG.MLOCKED) != 0
    out[mlocked] |= np.uint64(1 << KPF.MLOCKED)
    return out.tobytes()[skip : skip + length]


def _mapcounts(k: Kernel, first: int, last: int) -> np.ndarray:
    """The mapcount of each PFN as Linux sees it: a tail page of a PMD-mapped
    huge page is mapped as often as its head (the folio's entire mapcount);
    the model keeps the count on the head only."""
    flags = k.pages.flags_of(first, last)
    counts = k.pages.mapcounts_of(first, last).astype(np.int64)
    tails = np.flatnonzero(flags & PG.TAIL)
    heads = (tails + first) & ~(HPAGE_NR - 1)
    counts[tails] = k.pages.mapcounts_of()[heads]
    counts[(flags & PG.ZERO) != 0] = 0  # mappings Linux does not count
    return counts


def kpagecount(k: Kernel, offset: int, length: int) -> bytes:
    """/proc/kpagecount bytes at ``offset``: one u64 per PFN, the times the page
    is mapped (0 for free pages, page tables and the zero page, whose mappings
    Linux does not count)."""
    first, last, skip = _pfn_window(k, offset, length)
    return _mapcounts(k, first, last).astype("<u8").tobytes()[skip : skip + length]


def page_keyid(k: Kernel, offset: int, length: int) -> bytes:
    """``mm/page_keyid`` bytes: one little-endian u64 KeyID per PFN."""
    first, last, skip = _pfn_window(k, offset, length)
    out = k.pages.keyids_of(first, last).astype("<u8")
    return out.tobytes()[skip : skip + length]


# --- vmstat / meminfo -----------------------------------------------------------


def node_page_state(k: Kernel) -> dict[str, int]:
    """The gauges of /proc/vmstat, in its order (mm/vmstat.c vmstat_text), in
    pages; ``nr_anon_transparent_hugepages`` in huge pages, as vmstat_show()
    prints it. Read from the allocator, so they are always exact."""
    flags = k.pages.flags_of()
    return {
        "nr_free_pages": int(k.alloc.free_mask().sum()),
        "nr_anon_pages": int(((flags & PG.ANON) != 0).sum()),
        "nr_anon_transparent_hugepages": int(((flags & (PG.HEAD | PG.ZERO)) == PG.HEAD).sum()),
        "nr_page_table_pages": int(((flags & (PG.PGTABLE | PG.RESERVED)) == PG.PGTABLE).sum()),
    }


def vmstat(k: Kernel) -> dict[str, int]:
    """/proc/vmstat as numbers: the gauges, then the event counters."""
    return node_page_state(k) | k.vmstat.snapshot()


def vmstat_text(k: Kernel) -> str:
    return "".join(f"{name} {value}\n" for name, value in vmstat(k).items())


VMALLOC_TOTAL_KB = 34359738367  # x86-64 4-level: (VMALLOC_END - VMALLOC_START) >> 10
OVERCOMMIT_RATIO = 50  # vm.overcommit_ratio's default


def meminfo(k: Kernel) -> str:
    """/proc/meminfo (fs/proc/meminfo.c): ``Name:`` padded to 16 and the value in
    kB right-aligned in 8 (show_val_kb), the HugePages_* counts in 5 after
    their padding (hugetlb_report_meminfo), the fields of an x86-64 kernel."""
    return "".join(_meminfo_line(name, value) for name, value in _meminfo_values(k).items())


def _meminfo_line(name: str, value: int) -> str:
    if name.startswith("HugePages_"):
        return f"{name + ':':<19}{value:>5}\n"
    return f"{name + ':':<16}{value:>8} kB\n"


def _meminfo_values(k: Kernel) -> dict[str, int]:
    """Values in kB (HugePages_* in pages). The model has one memory zone, no
    page cache, slab or hugetlbfs: those fields are 0. Mlocked pages are on the
    unevictable LRU (``Unevictable`` = ``Mlocked``). New anonymous
    pages go to the inactive anon LRU (lru_cache_add_inactive_or_unevictable)
    and nothing ages them, so ``Active(anon)`` stays 0."""
    state, kb = node_page_state(k), PAGE_SIZE >> 10
    reserved = int(((k.pages.flags_of() & PG.RESERVED) != 0).sum())
    total = (k.alloc.nr_pages - reserved) * kb  # totalram_pages: reserved pages are not RAM
    free, anon = state["nr_free_pages"] * kb, state["nr_anon_pages"] * kb
    committed = sum(len(v) for mm in k.spaces.values() for v in mm.vmas() if v.vm_flags & VM.WRITE)
    mlocked = int(((k.pages.flags_of() & PG.MLOCKED) != 0).sum()) * kb
    zeros = dict.fromkeys
    direct_map = k.directmap.direct_pages_count()  # KeyID 0's copy, bytes by leaf size
    return {
        "MemTotal": total, "MemFree": free, "MemAvailable": free,
        **zeros(("Buffers", "Cached", "SwapCached", "Active"), 0), "Inactive": anon,
        "Active(anon)": 0, "Inactive(anon)": anon,
        **zeros(("Active(file)", "Inactive(file)"), 0), "Unevictable": mlocked,
        "Mlocked": mlocked, "SwapTotal": k.swap.total * kb, "SwapFree": k.swap.free() * kb,
        **zeros(("Zswap", "Zswapped", "Dirty", "Writeback"), 0),
        "AnonPages": anon,
        **zeros(("Mapped", "Shmem", "KReclaimable", "Slab", "SReclaimable", "SUnreclaim",
                 "KernelStack"), 0),
        "PageTables": state["nr_page_table_pages"] * kb,
        **zeros(("SecPageTables", "NFS_Unstable", "Bounce", "WritebackTmp"), 0),
        "CommitLimit": total * OVERCOMMIT_RATIO // 100 + k.swap.total * kb, "Committed_AS": committed >> 10,
        "VmallocTotal": VMALLOC_TOTAL_KB, **zeros(("VmallocUsed", "VmallocChunk", "Percpu"), 0),
        "AnonHugePages": state["nr_anon_transparent_hugepages"] * (HPAGE_NR * kb),
        **zeros(("ShmemHugePages", "ShmemPmdMapped", "FileHugePages", "FilePmdMapped",
                 "HugePages_Total", "HugePages_Free", "HugePages_Rsvd", "HugePages_Surp"), 0),
        "Hugepagesize": HPAGE_NR * kb, "Hugetlb": 0,
        **{f"DirectMap{name}": n >> 10 for name, n in direct_map.items()},
    }  # fmt: skip


# --- swaps ---------------------------------------------------------------------------


def swaps(k: Kernel) -> str:
    """/proc/swaps (``swap_show``): the header, then the device named by its path
    in the mount, sizes in KiB without the header page, priority -2 (the first
    device ``swapon`` enables without one)."""
    lines = ["Filename\t\t\t\tType\t\tSize\tUsed\tPriority\n"]
    if k.swap.total:
        size, used = k.swap.total * 4, k.swap.in_use() * 4
        lines.append(f"{'/swap':<40}partition\t{size}\t{used}\t-2\n")
    return "".join(lines)


# --- numa_maps ------------------------------------------------------------------------


def nodelist(nodes: tuple[int, ...] | list[int]) -> str:
    """``%*pbl``: ``0-2,5``."""
    runs: list[list[int]] = []
    for nid in sorted(nodes):
        if runs and runs[-1][1] == nid - 1:
            runs[-1][1] = nid
        else:
            runs.append([nid, nid])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def numa_maps(k: Kernel, mm: MmStruct) -> str:
    """/proc/PID/numa_maps (fs/proc/task_mmu.c show_numa_map) for anonymous VMAs."""
    return "".join(_numa_map(k, mm, vma) for vma in mm.vmas())


def _numa_map(k: Kernel, mm: MmStruct, vma: Vma) -> str:
    nodes = vma_policy_nodes(vma)
    policy = "default" if nodes is None else f"bind:{nodelist(nodes)}"
    pages = anon = dirty = mapmax = 0
    per_node = [0] * k.alloc.numa_nodes
    for _, size, pte in k.pt.iter_present(mm.pgd, vma.start, vma.end):
        pfn = pte_page(k, pte, size) if pte & PTE_MAPPED else None
        if pfn is None or k.pages.is_zero_pfn(pfn):
            continue  # vm_normal_page() is NULL: not gathered
        nr = size >> 12
        pages += nr
        anon += nr if k.pages.PageAnon(pfn) else 0
        dirty += nr if pte & PteFlags.DIRTY else 0
        mapmax = max(mapmax, k.pages.page_mapcount(pfn))
        per_node[k.alloc.pfn_to_nid(pfn)] += nr
    line = f"{vma.start:08x} {policy}"
    if pages:
        line += f" anon={anon}" if anon else ""
        line += f" dirty={dirty}" if dirty else ""
        line += f" mapped={pages}" if pages not in (anon, dirty) else ""
        line += f" mapmax={mapmax}" if mapmax > 1 else ""
        line += "".join(f" N{nid}={n}" for nid, n in enumerate(per_node) if n)
        line += " kernelpagesize_kB=4"
    return line + "\n"
