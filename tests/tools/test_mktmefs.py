"""mktmefs, the stdlib library of the tools: its parsers, without a mount."""

from __future__ import annotations

import pytest
from mktmefs import Layout, PagemapEntry, Pte, parse_int, parse_smaps, runs

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
    assert 0x7F0000001FFF in first and 0x7F0000002000 not in first
    assert (second.keyid, second.name) == (0, "[anon]")


def test_maps_lines_without_keyid_parse_with_keyid_none() -> None:
    (vma,) = parse_smaps("00400000-00401000 r-xp 00000000 00:00 0\n")
    assert vma.keyid is None and vma.size == 4096


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
    assert entry.present and entry.pfn == 0x42 and entry.pa == 0x42123
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
