"""mktme_sandbox.client, the stdlib client of a mount: its parsers and tables,
mostly without a mount.

The client may import nothing but the standard library, so it keeps stdlib
copies of a few of the package's tables (the /proc/kpageflags bits, the KeyID
layout of an address); these tests hold the copies equal to the originals.
The client's answers against ``Machine``'s are test_client_vs_machine.py.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path

import pytest

from mktme_sandbox.client import (
    Kpf,
    Layout,
    Mount,
    MountError,
    NotAMount,
    PagemapEntry,
    Pte,
    parse_int,
    parse_smaps,
    parse_tme,
    redacted,
    runs,
)
from mktme_sandbox.kernel.pgtable_types import PteLayout
from mktme_sandbox.kernel.proc import KPF
from mktme_sandbox.machine import Machine
from mktme_sandbox.mounting import MountedSandbox

KEY = "a1b2c3d4e5f60718293a4b5c6d7e8f90"


@pytest.fixture(scope="module")
def mnt(module_mount: Callable[..., MountedSandbox]) -> Mount:
    return module_mount(phys_mem="16M", seed=1)


TWEAK = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"

SMAPS = """\
7f0000000000-7f0000002000 rw-p 00000000 00:00 0 
Size:                  8 kB
Rss:                   4 kB
KeyID:                 3
7f0000200000-7f0000201000 r--p 00000000 00:00 0                          [anon]
Size:                  4 kB
KeyID:                 0
"""


def test_smaps_gives_each_vma_its_keyid_and_fields() -> None:
    first, second = parse_smaps(SMAPS)
    assert (first.start, first.end, first.perms, first.keyid) == (
        0x7F0000000000,
        0x7F0000002000,
        "rw-p",
        3,
    )
    assert first.fields["Rss"] == "4 kB"
    assert 0x7F0000001FFF in first
    assert 0x7F0000002000 not in first
    assert (second.keyid, second.name) == (0, "[anon]")


def test_maps_lines_without_keyid_parse_with_keyid_none() -> None:
    (vma,) = parse_smaps("00400000-00401000 r-xp 00000000 00:00 0\n")
    assert vma.keyid is None
    assert vma.size == 4096


def test_layout_splits_a_pte_into_frame_and_keyid() -> None:
    layout = Layout(maxphyaddr=46, keyid_bits=6)
    entry = Pte.NX | 5 << 40 | 0x12345000 | Pte.P | Pte.RW | Pte.US | Pte.A | Pte.D
    assert layout.split(entry) == (0x12345000, 5)
    assert layout.split(layout.with_keyid(entry, 63)) == (0x12345000, 63)
    assert layout.keyid_mask == 0x3F << 40


def test_layout_with_fewer_physical_bits_moves_the_keyid_down() -> None:
    layout = Layout(maxphyaddr=39, keyid_bits=3)
    assert layout.split(0x7 << 36 | 0x1000 | 1) == (0x1000, 7)


def test_pagemap_entry_has_pfn_in_bits_0_to_54_and_present_in_63() -> None:
    entry = PagemapEntry(0x7F0000000123, 1 << 63 | 1 << 55 | 0x42)
    assert entry.present
    assert entry.pfn == 0x42
    assert entry.pa == 0x42123
    assert not PagemapEntry(0, 0x42).present


@pytest.mark.parametrize(
    ("text", "value"), [("0x1000", 4096), ("4096", 4096), ("64K", 65536), ("2M", 2 << 20)]
)
def test_parse_int_reads_addresses_and_sizes(text: str, value: int) -> None:
    assert parse_int(text) == value


def test_parse_int_refuses_garbage_with_examples() -> None:
    with pytest.raises(ValueError, match="example"):
        parse_int("12zz")


def test_runs_groups_contiguous_pfns() -> None:
    assert list(runs([5, 1, 2, 3, 9, 10])) == [(1, 3), (5, 1), (9, 2)]


# -- the stdlib copies agree with sandbox ----------------------------------------


def test_the_kpageflags_bits_are_those_of_the_sandbox() -> None:
    assert {f.name: f.value for f in Kpf} == {f.name: f.value for f in KPF}


LAYOUTS = [(46, 6), (39, 3), (52, 15), (36, 6), (46, 0)]


@pytest.mark.parametrize(("maxphyaddr", "keyid_bits"), LAYOUTS)
def test_the_keyid_layout_is_that_of_the_sandbox_page_tables(
    maxphyaddr: int, keyid_bits: int
) -> None:
    ours, theirs = Layout(maxphyaddr, keyid_bits), PteLayout(maxphyaddr, keyid_bits)
    assert (ours.keyid_shift, ours.keyid_mask) == (theirs.keyid_shift, theirs.keyid_mask)
    flags = Pte.P | Pte.RW | Pte.US | Pte.A | Pte.D | Pte.NX
    for pfn in (0, 1, 0x12345, ours.address_mask >> 12):
        for keyid in sorted({0, min(1, theirs.max_keyid), theirs.max_keyid}):
            pte = theirs.make_pte(pfn, keyid, flags)
            assert ours.split(pte) == (pfn << 12, keyid)
            assert ours.with_keyid(pte, 0) == theirs.make_pte(pfn, 0, flags)


@pytest.mark.parametrize(("maxphyaddr", "keyid_bits"), [(46, 6), (39, 3), (46, 0)])
def test_the_layout_is_read_from_what_hw_tme_prints(maxphyaddr: int, keyid_bits: int) -> None:
    machine = Machine(phys_mem="16M", maxphyaddr=maxphyaddr, keyid_bits=keyid_bits)
    assert Layout.from_tme(parse_tme(machine.tme_text())) == Layout(maxphyaddr, keyid_bits)


def test_a_hw_tme_without_the_layout_lines_is_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="no maxphyaddr, keyid_shift and keyid_mask"):
        Layout.from_tme(parse_tme("mk_tme_keyid_bits 6\n"))
    with pytest.raises(ValueError, match="keyid_mask 0x1 is not bits 40..45"):
        Layout.from_tme({"maxphyaddr": "46", "keyid_shift": "40", "keyid_mask": "0x1"})


# -- key material never reaches a message ---------------------------------------


def test_redacted_hides_the_values_of_key_and_tweak_only() -> None:
    command = f"type=user algorithm=aes-xts-128 key={KEY} tweak={TWEAK}"
    assert redacted(command) == "type=user algorithm=aes-xts-128 key=<redacted> tweak=<redacted>"
    assert redacted("mmap 0x1000 4096 rw- keyid=1") == "mmap 0x1000 4096 rw- keyid=1"
    assert (
        redacted(f"type=user KEY={KEY} Tweak={TWEAK}")
        == "type=user KEY=<redacted> Tweak=<redacted>"
    )


@pytest.mark.mount
@pytest.mark.parametrize(
    "payload",
    [
        f"type=user algorithm=aes-xts-128 key={KEY} tweak={KEY}",  # equal: EINVAL
        f"type=user algorithm=aes-xts-256 key={KEY} tweak={TWEAK}",  # too short for 256
        f"type=user algorithm=des key={KEY} tweak={TWEAK}",  # unknown algorithm
    ],
    ids=["equal", "short", "algorithm"],
)
def test_a_rejected_user_key_is_not_in_the_error(mnt: Mount, payload: str) -> None:
    free = next(k.keyid for k in mnt.key_table() if not k.programmed)
    with pytest.raises(MountError) as rejected:
        mnt.program_key(free, payload)
    assert rejected.value.errno == errno.EINVAL
    text = " ".join([str(rejected.value), repr(rejected.value), rejected.value.reason])
    assert KEY not in text
    assert TWEAK not in text
    assert "key=<redacted> tweak=<redacted>" in text
    assert not mnt.key(free).programmed


# -- what the tools rely on: errors they can report in one line ---------------------


def test_a_directory_that_is_not_a_mount_is_refused_with_how_to_mount(tmp_path: Path) -> None:
    with pytest.raises(NotAMount, match="not an mktme-sandbox mount.*mktme-sandbox mount DIR"):
        Mount(tmp_path)


def test_a_stale_mount_is_named_as_such(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def not_connected(self: Path) -> bool:
        raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")

    monkeypatch.setattr(Path, "is_dir", not_connected)
    with pytest.raises(NotAMount) as stale:
        Mount(tmp_path)
    assert stale.value.errno == errno.ENOTCONN
    assert "stale mount" in str(stale.value)


@pytest.mark.mount
def test_an_offset_beyond_2_to_the_63_is_a_value_error_not_an_overflow(mnt: Mount) -> None:
    with pytest.raises(ValueError, match="beyond the largest file offset"):
        mnt.read_bytes("dram", 1 << 63, 8)
    with pytest.raises(ValueError, match="beyond the largest file offset"):
        mnt.write_bytes("dram", 1 << 64, b"x")


@pytest.mark.mount
def test_translate_refuses_an_address_beyond_user_space(mnt: Mount) -> None:
    space = mnt.new_space("beyond")
    try:
        with pytest.raises(ValueError, match="not a user-space virtual address"):
            space.translate(1 << 47)
        assert not space.translate(0x1000).present
    finally:
        space.destroy()
