"""The client's answers are Machine's: the same commands on an in-process Machine
and on a mount started with the same options and seed, the same questions asked
of both (check, key status, maps and smaps VMAs, pagemap and translate,
page_keyid, vmstat)."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

import pytest

from mktme_sandbox.client import PAGE, Mount, Space, Translation, Vma, parse_smaps
from mktme_sandbox.machine import Machine

pytestmark = [pytest.mark.mount, pytest.mark.mktme(phys_mem="16M", keyid_bits=3, seed=7)]

VA = 0x7F0000000000
SECRET = b"the same bytes on both machines"
KEYS = {1: "type=cpu algorithm=aes-xts-128", 2: "type=no-encrypt"}
SPACE_COMMANDS = [
    f"mmap {VA:#x} 64K rw- keyid=1 populate",
    f"mmap {VA + 0x100000:#x} 8K r--",
    f"mmap {VA + 0x200000:#x} 16K rw- keyid=2 populate",
    f"munmap {VA + 0x4000:#x} 8K",
]


def on_the_machine(m: Machine) -> None:
    uid = os.getuid()
    for keyid, payload in KEYS.items():
        m.key_command(keyid, payload, uid)
    m.create_space("diff", uid)
    for command in SPACE_COMMANDS:
        m.space_command("diff", command, uid)
    m.write_virt("diff", VA + 100, SECRET)


def on_the_mount(mount: Mount) -> Space:
    for keyid, payload in KEYS.items():
        mount.program_key(keyid, payload)
    space = mount.create_space("diff")
    for command in SPACE_COMMANDS:
        space.ctl(command)
    space.write(VA + 100, SECRET)
    return space


def machine_translate(m: Machine, va: int) -> Translation:
    (raw,) = struct.unpack("<Q", m.pagemap("diff", va // PAGE * 8, 8))
    entry = Translation(va, raw)
    keyid = machine_page_keyids(m)[entry.pfn] if entry.present else None
    return Translation(va, raw, keyid)


def machine_page_keyids(m: Machine) -> list[int]:
    data = m.page_keyid(0, m.phys_mem // PAGE * 8)
    return [k for (k,) in struct.iter_unpack("<Q", data)]


def every_page(vmas: list[Vma]) -> list[int]:
    return [va for v in vmas for va in range(v.start, v.end, PAGE)]


@pytest.fixture
def both(
    mktme_machine: Machine, mktme_mount_factory: Callable[..., Mount]
) -> tuple[Machine, Mount, Space]:
    mount = mktme_mount_factory()
    on_the_machine(mktme_machine)
    return mktme_machine, mount, on_the_mount(mount)


def test_vmstat_is_the_machines(both: tuple[Machine, Mount, Space]) -> None:
    m, mount, _ = both
    assert mount.vmstat() == m.vmstat_counts()


def test_check_is_the_machines_list_of_violations(both: tuple[Machine, Mount, Space]) -> None:
    m, mount, _ = both
    assert mount.check() == m.check() == []


def test_every_key_status_is_the_machines(both: tuple[Machine, Mount, Space]) -> None:
    m, mount, _ = both
    assert mount.keyids() == list(range(1, m.nr_keyids + 1))
    for status in mount.key_table():
        assert status.line == m.key_status(status.keyid).strip()
    assert [k.programmed for k in mount.key_table()][:3] == [True, True, False]


def test_maps_and_smaps_vmas_are_the_machines(both: tuple[Machine, Mount, Space]) -> None:
    m, _, space = both
    assert space.smaps() == parse_smaps(m.smaps("diff"))
    assert space.maps() == parse_smaps(m.maps("diff"))
    assert [v.keyid for v in space.smaps()] == [1, 1, 0, 2]


def test_translate_gives_the_machines_physical_address_and_keyid(
    both: tuple[Machine, Mount, Space],
) -> None:
    m, mount, space = both
    pages = every_page(space.smaps())
    assert [space.translate(va) for va in pages] == [machine_translate(m, va) for va in pages]
    secret = space.translate(VA + 100)
    assert secret.present
    assert secret.keyid == 1
    assert secret.pa % PAGE == 100
    assert mount.phys(1, secret.pa, len(SECRET)) == SECRET
    assert space.translate(VA + 0x100000).keyid is None  # mapped, never touched


def test_page_keyid_of_every_frame_is_the_machines(both: tuple[Machine, Mount, Space]) -> None:
    m, mount, _ = both
    assert mount.page_keyids() == machine_page_keyids(m)
