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

Left out: memory-controller queues and timing.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from mktme_sandbox.config import LINE_SIZE
from mktme_sandbox.hw.dram import Dram
from mktme_sandbox.hw.keytable import KeyTable
from mktme_sandbox.hw.msr import TmeExclusion
from mktme_sandbox.hw.xts import LineCipher

__all__ = ["MemoryController"]


class MemoryController:
    """Line reads and writes through the engine with a KeyID's current key."""

    def __init__(self, dram: Dram, keys: KeyTable, exclusion: TmeExclusion | None = None) -> None:
        self._dram = dram
        self._keys = keys
        self._exclusion = exclusion if exclusion is not None and exclusion.enabled else None
        self.size = dram.size  # bytes of DRAM behind it

    def read_lines(self, line_numbers: np.ndarray, keyid: int) -> np.ndarray:
        """Plaintext ``[L, 64]`` of lines ``line_numbers`` (``pa // 64``) as KeyID ``keyid`` sees them."""
        ciphertext = self._dram.read_lines(line_numbers)
        decrypt = self._cipher(keyid).decrypt_lines
        return self._crypt(decrypt, ciphertext, _line_addresses(line_numbers), keyid)

    def read_line(self, line: int, keyid: int) -> bytes:
        """``read_lines`` of one line, as 64 bytes."""
        stored = self._dram.read_line(line)
        if self._exclusion is not None and self._excluded_pa(line * LINE_SIZE, keyid):
            return stored
        return self._cipher(keyid).decrypt_line(stored, line * LINE_SIZE)

    def read_run(self, first: int, keyid: int, out: np.ndarray) -> None:
        """``read_lines`` of the ``len(out)`` lines from line ``first``, into ``out [L, 64]``."""
        ciphertext = self._dram.lines[first : first + len(out)]
        if self._exclusion is None or keyid != 0:
            self._cipher(keyid).decrypt_run(ciphertext, first * LINE_SIZE, out)
            return
        pas = np.arange(first, first + len(out), dtype=np.uint64) * np.uint64(LINE_SIZE)
        decrypt = self._cipher(keyid).decrypt_lines
        out[:] = self._crypt(decrypt, ciphertext, pas, keyid)

    def write_lines(self, line_numbers: np.ndarray, keyid: int, lines: np.ndarray) -> None:
        """Encrypt plaintext ``lines [L, 64]`` with ``keyid``'s current key into DRAM."""
        encrypt = self._cipher(keyid).encrypt_lines
        pas = _line_addresses(line_numbers)
        self._dram.write_lines(line_numbers, self._crypt(encrypt, lines, pas, keyid))

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
