"""DRAM: bounds, bytes as written, and sparse host memory."""

from __future__ import annotations

import errno

import numpy as np
import psutil
import pytest

from mktme_sandbox.config import GiB, MachineConfig, MiB
from mktme_sandbox.errors import SandboxError
from mktme_sandbox.hw.dram import Dram
from mktme_sandbox.hw.platform import Platform


def test_bytes_written_read_back_unchanged_and_untouched_memory_reads_zero() -> None:
    dram = Dram(4 * MiB)
    dram.write(0x1003, b"ciphertext")
    assert dram.read(0x1000, 16) == b"\0\0\0ciphertext\0\0\0"
    assert dram.read(3 * MiB, 64) == bytes(64)


def test_whole_lines_are_gathered_and_scattered_by_line_number() -> None:
    dram = Dram(4 * MiB)
    lines = np.arange(128, dtype=np.uint8).reshape(2, 64)
    dram.write_lines(np.array([3, 1]), lines)
    assert dram.read(3 * 64, 64) == bytes(range(64))
    assert (dram.read_lines(np.array([1, 3])) == lines[::-1]).all()


@pytest.mark.parametrize(
    ("pa", "length"),
    [(4 * MiB - 1, 2), (4 * MiB, 1), (-64, 64), (0, 4 * MiB + 1), (1 << 50, 8)],
)
def test_access_outside_dram_is_einval_naming_the_address(pa: int, length: int) -> None:
    dram = Dram(4 * MiB)
    for access in (lambda: dram.read(pa, length), lambda: dram.write(pa, bytes(length))):
        with pytest.raises(SandboxError) as caught:
            access()
        assert caught.value.errno == errno.EINVAL
        assert f"{pa:#x}" in caught.value.reason


def test_the_last_byte_is_inside() -> None:
    dram = Dram(4 * MiB)
    dram.write(4 * MiB - 1, b"\xff")
    assert dram.read(4 * MiB - 1, 1) == b"\xff"


@pytest.mark.parametrize("size", [0, -64, 100])
def test_size_must_be_a_positive_multiple_of_a_line(size: int) -> None:
    with pytest.raises(SandboxError):
        Dram(size)


def test_64_gib_machine_starts_with_small_rss_that_grows_only_with_pages_written() -> None:
    process = psutil.Process()
    before = process.memory_info().rss
    platform = Platform(MachineConfig(phys_mem=64 * GiB, seed=1))
    after_boot = process.memory_info().rss
    for pa in range(40 * GiB, 40 * GiB + 64 * MiB, MiB):  # untouched: the host's zero page
        assert platform.dram_read(pa, MiB) == bytes(MiB)
    after_reads = process.memory_info().rss
    for pa in range(10 * GiB, 10 * GiB + 32 * MiB, MiB):
        platform.dram_write(pa, b"\x01" * MiB)
    after_writes = process.memory_info().rss
    assert after_boot - before < 150 * MiB
    assert after_reads - after_boot < 16 * MiB
    assert after_writes - after_reads >= 24 * MiB  # the written pages really are memory
    assert platform.dram_read(64 * GiB - 64, 64) == bytes(64)
