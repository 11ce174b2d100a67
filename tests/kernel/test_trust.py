"""docs/spec.md 8 in the kernel: whose memory a user may write, what one user
may take, faults that fail without a trace, and page tables tampered above the
PTE level. Users are 65534 and 65533; root and the daemon's user are exempt.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

import pytest

from kernel_helpers import PAGE, U, cpu_key, ctl, machine, pfn_of, space
from mktme_sandbox import Machine, MachineConfig, SandboxError
from mktme_sandbox.kernel.pgtable_types import PAGE_TABLE, Level

ALICE, BOB = 65534, 65533


def refused(errno_: int, call: Callable[..., object], *args: object, **kwargs: object) -> str:
    with pytest.raises(SandboxError) as caught:
        call(*args, **kwargs)
    assert caught.value.errno == errno_, caught.value
    return caught.value.reason


def alice_and_bob(**options: object) -> Machine:
    """Alice owns KeyID 1 and space "alice", Bob KeyID 2 and "bob"; 64K each, populated."""
    m = machine(**options)
    for uid, keyid, name in ((ALICE, 1, "alice"), (BOB, 2, "bob")):
        cpu_key(m, keyid, uid)
        space(m, name, uid)
        ctl(m, name, f"mmap {U:#x} 64K rw- keyid={keyid} populate", uid)
        m.write_virt(name, U, f"{name}'s data".encode(), uid)
    return m


def free_pages(m: Machine) -> int:
    return sum(m.kernel.alloc.free_pages_by_keyid().values())


# --- 1. keyids/N/mem: a user writes only its own memory ---------------------------


def test_a_key_owner_writes_its_own_pages_through_its_keyid() -> None:
    m = alice_and_bob()
    m.write_phys(1, pfn_of(m, "alice", U) * PAGE, b"written raw", uid=ALICE)
    assert m.read_virt("alice", U, 11) == b"written raw"
    assert m.check() == []


def _targets(m: Machine) -> dict[str, int]:
    return {
        "another user's page": pfn_of(m, "bob", U),
        "a page table": m.cr3("alice") // PAGE,
        "the zero page": m.kernel.zero_pfn,
        "a free page": m.kernel.alloc.nr_pages - 1,
        "a reserved page": 0,
    }


@pytest.mark.parametrize(
    "target",
    ["another user's page", "a page table", "the zero page", "a free page", "a reserved page"],
)
def test_a_key_owner_writing_anything_but_its_own_pages_is_eacces_and_writes_nothing(
    target: str,
) -> None:
    m = alice_and_bob()
    pa = _targets(m)[target] * PAGE
    before = m.read_phys(1, pa, PAGE)
    reason = refused(errno.EACCES, m.write_phys, 1, pa, b"garbage", uid=ALICE)
    assert "not memory of uid" in reason
    assert m.read_phys(1, pa, PAGE) == before
    assert m.check() == []


@pytest.mark.parametrize(
    "read",
    [
        lambda m, uid: m.maps("bob", uid=uid),
        lambda m, uid: m.smaps("bob", uid=uid),
        lambda m, uid: m.read_virt("bob", U, 8, uid=uid),
        lambda m, uid: m.pagemap("bob", (U >> 12) * 8, 8, uid=uid),
        lambda m, uid: m.cr3("bob", uid=uid),
        lambda m, uid: m.ptdump("bob", uid=uid),
        lambda m, uid: m.vmas("bob", uid=uid),
        lambda m, uid: m.flush_tlb("bob", uid=uid),
        lambda m, uid: m.read_phys(2, 0, 8, uid=uid),
    ],
    ids=["maps", "smaps", "read_virt", "pagemap", "cr3", "ptdump", "vmas", "tlb", "read_phys"],
)
def test_the_api_checks_the_owner_of_a_space_or_keyid_as_the_mount_does(
    read: Callable[[Machine, int | None], object],
) -> None:
    """The mount's modes keep Alice out of Bob's space and KeyID; the API, given
    a uid, says the same (EACCES), and lets the owner, root and the daemon's user in."""
    m = alice_and_bob()
    refused(errno.EACCES, read, m, ALICE)
    for allowed in (BOB, 0, None):
        read(m, allowed)


def test_a_page_is_written_only_through_its_own_keyid_even_by_its_owner() -> None:
    """Alice owns KeyIDs 1 and 3 and a KeyID-1 page. A line she stored through
    KeyID 3 would stay dirty under KeyID 3, which no flush of the page (KeyID 1)
    removes, and after she frees the page be written back over Bob's data."""
    m = alice_and_bob()
    cpu_key(m, 3, ALICE)
    pa = pfn_of(m, "alice", U) * PAGE
    reason = refused(errno.EACCES, m.write_phys, 3, pa, b"stale line", uid=ALICE)
    assert "under KeyID 3" in reason
    ctl(m, "alice", f"munmap {U:#x} 64K", ALICE)
    ctl(m, "bob", f"mmap {U + 0x100000:#x} 64K rw- keyid=2 populate", BOB)
    m.write_virt("bob", U + 0x100000, b"bob's secret data", BOB)
    m.cache_command("wbinvd")
    assert m.read_virt("bob", U + 0x100000, 17) == b"bob's secret data"
    assert m.check() == []


def test_a_write_that_runs_into_a_foreign_page_is_refused_whole() -> None:
    m = alice_and_bob()
    mine = {pfn_of(m, "alice", U + i * PAGE) for i in range(16)}
    last = next(pfn for pfn in sorted(mine) if pfn + 1 not in mine)
    pa = (last + 1) * PAGE - 8
    before = m.read_dram(last * PAGE, PAGE)
    refused(errno.EACCES, m.write_phys, 1, pa, b"x" * 16, uid=ALICE)
    assert m.read_dram(last * PAGE, PAGE) == before


def test_a_ksm_page_shared_with_another_user_is_not_writable_through_either_key() -> None:
    m = alice_and_bob()
    m.set_mitigation("ksm_keyid_check", False)  # merge across KeyIDs, hence across users
    for uid, name in ((ALICE, "alice"), (BOB, "bob")):
        ctl(m, name, f"madvise {U + 0x8000:#x} 4K mergeable", uid)
        m.write_virt(name, U + 0x8000, b"same plaintext", uid)
    assert m.ksm_run() >= 1
    shared = pfn_of(m, "alice", U + 0x8000)
    assert shared == pfn_of(m, "bob", U + 0x8000)
    refused(errno.EACCES, m.write_phys, 1, shared * PAGE, b"x", uid=ALICE)
    refused(errno.EACCES, m.write_phys, 2, shared * PAGE, b"x", uid=BOB)


def test_a_user_writes_no_keyid_view_but_its_own_keys() -> None:
    m = alice_and_bob()
    pa = pfn_of(m, "alice", U) * PAGE
    refused(errno.EACCES, m.write_phys, 2, pa, b"x", uid=ALICE)
    refused(errno.EACCES, m.write_phys, 0, pa, b"x", uid=ALICE)


def test_root_and_the_daemons_user_write_any_page_through_any_keyid() -> None:
    m = alice_and_bob()
    pa = pfn_of(m, "bob", U) * PAGE
    m.write_phys(1, pa, b"root was here", uid=0)
    m.write_phys(1, pa, b"daemon was here", uid=m.owner_uid)
    m.write_phys(1, pa, b"the API default")


def test_dram_is_written_by_root_and_the_daemons_user_only() -> None:
    m = alice_and_bob()
    refused(errno.EACCES, m.write_dram, 0x5000, b"x", uid=ALICE)
    m.write_dram(0x5000, b"x", uid=0)
    m.write_dram(0x5000, b"x")


def test_a_space_is_written_by_its_owner_root_and_the_daemons_user_only() -> None:
    m = alice_and_bob()
    refused(errno.EACCES, m.write_virt, "bob", U, b"x", uid=ALICE)
    (vma,) = m.vmas("bob").values()
    refused(errno.EACCES, m.write_vma, "bob", vma, 0, b"x", uid=ALICE)
    assert m.read_virt("bob", U, 10) == b"bob's data"
    m.write_virt("bob", U, b"B", uid=BOB)
    m.write_virt("bob", U, b"R", uid=0)


def test_the_write_check_reads_a_64k_write_in_a_space_with_64m_mapped_quickly() -> None:
    import time

    m = machine(phys_mem="128M", max_pages_per_uid=1 << 20)
    cpu_key(m, 1, ALICE)
    space(m, "big", ALICE)
    ctl(m, "big", f"mmap {U:#x} 64M rw- keyid=1 populate", ALICE)
    pa = pfn_of(m, "big", U) * PAGE
    start = time.perf_counter()
    m.write_phys(1, pa, bytes(64 << 10), uid=ALICE)
    assert time.perf_counter() - start < 2.0


# --- 2. per-uid limits ----------------------------------------------------------------


def test_the_default_limits_are_half_of_the_keyids_and_half_of_memory() -> None:
    config = MachineConfig()
    assert (config.keyid_limit, config.page_limit) == (32, 32768)
    assert MachineConfig(max_keyids_per_uid=5, max_pages_per_uid=7).keyid_limit == 5
    with pytest.raises(ValueError, match="max_pages_per_uid"):
        MachineConfig(max_pages_per_uid=-1)


def test_a_user_owns_at_most_max_keyids_per_uid_keyids_then_edquot() -> None:
    m = machine(max_keyids_per_uid=2)
    cpu_key(m, 1, ALICE)
    cpu_key(m, 2, ALICE)
    reason = refused(errno.EDQUOT, cpu_key, m, 3, ALICE)
    assert "max_keyids_per_uid is 2" in reason
    assert m.key_owner(3) is None
    cpu_key(m, 1, ALICE)  # reprogramming its own takes none more
    cpu_key(m, 3, BOB)  # another user still can
    for keyid in (4, 5, 6):
        cpu_key(m, keyid, 0)  # root has no limit
    m.key_command(2, "type=clear", uid=ALICE)
    cpu_key(m, 7, ALICE)


def test_a_huge_page_fault_beyond_the_page_limit_falls_back_to_4k_pages() -> None:
    """docs/spec.md 8: ``max_pages_per_uid`` caps the pages one uid holds; a THP
    fault is charged 512 pages at once, so a user with fewer left gets no 2M
    page and the fault falls back to 4K (mm/huge_memory.c: a failed
    ``mem_cgroup_charge()`` of the huge page is ``VM_FAULT_FALLBACK``)."""
    m = machine(max_pages_per_uid=100)
    space(m, "alice", ALICE)
    ctl(m, "alice", f"mmap {U:#x} 2M rw-", ALICE)
    ctl(m, "alice", f"madvise {U:#x} 2M hugepage", ALICE)
    m.write_virt("alice", U, b"x", ALICE)
    stats = m.vmstat_counts()
    assert (stats["thp_fault_alloc"], stats["thp_fault_fallback"]) == (0, 1)
    assert m.kernel.alloc.pages_by_uid[ALICE] <= 100
    assert m.check() == []


def test_clearing_a_keyid_takes_none_of_the_users_keyid_quota() -> None:
    """docs/spec.md 3.7: a KeyID "belongs to whoever programmed it until it is
    cleared", and ``max_keyids_per_uid`` counts the KeyIDs a user owns
    (key_alloc()'s quota is charged by the keys a user holds): a clear makes
    no owner, so a user at the limit may still clear."""
    m = machine(max_keyids_per_uid=1)
    cpu_key(m, 1, ALICE)
    m.key_command(2, "type=clear", uid=ALICE)
    assert m.key_owner(2) is None


def test_a_huge_page_is_charged_512_pages_and_uncharged_as_many() -> None:
    """mm/huge_memory.c do_huge_pmd_anonymous_page(): ``mem_cgroup_charge()``
    of the compound page charges all ``HPAGE_PMD_NR`` pages to the owner
    (docs/spec.md 8, ``max_pages_per_uid`` counts pages, not mappings)."""
    m = machine(max_pages_per_uid=1 << 20)
    space(m, "alice", ALICE)
    ctl(m, "alice", f"mmap {U:#x} 2M rw-", ALICE)
    ctl(m, "alice", f"madvise {U:#x} 2M hugepage", ALICE)
    before = m.kernel.alloc.pages_by_uid.get(ALICE, 0)
    m.write_virt("alice", U, b"x", ALICE)
    assert m.kernel.alloc.pages_by_uid[ALICE] - before >= 512  # and the tables
    ctl(m, "alice", f"munmap {U:#x} 2M", ALICE)
    assert m.kernel.alloc.pages_by_uid.get(ALICE, 0) == before


def test_a_user_holds_at_most_max_pages_per_uid_pages_and_another_still_maps() -> None:
    m = machine(phys_mem="8M", max_pages_per_uid=100)
    cpu_key(m, 1, ALICE)
    space(m, "alice", ALICE)
    free = free_pages(m)
    reason = refused(errno.ENOMEM, ctl, m, "alice", f"mmap {U:#x} 1M rw- keyid=1 populate", ALICE)
    assert "max_pages_per_uid" in reason
    assert free_pages(m) == free
    assert m.maps("alice") == ""
    ctl(m, "alice", f"mmap {U:#x} 1M rw- keyid=1", ALICE)
    reason = refused(errno.ENOMEM, m.write_virt, "alice", U, bytes(1 << 20), ALICE)
    refusal = None
    for page in range(U, U + (1 << 20), PAGE):
        try:
            m.write_virt("alice", page, b"x", ALICE)
        except SandboxError as err:
            refusal = err
            break
    assert refusal is not None
    assert refusal.errno == errno.ENOMEM
    assert "max_pages_per_uid" in refusal.reason
    assert m.kernel.alloc.pages_by_uid[ALICE] == 100
    assert m.check() == []
    space(m, "bob", BOB)
    ctl(m, "bob", f"mmap {U:#x} 256K rw- populate", BOB)
    m.write_virt("bob", U, b"bob still maps", BOB)
    m.destroy_space("alice", ALICE)
    assert m.kernel.alloc.pages_by_uid.get(ALICE, 0) == 0


# --- 4. a fault that fails leaves nothing behind ------------------------------------


def leave_free(m: Machine, n: int) -> None:
    """Fill memory from a root space "hog" until exactly ``n`` pages are free."""
    space(m, "hog")
    ctl(m, "hog", f"mmap {U:#x} 16M rw-")
    page = U
    while free_pages(m) > n:
        m.write_virt("hog", page, b"h")
        page += PAGE
    while free_pages(m) < n:
        page -= PAGE
        ctl(m, "hog", f"madvise {page:#x} 4K dontneed")
    assert free_pages(m) == n


@pytest.mark.parametrize(
    ("free", "fails_at"),
    [(0, "the PUD table"), (1, "the PMD table"), (2, "the PTE table"), (3, "the data page")],
)
def test_a_fault_that_runs_out_of_memory_at_any_step_gives_back_all_it_took(
    free: int, fails_at: str
) -> None:
    m = machine(phys_mem="4M", swap=0)  # with swap, reclaim would make room
    cpu_key(m, 1, ALICE)
    space(m, "t", ALICE)
    ctl(m, "t", f"mmap {1 << 40:#x} 4K rw- keyid=1", ALICE)  # a PGD slot of its own
    leave_free(m, free)
    refused(errno.ENOMEM, m.write_virt, "t", 1 << 40, b"x", ALICE)
    assert free_pages(m) == free, fails_at
    assert m.check() == []
    assert m.kernel.pages_of(1) == 0
    ctl(m, "t", f"munmap {1 << 40:#x} 4K", ALICE)
    m.key_command(1, "type=clear", uid=ALICE)  # not EBUSY: no page of KeyID 1 leaked


def test_a_read_fault_on_the_zero_page_that_runs_out_of_tables_gives_them_back() -> None:
    m = machine(phys_mem="4M", swap=0)  # with swap, reclaim would make room
    space(m, "t")
    ctl(m, "t", f"mmap {1 << 40:#x} 4K r--")
    leave_free(m, 2)
    refused(errno.ENOMEM, m.read_virt, "t", 1 << 40, 1)
    assert free_pages(m) == 2
    assert m.check() == []


# --- 5. upper-level entries rewritten through keyids/0/mem ----------------------------

BAD_TARGETS = ("outside physical memory", "to a free page", "to a page that is no page table")


def _tampered(level: Level, target: str) -> tuple[Machine, int]:
    """Space "t" with one entry of ``level`` rewritten; returns the machine and
    the PFN of Bob's data page (a page "t" must never free)."""
    m = alice_and_bob()
    space(m, "t")
    ctl(m, "t", f"mmap {U:#x} 64K rw- populate")
    bob = pfn_of(m, "bob", U)
    pfn = {
        BAD_TARGETS[0]: m.kernel.alloc.nr_pages + 5,
        BAD_TARGETS[1]: m.kernel.alloc.nr_pages - 1,
        BAD_TARGETS[2]: bob,
    }[target]
    (step,) = [s for s in m.kernel.pt.walk(m.cr3("t"), U) if s.level == level]
    entry = pfn * PAGE | int(PAGE_TABLE)
    m.write_phys(0, step.entry_pa, entry.to_bytes(8, "little"))
    m.flush_tlb("t")
    return m, bob


@pytest.mark.parametrize("target", BAD_TARGETS)
@pytest.mark.parametrize("level", [Level.PGD, Level.PUD, Level.PMD])
def test_a_tampered_upper_level_entry_is_reported_shown_and_destroyed_safely(
    level: Level, target: str
) -> None:
    m, bob = _tampered(level, target)
    assert any(f"{level.name} entry points {target}" in line for line in m.check())
    assert "Rss:" in m.smaps("t")
    assert len(m.pagemap("t", (U >> 12) * 8, 16 * 8)) == 16 * 8
    assert "User Space" in m.ptdump("t")
    m.destroy_space("t", 0)
    assert m.read_virt("bob", U, 10) == b"bob's data"
    assert pfn_of(m, "bob", U) == bob
    assert not m.kernel.alloc.is_free(bob)
    assert not [line for line in m.check() if "pfn" in line and f"{bob:#x}" in line]
