"""The /proc formats against what Linux documents and prints: maps, smaps
(plus the KeyID line), pagemap bits, kpageflags bits, page_keyid."""

from __future__ import annotations

import re
import struct

import pytest

from kernel_helpers import PAGE, U, cpu_key, ctl, machine, pfn_of, space
from mktme_sandbox import Machine
from mktme_sandbox.kernel.proc import KPF

# fs/proc/task_mmu.c: "%08lx-%08lx %c%c%c%c %08llx %02x:%02x %lu " for anon memory
MAPS_LINE = re.compile(r"[0-9a-f]{8,}-[0-9a-f]{8,} [r-][w-][x-][ps] 00000000 00:00 0 \n")
# smaps values: name padded to 16 columns, value right-aligned in 8, then " kB"
SMAPS_KB = re.compile(r"[A-Za-z_]+:\s+\d+ kB\n")


@pytest.fixture
def m() -> Machine:
    m = machine()
    cpu_key(m, 3)
    space(m)
    ctl(m, "a", f"mmap {U:#x} 8K rw- keyid=3")
    ctl(m, "a", f"mmap {U + 4 * PAGE:#x} 4K r--")
    m.write_virt("a", U, b"x")
    return m


def test_maps_lines_have_the_linux_anonymous_format(m: Machine) -> None:
    lines = m.maps("a").splitlines(keepends=True)
    assert len(lines) == 2
    assert all(MAPS_LINE.fullmatch(line) for line in lines)
    assert lines[1].startswith(f"{U + 4 * PAGE:08x}-{U + 5 * PAGE:08x} r--p ")


def test_smaps_entries_follow_the_kernel_layout_with_a_keyid_line(m: Machine) -> None:
    second_vma = m.maps("a").splitlines()[1]
    entry = m.smaps("a").split(second_vma)[0]
    lines = entry.splitlines(keepends=True)
    assert MAPS_LINE.fullmatch(lines[0])
    names = [line.split(":")[0] for line in lines[1:]]
    assert names[:4] == ["Size", "KernelPageSize", "MMUPageSize", "Rss"]
    assert names[-3:] == ["ProtectionKey", "KeyID", "VmFlags"]
    assert all(SMAPS_KB.fullmatch(line) for line in lines[1:-4])
    assert "Size:                  8 kB\n" in lines
    assert "Rss:                   4 kB\n" in lines  # one page written, one never touched
    assert "Private_Dirty:         4 kB\n" in lines
    assert "KeyID:                 3\n" in lines
    assert lines[-1] == "VmFlags: rd wr mr mw me ac \n"


def test_zero_page_mappings_count_in_no_rss(m: Machine) -> None:
    m.read_virt("a", U + 4 * PAGE, 1)  # KeyID-0 r-- VMA: zero page
    second = m.smaps("a").split(m.maps("a").splitlines()[1])[1]
    assert "Rss:                   0 kB" in second


def test_pagemap_entries_use_the_documented_bits(m: Machine) -> None:
    raw = m.pagemap("a", (U >> 12) * 8, 8 * 5)
    entries = struct.unpack("<5Q", raw)
    present, exclusive = 1 << 63, 1 << 56
    assert entries[0] & present
    assert entries[0] & exclusive
    assert entries[1] == 0  # never touched
    assert entries[0] & ((1 << 55) - 1) == pfn_of(m, "a", U)
    m.read_virt("a", U + 4 * PAGE, 1)
    (zero,) = struct.unpack("<Q", m.pagemap("a", ((U >> 12) + 4) * 8, 8))
    assert zero & present
    assert not zero & exclusive
    assert zero & ((1 << 55) - 1) == m.kernel.zero_pfn


def test_pagemap_reads_at_any_offset_and_length(m: Machine) -> None:
    whole = m.pagemap("a", (U >> 12) * 8, 16)
    assert m.pagemap("a", (U >> 12) * 8 + 3, 9) == whole[3:12]


def test_kpageflags_marks_anon_zero_buddy_and_pagetable_pages(m: Machine) -> None:
    def flags(pfn: int) -> int:
        return int(struct.unpack("<Q", m.kpageflags(pfn * 8, 8))[0])

    anon = flags(pfn_of(m, "a", U))
    assert anon & (1 << KPF.ANON)
    assert anon & (1 << KPF.MMAP)
    assert flags(m.kernel.zero_pfn) & (1 << KPF.ZERO_PAGE)
    assert flags(m.kernel.alloc.nr_pages - 1) & (1 << KPF.BUDDY)
    assert flags(m.cr3("a") >> 12) & (1 << KPF.PGTABLE)


def test_page_keyid_gives_one_u64_per_pfn(m: Machine) -> None:
    pfn = pfn_of(m, "a", U)
    raw = m.page_keyid(0, 8 * (pfn + 1))
    assert len(raw) == 8 * (pfn + 1)
    assert struct.unpack("<Q", raw[-8:])[0] == 3
    assert m.page_keyid(m.kernel.alloc.nr_pages * 8, 8) == b""


def test_ptdump_shows_each_keyid_run(m: Machine) -> None:
    dump = m.ptdump("a")
    assert dump.startswith("---[ User Space ]---\n")
    run = [line for line in dump.splitlines() if line.startswith(f"0x{U:016x}")]
    assert run
    assert run[0].endswith("pte keyid=3")
