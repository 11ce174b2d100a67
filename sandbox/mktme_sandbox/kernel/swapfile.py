"""The swap device and its slots (mm/swapfile.c, mm/page_io.c, include/linux/swap.h).

What it models
    One swap partition of ``swap_size`` bytes, formatted as ``mkswap`` formats
    it: page 0 is ``union swap_header`` (``bootbits[1024]``, then ``version``
    1, ``last_page``, ``nr_badpages`` 0, a ``sws_uuid``, no volume label, and
    ``"SWAPSPACE2"`` in the last ten bytes of the page); every other page is a
    slot. ``swap_map[]`` counts the swap PTEs that name each slot (the header
    is ``SWAP_MAP_BAD``, never handed out), and ``get_swap_page()`` takes the
    lowest free slot. The file ``swap`` shows the device's bytes: a disk, like
    ``dram`` is the chips.

The MKTME question
    ``swap_writepage()`` reads the page through the kernel's direct mapping of
    the page's KeyID (``page_to_virt()`` with the KeyID, patch 18), so the
    device receives the plaintext: MKTME protects memory, not the disk. The
    mitigation users reach for is encrypted swap (dm-crypt, ``crypttab``'s
    ``swap`` with a random key): here ``swap_encryption`` encrypts every slot
    written while it is on with AES-XTS-256 under the device's own key, one
    512-byte sector at a time with the ``plain64`` IV (the sector number,
    little-endian), as ``aes-xts-plain64`` does. A slot remembers whether it
    was written encrypted, so the switch may change at any time. The header
    page stays in clear (dm-crypt would encrypt it too; ``swapon`` sees the
    mapped device, the sandbox shows the raw one with its header, so that the
    file is recognisably a swap partition: ``file -s``/``blkid`` name it).

Swap entries (arch/x86/include/asm/pgtable_64.h)
    A swap PTE is not present and not PROT_NONE (bits 0 and 8 clear); the
    type sits in bits 59-63 and the offset from bit 9 up. Linux stores the
    offset inverted since the L1TF fix (August 2018) so that its high bits
    point outside memory; here it is stored as is, because the page tables
    refuse an entry with bits at or above MAXPHYADDR and the sandbox has no
    speculative loads to defend against. The sandbox has one swap device,
    type 0.

Left out: the swap cache, swap clusters and readahead, several devices and
priorities, swapoff, discard, the swap count continuation (a slot here is
named by at most one PTE: only exclusive pages are swapped).
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Callable
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from mktme_sandbox.config import PAGE_SIZE
from mktme_sandbox.errors import fail
from mktme_sandbox.kernel.pgtable_types import PteFlags

__all__ = [
    "PTE_MAPPED",
    "SWAP_MAGIC",
    "SwapDevice",
    "is_swap_pte",
    "swp_entry_to_pte",
    "swp_offset",
    "swp_offsets",
    "swp_type",
]

SWAP_MAGIC = b"SWAPSPACE2"
SWAP_MAP_MAX = 0x3E  # include/linux/swap.h: the most references swap_map[] counts
SWAP_MAP_BAD = 0x3F
SECTOR = 512
SWAPFILE_CLUSTER = 256
SWP_TYPE_BITS = 5
SWP_OFFSET_FIRST_BIT = 9  # _PAGE_BIT_PROTNONE + 1
PTE_MAPPED = int(PteFlags.PRESENT | PteFlags.PROTNONE)
"""``pte_present()``: a PTE with either bit maps a page (PROT_NONE ones too)."""


def is_swap_pte(pte: int) -> bool:
    """``is_swap_pte()``: neither ``pte_none`` nor ``pte_present``."""
    return pte != 0 and not pte & PTE_MAPPED


def swp_entry_to_pte(swp_type: int, offset: int) -> int:
    return (swp_type << (64 - SWP_TYPE_BITS)) | (offset << SWP_OFFSET_FIRST_BIT)


def swp_type(pte: int) -> int:
    return pte >> (64 - SWP_TYPE_BITS)


def swp_offset(pte: int) -> int:
    return (pte & ((1 << (64 - SWP_TYPE_BITS)) - 1)) >> SWP_OFFSET_FIRST_BIT


def swp_offsets(ptes: np.ndarray) -> np.ndarray:
    """``swp_offset`` of many swap entries at once (uint64): int64 offsets."""
    u64 = np.uint64
    mask = u64((1 << (64 - SWP_TYPE_BITS)) - 1)
    offsets: np.ndarray = ((ptes & mask) >> u64(SWP_OFFSET_FIRST_BIT)).astype(np.int64)
    return offsets


def swap_header(nr_pages: int, uuid: bytes) -> bytes:
    """Page 0 of the device as ``mkswap`` writes it (``union swap_header``)."""
    page = bytearray(PAGE_SIZE)
    info = (1).to_bytes(4, "little") + (nr_pages - 1).to_bytes(4, "little") + bytes(4)
    page[1024 : 1024 + 12] = info
    page[1036:1052] = uuid  # sws_uuid; sws_volume (16 bytes) stays empty
    page[PAGE_SIZE - len(SWAP_MAGIC) :] = SWAP_MAGIC
    return bytes(page)


class SwapDevice:
    """The swap partition: its bytes, ``swap_map[]`` and the dm-crypt key."""

    def __init__(
        self,
        size: int,
        seed: int | None,
        slot_limit: Callable[[int], int | None] = lambda uid: None,
    ) -> None:
        self.nr_pages = size // PAGE_SIZE
        self.size = self.nr_pages * PAGE_SIZE
        self._data = np.zeros(self.size, dtype=np.uint8)  # lazily backed
        self.swap_map = np.zeros(self.nr_pages, dtype=np.uint8)
        self._lowest = 1  # no free slot below this one
        self._encrypted = np.zeros(self.nr_pages, dtype=bool)
        self._slot_uid = np.zeros(self.nr_pages, dtype=np.int64)  # uid + 1; 0 uncharged
        self.slots_by_uid: dict[int, int] = {}
        """Slots in use per uid: a page's slot is charged to whom the page was."""
        self._slot_limit = slot_limit
        self.swap_encryption = False
        secret = (
            os.urandom(80)
            if seed is None
            else hashlib.shake_256(f"mktme-sandbox swap {seed}".encode()).digest(80)
        )
        self._key = secret[:64]  # aes-xts-plain64 with a 512-bit key: AES-256 twice
        if self.nr_pages:
            uuid = bytearray(secret[64:80])
            uuid[6] = (uuid[6] & 0x0F) | 0x40  # a version 4 UUID, as mkswap's libuuid
            uuid[8] = (uuid[8] & 0x3F) | 0x80
            self._data[:PAGE_SIZE] = np.frombuffer(
                swap_header(self.nr_pages, bytes(uuid)), np.uint8
            )
            self.swap_map[0] = SWAP_MAP_BAD

    # --- slots ------------------------------------------------------------------

    @property
    def total(self) -> int:
        """Slots that can hold a page (``SwapTotal`` in pages): all but the header."""
        return max(self.nr_pages - 1, 0)

    def in_use(self) -> int:
        return int(np.count_nonzero(self.swap_map[1:]))  # one pass over one byte per slot

    def free(self) -> int:
        return self.total - self.in_use()

    def may_take(self, uid: int | None) -> bool:
        """Whether ``uid`` may have one more page swapped: its share (``slot_limit``,
        half the device for a user with limits) is not used up."""
        if uid is None:
            return True
        limit = self._slot_limit(uid)
        return limit is None or self.slots_by_uid.get(uid, 0) < limit

    def get_swap_page(self, uid: int | None = None) -> int | None:
        """The lowest free slot, taken (map count 1) and charged to ``uid``; None
        when the device is full. The search starts at ``_lowest``, below which no
        slot is free, and reads the map a cluster (``SWAPFILE_CLUSTER``, 256
        slots) at a time."""
        offset = self._take_slot()
        if offset is not None and uid is not None:
            self._slot_uid[offset] = uid + 1
            self.slots_by_uid[uid] = self.slots_by_uid.get(uid, 0) + 1
        return offset

    def _take_slot(self) -> int | None:
        start = self._lowest
        while start < self.nr_pages:
            chunk = self.swap_map[start : start + SWAPFILE_CLUSTER]
            free = np.flatnonzero(chunk == 0)
            if len(free):
                offset = start + int(free[0])
                self.swap_map[offset] = 1
                self._lowest = offset + 1
                return offset
            start += SWAPFILE_CLUSTER
        self._lowest = self.nr_pages
        return None

    def swap_count(self, offset: int) -> int:
        return int(self.swap_map[offset]) if 0 < offset < self.nr_pages else 0

    def swap_counts(self, offsets: np.ndarray) -> np.ndarray:
        """``swap_count`` of many slots at once: int64 counts, 0 outside the device."""
        inside = (offsets > 0) & (offsets < self.nr_pages)
        counts: np.ndarray = np.where(inside, self.swap_map[np.where(inside, offsets, 0)], 0)
        return counts.astype(np.int64)

    def swap_duplicate(self, offset: int) -> None:
        """One more swap entry names the slot (``swap_duplicate()``: fork copies
        the entry); ENOMEM past ``SWAP_MAP_MAX`` references (no continuation pages)."""
        if self.swap_map[offset] >= SWAP_MAP_MAX:
            fail(errno.ENOMEM, f"swap slot {offset}: more than {SWAP_MAP_MAX} references")
        self.swap_map[offset] += 1

    def swap_free(self, offset: int) -> None:
        """Drop one reference to a slot; its bytes stay on the disk, as on a real one.
        The last one uncharges the slot."""
        self.swap_map[offset] -= 1
        if not self.swap_map[offset]:
            self._lowest = min(self._lowest, offset)
            uid = int(self._slot_uid[offset]) - 1
            self._slot_uid[offset] = 0
            if uid >= 0:
                self.slots_by_uid[uid] -= 1
                if not self.slots_by_uid[uid]:
                    del self.slots_by_uid[uid]

    def valid_slot(self, offset: int) -> bool:
        return 0 < offset < self.nr_pages and 0 < self.swap_map[offset] != SWAP_MAP_BAD

    # --- I/O ---------------------------------------------------------------------

    def writepage(self, offset: int, data: bytes) -> None:
        """``swap_writepage()``: the page's bytes into the slot, through dm-crypt when on."""
        encrypt = self.swap_encryption
        if encrypt:
            data = self._crypt(offset, data, encrypt=True)
        start = offset * PAGE_SIZE
        self._data[start : start + PAGE_SIZE] = np.frombuffer(data, dtype=np.uint8)
        self._encrypted[offset] = encrypt

    def readpage(self, offset: int) -> bytes:
        """``swap_readpage()``: the slot's page, decrypted if it was written encrypted."""
        start = offset * PAGE_SIZE
        data = self._data[start : start + PAGE_SIZE].tobytes()
        if self._encrypted[offset]:
            data = self._crypt(offset, data, encrypt=False)
        return data

    def _crypt(self, offset: int, data: bytes, encrypt: bool) -> bytes:
        out = []
        first = offset * PAGE_SIZE // SECTOR
        for i in range(PAGE_SIZE // SECTOR):
            iv = (first + i).to_bytes(16, "little")  # plain64
            cipher = Cipher(algorithms.AES(self._key), modes.XTS(iv))
            ctx = cipher.encryptor() if encrypt else cipher.decryptor()
            out.append(ctx.update(data[i * SECTOR : (i + 1) * SECTOR]) + ctx.finalize())
        return b"".join(out)

    def read(self, offset: int, length: int) -> bytes:
        """The device's bytes at ``offset`` (the file ``swap``); short at the end."""
        return self._data[max(offset, 0) : max(offset, 0) + max(length, 0)].tobytes()

    # --- snapshots ----------------------------------------------------------------

    def export_state(self) -> dict[str, Any]:
        used = np.flatnonzero(self.swap_map[1:]) + 1
        pages = self._data.reshape(-1, PAGE_SIZE)[used] if self.nr_pages else self._data
        return {
            "swap_map": self.swap_map.copy(),
            "slot_uid": self._slot_uid.copy(),
            "encrypted": self._encrypted.copy(),
            "slots": used.astype(np.int64),
            "pages": np.ascontiguousarray(pages).reshape(-1),
            "swap_encryption": self.swap_encryption,
            "key": self._key,
            "header": self._data[:PAGE_SIZE].tobytes() if self.nr_pages else b"",
        }

    def _zero_written_pages(self) -> None:
        """Zero the device, writing only to its pages that hold anything: a fresh
        device is never written to (its memory stays uncommitted, as a restore wants)."""
        pages = self._data.reshape(-1, PAGE_SIZE)
        pages[pages.any(axis=1)] = 0

    def import_state(self, state: dict[str, Any]) -> None:
        if len(state["swap_map"]) != self.nr_pages:
            raise ValueError("the swap device differs in size")
        self._zero_written_pages()
        if self.nr_pages:
            self._data[:PAGE_SIZE] = np.frombuffer(bytes(state["header"]), np.uint8)
        pages = np.asarray(state["pages"], dtype=np.uint8).reshape(-1, PAGE_SIZE)
        for slot, page in zip(np.asarray(state["slots"]).tolist(), pages, strict=True):
            self._data[slot * PAGE_SIZE : (slot + 1) * PAGE_SIZE] = page
        self.swap_map[:] = state["swap_map"]
        self._slot_uid[:] = state.get("slot_uid", 0)  # older snapshots: uncharged
        charged = self._slot_uid[self._slot_uid > 0] - 1
        uids, counts = np.unique(charged, return_counts=True)
        self.slots_by_uid = dict(zip(uids.tolist(), counts.tolist(), strict=True))
        self._lowest = 1
        self._encrypted[:] = state["encrypted"]
        self.swap_encryption = bool(state["swap_encryption"])
        self._key = bytes(state["key"])
