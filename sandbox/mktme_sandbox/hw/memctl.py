"""The memory controller: where MKTME sits, between the cache and DRAM.

What it models: every line that leaves the cache for DRAM is encrypted, and
every line that comes in is decrypted, with the cipher the key table holds for
the line's KeyID *at that moment* (docs/spec.md 2.4 and
"CPU cache": a dirty line is encrypted with its KeyID's current key when it is
written back). The tweak is the line's physical address without KeyID bits.

Rules it keeps: whole lines only, in batches (one cipher call per batch); the
KeyID is looked up once per batch, so a batch never mixes keys.

The TME exclusion range (Intel MKTME spec, Tables 4-5 and 4-6: the range is
excluded from TME/TME-MK encryption "for KeyID=0 only"): lines of KeyID 0
inside it go to DRAM as plaintext; every other KeyID is encrypted there as
anywhere. ``_tme_excluded`` is the one place that decides it.

Left out: memory-controller queues and timing.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from mktme_sandbox.config import LINE_SIZE
from mktme_sandbox.hw.dram import Dram
from mktme_sandbox.hw.keytable import KeyTable
from mktme_sandbox.hw.msr import TmeExclusion

__all__ = ["MemoryController"]


class MemoryController:
    """Line reads and writes through the engine with a KeyID's current key."""

    def __init__(self, dram: Dram, keys: KeyTable, exclusion: TmeExclusion | None = None) -> None:
        self._dram = dram
        self._keys = keys
        self._exclusion = exclusion
        self.size = dram.size  # bytes of DRAM behind it

    def read_lines(self, line_numbers: np.ndarray, keyid: int) -> np.ndarray:
        """Plaintext ``[L, 64]`` of lines ``line_numbers`` (``pa // 64``) as KeyID ``keyid`` sees them."""
        ciphertext = self._dram.read_lines(line_numbers)
        return self._crypt(self._keys.cipher(keyid).decrypt_lines, ciphertext, line_numbers, keyid)

    def write_lines(self, line_numbers: np.ndarray, keyid: int, lines: np.ndarray) -> None:
        """Encrypt plaintext ``lines [L, 64]`` with ``keyid``'s current key into DRAM."""
        cipher = self._keys.cipher(keyid).encrypt_lines
        self._dram.write_lines(line_numbers, self._crypt(cipher, lines, line_numbers, keyid))

    def _crypt(
        self, crypt: _Crypt, lines: np.ndarray, line_numbers: np.ndarray, keyid: int
    ) -> np.ndarray:
        """``crypt`` over the lines, except KeyID-0 lines in the exclusion range (as stored)."""
        pas = _line_addresses(line_numbers)
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
        if keyid != 0 or exclusion is None or not exclusion.enabled:
            return None
        excluded = pas & np.uint64(exclusion.mask) == np.uint64(exclusion.base & exclusion.mask)
        return excluded if excluded.any() else None


_Crypt = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _line_addresses(line_numbers: np.ndarray) -> np.ndarray:
    return line_numbers.astype(np.uint64) * LINE_SIZE
