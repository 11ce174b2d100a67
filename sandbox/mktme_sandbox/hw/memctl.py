"""The memory controller: where MKTME sits, between the cache and DRAM.

What it models: every line that leaves the cache for DRAM is encrypted, and
every line that comes in is decrypted, with the cipher the key table holds for
the line's KeyID *at that moment* (docs/spec.md 2.4 and
"CPU cache": a dirty line is encrypted with its KeyID's current key when it is
written back). The tweak is the line's physical address without KeyID bits.

Rules it keeps: whole lines only, in batches (one cipher call per batch); the
KeyID is looked up once per batch, so a batch never mixes keys.

Left out: the TME exclusion range and memory-controller queues and timing.
"""

from __future__ import annotations

import numpy as np

from mktme_sandbox.config import LINE_SIZE
from mktme_sandbox.hw.dram import Dram
from mktme_sandbox.hw.keytable import KeyTable

__all__ = ["MemoryController"]


class MemoryController:
    """Line reads and writes through the engine with a KeyID's current key."""

    def __init__(self, dram: Dram, keys: KeyTable) -> None:
        self._dram = dram
        self._keys = keys
        self.size = dram.size  # bytes of DRAM behind it

    def read_lines(self, line_numbers: np.ndarray, keyid: int) -> np.ndarray:
        """Plaintext ``[L, 64]`` of lines ``line_numbers`` (``pa // 64``) as KeyID ``keyid`` sees them."""
        ciphertext = self._dram.read_lines(line_numbers)
        return self._keys.cipher(keyid).decrypt_lines(ciphertext, _line_addresses(line_numbers))

    def write_lines(self, line_numbers: np.ndarray, keyid: int, lines: np.ndarray) -> None:
        """Encrypt plaintext ``lines [L, 64]`` with ``keyid``'s current key into DRAM."""
        ciphertext = self._keys.cipher(keyid).encrypt_lines(lines, _line_addresses(line_numbers))
        self._dram.write_lines(line_numbers, ciphertext)


def _line_addresses(line_numbers: np.ndarray) -> np.ndarray:
    return line_numbers.astype(np.uint64) * LINE_SIZE
