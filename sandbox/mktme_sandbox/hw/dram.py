"""Physical memory: ``phys_mem`` bytes of DRAM, as ciphertext sits on the bus.

What it models: the DRAM chips behind the memory controller (SPEC section 2,
"Physical addresses and KeyIDs"). Bytes are stored exactly as the engine wrote
them; nothing here knows about keys, KeyIDs or the cache.

Rules it keeps: addresses are plain physical addresses ``0 <= pa < phys_mem``;
anything outside raises ``SandboxError(EINVAL)`` naming the address. Memory is
sparse: one anonymous private ``MAP_NORESERVE`` mapping viewed as a numpy uint8
array, so a 64 GiB machine costs nothing until pages are written (reads of
untouched pages hit the host's zero page) and starts in milliseconds.

Left out: ECC, refresh, channels and ranks, and the TME exclusion range (the
sandbox enumerates it but never enables it).
"""

from __future__ import annotations

import errno
import mmap

import numpy as np

from mktme_sandbox.config import LINE_SIZE
from mktme_sandbox.errors import fail

__all__ = ["Dram"]

# Python 3.11's mmap module lacks the constant (3.12 has it); 0x4000 is Linux's value.
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE


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

    def read_lines(self, line_numbers: np.ndarray) -> np.ndarray:
        """Lines ``[L, 64]`` (a copy) at line numbers ``pa // 64``; callers have checked them."""
        return self.lines[line_numbers]

    def write_lines(self, line_numbers: np.ndarray, data: np.ndarray) -> None:
        self.lines[line_numbers] = data
