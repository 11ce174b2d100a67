"""``Machine.keyid_map_svg()``: the picture of physical memory, decoded with
xml.etree and compared PFN by PFN with page_keyid and kpageflags."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from keyid_map_helpers import (
    Classes,
    InProcess,
    assert_same,
    decode,
    machine_classes,
    make_every_kind_of_page,
)
from mktme_sandbox import Machine
from mktme_sandbox.kernel.keyid_map import KEYID_COLOURS, keyid_colour

KIND_ORDER = ["used", "thp", "ksm", "zero", "pgtable", "free"]  # ties go to the first
EVERY_KIND = set(KIND_ORDER)


@pytest.fixture(scope="module")
def busy() -> Machine:
    m = Machine(phys_mem="16M", seed=1)
    make_every_kind_of_page(InProcess(m))
    return m


def test_every_pfn_is_drawn_once_with_the_class_page_keyid_and_kpageflags_give(
    busy: Machine,
) -> None:
    picture = decode(busy.keyid_map_svg())
    assert picture.pages == busy.phys_mem >> 12
    assert picture.pages_per_cell == 1
    assert_same(picture.per_pfn(), machine_classes(busy))


def test_the_scenario_draws_every_kind_and_both_keyids_in_use_and_free(busy: Machine) -> None:
    drawn = {css for _, _, css in decode(busy.keyid_map_svg()).runs}
    assert {css.split()[1] for css in drawn} == EVERY_KIND
    assert {"keyid-1 used", "keyid-1 ksm", "keyid-2 thp", "keyid-2 free"} <= drawn
    assert busy.check() == []


def test_the_legend_counts_the_pages_of_each_keyid_and_kind(busy: Machine) -> None:
    classes = machine_classes(busy)
    legend = decode(busy.keyid_map_svg()).legend
    in_use = int(((classes.keyids == 2) & (classes.kinds != "free")).sum())
    free = int(((classes.keyids == 2) & (classes.kinds == "free")).sum())
    assert f"KeyID 2: {in_use} pages in use, {free} free" in legend
    assert "zero page: 1 page" in legend
    assert f"huge page (THP): {int((classes.kinds == 'thp').sum())} pages" in legend


def test_runs_of_one_class_in_a_row_are_one_rect() -> None:
    m = Machine(phys_mem="256M", seed=1)
    picture = decode(m.keyid_map_svg())
    assert "256 cells per row, one page per cell" in picture.title
    free_rows = [run for run in picture.runs if run[1] == 256]
    assert len(free_rows) == 255  # every row but the first, which holds PFNs 0 and 1
    assert len(picture.runs) <= 260


@pytest.mark.parametrize(("size", "per_cell"), [("4G", 1), (f"{4096 + 2}M", 512), ("8G", 512)])
def test_above_2_to_the_20_pages_a_cell_is_a_2m_block(size: str, per_cell: int) -> None:
    m = Machine(phys_mem=size, seed=1)
    picture = decode(m.keyid_map_svg())
    assert picture.pages_per_cell == per_cell
    assert ("majority class" in picture.title) == (per_cell > 1)


def test_an_aggregated_cell_shows_the_majority_class_of_its_2m_block() -> None:
    m = Machine(phys_mem="8G", seed=1)
    make_every_kind_of_page(InProcess(m))
    picture = decode(m.keyid_map_svg()).per_pfn()  # each PFN carries its block's class
    pages = machine_classes(m)
    for block in range(0, m.phys_mem >> 12, 512):
        classes = Counter(pages.of(pfn) for pfn in _sample(pages, block))
        best = max(classes.values())
        ties = [c for c, n in classes.items() if n == best]
        assert picture.of(block) == min(ties, key=lambda c: (c[0], KIND_ORDER.index(c[1])))
    assert (2, "thp") in _cells(picture)


def _sample(pages: Classes, block: int) -> range:
    """The block's PFNs when it is mixed, else its first (the rest are equal)."""
    keyids, kinds = pages.keyids[block : block + 512], pages.kinds[block : block + 512]
    uniform = (keyids == keyids[0]).all() and (kinds == kinds[0]).all()
    return range(block, block + 1) if uniform else range(block, block + 512)


def _cells(picture: Classes) -> set[tuple[int, str]]:
    return {picture.of(pfn) for pfn in range(0, len(picture.keyids), 512)}


def test_keyid_0_is_grey_and_keyids_cycle_through_nine_colours() -> None:
    assert keyid_colour(0) == "#9e9e9e"
    assert [keyid_colour(k) for k in range(1, 10)] == list(KEYID_COLOURS[1:])
    assert keyid_colour(10) == keyid_colour(1)
    assert len(np.unique(KEYID_COLOURS)) == len(KEYID_COLOURS)
