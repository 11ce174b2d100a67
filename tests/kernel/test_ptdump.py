"""ptdump: the text of arch/x86/mm/dump_pagetables.c, checked against lines Linux printed."""

from __future__ import annotations

import pytest

from mktme_sandbox.kernel.pgtable import PageTables
from mktme_sandbox.kernel.pgtable_types import SIZE_2M, Level, PteFlags, PteLayout
from mktme_sandbox.kernel.ptdump import (
    Marker,
    Run,
    format_run,
    format_size,
    merge_runs,
    ptdump_user,
    render,
)

F = PteFlags
P = F.PRESENT
LAYOUT = PteLayout(46, 6)


class RamTables:
    """Page tables over a bytearray: the smallest PhysMem and table allocator."""

    def __init__(self) -> None:
        self.ram = bytearray(8 << 20)
        self.next_table = 1 << 20
        self.pt = PageTables(self, LAYOUT, self.alloc, lambda pa: None)
        self.cr3 = self.pt.create()

    def load(self, pa: int, length: int, keyid: int = 0) -> bytes:
        return bytes(self.ram[pa : pa + length])

    def store(self, pa: int, data: bytes, keyid: int = 0) -> None:
        self.ram[pa : pa + len(data)] = data

    def alloc(self) -> int:
        self.next_table += 4096
        return self.next_table - 4096

    def map(self, va: int, pfn: int, keyid: int, flags: int, size: int = 4096) -> None:
        self.pt.set_pte(self.cr3, va, LAYOUT.make_pte(pfn, keyid, flags), size)


# Lines printed by real kernels (dmesg of CONFIG_X86_PTDUMP boots posted to
# LKML, and a /sys/kernel/debug/kernel_page_tables read), with what they encode.
LINUX_LINES = [
    (
        "0xffffffffff600000-0xffffffffff601000           4K USR ro                 GLB x  pte",
        Run(0xFFFFFFFFFF600000, 0xFFFFFFFFFF601000, P | F.USER | F.GLOBAL, Level.PTE),
    ),
    (
        "0x00000000dba1a000-0x00000000dbc00000        1944K     RW                     NX pte",
        Run(0xDBA1A000, 0xDBC00000, P | F.RW | F.NX, Level.PTE),
    ),
    (
        "0xffffffff81000000-0xffffffff81e00000          14M     ro         PSE     GLB x  pmd",
        Run(0xFFFFFFFF81000000, 0xFFFFFFFF81E00000, P | F.PSE | F.GLOBAL, Level.PMD),
    ),
    (
        "0xffffffffff5fa000-0xffffffffff5fd000          12K     RW PWT PCD         GLB NX pte",
        Run(
            0xFFFFFFFFFF5FA000,
            0xFFFFFFFFFF5FD000,
            P | F.RW | F.PWT | F.PCD | F.GLOBAL | F.NX,
            Level.PTE,
        ),
    ),
    (
        "0xffff8dc340000000-0xffff8dc380000000           1G     RW         PSE         NX pud",
        Run(0xFFFF8DC340000000, 0xFFFF8DC380000000, P | F.RW | F.PSE | F.NX, Level.PUD),
    ),
]
LINUX_HOLES = [
    (
        "0x00000007fd200000-0x0000000800000000          46M                               pmd",
        Run(0x7FD200000, 0x800000000, 0, Level.PMD),
    ),
    (
        "0x0000008000000000-0xffff800000000000   17179737600G                               pgd",
        Run(0x8000000000, 0xFFFF800000000000, 0, Level.PGD),
    ),
]


@pytest.mark.parametrize(("line", "run"), LINUX_LINES)
def test_present_run_is_the_linux_line_plus_keyid(line: str, run: Run) -> None:
    assert format_run(run) == line + " keyid=0"


@pytest.mark.parametrize(("line", "run"), LINUX_HOLES)
def test_hole_is_the_linux_line_exactly(line: str, run: Run) -> None:
    assert format_run(run) == line


def test_sizes_take_the_largest_unit_that_divides() -> None:
    assert format_size(4096) == "        4K"
    assert format_size(3 << 20) == "        3M"
    assert format_size(1536) == "     1536B"
    assert format_size(1 << 40) == "        1T"
    assert format_size(255 << 39) == "   130560G"


def test_pat_shows_bit_7_on_a_pte_and_bit_12_on_a_pmd() -> None:
    pte = format_run(Run(0, 4096, P | F.PAT, Level.PTE))
    pmd_bit7 = format_run(Run(0, SIZE_2M, P | F.PSE, Level.PMD))
    pmd_pat = format_run(Run(0, SIZE_2M, P | F.PSE | F.PAT_LARGE, Level.PMD))
    assert "    PAT " in pte
    assert "PSE" not in pte
    assert "PSE     GLB" not in pmd_bit7
    assert "PSE         x" in pmd_bit7
    assert "PSE PAT " in pmd_pat


def test_encrypted_runs_carry_their_keyid() -> None:
    line = format_run(Run(0x1000, 0x3000, P | F.USER | F.RW | F.NX, Level.PTE, keyid=5))
    assert line.endswith("NX pte keyid=5")


def test_runs_merge_only_when_adjacent_with_equal_prot_level_and_keyid() -> None:
    rw = P | F.RW | F.USER
    runs = [
        Run(0x0000, 0x1000, rw, Level.PTE, 1),
        Run(0x1000, 0x2000, rw, Level.PTE, 1),
        Run(0x2000, 0x3000, rw, Level.PTE, 2),  # another KeyID
        Run(0x3000, 0x4000, rw | F.DIRTY, Level.PTE, 2),  # Linux compares unprinted bits too
        Run(0x5000, 0x6000, rw | F.DIRTY, Level.PTE, 2),  # not adjacent
    ]
    assert [(r.start, r.end) for r in merge_runs(runs)] == [
        (0, 0x2000),
        (0x2000, 0x3000),
        (0x3000, 0x4000),
        (0x5000, 0x6000),
    ]


def test_render_writes_markers_and_runs_one_per_line() -> None:
    text = render(
        [
            Marker("Low Kernel Mapping KeyID 1"),
            Run(0xFFFF898000000000, 0xFFFF898010000000, P | F.RW | F.PSE | F.NX, Level.PMD, 1),
        ]
    )
    assert text == (
        "---[ Low Kernel Mapping KeyID 1 ]---\n"
        "0xffff898000000000-0xffff898010000000         256M     RW         PSE         NX pmd"
        " keyid=1\n"
    )


def test_empty_address_space_is_one_pgd_hole_to_the_first_kernel_address() -> None:
    """dump_pagetables.c walks on to PGD slot 256, whose address is
    ``normalize_addr(256 * PGD_LEVEL_MULT)`` = 0xffff800000000000, and the
    marker ``{ (1UL << 63), "Kernel Space" }`` breaks the run there."""
    ram = RamTables()
    assert ptdump_user(ram.pt, ram.cr3) == (
        "---[ User Space ]---\n"
        "0x0000000000000000-0xffff800000000000    16777088T                               pgd\n"
    )


def test_user_dump_of_a_known_layout() -> None:
    """The last run ends at the next address note_page() is called with,
    0xffff800000000000, whatever its level: a page mapped at the very top of
    the user half prints a run of that size, as Linux would (a real kernel never
    maps that page: TASK_SIZE_MAX stops one page short)."""
    ram = RamTables()
    text_flags = P | F.USER | F.ACCESSED
    data_flags = P | F.USER | F.RW | F.ACCESSED | F.DIRTY | F.NX
    ram.map(0x400000, 0x100, 0, text_flags)
    ram.map(0x401000, 0x101, 0, data_flags)
    ram.map(0x402000, 0x102, 0, data_flags)
    ram.map(0x403000, 0x103, 3, data_flags)  # encrypted: its own run
    ram.map(0x40000000, 0x200, 1, data_flags | F.PSE, SIZE_2M)
    ram.map(0x7FFFFFFFF000, 0x300, 0, data_flags)
    expected = """\
---[ User Space ]---
0x0000000000000000-0x0000000000400000           4M                               pmd
0x0000000000400000-0x0000000000401000           4K USR ro                     x  pte keyid=0
0x0000000000401000-0x0000000000403000           8K USR RW                     NX pte keyid=0
0x0000000000403000-0x0000000000404000           4K USR RW                     NX pte keyid=3
0x0000000000404000-0x0000000000600000        2032K                               pte
0x0000000000600000-0x0000000040000000        1018M                               pmd
0x0000000040000000-0x0000000040200000           2M USR RW         PSE         NX pmd keyid=1
0x0000000040200000-0x0000000080000000        1022M                               pmd
0x0000000080000000-0x0000008000000000         510G                               pud
0x0000008000000000-0x00007f8000000000         127T                               pgd
0x00007f8000000000-0x00007fffc0000000         511G                               pud
0x00007fffc0000000-0x00007fffffe00000        1022M                               pmd
0x00007fffffe00000-0x00007ffffffff000        2044K                               pte
0x00007ffffffff000-0xffff800000000000   18014123631575044K USR RW                     NX pte keyid=0
"""
    assert ptdump_user(ram.pt, ram.cr3) == expected


def test_emptied_pte_table_shows_as_a_pte_hole_until_freed() -> None:
    ram = RamTables()
    ram.map(0x200000, 1, 0, P | F.USER)
    ram.pt.clear_pte(ram.cr3, 0x200000)
    assert "0x0000000000200000-0x0000000000400000           2M" + " " * 31 + "pte" in ptdump_user(
        ram.pt, ram.cr3
    )
    ram.pt.free_empty_tables(ram.cr3)
    assert ptdump_user(ram.pt, ram.cr3).splitlines()[1].endswith("16777088T" + " " * 31 + "pgd")
