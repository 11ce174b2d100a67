"""The vectorized cache against a line-by-line reference model (STYLE habit 8).

``ReferenceCache`` keeps the rules of docs/spec.md section 2 and of ``mktme_sandbox.hw.cache``
in the plainest form: one line at a time, a Python list of ways per set, no
chunks, no early answers, no hints. Random sequences of loads, stores, fills,
flushes, WBINVDs, DRAM writes and key changes run on two identical machines,
one with each cache, over addresses that several KeyIDs share (so lines of the
same address under two KeyIDs coexist and get evicted and written back in
every order). After every step both machines must show the same CPU view, the
same counters and return the same flush counts; at checkpoints and at the end
(after WBINVD) the same DRAM. Every fast path of the real cache (fill without a
source buffer, a page that misses everywhere, ``flush_range`` answering at once,
the hinted hit on one line, the engine's per-page tweak table) is on the way.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from mktme_sandbox.config import KiB, MachineConfig, MiB
from mktme_sandbox.hw.cache import WAYS, CacheStats, WriteBackCache
from mktme_sandbox.hw.keytable import KeyProgram, KeyProgramCommand, PconfigStatus
from mktme_sandbox.hw.memctl import MemoryController
from mktme_sandbox.hw.platform import Platform
from mktme_sandbox.hw.xts import AES_XTS_128

LINE = 64
PAGE = 4096
CACHE = 64 * KiB  # 64 sets x 16 ways: a page fills every set once
REGION = 3 * CACHE  # three times the cache, so lines get evicted
KEYIDS = (0, 1, 2, 3)


@dataclass
class _Way:
    """One cached line of the reference model."""

    line: int
    keyid: int
    data: bytearray
    age: int
    dirty: bool = False


class ReferenceCache:
    """docs/spec.md section 2's cache, one line at a time: LRU with free ways first, write-back."""

    def __init__(self, size: int, memory: MemoryController) -> None:
        self.size = size
        self.sets = size // LINE // WAYS
        self._ways: list[list[_Way | None]] = [[None] * WAYS for _ in range(self.sets)]
        self._memory = memory
        self._clock = 0
        self._counts: Counter[str] = Counter()

    @property
    def stats(self) -> CacheStats:
        return CacheStats(**self._counts)

    def load(self, pa: int, length: int, keyid: int) -> bytes:
        out = bytearray()
        for line, low, high in _pieces(pa, length):
            out += self._touch(line, keyid, keep_old=True).data[low:high]
        return bytes(out)

    def load_u64(self, pa: int, keyid: int) -> int:
        return int.from_bytes(self.load(pa, 8, keyid), "little")

    def store(self, pa: int, data: bytes | bytearray | memoryview, keyid: int) -> None:
        source = bytes(data)
        done = 0
        for line, low, high in _pieces(pa, len(source)):
            way = self._touch(line, keyid, keep_old=high - low < LINE)
            way.data[low:high] = source[done : done + high - low]
            way.dirty = True
            done += high - low

    def fill(self, pa: int, length: int, byte: int, keyid: int) -> None:
        self.store(pa, bytes([byte]) * length, keyid)

    def clflush(self, pa: int, keyid: int) -> None:
        self.flush_range(pa - pa % LINE, LINE, keyid)

    def flush_range(self, pa: int, length: int, keyid: int) -> int:
        flushed = 0
        for line, _, _ in _pieces(pa, length):
            ways = self._ways[line % self.sets]
            for index, way in enumerate(ways):
                if way is not None and (way.line, way.keyid) == (line, keyid):
                    self._write_back(way)
                    ways[index] = None
                    flushed += 1
        self._counts["flushes"] += flushed
        return flushed

    def wbinvd(self) -> None:
        """Dirty lines go back KeyID by KeyID (the last KeyID's copy of a line wins)."""
        cached = [way for ways in self._ways for way in ways if way is not None]
        for way in sorted(cached, key=lambda way: way.keyid):  # stable: set and way order
            self._write_back(way)
        self._ways = [[None] * WAYS for _ in range(self.sets)]
        self._counts["wbinvd"] += 1

    def export_state(self) -> dict[str, Any]:
        raise NotImplementedError("the reference is never snapshotted")

    def import_state(self, state: dict[str, Any]) -> None:
        raise NotImplementedError("the reference is never snapshotted")

    def _touch(self, line: int, keyid: int, keep_old: bool) -> _Way:
        """The line's way after a hit, or after evicting the LRU way (free ways first)."""
        ways = self._ways[line % self.sets]
        self._clock += 1
        for way in ways:
            if way is not None and (way.line, way.keyid) == (line, keyid):
                way.age = self._clock
                self._counts["hits"] += 1
                return way
        self._counts["misses"] += 1
        free = [index for index, way in enumerate(ways) if way is None]
        victim = free[0] if free else min(range(WAYS), key=lambda i: ways[i].age)  # type: ignore[union-attr]
        old = ways[victim]
        if old is not None:
            self._write_back(old)
        data = bytearray(LINE)
        if keep_old:
            data[:] = self._memory.read_lines(np.array([line]), keyid)[0].tobytes()
        ways[victim] = _Way(line, keyid, data, self._clock)
        return ways[victim]  # type: ignore[return-value]

    def _write_back(self, way: _Way) -> None:
        if way.dirty:
            lines = np.frombuffer(bytes(way.data), dtype=np.uint8).reshape(1, LINE)
            self._memory.write_lines(np.array([way.line]), way.keyid, lines)
            way.dirty = False
            self._counts["writebacks"] += 1


def _pieces(pa: int, length: int) -> list[tuple[int, int, int]]:
    """``(line, low, high)``: the byte range ``low..high`` of each line the access covers."""
    pieces = []
    end = pa + length
    while pa < end:
        line, low = divmod(pa, LINE)
        high = min(LINE, low + end - pa)
        pieces.append((line, low, high))
        pa += high - low
    return pieces


def machine(reference: bool = False, cache: int = CACHE) -> Platform:
    """A seeded machine (4 MiB; 8 MiB for a 2 MiB cache) with a ``cache``-byte cache;
    KeyIDs 1..3 with keys of their own."""
    phys_mem = max(4 * MiB, 4 * cache)
    platform = Platform(MachineConfig(phys_mem=phys_mem, seed=7, cache_size=cache))
    for keyid in KEYIDS[1:]:
        program(platform, keyid, seed=keyid)
    if reference:
        platform.cache = ReferenceCache(cache, platform._memory)
    return platform


def program(platform: Platform, keyid: int, seed: int) -> None:
    """Give ``keyid`` a key of its own derived from ``seed`` (SET_KEY_DIRECT)."""
    rng = np.random.default_rng(seed)
    key, tweak = rng.bytes(16), rng.bytes(16)
    raw = KeyProgram(keyid, KeyProgramCommand.SET_KEY_DIRECT, AES_XTS_128.bit, key, tweak)
    assert platform.pconfig(raw.encode()) is PconfigStatus.PROG_SUCCESS


# --- random operation sequences ---------------------------------------------------------

addresses = st.one_of(
    st.integers(0, REGION // PAGE - 1).map(lambda page: page * PAGE),  # whole pages: fast paths
    st.integers(0, REGION - 1),
)
lengths = st.one_of(
    st.sampled_from([PAGE, 2 * PAGE, 8]),
    st.integers(1, 200),
    st.integers(1, 5 * PAGE),
    st.integers(CACHE - PAGE, CACHE + 3 * PAGE),  # wraps around the sets
)
keyids = st.sampled_from(KEYIDS)


def steps_over(
    addresses: st.SearchStrategy[int], lengths: st.SearchStrategy[int]
) -> list[st.SearchStrategy[tuple[object, ...]]]:
    """Every kind of step, at ``addresses`` with ``lengths``."""
    return [
        st.tuples(st.just("load"), addresses, lengths, keyids),
        st.tuples(st.just("store"), addresses, lengths, keyids, st.integers(0, 255)),
        st.tuples(st.just("fill"), addresses, lengths, keyids, st.integers(0, 255)),
        st.tuples(st.just("flush_range"), addresses, lengths, keyids),
        st.tuples(st.just("clflush"), addresses, keyids),
        st.tuples(st.just("wbinvd")),
        st.tuples(st.just("dram_write"), addresses, st.integers(1, 300), st.integers(0, 255)),
        st.tuples(st.just("reprogram"), st.sampled_from(KEYIDS[1:]), st.integers(0, 1000)),
        st.tuples(st.just("dram"), addresses, lengths),
    ]


operations = st.one_of(steps_over(addresses, lengths))
Step = tuple[object, ...]


def run_step(platform: Platform, step: Step, region: int = REGION) -> object:
    """Apply one step; what it returns (loaded bytes, a flush count, DRAM) must agree."""
    kind, *args = step
    if kind in ("load", "store", "fill", "flush_range", "dram_write", "dram"):
        pa, length = int(args[0]), int(args[1])  # type: ignore[call-overload]
        length = min(length, region - pa)
    if kind == "load":
        return platform.load(pa, length, int(args[2]))  # type: ignore[call-overload]
    if kind == "store":
        start = int(args[3])  # type: ignore[call-overload]
        data = bytes((start + 7 * i) % 256 for i in range(length))
        platform.store(pa, data, int(args[2]))  # type: ignore[call-overload]
        return None
    if kind == "fill":
        platform.fill(pa, length, int(args[3]), int(args[2]))  # type: ignore[call-overload]
        return None
    if kind == "flush_range":
        return platform.flush_range(pa, length, int(args[2]))  # type: ignore[call-overload]
    if kind == "clflush":
        platform.clflush(int(args[0]), int(args[1]))  # type: ignore[call-overload]
        return None
    if kind == "wbinvd":
        platform.wbinvd()
        return None
    if kind == "dram_write":
        platform.dram_write(pa, bytes([int(args[2])]) * length)  # type: ignore[call-overload]
        return None
    if kind == "pile":  # lines ``stride`` apart share a set: more than WAYS of them overflow it
        first, count, keyid, stride, width = (int(arg) for arg in args)  # type: ignore[call-overload]
        for size in (8, width):  # one line each, then ``width`` bytes that partly hit
            for i in range(count):
                platform.store(first + i * stride, bytes([i]) * size, keyid)
        return None
    if kind == "reprogram":
        program(platform, int(args[0]), seed=int(args[1]))  # type: ignore[call-overload]
        return None
    return platform.dram_read(pa, length)


def resident_lines_by_page(cache: WriteBackCache) -> np.ndarray:
    """How many lines of each page the cache holds, under any KeyID, from its tags."""
    slots = np.flatnonzero(cache._tags != -1)
    lines = (cache._tags[slots] >> 16) + slots // WAYS
    return np.bincount(lines // (PAGE // LINE), minlength=cache._resident.size)


def assert_page_bound_holds(cache: WriteBackCache) -> None:
    """``flush_range``'s per-page bound is never below the lines really cached."""
    assert (cache._resident >= resident_lines_by_page(cache)).all()


@settings(max_examples=120, deadline=None)
@given(steps=st.lists(operations, min_size=1, max_size=30))
def test_vectorized_cache_matches_the_line_by_line_reference(steps: list[Step]) -> None:
    real, model = machine(), machine(reference=True)
    assert isinstance(real.cache, WriteBackCache)
    for step in steps:
        assert run_step(real, step) == run_step(model, step), step
        assert real.cache.stats == model.cache.stats, step
        assert_page_bound_holds(real.cache)
    real.wbinvd()
    model.wbinvd()
    assert real.dram_read(0, REGION) == model.dram_read(0, REGION)
    assert real.cache.stats == model.cache.stats


@settings(max_examples=80, deadline=None)
@given(steps=st.lists(operations, min_size=1, max_size=30))
def test_fill_is_a_store_of_the_repeated_byte(steps: list[Step]) -> None:
    """``fill`` against ``store(bytes([byte]) * length)``: same view, counters, DRAM."""
    filled, stored = machine(), machine()
    for step in steps:
        as_store = ("store_bytes", *step[1:]) if step[0] == "fill" else step
        assert run_step(filled, step) == run_fill_as_store(stored, as_store), step
        assert filled.cache.stats == stored.cache.stats, step
    filled.wbinvd()
    stored.wbinvd()
    assert filled.dram_read(0, REGION) == stored.dram_read(0, REGION)


def run_fill_as_store(platform: Platform, step: Step) -> object:
    if step[0] != "store_bytes":
        return run_step(platform, step)
    pa, length, keyid, byte = (int(arg) for arg in step[1:])  # type: ignore[call-overload]
    platform.store(pa, bytes([byte]) * min(length, REGION - pa), keyid)
    return None


# --- the default geometry: 2 MiB, 16 ways, 2048 sets ------------------------------------

DEFAULT_CACHE = MachineConfig().cache_size
DEFAULT_REGION = 3 * DEFAULT_CACHE
SET_STRIDE = DEFAULT_CACHE // WAYS  # lines this far apart share a set: 128 KiB


def _operations_at_default_geometry() -> st.SearchStrategy[Step]:
    """Steps over 6 MiB: whole pages, any byte, stores that straddle a page
    boundary, and lines piled into one set so that the 16 ways overflow."""
    addresses = st.one_of(
        st.integers(0, DEFAULT_REGION // PAGE - 1).map(lambda page: page * PAGE),
        st.integers(0, DEFAULT_REGION - 1),
        st.tuples(st.integers(1, DEFAULT_REGION // PAGE - 1), st.integers(1, LINE)).map(
            lambda pair: pair[0] * PAGE - pair[1]  # ends past a page boundary
        ),
        st.tuples(st.integers(0, 3), st.integers(0, DEFAULT_REGION // SET_STRIDE - 1)).map(
            lambda pair: pair[0] * LINE + pair[1] * SET_STRIDE  # four sets, many lines each
        ),
    )
    lengths = st.one_of(
        st.sampled_from([PAGE, 2 * PAGE, 8, LINE + 1]),
        st.integers(1, 200),
        st.integers(1, 3 * PAGE),
    )
    return st.one_of(
        *steps_over(addresses, lengths),
        st.tuples(
            st.just("pile"),
            st.integers(0, 3).map(lambda s: s * LINE),
            st.integers(WAYS - 2, 2 * WAYS + 2),
            keyids,
            st.just(SET_STRIDE),
            st.sampled_from([8, 3 * LINE, 4 * LINE]),
        ),
    )


@settings(max_examples=40, deadline=None)
@given(steps=st.lists(_operations_at_default_geometry(), min_size=1, max_size=60))
def test_the_default_geometry_matches_the_reference(steps: list[Step]) -> None:
    """The same differential test at the cache every user gets (2 MiB, 16-way)."""
    real, model = machine(cache=DEFAULT_CACHE), machine(reference=True, cache=DEFAULT_CACHE)
    for step in steps:
        assert run_step(real, step, DEFAULT_REGION) == run_step(model, step, DEFAULT_REGION), step
        assert real.cache.stats == model.cache.stats, step
    real.wbinvd()
    model.wbinvd()
    assert real.dram_read(0, DEFAULT_REGION) == model.dram_read(0, DEFAULT_REGION)


def test_a_store_straddling_two_pages_then_clflush_of_each_line() -> None:
    """A store across a page boundary dirties two lines of two pages; CLFLUSH of
    each writes exactly that line back, under the KeyID that stored it."""
    for cache in (CACHE, DEFAULT_CACHE):
        real, model = machine(cache=cache), machine(reference=True, cache=cache)
        data = bytes(range(100))
        for platform in (real, model):
            platform.store(PAGE - 50, data, 2)
            platform.clflush(PAGE - LINE, 2)
        assert real.dram_read(0, 2 * PAGE) == model.dram_read(0, 2 * PAGE)
        before = real.dram_read(PAGE, LINE)
        for platform in (real, model):
            platform.clflush(PAGE, 2)
        assert real.dram_read(PAGE, LINE) == model.dram_read(PAGE, LINE) != before
        assert real.load(PAGE - 50, 100, 2) == data == model.load(PAGE - 50, 100, 2)
        assert real.cache.stats == model.cache.stats


# --- the fast paths, one at a time --------------------------------------------------------


def test_reference_model_catches_a_wrong_victim() -> None:
    """The model is strict enough to fail: a cache that evicts the MRU way disagrees."""
    real, model = machine(), machine(reference=True)
    set_stride = CACHE // WAYS  # sets * LINE: lines this far apart share a set
    for platform in (real, model):
        for way in range(WAYS):
            platform.store(way * set_stride, bytes([way]) * LINE, 1)
        platform.load(0, 8, 1)  # line 0 is now the most recent
    ways = model.cache._ways[0]  # type: ignore[attr-defined]
    lru = min(range(WAYS), key=lambda i: ways[i].age)
    ways[lru].age = 10**9  # the model now believes the LRU line is the most recent
    for platform in (real, model):
        platform.store(WAYS * set_stride, b"N" * LINE, 1)  # one victim goes to DRAM
    assert real.dram_read(0, REGION) != model.dram_read(0, REGION)


def test_flush_of_a_page_with_nothing_cached_finds_nothing_and_counts_nothing() -> None:
    platform = machine()
    platform.store(0, bytes(PAGE), 1)
    before = platform.cache.stats
    assert platform.flush_range(PAGE, PAGE, 1) == 0  # never touched
    assert platform.flush_range(0, PAGE, 2) == 0  # cached, but under KeyID 1 only
    assert platform.cache.stats == before
    assert platform.flush_range(0, PAGE, 1) == PAGE // LINE


def test_flush_of_several_pages_looks_past_an_empty_first_page() -> None:
    platform = machine()
    platform.store(2 * PAGE + 8, b"third page", 1)
    platform.fill(5 * PAGE, PAGE, 0x55, 1)
    assert platform.flush_range(0, 4 * PAGE, 1) == 1
    assert platform.flush_range(PAGE, 8 * PAGE, 1) == PAGE // LINE
    assert platform.load(2 * PAGE + 8, 10, 1) == b"third page"


def test_page_evicted_by_others_is_recounted_when_flushed() -> None:
    """Eviction leaves the page's bound high; a whole-page flush makes it exact again."""
    platform = machine()
    cache = platform.cache
    assert isinstance(cache, WriteBackCache)
    platform.fill(0, PAGE, 0xAA, 1)
    for n in range(1, WAYS + 1):  # the same sets, 16 other pages: page 0 is evicted
        platform.fill(n * CACHE, PAGE, n, 1)
    assert cache._resident[0] > resident_lines_by_page(cache)[0] == 0
    assert platform.flush_range(0, PAGE, 1) == 0
    assert cache._resident[0] == 0
    assert platform.load(0, PAGE, 1) == b"\xaa" * PAGE  # written back on eviction


def test_page_with_lines_under_two_keyids_keeps_the_other_keyid_lines_counted() -> None:
    platform = machine()
    cache = platform.cache
    assert isinstance(cache, WriteBackCache)
    platform.fill(0, PAGE, 1, 1)
    platform.store(100, b"two", 2)  # line 1 of the page, under KeyID 2 as well
    assert platform.flush_range(0, PAGE, 1) == PAGE // LINE
    assert cache._resident[0] == 1
    assert platform.flush_range(0, PAGE, 2) == 1
    assert cache._resident[0] == 0


def test_wbinvd_resets_every_page_bound() -> None:
    platform = machine()
    cache = platform.cache
    assert isinstance(cache, WriteBackCache)
    platform.fill(0, 5 * PAGE, 7, 3)
    platform.wbinvd()
    assert not cache._resident.any()
    assert platform.flush_range(0, 5 * PAGE, 3) == 0
    assert platform.load(0, 5 * PAGE, 3) == b"\x07" * 5 * PAGE


def test_hint_of_an_evicted_line_is_not_trusted() -> None:
    """A one-line hit remembers its slot; once another line takes that slot, it misses."""
    platform = machine()
    set_stride = CACHE // WAYS
    platform.store(0, b"12345678", 1)
    assert platform.load(0, 8, 1) == b"12345678"  # a hinted hit from now on
    for way in range(1, WAYS + 1):  # evicts line 0 (KeyID 1): its slot is reused
        platform.store(way * set_stride, bytes(LINE), 2)
    misses = platform.cache.stats.misses
    assert platform.load(0, 8, 1) == b"12345678"  # from DRAM, written back at eviction
    assert platform.cache.stats.misses == misses + 1
    platform.store(0, b"abcdefgh", 2)  # the same line under KeyID 2: another line
    assert platform.load(0, 8, 1) == b"12345678"
