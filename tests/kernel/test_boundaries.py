"""The edges of every range, one byte or one page on each side.

User space is ``mmap_min_addr`` (0x10000) to ``TASK_SIZE`` (0x7ffffffff000:
arch/x86/include/asm/page_64_types.h, ``TASK_SIZE_MAX ((1UL << 47) - PAGE_SIZE)``);
physical memory is 0..phys_mem; a VMA is [start, end); the MSRs are
0x981..0x984; KeyIDs are 1..nr_keyids (0 for ``keyids/0/mem``).
"""

from __future__ import annotations

import errno

import pytest

from mktme_sandbox import Machine, SandboxError

PAGE = 4096
MIN = 0x10000
TOP = 0x7FFFFFFFF000
BASE = 0x10000000


@pytest.fixture
def m() -> Machine:
    machine = Machine(phys_mem="16M", seed=1, keyid_bits=2)
    machine.key_command(1, "type=cpu algorithm=aes-xts-128", uid=0)
    machine.create_space("a", uid=0)
    return machine


def refused(call: object, err: int) -> None:
    with pytest.raises(SandboxError) as raised:
        call()  # type: ignore[operator]
    assert raised.value.errno == err, raised.value


# --- user space -----------------------------------------------------------------------


def test_the_last_page_below_task_size_maps_and_the_next_does_not(m: Machine) -> None:
    m.space_command("a", f"mmap {TOP - PAGE:#x} 4096 rw- keyid=1", uid=0)
    m.write_virt("a", TOP - 1, b"z")
    assert m.read_virt("a", TOP - 1, 1) == b"z"
    refused(lambda: m.space_command("a", f"mmap {TOP:#x} 4096 rw-", uid=0), errno.ENOMEM)
    refused(lambda: m.space_command("a", f"mmap {TOP - PAGE:#x} 8192 rw-", uid=0), errno.ENOMEM)
    refused(lambda: m.read_virt("a", TOP, 1), errno.EIO)
    assert m.check() == []


def test_the_first_page_at_mmap_min_addr_maps_and_the_one_below_does_not(m: Machine) -> None:
    m.space_command("a", f"mmap {MIN:#x} 4096 rw-", uid=0)
    refused(lambda: m.space_command("a", f"mmap {MIN - PAGE:#x} 4096 rw-", uid=0), errno.ENOMEM)
    refused(lambda: m.space_command("a", f"mprotect {MIN - PAGE:#x} 8192 r--", uid=0), errno.ENOMEM)


def test_pagemap_ends_with_the_last_user_page(m: Machine) -> None:
    last = (1 << 47) // PAGE - 1
    assert len(m.pagemap("a", last * 8, 8)) == 8
    assert m.pagemap("a", (last + 1) * 8, 8) == b""


# --- a VMA ----------------------------------------------------------------------------


def test_the_last_byte_of_a_vma_is_its_own_and_the_next_is_nobodys(m: Machine) -> None:
    m.space_command("a", f"mmap {BASE:#x} 8192 rw- keyid=1", uid=0)
    m.write_virt("a", BASE + 8191, b"!")
    assert m.read_virt("a", BASE + 8191, 1) == b"!"
    refused(lambda: m.read_virt("a", BASE + 8192, 1), errno.EIO)
    refused(lambda: m.write_virt("a", BASE + 8191, b"!!"), errno.EIO)
    assert m.read_virt("a", BASE + 8191, 1) == b"!"  # nothing half-written
    assert m.read_virt("a", BASE - 1 + 1, 1) == b"\0"


def test_a_read_across_the_end_of_a_vma_stops_there(m: Machine) -> None:
    """As /proc/PID/mem: the bytes up to the hole, then a short read."""
    m.space_command("a", f"mmap {BASE:#x} 4096 rw-", uid=0)
    assert m.read_virt("a", BASE + 4000, 200) == bytes(96)


def test_munmap_of_one_page_past_a_vma_changes_nothing(m: Machine) -> None:
    m.space_command("a", f"mmap {BASE:#x} 8192 rw- keyid=1 populate", uid=0)
    maps = m.maps("a")
    m.space_command("a", f"munmap {BASE + 8192:#x} 4096", uid=0)
    assert m.maps("a") == maps
    assert m.check() == []


# --- physical memory --------------------------------------------------------------------


def test_the_last_byte_of_dram_and_nothing_past_it(m: Machine) -> None:
    end = m.phys_mem
    m.write_dram(end - 1, b"\x7f")
    assert m.read_dram(end - 1, 10) == b"\x7f"  # a read stops at the end
    assert m.read_dram(end, 10) == b""
    refused(lambda: m.write_dram(end - 1, b"ab"), errno.ENOSPC)
    assert m.read_dram(end - 1, 1) == b"\x7f"  # nothing half-written


def test_the_last_line_through_a_keyid_and_nothing_past_it(m: Machine) -> None:
    end = m.phys_mem
    m.write_phys(0, end - 64, b"line" * 16)
    assert m.read_phys(0, end - 64, 128) == b"line" * 16
    assert m.read_phys(1, end, 8) == b""
    refused(lambda: m.write_phys(0, end - 1, b"ab"), errno.ENOSPC)


def test_clflush_takes_the_last_line_of_dram_and_nothing_past_it(m: Machine) -> None:
    """docs/spec.md 7: "``clflush`` of an address beyond physical memory: EINVAL";
    its KeyID is one of 0..nr_keyids like any other, and ``clflush PA [keyid=N]``
    (4.4) has no fourth word."""
    end = m.phys_mem
    m.cache_command(f"clflush {end - 64:#x} keyid=1")
    refused(lambda: m.cache_command(f"clflush {end:#x}"), errno.EINVAL)
    refused(lambda: m.cache_command(f"clflush {end - 64:#x} keyid=4"), errno.EINVAL)
    refused(lambda: m.cache_command(f"clflush {end - 64:#x} keyid=1 keyid=2"), errno.EINVAL)


def test_the_swap_file_starts_at_offset_0_and_stops_at_its_size(m: Machine) -> None:
    """``swap`` is a disk (docs/spec.md 4.3): offset = byte of the partition, a
    read stops short at its end; a negative offset is EINVAL, as for ``dram``,
    never the header page again."""
    end = m.swap_size
    assert m.read_swap(PAGE - 10, 10) == b"SWAPSPACE2"  # the header's last bytes
    assert len(m.read_swap(end - 1, 64)) == 1
    assert m.read_swap(end, 8) == b""
    refused(lambda: m.read_swap(-8, 8), errno.EINVAL)


def test_keyids_are_one_to_nr_keyids(m: Machine) -> None:
    assert m.nr_keyids == 3
    m.key_command(3, "type=cpu algorithm=aes-xts-128", uid=0)
    refused(lambda: m.key_command(4, "type=cpu algorithm=aes-xts-128", uid=0), errno.EINVAL)
    refused(lambda: m.read_phys(4, 0, 8), errno.EINVAL)
    assert len(m.read_phys(3, 0, 8)) == 8


# --- MSRs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "ok"), [(0x980, False), (0x981, True), (0x984, True), (0x985, False)]
)
def test_the_msr_file_answers_0x981_to_0x984_only(m: Machine, offset: int, ok: bool) -> None:
    if ok:
        assert len(m.read_msr_file(offset, 8)) == 8
    else:
        refused(lambda: m.read_msr_file(offset, 8), errno.EIO)
