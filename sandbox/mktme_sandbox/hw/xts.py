"""The memory-encryption engine: AES-XTS over 64-byte cache lines.

What it models: the cipher MKTME puts between the cache and DRAM (docs/spec.md
2.4). The data unit is one 64-byte line; the tweak is the
line's physical address (no KeyID bits) as a 16-byte little-endian integer;
block j = 0..3 of a line uses the IEEE 1619 tweak multiplied by alpha^j. The
result is byte-identical to ``cryptography``'s ``modes.XTS(tweak)`` applied line
by line with key = data_key || tweak_key.

Rules it keeps: key and tweak key of equal size (16 + 16 or 32 + 32 bytes).
A key equal to its tweak key is accepted, as PCONFIG accepts it (the
instruction has no weak-key check; the engine needs no guard). Key material lives only
inside the cipher contexts: an ``XtsKey`` keeps no bytes of its own, and its
repr names the algorithm only.

How it is fast: a buffer of L lines costs one AES-ECB call over the L tweaks
(tweak key), numpy GF(2^128) arithmetic on uint64 pairs for the four tweaks of
each line, and one AES-ECB call over the whole buffer (data key), with the
tweaks xored in before and after. No Python loop per line or per byte, and no
allocation per batch: the tweaks, the address blocks and the ECB work area are
buffers of 1024 lines kept per thread, and the result goes straight into the
caller's ``out`` when it gives one. One line (a single-line miss) takes a path
of Python integers, a tenth of the numpy path's fixed cost. The
tweaks depend only on the tweak key and the address, and the cache writes back
and fills the same pages again and again, so a ``TweakCache`` (one per key
table, its size the machine's ``tweak_cache`` option) keeps the tweaks of
whole pages (a 4 KiB table per (key, page)): a batch whose lines lie in a few
pages gathers its tweaks from the tables, and a run of consecutive lines whose
tables sit in consecutive slots uses them in place, with no gather at all. A
page gets a table the second time it is seen (a page streamed through once
costs no table); tables are kept in a ring of slots, the oldest replaced first.
The cipher contexts
are created once per key and reused (ECB keeps no state between ``update``
calls); like the hardware's one engine they are not thread-safe, and the
machine lock serializes every caller.

Also here, because every interface numbers algorithms the same way: the
``Algorithm`` table. Intel gives each algorithm one number (AES-XTS-128 = 0,
AES-XTS-256 = 2; 1 and 3 are integrity variants the sandbox leaves out), used as
the bit in IA32_TME_CAPABILITY[15:0], the bit in IA32_TME_ACTIVATE.CRYPTO_ALGS
(bit 48 + n), the bit in the PCONFIG KEYID_CTRL algorithm field (bit 8 + n) and
the TME policy value.

Left out: ciphertext stealing (a line is always four whole blocks) and the
integrity (MAC) variants.
"""

from __future__ import annotations

import errno
import functools
import itertools
import operator
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

from mktme_sandbox.config import LINE_SIZE, PAGE_SIZE
from mktme_sandbox.errors import fail

__all__ = [
    "AES_XTS_128",
    "AES_XTS_256",
    "ALGORITHMS",
    "PLAINTEXT",
    "Algorithm",
    "LineCipher",
    "Plaintext",
    "TweakCache",
    "XtsKey",
    "algorithm_named",
]

BLOCKS_PER_LINE = LINE_SIZE // 16
LINES_PER_PAGE = PAGE_SIZE // LINE_SIZE
_K = TypeVar("_K")
_T = TypeVar("_T")


@dataclass(frozen=True)
class Algorithm:
    """One memory-encryption algorithm and its number in every Intel interface."""

    name: str
    code: int  # bit number in the MSR and PCONFIG algorithm fields; TME policy value
    key_bytes: int  # length of the data key, and of the tweak key

    @property
    def bit(self) -> int:
        """The one-hot value in a 16-bit algorithm field (CAPABILITY, CRYPTO_ALGS, KEYID_CTRL)."""
        return 1 << self.code


AES_XTS_128 = Algorithm("aes-xts-128", 0, 16)
AES_XTS_256 = Algorithm("aes-xts-256", 2, 32)
ALGORITHMS = (AES_XTS_128, AES_XTS_256)


def algorithm_named(name: str) -> Algorithm:
    """``"aes-xts-128"`` -> ``AES_XTS_128``; EINVAL for any other name."""
    for algorithm in ALGORITHMS:
        if algorithm.name == name:
            return algorithm
    fail(errno.EINVAL, f"unknown algorithm {name!r}")


class LineCipher(Protocol):
    """What the memory controller needs of a KeyID's cipher."""

    @property
    def name(self) -> str: ...

    def encrypt_lines(
        self, lines: np.ndarray, line_pas: np.ndarray, out: np.ndarray | None = None
    ) -> np.ndarray: ...

    def decrypt_lines(
        self, lines: np.ndarray, line_pas: np.ndarray, out: np.ndarray | None = None
    ) -> np.ndarray: ...

    def decrypt_line(self, line: bytes, pa: int) -> bytes: ...

    def decrypt_run(self, lines: np.ndarray, pa: int, out: np.ndarray) -> None: ...


class Plaintext:
    """The identity cipher: NO_ENCRYPT KeyIDs and KeyID 0 under TME bypass."""

    name = "plaintext"

    def __repr__(self) -> str:
        return "<Plaintext>"

    def encrypt_lines(
        self, lines: np.ndarray, line_pas: np.ndarray, out: np.ndarray | None = None
    ) -> np.ndarray:
        return _copied(lines, out)

    def decrypt_lines(
        self, lines: np.ndarray, line_pas: np.ndarray, out: np.ndarray | None = None
    ) -> np.ndarray:
        return _copied(lines, out)

    def decrypt_line(self, line: bytes, pa: int) -> bytes:
        return line

    def decrypt_run(self, lines: np.ndarray, pa: int, out: np.ndarray) -> None:
        out[...] = lines


def _copied(lines: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """``lines``, or ``out`` holding a copy of them."""
    if out is None:
        return lines
    out[...] = lines
    return out


PLAINTEXT = Plaintext()


_GF_128_FOLD = 0x87  # x^128 = x^7 + x^2 + x + 1: a bit shifted out of the top comes back as 0x87


def _fold(bits: int) -> int:
    """What ``bits`` shifted out of the top (bit i: x^(128+i)) add back at the bottom."""
    return functools.reduce(operator.xor, (_GF_128_FOLD << i for i in range(3) if bits >> i & 1), 0)


# Multiplying a tweak by alpha^j (j = 1..3) shifts the 128-bit value left by j and
# folds the j bits shifted out of the top back into the bottom.
_SHIFTS = np.array([[1], [2], [3]], dtype=np.uint64)
_CARRY_SHIFTS = np.uint64(64) - _SHIFTS
_FOLDS = tuple(_fold(bits) for bits in range(8))  # by the 1..3 bits shifted out
_FOLD = np.array(_FOLDS, dtype=np.uint64)
_FROM = int.from_bytes
_MASK_128 = (1 << 128) - 1
_BATCH_LINES = 1024  # 64 KiB per pass: tweaks and data stay in the CPU's L2 cache
_PAGE_LINE_PAS = np.arange(0, PAGE_SIZE, LINE_SIZE, dtype=np.uint64)
_LINE_SHIFT = np.uint64(LINE_SIZE.bit_length() - 1)
_PAGE_LINE_SHIFT = np.uint64(LINES_PER_PAGE.bit_length() - 1)  # line number -> page number
_LINE_IN_PAGE = np.uint64(LINES_PER_PAGE - 1)
_SPARSE = 2  # a batch is worth tables when its pages hold at most twice its lines
_RECENT = 4096  # answers of TweakCache.slots_of kept
_SERIALS = itertools.count(1)  # XtsKey serials: tables are keyed by them, never reused


def _ecb(key: bytes) -> Cipher[modes.ECB]:
    return Cipher(algorithms.AES(key), modes.ECB())


class XtsKey:
    """One KeyID's AES-XTS key pair, held only inside reusable cipher contexts."""

    __slots__ = (
        "_data_decryptor",
        "_data_encryptor",
        "_serial",
        "_tables",
        "_tweak_encryptor",
        "algorithm",
    )

    def __init__(self, data_key: bytes, tweak_key: bytes, tables: TweakCache | None = None) -> None:
        self.algorithm = _algorithm_for(len(data_key), len(tweak_key))
        self._tweak_encryptor: CipherContext = _ecb(tweak_key).encryptor()
        self._data_encryptor: CipherContext = _ecb(data_key).encryptor()
        self._data_decryptor: CipherContext = _ecb(data_key).decryptor()
        self._tables = tables if tables is not None and tables.slots else None
        self._serial = next(_SERIALS)

    @property
    def name(self) -> str:
        return self.algorithm.name

    def __repr__(self) -> str:
        return f"<XtsKey {self.algorithm.name}>"

    def encrypt_lines(
        self, lines: np.ndarray, line_pas: np.ndarray, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Plaintext lines ``[L, 64]`` at physical addresses ``line_pas`` -> ciphertext
        (in ``out``, a C-contiguous ``[L, 64]`` uint8 array, if given)."""
        return self._crypt(self._data_encryptor, lines, line_pas, out)

    def decrypt_lines(
        self, lines: np.ndarray, line_pas: np.ndarray, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Ciphertext lines ``[L, 64]`` at physical addresses ``line_pas`` -> plaintext."""
        return self._crypt(self._data_decryptor, lines, line_pas, out)

    def decrypt_line(self, line: bytes, pa: int) -> bytes:
        """One ciphertext line (64 bytes) at line-aligned ``pa`` -> plaintext."""
        return self._crypt_one(self._data_decryptor, line, pa)

    def decrypt_run(self, lines: np.ndarray, pa: int, out: np.ndarray) -> None:
        """Ciphertext lines ``[L, 64]`` at consecutive addresses from line-aligned
        ``pa`` -> plaintext in ``out``: ``decrypt_lines`` told the addresses are a run."""
        self._crypt(self._data_decryptor, lines, None, out, pa // LINE_SIZE)

    def encrypt(self, data: bytes, pa: int) -> bytes:
        """Whole lines starting at line-aligned ``pa``; a convenience for tests and tools."""
        return self._crypt_range(self._data_encryptor, data, pa)

    def decrypt(self, data: bytes, pa: int) -> bytes:
        return self._crypt_range(self._data_decryptor, data, pa)

    def _crypt_range(self, context: CipherContext, data: bytes, pa: int) -> bytes:
        if pa % LINE_SIZE or len(data) % LINE_SIZE:
            fail(
                errno.EINVAL, f"XTS works on whole 64-byte lines, not {len(data)} bytes at {pa:#x}"
            )
        lines = np.frombuffer(data, dtype=np.uint8).reshape(-1, LINE_SIZE)
        if len(lines) == 1:
            return self._crypt_one(context, data, pa)
        out = np.empty_like(lines)
        return self._crypt(context, lines, None, out, pa // LINE_SIZE).tobytes()

    def _crypt(
        self,
        context: CipherContext,
        lines: np.ndarray,
        line_pas: np.ndarray | None,
        out: np.ndarray | None = None,
        run: int | None = None,
    ) -> np.ndarray:
        """XTS of ``lines`` at ``line_pas``, or (``line_pas`` None) at the lines
        numbered ``run, run + 1, ...``."""
        count = len(lines)
        if count == 1 and out is None and line_pas is not None:
            crypted = self._crypt_one(context, lines.tobytes(), int(line_pas[0]))
            return np.frombuffer(crypted, dtype=np.uint8).reshape(1, LINE_SIZE)
        source = np.ascontiguousarray(lines, dtype=np.uint8).reshape(count, LINE_SIZE)
        if out is None:
            out = np.empty((count, LINE_SIZE), dtype=np.uint8)
        scratch = _scratch()
        for start in range(0, count, _BATCH_LINES):
            stop = min(start + _BATCH_LINES, count)
            pas = None if line_pas is None else line_pas[start:stop]
            first = None if run is None else run + start
            self._crypt_batch(context, source[start:stop], pas, first, out[start:stop], scratch)
        return out

    def _crypt_batch(
        self,
        context: CipherContext,
        lines: np.ndarray,
        line_pas: np.ndarray | None,
        run: int | None,
        out: np.ndarray,
        scratch: _Scratch,
    ) -> None:
        """XTS of ``lines`` into ``out``: xor the tweaks into the work area, ECB
        there in place (it has the spare block ``update_into`` wants), xor again into ``out``."""
        count = len(lines)
        tweaks = None if self._tables is None else self._table_tweaks(line_pas, run, count, scratch)
        if tweaks is None:
            if line_pas is None:
                assert run is not None
                line_pas = _run_addresses(run, count, scratch)
            tweaks = self._tweaks(line_pas, scratch)
        work = scratch.work[: (count + 1) * LINE_SIZE]
        blocks = work[: count * LINE_SIZE].view(np.uint64).reshape(count, BLOCKS_PER_LINE, 2)
        np.bitwise_xor(_blocks(lines), tweaks, out=blocks)
        context.update_into(work[: count * LINE_SIZE].data, work.data)
        np.bitwise_xor(blocks, tweaks, out=_blocks(out))

    def _table_tweaks(
        self, line_pas: np.ndarray | None, run: int | None, count: int, scratch: _Scratch
    ) -> np.ndarray | None:
        """``_tweaks(line_pas)`` from the tables of their pages, or None: compute them.

        ``line_pas`` None: the ``count`` lines numbered ``run, run + 1, ...``.

        None for lines scattered over more pages than ``_SPARSE`` times their
        count fills, and when a page is seen for the first time (its table is
        made the second time).
        """
        assert self._tables is not None
        if line_pas is not None:
            lines = np.right_shift(line_pas, _LINE_SHIFT, out=scratch.lines[:count])
            low, high = int(lines[0]), int(lines[-1])
            if high - low == count - 1 and _is_run(lines, low, scratch):
                run = low
            else:
                low, high = int(lines.min()), int(lines.max())
        else:
            assert run is not None
            low, high = run, run + count - 1
        first, last = low >> 6, high >> 6
        if (last - first + 1) * LINES_PER_PAGE > _SPARSE * count + LINES_PER_PAGE:
            return None
        slots = self._tables.slots_of(self, first, last - first + 1)
        if slots is None:
            return None
        if run is not None and slots == list(range(slots[0], slots[0] + len(slots))):
            start = slots[0] * LINES_PER_PAGE + (low & (LINES_PER_PAGE - 1))
            return self._tables.flat[start : start + count]  # the run's tweaks, in place
        if line_pas is None:
            lines = np.add(_RUN[:count], np.uint64(low), out=scratch.lines[:count])
        index = scratch.index[:count]
        np.right_shift(lines, _PAGE_LINE_SHIFT, out=index)
        index -= np.uint64(first)
        np.take(np.array(slots, dtype=np.uint64), index, out=index)
        index <<= _PAGE_LINE_SHIFT
        lines &= _LINE_IN_PAGE
        index |= lines
        tweaks = scratch.tweaks[:count]
        np.take(self._tables.flat, index.view(np.int64), axis=0, out=tweaks)
        return tweaks

    def page_tweaks(self, pages: list[int], out: np.ndarray) -> None:
        """The tables of ``pages`` (page numbers) into ``out [len(pages), 64, 4, 2]``."""
        scratch = _scratch()
        per_batch = _BATCH_LINES // LINES_PER_PAGE
        for start in range(0, len(pages), per_batch):
            batch = np.array(pages[start : start + per_batch], dtype=np.uint64)
            line_pas = np.add.outer(batch * np.uint64(PAGE_SIZE), _PAGE_LINE_PAS).reshape(-1)
            tables = out[start : start + len(batch)].reshape(-1, BLOCKS_PER_LINE, 2)
            tables[...] = self._tweaks(line_pas, scratch)

    def _tweaks(self, line_pas: np.ndarray, scratch: _Scratch) -> np.ndarray:
        """``[L, 4, 2]`` uint64: E_tweakkey(pa) * alpha^j for the four blocks of each line.

        A view of ``scratch.tweaks``, good until the next call.
        """
        count = len(line_pas)
        addresses = scratch.addresses[:count]
        addresses[:, 0] = line_pas
        encrypted = scratch.encrypted[: (count + 1) * 2]
        self._tweak_encryptor.update_into(
            addresses.reshape(-1).view(np.uint8).data, encrypted.view(np.uint8).data
        )
        # Planes [block j, half (low, high), line]: every operation runs over whole rows.
        planes = scratch.planes[:, :, :count]
        planes[0] = encrypted[: count * 2].reshape(count, 2).T
        low, high = planes[0]
        carries = scratch.carries[:, :count]
        np.left_shift(high, _SHIFTS, out=planes[1:, 1])
        np.right_shift(low, _CARRY_SHIFTS, out=carries)
        planes[1:, 1] |= carries
        np.left_shift(low, _SHIFTS, out=planes[1:, 0])
        np.right_shift(high, _CARRY_SHIFTS, out=carries)
        np.take(_FOLD, carries.view(np.int64), out=carries)  # buffered: may alias
        planes[1:, 0] ^= carries
        tweaks = scratch.tweaks[:count]
        np.copyto(tweaks, planes.transpose(2, 0, 1))
        return tweaks

    def _crypt_one(self, context: CipherContext, line: bytes, pa: int) -> bytes:
        """One line with Python integers: a tenth of the numpy path's fixed cost.

        The four block tweaks T * alpha^j are T shifted left by j with the j
        bits shifted out folded back (``_FOLDS``), laid side by side in one
        512-bit integer that is xored over the line before and after ECB.
        """
        tweak = _FROM(self._tweak_encryptor.update(pa.to_bytes(16, "little")), "little")
        stream = (
            tweak
            | ((tweak << 1 & _MASK_128) ^ _FOLDS[tweak >> 127]) << 128
            | ((tweak << 2 & _MASK_128) ^ _FOLDS[tweak >> 126]) << 256
            | ((tweak << 3 & _MASK_128) ^ _FOLDS[tweak >> 125]) << 384
        )
        crypted = context.update((_FROM(line, "little") ^ stream).to_bytes(LINE_SIZE, "little"))
        return (_FROM(crypted, "little") ^ stream).to_bytes(LINE_SIZE, "little")


class TweakCache:
    """Tables of XTS tweaks per (key, page), ``size`` bytes at most (4 KiB a page).

    One per key table: every ``XtsKey`` made with it shares its ring of
    ``size // 4096`` slots, allocated on first use (host memory grows only
    with the slots filled). A key's tables are keyed by its serial, so a
    reprogrammed KeyID never sees its old key's tweaks; they are replaced in
    turn like any other. Pages made at once get consecutive slots when the
    ring has room before its end, so a run of consecutive lines reads its
    tweaks in place.
    """

    def __init__(self, size: int) -> None:
        self.slots = max(0, size) // PAGE_SIZE
        self._flat: np.ndarray | None = None  # [slots * 64, 4, 2], lines of slot s at s * 64
        self._slot_of: dict[tuple[int, int], int] = {}  # (key serial, page) -> slot
        self._owner: list[tuple[int, int] | None] = [None] * self.slots
        self._seen: OrderedDict[tuple[int, int], None] = OrderedDict()  # seen once, oldest first
        # Answers of slots_of, good while _generation (bumped by every _make) holds:
        # a stream over the same pages asks the same questions again and again.
        self._recent: OrderedDict[tuple[int, int, int], tuple[int, list[int]]] = OrderedDict()
        self._generation = 0
        self._next = 0  # the ring's next slot

    def __repr__(self) -> str:
        return f"<TweakCache {len(self._slot_of)} of {self.slots} pages>"

    @property
    def flat(self) -> np.ndarray:
        """The tables, line after line: slot ``s`` holds lines ``s * 64 ..``."""
        if self._flat is None:
            lines = self.slots * LINES_PER_PAGE
            self._flat = np.empty((lines, BLOCKS_PER_LINE, 2), dtype=np.uint64)
        return self._flat

    def slots_of(self, key: XtsKey, first: int, count: int) -> list[int] | None:
        """The slots of pages ``first .. first + count - 1`` of ``key``, tables made
        for the pages seen before; None while any page is new (or more pages
        than there are slots)."""
        if count > self.slots:
            return None
        asked = (key._serial, first, count)
        recent = self._recent.get(asked)
        if recent is not None and recent[0] == self._generation:
            return recent[1]  # no table was made (nor replaced) since this was answered
        wanted = [(key._serial, page) for page in range(first, first + count)]
        slots = [self._slot_of.get(name) for name in wanted]
        missing = [name for name, slot in zip(wanted, slots, strict=True) if slot is None]
        if not missing:
            found: list[int] = slots  # type: ignore[assignment]  # none is None
            _add(self._recent, asked, (self._generation, found), _RECENT)
            return found
        new = [name for name in missing if name not in self._seen]
        for name in new:
            _add(self._seen, name, None, 4 * self.slots)
        if new:
            return None
        self._make(key, missing)
        made = [self._slot_of.get(name) for name in wanted]  # the ring may have wrapped over some
        return None if None in made else made  # type: ignore[return-value]

    def _make(self, key: XtsKey, names: list[tuple[int, int]]) -> None:
        """Tables for ``names`` (all of ``key``) in consecutive slots of the ring."""
        self._generation += 1
        if self._next + len(names) > self.slots:
            self._next = 0
        first = self._next
        for slot, name in enumerate(names, first):
            old = self._owner[slot]
            if old is not None:
                del self._slot_of[old]
            self._owner[slot], self._slot_of[name] = name, slot
            self._seen.pop(name, None)
        self._next = first + len(names)
        tables = self.flat.reshape(self.slots, LINES_PER_PAGE, BLOCKS_PER_LINE, 2)
        key.page_tweaks([page for _, page in names], tables[first : self._next])


_RUN = np.arange(_BATCH_LINES, dtype=np.uint64)


def _run_addresses(first: int, count: int, scratch: _Scratch) -> np.ndarray:
    """The addresses of lines ``first .. first + count - 1`` (in ``scratch``)."""
    pas = np.add(_RUN[:count], np.uint64(first), out=scratch.pas[:count])
    pas <<= _LINE_SHIFT
    return pas


def _is_run(lines: np.ndarray, first: int, scratch: _Scratch) -> bool:
    """Whether ``lines`` are ``first, first + 1, ...`` (two numpy passes, no allocation)."""
    count = len(lines)
    offsets = np.subtract(lines, np.uint64(first), out=scratch.index[:count])
    same = np.equal(offsets, _RUN[:count], out=scratch.same[:count])
    return bool(same.all())


class _Scratch:
    """The work buffers of one thread's batches (``_BATCH_LINES`` lines at most)."""

    def __init__(self) -> None:
        self.addresses = np.zeros((_BATCH_LINES, 2), dtype=np.uint64)  # high halves stay 0
        self.encrypted = np.empty((_BATCH_LINES + 1) * 2, dtype=np.uint64)
        self.planes = np.empty((BLOCKS_PER_LINE, 2, _BATCH_LINES), dtype=np.uint64)
        self.carries = np.empty((BLOCKS_PER_LINE - 1, _BATCH_LINES), dtype=np.uint64)
        self.tweaks = np.empty((_BATCH_LINES, BLOCKS_PER_LINE, 2), dtype=np.uint64)
        self.work = np.empty((_BATCH_LINES + 1) * LINE_SIZE, dtype=np.uint8)
        self.lines = np.empty(_BATCH_LINES, dtype=np.uint64)
        self.index = np.empty(_BATCH_LINES, dtype=np.uint64)
        self.same = np.empty(_BATCH_LINES, dtype=bool)
        self.pas = np.empty(_BATCH_LINES, dtype=np.uint64)


_SCRATCH = threading.local()


def _scratch() -> _Scratch:
    """This thread's ``_Scratch`` (made on first use)."""
    scratch: _Scratch | None = getattr(_SCRATCH, "buffers", None)
    if scratch is None:
        scratch = _SCRATCH.buffers = _Scratch()
    return scratch


def _blocks(lines: np.ndarray) -> np.ndarray:
    """Lines ``[L, 64]`` as their ``[L, 4, 2]`` uint64 halves of 16-byte blocks (a view)."""
    return lines.view(np.uint64).reshape(len(lines), BLOCKS_PER_LINE, 2)


def _add(table: OrderedDict[_K, _T], key: _K, value: _T, limit: int) -> None:
    """``table[key] = value``, first dropping the oldest entry if ``limit`` are there
    (in O(1): a plain dict's ``next(iter())`` scans the holes its deletions left
    at the front, 3.6 us against 0.27 at 16K entries)."""
    if len(table) >= limit:
        table.popitem(last=False)
    table[key] = value


def _algorithm_for(data_len: int, tweak_len: int) -> Algorithm:
    for algorithm in ALGORITHMS:
        if data_len == tweak_len == algorithm.key_bytes:
            return algorithm
    fail(
        errno.EINVAL,
        f"XTS needs a data key and a tweak key of 16 or 32 bytes each, "
        f"not {data_len} and {tweak_len} bytes",
    )
