"""The /proc files added for real tools, against this host's own /proc and
Linux's sources: /proc/meminfo (fs/proc/meminfo.c), /proc/vmstat names
(mm/vmstat.c), smaps_rollup and status (fs/proc/task_mmu.c), kpagecount
(Documentation/admin-guide/mm/pagemap.rst), and KSM/THP pages in smaps and
kpageflags."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from kernel_helpers import PAGE, U, cpu_key, ctl, machine, pfn_of, space
from mktme_sandbox import Machine
from mktme_sandbox.kernel.pgtable_types import HPAGE_NR
from mktme_sandbox.kernel.proc import KPF

HOST_PROC = Path("/proc")


def host(name: str) -> str:
    path = HOST_PROC / name
    if not path.exists():
        pytest.skip(f"this host has no /proc/{name}")
    return path.read_text()


def shape(line: str) -> str:
    """A line with its digits blanked: the format without the values."""
    return re.sub(r"\d", "9", line)


@pytest.fixture
def m() -> Machine:
    m = machine()
    space(m)
    ctl(m, "a", f"mmap {U:#x} 64K rw- populate")
    return m


def test_meminfo_lines_have_the_hosts_names_widths_and_units(m: Machine) -> None:
    """show_val_kb(): "Name:" padded to 16, the kB value right-aligned in 8, " kB";
    hugetlb_report_meminfo(): "HugePages_Total:   %5lu". Each line of ours is as
    long as the host's line of that name (values that fit their width)."""
    theirs = {line.split(":", 1)[0]: line for line in host("meminfo").splitlines()}
    for line in m.meminfo().splitlines():
        name = line.split(":", 1)[0]
        assert name in theirs, name
        if name != "VmallocTotal":  # 11 digits on both, wider than the field
            assert len(line) == len(theirs[name]), (line, theirs[name])
            assert line.endswith(" kB") == theirs[name].endswith(" kB"), line


def test_meminfo_counts_what_the_allocator_holds(m: Machine) -> None:
    info = {n: int(v.split()[0]) for n, v in (ln.split(":") for ln in m.meminfo().splitlines())}
    stat = m.vmstat_counts()
    assert info["MemFree"] == stat["nr_free_pages"] * 4
    assert info["AnonPages"] == 64 == stat["nr_anon_pages"] * 4
    assert info["PageTables"] == stat["nr_page_table_pages"] * 4
    reserved = 2 + len(m.kernel.directmap.table_pages())  # PFN 0, the zero page, the direct maps
    assert info["MemTotal"] == m.phys_mem // 1024 - 4 * reserved


def test_vmstat_names_without_the_mktme_prefix_are_the_hosts() -> None:
    """mm/vmstat.c vmstat_text: every name we show unprefixed is a line of the
    host's /proc/vmstat; everything else is the sandbox's own, prefixed mktme_."""
    theirs = {line.split()[0] for line in host("vmstat").splitlines()}
    ours = list(machine().vmstat_counts())
    assert [n for n in ours if not n.startswith("mktme_") and n not in theirs] == []
    assert "pgalloc" not in ours


def test_vmstat_gauges_and_events_come_in_the_hosts_order() -> None:
    theirs = [line.split()[0] for line in host("vmstat").splitlines()]
    ours = [n for n in machine().vmstat_counts() if not n.startswith("mktme_")]
    assert ours == sorted(ours, key=theirs.index)


def test_smaps_rollup_header_and_fields_are_laid_out_as_the_hosts(m: Machine) -> None:
    """show_smaps_rollup(): the header is padded to column 73 before [rollup];
    __show_smap(rollup=true) adds Pss_Anon, Pss_File, Pss_Shmem after Pss_Dirty."""
    ours, theirs = m.smaps_rollup("a").splitlines(), host("self/smaps_rollup").splitlines()
    assert ours[0].index("[rollup]") == theirs[0].index("[rollup]") == 73
    assert ours[0].startswith(f"{U:08x}-{U + (64 << 10):08x} ---p 00000000 00:00 0 ")
    assert [shape(line.split(":")[0]) for line in ours[1:]] == [
        shape(line.split(":")[0]) for line in theirs[1:]
    ]
    assert all(len(a) == len(b) for a, b in zip(ours[1:], theirs[1:], strict=True))


def test_smaps_rollup_of_a_space_without_vmas_starts_at_zero() -> None:
    m = machine()
    space(m)
    assert m.smaps_rollup("a").startswith("00000000-00000000 ---p 00000000 00:00 0 ")


def test_status_vm_and_rss_lines_are_the_hosts_in_order_and_layout(m: Machine) -> None:
    """task_mem(): "VmPeak:\\t" and the kB value right-aligned in 8, from VmPeak
    to VmSwap, then hugetlb_report_usage()'s HugetlbPages."""
    ours = m.status("a").splitlines()
    theirs = [ln for ln in host("self/status").splitlines() if re.match(r"(Vm|Rss|Hugetlb)", ln)]
    assert ours[0] == "Name:\ta"
    assert [ln.split(":")[0] for ln in ours[1:]] == [ln.split(":")[0] for ln in theirs]
    assert all(len(shape(a)) == len(shape(b)) for a, b in zip(ours[1:], theirs, strict=True))
    values = dict(line.split(":\t") for line in ours[1:])
    assert values["VmRSS"] == values["RssAnon"] == values["VmSize"] == "      64 kB"


def ksm_triple() -> Machine:
    """Three spaces with pages w, x, y, z each: KSM merges them into four KSM
    pages mapped three times each."""
    m = machine()
    for name in ("a", "b", "c"):
        space(m, name)
        ctl(m, name, f"mmap {U:#x} 16K rw- populate")
        for i, data in enumerate((b"w", b"x", b"y", b"z")):
            m.write_virt(name, U + i * PAGE, data)
        ctl(m, name, f"madvise {U:#x} 16K mergeable")
    assert m.ksm_run() == 8
    return m


def test_ksm_pages_are_shared_dirty_and_pss_is_exact() -> None:
    """smaps_account(): a KSM page is PageDirty, so it counts in Shared_Dirty;
    Pss sums (PAGE_SIZE << PSS_SHIFT) / mapcount and shifts once at the end:
    four pages mapped three times each are 4 x 16384 / 3 bytes = 5 kB of Pss,
    not 4 x (4 kB // 3) = 4 kB."""
    m = ksm_triple()
    for text in (m.smaps("a"), m.smaps_rollup("a")):
        fields = dict(re.findall(r"(\w+):\s+(\d+) kB", text))
        assert (fields["Shared_Dirty"], fields["Shared_Clean"], fields["KSM"]) == ("16", "0", "16")
        assert (fields["Pss"], fields["Pss_Dirty"]) == ("5", "5")
    stats = m.ksm_stats()
    assert (stats["pages_shared"], stats["pages_sharing"], stats["pages_unshared"]) == (4, 8, 0)


def test_kpagecount_counts_the_mappings_of_each_frame() -> None:
    """pagemap.rst: /proc/kpagecount holds a 64-bit count of the times each page is mapped."""
    m = ksm_triple()
    pfn = pfn_of(m, "a", U)
    assert struct.unpack("<Q", m.kpagecount(8 * pfn, 8)) == (3,)
    assert struct.unpack("<Q", m.kpagecount(8 * m.kernel.zero_pfn, 8)) == (0,)


def test_the_zero_page_is_reserved_in_kpageflags() -> None:
    """The zero page is PG_reserved; stable_page_flags() exports KPF_RESERVED (32)."""
    m = machine()
    (flags,) = struct.unpack("<Q", m.kpageflags(8 * m.kernel.zero_pfn, 8))
    assert flags & (1 << KPF.RESERVED)
    assert flags & (1 << KPF.ZERO_PAGE)
    assert not flags & (1 << KPF.MMAP)


def test_tail_pages_of_a_mapped_huge_page_are_mmap_and_counted() -> None:
    """stable_page_flags(): page_mapped() is true for every page of a PMD-mapped THP."""
    m = machine()
    cpu_key(m, 1)
    space(m)
    ctl(m, "a", f"mmap {0x40000000:#x} 2M rw- populate")
    ctl(m, "a", f"madvise {0x40000000:#x} 2M hugepage")
    assert m.khugepaged_scan() == 1
    head = pfn_of(m, "a", 0x40000000)
    flags = struct.unpack(f"<{HPAGE_NR}Q", m.kpageflags(8 * head, 8 * HPAGE_NR))
    counts = struct.unpack(f"<{HPAGE_NR}Q", m.kpagecount(8 * head, 8 * HPAGE_NR))
    assert all(f & (1 << KPF.MMAP) for f in flags)
    assert all(f & (1 << KPF.COMPOUND_TAIL) for f in flags[1:])
    assert set(counts) == {1}


def meminfo_values(m: Machine) -> dict[str, int]:
    return {line.split(":")[0]: int(line.split()[1]) for line in m.meminfo().splitlines()}


def test_the_huge_zero_page_is_neither_reserved_memory_nor_an_anonymous_thp() -> None:
    """mm/huge_memory.c get_huge_zero_page(): the huge zero page is an ordinary
    allocation (alloc_pages(GFP_TRANSHUGE | __GFP_ZERO, HPAGE_PMD_ORDER)), so
    MemTotal (totalram_pages) does not change; it is not anonymous memory, so
    neither AnonHugePages nor nr_anon_transparent_hugepages counts it."""
    m = Machine(None, phys_mem="16M", seed=1)
    m.create_space("a", 0)
    before = meminfo_values(m)
    m.space_command("a", f"mmap {U:#x} 2M r--", uid=0)
    m.space_command("a", f"madvise {U:#x} 2M hugepage", uid=0)
    assert m.read_virt("a", U, 8) == bytes(8)
    after = meminfo_values(m)
    assert m.vmstat_counts()["thp_zero_page_alloc"] == 1
    assert after["MemTotal"] == before["MemTotal"]
    assert after["AnonHugePages"] == 0
    assert m.vmstat_counts()["nr_anon_transparent_hugepages"] == 0
