"""The cache: tagged by (line, KeyID), write-back with the key current at write-back."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hw_helpers import KnownKey, MakePlatform, Program
from mktme_sandbox.config import KiB, MachineConfig, MiB
from mktme_sandbox.hw.cache import CacheStats
from mktme_sandbox.hw.keytable import KeyProgram, KeyProgramCommand, PconfigStatus
from mktme_sandbox.hw.memctl import MemoryController
from mktme_sandbox.hw.platform import Platform
from mktme_sandbox.hw.xts import AES_XTS_128

PA = 0x10000
DATA = bytes(range(64))
NEW = b"N" * 64
ZERO_LINE = bytes(64)


def test_store_through_keyid1_is_invisible_to_keyid2_until_flush(
    known_platform: MakePlatform, known_keys: tuple[KnownKey, KnownKey]
) -> None:
    platform = known_platform()
    _, key_2 = known_keys
    platform.store(PA, DATA, 1)
    # KeyID 2 misses and fills from DRAM, which still holds zeros: key 2 decrypts them.
    assert platform.load(PA, 64, 2) == key_2.engine.decrypt(ZERO_LINE, PA)
    assert platform.load(PA, 64, 1) == DATA


def test_after_clflush_of_the_keyid1_line_keyid2_sees_dram_decrypted_with_key2(
    known_platform: MakePlatform, known_keys: tuple[KnownKey, KnownKey]
) -> None:
    platform = known_platform()
    key_1, key_2 = known_keys
    platform.store(PA, DATA, 1)
    stale = platform.load(PA, 64, 2)  # now KeyID 2 has its own (clean) copy of the line
    platform.clflush(PA, 1)
    assert platform.load(PA, 64, 2) == stale  # no coherency: KeyID 2 keeps its line
    platform.clflush(PA, 2)
    garbage = key_2.engine.decrypt(key_1.engine.encrypt(DATA, PA), PA)
    assert platform.load(PA, 64, 2) == garbage != DATA


def test_dram_view_changes_only_at_write_back(
    known_platform: MakePlatform, known_keys: tuple[KnownKey, KnownKey]
) -> None:
    platform = known_platform()
    key_1, _ = known_keys
    platform.store(PA + 8, b"12345678", 1)
    assert platform.dram_read(PA, 64) == ZERO_LINE
    assert platform.flush_range(PA, 64, 1) == 1
    expected = bytearray(key_1.engine.decrypt(ZERO_LINE, PA))  # the line was filled first
    expected[8:16] = b"12345678"
    assert platform.dram_read(PA, 64) == key_1.engine.encrypt(bytes(expected), PA)


def test_write_back_uses_the_key_current_at_write_back(
    known_platform: MakePlatform, program: Program, known_keys: tuple[KnownKey, KnownKey]
) -> None:
    platform = known_platform()
    key_1, key_2 = known_keys
    platform.store(PA, DATA, 1)
    direct = KeyProgramCommand.SET_KEY_DIRECT
    assert (
        program(platform, 1, direct, key=key_2.key, tweak=key_2.tweak) is PconfigStatus.PROG_SUCCESS
    )
    assert platform.dram_read(PA, 64) == ZERO_LINE  # reprogramming flushed nothing
    assert platform.load(PA, 64, 1) == DATA  # the cached line still answers
    platform.wbinvd()
    assert platform.dram_read(PA, 64) == key_2.engine.encrypt(DATA, PA)
    assert platform.dram_read(PA, 64) != key_1.engine.encrypt(DATA, PA)


def test_same_physical_line_under_two_keyids_coexists_as_two_lines(
    known_platform: MakePlatform,
) -> None:
    platform = known_platform()
    platform.store(PA, DATA, 1)
    platform.store(PA, NEW, 2)
    before = platform.cache.stats
    assert platform.load(PA, 64, 1) == DATA
    assert platform.load(PA, 64, 2) == NEW
    assert platform.cache.stats.hits == before.hits + 2
    assert platform.cache.stats.misses == before.misses


def test_dram_write_leaves_a_stale_cached_line_in_place(
    known_platform: MakePlatform, known_keys: tuple[KnownKey, KnownKey]
) -> None:
    platform = known_platform()
    key_1, _ = known_keys
    platform.store(PA, DATA, 1)
    platform.clflush(PA, 1)
    assert platform.load(PA, 64, 1) == DATA  # cached again, clean
    platform.dram_write(PA, key_1.engine.encrypt(NEW, PA))
    assert platform.load(PA, 64, 1) == DATA
    platform.clflush(PA, 1)
    assert platform.load(PA, 64, 1) == NEW


def test_flush_range_counts_only_the_lines_of_its_keyid(known_platform: MakePlatform) -> None:
    platform = known_platform()
    platform.store(PA, bytes(4096), 1)
    platform.store(PA + 100, bytes(100), 2)  # lines 1..3 of the page
    assert platform.flush_range(PA, 4096, 1) == 64
    assert platform.flush_range(PA, 4096, 1) == 0
    assert platform.flush_range(PA, 4096, 2) == 3
    assert platform.cache.stats.flushes == 67


def test_least_recently_used_way_is_the_victim_and_is_written_back(
    known_platform: MakePlatform, known_keys: tuple[KnownKey, KnownKey]
) -> None:
    platform = known_platform(cache_size=64 * KiB)  # 64 sets x 16 ways
    key_1, _ = known_keys
    set_stride = 64 * 64  # lines this far apart share a set
    for way in range(16):
        platform.store(way * set_stride, bytes([way]) * 64, 1)
    platform.load(0, 8, 1)  # line 0 is now the most recent; line 1 the least
    platform.store(16 * set_stride, NEW, 1)
    assert platform.cache.stats.writebacks == 1
    assert platform.dram_read(set_stride, 64) == key_1.engine.encrypt(bytes([1]) * 64, set_stride)
    assert platform.dram_read(0, 64) == ZERO_LINE


def test_wbinvd_writes_back_every_dirty_line_and_empties_the_cache(
    known_platform: MakePlatform, known_keys: tuple[KnownKey, KnownKey]
) -> None:
    platform = known_platform()
    key_1, key_2 = known_keys
    platform.store(PA, DATA, 1)
    platform.store(PA + 4096, NEW, 2)
    platform.load(PA + 8192, 64, 1)  # clean: nothing to write back
    platform.wbinvd()
    stats = platform.cache.stats
    assert (stats.writebacks, stats.wbinvd) == (2, 1)
    assert platform.dram_read(PA, 64) == key_1.engine.encrypt(DATA, PA)
    assert platform.dram_read(PA + 4096, 64) == key_2.engine.encrypt(NEW, PA + 4096)
    misses = stats.misses
    platform.load(PA, 64, 1)
    assert platform.cache.stats.misses == misses + 1


def test_counters_count_lines(known_platform: MakePlatform) -> None:
    platform = known_platform()
    platform.load(PA, 4096, 1)
    platform.load(PA + 60, 8, 1)  # two lines, both cached
    assert platform.cache.stats == CacheStats(hits=2, misses=64)
    assert platform.cache.stats.text().splitlines()[:2] == ["hits 2", "misses 64"]


def test_a_store_larger_than_the_cache_evicts_its_own_lines_and_loses_nothing(
    known_platform: MakePlatform, known_keys: tuple[KnownKey, KnownKey]
) -> None:
    platform = known_platform(cache_size=64 * KiB)
    key_1, _ = known_keys
    data = np.random.default_rng(5).bytes(200 * KiB)
    platform.store(PA, data, 1)
    assert platform.load(PA, len(data), 1) == data
    platform.wbinvd()
    assert platform.dram_read(PA, len(data)) == key_1.engine.encrypt(data, PA)


def test_uncached_platform_writes_through_to_dram_at_once(
    known_platform: MakePlatform, known_keys: tuple[KnownKey, KnownKey]
) -> None:
    platform = known_platform(cache_size=0)
    key_1, _ = known_keys
    platform.store(PA, DATA, 1)
    assert platform.dram_read(PA, 64) == key_1.engine.encrypt(DATA, PA)
    assert platform.flush_range(PA, 64, 1) == 0


# One step of the differential test: (store?, keyid, offset, length, fill byte).
operations = st.lists(
    st.tuples(
        st.booleans(),
        st.sampled_from([1, 2]),
        st.integers(0, 96 * KiB),
        st.integers(1, 9 * KiB),
        st.integers(0, 255),
    ),
    min_size=1,
    max_size=25,
)


@settings(max_examples=150, deadline=None)
@given(steps=operations)
def test_small_cache_and_no_cache_show_the_same_memory_and_leave_the_same_dram(
    steps: list[tuple[bool, int, int, int, int]],
) -> None:
    """Per KeyID disjoint ranges, so incoherency cannot differ: only the cache's bookkeeping."""
    cached = two_key_machine(cache_size=64 * KiB)
    uncached = two_key_machine(cache_size=0)
    for store, keyid, offset, length, byte in steps:
        pa = offset + (keyid - 1) * 128 * KiB
        if store:
            data = bytes((byte + i) % 256 for i in range(length))
            cached.store(pa, data, keyid)
            uncached.store(pa, data, keyid)
        else:
            assert cached.load(pa, length, keyid) == uncached.load(pa, length, keyid)
    cached.wbinvd()
    assert cached.dram_read(0, 256 * KiB) == uncached.dram_read(0, 256 * KiB)


def two_key_machine(cache_size: int) -> Platform:
    """The same seeded machine with CPU-generated keys in KeyIDs 1 and 2."""
    platform = Platform(MachineConfig(phys_mem=4 * MiB, seed=3, cache_size=cache_size))
    for keyid in (1, 2):
        raw = KeyProgram(keyid, KeyProgramCommand.SET_KEY_RANDOM, AES_XTS_128.bit).encode()
        assert platform.pconfig(raw) is PconfigStatus.PROG_SUCCESS
    return platform


@pytest.mark.parametrize("cache_size", [64 * KiB, 0])
def test_stores_cover_partial_first_and_last_lines_without_touching_neighbours(
    known_platform: MakePlatform, cache_size: int
) -> None:
    platform = known_platform(cache_size=cache_size)
    platform.store(PA, b"\xee" * 256, 1)
    platform.store(PA + 30, b"\x11" * 100, 1)
    assert platform.load(PA, 256, 1) == b"\xee" * 30 + b"\x11" * 100 + b"\xee" * 126


@pytest.mark.parametrize("cache_size", [64 * KiB, 0])
def test_only_partly_covered_lines_are_read_from_dram_before_a_store(
    known_platform: MakePlatform, monkeypatch: pytest.MonkeyPatch, cache_size: int
) -> None:
    platform = known_platform(cache_size=cache_size)
    memory: MemoryController = platform.cache._memory  # type: ignore[attr-defined]
    read: list[int] = []
    real_read = memory.read_lines

    def spy(line_numbers: np.ndarray, keyid: int) -> np.ndarray:
        read.extend(line_numbers.tolist())
        return real_read(line_numbers, keyid)

    monkeypatch.setattr(memory, "read_lines", spy)
    platform.store(PA, bytes(4096), 1)  # whole lines: nothing to read
    assert read == []
    platform.store(PA + 8192 + 10, bytes(200), 1)  # first and last line in part
    assert read == [(PA + 8192) // 64, (PA + 8192 + 192) // 64]
