"""The CPU cache: write-back, 64-byte lines, tagged (line address, KeyID).

What it models: the last-level cache in front of the memory controller (docs/spec.md
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
  line needs no fill. ``fill`` (memset) is a store of one repeated byte.
- A dirty line is encrypted with its KeyID's key *as programmed at write-back
  time* (eviction, CLFLUSH, ``flush_range``, WBINVD): the memory controller
  looks the key up then. Reprogramming a KeyID flushes nothing by itself.
- DRAM writes do not touch the cache (stale lines stay, as on hardware).
- ``cache_size`` 0: ``Uncached``, every access goes through the engine to DRAM.

How it is fast: tags, dirty bits and data live in flat numpy arrays of
``sets * ways`` slots; ages live column-major (``[ways, sets]``) as stamps
``age << slot_bits | slot``, so the victims of a chunk of consecutive sets are
one minimum over 16 contiguous rows (the smallest stamp is the first way of the
oldest age: the same victim as an argmin per set, at a fifth of its cost over
a chunk of 2048 sets). ``export_state`` shows the ages in slot order. A buffer is processed in chunks of at most ``sets``
consecutive lines, so each set appears once per chunk and the whole chunk is
looked up, evicted, written back (one encrypt per KeyID) and filled (one DRAM
read and decrypt) at once. A tag is ``(line - set) << 16 | keyid`` (-1 = free):
the set is implied by the slot, and all the lines of a chunk share one tag, so
a chunk is looked up by comparing its rows with one number. ``fill`` broadcasts
its byte into the lines, with no source buffer.

Write-back hands the memory controller a fresh gather of the victims' lines,
given away (queued with no second copy); victims that share one tag (the lines
of one older page under one KeyID: a flush, or a page streaming out) need no
pass over their KeyIDs. A chunk that misses everywhere with its victims all in
one way (pages streaming through the cache; one comparison of the oldest
stamps with that way's row) takes that way's slots as a strided slice: tags,
dirty bits, stamps and data written without fancy indexes; so does a chunk
that hits everywhere in one way (a warm page that came in whole: the first
line's way, then one comparison down it). Small equality
tests compare bytes (``_same``), a seventh of the cost of ``(a == b).all()``.

Per physical page, an upper bound of the lines it has in the cache (any KeyID):
it grows when lines come in, is recounted exactly when a whole page is flushed,
and is left high (never wrong, only pessimistic) when lines leave by eviction.
A page whose bound is 0 is answered without looking: ``flush_range`` returns at
once (the kernel flushes every page it allocates for a new KeyID, usually with
nothing cached), and a chunk of such pages misses everywhere (a page being
zeroed) with no search for hits.

An access inside one line takes a short path with no array arithmetic: a hit
(the slot of a recent hit is remembered and trusted once its tag confirms it,
for the page-table walk's 8-byte loads), and a miss (victim, write-back, tag,
page bound, fill and age with Python scalars: a 64-byte read of a cold line).
A load whose chunk misses everywhere is decrypted from its DRAM slice straight
into the output, then copied into the cache. These two miss paths, and the
one-way slices above, exist only for speed: ``fast = False`` sends every
access down the chunked path with fancy indexes, and
tests/hw/test_cache_fast_paths.py holds both ways to the same bytes, DRAM and
full cache state.

``export_state``/``import_state`` carry every line (tag, dirty bit, age, data),
the clock, the per-page bound and the counters, for machine snapshots; the
hints are only a shortcut and start empty.

Left out: cache levels, prefetching, non-temporal stores, and timing.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import numpy as np

from mktme_sandbox.config import LINE_SIZE, PAGE_SIZE
from mktme_sandbox.hw.memctl import MemoryController

__all__ = ["WAYS", "Cache", "CacheStats", "Uncached", "WriteBackCache", "make_cache"]

WAYS = 16
WAY_BITS = WAYS.bit_length() - 1  # slot >> 4 = set
KEYID_TAG_BITS = 16  # a tag is (line - set) << 16 | KeyID; KeyIDs have at most 15 bits
KEYID_TAG_MASK = (1 << KEYID_TAG_BITS) - 1
PAGE_LINES = PAGE_SIZE // LINE_SIZE
FREE = -1
_NO_SLOTS = np.empty(0, dtype=np.int64)
_NO_SLOTS.flags.writeable = False
_HINTS = 4096  # hints kept before starting over: page-table walks reuse a few hundred lines

Source = np.ndarray | int  # what a store writes: the bytes, or one byte repeated (fill)
Slots = np.ndarray | slice  # slot numbers, or one way's slots over consecutive sets
_LINE = np.dtype((np.void, LINE_SIZE))  # a line as one item: np.put copies it whole
# _REPEATED[b]: a line of byte b, as one item (what fill puts in every line)
_REPEATED = np.repeat(np.arange(256, dtype=np.uint8), LINE_SIZE).view(_LINE)
_REPEATED.flags.writeable = False
_LITTLE = sys.byteorder == "little"  # the words of a line read as x86 stores them


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

    def load_u64(self, pa: int, keyid: int) -> int: ...

    def store(self, pa: int, data: bytes | bytearray | memoryview, keyid: int) -> None: ...

    def fill(self, pa: int, length: int, byte: int, keyid: int) -> None: ...

    def clflush(self, pa: int, keyid: int) -> None: ...

    def flush_range(self, pa: int, length: int, keyid: int) -> int: ...

    def wbinvd(self) -> None: ...

    def export_state(self) -> dict[str, Any]: ...

    def import_state(self, state: dict[str, Any]) -> None: ...


def make_cache(size: int, memory: MemoryController) -> Cache:
    """A write-back cache of ``size`` bytes, or ``Uncached`` for size 0."""
    return WriteBackCache(size, memory) if size else Uncached(memory)


class _Span(NamedTuple):
    """The lines an access touches: ``lines`` lines from ``first``; the data at ``offset``.

    A NamedTuple rather than a frozen dataclass: one is built per access, and
    this is the cheaper of the two immutable records.
    """

    first: int
    lines: int
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
        tail = stop == self.lines and (self.offset + self.length) % LINE_SIZE != 0
        if not (head or tail):
            return None
        partial = np.zeros(stop - start, dtype=bool)
        partial[0] = head
        partial[-1] |= tail
        return partial

    def numbers(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Line numbers of span-relative lines ``start..stop-1`` (default: all)."""
        stop = self.lines if stop is None else stop
        return np.arange(self.first + start, self.first + stop, dtype=np.int64)

    def chunks(self, sets: int) -> Iterable[tuple[int, int]]:
        """``(start, stop)`` span-relative line ranges that never wrap around the sets.

        Consecutive lines fall in consecutive sets, so within one range each set
        appears at most once and its rows are one contiguous block of slots. One
        range (a page, usually) comes as a tuple, without a generator's cost.
        """
        if self.lines <= sets - self.first % sets:
            return ((0, self.lines),)
        return self._chunks(sets)

    def _chunks(self, sets: int) -> Iterator[tuple[int, int]]:
        start = 0
        while start < self.lines:
            stop = min(self.lines, start + sets - (self.first + start) % sets)
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
        # Last use, column-major: stamps[way, set] = age << slot_bits | slot, free
        # slots age -1 (oldest). The smallest stamp of a set names its victim, the
        # first way of the oldest age, and a chunk's victims are one minimum over
        # 16 contiguous rows. ``_stamp_at[slot]``: where a slot's stamp is.
        self._slot_bits = slots.bit_length()
        self._slot_mask = (1 << self._slot_bits) - 1
        by_way = np.arange(slots, dtype=np.int64).reshape(self.sets, WAYS).T
        self._slot_ids = np.ascontiguousarray(by_way)  # [way, set] -> slot
        self._stamp_at = np.argsort(self._slot_ids.reshape(-1))
        self._stamps = np.empty((WAYS, self.sets), dtype=np.int64)
        self._stamps[...] = self._slot_ids | FREE << self._slot_bits
        self._stamp_flat = self._stamps.reshape(-1)
        # Scalar views of the same memory for the one-line paths: indexing a
        # memoryview reads and writes Python ints without numpy's per-item cost.
        self._tag_items = self._tags.data
        self._stamp_items = self._stamp_flat.data
        self._dirty_items = self._dirty.data
        self._data = np.zeros((slots, LINE_SIZE), dtype=np.uint8)
        self._tag_rows = self._tags.reshape(self.sets, WAYS)
        self._bytes = self._data.reshape(-1).data
        # 8-byte little-endian words of the lines, for load_u64 (page-table entries)
        self._words = self._data.reshape(-1).view(np.uint64).data if _LITTLE else None
        self._lines = self._data.view(_LINE).reshape(-1)  # a 64-byte item per slot
        self._clock = 0
        # A page's lines fill 64 consecutive sets, so at most 64 * WAYS of them are
        # cached (a uint16 never overflows); config sizes give a multiple of 64 sets.
        if self.sets % PAGE_LINES:
            raise ValueError(f"a cache needs a multiple of {PAGE_LINES} sets, not {self.sets}")
        self._resident_cap = PAGE_LINES * WAYS
        self._pages = -(-memory.size // PAGE_SIZE)
        self._resident = self._nothing_resident()
        self._hints: dict[int, int] = {}  # line << 16 | keyid -> the slot it was last hit in
        self.fast = True  # False: only the chunked path (the differential tests' reference)
        self._hits = self._misses = self._writebacks = self._flushes = self._wbinvds = 0

    def __repr__(self) -> str:
        return f"<WriteBackCache {self.size:#x} bytes, {self.sets} sets x {self.ways} ways>"

    @property
    def stats(self) -> CacheStats:
        return CacheStats(self._hits, self._misses, self._writebacks, self._flushes, self._wbinvds)

    def load(self, pa: int, length: int, keyid: int) -> bytes:
        slot = self._one_line(pa, length, keyid, fill=True)
        if slot != FREE:
            start = slot * LINE_SIZE + pa % LINE_SIZE
            return self._bytes[start : start + length].tobytes()
        span = _Span.of(pa, length)
        out = np.empty((span.lines, LINE_SIZE), dtype=np.uint8)
        for start, stop in span.chunks(self.sets):
            self._lookup(span.first + start, stop - start, keyid, out=out[start:stop])
        return out.reshape(-1)[span.offset : span.offset + length].tobytes()

    def load_u64(self, pa: int, keyid: int) -> int:
        """``int.from_bytes(load(pa, 8, keyid), "little")``: a page-table entry,
        read as a number without building bytes (the same access to the cache)."""
        if pa % 8 == 0 and self._words is not None:
            slot = self._one_line(pa, 8, keyid, fill=True)
            if slot != FREE:
                return int(self._words[slot * 8 + (pa >> 3) % 8])
        return int.from_bytes(self.load(pa, 8, keyid), "little")

    def store(self, pa: int, data: bytes | bytearray | memoryview, keyid: int) -> None:
        length = len(data)
        slot = self._one_line(pa, length, keyid, fill=length < LINE_SIZE)
        if slot != FREE:
            start = slot * LINE_SIZE + pa % LINE_SIZE
            self._bytes[start : start + length] = data
            self._dirty_items[slot] = True
            return
        self._write(_Span.of(pa, length), np.frombuffer(data, dtype=np.uint8), keyid)

    def fill(self, pa: int, length: int, byte: int, keyid: int) -> None:
        """``store(pa, bytes([byte]) * length, keyid)``, without building the bytes."""
        slot = self._one_line(pa, length, keyid, fill=length < LINE_SIZE)
        if slot != FREE:
            offset = pa % LINE_SIZE
            self._data[slot, offset : offset + length] = byte
            self._dirty_items[slot] = True
            return
        self._write(_Span.of(pa, length), byte, keyid)

    def clflush(self, pa: int, keyid: int) -> None:
        self.flush_range(pa - pa % LINE_SIZE, LINE_SIZE, keyid)

    def flush_range(self, pa: int, length: int, keyid: int) -> int:
        """Write back (if dirty) and invalidate every line of the range tagged ``keyid``."""
        if length <= 0:
            return 0
        span = _Span.of(pa, length)
        if not self._maybe_resident(span.first, span.lines):
            return 0
        flushed = 0
        for start, stop in span.chunks(self.sets):
            first, count = span.first + start, stop - start
            rows = self._rows(first, count)
            tag = self._tag(first, keyid)
            found = np.flatnonzero(rows == tag)
            if found.size:
                found += first % self.sets * WAYS  # the rows are contiguous slots
                self._write_back(found, tag)
                self._invalidate(found)
                flushed += found.size
            self._recount_pages(first, count, rows, found.size)
        self._flushes += flushed
        return flushed

    def wbinvd(self) -> None:
        """Write back every dirty line, then invalidate the whole cache."""
        self._write_back(np.flatnonzero(self._dirty))
        self._invalidate(slice(None))
        self._resident = self._nothing_resident()
        self._wbinvds += 1

    def export_state(self) -> dict[str, Any]:
        resident = np.flatnonzero(self._resident)
        return {
            "tags": self._tags.copy(),
            "dirty": self._dirty.copy(),
            "ages": (self._stamps >> self._slot_bits).T.reshape(-1),  # in slot order
            "data": self._data.copy(),
            "clock": self._clock,
            "resident_pages": resident,
            "resident_counts": self._resident[resident],
            "counters": [self._hits, self._misses, self._writebacks, self._flushes, self._wbinvds],
        }

    def import_state(self, state: dict[str, Any]) -> None:
        """Every array is copied in whole (shapes checked by numpy) or not at all."""
        ages = state["ages"]
        arrays = (
            (self._tags, state["tags"]),
            (self._dirty, state["dirty"]),
            (self._tags, ages),  # only its shape: the same as the tags'
            (self._data, state["data"]),
        )
        for mine, theirs in arrays:
            if theirs.shape != mine.shape:
                raise ValueError(f"cache array of shape {theirs.shape}, not {mine.shape}")
        for mine, theirs in arrays[:2] + arrays[3:]:
            mine[...] = theirs
        self._stamps[...] = ages.reshape(self.sets, WAYS).T << self._slot_bits | self._slot_ids
        self._clock = int(state["clock"])
        self._resident = self._nothing_resident()
        self._resident[state["resident_pages"]] = state["resident_counts"]
        self._hints = {}
        self._hits, self._misses, self._writebacks, self._flushes, self._wbinvds = state["counters"]

    def _one_line(self, pa: int, length: int, keyid: int, fill: bool) -> int:
        """The slot of an access inside one line, after a hit or (``fast``) a
        miss handled line by line; FREE: take the chunked path.

        ``_hints`` remembers where recent hits were (line and KeyID -> slot); a
        hint is only trusted once the slot's tag confirms it, so nothing that
        moves lines has to keep the hints up to date. The caller marks a store dirty.
        """
        if pa % LINE_SIZE + length > LINE_SIZE:
            return FREE
        line = pa // LINE_SIZE
        index = line % self.sets
        tag = (line - index) << KEYID_TAG_BITS | keyid
        key = line << KEYID_TAG_BITS | keyid
        slot = self._hints.get(key, FREE)
        tags = self._tag_items
        if slot == FREE or tags[slot] != tag:
            first = index * WAYS
            row = tags[first : first + WAYS].tolist()
            if tag not in row:
                return self._miss_line(line, index, tag, keyid, fill) if self.fast else FREE
            slot = first + row.index(tag)
            if len(self._hints) >= _HINTS:
                self._hints.clear()
            self._hints[key] = slot
        # _touch_one(slot), inline: the page-table walk's hits come through here
        at = (slot & (WAYS - 1)) * self.sets + (slot >> WAY_BITS)
        self._stamp_items[at] = slot | self._clock << self._slot_bits
        self._clock += 1
        self._hits += 1
        return slot

    def _miss_line(self, line: int, index: int, tag: int, keyid: int, fill: bool) -> int:
        """``_lookup`` of one line that missed, with Python scalars: its slot now.

        The same victim (the first way of the oldest age), write-back, tag,
        page bound, fill, age and counters as the chunked path, without its
        per-call numpy cost (a 64-byte read of a cold line lands here).
        """
        stamps: list[int] = self._stamp_items[index :: self.sets].tolist()
        victim: int = min(stamps) & self._slot_mask
        if self._dirty_items[victim]:
            self._dirty_items[victim] = False
            self._writebacks += 1
            lines = self._data[victim : victim + 1].copy()
            self._send(np.array([index], dtype=np.int64), self._tag_items[victim], lines)
        self._tag_items[victim] = tag
        page = line // PAGE_LINES
        resident = self._resident
        resident[page] = min(resident.item(page) + 1, self._resident_cap)
        if fill:
            start = victim * LINE_SIZE
            self._bytes[start : start + LINE_SIZE] = self._memory.read_line(line, keyid)
        self._touch_one(victim)
        self._misses += 1
        return victim

    def _write(self, span: _Span, source: Source, keyid: int) -> None:
        """Store ``source`` (bytes, or one byte for every position) over ``span``."""
        if not (span.offset or span.length % LINE_SIZE) and span.lines <= self._room(span.first):
            # Whole lines in one chunk (a page being zeroed or copied): no partial lines.
            slots = self._lookup(span.first, span.lines, keyid, False, store=True)
            self._put(slots, _piece(source, 0, span.length, (-1, LINE_SIZE)))
            return
        for start, stop in span.chunks(self.sets):
            partial = span.partial_lines(start, stop)
            fill = False if partial is None else partial
            slots = self._lookup(span.first + start, stop - start, keyid, fill, store=True)
            begin = start * LINE_SIZE - span.offset  # where these lines start in ``source``
            if partial is None:
                end = begin + (stop - start) * LINE_SIZE
                self._put(slots, _piece(source, begin, end, (-1, LINE_SIZE)))
                continue
            lines = np.ascontiguousarray(self._data[slots])  # a copy: slots may be a slice
            flat = lines.reshape(-1)
            low, high = max(-begin, 0), min(span.length - begin, flat.size)
            flat[low:high] = _piece(source, begin + low, begin + high)
            self._put(slots, lines)

    def _lookup(
        self,
        first: int,
        count: int,
        keyid: int,
        fill: np.ndarray | bool = True,
        store: bool = False,
        out: np.ndarray | None = None,
    ) -> Slots:
        """Slots holding lines ``first..first+count-1`` for ``keyid``; the lines share no set.

        Misses evict the least recently used way, writing it back if dirty, and
        are filled from DRAM where ``fill`` says the old contents are needed (True:
        all lines, False: none, a mask: those lines; a store that overwrites a
        whole line needs no fill). A ``store`` leaves every slot dirty. ``out``
        (``[count, 64]``, loads only) receives the lines' data. The slots are a
        slice when the lines all missed into one way (see ``_miss``).
        """
        tag = self._tag(first, keyid)
        if not self._maybe_resident(first, count):
            # no line of these pages is cached (a page being zeroed): nothing to look for
            hits = _NO_SLOTS
        elif self.fast and (run := self._hits_in_one_way(first, count, tag)) is not None:
            return self._hit_one_way(run, count, store, out)
        else:
            # The rows are contiguous slots and a tag sits in at most one way of its row,
            # so the flat indexes of the matches are the hit slots, in line order.
            hits = (self._rows(first, count) == tag).reshape(-1).nonzero()[0]
            hits += first % self.sets * WAYS
        slots: Slots = hits
        if hits.size == count:
            if out is not None:
                self._gather(hits, out)
        else:
            slots = self._miss(first, count, tag, hits, keyid, fill, out)
        self._touch(slots)
        if store:
            self._dirty[slots] = True
        self._hits += hits.size
        self._misses += count - hits.size
        return slots

    def _hits_in_one_way(self, first: int, count: int, tag: int) -> slice | None:
        """The slots of lines ``first..first+count-1`` as one way's strided slice, if
        every line is cached (``tag``) in the same way: the way the first line is in,
        then one comparison down that way (a page that came in whole stays so)."""
        start = first % self.sets * WAYS
        row: list[int] = self._tag_items[start : start + WAYS].tolist()
        if tag not in row:
            return None
        way = row.index(tag)
        run = slice(start + way, start + count * WAYS + way, WAYS)
        return run if _all_equal(self._tags[run]) else None

    def _hit_one_way(self, run: slice, count: int, store: bool, out: np.ndarray | None) -> slice:
        """``_lookup`` of lines all cached in one way (``run``): ages, dirty bits, counters
        and ``out`` with no fancy index."""
        if out is not None:
            out.view(_LINE).reshape(-1)[...] = self._lines[run]
        self._touch(run)
        if store:
            self._dirty[run] = True
        self._hits += count
        return run

    def _miss(
        self,
        first: int,
        count: int,
        tag: int,
        hits: np.ndarray,
        keyid: int,
        fill: np.ndarray | bool,
        out: np.ndarray | None,
    ) -> Slots:
        """``_lookup`` for a chunk with misses: all its slots, the missed lines now allocated.

        Each victim is written back (which leaves it clean) before any line is
        filled: a victim may be the very line being filled, under another KeyID.
        A chunk that missed everywhere (``fast``) is decrypted from its DRAM
        slice straight into ``out``, then copied into the cache; if its victims
        are all in one way (pages streaming through the cache) and it needs all
        of its lines filled or none, that way's slots are a strided slice
        (``_miss_one_way``), no fancy index.
        """
        set0 = first % self.sets
        missed: np.ndarray | None = None
        if hits.size:
            hit = np.zeros(count, dtype=bool)
            hit[(hits >> WAY_BITS) - set0] = True
            missed = np.flatnonzero(~hit)
            rows = set0 + missed
            victims = self._stamps[:, rows].min(axis=0)
            victims &= self._slot_mask
            slots = np.empty(count, dtype=np.int64)
            slots[hit] = hits
            slots[missed] = victims
        else:  # every line missed: no bookkeeping of hits (zeroing a page lands here)
            slots = victims = self._stamps[:, set0 : set0 + count].min(axis=0)
            if self.fast and not isinstance(fill, np.ndarray):
                way = _one_way(victims, self._stamps[:, set0 : set0 + count])
                if way is not None:
                    return self._miss_one_way(first, count, tag, keyid, way, out)
            victims &= self._slot_mask
        self._write_back(victims)
        self._tags[victims] = tag
        self._count_resident(first, count, missed)
        if out is not None and missed is None and self.fast:
            self._memory.read_run(first, keyid, out)
            self._put(slots, out)
            return slots
        needed = _selected(count, missed, fill)
        if needed.size:
            self._put(slots[needed], self._memory.read_lines(first + needed, keyid))
        if out is not None:
            self._gather(slots, out)
        return slots

    def _miss_one_way(
        self, first: int, count: int, tag: int, keyid: int, way: int, out: np.ndarray | None
    ) -> slice:
        """``_miss`` of a chunk that missed everywhere, its victims all in ``way``:
        the same write-back, tags, page bound and fill, on that way's slots as a
        strided slice (what ``_touch``, ``_put`` and the dirty bits take too)."""
        set0 = first % self.sets
        run = slice(set0 * WAYS + way, (set0 + count) * WAYS + way, WAYS)
        self._write_back_run(run, set0, count)
        self._tags[run] = tag
        self._count_resident(first, count, None)
        if out is not None:
            self._memory.read_run(first, keyid, out)
            self._put(run, out)
        return run

    def _put(self, slots: Slots, lines: Source) -> None:
        """``_data[slots] = lines`` (rows ``[len(slots), 64]``, or one byte for all);
        rows go in as 64-byte items (``put``), three times faster than rows of bytes,
        and one byte as a line of it repeated (``_REPEATED``), five times faster."""
        if isinstance(lines, int):
            items = _REPEATED[lines : lines + 1]
        else:
            items = np.ascontiguousarray(lines).view(_LINE).reshape(-1)
        if isinstance(slots, slice):
            self._lines[slots] = items
        else:
            self._lines.put(slots, items)

    def _gather(self, slots: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """``_data[slots]`` into ``out`` (``[len(slots), 64]``; None: a fresh array),
        gathered as 64-byte items."""
        if out is None:
            fresh: np.ndarray = self._lines[slots].view(np.uint8).reshape(-1, LINE_SIZE)
            return fresh
        np.take(self._lines, slots, out=out.view(_LINE).reshape(-1))
        return out

    def _room(self, line: int) -> int:
        """How many lines from ``line`` on fit in one chunk (before the sets wrap)."""
        return self.sets - line % self.sets

    def _rows(self, first: int, count: int) -> np.ndarray:
        """The tag rows ``[count, WAYS]`` of lines ``first..``, a view (no set wraps)."""
        set0 = first % self.sets
        return self._tag_rows[set0 : set0 + count]

    def _tag(self, line: int, keyid: int) -> int:
        """The tag of ``line`` with ``keyid``, shared by the lines of a chunk."""
        return (line - line % self.sets) << KEYID_TAG_BITS | keyid

    def _write_back(self, slots: np.ndarray, tag: int = FREE) -> None:
        """Write the dirty lines among ``slots`` back (``tag``: theirs, if one and known)."""
        dirty = slots[self._dirty[slots]]
        if not dirty.size:
            return
        self._dirty[dirty] = False
        self._writebacks += int(dirty.size)
        tags = self._tags[dirty] if tag == FREE else tag
        self._send(dirty >> WAY_BITS, tags, self._gather(dirty))

    def _write_back_run(self, run: slice, set0: int, count: int) -> None:
        """``_write_back`` of the slots of one way over sets ``set0..set0+count-1`` (``run``)."""
        dirty = np.count_nonzero(self._dirty[run])  # a quarter of the cost of .all()
        if dirty == count:  # the usual: an older page, every line of it written
            self._dirty[run] = False
            self._writebacks += count
            sets = np.arange(set0, set0 + count, dtype=np.int64)
            self._send(sets, self._tags[run], self._data[run].copy())
        elif dirty:
            self._write_back(np.arange(run.start, run.stop, WAYS, dtype=np.int64))

    def _send(self, sets: np.ndarray, tags: np.ndarray | int, lines: np.ndarray) -> None:
        """Give the memory controller ``lines`` (fresh arrays, given away: ``sets`` too),
        the lines of ``sets`` under ``tags`` (one per line, or one for all):
        one engine call per KeyID, and no pass over the KeyIDs when all share one tag."""
        if isinstance(tags, int):
            tag = tags
        else:
            tag = tags.item(0)
            if not _all_equal(tags):
                numbers = tags >> KEYID_TAG_BITS
                numbers += sets
                for keyid, mine in _by_keyid(tags & KEYID_TAG_MASK):
                    self._memory.write_lines(numbers[mine], keyid, lines[mine], given=True)
                return
        sets += tag >> KEYID_TAG_BITS
        self._memory.write_lines(sets, tag & KEYID_TAG_MASK, lines, given=True)

    def _invalidate(self, slots: np.ndarray | slice) -> None:
        self._tags[slots] = FREE
        if isinstance(slots, slice):  # the whole cache (WBINVD)
            self._stamps[...] = self._slot_ids | FREE << self._slot_bits
        else:
            self._stamp_flat[self._stamp_at[slots]] = slots | FREE << self._slot_bits
        self._dirty[slots] = False

    def _touch(self, slots: Slots) -> None:
        """Give ``slots`` the current age (their stamps), then advance the clock."""
        stamp = self._clock << self._slot_bits
        if isinstance(slots, slice):  # one way's slots: a piece of its row of stamps
            way, set0 = slots.start & (WAYS - 1), slots.start >> WAY_BITS
            sets = slice(set0, slots.stop >> WAY_BITS)
            np.bitwise_or(self._slot_ids[way, sets], stamp, out=self._stamps[way, sets])
        else:
            self._stamp_flat[self._stamp_at[slots]] = slots | stamp
        self._clock += 1

    def _touch_one(self, slot: int) -> None:
        """``_touch`` of one slot, on Python ints."""
        at = (slot & (WAYS - 1)) * self.sets + (slot >> WAY_BITS)
        self._stamp_items[at] = slot | self._clock << self._slot_bits
        self._clock += 1

    # The per-page bound of cached lines, behind flush_range's early answer.

    def _nothing_resident(self) -> np.ndarray:
        """A zeroed bound per DRAM page (lazily backed: a 64 GiB machine pays for what it uses)."""
        return np.zeros(self._pages, dtype=np.uint16)

    def _maybe_resident(self, first: int, count: int) -> bool:
        """False only if no page of lines ``first..first+count-1`` has a line cached."""
        first_page = first // PAGE_LINES
        last_page = (first + count - 1) // PAGE_LINES
        if first_page == last_page:
            return bool(self._resident.item(first_page))
        return bool(self._resident[first_page : last_page + 1].any())

    def _count_resident(self, first: int, count: int, missed: np.ndarray | None) -> None:
        """Raise the bound of the pages of lines ``first + missed`` (None: all ``count``)."""
        cap = self._resident_cap
        page = first // PAGE_LINES
        if page == (first + count - 1) // PAGE_LINES:  # one page: the usual case
            added = count if missed is None else missed.size
            self._resident[page] = min(self._resident.item(page) + added, cap)
            return
        last = (first + count - 1) // PAGE_LINES
        window = self._resident[page : last + 1]
        per_page: np.ndarray
        if missed is None:
            # contiguous lines: whole pages get 64, the two ends what they hold
            per_page = np.full(last - page + 1, PAGE_LINES, dtype=np.int64)
            per_page[0] = PAGE_LINES - first % PAGE_LINES
            per_page[-1] -= (-(first + count)) % PAGE_LINES
        else:
            per_page = np.bincount((first + missed) // PAGE_LINES - page, minlength=last - page + 1)
        np.minimum(window + per_page, cap, out=window, casting="unsafe")

    def _recount_pages(self, first: int, count: int, rows: np.ndarray, flushed: int) -> None:
        """Set the exact count of the whole pages among lines ``first..`` (their ``rows``).

        All lines of a page fall in its 64 consecutive sets, so those rows hold
        every line of the page that is cached: the ones whose tag has the chunk's
        line part, under any KeyID. A chunk of one page whose bound equals the
        lines just ``flushed`` from it has none left, without counting.
        """
        low = -(-first // PAGE_LINES)
        high = (first + count) // PAGE_LINES
        if low >= high:
            return
        if count == PAGE_LINES and self._resident.item(low) == flushed:
            self._resident[low] = 0
            return
        whole = rows[(low * PAGE_LINES - first) : (high * PAGE_LINES - first)]
        own = (whole >> KEYID_TAG_BITS) == first - first % self.sets
        counts = np.count_nonzero(own.reshape(high - low, PAGE_LINES * WAYS), axis=1)
        self._resident[low:high] = counts


def _one_way(oldest: np.ndarray, stamps: np.ndarray) -> int | None:
    """The way all the victims are in, if one: ``oldest`` is each set's smallest
    of ``stamps [WAYS, sets]``, the victim's stamp (its slot in the low bits)."""
    way: int = oldest.item(0) & (WAYS - 1)
    return way if _same(oldest, stamps[way]) else None


def _same(these: np.ndarray, those: np.ndarray) -> bool:
    """Whether two int64 arrays of one length hold the same values: their bytes
    compared (a seventh of the cost of ``(these == those).all()`` at 64 items)."""
    return these.tobytes() == those.tobytes()


def _all_equal(values: np.ndarray) -> bool:
    """Whether every item of ``values`` (int64) is the same: each equals the next."""
    return _same(values[1:], values[:-1])


def _piece(source: Source, start: int, stop: int, shape: tuple[int, ...] = (-1,)) -> Source:
    """Bytes ``start..stop-1`` of ``source`` as ``shape``; a repeated byte is that byte."""
    return source if isinstance(source, int) else source[start:stop].reshape(shape)


def _selected(count: int, missed: np.ndarray | None, which: np.ndarray | bool) -> np.ndarray:
    """Of the ``missed`` lines (chunk-relative; None: all ``count``), those ``which`` picks."""
    if isinstance(which, np.ndarray):
        return np.flatnonzero(which) if missed is None else missed[which[missed]]
    if not which:
        return _NO_SLOTS
    return np.arange(count) if missed is None else missed


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
        self._misses = self._wbinvds = 0

    def __repr__(self) -> str:
        return "<Uncached>"

    @property
    def stats(self) -> CacheStats:
        return CacheStats(misses=self._misses, wbinvd=self._wbinvds)

    def load(self, pa: int, length: int, keyid: int) -> bytes:
        span = _Span.of(pa, length)
        self._misses += span.lines
        lines = self._memory.read_lines(span.numbers(), keyid)
        return lines.reshape(-1)[span.offset : span.offset + length].tobytes()

    def load_u64(self, pa: int, keyid: int) -> int:
        return int.from_bytes(self.load(pa, 8, keyid), "little")

    def store(self, pa: int, data: bytes | bytearray | memoryview, keyid: int) -> None:
        """Read-modify-write: only lines the data covers in part are read first."""
        span = _Span.of(pa, len(data))
        self._misses += span.lines
        numbers = span.numbers()
        partial = span.partial_lines(0, span.lines)
        lines = np.zeros((span.lines, LINE_SIZE), dtype=np.uint8)
        if partial is not None:
            lines[partial] = self._memory.read_lines(numbers[partial], keyid)
        lines.reshape(-1)[span.offset : span.offset + len(data)] = np.frombuffer(data, np.uint8)
        self._memory.write_lines(numbers, keyid, lines)

    def fill(self, pa: int, length: int, byte: int, keyid: int) -> None:
        self.store(pa, bytes((byte,)) * length, keyid)

    def clflush(self, pa: int, keyid: int) -> None:
        """Nothing is ever cached: nothing to flush."""

    def flush_range(self, pa: int, length: int, keyid: int) -> int:
        return 0

    def wbinvd(self) -> None:
        self._wbinvds += 1

    def export_state(self) -> dict[str, Any]:
        return {"counters": [self._misses, self._wbinvds]}

    def import_state(self, state: dict[str, Any]) -> None:
        self._misses, self._wbinvds = state["counters"]
