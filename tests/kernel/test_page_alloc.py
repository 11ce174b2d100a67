"""The page allocator: page_ext KeyIDs, v5 flushes on every encrypted alloc
and free, the per-KeyID free pools that avoid them, KeyID 0 never flushing."""

from __future__ import annotations

import pytest

from kernel_helpers import U, ctl, pfn_of, vmstat
from mktme_sandbox import Machine


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
