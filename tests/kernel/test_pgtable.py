"""Page tables in emulated memory: the PTE layout of the MKTME patches, walks, scans."""

from __future__ import annotations

import errno
import itertools
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mktme_sandbox.errors import SandboxError
from mktme_sandbox.kernel.pgtable import Leaf, PageTables, Span
from mktme_sandbox.kernel.pgtable_types import (
    PAGE_SHARED,
    PAGE_TABLE,
    SIZE_1G,
    SIZE_2M,
    SIZE_4K,
    USER_END,
    Level,
    PteFlags,
    PteLayout,
)

F = PteFlags
USER_RW = F.PRESENT | F.RW | F.USER | F.ACCESSED | F.DIRTY | F.NX


class FakeMem:
    """Bytearray-backed physical memory with the platform's load/store, counting accesses."""

    def __init__(self, size: int = 64 << 20) -> None:
        self.ram = bytearray(size)
        self.loads: list[tuple[int, int]] = []
        self.stores: list[tuple[int, int]] = []
        self.keyids: set[int] = set()

    def load(self, pa: int, length: int, keyid: int = 0) -> bytes:
        self.loads.append((pa, length))
        self.keyids.add(keyid)
        return bytes(self.ram[pa : pa + length])

    def store(self, pa: int, data: bytes, keyid: int = 0) -> None:
        self.stores.append((pa, len(data)))
        self.keyids.add(keyid)
        self.ram[pa : pa + len(data)] = data

    def reset_counts(self) -> None:
        self.loads.clear()
        self.stores.clear()


class TablePool:
    """alloc_table/free_table over a range of fake memory; checks double frees."""

    def __init__(self, mem: FakeMem, base: int = 1 << 20) -> None:
        self.mem = mem
        self.free = list(range(len(mem.ram) - 4096, base - 1, -4096))
        self.in_use: set[int] = set()

    def alloc(self) -> int:
        pa = self.free.pop()
        self.mem.ram[pa : pa + 4096] = bytes(4096)
        self.in_use.add(pa)
        return pa

    def release(self, pa: int) -> None:
        assert pa in self.in_use, f"free of a table not in use: {pa:#x}"
        self.in_use.remove(pa)
        self.free.append(pa)


def make_tables(keyid_bits: int = 6, maxphyaddr: int = 46) -> tuple[PageTables, FakeMem, TablePool]:
    mem = FakeMem()
    pool = TablePool(mem)
    pt = PageTables(mem, PteLayout(maxphyaddr, keyid_bits), pool.alloc, pool.release)
    return pt, mem, pool


LAYOUT = PteLayout(46, 6)


# -- the PTE layout ------------------------------------------------------------


def test_flag_bits_sit_where_pgtable_types_h_puts_them() -> None:
    expected = {
        "PRESENT": 0,
        "RW": 1,
        "USER": 2,
        "PWT": 3,
        "PCD": 4,
        "ACCESSED": 5,
        "DIRTY": 6,
        "PSE": 7,
        "GLOBAL": 8,
        "SPECIAL": 9,
        "SOFT_DIRTY": 11,
        "PAT_LARGE": 12,
        "NX": 63,
    }
    assert {name: int(F.__members__[name]).bit_length() - 1 for name in expected} == expected
    # One bit, two names: aliases, looked up by name (mypy takes F.PAT and F.PSE for two members).
    assert F.__members__["PAT"] is F.__members__["PSE"]
    assert F.__members__["PROTNONE"] is F.__members__["GLOBAL"]
    assert int(PAGE_TABLE) == 0x67  # _PAGE_TABLE: PRESENT|RW|USER|ACCESSED|DIRTY


def test_keyid_of_46_bit_layout_is_entry_bits_40_to_45() -> None:
    assert (LAYOUT.keyid_shift, LAYOUT.keyid_mask) == (40, 0x3F << 40)
    pte = LAYOUT.make_pte(0x1234, 0x2B, 0)
    assert pte == (0x1234 | 0x2B << 28) << 12 == 0x2B << 40 | 0x1234 << 12
    assert [b for b in range(64) if pte >> b & 1 and b >= 40] == [40, 41, 43, 45]
    assert LAYOUT.physical_mask == (1 << 40) - 1
    assert LAYOUT.pfn_mask == 0x000000FFFFFFF000


def test_keyid_of_52_bit_layout_is_bits_51_to_46_as_in_the_patch_example() -> None:
    layout = PteLayout(52, 6)
    pte = layout.make_pte(0x1234, 0x3F, 0)
    assert pte == (0x1234 | 0x3F << 34) << 12
    assert pte >> 46 == 0x3F
    assert layout.pte_keyid(pte) == 0x3F
    assert layout.pte_pfn(pte) == 0x1234


def test_pte_pfn_masks_out_the_keyid_bits() -> None:
    pte = LAYOUT.make_pte(0xABCDE, 63, USER_RW)
    assert LAYOUT.pte_pfn(pte) == 0xABCDE
    assert LAYOUT.pte_keyid(pte) == 63
    assert LAYOUT.pte_flags(pte) == USER_RW
    assert pte & LAYOUT.pfn_mask == 0xABCDE << 12  # PTE_PFN_MASK excludes the KeyID


def test_make_pte_round_trips_through_its_accessors() -> None:
    for pfn, keyid, flags in [(0, 0, 0), (1, 1, USER_RW), ((1 << 28) - 1, 63, F.NX | F.GLOBAL)]:
        pte = LAYOUT.make_pte(pfn, keyid, flags)
        assert (
            LAYOUT.make_pte(LAYOUT.pte_pfn(pte), LAYOUT.pte_keyid(pte), LAYOUT.pte_flags(pte))
            == pte
        )


def test_huge_pfn_and_flags_treat_bit_12_as_pat_large() -> None:
    pmd = LAYOUT.make_pte(0x200, 5, USER_RW | F.PSE | F.PAT_LARGE)
    assert LAYOUT.pte_pfn(pmd, SIZE_2M) == 0x200
    assert LAYOUT.pte_flags(pmd, SIZE_2M) == USER_RW | F.PSE | F.PAT_LARGE
    assert LAYOUT.pte_keyid(pmd) == 5


def test_make_pte_refuses_what_the_entry_cannot_hold() -> None:
    for pfn, keyid, flags in [(1 << 28, 0, 0), (0, 64, 0), (0, -1, 0), (0, 0, 1 << 20)]:
        with pytest.raises(SandboxError) as info:
            LAYOUT.make_pte(pfn, keyid, flags)
        assert info.value.errno == errno.EINVAL


def test_keyid_bits_zero_has_no_keyid_bits_at_all() -> None:
    """As v5's mktme_disable() leaves it ([PATCHv5 14/19]): ``mktme_keyid_mask = 0``,
    ``mktme_keyid_shift = 0``, ``physical_mask = (1ULL << __PHYSICAL_MASK_SHIFT) - 1``."""
    layout = PteLayout(46, 0)
    assert (layout.keyid_shift, layout.keyid_mask, layout.max_keyid) == (0, 0, 0)
    assert layout.physical_mask == (1 << 52) - 1
    pte = layout.make_pte((1 << 34) - 1, 0, F.PRESENT)
    assert layout.pte_pfn(pte) == (1 << 34) - 1
    assert layout.pte_keyid(pte) == 0
    with pytest.raises(SandboxError):
        layout.make_pte(1, 1, 0)
    assert layout.pte_modify(pte, F.PRESENT | F.NX, preserve_keyid=False) == pte | F.NX


def test_pte_modify_keeps_keyid_with_preserve_and_drops_it_without() -> None:
    pte = LAYOUT.make_pte(0x42, 7, USER_RW)
    readonly = F.PRESENT | F.USER | F.NX
    kept = LAYOUT.pte_modify(pte, readonly, preserve_keyid=True)
    dropped = LAYOUT.pte_modify(pte, readonly, preserve_keyid=False)
    assert (LAYOUT.pte_keyid(kept), LAYOUT.pte_pfn(kept)) == (7, 0x42)
    assert (LAYOUT.pte_keyid(dropped), LAYOUT.pte_pfn(dropped)) == (0, 0x42)
    # _PAGE_CHG_MASK: ACCESSED and DIRTY stay from the old entry, RW goes
    assert LAYOUT.pte_flags(kept) == readonly | F.ACCESSED | F.DIRTY


def test_pte_modify_without_preserve_takes_keyid_from_the_new_prot() -> None:
    pte = LAYOUT.make_pte(0x42, 7, USER_RW)
    newprot = F.PRESENT | F.USER | LAYOUT.keyid_prot(3)
    assert LAYOUT.pte_keyid(LAYOUT.pte_modify(pte, newprot, preserve_keyid=False)) == 3
    assert LAYOUT.pte_keyid(LAYOUT.pte_modify(pte, newprot, preserve_keyid=True)) == 7


def test_pgprot_modify_strips_the_vma_keyid_only_without_the_patch() -> None:
    vm_page_prot = int(PAGE_SHARED) | LAYOUT.keyid_prot(9)
    readonly = F.PRESENT | F.USER | F.ACCESSED | F.NX
    assert LAYOUT.pte_keyid(LAYOUT.pgprot_modify(vm_page_prot, readonly)) == 9
    assert LAYOUT.pte_keyid(LAYOUT.pgprot_modify(vm_page_prot, readonly, False)) == 0


def test_pmd_modify_keeps_pse() -> None:
    pmd = LAYOUT.make_pte(0x200, 2, USER_RW | F.PSE)
    assert LAYOUT.pte_modify(pmd, F.PRESENT | F.USER, size=SIZE_2M) & F.PSE


def test_layout_rejects_impossible_widths() -> None:
    for maxphyaddr, keyid_bits in [(53, 0), (31, 0), (46, -1), (46, 34)]:
        with pytest.raises(ValueError, match=r"maxphyaddr|keyid_bits|KeyID|bits"):
            PteLayout(maxphyaddr, keyid_bits)


# -- one entry -------------------------------------------------------------------


def test_set_then_get_returns_the_entry_and_where_it_lives() -> None:
    pt, mem, _ = make_tables()
    cr3 = pt.create()
    pte = LAYOUT.make_pte(0x777, 3, USER_RW)
    pt.set_pte(cr3, 0x7F12_3456_7000, pte)
    found = pt.get_pte(cr3, 0x7F12_3456_7ABC)
    assert found is not None
    assert (found.pte, found.size, found.level) == (pte, SIZE_4K, Level.PTE)
    assert int.from_bytes(mem.ram[found.entry_pa : found.entry_pa + 8], "little") == pte
    assert pt.get_pte(cr3, 0x7F12_3456_8000) is None
    assert mem.keyids == {0}  # page-table pages are KeyID-0 pages


def test_intermediate_entries_are_page_table_and_carry_no_keyid() -> None:
    pt, _, _ = make_tables()
    cr3 = pt.create()
    pt.set_pte(cr3, 0x40_0000, LAYOUT.make_pte(5, 63, USER_RW))
    steps = pt.walk(cr3, 0x40_0000)
    assert [s.level for s in steps] == [Level.PGD, Level.PUD, Level.PMD, Level.PTE]
    for step in steps[:-1]:
        assert step.entry & ~LAYOUT.pfn_mask == PAGE_TABLE
        assert LAYOUT.pte_keyid(step.entry) == 0


def test_walk_steps_index_each_level_and_stop_at_the_first_hole() -> None:
    pt, _, _ = make_tables()
    cr3 = pt.create()
    va = (3 << 39) | (5 << 30) | (7 << 21) | (9 << 12)
    pte = LAYOUT.make_pte(0x99, 1, USER_RW)
    pt.set_pte(cr3, va, pte)
    steps = pt.walk(cr3, va)
    assert [(s.level.name, s.index) for s in steps] == [
        ("PGD", 3),
        ("PUD", 5),
        ("PMD", 7),
        ("PTE", 9),
    ]
    assert steps[0].entry_pa == cr3 + 3 * 8
    assert steps[0].table_pa == cr3
    assert steps[-1].entry == pte
    for upper, lower in itertools.pairwise(steps):
        assert lower.table_pa == upper.entry & LAYOUT.pfn_mask
    hole = pt.walk(cr3, va + (1 << 39))
    assert [(s.level.name, s.index, s.entry) for s in hole] == [("PGD", 4, 0)]
    missing_pmd = pt.walk(cr3, va + (1 << 30))
    assert [s.level.name for s in missing_pmd] == ["PGD", "PUD"]
    assert missing_pmd[-1].entry == 0


def test_walk_stops_at_a_2m_leaf() -> None:
    pt, _, _ = make_tables()
    cr3 = pt.create()
    pmd = LAYOUT.make_pte(0x400, 2, USER_RW | F.PSE)
    pt.set_pte(cr3, SIZE_2M * 3, pmd, SIZE_2M)
    steps = pt.walk(cr3, SIZE_2M * 3 + 0x1234)
    assert [s.level.name for s in steps] == ["PGD", "PUD", "PMD"]
    assert steps[-1].entry == pmd


def test_2m_leaf_is_a_pmd_entry_with_pse_found_from_any_address_inside() -> None:
    pt, _, _ = make_tables()
    cr3 = pt.create()
    pmd = LAYOUT.make_pte(0x200, 4, USER_RW | F.PSE)
    pt.set_pte(cr3, 0x20_0000, pmd, SIZE_2M)
    found = pt.get_pte(cr3, 0x3F_F000)
    assert found is not None
    assert (found.pte, found.size, found.level) == (pmd, SIZE_2M, Level.PMD)


def test_huge_leaf_without_pse_is_refused() -> None:
    pt, _, _ = make_tables()
    cr3 = pt.create()
    with pytest.raises(SandboxError, match="PSE"):
        pt.set_pte(cr3, 0, LAYOUT.make_pte(0x200, 0, USER_RW), SIZE_2M)


def test_4k_entry_inside_a_2m_leaf_is_refused_until_split() -> None:
    pt, _, pool = make_tables()
    cr3 = pt.create()
    pt.set_pte(cr3, 0, LAYOUT.make_pte(0x200, 4, USER_RW | F.PSE | F.PAT_LARGE), SIZE_2M)
    with pytest.raises(SandboxError, match="inside a 2M leaf"):
        pt.set_pte(cr3, 0x1000, LAYOUT.make_pte(1, 0, USER_RW))
    with pytest.raises(SandboxError):
        pt.clear_pte(cr3, 0x1000)
    tables = len(pool.in_use)
    table = pt.split_huge_pmd(cr3, 0x1000)
    assert len(pool.in_use) == tables + 1
    assert table in pool.in_use
    leaves = list(pt.iter_present(cr3))
    assert len(leaves) == 512
    assert leaves[5] == Leaf(0x5000, SIZE_4K, LAYOUT.make_pte(0x205, 4, USER_RW | F.PAT))
    pt.set_pte(cr3, 0x1000, LAYOUT.make_pte(1, 0, USER_RW))


def test_unaligned_or_kernel_addresses_are_einval() -> None:
    pt, _, _ = make_tables()
    cr3 = pt.create()
    pte = LAYOUT.make_pte(1, 0, USER_RW)
    for va, size in [(0x1001, SIZE_4K), (0x1000, SIZE_2M), (USER_END, SIZE_4K), (-4096, SIZE_4K)]:
        with pytest.raises(SandboxError) as info:
            pt.set_pte(cr3, va, pte, size)
        assert info.value.errno == errno.EINVAL
    with pytest.raises(SandboxError, match="page size"):
        pt.set_pte(cr3, 0, pte, 8192)
    with pytest.raises(SandboxError, match="not a user address"):
        pt.get_pte(cr3, 0xFFFF_8880_0000_0000)
    with pytest.raises(SandboxError, match="reserved"):
        pt.set_pte(cr3, 0, pte | 1 << 47)


def test_clear_pte_returns_the_old_entry_and_zero_when_nothing_was_there() -> None:
    pt, _, _ = make_tables()
    cr3 = pt.create()
    pte = LAYOUT.make_pte(0x10, 2, USER_RW)
    pt.set_pte(cr3, 0x5000, pte)
    assert pt.clear_pte(cr3, 0x5000) == pte
    assert pt.clear_pte(cr3, 0x5000) == 0
    assert pt.clear_pte(cr3, 1 << 40) == 0  # no tables at all there
    assert pt.get_pte(cr3, 0x5000) is None


def test_clearing_a_2m_slot_that_holds_a_table_is_refused() -> None:
    pt, _, _ = make_tables()
    cr3 = pt.create()
    pt.set_pte(cr3, 0x5000, LAYOUT.make_pte(0x10, 2, USER_RW))
    with pytest.raises(SandboxError, match="maps a table"):
        pt.clear_pte(cr3, 0, SIZE_2M)


def test_collapse_replaces_the_pte_table_and_frees_it() -> None:
    pt, _, pool = make_tables()
    cr3 = pt.create()
    for i in range(512):
        pt.set_pte(cr3, SIZE_2M + i * SIZE_4K, LAYOUT.make_pte(0x1000 + i, 1, USER_RW))
    pte_table = pt.walk(cr3, SIZE_2M)[2].entry & LAYOUT.pfn_mask
    assert pte_table in pool.in_use
    pmd = LAYOUT.make_pte(0x2000, 1, USER_RW | F.PSE)
    pt.set_pte(cr3, SIZE_2M, pmd, SIZE_2M)
    assert pte_table not in pool.in_use
    assert list(pt.iter_present(cr3)) == [Leaf(SIZE_2M, SIZE_2M, pmd)]
    assert pt.table_pages == len(pool.in_use) == 3


def test_1g_leaf_over_a_pmd_table_frees_the_whole_subtree() -> None:
    pt, _, pool = make_tables()
    cr3 = pt.create()
    pt.set_pte(cr3, SIZE_1G + 0x5000, LAYOUT.make_pte(1, 0, USER_RW))
    pt.set_pte(cr3, SIZE_1G + SIZE_2M * 9, LAYOUT.make_pte(0x400, 0, USER_RW | F.PSE), SIZE_2M)
    assert len(pool.in_use) == 4  # PGD, PUD, PMD, PTE
    pud = LAYOUT.make_pte(1 << 18, 0, USER_RW | F.PSE)
    pt.set_pte(cr3, SIZE_1G, pud, SIZE_1G)
    assert len(pool.in_use) == 2
    found = pt.get_pte(cr3, SIZE_1G + 12345)
    assert found is not None
    assert (found.pte, found.level) == (pud, Level.PUD)


# -- costs -------------------------------------------------------------------------


def test_get_pte_costs_four_8_byte_loads() -> None:
    pt, mem, _ = make_tables()
    cr3 = pt.create()
    pt.set_pte(cr3, 0x1234_5000, LAYOUT.make_pte(1, 1, USER_RW))
    mem.reset_counts()
    pt.get_pte(cr3, 0x1234_5000)
    assert [n for _, n in mem.loads] == [8, 8, 8, 8]
    assert mem.stores == []


def test_set_pte_with_tables_present_costs_three_loads_and_one_store() -> None:
    pt, mem, _ = make_tables()
    cr3 = pt.create()
    pt.set_pte(cr3, 0x1234_5000, LAYOUT.make_pte(1, 1, USER_RW))
    mem.reset_counts()
    pt.set_pte(cr3, 0x1234_6000, LAYOUT.make_pte(2, 1, USER_RW))
    assert [n for _, n in mem.loads] == [8, 8, 8]
    assert [n for _, n in mem.stores] == [8]


def test_lookup_stops_at_the_first_empty_entry_and_says_where_it_lies() -> None:
    pt, _, _ = make_tables()
    cr3 = pt.create()
    pt.set_pte(cr3, 0x1234_5000, LAYOUT.make_pte(1, 1, USER_RW))
    mapped, empty_pte = pt.get_pte(cr3, 0x1234_5000), pt.lookup(cr3, 0x1234_6000)
    assert mapped is not None
    assert empty_pte == (0, SIZE_4K, mapped.entry_pa + 8)  # the next entry of its table
    empty_pud = pt.lookup(cr3, SIZE_1G * 5)
    assert (empty_pud.pte, empty_pud.size) == (0, SIZE_1G)


def test_pte_alloc_makes_the_missing_tables_and_set_pte_at_stores_without_a_walk() -> None:
    pt, mem, pool = make_tables()
    cr3 = pt.create()
    va, pte = SIZE_1G * 3 + 0x5000, LAYOUT.make_pte(7, 2, USER_RW)
    ptep = pt.pte_alloc(va, pt.lookup(cr3, va))
    assert len(pool.in_use) == 4  # PGD, PUD, PMD, PTE
    mem.reset_counts()
    pt.set_pte_at(ptep, pte)
    assert (mem.loads, [n for _, n in mem.stores]) == ([], [8])
    assert pt.get_pte(cr3, va) == (pte, SIZE_4K, ptep.entry_pa)


def test_pte_alloc_inside_a_huge_leaf_is_einval_and_allocates_nothing() -> None:
    pt, _, pool = make_tables()
    cr3 = pt.create()
    pt.set_pte(cr3, SIZE_2M, LAYOUT.make_pte(0x400, 0, USER_RW | F.PSE), SIZE_2M)
    tables = len(pool.in_use)
    with pytest.raises(SandboxError, match="inside a 2M leaf") as info:
        pt.pte_alloc(SIZE_2M + 0x3000, pt.lookup(cr3, SIZE_2M + 0x3000))
    assert info.value.errno == errno.EINVAL
    assert len(pool.in_use) == tables


def test_set_pte_at_refuses_reserved_bits_and_a_huge_leaf_without_pse() -> None:
    pt, _, _ = make_tables()
    cr3 = pt.create()
    ptep = pt.pte_alloc(SIZE_2M, pt.lookup(cr3, SIZE_2M), SIZE_2M)
    with pytest.raises(SandboxError, match="needs PSE"):
        pt.set_pte_at(ptep, LAYOUT.make_pte(0x400, 0, USER_RW))
    with pytest.raises(SandboxError, match="reserved"):
        pt.set_pte_at(ptep, LAYOUT.reserved_mask | int(F.PSE))


def test_scans_read_each_table_page_with_one_4k_load() -> None:
    pt, mem, pool = make_tables()
    cr3 = pt.create()
    for va in (0, 0x7000, SIZE_1G * 3, USER_END - SIZE_4K):
        pt.set_pte(cr3, va, LAYOUT.make_pte(9, 0, USER_RW))
    mem.reset_counts()
    assert len(list(pt.iter_present(cr3))) == 4
    assert sorted(mem.loads) == sorted((pa, 4096) for pa in pool.in_use)


# -- ranges -------------------------------------------------------------------------


def test_iter_present_yields_every_leaf_in_address_order() -> None:
    pt, _, _ = make_tables()
    cr3 = pt.create()
    entries = {
        0x7FFF_FFFF_F000: (SIZE_4K, LAYOUT.make_pte(1, 1, USER_RW)),
        0x40_0000: (SIZE_2M, LAYOUT.make_pte(0x400, 2, USER_RW | F.PSE)),
        0x1000: (SIZE_4K, LAYOUT.make_pte(3, 0, USER_RW)),
        SIZE_1G * 7: (SIZE_1G, LAYOUT.make_pte(1 << 18, 3, USER_RW | F.PSE)),
        0x8000: (SIZE_4K, LAYOUT.make_pte(4, 0, F.PROTNONE | F.ACCESSED)),  # PROT_NONE
    }
    for va, (size, pte) in entries.items():
        pt.set_pte(cr3, va, pte, size)
    assert list(pt.iter_present(cr3)) == [Leaf(va, *entries[va]) for va in sorted(entries)]
    assert [leaf.va for leaf in pt.iter_present(cr3, 0x2000, 0x40_1000)] == [0x8000, 0x40_0000]
    assert [leaf.va for leaf in pt.iter_present(cr3, 0x40_1000, 0x40_2000)] == [0x40_0000]
    assert list(pt.iter_present(cr3, 0x9000, 0x9000)) == []


def test_iter_spans_cover_the_range_with_holes_at_their_table_level() -> None:
    pt, _, _ = make_tables()
    cr3 = pt.create()
    pte = LAYOUT.make_pte(1, 1, USER_RW)
    pt.set_pte(cr3, 0x40_1000, pte)
    spans = list(pt.iter_spans(cr3, 0, 1 << 40))
    assert spans == [
        Span(0, 0x40_0000, Level.PMD, 0),
        Span(0x40_0000, 0x1000, Level.PTE, 0),
        Span(0x40_1000, 0x1000, Level.PTE, pte),
        Span(0x40_2000, 0x20_0000 - 0x2000, Level.PTE, 0),
        Span(0x60_0000, SIZE_1G - 0x60_0000, Level.PMD, 0),
        Span(SIZE_1G, (1 << 39) - SIZE_1G, Level.PUD, 0),
        Span(1 << 39, (1 << 40) - (1 << 39), Level.PGD, 0),
    ]


def test_free_empty_tables_frees_tables_left_empty_bottom_up() -> None:
    pt, _, pool = make_tables()
    cr3 = pt.create()
    keep = LAYOUT.make_pte(1, 0, USER_RW)
    pt.set_pte(cr3, 0x1000, keep)
    pt.set_pte(cr3, SIZE_1G * 5 + 0x3000, LAYOUT.make_pte(2, 0, USER_RW))
    pt.set_pte(cr3, SIZE_2M * 7, LAYOUT.make_pte(3, 0, USER_RW))
    assert len(pool.in_use) == 7  # PGD, PUD, 2 PMD, 3 PTE
    pt.clear_pte(cr3, SIZE_1G * 5 + 0x3000)
    pt.clear_pte(cr3, SIZE_2M * 7)
    assert pt.free_empty_tables(cr3, SIZE_2M * 7, SIZE_1G * 6) == 3  # PTE, PMD, PTE
    assert len(pool.in_use) == 4
    assert cr3 in pool.in_use
    assert list(pt.iter_present(cr3)) == [Leaf(0x1000, SIZE_4K, keep)]
    assert pt.walk(cr3, SIZE_1G * 5)[-1].entry == 0  # the PUD entry was cleared
    pt.clear_pte(cr3, 0x1000)
    assert pt.free_empty_tables(cr3) == 3
    assert pool.in_use == {cr3}


def test_destroy_frees_every_table() -> None:
    pt, _, pool = make_tables()
    cr3 = pt.create()
    other = pt.create()
    for va in (0, SIZE_1G * 2, USER_END - SIZE_4K):
        pt.set_pte(cr3, va, LAYOUT.make_pte(1, 0, USER_RW))
    assert sorted(pt.iter_tables(cr3)) == sorted(pool.in_use - {other})
    assert pt.destroy(cr3) == 9  # PGD; PUD, 2 PMD, 2 PTE; PUD, PMD, PTE
    assert pool.in_use == {other}
    assert pt.table_pages == 1


# -- forged tables: every scan meets each table once ---------------------------------


def _forged_tables(kind: str) -> tuple[PageTables, int, set[int]]:
    """One leaf at 0x1000, then one table linked twice, as a write through
    keyids/0/mem can do: a PMD entry pointing back up at the PUD table ("loop")
    or a second PGD entry pointing at the first one's PUD ("double link")."""
    pt, mem, pool = make_tables()
    cr3 = pt.create()
    pt.set_pte(cr3, 0x1000, LAYOUT.make_pte(1, 0, USER_RW))
    tables = set(pool.in_use)
    pgd0 = int.from_bytes(mem.load(cr3, 8), "little")
    pud = pgd0 & LAYOUT.pfn_mask
    if kind == "loop":
        pmd = int.from_bytes(mem.load(pud, 8), "little") & LAYOUT.pfn_mask
        mem.store(pmd + 8, (pud | int(PAGE_TABLE)).to_bytes(8, "little"))
    else:
        mem.store(cr3 + 8, pgd0.to_bytes(8, "little"))
    return pt, cr3, tables


_SCANS: dict[str, Callable[[PageTables, int], object]] = {
    "iter_present": lambda pt, cr3: list(pt.iter_present(cr3)),
    "leaf_arrays": lambda pt, cr3: pt.leaf_arrays(cr3),
    "iter_spans": lambda pt, cr3: list(pt.iter_spans(cr3)),
    "iter_tables": lambda pt, cr3: list(pt.iter_tables(cr3)),
    "iter_bad_pointers": lambda pt, cr3: list(pt.iter_bad_pointers(cr3)),
    "free_empty_tables": lambda pt, cr3: pt.free_empty_tables(cr3),
}


@pytest.mark.parametrize("kind", ["loop", "double link"])
@pytest.mark.parametrize("scan", list(_SCANS))
def test_a_scan_of_a_table_linked_twice_meets_it_once(kind: str, scan: str) -> None:
    pt, cr3, tables = _forged_tables(kind)
    _SCANS[scan](pt, cr3)
    assert [leaf.va for leaf in pt.iter_present(cr3)] == [0x1000]
    assert pt.leaf_arrays(cr3).va.tolist() == [0x1000]
    assert sorted(pt.iter_tables(cr3)) == sorted(tables)
    assert [s for s in pt.iter_spans(cr3) if s.pte] == [
        Span(0x1000, SIZE_4K, Level.PTE, LAYOUT.make_pte(1, 0, USER_RW))
    ]


@pytest.mark.parametrize("kind", ["loop", "double link"])
def test_destroy_frees_a_table_linked_twice_once(kind: str) -> None:
    pt, cr3, tables = _forged_tables(kind)
    assert pt.destroy(cr3) == len(tables)
    assert pt.table_pages == 0


# -- model-based ----------------------------------------------------------------

# Few distinct indices per level, so that operations collide: 4K entries inside
# 2M slots, 2M leaves over PTE tables.
_INDEX = st.sampled_from([0, 1, 511])
_PGD_INDEX = st.sampled_from([0, 1, 255])
_OP = st.tuples(
    st.sampled_from(["set4k", "set2m", "clear4k", "clear2m", "prune"]),
    _PGD_INDEX,
    _INDEX,
    _INDEX,
    _INDEX,
    st.integers(0, 63),
)


def _va(pgd: int, pud: int, pmd: int, pte: int) -> int:
    return pgd << 39 | pud << 30 | pmd << 21 | pte << 12


Op = tuple[str, int, int, int, int, int]


class Model:
    """What the tables should hold: leaves by address, and the 2M slots that have a PTE table."""

    def __init__(self) -> None:
        self.leaves: dict[int, tuple[int, int]] = {}
        self.pte_tables: set[int] = set()

    def expected(self) -> list[Leaf]:
        return [Leaf(va, *self.leaves[va]) for va in sorted(self.leaves)]

    def has_4k_in(self, va2m: int) -> bool:
        return any(
            va2m <= va < va2m + SIZE_2M and size == SIZE_4K for va, (size, _) in self.leaves.items()
        )


def _apply(pt: PageTables, cr3: int, model: Model, op: Op) -> None:
    kind, pgd, pud, pmd, ptei, keyid = op
    va4k, va2m = _va(pgd, pud, pmd, ptei), _va(pgd, pud, pmd, 0)
    leaves = model.leaves
    in_2m = leaves.get(va2m, (0, 0))[0] == SIZE_2M
    if kind in ("set4k", "clear4k") and in_2m:
        with pytest.raises(SandboxError, match="inside a 2M leaf"):
            pt.set_pte(cr3, va4k, 0) if kind == "set4k" else pt.clear_pte(cr3, va4k)
    elif kind == "set4k":
        pte = LAYOUT.make_pte(ptei + 7, keyid, USER_RW)
        pt.set_pte(cr3, va4k, pte)
        leaves[va4k] = (SIZE_4K, pte)
        model.pte_tables.add(va2m)
    elif kind == "set2m":
        pte = LAYOUT.make_pte(0x200 * (pmd + 1), keyid, USER_RW | F.PSE)
        pt.set_pte(cr3, va2m, pte, SIZE_2M)
        for va in [va for va in leaves if va2m <= va < va2m + SIZE_2M]:
            del leaves[va]
        leaves[va2m] = (SIZE_2M, pte)
        model.pte_tables.discard(va2m)
    elif kind == "clear4k":
        assert pt.clear_pte(cr3, va4k) == leaves.pop(va4k, (0, 0))[1]
    elif kind == "clear2m" and va2m in model.pte_tables:
        with pytest.raises(SandboxError, match="maps a table"):
            pt.clear_pte(cr3, va2m, SIZE_2M)
    elif kind == "clear2m":
        assert pt.clear_pte(cr3, va2m, SIZE_2M) == leaves.pop(va2m, (0, 0))[1]
    else:
        start = _va(pgd, 0, 0, 0)
        pt.free_empty_tables(cr3, start, start + (1 << 39))
        gone = {t for t in model.pte_tables if t >> 39 == pgd and not model.has_4k_in(t)}
        model.pte_tables -= gone


@settings(max_examples=60, deadline=None)
@given(st.lists(_OP, min_size=1, max_size=30))
def test_set_get_clear_agree_with_a_dict_model(ops: list[Op]) -> None:
    pt, _, pool = make_tables()
    cr3 = pt.create()
    model = Model()
    for op in ops:
        _apply(pt, cr3, model, op)
        assert list(pt.iter_present(cr3)) == model.expected()
    for va, (size, pte) in model.leaves.items():
        found = pt.get_pte(cr3, va + size - SIZE_4K)
        assert found is not None
        assert (found.pte, found.size) == (pte, size)
    assert sorted(pt.iter_tables(cr3)) == sorted(pool.in_use)  # no table leaked
    pt.free_empty_tables(cr3)
    assert list(pt.iter_present(cr3)) == model.expected()
    pt.destroy(cr3)
    assert pool.in_use == set()
    assert pt.table_pages == 0
