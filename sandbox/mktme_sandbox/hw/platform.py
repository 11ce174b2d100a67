"""The emulated MKTME platform: what the kernel sees of the hardware.

What it models: one package with DRAM, the AES-XTS engine in the memory
controller, the key table programmed by PCONFIG, the TME MSRs and a write-back
cache that is not coherent across KeyIDs (docs/spec.md section 2). Its API is the one
``docs/architecture.md`` fixes for the kernel layer.

Rules it keeps:
- The layout comes from the MSRs as "BIOS" activated them: ``keyid_bits``,
  ``keyid_shift = maxphyaddr - keyid_bits``, ``keyid_mask`` (those bits of a
  physical address), ``nr_keyids = min(2**keyid_bits - 1, max_keys)`` (0 when
  MKTME is off).
- Physical addresses are plain (``pa + length <= phys_mem``); the KeyID is a
  separate argument in ``0..nr_keyids``. Anything else is EINVAL.
- CPU view (``load``/``store``/``fill``) goes through the cache with the KeyID's
  current key; DRAM view (``dram_read``/``dram_write``) is the ciphertext as
  stored: it never shows dirty cache lines, and a DRAM write leaves stale cached
  lines in place. Lines waiting in the memory controller's write-back queue
  land before anything here reads or writes DRAM, so the DRAM view and
  snapshots see them.
- Reprogramming a KeyID flushes nothing: a dirty line written back later is
  encrypted with the key current at write-back. Flushing first is the kernel's
  job (``flush_range``, ``clflush``, ``wbinvd``).

Snapshots: ``export_state`` holds DRAM (the pages that are not all zeros),
the key table with its key material and generator, and the cache; the MSRs are
locked at boot and follow from the config. ``import_state`` makes a platform
of the same config that state; ``cold_boot`` keeps only DRAM, as a reboot with
the memory still powered does: an empty cache, an empty key table and a new
TME key.

Left out: TLBs and paging (the kernel's), multiple packages, and timing.
"""

from __future__ import annotations

import errno
from typing import Any

import numpy as np

from mktme_sandbox.config import PAGE_SIZE, MachineConfig
from mktme_sandbox.errors import fail
from mktme_sandbox.hw.cache import Cache, make_cache
from mktme_sandbox.hw.dram import Dram
from mktme_sandbox.hw.keytable import KeyState, KeyTable, PconfigStatus
from mktme_sandbox.hw.memctl import MemoryController
from mktme_sandbox.hw.msr import TmeMsrs
from mktme_sandbox.hw.xts import TweakCache

__all__ = ["Buffer", "Platform"]

Buffer = bytes | bytearray | memoryview  # what store and dram_write take


class Platform:
    """DRAM, engine, key table, MSRs and cache of one emulated MKTME machine."""

    def __init__(self, config: MachineConfig) -> None:
        self.config = config
        self._msrs = TmeMsrs(config)
        activation = self._msrs.activation()
        self.phys_mem = config.phys_mem
        self.keyid_bits = activation.keyid_bits
        self.keyid_shift = config.maxphyaddr - self.keyid_bits
        self.keyid_mask = ((1 << self.keyid_bits) - 1) << self.keyid_shift
        self.nr_keyids = activation.nr_keyids
        self._dram = Dram(config.phys_mem)
        self._keys = KeyTable(activation, config.seed, tables=TweakCache(config.tweak_cache))
        self._memory = MemoryController(self._dram, self._keys, self._msrs.exclusion())
        self.cache: Cache = make_cache(config.cache_size, self._memory)

    def __repr__(self) -> str:
        return (
            f"<Platform {self.phys_mem:#x} bytes, {self.nr_keyids} KeyIDs, "
            f"cache {self.cache.size:#x} bytes>"
        )

    # CPU view: through the cache, with the KeyID's current key.

    def load(self, pa: int, length: int, keyid: int = 0) -> bytes:
        if not self._fine(pa, length, keyid):
            self._check(pa, length, keyid)
            return b""
        return self.cache.load(pa, length, keyid)

    def load_u64(self, pa: int, keyid: int = 0) -> int:
        """``load(pa, 8, keyid)`` as a little-endian number: how the page-table
        walker reads an entry (no bytes built on the way)."""
        if not self._fine(pa, 8, keyid):
            self._check(pa, 8, keyid)  # raises: eight bytes that do not fit
        return self.cache.load_u64(pa, keyid)

    def store(self, pa: int, data: Buffer, keyid: int = 0) -> None:
        if self._fine(pa, len(data), keyid):
            self.cache.store(pa, data, keyid)
        else:
            self._check(pa, len(data), keyid)

    def fill(self, pa: int, length: int, byte: int, keyid: int = 0) -> None:
        """memset through the cache: how the kernel zeroes a page through its KeyID."""
        if not 0 <= byte <= 0xFF:
            fail(errno.EINVAL, f"fill byte {byte} is not 0..255")
        if self._fine(pa, length, keyid):
            self.cache.fill(pa, length, byte, keyid)
        else:
            self._check(pa, length, keyid)

    def clflush(self, pa: int, keyid: int) -> None:
        self._check(pa, 1, keyid)
        self.cache.clflush(pa, keyid)

    def flush_range(self, pa: int, length: int, keyid: int) -> int:
        """Write back and invalidate the range's lines tagged ``keyid``; returns how many."""
        self._check(pa, length, keyid)
        return self.cache.flush_range(pa, length, keyid)

    def wbinvd(self) -> None:
        self.cache.wbinvd()

    def cache_stats(self) -> str:
        """The cache's counters as ``hw/cache`` shows them."""
        return self.cache.stats.text()

    # DRAM view: ciphertext as stored.

    def dram_read(self, pa: int, length: int) -> bytes:
        self._memory.drain()
        return self._dram.read(pa, length)

    def dram_write(self, pa: int, data: Buffer) -> None:
        self._memory.drain()
        self._dram.write(pa, data)

    # PCONFIG leaf MKTME_KEY_PROGRAM.

    def pconfig(self, struct: bytes) -> PconfigStatus:
        return self._keys.pconfig(struct)

    def inject_pconfig_faults(self, status: PconfigStatus | int, count: int) -> None:
        self._keys.inject(status, count)

    def key_state(self, keyid: int) -> KeyState:
        return self._keys.key_state(keyid)

    # MSRs.

    def rdmsr(self, addr: int) -> int:
        return self._msrs.rdmsr(addr)

    def wrmsr(self, addr: int, value: int) -> None:
        self._msrs.wrmsr(addr, value)

    def tme_text(self) -> str:
        """The TME MSRs decoded, ``name value`` per line (``hw/tme``)."""
        return self._msrs.text()

    # Snapshots.

    def export_state(self) -> dict[str, Any]:
        self._memory.drain()
        pfns = self._dram.touched_pages()
        return {
            "dram": {"pfns": pfns, "pages": self._dram.page_contents(pfns)},
            "keys": self._keys.export_state(),
            "cache": self.cache.export_state(),
        }

    def import_state(self, state: dict[str, Any]) -> None:
        self._load_dram(state["dram"])
        self._keys.import_state(state["keys"])
        self.cache.import_state(state["cache"])

    def cold_boot(self, state: dict[str, Any]) -> None:
        """DRAM from ``state``, everything else as at power-on. A seeded machine
        draws its new TME key after the saved generator state (not the boot's
        key again); an unseeded one from fresh entropy."""
        self._load_dram(state["dram"])
        rng = state["keys"]["rng"] if self.config.seed is not None else None
        self._keys.power_on(self._msrs.activation(), rng)

    def _load_dram(self, dram: dict[str, Any]) -> None:
        """DRAM as ``dram`` holds it (after the lines queued for it have landed)."""
        self._memory.drain()
        pfns, pages = np.asarray(dram["pfns"], dtype=np.int64), dram["pages"]
        if pages.dtype != np.uint8 or pages.shape != (len(pfns), PAGE_SIZE):
            fail(errno.EINVAL, "snapshot: the DRAM pages do not match their page numbers")
        self._dram.load_pages(pfns, pages)

    def _fine(self, pa: int, length: int, keyid: int) -> bool:
        """A valid access of at least one byte; anything else goes through ``_check``.

        One comparison chain on the hot path: the page-table walk makes several
        8-byte accesses per fault. An empty access passes ``_check`` and does nothing.
        """
        return (
            0 <= keyid <= self.nr_keyids and pa >= 0 and length > 0 and pa + length <= self.phys_mem
        )

    def _check(self, pa: int, length: int, keyid: int) -> None:
        if not 0 <= keyid <= self.nr_keyids:
            fail(errno.EINVAL, f"KeyID {keyid} is not 0..{self.nr_keyids}")
        self._dram.check(pa, length)
