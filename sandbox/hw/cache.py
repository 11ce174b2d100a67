"""The CPU cache: write-back, 64-byte lines, tagged (line address, KeyID).

What it models: the last-level cache in front of the memory controller (SPEC
section 2, "CPU cache"). Because MKTME puts the KeyID in physical-address bits,
the cache sees the same physical line under two KeyIDs as two different lines:
they coexist, nothing keeps them coherent, and software must flush.

Rules it keeps:
- ``cache_size`` bytes, 16 ways, ``size / 64 / 16`` sets; a line's set is its
  line number modulo the set count (the KeyID is not part of the index, as the
  KeyID bits are above every index bit on hardware).
- A load or store with KeyID K hits only lines tagged K. A miss picks the least
  recently used way (free ways first; deterministic), writes that victim back
  if dirty, then fills from DRAM through the engine; a store covering a whole
  line needs no fill.
- A dirty line is encrypted with its KeyID's key *as programmed at write-back
  time* (eviction, CLFLUSH, ``flush_range``, WBINVD): the memory controller
  looks the key up then. Reprogramming a KeyID flushes nothing by itself.
- DRAM writes do not touch the cache (stale lines stay, as on hardware).
- ``cache_size`` 0: ``Uncached``, every access goes through the engine to DRAM.

How it is fast: tags ``(line << 16) | keyid`` (-1 = free), dirty bits, ages and
data live in flat numpy arrays of ``sets * ways`` slots. A buffer is processed in
chunks of at most ``sets`` consecutive lines, so each set appears once per chunk
and the whole chunk is looked up, evicted, written back (one encrypt per KeyID)
and filled (one DRAM read and decrypt) at once. An access inside one line that
hits takes a short path with no array arithmetic.

Left out: cache levels, prefetching, non-temporal stores, and timing.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from sandbox.config import LINE_SIZE
from sandbox.hw.memctl import MemoryController

__all__ = ["WAYS", "Cache", "CacheStats", "Uncached", "WriteBackCache", "make_cache"]

WAYS = 16
KEYID_TAG_BITS = 16  # a tag is (line number << 16) | KeyID; KeyIDs have at most 15 bits
FREE = -1


@dataclass(frozen=True)
class CacheStats:
    """Counters since boot: line hits and misses, lines written back or flushed, WBINVDs."""

    hits: int = 0
    misses: int = 0
    writebacks: int = 0
    flushes: int = 0
    wbinvd: int = 0

    def text(self) -> str:
        """``name value`` per line."""
        return "".join(f"{name} {value}\n" for name, value in dataclasses.asdict(self).items())


class Cache(Protocol):
    """What the platform needs of a cache; ``pa + length`` has been bounds-checked."""

    size: int

    @property
    def stats(self) -> CacheStats: ...

    def load(self, pa: int, length: int, keyid: int) -> bytes: ...

    def store(self, pa: int, data: bytes | bytearray | memoryview, keyid: int) -> None: ...

    def clflush(self, pa: int, keyid: int) -> None: ...

    def flush_range(self, pa: int, length: int, keyid: int) -> int: ...

    def wbinvd(self) -> None: ...


def make_cache(size: int, memory: MemoryController) -> Cache:
    """A write-back cache of ``size`` bytes, or ``Uncached`` for size 0."""
    return WriteBackCache(size, memory) if size else Uncached(memory)


@dataclass(frozen=True)
class _Span:
    """The lines an access touches: ``count`` lines from ``first``; the data at ``offset``."""

    first: int
    count: int
    offset: int
    length: int

    @classmethod
    def of(cls, pa: int, length: int) -> _Span:
        first = pa // LINE_SIZE
        return cls(first, (pa + length - 1) // LINE_SIZE - first + 1, pa % LINE_SIZE, length)

    def partial_lines(self, start: int, stop: int) -> np.ndarray | None:
        """Of lines ``start..stop-1`` (span-relative), which the data covers only in part.

        None when it covers all of them whole (no line needs its old contents).
        """
        head = start == 0 and self.offset != 0
        tail = stop == self.count and (self.offset + self.length) % LINE_SIZE != 0
        if not (head or tail):
            return None
        partial = np.zeros(stop - start, dtype=bool)
        partial[0] = head
        partial[-1] |= tail
        return partial

    def numbers(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Line numbers of span-relative lines ``start..stop-1`` (default: all)."""
        stop = self.count if stop is None else stop
        return np.arange(self.first + start, self.first + stop, dtype=np.int64)

    def chunks(self, sets: int) -> Iterator[tuple[int, int]]:
        """``(start, stop)`` span-relative line ranges that never wrap around the sets.

        Consecutive lines fall in consecutive sets, so within one range each set
        appears at most once and its rows are one contiguous block of slots.
        """
        start = 0
        while start < self.count:
            stop = min(self.count, start + sets - (self.first + start) % sets)
            yield start, stop
            start = stop


class WriteBackCache:
    """A set-associative write-back cache, not coherent across KeyIDs."""

    def __init__(self, size: int, memory: MemoryController) -> None:
        self.size = size
        self.ways = WAYS
        self.sets = size // LINE_SIZE // WAYS
        slots = self.sets * WAYS
        self._memory = memory
        self._tags = np.full(slots, FREE, dtype=np.int64)
        self._dirty = np.zeros(slots, dtype=bool)
        self._ages = np.full(slots, FREE, dtype=np.int64)  # last use; free slots are oldest
        self._data = np.zeros((slots, LINE_SIZE), dtype=np.uint8)
        self._tag_rows = self._tags.reshape(self.sets, WAYS)
        self._age_rows = self._ages.reshape(self.sets, WAYS)
        self._row_slots = np.arange(self.sets, dtype=np.int64) * WAYS  # first slot of each set
        self._bytes = self._data.reshape(-1).data
        self._clock = 0
        self._counts: Counter[str] = Counter()  # CacheStats field -> count

    def __repr__(self) -> str:
        return f"<WriteBackCache {self.size:#x} bytes, {self.sets} sets x {self.ways} ways>"

    @property
    def stats(self) -> CacheStats:
        return CacheStats(**self._counts)

    def load(self, pa: int, length: int, keyid: int) -> bytes:
        slot = self._hit_within_line(pa, length, keyid)
        if slot != FREE:
            start = slot * LINE_SIZE + pa % LINE_SIZE
            return self._bytes[start : start + length].tobytes()
        span = _Span.of(pa, length)
        parts = [
            self._data[self._lookup(span.first + start, stop - start, keyid)]
            for start, stop in span.chunks(self.sets)
        ]
        lines = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return lines.reshape(-1)[span.offset : span.offset + length].tobytes()

    def store(self, pa: int, data: bytes | bytearray | memoryview, keyid: int) -> None:
        slot = self._hit_within_line(pa, len(data), keyid)
        if slot != FREE:
            start = slot * LINE_SIZE + pa % LINE_SIZE
            self._bytes[start : start + len(data)] = data
            self._dirty[slot] = True
            return
        span = _Span.of(pa, len(data))
        source = np.frombuffer(data, dtype=np.uint8)
        for start, stop in span.chunks(self.sets):
            partial = span.partial_lines(start, stop)
            fill = False if partial is None else partial
            slots = self._lookup(span.first + start, stop - start, keyid, fill)
            self._dirty[slots] = True
            begin = start * LINE_SIZE - span.offset  # where these lines start in ``source``
            if partial is None:
                self._data[slots] = source[begin : begin + slots.size * LINE_SIZE].reshape(
                    -1, LINE_SIZE
                )
                continue
            lines = self._data[slots]
            flat = lines.reshape(-1)
            low, high = max(-begin, 0), min(span.length - begin, flat.size)
            flat[low:high] = source[begin + low : begin + high]
            self._data[slots] = lines

    def clflush(self, pa: int, keyid: int) -> None:
        self.flush_range(pa - pa % LINE_SIZE, LINE_SIZE, keyid)

    def flush_range(self, pa: int, length: int, keyid: int) -> int:
        """Write back (if dirty) and invalidate every line of the range tagged ``keyid``."""
        if length <= 0:
            return 0
        span = _Span.of(pa, length)
        flushed = 0
        for start, stop in span.chunks(self.sets):
            first = span.first + start
            found = np.flatnonzero(
                self._rows(first, stop - start)
                == self._tags_of(first, stop - start, keyid)[:, None]
            )
            if found.size:
                slots = first % self.sets * WAYS + found  # the rows are contiguous slots
                self._write_back(slots)
                self._invalidate(slots)
                flushed += found.size
        self._counts["flushes"] += flushed
        return flushed

    def wbinvd(self) -> None:
        """Write back every dirty line, then invalidate the whole cache."""
        self._write_back(np.flatnonzero(self._dirty))
        self._invalidate(slice(None))
        self._counts["wbinvd"] += 1

    def _hit_within_line(self, pa: int, length: int, keyid: int) -> int:
        """The slot of a hit on an access inside one line, else FREE (take the long path)."""
        if pa % LINE_SIZE + length > LINE_SIZE:
            return FREE
        line = pa // LINE_SIZE
        index = line % self.sets
        try:
            way = self._tag_rows[index].tolist().index(line << KEYID_TAG_BITS | keyid)
        except ValueError:
            return FREE
        slot = index * WAYS + way
        self._ages[slot] = self._clock
        self._clock += 1
        self._counts["hits"] += 1
        return slot

    def _lookup(
        self, first: int, count: int, keyid: int, fill: np.ndarray | bool = True
    ) -> np.ndarray:
        """Slots holding lines ``first..first+count-1`` for ``keyid``; the lines share no set.

        Misses evict the least recently used way, writing it back if dirty, and
        are filled from DRAM where ``fill`` says the old contents are needed (True:
        all lines, False: none, a mask: those lines; a store that overwrites a
        whole line needs no fill).
        """
        tags = self._tags_of(first, count, keyid)
        set0 = first % self.sets
        # The rows are contiguous slots and a tag sits in at most one way of its row,
        # so the flat indexes of the matches are the hit slots, in line order.
        hits = set0 * WAYS + np.flatnonzero(self._rows(first, count) == tags[:, None])
        slots = hits if hits.size == count else self._miss(first, tags, hits, keyid, fill)
        self._ages[slots] = self._clock
        self._clock += 1
        self._counts["hits"] += hits.size
        self._counts["misses"] += count - hits.size
        return slots

    def _miss(
        self, first: int, tags: np.ndarray, hits: np.ndarray, keyid: int, fill: np.ndarray | bool
    ) -> np.ndarray:
        """``_lookup`` for a chunk with misses: all its slots, the missed lines now allocated."""
        set0 = first % self.sets
        hit = np.zeros(tags.size, dtype=bool)
        hit[hits // WAYS - set0] = True
        missed = np.flatnonzero(~hit)
        victims = self._row_slots[set0 + missed] + self._age_rows[set0 + missed].argmin(axis=1)
        self._write_back(victims)
        self._tags[victims] = tags[missed]
        self._dirty[victims] = False
        slots = np.empty(tags.size, dtype=np.int64)
        slots[hit] = hits
        slots[missed] = victims
        needed = _selected(missed, fill)
        if needed.size:
            self._data[slots[needed]] = self._memory.read_lines(first + needed, keyid)
        return slots

    def _rows(self, first: int, count: int) -> np.ndarray:
        """The tag rows ``[count, WAYS]`` of lines ``first..``, a view (no set wraps)."""
        set0 = first % self.sets
        return self._tag_rows[set0 : set0 + count]

    @staticmethod
    def _tags_of(first: int, count: int, keyid: int) -> np.ndarray:
        step = 1 << KEYID_TAG_BITS
        return np.arange(first * step | keyid, (first + count) * step | keyid, step, dtype=np.int64)

    def _write_back(self, slots: np.ndarray) -> None:
        """Encrypt the dirty lines among ``slots`` into DRAM: one engine call per KeyID."""
        dirty = slots[self._dirty[slots]]
        if not dirty.size:
            return
        tags = self._tags[dirty]
        for keyid, mine in _by_keyid(tags & ((1 << KEYID_TAG_BITS) - 1)):
            self._memory.write_lines(tags[mine] >> KEYID_TAG_BITS, keyid, self._data[dirty[mine]])
        self._dirty[dirty] = False
        self._counts["writebacks"] += int(dirty.size)

    def _invalidate(self, slots: np.ndarray | slice) -> None:
        self._tags[slots] = FREE
        self._ages[slots] = FREE
        self._dirty[slots] = False


def _selected(lines: np.ndarray, which: np.ndarray | bool) -> np.ndarray:
    """The ``lines`` (chunk-relative indexes) that ``which`` picks: all, none, or by mask."""
    if isinstance(which, np.ndarray):
        return lines[which[lines]]
    return lines if which else lines[:0]


def _by_keyid(keyids: np.ndarray) -> list[tuple[int, np.ndarray | slice]]:
    """``(keyid, selector)`` per distinct KeyID; one KeyID (the usual case) selects all."""
    first = int(keyids[0])
    if (keyids == first).all():
        return [(first, slice(None))]
    return [(keyid, keyids == keyid) for keyid in np.unique(keyids).tolist()]


class Uncached:
    """``cache_size`` 0: loads and stores go straight through the engine to DRAM."""

    size = 0

    def __init__(self, memory: MemoryController) -> None:
        self._memory = memory
        self._counts: Counter[str] = Counter()  # CacheStats field -> count

    def __repr__(self) -> str:
        return "<Uncached>"

    @property
    def stats(self) -> CacheStats:
        return CacheStats(**self._counts)

    def load(self, pa: int, length: int, keyid: int) -> bytes:
        span = _Span.of(pa, length)
        self._counts["misses"] += span.count
        lines = self._memory.read_lines(span.numbers(), keyid)
        return lines.reshape(-1)[span.offset : span.offset + length].tobytes()

    def store(self, pa: int, data: bytes | bytearray | memoryview, keyid: int) -> None:
        """Read-modify-write: only lines the data covers in part are read first."""
        span = _Span.of(pa, len(data))
        self._counts["misses"] += span.count
        numbers = span.numbers()
        partial = span.partial_lines(0, span.count)
        lines = np.zeros((span.count, LINE_SIZE), dtype=np.uint8)
        if partial is not None:
            lines[partial] = self._memory.read_lines(numbers[partial], keyid)
        lines.reshape(-1)[span.offset : span.offset + len(data)] = np.frombuffer(data, np.uint8)
        self._memory.write_lines(numbers, keyid, lines)

    def clflush(self, pa: int, keyid: int) -> None:
        """Nothing is ever cached: nothing to flush."""

    def flush_range(self, pa: int, length: int, keyid: int) -> int:
        return 0

    def wbinvd(self) -> None:
        self._counts["wbinvd"] += 1
