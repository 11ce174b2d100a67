"""Translation through real page tables: the TLB sees a PTE changed through
physical memory only after a flush, a tampered KeyID reads garbage, and
garbage in a page table gives EIO, never a crash."""

from __future__ import annotations

import contextlib
import errno
import random
from collections.abc import Callable

import pytest

from kernel_helpers import PAGE, U, cpu_key, ctl, leaf, machine, pfn_of, space
from mktme_sandbox import Machine, SandboxError
from mktme_sandbox.kernel.pgtable_types import PteFlags

SECRET = b"tenant secret 42"


@pytest.fixture
def m(m: Machine) -> Machine:
    ctl(m, "a", f"mmap {U:#x} 8K rw- keyid=1")
    m.write_virt("a", U, SECRET)
    return m


def pte_address(m: Machine, va: int) -> int:
    return leaf(m, "a", va).entry_pa


def rewrite_keyid(m: Machine, va: int, keyid: int) -> None:
    """What an attacker with keyids/0/mem does: new KeyID bits in the PTE."""
    pa = pte_address(m, va)
    pte = int.from_bytes(m.read_phys(0, pa, 8), "little")
    layout = m.kernel.pte_layout
    pte = (pte & ~layout.keyid_mask) | (keyid << layout.keyid_shift)
    m.write_phys(0, pa, pte.to_bytes(8, "little"))


def test_a_pte_changed_in_memory_is_used_only_after_a_tlb_flush(m: Machine) -> None:
    rewrite_keyid(m, U, 2)
    assert m.read_virt("a", U, len(SECRET)) == SECRET  # stale TLB entry
    assert any("missing TLB flush" in line for line in m.check())
    m.flush_tlb("a")
    assert not any("TLB" in line for line in m.check())
    assert m.read_virt("a", U, len(SECRET)) != SECRET


def test_putting_the_keyid_back_restores_the_plaintext(m: Machine) -> None:
    rewrite_keyid(m, U, 2)
    m.flush_tlb("a")
    rewrite_keyid(m, U, 1)
    m.flush_tlb("a")
    assert m.read_virt("a", U, len(SECRET)) == SECRET


def test_a_keyid_the_hardware_lacks_in_a_pte_is_eio() -> None:
    m = machine(max_keys=3)  # KeyIDs 1..3, but 6 KeyID bits in the PTE
    cpu_key(m, 1)
    space(m)
    ctl(m, "a", f"mmap {U:#x} 4K rw- keyid=1 populate")
    rewrite_keyid(m, U, 40)
    m.flush_tlb("a")
    with pytest.raises(SandboxError) as info:
        m.read_virt("a", U, 1)
    assert info.value.errno == errno.EIO


def test_garbage_in_the_page_tables_gives_errors_never_a_crash(m: Machine) -> None:
    ctl(m, "a", f"mmap {U + 4 * PAGE:#x} 4K rw- keyid=2 populate")
    rng = random.Random(7)
    table = pte_address(m, U) & ~(PAGE - 1)
    m.write_phys(0, table, rng.randbytes(PAGE))
    m.write_phys(0, m.cr3("a") + 8, rng.randbytes(64))
    m.flush_tlb("a")
    calls: list[Callable[[], object]] = [
        lambda: m.read_virt("a", U, 64),
        lambda: m.write_virt("a", U + PAGE, b"x"),
        lambda: m.smaps("a"),
        lambda: m.pagemap("a", (U >> 12) * 8, 64),
        lambda: m.ptdump("a"),
        lambda: m.check(),
        lambda: m.ksm_run(),
    ]
    for call in calls:
        with contextlib.suppress(SandboxError):
            call()
    assert m.key_status(1)  # the machine still answers


def test_a_pte_pointed_at_a_page_table_is_reported_not_freed(m: Machine) -> None:
    pa = pte_address(m, U)
    pgd_pfn = m.cr3("a") >> 12
    pte = int.from_bytes(m.read_phys(0, pa, 8), "little")
    layout = m.kernel.pte_layout
    forged = (pte & ~layout.pfn_mask) | (pgd_pfn << 12)
    m.write_phys(0, pa, forged.to_bytes(8, "little"))
    ctl(m, "a", f"munmap {U:#x} 4K")
    assert "BUG: Bad page map in space a" in m.dmesg()
    assert not m.kernel.alloc.is_free(pgd_pfn)
    ctl(m, "a", f"mmap {U:#x} 4K rw- populate")
    # the page the PTE used to map is orphaned, and the audit says so; nothing else
    assert [line.split(":")[1].strip() for line in m.check()] == [
        "map count differs from the PTEs mapping the page"
    ]


def test_page_tables_that_point_back_at_themselves_are_walked_once(m: Machine) -> None:
    import threading

    cr3 = m.cr3("a")
    loop = (cr3 | 0x67).to_bytes(8, "little") * 512  # every PGD entry -> the PGD
    m.write_phys(0, cr3, loop)
    m.flush_tlb("a")
    results = []

    def walk_everything() -> None:
        for call in (m.check, lambda: m.smaps("a"), lambda: m.ptdump("a"),
                     lambda: m.pagemap("a", 0, 4096)):  # fmt: skip
            with contextlib.suppress(SandboxError):
                call()
        m.destroy_space("a", uid=0)
        results.append("done")

    worker = threading.Thread(target=walk_everything, daemon=True)
    worker.start()
    worker.join(timeout=60)  # bounded walks take milliseconds; 512**4 leaves never end
    assert results == ["done"]


def test_a_read_fault_in_a_read_only_encrypted_vma_maps_its_page_read_only() -> None:
    """mm/memory.c do_anonymous_page(): ``if (vma->vm_flags & VM_WRITE) entry =
    pte_mkwrite(pte_mkdirty(entry))``; an encrypted VMA gets a page of its own
    instead of the zero page, and still no write bit where the VMA has none."""
    m = machine()
    cpu_key(m, 1)
    a = space(m)
    ctl(m, a, f"mmap {U:#x} 4K r-- keyid=1")
    assert m.read_virt(a, U, 8) == bytes(8)
    assert not leaf(m, a, U).pte & PteFlags.RW


def test_a_child_whose_parent_copied_reuses_its_page_on_a_write() -> None:
    """mm/memory.c do_wp_page(): ``if (reuse_swap_page(vmf->page, ...)) {
    ... wp_page_reuse(vmf); return VM_FAULT_WRITE; }`` - after a fork the
    parent's write copies; the child, the page's last mapper, then writes
    in place: no second copy, each side reads its own bytes, and the
    translation the child's read cached agrees with the tables (mm/check)."""
    m = machine()
    cpu_key(m, 1)
    a = space(m)
    ctl(m, a, f"mmap {U:#x} 4K rw- keyid=1")
    m.write_virt(a, U, b"parent")
    m.fork(a, "child", 0)
    assert m.read_virt("child", U, 6) == b"parent"  # caches the read-only entry
    m.write_virt(a, U, b"PARENT")  # COW: the parent gets a copy
    before = pfn_of(m, "child", U)
    m.write_virt("child", U, b"child!")  # the child's page is its own now: reuse
    assert pfn_of(m, "child", U) == before  # the same frame: no copy
    assert (m.read_virt(a, U, 6), m.read_virt("child", U, 6)) == (b"PARENT", b"child!")
    assert m.check() == []
