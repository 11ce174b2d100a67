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

What it leaves out
    The kernel half: Linux walks all 512 PGD slots, so its last user-space run
    ends at the first kernel address, 0xffff800000000000 (a real line:
    ``0x0000008000000000-0xffff800000000000   17179737600G ... pgd``). The
    sandbox's address spaces have no kernel half, so ``ptdump_user`` stops at
    ``USER_END`` (0x0000800000000000). The direct mappings are rendered from
    synthetic runs with ``render`` (``pagetables/kernel``). Also left out: the
    W+X check and ``max_lines`` truncation of the ESPfix area.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from itertools import pairwise
from typing import TYPE_CHECKING

import numpy as np

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


def ptdump_user(pt: PageTables, cr3: int) -> str:
    """The user half of an address space, as /sys/kernel/debug/page_tables/current_user shows it."""
    spans = table_spans(pt, cr3, 0, USER_END)
    return render([Marker(USER_SPACE), *runs_from_spans(spans, pt.layout)])


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

    def huge(va: int, level: Level, e: int) -> None:
        spans.append(Span(va, level.size, level, e))

    pt.walk_page_range(
        cr3, start, end, MmWalkOps(pte_table=pte_table, huge_entry=huge, pte_hole=hole)
    )
    return spans


_DENSE = np.zeros(PTRS_PER_TABLE, dtype=np.uint64)


def ptdump_mm(k: Kernel, mm: MmStruct) -> str:
    """``pagetables/NAME``: the user half of the space ``mm``."""
    return ptdump_user(k.pt, mm.pgd)


def ptdump_kernel(k: Kernel) -> str:
    """``pagetables/kernel``: the direct mappings, one per KeyID."""
    return render(k.directmap.ptdump_items())
