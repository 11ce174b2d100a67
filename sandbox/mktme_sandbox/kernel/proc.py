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

from collections.abc import Iterator
from enum import IntEnum
from typing import TYPE_CHECKING

import numpy as np

from mktme_sandbox.config import PAGE_SIZE
from mktme_sandbox.kernel.memory import PTE_MAPPED, pte_page
from mktme_sandbox.kernel.page import PG
from mktme_sandbox.kernel.pgtable import USER_END, PteFlags
from mktme_sandbox.kernel.swapfile import is_swap_pte, swp_offset, swp_type
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


_VMFLAG_MNEMONICS = (  # mm/proc task_mmu.c order; mr mw me always for anon private
    (VM.READ, "rd"), (VM.WRITE, "wr"), (VM.EXEC, "ex"),
    (None, "mr"), (None, "mw"), (None, "me"),
    (VM.WRITE, "ac"),
    (VM.HUGEPAGE, "hg"), (VM.NOHUGEPAGE, "nh"), (VM.MERGEABLE, "mg"),
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
    return "".join(_smaps_entry(k, mm, vma) for vma in mm.vmas())


def _smaps_entry(k: Kernel, mm: MmStruct, vma: Vma) -> str:
    usage = _usage(k, mm, vma)
    lines = [_maps_line(vma)]
    for name, kb in (
        ("Size", len(vma) >> 10), ("KernelPageSize", 4), ("MMUPageSize", 4),
        ("Rss", usage["rss"]), ("Pss", usage["pss"]), ("Pss_Dirty", usage["pss_dirty"]),
        ("Shared_Clean", usage["shared_clean"]), ("Shared_Dirty", usage["shared_dirty"]),
        ("Private_Clean", usage["private_clean"]), ("Private_Dirty", usage["private_dirty"]),
        ("Referenced", usage["rss"]), ("Anonymous", usage["rss"]), ("KSM", usage["ksm"]),
        ("LazyFree", 0), ("AnonHugePages", usage["anon_huge"]), ("ShmemPmdMapped", 0),
        ("FilePmdMapped", 0), ("Shared_Hugetlb", 0), ("Private_Hugetlb", 0),
        ("Swap", usage["swap"]), ("SwapPss", usage["swap_pss"]), ("Locked", 0),
    ):  # fmt: skip
        lines.append(f"{name + ':':<16}{kb:>8} kB\n")
    thp = int(bool(vma.vm_flags & VM.HUGEPAGE) and len(vma) >= 2 << 20)
    lines.append(f"{'THPeligible:':<16}{thp:>8}\n")
    lines.append(f"{'ProtectionKey:':<16}{0:>8}\n")
    lines.append(f"{'KeyID:':<16}{vma_keyid(vma, k.pte_layout):>8}\n")
    flags = " ".join(m for bit, m in _VMFLAG_MNEMONICS if bit is None or vma.vm_flags & bit)
    lines.append(f"VmFlags: {flags} \n")
    return "".join(lines)


def _usage(k: Kernel, mm: MmStruct, vma: Vma) -> dict[str, int]:
    """Rss and friends in kB, as smaps_pte_entry() counts them."""
    u = dict.fromkeys(
        (
            "rss",
            "pss",
            "pss_dirty",
            "shared_clean",
            "shared_dirty",
            "private_clean",
            "private_dirty",
            "ksm",
            "anon_huge",
            "swap",
            "swap_pss",
        ),
        0,
    )
    for _, size, pte in k.pt.iter_present(mm.pgd, vma.start, vma.end):
        if is_swap_pte(pte):
            u["swap"] += 4
            u["swap_pss"] += 4 // max(k.swap.swap_count(swp_offset(pte)), 1)
            continue
        pfn = pte_page(k, pte, size)
        if pfn is None or k.pages.is_zero_pfn(pfn):
            continue  # vm_normal_page() is NULL for the zero page and bad frames
        kb, count = size >> 10, max(k.pages.page_mapcount(pfn), 1)
        dirty = bool(pte & PteFlags.DIRTY)
        shared = count > 1
        u["rss"] += kb
        u["pss"] += kb // count
        u["pss_dirty"] += kb // count if dirty else 0
        u[f"{'shared' if shared else 'private'}_{'dirty' if dirty else 'clean'}"] += kb
        u["ksm"] += kb if k.pages.PageKsm(pfn) else 0
        u["anon_huge"] += kb if size != PAGE_SIZE else 0
    return u


# --- pagemap --------------------------------------------------------------------


def pagemap(k: Kernel, mm: MmStruct, offset: int, length: int) -> bytes:
    """The bytes of /proc/PID/pagemap at ``offset`` (8 bytes per virtual page);
    nothing past the last user page (end of file, as Linux's pagemap_read)."""
    first = offset // PAGEMAP_ENTRY
    last = min(-(-(offset + length) // PAGEMAP_ENTRY), USER_END >> 12)
    if first >= last:
        return b""
    entries = np.zeros(max(last - first, 0), dtype="<u8")
    for vpn, value in _pagemap_entries(k, mm, first << 12, last << 12):
        entries[vpn - first] = value
    skip = offset - first * PAGEMAP_ENTRY
    return entries.tobytes()[skip : skip + length]


def _pagemap_entries(k: Kernel, mm: MmStruct, start: int, end: int) -> Iterator[tuple[int, int]]:
    for va, size, pte in k.pt.iter_present(mm.pgd, start, end):
        if is_swap_pte(pte):
            yield va >> 12, PM_SWAP | swp_type(pte) | swp_offset(pte) << MAX_SWAPFILES_SHIFT
            continue
        pfn = k.pte_layout.pte_pfn(pte, size)
        page = pte_page(k, pte, size)
        exclusive = (
            page is not None and not k.pages.is_zero_pfn(page) and k.pages.page_mapcount(page) == 1
        )
        base = PM_PRESENT | (PM_MMAP_EXCLUSIVE if exclusive else 0)
        lo, hi = max(va, start), min(va + size, end)
        for page in range(lo, hi, PAGE_SIZE):
            yield page >> 12, base | ((pfn + ((page - va) >> 12)) & PM_PFN_MASK)


# --- kpageflags / page_keyid --------------------------------------------------------

_PG_TO_KPF = (
    (PG.BUDDY, (KPF.BUDDY,)),
    (PG.ANON, (KPF.ANON, KPF.SWAPBACKED, KPF.UPTODATE, KPF.LRU)),
    (PG.PGTABLE, (KPF.PGTABLE,)),
    (PG.ZERO, (KPF.ZERO_PAGE, KPF.UPTODATE)),
    (PG.KSM, (KPF.KSM,)),
    (PG.HEAD, (KPF.COMPOUND_HEAD, KPF.THP)),
    (PG.TAIL, (KPF.COMPOUND_TAIL, KPF.THP)),
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
    mapped = k.pages.mapcounts_of(first, last) > 0
    out[mapped] |= np.uint64(1 << KPF.MMAP)
    return out.tobytes()[skip : skip + length]


def page_keyid(k: Kernel, offset: int, length: int) -> bytes:
    """``mm/page_keyid`` bytes: one little-endian u64 KeyID per PFN."""
    first, last, skip = _pfn_window(k, offset, length)
    out = k.pages.keyids_of(first, last).astype("<u8")
    return out.tobytes()[skip : skip + length]


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
