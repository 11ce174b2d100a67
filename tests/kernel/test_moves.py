"""Pages that move: fork and copy-on-write, THP at fault, mlock, mremap
(issue 12). Each rule is quoted from the series or from Linux of 2018 (v4.19
mm/), and where the series keeps a KeyID with the page, its switch off shows
the failure."""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable

import pytest

from kernel_helpers import HPAGE, PAGE, U, cpu_key, ctl, leaf, machine, pfn_of, two_keys, vmstat
from mktme_sandbox import Machine
from mktme_sandbox.errors import SandboxError
from mktme_sandbox.kernel import memory
from mktme_sandbox.kernel.proc import KPF

SECRET = b"attack at dawn!!" * 4


def smaps_field(m: Machine, name: str, field: str, vma: int = 0) -> int:
    values = [
        int(line.split()[1]) for line in m.smaps(name).splitlines() if line.startswith(field + ":")
    ]
    return values[vma]


def kpageflags(m: Machine, pfn: int) -> int:
    (flags,) = struct.unpack("<Q", m.kpageflags(pfn * 8, 8))
    return int(flags)


def pagemap_entry(m: Machine, name: str, addr: int) -> int:
    (entry,) = struct.unpack("<Q", m.pagemap(name, (addr >> 12) * 8, 8))
    return int(entry)


def errno_of(call: Callable[[], object]) -> int | None:
    with pytest.raises(SandboxError) as caught:
        call()
    return caught.value.errno


# --- fork and copy-on-write ---------------------------------------------------------


def forked(keyid: int = 1, pages: int = 2) -> tuple[Machine, str]:
    m, a = two_keys()
    ctl(m, a, f"mmap {U:#x} {pages * PAGE} rw- keyid={keyid} populate")
    m.write_virt(a, U, SECRET)
    m.fork(a, "b", 0)
    return m, a


def test_fork_shares_every_page_write_protected_with_the_keyid_kept() -> None:
    """copy_one_pte(): "If it's a COW mapping, write protect it both in the
    parent and the child" - the child's PTE is the parent's, KeyID bits included."""
    m, a = forked()
    assert m.maps("b") == m.maps(a)
    assert pfn_of(m, "b", U) == pfn_of(m, a, U)
    assert m.read_virt("b", U, len(SECRET)) == SECRET
    assert "KeyID:                 1" in m.smaps("b")
    assert m.check() == []


def test_a_write_after_fork_copies_into_a_page_of_the_vmas_keyid_and_both_keep_their_data() -> None:
    """wp_page_copy(): new_page = alloc_page_vma(GFP_HIGHUSER_MOVABLE, vma, vmf->address)
    (patch 05 gives it the VMA's KeyID), then cow_user_page() through each page's own KeyID."""
    m, a = forked()
    shared = pfn_of(m, a, U)
    m.write_virt("b", U, b"child's own data")
    copy = pfn_of(m, "b", U)
    assert copy != shared
    assert pfn_of(m, a, U) == shared
    assert m.read_virt("b", U, 16) == b"child's own data"
    assert m.read_virt("b", U + 16, len(SECRET) - 16) == SECRET[16:]
    assert m.read_virt(a, U, len(SECRET)) == SECRET
    assert vmstat(m)["mktme_cow_fault"] == 1
    assert m.check() == []


def test_the_last_mapper_reuses_the_page_after_the_other_side_copied() -> None:
    """do_wp_page(): an anonymous page mapped once is reused (wp_page_reuse), not copied."""
    m, a = forked()
    shared = pfn_of(m, a, U)
    m.write_virt("b", U, b"x")
    m.write_virt(a, U, b"y")
    assert pfn_of(m, a, U) == shared
    assert vmstat(m)["mktme_cow_fault"] == 1
    assert pagemap_entry(m, a, U) >> 56 & 1  # exclusive again


def test_without_the_allocation_keyid_the_cow_copy_reads_as_garbage() -> None:
    """Before patch 05 ("mm/page_alloc: Handle allocation for encrypted memory")
    alloc_page_vma() knew no KeyID: the copy lands in a KeyID-0 page that the
    PTE (made from vm_page_prot) reads through KeyID 1."""
    m, _a = forked()
    m.set_mitigation("alloc_page_vma_keyid", False)
    m.write_virt("b", U + 1000, b"!")
    assert m.read_virt("b", U, len(SECRET)) != SECRET
    assert any("page_ext KeyID" in line for line in m.check())


def test_fork_accounting_shares_rss_and_splits_pss_exactly() -> None:
    """smaps: Pss adds (PAGE_SIZE << PSS_SHIFT) / mapcount per page and shifts
    once: six pages mapped by three spaces give 7 kB (8 less Linux's truncation
    of 12 fractional bits), where rounding each page to kB would give 6."""
    m, a = forked(pages=6)
    assert smaps_field(m, a, "Rss") == 24
    assert smaps_field(m, a, "Pss") == 12
    assert smaps_field(m, a, "Shared_Dirty") == 24
    assert smaps_field(m, a, "Private_Dirty") == 0
    assert smaps_field(m, "b", "Anonymous") == 24
    m.fork("b", "c", 0)
    assert smaps_field(m, "c", "Pss") == 7
    flags = kpageflags(m, pfn_of(m, a, U))
    assert flags >> KPF.MMAP & 1
    assert flags >> KPF.ANON & 1
    assert not pagemap_entry(m, a, U) >> 56 & 1  # shared: not exclusive


def test_fork_child_name_and_owner_follow_create_space() -> None:
    m, a = forked()
    assert m.space_owner("b") == 0
    assert errno_of(lambda: m.fork(a, "b", 0)) == 17  # EEXIST
    assert errno_of(lambda: m.fork(a, "kernel", 0)) == 22  # EINVAL
    assert errno_of(lambda: m.fork(a, "bad/name", 0)) == 22


def test_the_audit_sees_a_writable_pte_on_a_shared_page() -> None:
    m, a = forked()
    m.set_mitigation("alloc_page_vma_keyid", True)
    m.kernel.pt.set_pte(m.kernel.space(a).pgd, U, leaf(m, a, U).pte | 2)
    assert any("missed copy-on-write" in line for line in m.check())


# --- THP at fault -------------------------------------------------------------------


def hugepage_vma(keyid: int) -> tuple[Machine, str]:
    m, a = two_keys()
    ctl(m, a, f"mmap {U:#x} 4M rw- keyid={keyid}")
    ctl(m, a, f"madvise {U:#x} 4M hugepage")
    return m, a


def test_a_write_fault_in_a_hugepage_vma_maps_a_2m_page_of_the_vmas_keyid() -> None:
    """do_huge_pmd_anonymous_page(): page = alloc_hugepage_vma(gfp, vma, haddr,
    HPAGE_PMD_ORDER) - one allocation path that patch 04 gives the VMA's KeyID."""
    m, a = hugepage_vma(1)
    m.write_virt(a, U + 5 * PAGE, SECRET)
    head = pfn_of(m, a, U)
    assert pfn_of(m, a, U + 5 * PAGE) == head + 5  # pagemap per 4K
    assert head % 512 == 0
    assert m.read_virt(a, U + 5 * PAGE, len(SECRET)) == SECRET
    assert m.kernel.pages.page_keyid(head) == 1
    assert smaps_field(m, a, "AnonHugePages") == 2048
    assert vmstat(m)["thp_fault_alloc"] == 1
    assert " pmd" in m.ptdump(a)
    assert "2M" in m.ptdump(a)
    flags = kpageflags(m, head + 1)
    assert flags >> KPF.THP & 1
    assert flags >> KPF.COMPOUND_TAIL & 1
    assert flags >> KPF.MMAP & 1
    assert m.check() == []


def test_a_read_fault_maps_the_huge_zero_page_only_in_a_keyid0_vma() -> None:
    """Patch 02, mm/huge_memory.c: the huge zero page only when
    transparent_hugepage_use_zero_page() && !vma_is_encrypted(vma)."""
    m, a = hugepage_vma(0)
    assert m.read_virt(a, U, 64) == bytes(64)
    zero = pfn_of(m, a, U)
    assert kpageflags(m, zero) >> KPF.ZERO_PAGE & 1
    assert vmstat(m)["thp_zero_page_alloc"] == 1
    assert smaps_field(m, a, "Rss") == 0
    m.write_virt(a, U, SECRET)  # the huge zero page goes, a THP comes
    # a THP now (it may reuse the block the freed huge zero page left)
    assert not kpageflags(m, pfn_of(m, a, U)) >> KPF.ZERO_PAGE & 1
    assert m.read_virt(a, U, len(SECRET)) == SECRET
    assert vmstat(m)["thp_fault_alloc"] == 1
    m2, b = hugepage_vma(1)
    assert m2.read_virt(b, U, 64) == bytes(64)
    assert not kpageflags(m2, pfn_of(m2, b, U)) >> KPF.ZERO_PAGE & 1
    assert vmstat(m2)["thp_zero_page_alloc"] == 0
    assert vmstat(m2)["thp_fault_alloc"] == 1
    assert m.check() == []
    assert m2.check() == []


def test_without_patch_02_an_encrypted_hugepage_vma_reads_the_huge_zero_page_as_garbage() -> None:
    m, a = hugepage_vma(1)
    m.set_mitigation("no_zero_page_encrypted", False)
    assert m.read_virt(a, U, 64) != bytes(64)
    assert any("zero page mapped in an encrypted VMA" in line for line in m.check())


def test_a_fault_outside_a_whole_2m_range_falls_back_to_4k() -> None:
    m, a = two_keys()
    ctl(m, a, f"mmap {U:#x} 1M rw- keyid=1")
    ctl(m, a, f"madvise {U:#x} 1M hugepage")
    m.write_virt(a, U, b"x")
    assert smaps_field(m, a, "AnonHugePages") == 0
    assert vmstat(m)["thp_fault_alloc"] == 0


@pytest.mark.parametrize("write", [True, False])
def test_a_thp_fault_that_falls_back_to_4k_goes_on_from_the_pmd_it_allocated(
    monkeypatch: pytest.MonkeyPatch, write: bool
) -> None:
    """mm/memory.c (4.18), __handle_mm_fault(): ``vmf.pmd = pmd_alloc(mm,
    vmf.pud, address)`` comes first; then ``if (pmd_none(*vmf.pmd) &&
    transparent_hugepage_enabled(vma)) { ret = create_huge_pmd(&vmf); if
    (!(ret & VM_FAULT_FALLBACK)) return ret; }`` and the fault goes on with
    ``handle_pte_fault(&vmf)`` on that same PMD. In a 1 GiB region with no
    tables yet, with no 2M page (nor huge zero page) to be had, one table is
    linked per level and none is left over."""
    m, a = two_keys()
    base = 3 << 30  # a PGD/PUD range no mapping has touched: every table is new
    ctl(m, a, f"mmap {base:#x} 4M rw- keyid=0")
    ctl(m, a, f"madvise {base:#x} 4M hugepage")
    monkeypatch.setattr(memory, "alloc_hugepage_vma", lambda k, vma: None)
    monkeypatch.setattr(memory, "mm_get_huge_zero_page", lambda k: None)
    tables = vmstat(m)["nr_page_table_pages"]
    if write:
        m.write_virt(a, base, b"x")
    else:
        assert m.read_virt(a, base, 1) == b"\0"
    assert vmstat(m)["thp_fault_fallback"] == 1
    assert vmstat(m)["nr_page_table_pages"] == tables + 3  # PUD, PMD and PTE tables
    assert m.check() == []
    ctl(m, a, f"munmap {base:#x} 4M")
    assert m.check() == []


def test_fork_splits_a_thp_and_shares_its_pages() -> None:
    m, a = hugepage_vma(1)
    m.write_virt(a, U, SECRET)
    m.fork(a, "b", 0)
    m.write_virt("b", U, b"child")
    assert m.read_virt(a, U, len(SECRET)) == SECRET
    assert m.read_virt("b", U + 5, len(SECRET) - 5) == SECRET[5:]
    assert m.check() == []


# --- mlock --------------------------------------------------------------------------


def test_mlock_populates_marks_the_pages_and_shows_locked() -> None:
    """mlock_fixup() sets VM_LOCKED; __mm_populate() faults the range in."""
    m, a = two_keys()
    ctl(m, a, f"mmap {U:#x} 16K rw- keyid=1")
    ctl(m, a, f"mlock {U + PAGE:#x} 8K")
    assert len(m.maps(a).splitlines()) == 3
    assert smaps_field(m, a, "Locked", 1) == 8
    assert smaps_field(m, a, "Rss", 0) == 0
    assert " lo " in m.smaps(a)
    assert kpageflags(m, pfn_of(m, a, U + PAGE)) >> KPF.MLOCKED & 1
    assert vmstat(m)["unevictable_pgs_mlocked"] == 2
    ctl(m, a, f"munlock {U + PAGE:#x} 8K")
    assert len(m.maps(a).splitlines()) == 1  # merged back
    assert not kpageflags(m, pfn_of(m, a, U + PAGE)) >> KPF.MLOCKED & 1
    assert m.check() == []


def test_munlock_counts_each_page_it_unlocks() -> None:
    """mm/mlock.c munlock_vma_page() -> __munlock_isolated_page(): ``if
    (!PageMlocked(page)) ...; count_vm_event(UNEVICTABLE_PGMUNLOCKED)``, one
    per page that was mlocked."""
    m, a = two_keys()
    ctl(m, a, f"mmap {U:#x} 16K rw- keyid=1")
    ctl(m, a, f"mlock {U:#x} 16K")
    ctl(m, a, f"munlock {U + PAGE:#x} 8K")
    assert vmstat(m)["unevictable_pgs_munlocked"] == 2
    assert m.check() == []


def test_mlock_of_the_rest_of_a_vma_merges_it_with_its_locked_neighbour() -> None:
    """mm/mlock.c mlock_fixup(): ``*prev = vma_merge(mm, *prev, start, end,
    newflags, ...)`` - locking the part next to an already locked part of the
    same mapping leaves one VMA, not two with equal flags."""
    m, a = two_keys()
    ctl(m, a, f"mmap {U:#x} 16K rw- keyid=1")
    ctl(m, a, f"mlock {U:#x} 8K")
    assert len(m.maps(a).splitlines()) == 2
    ctl(m, a, f"mlock {U + 2 * PAGE:#x} 8K")
    assert len(m.maps(a).splitlines()) == 1
    assert smaps_field(m, a, "Locked") == 16
    assert m.check() == []


def test_mlock_never_merges_locked_vmas_of_two_keyids() -> None:
    """Patch 01 passes vma_keyid(vma) to vma_merge() in mlock_fixup()."""
    m, a = two_keys()
    ctl(m, a, f"mmap {U:#x} 4K rw- keyid=1")
    ctl(m, a, f"mmap {U + PAGE:#x} 4K rw- keyid=2")
    ctl(m, a, f"mlock {U:#x} 8K")
    assert len(m.maps(a).splitlines()) == 2
    assert m.check() == []


def test_mlock_errnos_are_linuxs() -> None:
    m, a = two_keys()
    ctl(m, a, f"mmap {U:#x} 4K rw-")
    assert errno_of(lambda: ctl(m, a, f"mlock {U + 1:#x} 4K")) == 22
    assert errno_of(lambda: ctl(m, a, f"mlock {U:#x} 8K")) == 12  # a hole
    assert errno_of(lambda: ctl(m, a, f"munlock {U + PAGE:#x} 4K")) == 12


def test_a_child_does_not_inherit_vm_locked() -> None:
    m, a = two_keys()
    ctl(m, a, f"mmap {U:#x} 4K rw- keyid=1")
    ctl(m, a, f"mlock {U:#x} 4K")
    m.fork(a, "b", 0)
    assert " lo " in m.smaps(a)
    assert " lo " not in m.smaps("b")
    m.write_virt(a, U, b"x")  # the COW copy in a locked VMA is mlocked
    assert kpageflags(m, pfn_of(m, a, U)) >> KPF.MLOCKED & 1
    assert m.check() == []


# --- mremap -------------------------------------------------------------------------


def test_mremap_moves_the_pages_with_their_keyid() -> None:
    """move_vma() -> copy_vma(): the new VMA is the old one's copy, vm_page_prot included."""
    m, a = two_keys()
    ctl(m, a, f"mmap {U:#x} 8K rw- keyid=1 populate")
    m.write_virt(a, U, SECRET)
    pfn = pfn_of(m, a, U)
    ctl(m, a, f"mremap {U:#x} 8K 16K {U + HPAGE:#x}")
    assert m.maps(a).startswith(f"{U + HPAGE:08x}-{U + HPAGE + 4 * PAGE:08x}")
    assert pfn_of(m, a, U + HPAGE) == pfn
    assert m.read_virt(a, U + HPAGE, len(SECRET)) == SECRET
    assert "KeyID:                 1" in m.smaps(a)
    assert m.check() == []


def test_mremap_into_a_neighbour_of_another_keyid_stays_apart() -> None:
    """Patch 01: copy_vma() calls vma_merge(..., vma_keyid(vma))."""
    m, a = two_keys()
    ctl(m, a, f"mmap {U:#x} 4K rw- keyid=1 populate")
    ctl(m, a, f"mmap {U + HPAGE:#x} 4K rw- keyid=2 populate")
    ctl(m, a, f"mremap {U:#x} 4K 4K {U + HPAGE + PAGE:#x}")
    assert len(m.maps(a).splitlines()) == 2
    assert m.check() == []


def test_without_the_merge_check_a_moved_vma_takes_its_neighbours_keyid() -> None:
    m, a = two_keys()
    m.set_mitigation("vma_merge_keyid_check", False)
    ctl(m, a, f"mmap {U:#x} 4K rw- keyid=1 populate")
    ctl(m, a, f"mmap {U + HPAGE:#x} 4K rw- keyid=2 populate")
    ctl(m, a, f"mremap {U:#x} 4K 4K {U + HPAGE + PAGE:#x}")
    assert len(m.maps(a).splitlines()) == 1
    assert any("differs from its VMA's KeyID" in line for line in m.check())


def test_mremap_grows_and_shrinks_in_place_and_errnos_are_linuxs() -> None:
    m, a = two_keys()
    ctl(m, a, f"mmap {U:#x} 8K rw- populate")
    ctl(m, a, f"mremap {U:#x} 8K 16K")
    assert m.maps(a).startswith(f"{U:08x}-{U + 4 * PAGE:08x}")
    ctl(m, a, f"mremap {U:#x} 16K 4K")
    assert m.maps(a).startswith(f"{U:08x}-{U + PAGE:08x}")
    ctl(m, a, f"mmap {U + PAGE:#x} 4K r--")
    assert errno_of(lambda: ctl(m, a, f"mremap {U:#x} 4K 8K")) == 12  # no room, no MAYMOVE
    assert errno_of(lambda: ctl(m, a, f"mremap {U + 8 * PAGE:#x} 4K 8K")) == 14  # EFAULT
    assert errno_of(lambda: ctl(m, a, f"mremap {U:#x} 4K 8K {U + 1:#x}")) == 22
    assert errno_of(lambda: ctl(m, a, f"mremap {U:#x} 4K 8K {U:#x}")) == 22  # overlap
    assert m.check() == []


def test_the_huge_zero_page_is_freed_when_its_last_mapping_goes_also_after_fork() -> None:
    m, a = hugepage_vma(0)
    m.read_virt(a, U, 8)
    m.fork(a, "b", 0)
    ctl(m, a, f"munmap {U:#x} 4M")
    assert m.kernel.huge_zero_pfn is not None  # the child still maps it
    m.destroy_space("b", 0)
    assert m.kernel.huge_zero_pfn is None
    ctl(m, a, f"mmap {U:#x} 4M rw-")
    assert m.check() == []


@pytest.mark.parametrize(
    ("command", "err"),
    [("mremap {U:#x} 4K 99999999999999999999T", 22), ("mremap {U:#x} 4K 129T", 22),
     ("mremap {U:#x} 4K 129T 0x30000000", 22), ("mremap {U:#x} 0 8K", 22),
     ("mremap {U:#x} 0 8K 0x30000000", 22), ("mremap 0x30000000 0 8K", 14),
     ("mremap 0x7fffffff0000 4K 128K", 12),
     ("mremap 0x7fffffffe000 4K 8K", 12),  # would end one page past TASK_SIZE
     ("mremap {U:#x} 8K 8K 0x30000000", 14)],  # OLDLEN past its VMA
)  # fmt: skip
def test_mremap_refuses_a_silly_newlen_and_a_private_duplicate_changing_nothing(
    command: str, err: int
) -> None:
    """mm/mremap.c: NEWLEN beyond TASK_SIZE is EINVAL ("Is the new length or
    address silly?"); OLDLEN 0 of a private mapping is EINVAL (vma_to_resize:
    "!old_len ... makes no sense for private mappings"), EFAULT where nothing
    is mapped, and where OLDLEN runs past the end of OLD's VMA (vma_to_resize:
    ``if (old_len > vma->vm_end - addr) return ERR_PTR(-EFAULT)``); growing in
    place past the end of the user space is ENOMEM, by one page too."""
    m, a = two_keys()
    ctl(m, a, f"mmap {U:#x} 4K rw- populate")
    ctl(m, a, "mmap 0x7fffffff0000 4K rw-")
    ctl(m, a, "mmap 0x7fffffffe000 4K rw-")  # the last page of the user space
    maps = m.maps(a)
    assert errno_of(lambda: ctl(m, a, command.format(U=U))) == err
    assert m.maps(a) == maps


def written_to_the_limit(m: Machine, name: str, uid: int) -> int:
    """Each page from ``U`` on written with its address until ENOMEM; returns
    the first address that was refused."""
    va = U
    while True:
        try:
            m.write_virt(name, va, va.to_bytes(8, "little"), uid=uid)
        except SandboxError as err:
            if err.errno != errno.ENOMEM:
                raise
            return va
        va += PAGE


def test_a_mremap_beyond_the_owners_page_limit_is_enomem_and_changes_nothing() -> None:
    """mm/mremap.c move_vma() -> move_page_tables(): the new place's tables
    are charged to the owner (``GFP_PGTABLE_USER`` is ``__GFP_ACCOUNT``);
    when its limit cannot cover them the move is refused before anything
    changes, not after some pages have moved."""
    m, _ = two_keys(max_pages_per_uid=64)
    m.create_space("u", 1000)
    ctl(m, "u", f"mmap {U:#x} 1M rw-", uid=1000)
    va = written_to_the_limit(m, "u", 1000)
    ctl(m, "u", f"munmap {va - PAGE:#x} {PAGE}", uid=1000)  # room for one table
    maps = m.maps("u")
    assert (
        errno_of(
            lambda: ctl(
                m, "u", f"mremap {U:#x} {va - PAGE - U:#x} {va - PAGE - U:#x} 0x40000000", 1000
            )
        )
        == errno.ENOMEM
    )
    assert m.maps("u") == maps
    assert all(
        m.read_virt("u", page, 8, uid=1000) == page.to_bytes(8, "little")
        for page in range(U, va - PAGE, PAGE)
    )
    assert m.check() == []


def test_a_mremap_of_huge_pages_needs_no_memory_for_their_splits() -> None:
    """mm/mremap.c move_page_tables(): ``if (is_swap_pmd(*old_pmd) ||
    pmd_trans_huge(*old_pmd)) ... split_huge_pmd(vma, old_pmd, old_addr)``
    (the sandbox always splits), and mm/huge_memory.c
    __split_huge_pmd_locked(): ``pgtable = pgtable_trans_huge_withdraw(mm,
    pmd)``, the table the THP fault deposited. On a machine with free pages
    for the new place's tables only, the move of two 2M pages succeeds
    whole."""
    m = machine(phys_mem="16M", swap=0)
    cpu_key(m, 1)
    m.create_space("a", 0)
    ctl(m, "a", f"mmap {U:#x} 4M rw- keyid=1")
    ctl(m, "a", f"madvise {U:#x} 4M hugepage")
    m.write_virt("a", U, SECRET)
    m.write_virt("a", U + HPAGE, SECRET)
    assert smaps_field(m, "a", "AnonHugePages") == 4096
    m.create_space("b", 0)
    ctl(m, "b", f"mmap {U:#x} 16M rw-")
    assert written_to_the_limit(m, "b", 0) > U
    ctl(m, "b", f"munmap {U:#x} {4 * PAGE}")  # room for the new place's tables only
    ctl(m, "a", f"mremap {U:#x} 4M 4M 0x40000000")
    assert m.maps("a").startswith("40000000-40400000 rw-p")
    assert m.read_virt("a", 0x40000000 + HPAGE, len(SECRET)) == SECRET
    assert m.check() == []


FRESH = 3 << 30  # a PGD/PUD range no mapping has touched: every table is new


def fresh_hugepage_vma(**options: object) -> tuple[Machine, str]:
    m, a = two_keys(**options)
    ctl(m, a, f"mmap {FRESH:#x} 4M rw- keyid=0")
    ctl(m, a, f"madvise {FRESH:#x} 4M hugepage")
    return m, a


def deposits(m: Machine, name: str) -> int:
    return len(m.kernel.space(name).pmd_huge_pte)


def test_a_thp_fault_deposits_the_page_table_its_split_will_need() -> None:
    """mm/huge_memory.c (4.19) __do_huge_pmd_anonymous_page(): ``pgtable =
    pte_alloc_one(vma->vm_mm, haddr)`` before the PMD is set, then
    ``pgtable_trans_huge_deposit(vma->vm_mm, vmf->pmd, pgtable);
    set_pmd_at(...); mm_inc_nr_ptes(vma->vm_mm)``; the split takes it back
    (__split_huge_pmd_locked(): ``pgtable_trans_huge_withdraw()``), and
    zap_huge_pmd() frees it (``zap_deposited_table()``). A THP fault in a
    range with no tables makes three table pages: PUD, PMD and the deposit."""
    m, a = fresh_hugepage_vma()
    tables = vmstat(m)["nr_page_table_pages"]
    m.write_virt(a, FRESH, SECRET)
    assert smaps_field(m, a, "AnonHugePages") == 2048
    assert vmstat(m)["nr_page_table_pages"] == tables + 3
    assert deposits(m, a) == 1
    ctl(m, a, f"munmap {FRESH + PAGE:#x} {PAGE}")  # the split: no new table
    assert smaps_field(m, a, "AnonHugePages") == 0
    assert vmstat(m)["nr_page_table_pages"] == tables + 3
    assert deposits(m, a) == 0
    assert m.read_virt(a, FRESH, len(SECRET)) == SECRET
    assert m.check() == []
    m.write_virt(a, FRESH + HPAGE, SECRET)  # a second THP, unmapped whole
    assert vmstat(m)["nr_page_table_pages"] == tables + 4
    ctl(m, a, f"munmap {FRESH + HPAGE:#x} 2M")
    assert (vmstat(m)["nr_page_table_pages"], deposits(m, a)) == (tables + 3, 0)
    ctl(m, a, f"munmap {FRESH:#x} 2M")
    assert vmstat(m)["nr_page_table_pages"] == tables
    assert m.check() == []


def test_the_huge_zero_page_deposits_a_table_and_gives_it_back_when_written() -> None:
    """mm/huge_memory.c do_huge_pmd_anonymous_page(), the read fault:
    ``pgtable = pte_alloc_one(vma->vm_mm, haddr); if (unlikely(!pgtable))
    return VM_FAULT_OOM; ... set_huge_zero_page(pgtable, ...)``, which
    deposits it; the write that replaces the huge zero page frees it with
    the PMD, and the THP it maps deposits its own."""
    m, a = fresh_hugepage_vma()
    tables = vmstat(m)["nr_page_table_pages"]
    assert m.read_virt(a, FRESH, 8) == bytes(8)
    assert vmstat(m)["thp_zero_page_alloc"] == 1
    assert (vmstat(m)["nr_page_table_pages"], deposits(m, a)) == (tables + 3, 1)
    m.write_virt(a, FRESH, SECRET)
    assert smaps_field(m, a, "AnonHugePages") == 2048
    assert (vmstat(m)["nr_page_table_pages"], deposits(m, a)) == (tables + 3, 1)
    assert m.check() == []


def test_a_munmap_inside_a_thp_on_a_full_machine_needs_no_memory() -> None:
    """munmap(2) fails with ENOMEM only for the map count, never for memory:
    splitting the 2M page it cuts takes the table its fault deposited."""
    m = machine(phys_mem="16M", swap=0)
    m.create_space("a", 0)
    ctl(m, "a", f"mmap {U:#x} 2M rw-")
    ctl(m, "a", f"madvise {U:#x} 2M hugepage")
    m.write_virt("a", U, SECRET)
    m.create_space("b", 0)
    ctl(m, "b", f"mmap {U:#x} 16M rw-")
    assert written_to_the_limit(m, "b", 0) > U
    ctl(m, "a", f"munmap {U + PAGE:#x} {PAGE}")
    assert m.maps("a").count("\n") == 2
    assert m.read_virt("a", U, len(SECRET)) == SECRET
    assert m.check() == []


def test_a_thp_fault_with_no_page_for_its_table_is_enomem_and_gives_the_2m_page_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """__do_huge_pmd_anonymous_page(): ``if (unlikely(!pgtable)) { ret =
    VM_FAULT_OOM; goto release; }`` - the 2M page is put back and nothing is
    mapped."""
    m, a = fresh_hugepage_vma()
    free = m.kernel.alloc.free_pages_by_keyid()
    tables = vmstat(m)["nr_page_table_pages"]

    def no_table() -> int:
        raise SandboxError(errno.ENOMEM, "physical memory exhausted: no free page left")

    monkeypatch.setattr(m.kernel.pt, "pte_alloc_one", no_table)
    assert errno_of(lambda: m.write_virt(a, FRESH, SECRET)) == errno.ENOMEM
    assert vmstat(m)["thp_fault_alloc"] == 0
    assert deposits(m, a) == 0
    assert sum(m.kernel.alloc.free_pages_by_keyid().values()) == sum(free.values())
    assert vmstat(m)["nr_page_table_pages"] == tables
    assert m.check() == []


def test_khugepaged_deposits_the_table_it_collapses() -> None:
    """mm/khugepaged.c collapse_huge_page(): ``pgtable = pmd_pgtable(_pmd);
    ... pgtable_trans_huge_deposit(mm, pmd, pgtable); set_pmd_at(mm, address,
    pmd, _pmd)`` - the PTE table the 512 small pages were mapped by is kept
    for the next split, not freed."""
    m, a = two_keys()
    ctl(m, a, f"mmap {FRESH:#x} 2M rw- keyid=0 populate")  # 512 small pages
    ctl(m, a, f"madvise {FRESH:#x} 2M hugepage")
    m.write_virt(a, FRESH + 5 * PAGE, SECRET)
    tables = vmstat(m)["nr_page_table_pages"]
    m.khugepaged_scan()
    assert smaps_field(m, a, "AnonHugePages") == 2048
    assert (vmstat(m)["nr_page_table_pages"], deposits(m, a)) == (tables, 1)
    ctl(m, a, f"munmap {FRESH:#x} {PAGE}")
    assert (vmstat(m)["nr_page_table_pages"], deposits(m, a)) == (tables, 0)
    assert m.read_virt(a, FRESH + 5 * PAGE, len(SECRET)) == SECRET
    assert m.check() == []


def test_the_audit_reports_a_deposited_table_no_huge_pmd_accounts_for() -> None:
    """One table per huge PMD (``mm->pmd_huge_pte``); one more is a leak, and
    a deposit that is no page-table page is reported too."""
    m, a = fresh_hugepage_vma()
    mm = m.kernel.space(a)
    mm.pmd_huge_pte.append(m.kernel.pt.pte_alloc_one())
    assert any("more page tables deposited than huge PMDs" in line for line in m.check())
    mm.pmd_huge_pte[0] = 0
    assert any("deposited page table is no page table" in line for line in m.check())


def test_a_snapshot_keeps_the_deposited_tables() -> None:
    """The deposits are part of the address space: a restored machine splits
    its 2M pages with them, as the machine it was taken from would."""
    m, a = fresh_hugepage_vma()
    m.write_virt(a, FRESH, SECRET)
    saved = m.snapshot()
    tables = vmstat(m)["nr_page_table_pages"]
    m.restore(saved)
    assert deposits(m, a) == 1
    ctl(m, a, f"munmap {FRESH + PAGE:#x} {PAGE}")
    assert (vmstat(m)["nr_page_table_pages"], deposits(m, a)) == (tables, 0)
    assert m.read_virt(a, FRESH, len(SECRET)) == SECRET
    assert m.check() == []
