"""struct page through its accessors (kernel/page.py): a compound page is counted
at its head, a freed page is a fresh free page, the zero page is never counted,
and copy-on-write asks the page's kind and count."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest

from kernel_helpers import HPAGE, U, ctl, machine, pfn_of, space, two_keys, vmstat
from mktme_sandbox import Machine
from mktme_sandbox.kernel.page import PG
from mktme_sandbox.kernel.pgtable_types import HPAGE_NR

# --- compound pages are counted at their head ---------------------------------------


@pytest.fixture
def huge() -> tuple[Machine, int]:
    """A machine and the head PFN of one 2M compound page, not mapped yet."""
    m = machine()
    head = m.kernel.alloc.alloc_huge_page(0)
    assert head is not None
    return m, head


@pytest.mark.parametrize("offset", [0, 1, HPAGE_NR // 2, HPAGE_NR - 1])
def test_every_page_of_a_compound_page_has_its_head_as_compound_head(
    huge: tuple[Machine, int], offset: int
) -> None:
    m, head = huge
    assert m.kernel.pages.compound_head(head + offset) == head


@pytest.mark.parametrize("offset", [1, HPAGE_NR - 1])
def test_mappings_of_a_tail_count_at_the_head_and_the_last_put_frees_the_whole_page(
    huge: tuple[Machine, int], offset: int
) -> None:
    m, head = huge
    pages = m.kernel.pages
    pages.get_page(head)
    pages.get_page(head + offset)
    assert (pages.page_mapcount(head), pages.page_mapcount(head + offset)) == (2, 0)
    assert pages.page_mapped(head + offset)
    pages.put_page(head + offset)
    pages.put_page(head)
    assert all(m.kernel.alloc.is_free(head + i) for i in range(HPAGE_NR))


def test_the_zero_page_is_never_counted_nor_freed() -> None:
    m = machine()
    pages, zero = m.kernel.pages, m.kernel.zero_pfn
    pages.get_page(zero)
    pages.put_page(zero)
    pages.put_page(zero)
    assert pages.page_mapcount(zero) == 0
    assert not m.kernel.alloc.is_free(zero)


# --- a freed page is a fresh free page ----------------------------------------------


@pytest.mark.parametrize("mappings", [0, 1, 3])
@pytest.mark.parametrize("huge_page", [False, True], ids=["4K", "2M"])
def test_a_freed_page_is_marked_free_and_mapped_nowhere_whatever_it_was(
    mappings: int, huge_page: bool
) -> None:
    k = machine().kernel
    pfn = k.alloc.alloc_huge_page(1) if huge_page else k.alloc.alloc_page(1, PG.ANON | PG.KSM)
    assert pfn is not None
    for _ in range(mappings):
        k.pages.get_page(pfn)
    k.alloc.free_page(pfn)
    nr = HPAGE_NR if huge_page else 1
    assert set(k.pages.flags_of(pfn, pfn + nr).tolist()) == {int(PG.BUDDY)}
    assert set(k.pages.mapcounts_of(pfn, pfn + nr).tolist()) == {0}


# --- copy-on-write asks the page's kind and count -------------------------------------


def _exclusive_anon_page() -> tuple[Machine, str]:
    m, a = two_keys()
    ctl(m, a, f"mmap {U:#x} 4K rw- keyid=1 populate")
    return m, a


def _zero_page() -> tuple[Machine, str]:
    m, a = two_keys()
    ctl(m, a, f"mmap {U:#x} 4K rw-")
    m.read_virt(a, U, 1)  # a read fault maps the zero page (KeyID 0)
    return m, a


def _ksm_page(sharers_left: int) -> Callable[[], tuple[Machine, str]]:
    def scene() -> tuple[Machine, str]:
        m, a = two_keys()
        b = space(m, "b")
        for name in (a, b):
            ctl(m, name, f"mmap {U:#x} 4K rw- keyid=1")
            m.write_virt(name, U, b"same")
            ctl(m, name, f"madvise {U:#x} 4K mergeable")
        assert m.ksm_run() == 1
        if sharers_left == 1:
            ctl(m, b, f"munmap {U:#x} 4K")  # the KSM page stays, mapped once
        return m, a

    return scene


@pytest.mark.parametrize(
    ("scene", "copied"),
    [
        (_exclusive_anon_page, False),
        (_zero_page, True),
        (_ksm_page(sharers_left=2), True),
        (_ksm_page(sharers_left=1), True),
    ],
    ids=["exclusive anon page: reused", "zero page", "KSM page, two sharers", "KSM page, one"],
)
def test_a_write_copies_every_page_but_an_exclusive_anonymous_one(
    scene: Callable[[], tuple[Machine, str]], copied: bool
) -> None:
    """do_wp_page(): the zero page and KSM pages are always copied (Linux
    never writes into a KSM page, however few map it); an anonymous page
    mapped once is reused in place."""
    m, a = scene()
    before, faults = pfn_of(m, a, U), vmstat(m).get("mktme_cow_fault", 0)
    m.write_virt(a, U, b"mine")
    assert (pfn_of(m, a, U) != before) is copied
    assert vmstat(m).get("mktme_cow_fault", 0) - faults == int(copied)
    assert m.read_virt(a, U, 4) == b"mine"
    assert m.check() == []


def _huge_page() -> tuple[Machine, str]:
    m, a = two_keys()
    ctl(m, a, f"mmap {U:#x} 2M rw- keyid=1 populate")
    ctl(m, a, f"madvise {U:#x} 2M hugepage")
    assert m.khugepaged_scan() == 1
    return m, a


@pytest.mark.parametrize(
    ("scene", "exclusive"),
    [
        (_exclusive_anon_page, True),
        (_zero_page, False),
        (_ksm_page(sharers_left=2), False),
        (_ksm_page(sharers_left=1), True),
        (_huge_page, True),
    ],
    ids=["anon page mapped once", "zero page", "KSM page, two sharers", "KSM page, one", "THP"],
)
def test_pagemap_calls_exclusive_exactly_the_pages_mapped_once(
    scene: Callable[[], tuple[Machine, str]], exclusive: bool
) -> None:
    """PM_MMAP_EXCLUSIVE (bit 56): page_mapcount() == 1, the zero page never."""
    m, a = scene()
    for addr in (U, U + HPAGE - 4096) if scene is _huge_page else (U,):
        (entry,) = struct.unpack("<Q", m.pagemap(a, (addr >> 12) * 8, 8))
        assert entry >> 63
        assert bool(entry >> 56 & 1) is exclusive
