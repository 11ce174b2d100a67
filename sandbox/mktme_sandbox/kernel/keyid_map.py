"""A picture of physical memory: one cell per page, coloured by its KeyID.

``mm/keyid_map.svg`` (``Machine.keyid_map_svg()``) draws every physical page
as a cell of a grid, PFN 0 at the top left, PFNs increasing left to right and
then down. A cell's fill is the page's page_ext KeyID (``page_keyid``); its
kind is what the allocator's flags say the page is, the same flags that
``mm/kpageflags`` shows:

===========  ==========================  ===================================
kind         page                        drawn as
===========  ==========================  ===================================
``used``     allocated (anonymous, or    the KeyID's colour
             reserved as PFN 0 is)
``thp``      part of a huge page         the KeyID's colour, black outline
``ksm``      a KSM page                  the KeyID's colour, dashed outline
``zero``     the shared zero page        the KeyID's colour, magenta outline
``pgtable``  a page-table page           dark grey ``#202020``
``free``     on a free list or never     the KeyID's colour, 20 % opaque
             allocated (``KPF_BUDDY``)   (the KeyID page_ext keeps)
===========  ==========================  ===================================

A page with several of these flags takes the kind lowest in the table (a
free page is ``free`` whatever else it was). KeyID colours are
a fixed qualitative palette (Tableau 10): KeyID 0 grey ``#9e9e9e``, KeyIDs 1,
2, 3 ... blue, orange, green, red, purple, brown, pink, olive, cyan, and again
from blue for KeyID 10.

The grid is ``cells_per_row`` cells wide: the smallest power of two, at least
64, not below the square root of the number of cells (256 for 256 MiB, 1024
for 4 GiB), so the image is roughly square. Up to 2**20 pages (4 GiB) a cell
is one page. Above, a cell is a 2 MiB block (512 pages) drawn as its majority
class, (KeyID, kind), ties going to the lower KeyID and then to the kind
higher in the table; the title says so.

Consecutive cells of one class in one row are one ``<rect>`` (run-length
encoding), so a mostly free machine is a small file. Each rect of the
``<g id="pages">`` group carries ``class="keyid-K KIND"``,
``data-pfn="FIRST"`` and ``data-pages="N"``: a tool expands the runs back to
one class per PFN with any XML parser. The ``<g id="legend">`` group lists the
KeyIDs present and the kinds present, with page counts (of pages, not cells).

Left out: interactivity, and any shading inside a run.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING

import numpy as np

from mktme_sandbox.config import GiB, MiB
from mktme_sandbox.kernel.page import PG
from mktme_sandbox.kernel.pgtable_types import HPAGE_NR, PAGE_SIZE

if TYPE_CHECKING:
    from mktme_sandbox.kernel.kernel import Kernel

__all__ = [
    "AGGREGATE_ABOVE",
    "KEYID_COLOURS",
    "KeyIdMap",
    "PageClass",
    "PageKind",
    "keyid_colour",
    "keyid_map",
    "render_svg",
]

AGGREGATE_ABOVE = 1 << 20  # pages; above this a cell is a 2 MiB block
IMAGE_WIDTH = 1024  # pixels of the grid at most; a cell is at least one
TITLE_HEIGHT = 24
LEGEND_LINE = 18
KEYID_COLOURS = (
    "#9e9e9e",  # KeyID 0
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#bcbd22", "#17becf",
)  # fmt: skip


class PageKind(IntEnum):
    """What a page is, in the order of precedence (the highest value wins)."""

    USED = 0
    THP = 1
    KSM = 2
    ZERO = 3
    PGTABLE = 4
    FREE = 5


@dataclass(frozen=True)
class _Style:
    css: str
    label: str
    fill: str | None = None  # None: the KeyID's colour
    opacity: float = 1.0
    stroke: str | None = None
    dash: bool = False


_STYLES = {
    PageKind.USED: _Style("used", "in use"),
    PageKind.THP: _Style("thp", "huge page (THP)", stroke="#000000"),
    PageKind.KSM: _Style("ksm", "KSM page", stroke="#000000", dash=True),
    PageKind.ZERO: _Style("zero", "zero page", stroke="#e6007e"),
    PageKind.PGTABLE: _Style("pgtable", "page table", fill="#202020"),
    PageKind.FREE: _Style("free", "free", opacity=0.2),
}
_FLAG_KINDS = (  # lowest precedence first: later assignments win
    (PG.HEAD | PG.TAIL, PageKind.THP),
    (PG.KSM, PageKind.KSM),
    (PG.ZERO, PageKind.ZERO),
    (PG.PGTABLE, PageKind.PGTABLE),
)
_NR_KINDS = len(PageKind)


def keyid_colour(keyid: int) -> str:
    return KEYID_COLOURS[0] if keyid == 0 else KEYID_COLOURS[1 + (keyid - 1) % 9]


@dataclass(frozen=True, order=True)
class PageClass:
    """What one cell shows: a KeyID and a kind."""

    keyid: int
    kind: PageKind

    @property
    def css(self) -> str:
        return f"keyid-{self.keyid} {_STYLES[self.kind].css}"

    @staticmethod
    def of_code(code: int) -> PageClass:
        return PageClass(code // _NR_KINDS, PageKind(code % _NR_KINDS))


# --- the classes, from the kernel's page state -------------------------------------


@dataclass(frozen=True, eq=False)
class KeyIdMap:
    """One class code (``keyid * len(PageKind) + kind``) per cell, and page counts."""

    nr_pages: int
    pages_per_cell: int
    cells: np.ndarray
    page_counts: dict[PageClass, int]

    @property
    def cells_per_row(self) -> int:
        side = int(np.ceil(np.sqrt(len(self.cells))))
        return max(64, 1 << (side - 1).bit_length())


def page_codes(k: Kernel) -> np.ndarray:
    """The class code of every PFN, from page_ext and the page flags.

    Pages above ``never_used`` were never allocated: free, KeyID 0, and not
    looked at (on a sparse machine that is nearly all of them).
    """
    used = k.alloc.never_used
    codes = np.full(k.pages.nr_pages, PageKind.FREE, dtype=np.int32)
    flags = k.pages.flags_of(0, used)
    kinds = codes[:used]
    kinds[:] = PageKind.USED
    for pg, kind in _FLAG_KINDS:
        kinds[(flags & pg) != 0] = kind
    kinds[k.alloc.free_mask(0, used)] = PageKind.FREE
    kinds += k.pages.keyids_of(0, used).astype(np.int32) * _NR_KINDS
    return codes


def keyid_map(k: Kernel) -> KeyIdMap:
    codes = page_codes(k)
    counts = np.bincount(codes)
    present = np.flatnonzero(counts)
    page_counts = {PageClass.of_code(int(c)): int(counts[c]) for c in present}
    if len(codes) <= AGGREGATE_ABOVE:
        return KeyIdMap(len(codes), 1, codes, page_counts)
    return KeyIdMap(len(codes), HPAGE_NR, _majority(codes, HPAGE_NR), page_counts)


def _majority(codes: np.ndarray, per_cell: int) -> np.ndarray:
    """The most frequent code of each block of ``per_cell`` codes (the lowest on a tie).

    Most blocks hold one code; only the mixed ones are counted.
    """
    blocks = codes.reshape(-1, per_cell)  # phys_mem is a multiple of 2 MiB
    cells = blocks[:, 0].copy()
    mixed = np.flatnonzero((blocks != blocks[:, :1]).any(axis=1))
    values, inverse = np.unique(blocks[mixed], return_inverse=True)
    row = np.repeat(np.arange(len(mixed)), per_cell)
    counts = np.bincount(row * len(values) + inverse.ravel(), minlength=len(mixed) * len(values))
    cells[mixed] = values[counts.reshape(len(mixed), len(values)).argmax(axis=1)]
    return cells


# --- the picture -----------------------------------------------------------------------


def render_svg(picture: KeyIdMap) -> str:
    """The picture as SVG text: title, the grid of runs, its frame, the legend."""
    per_row = picture.cells_per_row
    cell = max(1, IMAGE_WIDTH // per_row)
    grid_height = -(-len(picture.cells) // per_row) * cell
    legend = _legend(picture)
    width = max(per_row * cell, 560)
    height = TITLE_HEIGHT + grid_height + 8 + LEGEND_LINE * len(legend)
    runs = (_run_rect(picture, per_row, cell, first, n) for first, n in _runs(picture, per_row))
    return "".join(
        [
            _svg_head(picture, width, height, per_row),
            f'<g id="pages" transform="translate(0,{TITLE_HEIGHT})" shape-rendering="crispEdges">\n',
            *runs,
            "</g>\n",
            _frame(per_row * cell, grid_height),
            f'<g id="legend" transform="translate(0,{TITLE_HEIGHT + grid_height + 8})">\n',
            *legend,
            "</g>\n</svg>\n",
        ]
    )


def _svg_head(picture: KeyIdMap, width: int, height: int, per_row: int) -> str:
    title = _title(picture, per_row)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="monospace" font-size="12" '
        f'data-pages="{picture.nr_pages}" data-pages-per-cell="{picture.pages_per_cell}" '
        f'data-cells-per-row="{per_row}">\n'
        f"<title>{title}</title>\n"
        f'<text x="0" y="16">{title}</text>\n'
    )


def _frame(width: int, height: int) -> str:
    return (
        f'<rect y="{TITLE_HEIGHT}" width="{width}" height="{height}" '
        'fill="none" stroke="#000000" stroke-width="0.5"/>\n'
    )


def _size(nbytes: int) -> str:
    return f"{nbytes // GiB} GiB" if nbytes % GiB == 0 else f"{nbytes // MiB} MiB"


def _title(picture: KeyIdMap, per_row: int) -> str:
    head = (
        f"Physical memory by KeyID: {_size(picture.nr_pages * PAGE_SIZE)}, "
        f"{picture.nr_pages} pages, {per_row} cells per row, "
    )
    if picture.pages_per_cell == 1:
        return head + "one page per cell"
    return head + (
        f"one cell per {_size(picture.pages_per_cell * PAGE_SIZE)} block "
        f"({picture.pages_per_cell} pages), drawn as its majority class"
    )


def _runs(picture: KeyIdMap, per_row: int) -> Iterator[tuple[int, int]]:
    """(first cell, cells) of each run of one code within one row."""
    cells = picture.cells
    breaks = np.flatnonzero(cells[1:] != cells[:-1]) + 1
    row_starts = np.arange(per_row, len(cells), per_row)
    starts = np.union1d(np.concatenate(([0], breaks)), row_starts)
    ends = np.append(starts[1:], len(cells))
    yield from zip(starts.tolist(), (ends - starts).tolist(), strict=True)


def _paint(page_class: PageClass, cell: int) -> str:
    """The fill and outline attributes of a class."""
    style = _STYLES[page_class.kind]
    attrs = f'fill="{style.fill or keyid_colour(page_class.keyid)}"'
    if style.opacity != 1.0:
        attrs += f' fill-opacity="{style.opacity}"'
    if style.stroke is not None:
        attrs += f' stroke="{style.stroke}" stroke-width="{max(cell / 8, 0.25)}"'
        attrs += ' stroke-dasharray="2,1"' if style.dash else ""
    return attrs


def _run_rect(picture: KeyIdMap, per_row: int, cell: int, first: int, n: int) -> str:
    row, col = divmod(first, per_row)
    page_class = PageClass.of_code(int(picture.cells[first]))
    per_cell = picture.pages_per_cell
    return (
        f'<rect x="{col * cell}" y="{row * cell}" width="{n * cell}" height="{cell}" '
        f'{_paint(page_class, cell)} class="{page_class.css}" '
        f'data-pfn="{first * per_cell}" data-pages="{n * per_cell}"/>\n'
    )


def _legend(picture: KeyIdMap) -> list[str]:
    by_keyid: dict[int, dict[PageKind, int]] = {}
    by_kind: dict[PageKind, int] = {}
    for page_class, n in sorted(picture.page_counts.items()):
        by_keyid.setdefault(page_class.keyid, {})[page_class.kind] = n
        by_kind[page_class.kind] = by_kind.get(page_class.kind, 0) + n
    lines = [
        (PageClass(keyid, PageKind.USED), _keyid_label(keyid, kinds))
        for keyid, kinds in by_keyid.items()
    ]
    lines += [
        (PageClass(0, kind), f"{_STYLES[kind].label}: {_pages(n)}")
        for kind, n in sorted(by_kind.items())
        if kind != PageKind.USED
    ]
    return [_legend_line(i, page_class, label) for i, (page_class, label) in enumerate(lines)]


def _keyid_label(keyid: int, kinds: dict[PageKind, int]) -> str:
    free = kinds.get(PageKind.FREE, 0)
    return f"KeyID {keyid}: {_pages(sum(kinds.values()) - free)} in use, {free} free"


def _pages(n: int) -> str:
    return f"{n} page" if n == 1 else f"{n} pages"


def _legend_line(i: int, page_class: PageClass, label: str) -> str:
    y = i * LEGEND_LINE
    return (
        f'<rect x="0" y="{y}" width="12" height="12" {_paint(page_class, 8)} '
        f'class="{page_class.css}"/><text x="18" y="{y + 11}">{label}</text>\n'
    )
