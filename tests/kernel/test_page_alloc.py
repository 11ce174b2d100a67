"""The page allocator: page_ext KeyIDs, v5 flushes on every encrypted alloc
and free, the per-KeyID free pools that avoid them, KeyID 0 never flushing."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from kernel_helpers import U, ctl, pfn_of, vmstat
from mktme_sandbox import Machine
from mktme_sandbox.kernel.page_alloc import PageAllocator
from mktme_sandbox.kernel.vmstat import VmStat


def churn(m: Machine, keyid: int, rounds: int = 5, pages: int = 8) -> dict[str, int]:
    """Map, touch and unmap the same range ``rounds`` times; return vmstat deltas."""
    before = vmstat(m)
    for _ in range(rounds):
        ctl(m, "a", f"mmap {U:#x} {pages * 4096} rw- keyid={keyid} populate")
        ctl(m, "a", f"munmap {U:#x} {pages * 4096}")
    after = vmstat(m)
    return {k: after[k] - before[k] for k in after}


@pytest.fixture
def m(m: Machine) -> Machine:
    ctl(m, "a", f"mmap {U + (4 << 20):#x} 4K rw- populate")  # keeps page tables alive
    return m


def test_without_pools_every_encrypted_alloc_and_free_flushes(m: Machine) -> None:
    d = churn(m, 1)
    assert d["mktme_pgalloc_encrypted"] == 40
    assert d["mktme_prep_encrypted_flush"] == 40
    assert d["mktme_arch_free_page_flush"] == 40
    assert d["mktme_flush_avoided_pool"] == 0


def test_with_pools_a_page_reused_by_its_keyid_is_not_flushed(m: Machine) -> None:
    m.keyid_free_pools = True
    d = churn(m, 1)
    assert d["mktme_arch_free_page_flush"] == 0
    assert d["mktme_prep_encrypted_flush"] == 8  # only the first round takes KeyID-0 pages
    assert d["mktme_flush_avoided_pool"] == 32


def test_with_pools_a_page_changes_keyid_only_through_a_flush(m: Machine) -> None:
    m.keyid_free_pools = True
    churn(m, 1, rounds=1)
    d = churn(m, 2, rounds=1)
    assert d["mktme_keyid_pool_flush"] + d["mktme_prep_encrypted_flush"] == 8
    assert m.check() == []


def test_keyid0_allocations_never_flush_whatever_the_setting(m: Machine) -> None:
    for pools in (False, True):
        m.keyid_free_pools = pools
        d = churn(m, 0)
        assert (
            d["mktme_prep_encrypted_flush"]
            == d["mktme_arch_free_page_flush"]
            == d["mktme_keyid_pool_flush"]
            == 0
        )


def test_free_pages_keep_their_keyid_in_a_pool_and_show_in_free_pools(m: Machine) -> None:
    m.keyid_free_pools = True
    churn(m, 2, rounds=1)
    assert "keyid=2 free=8" in m.free_pools()
    m.keyid_free_pools = False  # drains through flushes
    assert "keyid=2" not in m.free_pools()
    assert m.check() == []


def test_page_ext_keyid_follows_the_page(m: Machine) -> None:
    ctl(m, "a", f"mmap {U:#x} 4K rw- keyid=2 populate")
    pfn = pfn_of(m, "a", U)
    assert m.kernel.pages.page_keyid(pfn) == 2
    ctl(m, "a", f"munmap {U:#x} 4K")
    assert m.kernel.pages.page_keyid(pfn) == 0  # arch_free_page reset it (v5)


@dataclass
class RecordingMemory:
    """The allocator's view of the platform, recording every zeroing and flush
    as (physical address, bytes, KeyID)."""

    fills: list[tuple[int, int, int]] = field(default_factory=list)
    flushes: list[tuple[int, int, int]] = field(default_factory=list)

    def fill(self, pa: int, length: int, byte: int, keyid: int = 0) -> None:
        self.fills.append((pa, length, keyid))

    def flush_range(self, pa: int, length: int, keyid: int) -> int:
        self.flushes.append((pa, length, keyid))
        return length // 64


def allocator(pages: int, pools: bool) -> tuple[PageAllocator, RecordingMemory]:
    """An allocator of ``pages`` pages over a recording memory, flushes on."""
    mem = RecordingMemory()
    alloc = PageAllocator(mem, pages * 4096, VmStat(), {"flush_on_keyid_change": True})
    alloc.set_keyid_free_pools(pools)
    return alloc, mem


@pytest.mark.parametrize("new_keyid", [2, 0])
def test_a_page_leaving_a_keyids_pool_is_flushed_through_that_keyid_first(new_keyid: int) -> None:
    """prep_encrypted_page() (v5, "x86/mm: Implement prep_encrypted_page() and
    arch_free_page()"): a page allocated for a KeyID other than the one it last
    had is flushed for the old KeyID, then takes the new one and is zeroed
    through it; docs/spec.md 3.2: with pools "a page changes pool only through
    a flush", a move to KeyID 0 included."""
    alloc, mem = allocator(pages=1, pools=True)
    pfn = alloc.alloc_page(1)
    alloc.free_page(pfn)
    mem.flushes.clear()
    assert alloc.alloc_page(new_keyid) == pfn  # the only page: KeyID 1's pool gives it
    assert mem.flushes == [(pfn * 4096, 4096, 1)]
    assert mem.fills[-1] == (pfn * 4096, 4096, new_keyid)
    assert alloc.pages.page_keyid(pfn) == new_keyid


def test_a_freed_2m_page_is_flushed_whole_through_its_keyid_and_returns_to_keyid0() -> None:
    """arch_free_page() (v5): "flush the cache for the encrypted page" over all
    ``1 << order`` pages through the page's KeyID mapping, then page_ext of every
    one of them goes back to KeyID 0 (docs/spec.md 3.2: "a freed encrypted page is
    flushed and reset to KeyID 0")."""
    alloc, mem = allocator(pages=512, pools=False)
    head = alloc.alloc_huge_page(1)
    assert head == 0
    assert alloc.pages.keyids_of(0, 512).tolist() == [1] * 512
    mem.flushes.clear()
    alloc.free_page(head)
    assert mem.flushes == [(0, 2 << 20, 1)]
    assert alloc.pages.keyids_of(0, 512).tolist() == [0] * 512


def test_switching_pools_off_flushes_every_pooled_page_through_its_keyid() -> None:
    """docs/spec.md 3.2: "a page changes pool only through a flush"; turning
    ``keyid_free_pools`` off puts the pooled pages back on KeyID 0's list, each
    flushed through its KeyID first (its lines may still be dirty there)."""
    alloc, mem = allocator(pages=2, pools=True)
    pfns = [alloc.alloc_page(1), alloc.alloc_page(2)]
    for pfn in pfns:
        alloc.free_page(pfn)
    mem.flushes.clear()
    alloc.set_keyid_free_pools(False)
    assert sorted(mem.flushes) == sorted([(pfns[0] * 4096, 4096, 1), (pfns[1] * 4096, 4096, 2)])
    assert alloc.pages.keyids_of().tolist() == [0, 0]
    assert alloc.free_pages_by_keyid() == {0: 2}


@pytest.mark.parametrize(("policy", "stolen_from"), [("fullest", 2), ("coldest", 1)])
def test_an_allocation_with_its_pool_and_keyid0s_empty_steals_by_the_pool_steal_policy(
    policy: str, stolen_from: int
) -> None:
    """docs/kbuild.md: pools take "from the fullest pool" when a KeyID's own
    and KeyID 0's are empty, or with ``pool_steal = "coldest"`` "from the
    KeyID which allocated least recently". KeyID 1 allocated first and holds
    one free page, KeyID 2 allocated last and holds two."""
    alloc, mem = allocator(pages=3, pools=True)
    alloc.pool_steal = policy
    pfns = [alloc.alloc_page(1), alloc.alloc_page(2), alloc.alloc_page(2)]
    for pfn in pfns:
        alloc.free_page(pfn)
    mem.flushes.clear()
    pfn = alloc.alloc_page(3)
    assert mem.flushes == [(pfn * 4096, 4096, stolen_from)]
    assert alloc.pages.page_keyid(pfn) == 3


def test_a_free_2m_block_of_mixed_keyids_is_not_reused_as_one_huge_page() -> None:
    """``alloc_huge_page`` reuses "a wholly free block of one KeyID" (module
    docstring of kernel/page_alloc.py): prep_encrypted_page() flushes the
    block for one old KeyID, so a block whose pages last had different KeyIDs
    would keep the others' dirty lines; such a block is left, and the 2M page
    comes from never-used memory."""
    alloc, mem = allocator(pages=1024, pools=True)
    pfns = [alloc.alloc_page(1 + pfn % 2) for pfn in range(512)]
    for pfn in pfns:
        alloc.free_page(pfn)
    mem.flushes.clear()
    assert alloc.alloc_huge_page(3) == 512
    assert mem.flushes == [(512 * 4096, 2 << 20, 0)]


def test_a_free_2m_block_of_one_keyid_is_reused_after_a_flush_through_that_keyid() -> None:
    """prep_encrypted_page() for an order-9 page: the whole block is flushed
    for the KeyID its pages last had before it takes the new one."""
    alloc, mem = allocator(pages=1024, pools=True)
    head = alloc.alloc_huge_page(1)
    assert head == 0
    alloc.free_page(head)
    mem.flushes.clear()
    assert alloc.alloc_huge_page(2) == 0
    assert mem.flushes == [(0, 2 << 20, 1)]


def test_compaction_takes_a_free_page_after_a_flush_through_its_last_keyid() -> None:
    """compaction_alloc() hands out a free page as any allocation: a page
    that last had KeyID 1 is flushed through KeyID 1 before it takes the
    migrated page's KeyID (docs/spec.md 3.2, prep_encrypted_page)."""
    alloc, mem = allocator(pages=2, pools=True)
    pfn = alloc.alloc_page(1)
    alloc.free_page(pfn)
    mem.flushes.clear()
    alloc.alloc_page_at(pfn, 2)
    assert mem.flushes == [(pfn * 4096, 4096, 1)]
    assert alloc.pages.page_keyid(pfn) == 2
