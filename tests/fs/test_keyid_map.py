"""``mm/keyid_map.svg`` through a real mount: the picture a browser would show
holds, PFN by PFN, the classes that ``mm/page_keyid`` and ``mm/kpageflags``
give, after a scenario made through the files."""

from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Callable

import pytest

from keyid_map_helpers import assert_same, classes_from_proc, decode, make_every_kind_of_page
from mktme_sandbox.mounting import MountedSandbox

pytestmark = pytest.mark.mount

PHYS_MEM = 16 << 20


@pytest.fixture(scope="module")
def sandbox(module_mount: Callable[..., MountedSandbox]) -> MountedSandbox:
    sandbox = module_mount(phys_mem="16M", seed=1)
    make_every_kind_of_page(sandbox)
    return sandbox


def test_the_picture_draws_every_pfn_as_page_keyid_and_kpageflags_say(
    sandbox: MountedSandbox,
) -> None:
    size = 8 * (PHYS_MEM >> 12)
    expected = classes_from_proc(
        sandbox.read_bytes("mm/page_keyid", 0, size), sandbox.read_bytes("mm/kpageflags", 0, size)
    )
    picture = decode(sandbox.read_text("mm/keyid_map.svg"))
    assert picture.pages == PHYS_MEM >> 12
    assert_same(picture.per_pfn(), expected)
    assert {css.split()[1] for _, _, css in picture.runs} == {
        "used", "free", "pgtable", "zero", "ksm", "thp",
    }  # fmt: skip


def test_the_picture_is_a_world_readable_svg_file_read_to_its_end_as_procfs_files(
    sandbox: MountedSandbox, sh: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    done = sh("stat -c '%a %s' mm/keyid_map.svg && wc -c < mm/keyid_map.svg", sandbox.path)
    mode_size, read = done.stdout.split("\n")[:2]
    mode, size = mode_size.split()
    assert mode == "444"
    assert int(size) == 0
    assert int(read) > 1000
    root = ET.fromstring((sandbox.path / "mm" / "keyid_map.svg").read_bytes())
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
