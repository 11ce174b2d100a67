"""Shared by the tests of ``mm/keyid_map.svg``: a scenario that makes every
kind of page, a decoder of the picture, and the classes ``mm/page_keyid`` and
``mm/kpageflags`` give (the oracle the picture is compared with)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from mktme_sandbox import Machine
from mktme_sandbox.fs.nodes import BlobFile, Dir, Node, TextFile
from mktme_sandbox.fs.tree import Tree
from mktme_sandbox.kernel.proc import KPF

SVG = "{http://www.w3.org/2000/svg}"
U = 0x10000000
HUGE = U + (2 << 20)  # 2M aligned
SAME = b"the same page, twice" * 200

# the precedence of the picture: the first bit found names the kind
KINDS_BY_BIT = (
    (KPF.BUDDY, "free"),
    (KPF.PGTABLE, "pgtable"),
    (KPF.ZERO_PAGE, "zero"),
    (KPF.KSM, "ksm"),
    (KPF.THP, "thp"),
)


class Sandbox(Protocol):
    """What the scenario needs: the helpers of ``MountedSandbox``."""

    def program_key(self, keyid: int, payload: str = ...) -> None: ...
    def create_space(self, name: str) -> object: ...
    def write_ctl(self, rel: str, command: str) -> None: ...
    def write_bytes(self, rel: str, offset: int, data: bytes) -> None: ...
    def read_bytes(self, rel: str, offset: int, length: int) -> bytes: ...


class InProcess:
    """``MountedSandbox``'s helpers over the fs tree of an in-process Machine (no FUSE)."""

    def __init__(self, machine: Machine) -> None:
        self.tree = Tree(machine)

    def _node(self, rel: str) -> Node:
        node = self.tree.resolve(rel)
        assert node is not None, f"{rel} does not exist"
        return node

    def _file(self, rel: str) -> TextFile | BlobFile:
        node = self._node(rel)
        assert not isinstance(node, Dir), f"{rel} is a directory"
        return node

    def program_key(self, keyid: int, payload: str = "type=cpu algorithm=aes-xts-128") -> None:
        self.write_ctl(f"keys/{keyid}", payload)

    def create_space(self, name: str) -> None:
        spaces = self._node("spaces")
        assert isinstance(spaces, Dir)
        spaces.make(name, 0)

    def write_ctl(self, rel: str, command: str) -> None:
        self._file(rel).write(command.encode(), 0, 0)

    def write_bytes(self, rel: str, offset: int, data: bytes) -> None:
        self._file(rel).write(data, offset, 0)

    def read_bytes(self, rel: str, offset: int, length: int) -> bytes:
        return self._file(rel).read(offset, length)


def make_every_kind_of_page(s: Sandbox) -> None:
    """Two encrypted spaces (KeyIDs 1 and 2), a KeyID-0 space that reads the
    zero page, a KSM merge in KeyID 1 and a khugepaged collapse in KeyID 2,
    whose 512 small pages wait freed in KeyID 2's pool."""
    s.program_key(1)
    s.program_key(2)
    for name, keyid in (("one", 1), ("two", 2)):
        s.create_space(name)
        s.write_ctl(f"spaces/{name}/ctl", f"mmap {U:#x} 16K rw- keyid={keyid} populate")
    s.create_space("plain")
    s.write_ctl("spaces/plain/ctl", f"mmap {U:#x} 8K r--")
    assert s.read_bytes("spaces/plain/mem", U, 8192) == bytes(8192)
    s.write_bytes("spaces/one/mem", U, SAME)
    s.write_bytes("spaces/one/mem", U + 4096, SAME)
    s.write_ctl("spaces/one/ctl", f"madvise {U:#x} 8K mergeable")
    s.write_ctl("mm/ksm/run", "1")
    s.write_ctl("mm/keyid_free_pools", "1")
    s.write_ctl("spaces/two/ctl", f"mmap {HUGE:#x} 2M rw- keyid=2 populate")
    s.write_ctl("spaces/two/ctl", f"madvise {HUGE:#x} 2M hugepage")
    s.write_ctl("mm/khugepaged/scan", "1")


@dataclass(frozen=True)
class Classes:
    """One KeyID and one kind name per PFN (or per cell)."""

    keyids: np.ndarray
    kinds: np.ndarray

    def of(self, i: int) -> tuple[int, str]:
        return int(self.keyids[i]), str(self.kinds[i])


@dataclass(frozen=True)
class Picture:
    pages: int
    pages_per_cell: int
    title: str
    runs: list[tuple[int, int, str]]  # data-pfn, data-pages, class
    legend: list[str]

    def per_pfn(self) -> Classes:
        """Expand the runs to one class per PFN; every PFN exactly once."""
        keyids = np.full(self.pages, -1)
        kinds = np.full(self.pages, "", dtype=object)
        for pfn, n, css in self.runs:
            keyid, kind = css.split()
            assert (keyids[pfn : pfn + n] == -1).all(), f"PFN {pfn:#x} drawn twice"
            keyids[pfn : pfn + n] = int(keyid.removeprefix("keyid-"))
            kinds[pfn : pfn + n] = kind
        assert (keyids >= 0).all(), "a PFN is not drawn"
        return Classes(keyids, kinds)


def decode(svg: str) -> Picture:
    root = ET.fromstring(svg)
    pages = root.find(f"{SVG}g[@id='pages']")
    legend = root.find(f"{SVG}g[@id='legend']")
    assert pages is not None
    assert legend is not None
    return Picture(
        pages=int(root.attrib["data-pages"]),
        pages_per_cell=int(root.attrib["data-pages-per-cell"]),
        title=root.findtext(f"{SVG}title") or "",
        runs=[
            (int(r.attrib["data-pfn"]), int(r.attrib["data-pages"]), r.attrib["class"])
            for r in pages.iter(f"{SVG}rect")
        ],
        legend=[t.text or "" for t in legend.iter(f"{SVG}text")],
    )


def classes_from_proc(page_keyid: bytes, kpageflags: bytes) -> Classes:
    """What ``mm/page_keyid`` and ``mm/kpageflags`` say each PFN is."""
    flags = np.frombuffer(kpageflags, dtype="<u8")
    kinds = np.full(len(flags), "used", dtype=object)
    for bit, kind in reversed(KINDS_BY_BIT):
        kinds[(flags >> np.uint64(bit)) & np.uint64(1) != 0] = kind
    return Classes(np.frombuffer(page_keyid, dtype="<u8").astype(int), kinds)


def machine_classes(m: Machine) -> Classes:
    size = 8 * (m.phys_mem >> 12)
    return classes_from_proc(m.page_keyid(0, size), m.kpageflags(0, size))


def assert_same(picture: Classes, expected: Classes) -> None:
    differ = np.flatnonzero((picture.keyids != expected.keyids) | (picture.kinds != expected.kinds))
    assert not len(differ), (
        f"{len(differ)} cells differ; first PFN {differ[0]:#x}: "
        f"drawn {picture.of(differ[0])}, expected {expected.of(differ[0])}"
    )
