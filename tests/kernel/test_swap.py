"""Swap: pages that leave memory and come back (kernel/swapfile.py, kernel/vmscan.py)."""

from __future__ import annotations

import errno
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from kernel_helpers import PAGE, U, cpu_key, ctl, leaf, machine, space, two_keys, vmstat
from mktme_sandbox import Machine
from mktme_sandbox.errors import SandboxError
from mktme_sandbox.kernel.pgtable_types import PteFlags
from mktme_sandbox.kernel.swapfile import SWAP_MAGIC, swp_entry_to_pte
from mktme_sandbox.kernel.vma import VM

SECRET = b"launch code 0000" * 4


def swapped_out(**options: object) -> tuple[Machine, str]:
    """KeyID 1 page at U holding SECRET, then ``madvise pageout``."""
    m, a = two_keys(**options)
    ctl(m, a, f"mmap {U:#x} 16K rw- keyid=1")
    m.write_virt(a, U, SECRET)
    ctl(m, a, f"madvise {U:#x} 16K pageout")
    return m, a


def pagemap_entry(m: Machine, name: str, va: int) -> int:
    return int(struct.unpack("<Q", m.pagemap(name, (va >> 12) * 8, 8))[0])


def swap_bytes(m: Machine) -> bytes:
    return m.read_swap(0, m.swap_size)


def test_the_swap_device_is_formatted_as_mkswap_formats_a_partition() -> None:
    """include/linux/swap.h, union swap_header: "SWAPSPACE2" in the last ten
    bytes of page 0, then info.version 1, info.last_page, info.nr_badpages 0
    after the 1024 boot bytes."""
    m = machine(swap="1M")
    header = swap_bytes(m)[:PAGE]
    assert header[PAGE - 10 :] == SWAP_MAGIC
    assert struct.unpack_from("<III", header, 1024) == (1, 255, 0)
    assert header[1036:1052] != bytes(16)  # sws_uuid
    assert len(swap_bytes(m)) == 1 << 20
    assert m.swaps().splitlines()[1].split()[1:] == ["partition", "1020", "0", "-2"]


def test_a_page_written_through_a_keyid_is_in_swap_in_clear() -> None:
    """mm/page_io.c swap_writepage() reads the page through the kernel's
    mapping, page_to_virt(), which the series makes the direct mapping of the
    page's KeyID (patch 18): the device receives plaintext."""
    m, _a = swapped_out()
    assert SECRET in swap_bytes(m)
    assert SECRET not in m.read_dram(0, m.phys_mem)
    assert vmstat(m)["pswpout"] == 1
    assert m.check() == []


def test_encrypted_swap_keeps_the_page_out_of_the_device_in_clear() -> None:
    """dm-crypt aes-xts-plain64 under the device's own key: ciphertext on the
    disk, the page back intact on the next fault."""
    m, a = two_keys()
    m.swap_encryption = True
    ctl(m, a, f"mmap {U:#x} 16K rw- keyid=1")
    m.write_virt(a, U, SECRET)
    ctl(m, a, f"madvise {U:#x} 16K pageout")
    assert SECRET not in swap_bytes(m)
    assert m.read_virt(a, U, len(SECRET)) == SECRET
    assert m.check() == []


def test_swap_in_allocates_a_page_of_the_vmas_keyid_and_frees_the_slot() -> None:
    """mm/memory.c do_swap_page(): a new page for the VMA (patch 05's
    alloc_page_vma with the VMA's KeyID), the slot freed once read."""
    m, a = swapped_out()
    pages_before = m.kernel.pages_of(1)
    assert m.read_virt(a, U, len(SECRET)) == SECRET
    assert m.kernel.pages_of(1) == pages_before + 1
    assert pagemap_entry(m, a, U) >> 63 == 1
    assert m.kernel.swap.in_use() == 0
    assert vmstat(m)["pswpin"] == 1
    assert m.check() == []


def test_a_swapped_page_shows_in_pagemap_smaps_and_swaps() -> None:
    """Documentation/admin-guide/mm/pagemap.rst: "Bit 62 page swapped", bits
    0-4 swap type, bits 5-54 swap offset; smaps Swap: and SwapPss:."""
    m, a = swapped_out()
    entry = pagemap_entry(m, a, U)
    assert entry >> 62 == 1  # swapped, not present
    assert entry & 0x1F == 0
    assert (entry >> 5) & ((1 << 50) - 1) == 1
    smaps = m.smaps(a)
    assert "Swap:                  4 kB" in smaps
    assert "SwapPss:               4 kB" in smaps
    assert m.swaps().splitlines()[1].split()[3] == "4"


def test_munmap_frees_the_slots_of_swapped_pages() -> None:
    m, a = swapped_out()
    ctl(m, a, f"munmap {U:#x} 16K")
    assert m.kernel.swap.in_use() == 0
    assert m.check() == []


def test_reclaim_swaps_pages_out_before_an_allocation_fails() -> None:
    """mm/page_alloc.c __alloc_pages_slowpath(): direct reclaim before the
    allocation gives up; ENOMEM only once swap is full too."""
    m = machine(phys_mem="8M", swap="2M")
    a = space(m)
    ctl(m, a, f"mmap {U:#x} 9M rw-")
    for va in range(U, U + (9 << 20), PAGE):
        m.write_virt(a, va, va.to_bytes(8, "little"))
    assert vmstat(m)["allocstall_normal"] > 0
    assert vmstat(m)["pswpout"] > 0
    assert all(
        m.read_virt(a, va, 8) == va.to_bytes(8, "little")
        for va in range(U, U + (9 << 20), 64 * PAGE)
    )
    assert m.check() == []
    ctl(m, a, f"mmap {U + (16 << 20):#x} 4M rw-")
    for va in range(U + (16 << 20), U + (20 << 20), PAGE):
        try:
            m.write_virt(a, va, b"x")
        except SandboxError as err:
            failed = err
            break
    assert failed.errno == errno.ENOMEM
    assert m.check() == []


def test_mlocked_pages_never_leave_memory() -> None:
    """mm/vmscan.c: VM_LOCKED pages are unevictable; MADV_PAGEOUT refuses a
    locked VMA (can_madv_lru_vma) with EINVAL."""
    m, a = two_keys()
    ctl(m, a, f"mmap {U:#x} 16K rw- keyid=1")
    m.write_virt(a, U, SECRET)
    mm = m.kernel.space(a)
    vma = mm.find_vma(U)
    assert vma is not None
    mm.replace(vma, vma.with_(vm_flags=vma.vm_flags | VM.LOCKED))
    with pytest.raises(SandboxError) as caught:
        ctl(m, a, f"madvise {U:#x} 16K pageout")
    assert caught.value.errno == errno.EINVAL
    from mktme_sandbox.kernel.vmscan import try_to_free_pages

    assert try_to_free_pages(m.kernel) == 0
    assert SECRET not in swap_bytes(m)


def test_a_machine_without_swap_has_an_empty_device_and_pageout_does_nothing() -> None:
    m = machine(swap=0)
    a = space(m)
    ctl(m, a, f"mmap {U:#x} 4K rw-")
    m.write_virt(a, U, b"x")
    ctl(m, a, f"madvise {U:#x} 4K pageout")
    assert swap_bytes(m) == b""
    assert m.swaps().count("\n") == 1
    assert pagemap_entry(m, a, U) >> 63 == 1


def test_the_audit_reports_a_forged_swap_entry_and_a_leaked_slot() -> None:
    m, a = swapped_out()
    mm = m.kernel.space(a)
    m.kernel.pt.set_pte(mm.pgd, U + PAGE, swp_entry_to_pte(0, 200))
    m.kernel.swap.swap_map[7] = 1
    problems = "\n".join(m.check())
    assert "swap entry names no slot in use" in problems
    assert "slot count differs from the swap entries naming it" in problems


def test_a_snapshot_keeps_the_swapped_pages(tmp_path: Path) -> None:
    m, a = swapped_out(swap="1M")
    m.snapshot(tmp_path / "s")
    other = machine(swap="1M")
    other.restore(tmp_path / "s")
    assert other.read_virt(a, U, len(SECRET)) == SECRET
    assert other.check() == []


def test_fork_copies_swap_entries_so_the_child_reads_the_swapped_page_too() -> None:
    """mm/memory.c copy_one_pte(): a non-present swap entry is copied as it is
    after ``swap_duplicate(entry)``; both sides then fault the page back in
    from the one slot, which is freed with its last reference."""
    m, a = swapped_out()
    ctl(m, a, "fork b")
    slot = pagemap_entry(m, a, U) >> 5 & ((1 << 50) - 1)
    assert pagemap_entry(m, "b", U) == pagemap_entry(m, a, U)
    assert m.check() == []
    assert m.read_virt("b", U, len(SECRET)) == SECRET
    assert m.read_virt(a, U, len(SECRET)) == SECRET
    assert "Swap:                  0 kB" in m.smaps(a)
    assert slot
    assert m.swaps().splitlines()[1].split()[3] == "0"  # the slot is free again
    assert m.check() == []


def test_a_user_with_limits_swaps_at_most_half_the_device_and_root_still_can() -> None:
    """docs/spec.md 8: no user can take every page, on the swap device either.
    A slot is charged to the uid of the page it holds; a uid with limits holds
    at most half the slots; past that its pages stay in memory, a dmesg line
    says so, and another user's pageout still finds room."""
    m = machine(phys_mem="64M", swap="1M")  # 255 slots
    cpu_key(m, 1, 1000)
    space(m, "u", 1000)
    ctl(m, "u", f"mmap {U:#x} 1M rw- keyid=1 populate", 1000)
    ctl(m, "u", f"madvise {U:#x} 1M pageout", 1000)
    assert m.swaps().splitlines()[1].split()[3] == str(127 * 4)
    assert "then its share of swap" in m.dmesg()
    space(m, "r")
    ctl(m, "r", f"mmap {U:#x} 64K rw- populate")
    ctl(m, "r", f"madvise {U:#x} 64K pageout")
    assert "Swap:                 64 kB" in m.smaps("r")
    ctl(m, "u", f"munmap {U:#x} 1M", 1000)
    assert m.swaps().splitlines()[1].split()[3] == "64"
    assert m.check() == []


def fill_until_reclaim(m: Machine, a: str, va: int, stalls: int) -> int:
    """Write one page after another from ``va`` until direct reclaim has run
    ``stalls`` times; the next address to write."""
    while vmstat(m)["allocstall_normal"] < stalls:
        m.write_virt(a, va, va.to_bytes(8, "little"))
        va += PAGE
    return va


def test_direct_reclaim_frees_swap_cluster_max_pages_and_spares_the_young() -> None:
    """mm/vmscan.c: try_to_free_pages() reclaims ``SWAP_CLUSTER_MAX`` (32)
    pages and stops; folio_check_references() keeps a page whose accessed bit
    is set (clearing it, ptep_clear_flush_young()) and takes an older one."""
    m = machine(phys_mem="8M", swap="2M")
    a = space(m)
    ctl(m, a, f"mmap {U:#x} 9M rw-")
    va = fill_until_reclaim(m, a, U, 1)
    assert vmstat(m)["pswpout"] == 32  # U .. U + 31 pages, the oldest
    assert m.read_virt(a, U, 8) == U.to_bytes(8, "little")  # swapped in: young
    fill_until_reclaim(m, a, va, 2)
    assert vmstat(m)["pswpout"] == 64
    assert pagemap_entry(m, a, U) >> 63  # still present, first in the clock's order
    assert not pagemap_entry(m, a, U + 63 * PAGE) >> 63  # an old page went instead
    assert m.check() == []


def test_the_slots_a_user_frees_count_again_for_its_share() -> None:
    """mm/swapfile.c swap_entry_free() uncharges the slot it frees
    (``mem_cgroup_uncharge_swap()``): docs/spec.md 8's half-the-device share
    is what a user holds now, not all it ever swapped out."""
    m = machine(phys_mem="64M", swap="1M")  # 255 slots
    cpu_key(m, 1, 1000)
    space(m, "u", 1000)
    for _ in range(2):
        ctl(m, "u", f"mmap {U:#x} 1M rw- keyid=1 populate", 1000)
        ctl(m, "u", f"madvise {U:#x} 1M pageout", 1000)
        assert m.swaps().splitlines()[1].split()[3] == str(127 * 4)
        ctl(m, "u", f"munmap {U:#x} 1M", 1000)
        assert m.swaps().splitlines()[1].split()[3] == "0"
    assert m.check() == []


def free_pages(m: Machine) -> int:
    return sum(m.kernel.alloc.free_pages_by_keyid().values())


def test_a_fork_whose_tables_need_reclaim_copies_the_pages_swapped_meanwhile() -> None:
    """mm/memory.c copy_pte_range() reads the parent's PTEs only once the
    child's table is there (``pte_alloc_map_lock(dst_mm, ...)``, then
    ``src_pte = pte_offset_map(src_pmd, addr)``): the direct reclaim that
    allocation may run swaps out parent pages not yet shared, and the child
    gets their swap entries, not the PTEs they had before."""
    m = machine(phys_mem="8M", swap="16M")
    a = space(m)
    ctl(m, a, f"mmap {U:#x} 16M rw-")
    va = U
    while not vmstat(m)["pswpout"] or free_pages(m):
        m.write_virt(a, va, va.to_bytes(8, "little"))
        va += PAGE
    ctl(m, a, f"munmap {va - PAGE:#x} {PAGE}")  # one free page: the child's PGD
    ctl(m, a, "fork b")
    assert "Bad page map" not in m.dmesg()
    assert all(
        m.read_virt("b", page, 8) == page.to_bytes(8, "little")
        for page in range(U, va - PAGE, PAGE)
    )
    assert m.check() == []


def test_mprotect_leaves_a_swap_entry_as_it_is_and_the_page_comes_back() -> None:
    """docs/spec.md 3.10: "``mprotect`` leaves swap entries as they are"
    (mm/mprotect.c change_pte_range() changes only present PTEs; a swap entry
    holds no protection): the page comes back on the next fault, with the
    VMA's new protection and KeyID."""
    m, a = swapped_out()
    entry = pagemap_entry(m, a, U)
    ctl(m, a, f"mprotect {U:#x} 16K r--")
    assert pagemap_entry(m, a, U) == entry
    assert m.read_virt(a, U, len(SECRET)) == SECRET
    assert m.kernel.swap.in_use() == 0
    assert m.check() == []


def swap_slot(m: Machine, name: str, va: int) -> int:
    """The slot a swapped page's pagemap entry names (bits 5-54, type 0)."""
    return pagemap_entry(m, name, va) >> 5 & ((1 << 50) - 1)


def test_a_slot_freed_by_swap_in_is_the_next_one_taken() -> None:
    """docs/spec.md 3.10: "A slot is taken lowest first and freed when its
    page comes back" (mm/swapfile.c scan_swap_map_slots() searches from
    ``lowest_bit``, which swap_entry_free() lowers again)."""
    m, a = swapped_out()
    m.write_virt(a, U + PAGE, SECRET)
    ctl(m, a, f"madvise {U + PAGE:#x} 4K pageout")
    assert (swap_slot(m, a, U), swap_slot(m, a, U + PAGE)) == (1, 2)
    assert m.read_virt(a, U, len(SECRET)) == SECRET  # slot 1 is free again
    m.write_virt(a, U + 2 * PAGE, SECRET)
    ctl(m, a, f"madvise {U + 2 * PAGE:#x} 4K pageout")
    assert swap_slot(m, a, U + 2 * PAGE) == 1


def test_encrypted_swap_is_aes_xts_plain64_with_the_disks_sector_numbers() -> None:
    """dm-crypt ``aes-xts-plain64`` (docs/spec.md 3.10): each 512-byte sector
    is encrypted with the IV "the sector number, little-endian", counted from
    the start of the device, so slot 1 is sectors 8 to 15."""
    m, a = two_keys()
    m.swap_encryption = True
    ctl(m, a, f"mmap {U:#x} 16K rw- keyid=1")
    m.write_virt(a, U, SECRET)
    ctl(m, a, f"madvise {U:#x} 4K pageout")
    key = m.kernel.swap.export_state()["key"]  # a snapshot holds it too
    disk = m.read_swap(PAGE, PAGE)
    plain = b"".join(
        Cipher(algorithms.AES(key), modes.XTS((8 + i).to_bytes(16, "little")))
        .decryptor()
        .update(disk[i * 512 : (i + 1) * 512])
        for i in range(8)
    )
    assert plain == SECRET + bytes(PAGE - len(SECRET))


def test_a_read_fault_swaps_in_read_only_and_a_write_then_reuses_the_page() -> None:
    """docs/spec.md 3.10: do_swap_page maps the page "writable at once on a
    write fault" (mm/memory.c: ``maybe_mkwrite(pte_mkdirty(pte), vma)`` only
    under ``FAULT_FLAG_WRITE``): after a read it is read-only, and the first
    write takes a write-protect fault that reuses the exclusive page."""
    m, a = swapped_out()
    assert m.read_virt(a, U, len(SECRET)) == SECRET
    pfn = leaf(m, a, U).pte & m.kernel.pte_layout.pfn_mask
    assert not leaf(m, a, U).pte & PteFlags.RW
    writes = vmstat(m)["mktme_pgfault_write"]
    m.write_virt(a, U, b"x")
    assert vmstat(m)["mktme_pgfault_write"] == writes + 1
    assert leaf(m, a, U).pte & PteFlags.RW
    assert leaf(m, a, U).pte & m.kernel.pte_layout.pfn_mask == pfn


def test_pageout_leaves_a_page_a_fork_shares_in_memory_for_both() -> None:
    """docs/spec.md 3.10: pageout and reclaim move a 4 KiB anonymous page
    mapped once; a page a fork shares (mapped twice) stays (the sandbox has
    no swap cache to unmap every mapper at once, which Linux's
    try_to_unmap() does): both spaces keep reading it, nothing is written
    to swap for it."""
    m, a = two_keys()
    ctl(m, a, f"mmap {U:#x} 4K rw- keyid=1")
    m.write_virt(a, U, SECRET)
    m.fork(a, "child", 0)
    outs = vmstat(m)["pswpout"]
    ctl(m, a, f"madvise {U:#x} 4K pageout")
    assert vmstat(m)["pswpout"] == outs
    assert m.read_virt(a, U, len(SECRET)) == SECRET
    assert m.read_virt("child", U, len(SECRET)) == SECRET
    assert m.check() == []
