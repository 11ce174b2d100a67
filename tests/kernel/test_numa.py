"""NUMA nodes, mbind and numa_maps (kernel/migrate.py, kernel/proc.py)."""

from __future__ import annotations

import errno

import pytest

from kernel_helpers import HPAGE, PAGE, U, ctl, machine, pfn_of, space, two_keys, vmstat
from mktme_sandbox import Machine
from mktme_sandbox.errors import SandboxError


def test_numa_nodes_split_memory_into_equal_ranges_of_2m_blocks() -> None:
    m = machine(phys_mem="16M", numa_nodes=2)
    assert m.kernel.alloc.node_span(0) == (0, 2048)
    assert m.kernel.alloc.node_span(1) == (2048, 4096)


def test_numa_maps_has_linux_format() -> None:
    """fs/proc/task_mmu.c show_numa_map(): address, policy, anon=, dirty=,
    N<node>=, kernelpagesize_kB=."""
    m = machine(phys_mem="16M", numa_nodes=2)
    a = space(m)
    ctl(m, a, f"mmap {U:#x} 16K rw-")
    m.write_virt(a, U, b"x" * (2 * PAGE))
    assert m.numa_maps(a) == "10000000 default anon=2 dirty=2 N0=2 kernelpagesize_kB=4\n"


def test_mbind_binds_later_faults_to_the_nodes_and_splits_the_vma() -> None:
    """mm/mempolicy.c mbind_range(): the range's VMAs get the policy; faults
    allocate from its nodes."""
    m = machine(phys_mem="16M", numa_nodes=2)
    a = space(m)
    ctl(m, a, f"mmap {U:#x} 16K rw-")
    ctl(m, a, f"mbind {U + 2 * PAGE:#x} 8K 1")
    m.write_virt(a, U, b"x" * (4 * PAGE))
    assert m.kernel.alloc.pfn_to_nid(pfn_of(m, a, U)) == 0
    assert m.kernel.alloc.pfn_to_nid(pfn_of(m, a, U + 3 * PAGE)) == 1
    assert m.numa_maps(a).splitlines()[1].startswith("10002000 bind:1 anon=2")
    ctl(m, a, f"mbind {U:#x} 8K 1")
    assert len(m.maps(a).splitlines()) == 1  # equal policies merge again


@pytest.mark.parametrize("keyid", [0, 1])
def test_a_thp_fault_in_a_bound_vma_takes_its_2m_page_from_the_bound_node(keyid: int) -> None:
    """mm/mempolicy.c (4.19) alloc_pages_vma(), which alloc_hugepage_vma()
    calls with ``hugepage`` true: ``nmask = policy_nodemask(gfp, pol);
    preferred_nid = policy_node(gfp, pol, node); page =
    __alloc_pages_nodemask(gfp, order, preferred_nid, nmask)`` - an
    MPOL_BIND policy binds a 2 MiB page as it binds a 4 KiB one."""
    m, a = two_keys(phys_mem="32M", numa_nodes=2)
    ctl(m, a, f"mmap {U:#x} 4M rw- keyid={keyid}")
    ctl(m, a, f"madvise {U:#x} 4M hugepage")
    ctl(m, a, f"mbind {U:#x} 4M 1")
    m.write_virt(a, U + 5 * PAGE, b"x")
    assert vmstat(m)["thp_fault_alloc"] == 1
    head = pfn_of(m, a, U)
    assert head % 512 == 0
    assert m.kernel.alloc.pfn_to_nid(head) == 1
    assert " N1=512 " in m.numa_maps(a)
    ctl(m, a, f"munmap {U:#x} 2M")  # the 2M page goes back free, on node 1
    m.write_virt(a, U + HPAGE + PAGE, b"y")  # the next THP: node 1 again
    assert m.kernel.alloc.pfn_to_nid(pfn_of(m, a, U + HPAGE)) == 1
    assert m.check() == []


def test_mbind_never_merges_neighbours_of_different_keyids() -> None:
    """Patch 01 in mbind_range(): vma_merge() is given the VMA's KeyID."""
    m, a = two_keys(phys_mem="16M", numa_nodes=2)
    ctl(m, a, f"mmap {U:#x} 4K rw- keyid=1")
    ctl(m, a, f"mmap {U + PAGE:#x} 4K rw- keyid=2")
    ctl(m, a, f"mbind {U:#x} 8K 0")
    assert len(m.maps(a).splitlines()) == 2
    assert vmstat(m)["mktme_vma_merge_refused_keyid"] >= 1


@pytest.mark.parametrize(
    ("command", "err"),
    [("mbind {U:#x} 4K 2", errno.ENODEV), ("migrate {U:#x} 4K 5", errno.ENODEV),
     ("migrate {U:#x} 64K 1", errno.ENOMEM), ("mbind {U:#x} 4K x", errno.EINVAL),
     # a range is checked before it is made: no list of 10^20 node numbers
     ("mbind {U:#x} 4K 0-99999999999999999999", errno.ENODEV),
     ("mbind {U:#x} 4K 0-1,1-999999999", errno.ENODEV)],
)  # fmt: skip
def test_bad_nodes_and_holes_are_refused_changing_nothing(command: str, err: int) -> None:
    m = machine(phys_mem="16M", numa_nodes=2)
    a = space(m)
    ctl(m, a, f"mmap {U:#x} 4K rw-")
    maps = m.maps(a)
    with pytest.raises(SandboxError) as caught:
        ctl(m, a, command.format(U=U))
    assert caught.value.errno == err
    assert m.maps(a) == maps


def node_free(m: Machine, nid: int) -> int:
    lo, hi = m.kernel.alloc.node_span(nid)
    return int(m.kernel.alloc.free_mask(lo, hi).sum())


def test_migrate_of_one_page_more_than_the_node_has_free_is_refused_whole() -> None:
    """docs/spec.md 7: "physical memory exhausted ... ENOMEM", nothing
    half-applied: do_move_pages() here counts the target node's free pages
    before it moves any, so as many pages as it has free move, one more is
    refused before the first."""
    m = machine(phys_mem="4M", numa_nodes=2)
    a = space(m)
    ctl(m, a, f"mmap {U:#x} 1M rw- populate")  # node 0
    ctl(m, a, f"mmap {U + (2 << 20):#x} 2M rw-")
    ctl(m, a, f"mbind {U + (2 << 20):#x} 2M 1")
    va = U + (2 << 20)
    while node_free(m, 1) > 200:
        m.write_virt(a, va, b"y")
        va += PAGE
    free = node_free(m, 1)
    with pytest.raises(SandboxError) as caught:
        ctl(m, a, f"migrate {U:#x} {(free + 1) * PAGE} 1")
    assert caught.value.errno == errno.ENOMEM
    assert vmstat(m)["pgmigrate_success"] == 0
    ctl(m, a, f"migrate {U:#x} {free * PAGE} 1")
    assert vmstat(m)["pgmigrate_success"] == free
    assert node_free(m, 1) == 0
    assert m.check() == []


def test_migrate_to_a_full_node_is_refused_whole() -> None:
    m = machine(phys_mem="4M", numa_nodes=2)
    a = space(m)
    ctl(m, a, f"mmap {U:#x} 1M rw- populate")
    ctl(m, a, f"mmap {U + (2 << 20):#x} 2M rw-")
    ctl(m, a, f"mbind {U + (2 << 20):#x} 2M 1")
    m.write_virt(a, U + (2 << 20), b"y" * (300 * PAGE))
    with pytest.raises(SandboxError) as caught:
        ctl(m, a, f"migrate {U:#x} 1M 1")
    assert caught.value.errno == errno.ENOMEM
    assert vmstat(m)["pgmigrate_success"] == 0
    assert m.check() == []


@pytest.mark.parametrize("command", ["mbind {U:#x} 0 0", "migrate {U:#x} 0 1", "mbind {H:#x} 0 1"])
def test_an_aligned_zero_length_mbind_or_migrate_succeeds_doing_nothing(command: str) -> None:
    """mm/mempolicy.c do_mbind(): "if (end == start) return 0"; move_pages() of
    no page moves nothing. Even where nothing is mapped."""
    m = machine(phys_mem="16M", numa_nodes=2)
    a = space(m)
    ctl(m, a, f"mmap {U:#x} 4K rw- populate")
    maps, numa = m.maps(a), m.numa_maps(a)
    ctl(m, a, command.format(U=U, H=U + (1 << 20)))
    assert (m.maps(a), m.numa_maps(a)) == (maps, numa)
    assert vmstat(m)["pgmigrate_success"] == 0


@pytest.mark.parametrize(
    ("command", "err"),
    [("mbind {U:#x} 0 1-0", errno.EINVAL), ("mbind {U:#x} 0 2", errno.ENODEV),
     ("migrate {U:#x} 0 2", errno.ENODEV), ("mbind {A:#x} 0 0", errno.EINVAL),
     ("migrate {A:#x} 0 0", errno.EINVAL)],
)  # fmt: skip
def test_a_zero_length_still_checks_the_address_and_the_nodes(command: str, err: int) -> None:
    m = machine(phys_mem="16M", numa_nodes=2)
    a = space(m)
    ctl(m, a, f"mmap {U:#x} 4K rw-")
    with pytest.raises(SandboxError) as caught:
        ctl(m, a, command.format(U=U, A=U + 1))
    assert caught.value.errno == err


def test_mbind_to_a_reversed_nodelist_is_refused_keeping_the_policy() -> None:
    """A range N-M with M < N is no nodelist (lib/bitmap.c bitmap_parselist())."""
    m = machine(phys_mem="16M", numa_nodes=2)
    a = space(m)
    ctl(m, a, f"mmap {U:#x} 512K rw-")
    ctl(m, a, f"mbind {U:#x} 512K 1")
    with pytest.raises(SandboxError) as caught:
        ctl(m, a, f"mbind {U:#x} 512K 1-0")
    assert caught.value.errno == errno.EINVAL
    assert m.numa_maps(a) == "10000000 bind:1\n"


def test_a_migrated_page_stays_charged_to_its_owner() -> None:
    """mm/migrate.c migrate_page_move_mapping() -> mem_cgroup_migrate(old,
    new): the new page is charged to whom the old one was, and the old one's
    charge goes with it (docs/spec.md 8, ``max_pages_per_uid``)."""
    m = machine(phys_mem="16M", numa_nodes=2)
    space(m, "u", uid=1000)
    ctl(m, "u", f"mmap {U:#x} 16K rw-", uid=1000)
    m.write_virt("u", U, b"x" * (4 * PAGE), uid=1000)
    held = m.kernel.alloc.pages_by_uid[1000]
    ctl(m, "u", f"migrate {U:#x} 16K 1", uid=1000)
    assert m.kernel.alloc.pfn_to_nid(pfn_of(m, "u", U)) == 1
    assert m.kernel.alloc.pages_by_uid[1000] == held
    assert m.kernel.alloc.charged_uid(pfn_of(m, "u", U)) == 1000


def test_a_node_bound_allocation_never_takes_the_first_page_of_the_next_node() -> None:
    """mm/page_alloc.c: an ``MPOL_BIND`` allocation takes pages of the bound
    nodes' zones only; a node's PFNs are ``[node_start, node_start + span)``,
    so the first PFN of node 1, free and last on the free list, is not node 0's."""
    m = machine(phys_mem="16M", numa_nodes=2)
    a = space(m)
    ctl(m, a, f"mmap {U:#x} 8K rw-")
    ctl(m, a, f"mbind {U:#x} 4K 1")
    m.write_virt(a, U, b"x")
    first_of_node_1 = m.kernel.alloc.node_span(1)[0]
    assert pfn_of(m, a, U) == first_of_node_1
    ctl(m, a, f"munmap {U:#x} 4K")  # back on the free list, last
    ctl(m, a, f"mbind {U + PAGE:#x} 4K 0")
    m.write_virt(a, U + PAGE, b"x")
    assert m.kernel.alloc.pfn_to_nid(pfn_of(m, a, U + PAGE)) == 0


def first_refusal(m: Machine, name: str, start: int, end: int) -> SandboxError:
    """Write a byte to each page of ``[start, end)`` until one is refused."""
    for va in range(start, end, PAGE):
        try:
            m.write_virt(name, va, b"x")
        except SandboxError as err:
            return err
    raise AssertionError(f"every page of {start:#x}-{end:#x} was written")


def test_a_node_bound_encrypted_allocation_takes_a_free_keyid0_page_of_its_node() -> None:
    """``_take`` (kernel/page_alloc.py): a page comes from the KeyID's own
    pool, then KeyID 0's, then the others, for a node-bound request too
    (``__alloc_pages_nodemask`` searches every free page of the node): with
    the node's never-used memory gone, a KeyID-1 fault bound to it takes the
    KeyID-0 page just freed there rather than failing with ENOMEM."""
    m, a = two_keys(phys_mem="16M", numa_nodes=2)
    ctl(m, a, f"mmap {U:#x} 8M rw-")
    ctl(m, a, f"mbind {U:#x} 8M 0")
    assert first_refusal(m, a, U, U + (8 << 20)).errno == errno.ENOMEM  # node 0 is full
    ctl(m, a, f"munmap {U:#x} 4K")
    ctl(m, a, f"mmap {U:#x} 4K rw- keyid=1")
    ctl(m, a, f"mbind {U:#x} 4K 0")
    m.write_virt(a, U, b"y")
    assert m.kernel.alloc.pfn_to_nid(pfn_of(m, a, U)) == 0
    assert m.kernel.pages.page_keyid(pfn_of(m, a, U)) == 1
    assert m.check() == []


def test_a_node_bound_allocation_takes_never_used_memory_before_another_keyids_pool() -> None:
    """docs/spec.md 3.2: with pools, a page comes from the KeyID's own pool,
    then KeyID 0's (never-used memory included), then another KeyID's (a
    flush); a node-bound request keeps that order within its node, so a
    KeyID-0 fault bound to node 0 takes node 0's never-used memory, not a
    page of KeyID 1's pool there that would cost a flush."""
    m, a = two_keys(phys_mem="16M", numa_nodes=2)
    m.keyid_free_pools = True
    ctl(m, a, f"mmap {U:#x} 64K rw- keyid=1 populate")
    ctl(m, a, f"munmap {U:#x} 64K")  # 16 pages in KeyID 1's pool, on node 0
    assert m.kernel.alloc.free_pages_by_keyid()[1] == 16
    flushes = vmstat(m)["mktme_keyid_pool_flush"]
    ctl(m, a, f"mmap {U:#x} 4K rw-")
    ctl(m, a, f"mbind {U:#x} 4K 0")
    m.write_virt(a, U, b"x")
    assert m.kernel.alloc.pfn_to_nid(pfn_of(m, a, U)) == 0
    assert vmstat(m)["mktme_keyid_pool_flush"] == flushes
    assert m.kernel.alloc.free_pages_by_keyid()[1] == 16
    assert m.check() == []
