"""Physical memory: ``phys_mem`` bytes of DRAM, as ciphertext sits on the bus.

What it models: the DRAM chips behind the memory controller (docs/spec.md section 2,
"Physical addresses and KeyIDs"). Bytes are stored exactly as the engine wrote
them; nothing here knows about keys, KeyIDs or the cache.

Rules it keeps: addresses are plain physical addresses ``0 <= pa < phys_mem``;
anything outside raises ``SandboxError(EINVAL)`` naming the address. Memory is
sparse: one anonymous private ``MAP_NORESERVE`` mapping viewed as a numpy uint8
array, so a 64 GiB machine costs nothing until pages are written (reads of
untouched pages hit the host's zero page) and starts in milliseconds.

Snapshots (``touched_pages``, ``load_pages``): the pages holding anything but
zeros, found without reading the untouched rest (``mincore(2)`` names the
host pages that were ever touched; only those are read), so a snapshot of a
64 GiB machine costs what it uses.

Left out: ECC, refresh, channels and ranks, and the TME exclusion range (the
sandbox enumerates it but never enables it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import mmap

import numpy as np

from mktme_sandbox.config import LINE_SIZE, PAGE_SIZE
from mktme_sandbox.errors import fail

__all__ = ["Dram"]

# Python 3.11's mmap module lacks the constant (3.12 has it); 0x4000 is Linux's value.
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
_SCAN_PAGES = 4096  # pages compared with zero at a time (16 MiB)


class Dram:
    """``size`` bytes of sparse physical memory with bounds-checked access."""

    def __init__(self, size: int) -> None:
        if size <= 0 or size % LINE_SIZE:
            fail(errno.EINVAL, f"DRAM size must be a positive multiple of 64, not {size}")
        self.size = size
        self._mapping = mmap.mmap(-1, size, flags=_FLAGS)
        self.bytes = np.frombuffer(self._mapping, dtype=np.uint8)
        self.lines = self.bytes.reshape(-1, LINE_SIZE)

    def __repr__(self) -> str:
        return f"<Dram {self.size:#x} bytes>"

    def check(self, pa: int, length: int) -> None:
        """EINVAL unless ``[pa, pa + length)`` lies inside DRAM."""
        if pa < 0 or length < 0 or pa + length > self.size:
            fail(
                errno.EINVAL,
                f"physical address {pa:#x} + {length:#x} is outside DRAM (size {self.size:#x})",
            )

    def read(self, pa: int, length: int) -> bytes:
        self.check(pa, length)
        return self.bytes[pa : pa + length].tobytes()

    def write(self, pa: int, data: bytes | bytearray | memoryview) -> None:
        self.check(pa, len(data))
        self.bytes[pa : pa + len(data)] = np.frombuffer(data, dtype=np.uint8)

    def read_line(self, line: int) -> bytes:
        """The 64 bytes of line ``line`` (``pa // 64``), which the caller has checked."""
        pa = line * LINE_SIZE
        return self._mapping[pa : pa + LINE_SIZE]

    def read_lines(self, line_numbers: np.ndarray) -> np.ndarray:
        """Lines ``[L, 64]`` (a copy) at line numbers ``pa // 64``; callers have checked them."""
        lines: np.ndarray = self.lines[line_numbers]
        return lines

    def write_lines(self, line_numbers: np.ndarray, data: np.ndarray) -> None:
        self.lines[line_numbers] = data

    # --- snapshots ------------------------------------------------------------

    def touched_pages(self) -> np.ndarray:
        """PFNs (4 KiB) of the pages that hold anything but zeros, ascending."""
        candidates = _resident_pages(self.bytes)
        if candidates is None:  # no mincore(2): look at every page
            candidates = np.arange(self.size // PAGE_SIZE, dtype=np.int64)
        pages = self.bytes.reshape(-1, PAGE_SIZE)
        chunks = np.array_split(candidates, max(1, len(candidates) // _SCAN_PAGES))
        return np.concatenate([chunk[pages[chunk].any(axis=1)] for chunk in chunks])

    def page_contents(self, pfns: np.ndarray) -> np.ndarray:
        """The pages ``pfns`` as ``[N, 4096]`` (a copy)."""
        pages: np.ndarray = self.bytes.reshape(-1, PAGE_SIZE)[pfns]
        return pages

    def load_pages(self, pfns: np.ndarray, contents: np.ndarray) -> None:
        """Make DRAM exactly ``contents`` at ``pfns`` and zeros everywhere else."""
        if len(pfns) and (int(pfns.min()) < 0 or int(pfns.max()) >= self.size // PAGE_SIZE):
            fail(errno.EINVAL, "snapshot: a DRAM page lies outside physical memory")
        pages = self.bytes.reshape(-1, PAGE_SIZE)
        pages[self.touched_pages()] = 0
        pages[pfns] = contents


def _host_swaps() -> bool:
    """True when the host has a swap area in use (/proc/swaps lists more than its header)."""
    try:
        with open("/proc/swaps", encoding="ascii") as swaps:
            return len(swaps.read().splitlines()) > 1
    except OSError:
        return True  # unknown: assume it might


@functools.cache
def _libc() -> ctypes.CDLL:
    """The C library, looked up once (``find_library`` runs ``ldconfig -p`` in a
    subprocess: a snapshot restore paid for it every time)."""
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _resident_pages(memory: np.ndarray) -> np.ndarray | None:
    """Candidate 4 KiB PFNs: those in host pages mincore(2) says are resident; None
    (look at every page) where mincore is not available, or where the host swaps:
    mincore reports pages in RAM, and a page of ours swapped out would be missed."""
    if _host_swaps():
        return None
    mincore = getattr(_libc(), "mincore", None)
    host_page = mmap.PAGESIZE
    if mincore is None or host_page % PAGE_SIZE:
        return None
    vector = np.zeros(-(-memory.size // host_page), dtype=np.uint8)
    mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    if mincore(memory.ctypes.data, memory.size, vector.ctypes.data) != 0:
        return None
    per_host = host_page // PAGE_SIZE
    hosts = np.flatnonzero(vector & 1)
    return (hosts[:, None] * per_host + np.arange(per_host)).reshape(-1)
