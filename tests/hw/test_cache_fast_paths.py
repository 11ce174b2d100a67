"""The fast paths of the cache and the memory controller against their slow paths,
at the default geometry.

``WriteBackCache.fast`` switches on the paths that exist only for speed: a
one-line miss handled with Python scalars, a chunk that misses everywhere
decrypted from its DRAM slice straight into the caller's buffer, and a chunk
that misses or hits everywhere in one way handled on that way's strided slice.
With ``fast`` off every access takes the chunked path. Two machines, one each way, run the
same few thousand random operations (loads, stores and fills of any length at
any offset, across KeyIDs, straddling lines and pages; CLFLUSH, flush_range,
WBINVD, DRAM reads and writes and key changes) at the cache every user gets
(2 MiB, 16-way). They must return the same bytes and flush counts, and hold the
same DRAM and the same full cache state: tags, dirty bits, ages, data, clock,
page bounds and counters.

The memory controller's write-back queue is held the same way to writing each
write-back at once (``MemoryController.queue = 0``), at its own bound and at a
small one that drains in the middle of write-backs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from mktme_sandbox.config import MachineConfig, MiB
from mktme_sandbox.hw.cache import WriteBackCache
from mktme_sandbox.hw.keytable import KeyProgram, KeyProgramCommand, PconfigStatus
from mktme_sandbox.hw.memctl import WRITE_BACK_QUEUE, MemoryController
from mktme_sandbox.hw.platform import Platform
from mktme_sandbox.hw.xts import AES_XTS_128

LINE, PAGE = 64, 4096
CACHE = MachineConfig().cache_size
REGION = 3 * CACHE  # evictions everywhere
KEYIDS = (0, 1, 2, 3)
STEPS = 3000
CHECKPOINT = 50  # steps between comparisons of the whole state


def machine(fast: bool, queue: int = WRITE_BACK_QUEUE) -> Platform:
    platform = Platform(MachineConfig(phys_mem=8 * MiB, seed=7, cache_size=CACHE))
    for keyid in KEYIDS[1:]:
        program(platform, keyid, seed=keyid)
    assert isinstance(platform.cache, WriteBackCache)
    platform.cache.fast = fast
    controller(platform).queue = queue
    return platform


def controller(platform: Platform) -> MemoryController:
    memory: MemoryController = platform.cache._memory  # type: ignore[attr-defined]
    return memory


def program(platform: Platform, keyid: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    raw = KeyProgram(
        keyid, KeyProgramCommand.SET_KEY_DIRECT, AES_XTS_128.bit, rng.bytes(16), rng.bytes(16)
    )
    assert platform.pconfig(raw.encode()) is PconfigStatus.PROG_SUCCESS


def random_step(rng: np.random.Generator) -> tuple[Any, ...]:
    """One operation: kind, address, length, KeyID, byte/seed."""
    kind = rng.choice(
        ["load", "load", "load", "store", "store", "fill", "clflush", "flush_range"]
        + ["wbinvd", "dram_read", "dram_write", "reprogram", "load_u64"],
        p=[0.15, 0.1, 0.1, 0.15, 0.1, 0.1, 0.07, 0.07, 0.01, 0.02, 0.03, 0.05, 0.05],
    )
    where = rng.integers(4)
    if where == 0:
        pa = int(rng.integers(REGION // PAGE)) * PAGE  # whole pages
    elif where == 1:
        pa = int(rng.integers(1, REGION // PAGE)) * PAGE - int(rng.integers(1, LINE + 1))
    else:
        pa = int(rng.integers(REGION))
    longest = (LINE, 300, 3 * PAGE, 64 * 1024)[int(rng.integers(4))]  # one line .. 32 sets
    length = max(1, min(int(rng.integers(1, longest + 1)), REGION - pa))
    return (str(kind), pa, length, int(rng.choice(KEYIDS)), int(rng.integers(256)))


def run(platform: Platform, step: tuple[Any, ...]) -> object:
    kind, pa, length, keyid, byte = step
    if kind == "load":
        return platform.load(pa, length, keyid)
    if kind == "load_u64":  # a page-table entry: the number, against its eight bytes
        word = min(pa - pa % 8, REGION - 8)
        if isinstance(platform.cache, WriteBackCache) and platform.cache.fast:
            return platform.load_u64(word, keyid)
        return int.from_bytes(platform.load(word, 8, keyid), "little")
    if kind == "store":
        pattern = (byte + 7 * np.arange(length)) % 256
        platform.store(pa, pattern.astype(np.uint8).tobytes(), keyid)
    elif kind == "fill":
        platform.fill(pa, length, byte, keyid)
    elif kind == "clflush":
        platform.clflush(pa, keyid)
    elif kind == "flush_range":
        return platform.flush_range(pa, length, keyid)
    elif kind == "wbinvd":
        platform.wbinvd()
    elif kind == "dram_read":
        return platform.dram_read(pa, min(length, 300))
    elif kind == "dram_write":
        platform.dram_write(pa, bytes([byte]) * min(length, 300))
    else:
        program(platform, 1 + byte % 3, seed=byte)
    return None


def assert_same_state(fast: Platform, slow: Platform) -> None:
    mine, theirs = fast.cache.export_state(), slow.cache.export_state()
    assert mine.keys() == theirs.keys()
    for name, value in mine.items():
        assert np.array_equal(np.asarray(value), np.asarray(theirs[name])), name
    assert fast.dram_read(0, REGION) == slow.dram_read(0, REGION)


def test_fast_paths_match_the_chunked_path_in_output_dram_and_every_cache_field() -> None:
    run_side_by_side(machine(fast=True), machine(fast=False))


@pytest.mark.parametrize("queue", [WRITE_BACK_QUEUE, 7])
def test_the_write_back_queue_matches_writing_back_at_once(queue: int) -> None:
    run_side_by_side(machine(fast=True, queue=queue), machine(fast=True, queue=0))


def test_a_platform_state_imported_into_a_fresh_platform_behaves_the_same() -> None:
    """Through export_state and import_state: every cache field (the ages kept
    column-major inside, exported in slot order) and what follows."""
    rng = np.random.default_rng(3)
    original = machine(fast=True)
    for _ in range(STEPS // 10):
        run(original, random_step(rng))
    restored = machine(fast=True)
    restored.import_state(original.export_state())
    assert_same_state(original, restored)
    run_side_by_side(original, restored, steps=STEPS // 10)


def run_side_by_side(fast: Platform, slow: Platform, steps: int = STEPS) -> None:
    """The same random steps on both: the same outputs and counters at every step,
    the same DRAM and full cache state every ``CHECKPOINT`` steps and at the end."""
    rng = np.random.default_rng(16)
    for number in range(steps):
        step = random_step(rng)
        assert run(fast, step) == run(slow, step), (number, step)
        assert fast.cache.stats == slow.cache.stats, (number, step)
        if number % CHECKPOINT == 0:
            assert_same_state(fast, slow)
    assert_same_state(fast, slow)
    fast.wbinvd()
    slow.wbinvd()
    assert_same_state(fast, slow)


def test_a_cold_line_miss_and_a_cold_chunk_take_the_fast_paths() -> None:
    """The differential test is not vacuous: both fast paths run, and agree."""
    fast, slow = machine(fast=True), machine(fast=False)
    memory = fast.cache._memory  # type: ignore[attr-defined]
    calls: list[str] = []

    def spy(name: str) -> Any:
        real = getattr(memory, name)

        def called(*args: Any) -> Any:
            calls.append(name)
            return real(*args)

        return called

    for name in ("read_line", "read_run"):
        setattr(memory, name, spy(name))
    for platform in (fast, slow):
        platform.store(5 * PAGE, b"one line", 2)
        platform.clflush(5 * PAGE, 2)
    assert fast.load(5 * PAGE, 8, 2) == slow.load(5 * PAGE, 8, 2) == b"one line"
    assert fast.load(PAGE, 3 * PAGE, 1) == slow.load(PAGE, 3 * PAGE, 1)
    assert calls == ["read_line", "read_line", "read_run"]  # the store's partial line, the load's
    assert_same_state(fast, slow)


def test_queued_write_backs_land_with_their_last_value_and_the_key_of_their_write_back() -> None:
    """A line written back twice (once under an old key), and lines of two KeyIDs,
    wait in the queue and reach DRAM as if each had been written at once. Whole-line
    stores: a partial one would fill from DRAM, which drains the queue."""
    queued, direct = machine(fast=True), machine(fast=True, queue=0)
    for platform in (queued, direct):
        platform.store(3 * PAGE, b"old key".ljust(LINE), 1)
        platform.clflush(3 * PAGE, 1)
        program(platform, 1, seed=40)
        platform.store(3 * PAGE, b"new key".ljust(LINE), 1)
        platform.clflush(3 * PAGE, 1)
        platform.store(3 * PAGE + LINE, b"other".ljust(LINE), 2)
        platform.store(3 * PAGE, b"twice".ljust(LINE), 1)
        platform.flush_range(3 * PAGE, PAGE, 2)
        platform.flush_range(3 * PAGE, PAGE, 1)
        program(platform, 1, seed=41)
    assert controller(queued)._queued_lines == 4
    assert controller(direct)._queued_lines == 0
    assert_same_state(queued, direct)
    assert controller(queued)._queued_lines == 0


def test_lines_of_one_keyid_queued_under_a_key_since_replaced_land_with_that_key() -> None:
    """docs/spec.md 2.5: a dirty line is encrypted with its KeyID's key "as
    programmed when the line is written back", queued lines "each already
    bound to the key of its write-back": lines of a single KeyID still queued
    when PCONFIG replaces the key reach DRAM as if written at once (the
    drain's one-group path)."""
    queued, direct = machine(fast=True), machine(fast=True, queue=0)
    for platform in (queued, direct):
        platform.store(5 * PAGE, b"written back under the old key".ljust(LINE), 1)
        platform.clflush(5 * PAGE, 1)
        program(platform, 1, seed=42)
    assert controller(queued)._queued_lines == 1
    assert_same_state(queued, direct)


STRIDE = CACHE // 16  # bytes between two lines of one set: pages this far apart share their sets


def streaming(platform: Platform) -> list[object]:
    """Pages streaming through the same 64 sets: zeroed, copied and read, in
    ways that are sometimes one way across the sets and sometimes not, with
    victims all dirty under one tag, dirty under two KeyIDs, partly dirty, or clean."""
    outputs: list[object] = []
    platform.fill(0, PAGE, 0xAA, 1)
    platform.clflush(LINE, 1)
    platform.store(LINE, bytes(range(LINE)), 2)  # one set's way 0: another KeyID
    for n in range(1, 48):
        pa, keyid = n * STRIDE, 1 + n % 3
        if n % 5 == 3:
            outputs.append(platform.load(pa, PAGE, keyid))
            platform.store(pa + 5 * LINE, b"dirty".ljust(LINE), keyid)  # a hit: partly dirty
        elif n % 5 == 2:
            platform.store(pa, bytes([n]) * PAGE, keyid)
        else:
            platform.fill(pa, PAGE, n, keyid)
        if n == 20:
            outputs.append(platform.load(pa + 3 * STRIDE + 9 * LINE, 8, 1))  # one set moves on
        if n == 30:
            platform.clflush(pa + 11 * LINE, keyid)  # one way's slot freed
    warm = PAGE  # sets 64..127, all ways free: the page comes in whole in way 0
    platform.store(warm, bytes(range(256)) * 16, 3)
    outputs.append(platform.load(warm, PAGE, 3))
    platform.store(warm + 10, b"partial lines" * 300, 3)
    outputs.append(platform.load(warm, PAGE, 3))
    platform.flush_range(warm, PAGE, 3)
    outputs.append(platform.load(warm, PAGE, 3))  # clean, in one way again
    platform.fill(warm, PAGE, 0x5A, 3)  # whole lines over clean ones: dirty now
    platform.clflush(warm + 5 * LINE, 3)
    outputs.append(platform.load(warm, PAGE, 3))  # the first line in way 0, the sixth gone
    outputs.append(platform.load(0, 48 * STRIDE, 1))
    return outputs


def test_pages_streaming_through_one_way_match_the_fancy_indexed_path() -> None:
    """A chunk that misses everywhere with its victims all in one way, and a chunk
    that hits everywhere in one way, are handled on strided slices of that way
    (``_miss_one_way``, ``_hit_one_way``); they must leave what the general path
    leaves, for victims in one way and in several, dirty or not, and for whole
    and partial loads and stores of a warm page."""
    seen: set[str] = set()
    fast = machine(fast=True)
    cache = fast.cache
    assert isinstance(cache, WriteBackCache)
    miss, write_back_run, hits = cache._miss, cache._write_back_run, cache._hits_in_one_way

    def spy_miss(first: int, count: int, *rest: Any) -> Any:
        slots = miss(first, count, *rest)
        seen.add("one way" if isinstance(slots, slice) else "several ways")
        return slots

    def spy_write_back_run(run: slice, set0: int, count: int) -> None:
        dirty = int(np.count_nonzero(cache._dirty[run]))
        keyids = len(set((cache._tags[run] & 0xFFFF).tolist()))
        seen.add({0: "clean", count: f"all dirty, {keyids} KeyIDs"}.get(dirty, "partly dirty"))
        write_back_run(run, set0, count)

    def spy_hits(first: int, count: int, tag: int) -> slice | None:
        run = hits(first, count, tag)
        seen.add("hits in one way" if run is not None else "hits not in one way")
        return run

    cache._miss = spy_miss  # type: ignore[method-assign,assignment]
    cache._hits_in_one_way = spy_hits  # type: ignore[method-assign]
    cache._write_back_run = spy_write_back_run  # type: ignore[method-assign]
    slow, direct = machine(fast=False), machine(fast=True, queue=0)
    assert streaming(fast) == streaming(slow) == streaming(direct)
    assert_same_state(fast, slow)
    assert_same_state(fast, direct)
    kinds = {"one way", "several ways", "clean", "partly dirty"}
    kinds |= {"hits in one way", "hits not in one way"}
    assert seen >= kinds | {"all dirty, 1 KeyIDs", "all dirty, 2 KeyIDs"}
