"""The picture of physical memory in the README is what the code draws now.

``docs/keyid-map.svg`` is ``mm/keyid_map.svg`` of a 16 MiB machine after the
scenario below. When the renderer changes on purpose, draw it again with
``MKTME_REDRAW_DOCS=1 scripts/test tests/test_readme_picture.py`` and commit
the file with the change.
"""

from __future__ import annotations

import os
from pathlib import Path

from keyid_map_helpers import InProcess, make_every_kind_of_page
from mktme_sandbox import Machine

PICTURE = Path(__file__).resolve().parent.parent / "docs" / "keyid-map.svg"


def draw() -> str:
    """Every class of page: two tenants, the zero page, KSM, a THP, a pool, tables."""
    m = Machine(phys_mem="16M", seed=1)
    make_every_kind_of_page(InProcess(m))
    m.key_command(3, "type=cpu algorithm=aes-xts-256", uid=1000)
    m.create_space("three", uid=1000)
    m.space_command("three", "mmap 0x7f0000000000 1M rw- keyid=3 populate", uid=1000)
    return m.keyid_map_svg()


def test_the_readme_picture_is_what_the_machine_draws() -> None:
    svg = draw()
    if os.environ.get("MKTME_REDRAW_DOCS"):
        PICTURE.write_text(svg)
    assert PICTURE.read_text() == svg, "redraw: MKTME_REDRAW_DOCS=1 (see the docstring)"
