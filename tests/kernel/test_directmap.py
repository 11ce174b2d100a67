"""The per-KeyID direct mappings as real page tables (patches 16-18 of v5), and
pagetables/kernel as the ptdump of those tables."""

from __future__ import annotations

import struct

from kernel_helpers import PAGE, U, ctl, machine, pfn_of, two_keys
from mktme_sandbox import Machine
from mktme_sandbox.kernel.directmap import PAGE_OFFSET, tree_addr
from mktme_sandbox.kernel.page import PG
from mktme_sandbox.kernel.pgtable import Lookup
from mktme_sandbox.kernel.pgtable_types import SIZE_1G, SIZE_2M, PteFlags

SECRET = b"attack at dawn!!" * 4


def leaf(m: Machine, vaddr: int) -> Lookup:
    """The kernel's leaf entry for a direct-map address."""
    dm = m.kernel.directmap
    found = dm.pt.get_pte(dm.pgd, tree_addr(vaddr))
    assert found is not None
    return found


def rewrite_entry(m: Machine, vaddr: int, keyid: int) -> None:
    """Make the leaf of ``vaddr`` name ``keyid`` instead, through keyids/0/mem."""
    found, layout = leaf(m, vaddr), m.kernel.pte_layout
    forged = (found.pte & ~layout.keyid_mask) | layout.keyid_prot(keyid)
    m.write_phys(0, found.entry_pa, struct.pack("<Q", forged))


# --- the tables ---------------------------------------------------------------------


def test_a_64m_machine_with_63_keyids_needs_129_table_pages() -> None:
    """One PGD, and per KeyID's copy one PUD table and one PMD table of 32
    2M leaves (64 MiB is less than a GiB: no 1G leaf): 516 KiB in all."""
    m = machine()
    tables = m.kernel.directmap.table_pages()
    assert len(tables) == 1 + 2 * 64
    flags = m.kernel.pages.flags_of()
    for pa in tables:
        assert flags[pa // PAGE] & (PG.PGTABLE | PG.RESERVED) == PG.PGTABLE | PG.RESERVED
        assert m.kernel.pages.page_keyid(pa // PAGE) == 0
        assert m.kernel.alloc.charged_uid(pa // PAGE) is None


def test_the_kernel_tables_are_neither_user_page_tables_nor_ram() -> None:
    """Linux allocates them from memblock: not in nr_page_table_pages, not in MemTotal."""
    m = machine()
    assert m.vmstat_counts()["nr_page_table_pages"] == 0
    assert "MemTotal:          65012 kB\n" in m.meminfo()  # less PFN 0, zero page, 129 tables


def test_whole_gigabytes_are_mapped_with_1g_leaves_and_the_rest_with_2m() -> None:
    """split_mem_range() with GBPAGES: 1G pages for aligned whole GiBs, 2M for the rest."""
    m = machine(phys_mem="1026M", keyid_bits=2, max_keys=3)
    assert leaf(m, PAGE_OFFSET).size == SIZE_1G
    assert leaf(m, PAGE_OFFSET + SIZE_1G).size == SIZE_2M
    assert "DirectMap2M:        2048 kB\nDirectMap1G:     1048576 kB\n" in m.meminfo()


def test_every_copy_maps_the_same_frame_with_its_own_keyid() -> None:
    """sync_direct_mapping(): KeyID k's copy at PAGE_OFFSET + k * direct_mapping_size
    maps what KeyID 0's maps, with k in the entry's KeyID bits."""
    m = machine(keyid_bits=3)
    dm, layout = m.kernel.directmap, m.kernel.pte_layout
    for keyid in range(dm.copies):
        found = leaf(m, dm.page_to_virt(0x1234, keyid))
        assert layout.pte_pfn(found.pte, found.size) == 0x1234 & ~511
        assert layout.pte_keyid(found.pte) == keyid
        assert layout.pte_flags(found.pte, found.size) & PteFlags.PSE
        assert dm.translate(dm.page_to_virt(0x1234, keyid))[:2] == (0x1234 * PAGE, keyid)
    assert m.check() == []


def test_sync_direct_mapping_writes_nothing_when_the_copies_are_in_sync() -> None:
    assert machine().kernel.directmap.sync_direct_mapping() == 0


# --- the kernel's copies go through them ----------------------------------------------


def test_a_rewritten_direct_map_entry_misdirects_the_kernel_and_check_reports_it() -> None:
    """swap_writepage() reads the page at page_address() (patch 18); with KeyID 1's
    leaf forged to name KeyID 2, the kernel reads the page through key 2: the
    device gets garbage, not the plaintext."""
    m, a = two_keys()
    ctl(m, a, f"mmap {U:#x} 16K rw- keyid=1")
    m.write_virt(a, U, SECRET)
    pfn = pfn_of(m, a, U)
    rewrite_entry(m, m.kernel.directmap.page_address(pfn), keyid=2)
    assert any(
        line.startswith("direct mapping: entry has another KeyID than its copy's")
        for line in m.check()
    )
    ctl(m, a, f"madvise {U:#x} 16K pageout")
    assert SECRET not in m.read_swap(0, m.swap_size)


def test_without_the_forgery_the_same_swap_out_writes_the_plaintext() -> None:
    m, a = two_keys()
    ctl(m, a, f"mmap {U:#x} 16K rw- keyid=1")
    m.write_virt(a, U, SECRET)
    ctl(m, a, f"madvise {U:#x} 16K pageout")
    assert SECRET in m.read_swap(0, m.swap_size)
    assert m.read_virt(a, U, len(SECRET)) == SECRET


def test_sync_direct_mapping_repairs_a_rewritten_copy() -> None:
    m = machine()
    rewrite_entry(m, m.kernel.directmap.page_to_virt(0, 5), keyid=6)
    assert m.check() != []
    assert m.kernel.directmap.sync_direct_mapping() == 1
    assert m.check() == []


# --- pagetables/kernel: ptdump of the tables ------------------------------------------


def test_the_kernel_dump_starts_with_the_markers_of_dump_pagetables() -> None:
    """arch/x86/mm/dump_pagetables.c: ``address_markers[]`` begins
    ``{ 0, "User Space" }, { (1UL << 63), "Kernel Space" }``, then (4-level,
    since the LDT moved out of the KASLR region) ``"LDT remap"`` at
    0xffff880000000000 and ``"Low Kernel Mapping"`` at PAGE_OFFSET; each is
    printed as ``"---[ %s ]---\\n"`` when the walk reaches it, after the run it cut."""
    lines = machine().ptdump_kernel().splitlines()
    assert lines[:7] == [
        "---[ User Space ]---",
        "0x0000000000000000-0xffff800000000000    16777088T                               pgd",
        "---[ Kernel Space ]---",
        "0xffff800000000000-0xffff880000000000           8T                               pgd",
        "---[ LDT remap ]---",
        "0xffff880000000000-0xffff888000000000         512G                               pgd",
        "---[ Low Kernel Mapping ]---",
    ]


def test_after_each_direct_map_the_holes_have_their_tables_levels() -> None:
    """note_page() breaks a run when the level changes: the empty PMD entries
    after the 2M leaves are a pmd run to the GiB's end, the empty PUD entries a
    pud run to the 512G slot's end, the copy's second PGD slot a pgd run."""
    lines = machine().ptdump_kernel().splitlines()
    at = lines.index("---[ Low Kernel Mapping KeyID 1 ]---")
    assert lines[at + 1 : at + 5] == [
        "0xffff898000000000-0xffff898004000000          64M     RW         PSE     GLB NX pmd keyid=1",
        "0xffff898004000000-0xffff898040000000         960M                               pmd",
        "0xffff898040000000-0xffff8a0000000000         511G                               pud",
        "0xffff8a0000000000-0xffff8a8000000000         512G                               pgd",
    ]
    assert lines[at + 5] == "---[ Low Kernel Mapping KeyID 2 ]---"


def test_the_kernel_dump_ends_where_the_vmalloc_area_begins() -> None:
    assert machine().ptdump_kernel().splitlines()[-1] == (
        "0xffffc80000000000-0xffffc90000000000           1T                               pgd"
    )


def test_a_rewritten_entry_shows_in_the_dump() -> None:
    """pagetables/kernel is the walk of the tables in memory, not arithmetic."""
    m = machine()
    rewrite_entry(m, m.kernel.directmap.page_to_virt(0, 1), keyid=9)
    dump = m.ptdump_kernel()
    assert (
        "0xffff898000000000-0xffff898000200000           2M     RW         PSE     GLB NX pmd"
        " keyid=9" in dump
    )


def test_the_user_dump_ends_its_last_run_where_linux_does() -> None:
    """A real line, from a host: ``0x0000008000000000-0xffff800000000000
    17179737600G ... pgd``: the walk goes on to PGD slot 256, which
    ``normalize_addr()`` makes 0xffff800000000000, where "Kernel Space" cuts the run."""
    m, a = two_keys()
    ctl(m, a, f"mmap {U:#x} 4K rw- populate")
    last = m.ptdump(a).splitlines()[-1]
    assert last == (
        "0x0000008000000000-0xffff800000000000   17179737600G                               pgd"
    )
