"""The memory controller: where MKTME sits, between the cache and DRAM.

What it models: every line that leaves the cache for DRAM is encrypted, and
every line that comes in is decrypted, with the cipher the key table holds for
the line's KeyID *at that moment* (docs/spec.md 2.4 and
"CPU cache": a dirty line is encrypted with its KeyID's current key when it is
written back). The tweak is the line's physical address without KeyID bits.

Rules it keeps: whole lines only, in batches (one cipher call per batch); the
KeyID is looked up once per batch, so a batch never mixes keys, and always by
``_cipher``, the one place that chooses a line's key. Besides batches of any
lines: one line as bytes (a single-line miss, with no numpy per-call cost) and
a run of consecutive lines decrypted from its DRAM slice into the caller's buffer.

The TME exclusion range (Intel MKTME spec, Tables 4-5 and 4-6: the range is
excluded from TME/TME-MK encryption "for KeyID=0 only"): lines of KeyID 0
inside it go to DRAM as plaintext; every other KeyID is encrypted there as
anywhere. ``_tme_excluded`` is the one place that decides it, for batches,
single lines and runs alike.

How it is fast: the write-back queue. Lines written back are not encrypted
one write-back at a time (a page being zeroed evicts a few dirty lines of an
older page, and one XTS call's fixed cost outweighs its lines): their line
numbers, their plaintext (a copy, or the array the cache gives away: its
fresh gather of the victims' lines), the KeyID and the cipher ``_cipher``
returns *then* are queued, and ``drain`` encrypts them into DRAM in bulk, one
engine call per cipher and KeyID, only the last value of a line queued twice.
The queue drains when it holds ``WRITE_BACK_QUEUE`` lines and before anything
reads DRAM (every read here, and ``Platform``'s DRAM view and snapshots call
``drain`` first), so no one can tell it from writing at once: the same DRAM
bytes, the same key per line (the one current at write-back, even if the KeyID
is reprogrammed while its lines wait). ``queue = 0`` writes at once
(tests/hw/test_cache_fast_paths.py holds both ways to the same outputs, DRAM
and cache state).

Left out: memory-controller timing, and reads served from the queue (a read
drains it first).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from mktme_sandbox.config import LINE_SIZE
from mktme_sandbox.hw.dram import Dram
from mktme_sandbox.hw.keytable import KeyTable
from mktme_sandbox.hw.msr import TmeExclusion
from mktme_sandbox.hw.xts import LineCipher

__all__ = ["WRITE_BACK_QUEUE", "MemoryController"]

WRITE_BACK_QUEUE = 2048  # lines queued before they are encrypted into DRAM at once (128 KiB)


class _Queued(NamedTuple):
    """Lines written back with ``keyid``, to be encrypted into DRAM through ``cipher``."""

    numbers: np.ndarray  # line numbers
    plaintext: np.ndarray  # [L, 64], a copy or an array given away
    keyid: int
    cipher: LineCipher


class MemoryController:
    """Line reads and writes through the engine with a KeyID's current key."""

    def __init__(self, dram: Dram, keys: KeyTable, exclusion: TmeExclusion | None = None) -> None:
        self._dram = dram
        self._keys = keys
        self._exclusion = exclusion if exclusion is not None and exclusion.enabled else None
        self.size = dram.size  # bytes of DRAM behind it
        self.queue = WRITE_BACK_QUEUE  # lines queued at most; 0: write at once
        self._queued: list[_Queued] = []
        self._queued_lines = 0

    def __repr__(self) -> str:
        return f"<MemoryController {self._queued_lines} lines queued>"

    def read_lines(self, line_numbers: np.ndarray, keyid: int) -> np.ndarray:
        """Plaintext ``[L, 64]`` of lines ``line_numbers`` (``pa // 64``) as KeyID ``keyid`` sees them."""
        if self._queued_lines:
            self.drain()
        ciphertext = self._dram.read_lines(line_numbers)
        decrypt = self._cipher(keyid).decrypt_lines
        return self._crypt(decrypt, ciphertext, _line_addresses(line_numbers), keyid)

    def read_line(self, line: int, keyid: int) -> bytes:
        """``read_lines`` of one line, as 64 bytes."""
        if self._queued_lines:
            self.drain()
        stored = self._dram.read_line(line)
        if self._exclusion is not None and self._excluded_pa(line * LINE_SIZE, keyid):
            return stored
        return self._cipher(keyid).decrypt_line(stored, line * LINE_SIZE)

    def read_run(self, first: int, keyid: int, out: np.ndarray) -> None:
        """``read_lines`` of the ``len(out)`` lines from line ``first``, into ``out [L, 64]``."""
        if self._queued_lines:
            self.drain()
        ciphertext = self._dram.lines[first : first + len(out)]
        if self._exclusion is None or keyid != 0:
            self._cipher(keyid).decrypt_run(ciphertext, first * LINE_SIZE, out)
            return
        pas = np.arange(first, first + len(out), dtype=np.uint64) * np.uint64(LINE_SIZE)
        decrypt = self._cipher(keyid).decrypt_lines
        out[:] = self._crypt(decrypt, ciphertext, pas, keyid)

    def write_lines(
        self, line_numbers: np.ndarray, keyid: int, lines: np.ndarray, given: bool = False
    ) -> None:
        """Encrypt plaintext ``lines [L, 64]`` with ``keyid``'s current key into DRAM
        (through the queue: DRAM holds them by the time anything reads it).

        ``given``: the caller gives both arrays away (int64 line numbers, uint8
        lines it never changes again, as the cache's fresh gathers are), so they
        are queued as they are; otherwise the queue keeps copies.
        """
        cipher = self._cipher(keyid)
        count = len(line_numbers)
        if self._queued_lines + count > self.queue:
            self.drain()
            if count >= self.queue:  # as many as the queue holds: no point queuing
                self._write_now(line_numbers, keyid, cipher, lines)
                return
        if not given:
            line_numbers = np.array(line_numbers, dtype=np.int64)
            lines = np.array(lines, dtype=np.uint8)
        self._queued.append(_Queued(line_numbers, lines, keyid, cipher))
        self._queued_lines += count
        if self._queued_lines == self.queue:
            self.drain()

    def drain(self) -> None:
        """Encrypt every queued line into DRAM: one engine call per cipher and KeyID,
        and of a line queued more than once only its last value."""
        queued = self._queued
        if not queued:
            return
        self._queued, self._queued_lines = [], 0
        numbers = _joined([entry.numbers for entry in queued])
        plaintext = _joined([entry.plaintext for entry in queued])
        last = _last_of_each(numbers)
        group_of, groups = _groups(queued)
        if len(groups) == 1:
            entry = groups[0]
            self._write_now(numbers[last], entry.keyid, entry.cipher, plaintext[last])
            return
        line_groups = np.repeat(group_of, [len(entry.numbers) for entry in queued])[last]
        for group, entry in enumerate(groups):
            mine = last[line_groups == group]
            if mine.size:
                self._write_now(numbers[mine], entry.keyid, entry.cipher, plaintext[mine])

    def _write_now(
        self, line_numbers: np.ndarray, keyid: int, cipher: LineCipher, lines: np.ndarray
    ) -> None:
        """Encrypt ``lines`` with ``cipher`` (``keyid``'s when they were written back) into DRAM."""
        pas = _line_addresses(line_numbers)
        self._dram.write_lines(line_numbers, self._crypt(cipher.encrypt_lines, lines, pas, keyid))

    def _cipher(self, keyid: int) -> LineCipher:
        """The cipher that encrypts KeyID ``keyid``'s lines now."""
        return self._keys.cipher(keyid)

    def _crypt(self, crypt: _Crypt, lines: np.ndarray, pas: np.ndarray, keyid: int) -> np.ndarray:
        """``crypt`` over the lines, except KeyID-0 lines in the exclusion range (as stored)."""
        excluded = self._tme_excluded(pas, keyid)
        if excluded is None:
            return crypt(lines, pas)
        out = np.array(lines, dtype=np.uint8, copy=True)
        keep = ~excluded
        if keep.any():
            out[keep] = crypt(lines[keep], pas[keep])
        return out

    def _tme_excluded(self, pas: np.ndarray, keyid: int) -> np.ndarray | None:
        """Which of these lines the TME key does not encrypt: KeyID 0 inside the
        exclusion range. None when no line is excluded (the common case)."""
        exclusion = self._exclusion
        if keyid != 0 or exclusion is None:
            return None
        excluded = pas & np.uint64(exclusion.mask) == np.uint64(exclusion.base & exclusion.mask)
        return excluded if excluded.any() else None

    def _excluded_pa(self, pa: int, keyid: int) -> bool:
        """``_tme_excluded`` of one address, on Python ints (the one-line path)."""
        exclusion = self._exclusion
        if keyid != 0 or exclusion is None:
            return False
        return pa & exclusion.mask == exclusion.base & exclusion.mask


_Crypt = Callable[..., np.ndarray]


def _line_addresses(line_numbers: np.ndarray) -> np.ndarray:
    return line_numbers.astype(np.uint64) * LINE_SIZE


def _joined(arrays: list[np.ndarray]) -> np.ndarray:
    """The arrays one after the other (the one itself, when there is one)."""
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def _last_of_each(numbers: np.ndarray) -> np.ndarray:
    """Indexes into ``numbers`` of the last occurrence of each value, by ascending value.

    DRAM must end with a line's last queued value, and numpy's fancy assignment
    does not promise which of two equal indexes wins.
    """
    backwards = numbers[::-1]
    _, first_backwards = np.unique(backwards, return_index=True)
    last: np.ndarray = len(numbers) - 1 - first_backwards
    return last


def _groups(queued: list[_Queued]) -> tuple[np.ndarray, list[_Queued]]:
    """Per entry, the number of its (cipher, KeyID) group; and each group's first entry."""
    numbering: dict[tuple[int, int], int] = {}
    firsts: list[_Queued] = []
    group_of = []
    for entry in queued:
        group = numbering.setdefault((id(entry.cipher), entry.keyid), len(firsts))
        if group == len(firsts):
            firsts.append(entry)
        group_of.append(group)
    return np.array(group_of, dtype=np.int64), firsts
