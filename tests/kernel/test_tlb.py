"""The TLB: per-address-space translations that stay stale until flushed."""

from __future__ import annotations

import pytest

from mktme_sandbox.kernel.pgtable_types import SIZE_2M, PteFlags, PteLayout
from mktme_sandbox.kernel.tlb import Tlb, TlbEntry, TlbStats, tlb_entry

LAYOUT = PteLayout(46, 6)
RW = PteFlags.PRESENT | PteFlags.RW | PteFlags.USER


def test_a_miss_then_a_hit_after_insert() -> None:
    tlb = Tlb()
    assert tlb.lookup(1, 0x400) is None
    tlb.insert(1, 0x400, TlbEntry(0x99, 3, 0x99003))
    assert tlb.lookup(1, 0x400) == TlbEntry(0x99, 3, 0x99003)
    assert (tlb.stats.hits, tlb.stats.misses) == (1, 1)


def test_translations_are_separate_per_address_space() -> None:
    tlb = Tlb()
    tlb.insert(1, 0x400, TlbEntry(0x99, 3, 0x99003))
    assert tlb.lookup(2, 0x400) is None


def test_stale_translation_is_served_until_flushed() -> None:
    tlb = Tlb()
    pte = LAYOUT.make_pte(0x10, 3, RW)
    tlb.insert(1, 0x400, tlb_entry(LAYOUT, pte, 4096, 0x400))
    # The PTE changes in memory (say encrypt_mprotect moved the page to KeyID 5):
    # the TLB does not know and keeps answering with KeyID 3.
    assert tlb.lookup(1, 0x400) == TlbEntry(0x10, 3, pte)
    assert tlb.flush_range(1, 0x400 << 12, 0x401 << 12) == 1
    assert tlb.lookup(1, 0x400) is None


def test_flush_range_drops_exactly_the_pages_of_the_range() -> None:
    tlb = Tlb()
    for vpn in range(10):
        tlb.insert(1, vpn, TlbEntry(vpn, 0, vpn << 12))
        tlb.insert(2, vpn, TlbEntry(vpn, 0, vpn << 12))
    assert tlb.flush_range(1, 0x2000, 0x4800) == 3  # pages 2, 3, 4 (end rounded up)
    assert [v for v in range(10) if tlb.lookup(1, v)] == [0, 1, 5, 6, 7, 8, 9]
    assert tlb.flush_range(2, 0, 1 << 47) == 10  # a big range takes the scanning path
    assert len(tlb) == 7


def test_flush_all_drops_one_space_and_flush_everything_all() -> None:
    tlb = Tlb()
    for asid in (1, 2):
        for vpn in range(3):
            tlb.insert(asid, vpn, TlbEntry(vpn, asid, vpn << 12))
    assert tlb.flush_all(1) == 3
    assert len(tlb) == 3
    assert tlb.lookup(2, 0) is not None
    assert tlb.flush_everything() == 3
    assert len(tlb) == 0
    assert tlb.stats == TlbStats(
        hits=1, misses=0, flushes=2, entries_flushed=6, evictions=0, entries=0
    )


def test_capacity_evicts_the_oldest_translation() -> None:
    tlb = Tlb(capacity=2)
    for vpn in range(3):
        tlb.insert(1, vpn, TlbEntry(vpn, 0, vpn << 12))
    assert tlb.lookup(1, 0) is None
    assert tlb.lookup(1, 2) is not None
    assert tlb.stats.evictions == 1
    tlb.insert(1, 2, TlbEntry(7, 0, 7 << 12))  # replacing an entry evicts nothing
    assert tlb.stats.evictions == 1
    with pytest.raises(ValueError, match="capacity"):
        Tlb(capacity=0)


def test_tlb_entry_of_a_2m_leaf_is_the_4k_frame_of_that_page() -> None:
    pmd = LAYOUT.make_pte(0x200, 7, PteFlags.PRESENT | PteFlags.USER | PteFlags.PSE)
    entry = tlb_entry(LAYOUT, pmd, SIZE_2M, (SIZE_2M >> 12) + 5)
    assert entry == TlbEntry(0x205, 7, pmd)
