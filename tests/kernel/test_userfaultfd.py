"""userfaultfd in missing mode (issue 12): register and unregister under patch
01's vma_merge rule, missing faults queued in ``spaces/NAME/uffd`` with EAGAIN,
UFFDIO_COPY into a page of the VMA's KeyID, and UFFDIO_ZEROPAGE, which v5
leaves mapping the zero page in an encrypted VMA (mfill_zeropage_pte())."""

from __future__ import annotations

import errno
from collections.abc import Callable

import pytest

from kernel_helpers import PAGE, U, ctl, page_keyid, pfn_of, smaps_keyids, two_keys
from mktme_sandbox import Machine
from mktme_sandbox.errors import SandboxError
from mktme_sandbox.kernel.kernel import LATER_FIXES

SECRET = b"attack at dawn!!" * 4
SRC = U + 0x100000


def registered(keyid: int = 1, pages: int = 4) -> tuple[Machine, str]:
    """Space "a": a KeyID-``keyid`` VMA at U registered whole, and a populated
    source at SRC holding SECRET."""
    m, a = two_keys()
    ctl(m, a, f"mmap {U:#x} {pages * PAGE} rw- keyid={keyid}")
    ctl(m, a, f"mmap {SRC:#x} {PAGE} rw- keyid=2 populate")
    m.write_virt(a, SRC, SECRET)
    ctl(m, a, f"uffd register {U:#x} {pages * PAGE}")
    return m, a


def errno_of(call: Callable[[], object]) -> int | None:
    with pytest.raises(SandboxError) as caught:
        call()
    return caught.value.errno


def test_a_missing_fault_fails_with_eagain_and_is_queued_with_linuxs_fields() -> None:
    m, a = registered()
    assert errno_of(lambda: m.read_virt(a, U + 8, 4)) == errno.EAGAIN
    assert errno_of(lambda: m.write_virt(a, U + PAGE, b"x")) == errno.EAGAIN
    assert m.uffd(a) == (
        f"event=0x12 flags=0x0 address={U:#x}\nevent=0x12 flags=0x1 address={U + PAGE:#x}\n"
    )
    assert f"missing read fault at {U:#x} queued" in m.dmesg()
    assert m.check() == []


def test_uffd_copy_fills_a_new_page_of_the_vmas_keyid_and_resolves_the_fault() -> None:
    m, a = registered(keyid=1)
    with pytest.raises(SandboxError):
        m.read_virt(a, U, 4)
    ctl(m, a, f"uffd copy {U:#x} {SRC:#x} {PAGE}")
    assert m.uffd(a) == ""
    assert m.read_virt(a, U, len(SECRET)) == SECRET
    assert page_keyid(m, pfn_of(m, a, U)) == 1  # the source page is KeyID 2
    m.write_virt(a, U, b"still writable")
    assert m.check() == []


def test_register_splits_at_the_range_and_unregister_merges_back() -> None:
    m, a = two_keys()
    ctl(m, a, f"mmap {U:#x} {4 * PAGE} rw- keyid=1")
    ctl(m, a, f"uffd register {U + PAGE:#x} {PAGE}")
    assert len(m.vmas(a)) == 3
    assert "um" in m.smaps(a).split("VmFlags:")[2].split("\n")[0]
    ctl(m, a, f"uffd unregister {U + PAGE:#x} {PAGE}")
    assert len(m.vmas(a)) == 1


def test_unregister_never_merges_vmas_of_two_keyids() -> None:
    """Patch 01 passes vma_keyid(vma) to both vma_merge() calls of fs/userfaultfd.c."""
    m, a = two_keys()
    ctl(m, a, f"mmap {U:#x} {PAGE} rw- keyid=1")
    ctl(m, a, f"mmap {U + PAGE:#x} {PAGE} rw- keyid=2")
    ctl(m, a, f"uffd register {U:#x} {2 * PAGE}")
    ctl(m, a, f"uffd unregister {U:#x} {2 * PAGE}")
    assert smaps_keyids(m, a) == [1, 2]


def test_without_the_merge_check_unregister_gives_the_second_vma_the_first_keyid() -> None:
    m, a = two_keys()
    m.set_mitigation("vma_merge_keyid_check", False)
    ctl(m, a, f"mmap {U:#x} {PAGE} rw- keyid=1")
    ctl(m, a, f"mmap {U + PAGE:#x} {PAGE} rw- keyid=2")
    ctl(m, a, f"uffd register {U:#x} {PAGE}")
    ctl(m, a, f"uffd unregister {U:#x} {PAGE}")
    assert smaps_keyids(m, a) == [1]


def test_a_registered_vma_never_merges_with_an_unregistered_neighbour() -> None:
    m, a = two_keys()
    ctl(m, a, f"mmap {U:#x} {PAGE} rw- keyid=1")
    ctl(m, a, f"uffd register {U:#x} {PAGE}")
    ctl(m, a, f"mmap {U + PAGE:#x} {PAGE} rw- keyid=1")
    assert len(m.vmas(a)) == 2


def test_uffd_zeropage_in_a_keyid0_vma_maps_the_zero_page() -> None:
    m, a = registered(keyid=0)
    ctl(m, a, f"uffd zeropage {U:#x} {PAGE}")
    assert m.read_virt(a, U, 16) == bytes(16)
    assert m.check() == []


def test_v5_uffd_zeropage_maps_the_zero_page_in_an_encrypted_vma_and_reads_garbage() -> None:
    """mfill_zeropage_pte(): pte_mkspecial(pfn_pte(my_zero_pfn(dst_addr),
    dst_vma->vm_page_prot)) - no vma_keyid() check in v5 (patch 02 changed
    only do_anonymous_page() and do_huge_pmd_anonymous_page())."""
    m, a = registered(keyid=1)
    assert m.mitigation("uffd_zeropage_encrypted_check") is False
    ctl(m, a, f"uffd zeropage {U:#x} {PAGE}")
    assert m.read_virt(a, U, 16) != bytes(16)
    assert any("zero page mapped in an encrypted VMA" in line for line in m.check())


def test_with_the_later_fix_uffd_zeropage_gives_an_encrypted_vma_a_zeroed_page_of_its_keyid() -> (
    None
):
    m, a = registered(keyid=1)
    m.set_mitigation("uffd_zeropage_encrypted_check", True)
    ctl(m, a, f"uffd zeropage {U:#x} {2 * PAGE}")
    assert m.read_virt(a, U, 2 * PAGE) == bytes(2 * PAGE)
    assert page_keyid(m, pfn_of(m, a, U)) == 1
    assert m.check() == []


def test_later_fixes_are_off_by_default_and_every_other_switch_on() -> None:
    m, _ = two_keys()
    assert {name for name in m.MITIGATIONS if not m.mitigation(name)} == LATER_FIXES


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (f"uffd copy {U:#x} {SRC:#x} 100", errno.EINVAL),  # LEN not page-sized
        (f"uffd register {U + 1:#x} {PAGE}", errno.EINVAL),
        (f"uffd register {U + 0x200000:#x} {PAGE}", errno.EINVAL),  # not mapped
        (f"uffd zeropage {SRC:#x} {PAGE}", errno.ENOENT),  # not registered
        (f"uffd copy {U + 3 * PAGE:#x} {SRC:#x} {2 * PAGE}", errno.ENOENT),  # past the VMA
        (f"uffd copy {U:#x} {U + 0x300000:#x} {PAGE}", errno.EFAULT),  # SRC unmapped
        (f"uffd copy {U:#x} {SRC:#x} {2 * PAGE}", errno.EFAULT),  # SRC's second page unmapped
        ("uffd copy 0x10000000", errno.EINVAL),
        ("uffd steal 0x10000000 4096", errno.EINVAL),
    ],
)
def test_bad_uffd_commands_change_nothing(command: str, expected: int) -> None:
    m, a = registered()
    before = (m.maps(a), m.uffd(a), m.read_virt(a, SRC, len(SECRET)))
    assert errno_of(lambda: ctl(m, a, command)) == expected
    assert (m.maps(a), m.uffd(a), m.read_virt(a, SRC, len(SECRET))) == before
    assert m.check() == []


def test_a_filled_page_is_not_filled_twice() -> None:
    m, a = registered()
    ctl(m, a, f"uffd copy {U + PAGE:#x} {SRC:#x} {PAGE}")
    assert errno_of(lambda: ctl(m, a, f"uffd copy {U:#x} {SRC:#x} {2 * PAGE}")) == errno.EEXIST
    assert m.read_virt(a, U + PAGE, len(SECRET)) == SECRET
    assert errno_of(lambda: m.read_virt(a, U, 1)) == errno.EAGAIN  # U stayed empty


def test_unregister_and_munmap_drop_the_pending_faults() -> None:
    m, a = registered()
    for addr in (U, U + 2 * PAGE):
        with pytest.raises(SandboxError):
            m.read_virt(a, addr, 1)
    ctl(m, a, f"uffd unregister {U:#x} {PAGE}")
    ctl(m, a, f"munmap {U + 2 * PAGE:#x} {PAGE}")
    assert m.uffd(a) == ""
    assert m.read_virt(a, U, 4) == bytes(4)  # an ordinary fault again


def test_a_forked_child_is_not_registered() -> None:
    """dup_userfaultfd() without UFFD_FEATURE_EVENT_FORK clears the registration."""
    m, a = registered(keyid=0)
    m.fork(a, "b", 0)
    assert m.read_virt("b", U, 4) == bytes(4)
    assert errno_of(lambda: m.read_virt(a, U, 4)) == errno.EAGAIN
