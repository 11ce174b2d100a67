"""Page tables as text, in the format of Linux's x86 ptdump.

What it models
    The files under /sys/kernel/debug/page_tables/ (and kernel_page_tables),
    written by arch/x86/mm/dump_pagetables.c: ``note_page()`` merges adjacent
    entries into runs and ``printk_prot()`` prints each run as

        0x%016lx-0x%016lx   %9lu%c <flags> <level>

    e.g. ``0xffffffffff600000-0xffffffffff601000           4K USR ro                 GLB x  pte``.
    The size is reduced by 1024 while it divides evenly, with units from
    "BKMGTPE". The flag columns, in Linux's order and widths, are ``USR ``/4
    spaces, ``RW ``/``ro ``, ``PWT ``, ``PCD ``, ``PSE `` (levels above pte
    only), ``PAT `` (bit 7 on a pte, bit 12 on a pmd/pud), ``GLB ``, ``NX ``/``x  ``;
    a run that is not present prints 30 spaces instead. Section markers are
    ``---[ %s ]---``. The level names are those of the 4-level x86-64 walk:
    ``pgd``, ``pud``, ``pmd``, ``pte`` (``p4d`` is folded).

Rules it keeps
    - Runs merge exactly as in ``note_page()``: adjacent entries of the same
      level whose whole protection value is equal. Linux compares all flag bits
      (ACCESSED and DIRTY included, though not printed) and, since "x86/mm: Mask
      out KeyID bits from page table entry pfn", the KeyID bits too, which sit
      in ``PTE_FLAGS_MASK``: runs of different KeyIDs never merge.
    - Empty entries are shown as Linux shows them: a run of empty entries has
      the level of the table they are in (an empty PGD slot is a ``pgd`` hole,
      an empty entry of a PTE table a ``pte`` hole), so a hole changes level
      where the table structure does.
    - Addition of docs/spec.md (4.3, ``pagetables/NAME``): a present run ends with
      `` keyid=N``.

The two dumps
    ``ptdump_user`` (``pagetables/NAME``) is the user half of a space under
    ``---[ User Space ]---``. Its last run ends where Linux's does: the walk
    of the PGD goes on at the first kernel slot, ``normalize_addr()`` makes
    that 0xffff800000000000, and the "Kernel Space" marker breaks the run
    there (a real line: ``0x0000008000000000-0xffff800000000000
    17179737600G ... pgd``). The sandbox's spaces have no kernel half, so the
    dump stops at that line.

    ``ptdump_kernel`` (``pagetables/kernel``) walks the kernel's own tables
    (``kernel/directmap.py``: the per-KeyID direct mappings in emulated
    memory) from address 0 to ``VMALLOC_START``, with dump_pagetables.c's
    markers for that span in its order: ``User Space`` (0), ``Kernel Space``
    (1 << 63, met at 0xffff800000000000), ``LDT remap``
    (0xffff880000000000) and ``Low Kernel Mapping`` (``PAGE_OFFSET``) for
    KeyID 0's copy; the sandbox adds ``Low Kernel Mapping KeyID N`` at the
    start of KeyID N's copy. As in ``note_page()``, a run is cut where it
    reaches a marker and the marker line follows it; the empty entries after
    each copy are runs of their own table's level (``pmd`` to the end of its
    GiB, ``pud`` to the end of its 512 GiB, then ``pgd``).

What it leaves out
    The kernel half of user spaces (PTI's entry area), and in
    ``pagetables/kernel`` everything from ``vmalloc() Area`` on (the sandbox
    has no vmalloc, vmemmap, fixmap or kernel text), the W+X check and
    ``max_lines`` truncation of the ESPfix area.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from itertools import pairwise
from typing import TYPE_CHECKING

import numpy as np

from mktme_sandbox.kernel.directmap import (
    KERNEL_SPACE,
    LDT_BASE_ADDR,
    PAGE_OFFSET,
    VMALLOC_START,
    normalize_addr,
    tree_addr,
)
from mktme_sandbox.kernel.pgtable import MmWalkOps, PageTables, PteTable, Span
from mktme_sandbox.kernel.pgtable_types import (
    PTRS_PER_TABLE,
    USER_END,
    Level,
    PteFlags,
    PteLayout,
)

if TYPE_CHECKING:
    from mktme_sandbox.kernel.kernel import Kernel
    from mktme_sandbox.kernel.vma import MmStruct

__all__ = [
    "USER_SPACE",
    "Marker",
    "Run",
    "format_marker",
    "format_prot",
    "format_run",
    "format_size",
    "merge_runs",
    "place_markers",
    "ptdump_kernel",
    "ptdump_mm",
    "ptdump_user",
    "render",
    "runs_from_spans",
]

USER_SPACE = "User Space"
"""The name of the first marker of dump_pagetables.c's ``address_markers[]``."""
UNITS = "BKMGTPE"

_F = PteFlags
_NOT_PRESENT = " " * 30
_PAT_LEVELS = (Level.PTE, Level.PMD, Level.PUD)
_U64 = (1 << 64) - 1


@dataclass(frozen=True)
class Marker:
    """A section marker line, ``---[ name ]---``."""

    name: str


@dataclass(frozen=True)
class Run:
    """Adjacent entries of one level with one protection value and KeyID.

    ``prot`` holds the flag bits of the entries (``PteLayout.pte_flags``, KeyID
    excluded); 0 for a run of empty entries.
    """

    start: int
    end: int
    prot: int
    level: Level
    keyid: int = 0


def format_marker(name: str) -> str:
    return f"---[ {name} ]---"


def format_size(nbytes: int) -> str:
    """``%9lu%c``: divided by 1024 while it divides evenly (``note_page``)."""
    unit = 0
    while not nbytes & 1023 and unit < len(UNITS) - 1:
        nbytes >>= 10
        unit += 1
    return f"{nbytes:9d}{UNITS[unit]}"


def format_prot(prot: int, level: Level) -> str:
    """The flag columns of ``printk_prot()``, without the level name."""
    if not prot & _F.PRESENT:
        return _NOT_PRESENT
    pat = prot & _F.PAT if level == Level.PTE else prot & _F.PAT_LARGE
    return "".join(
        (
            "USR " if prot & _F.USER else "    ",
            "RW " if prot & _F.RW else "ro ",
            "PWT " if prot & _F.PWT else "    ",
            "PCD " if prot & _F.PCD else "    ",
            "PSE " if level != Level.PTE and prot & _F.PSE else "    ",
            "PAT " if level in _PAT_LEVELS and pat else "    ",
            "GLB " if prot & _F.GLOBAL else "    ",
            "NX " if prot & _F.NX else "x  ",
        )
    )


def format_run(run: Run) -> str:
    """One line of the dump (no newline), `` keyid=N`` on a present run."""
    line = (
        f"0x{run.start:016x}-0x{run.end:016x}   {format_size(run.end - run.start)} "
        f"{format_prot(run.prot, run.level)}{run.level.name.lower()}"
    )
    return f"{line} keyid={run.keyid}" if run.prot & _F.PRESENT else line


def render(items: Iterable[Marker | Run]) -> str:
    """Markers and runs, one line each, as the file reads (newline-terminated)."""
    lines = [format_marker(i.name) if isinstance(i, Marker) else format_run(i) for i in items]
    return "".join(line + "\n" for line in lines)


def merge_runs(runs: Iterable[Run]) -> Iterator[Run]:
    """Merge each run into the previous one when adjacent with equal prot, level and KeyID."""
    current: Run | None = None
    for run in runs:
        if current is None:
            current = run
        elif run.start == current.end and (run.prot, run.level, run.keyid) == (
            current.prot,
            current.level,
            current.keyid,
        ):
            current = replace(current, end=run.end)
        else:
            yield current
            current = run
    if current is not None:
        yield current


def runs_from_spans(spans: Iterable[Span], layout: PteLayout) -> Iterator[Run]:
    """The runs ``note_page()`` would print for the spans of ``PageTables.iter_spans``.

    Merges as it goes, so a long run of equal entries costs no object per entry.
    """
    address_bits = layout.pfn_mask_max
    keyid_mask, keyid_shift = layout.keyid_mask, layout.keyid_shift
    key: tuple[int, Level, int] | None = None
    start = end = 0
    for va, size, level, pte in spans:
        # pte_flags() and pte_keyid(), without building a PteFlags per entry
        prot = pte & ~(address_bits & -size) & _U64 if pte else 0
        new_key = (prot, level, (pte & keyid_mask) >> keyid_shift)
        if new_key == key and va == end:
            end = va + size
            continue
        if key is not None:
            yield Run(start, end, *key)
        key, start, end = new_key, va, va + size
    if key is not None:
        yield Run(start, end, *key)


def place_markers(runs: Iterable[Run], markers: list[tuple[int, str]]) -> Iterator[Marker | Run]:
    """``note_page()``'s markers: ``markers`` are (address, name) in address
    order, the first at the start. A run that reaches a marker's address is
    cut there and the marker line follows it."""
    at = 0
    for run in runs:
        start = run.start
        while at < len(markers) and markers[at][0] <= start:
            yield Marker(markers[at][1])
            at += 1
        while at < len(markers) and markers[at][0] < run.end:
            yield replace(run, start=start, end=markers[at][0])
            start = markers[at][0]
            yield Marker(markers[at][1])
            at += 1
        yield replace(run, start=start)


def _normalized(items: Iterable[Marker | Run]) -> Iterator[Marker | Run]:
    """Tree addresses made canonical, as ``normalize_addr()`` makes them."""
    for item in items:
        if isinstance(item, Run):
            item = replace(item, start=normalize_addr(item.start), end=normalize_addr(item.end))
        yield item


def ptdump_user(pt: PageTables, cr3: int) -> str:
    """The user half of an address space, as /sys/kernel/debug/page_tables/current_user
    shows it; the last run ends at 0xffff800000000000, where Linux's does."""
    runs = runs_from_spans(table_spans(pt, cr3, 0, USER_END), pt.layout)
    return render(_normalized(place_markers(runs, [(0, USER_SPACE)])))


def table_spans(pt: PageTables, cr3: int, start: int, end: int) -> list[Span]:
    """``iter_spans`` with each PTE table's runs of equal entries merged with
    numpy: a run is one ``Span`` whose ``pte`` keeps only the flags and the
    KeyID (what ``runs_from_spans`` reads), so a dump costs no Python per page."""
    keep = np.uint64((~pt.layout.pfn_mask_max & _U64) | pt.layout.keyid_mask)
    spans: list[Span] = []
    covered = -1  # the end of the last PTE table merged: its holes are in its runs

    def pte_table(table: PteTable) -> None:
        nonlocal covered
        lo = max(0, (start - table.base) >> Level.PTE.shift)
        hi = min(len(_DENSE), (end - table.base + Level.PTE.size - 1) >> Level.PTE.shift)
        dense = _DENSE.copy()
        dense[table.indices] = table.pte & keep
        entries = dense[lo:hi]
        cuts = [0, *(np.flatnonzero(entries[1:] != entries[:-1]) + 1).tolist(), len(entries)]
        for a, b in pairwise(cuts):
            va = table.base + ((lo + a) << Level.PTE.shift)
            spans.append(Span(va, (b - a) << Level.PTE.shift, Level.PTE, int(entries[a])))
        covered = table.base + (hi << Level.PTE.shift)

    def hole(lo: int, hi: int, level: Level) -> None:
        if level != Level.PTE or lo >= covered:
            spans.append(Span(lo, hi - lo, level, 0))

    def huge(va: int, level: Level, e: int, _: int) -> None:
        spans.append(Span(va, level.size, level, e))

    pt.walk_page_range(
        cr3, start, end, MmWalkOps(pte_table=pte_table, huge_entry=huge, pte_hole=hole)
    )
    return spans


_DENSE = np.zeros(PTRS_PER_TABLE, dtype=np.uint64)


def ptdump_mm(k: Kernel, mm: MmStruct) -> str:
    """``pagetables/NAME``: the user half of the space ``mm``."""
    return ptdump_user(k.pt, mm.pgd)


def kernel_markers(k: Kernel) -> list[tuple[int, str]]:
    """dump_pagetables.c's markers up to VMALLOC_START, in tree addresses,
    with one for each KeyID's copy of the direct mapping."""
    copies = [
        (PAGE_OFFSET + keyid * k.directmap.size, f"Low Kernel Mapping KeyID {keyid}")
        for keyid in range(1, k.directmap.copies)
    ]
    named = [
        (0, USER_SPACE),
        (KERNEL_SPACE, "Kernel Space"),
        (LDT_BASE_ADDR, "LDT remap"),
        (PAGE_OFFSET, "Low Kernel Mapping"),
        *copies,
    ]
    return [(tree_addr(address), name) for address, name in named]


def ptdump_kernel(k: Kernel) -> str:
    """``pagetables/kernel``: the kernel's page tables (the direct mappings,
    one per KeyID) from 0 to VMALLOC_START, under dump_pagetables.c's markers."""
    pt = k.directmap.pt
    runs = runs_from_spans(pt.iter_spans(k.directmap.pgd, 0, tree_addr(VMALLOC_START)), pt.layout)
    return render(_normalized(place_markers(runs, kernel_markers(k))))
