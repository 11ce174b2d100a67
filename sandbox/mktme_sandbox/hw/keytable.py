"""The key table and PCONFIG leaf MKTME_KEY_PROGRAM.

What it models: the per-KeyID keys inside the memory controller and the one
instruction that programs them (docs/spec.md 2.3). ``KeyProgram`` is the
MKTME_KEY_PROGRAM_STRUCT as Linux lays it out (256 bytes, 256-byte aligned);
``KeyTable.pconfig`` executes it and answers a ``PconfigStatus``;
``KeyTable.cipher`` gives the memory controller a KeyID's current cipher.

Rules it keeps, in the order of the PCONFIG "Operation" flow of Intel's
Architecture Instruction Set Extensions Programming Reference (May 2019):
1. "Load TMP_KEY_PROGRAM_STRUCT from 192 bytes": the instruction reads bytes
   0-191 only (a shorter buffer faults; bytes from 192 on are never read).
   #GP(0), here ``PconfigFault`` (EINVAL), before any status: reserved bytes
   6-63 or KEYID_CTRL bits 31:24 set, or key-field bytes past the key length
   nonzero ("KEY_FIELD_1.BYTES[63:16] != 0"; with AES-XTS-256, added in spec
   rev 1.3, the tail starts at byte 32; a field naming no known algorithm is
   checked past 32, the longest key).
2. A command other than 0..3 -> INVALID_PROG_CMD.
3. KeyID 0, above ``2**MK_TME_KEYID_BITS - 1`` or above MK_TME_MAX_KEYS ->
   INVALID_KEYID.
4. The algorithm field (KEYID_CTRL bits 23:8) must have exactly one bit set, and
   that algorithm must be activated for MKTME -> else INVALID_ENC_ALG. This
   holds for CLEAR_KEY and NO_ENCRYPT too. Field bit n is algorithm code n:
   AES-XTS-128 is bit 0 (KEYID_CTRL bit 8, as documented); AES-XTS-256 is bit 2
   (KEYID_CTRL bit 10), the sandbox's choice, matching its number in
   IA32_TME_CAPABILITY and IA32_TME_ACTIVATE.
5. The key-table lock: injected faults (``inject``) answer here, after the
   checks: the next ``count`` well-formed calls answer DEVICE_BUSY or
   ENTROPY_ERROR and change nothing (an injected ENTROPY_ERROR is answered for
   any command, the sandbox's way to provoke it).
6. SET_KEY_DIRECT takes the key fields as data and tweak key. SET_KEY_RANDOM
   makes both keys from the CPU's generator XORed with the key fields as
   entropy. Neither checks for a weak key: a key equal to its tweak key is
   accepted, as the flow has no such check. CLEAR_KEY sends the KeyID back to
   the TME key; NO_ENCRYPT makes it plaintext in DRAM.

KeyID 0 always uses the TME key: random at boot, AES-XTS per the TME policy,
or plaintext under TME bypass. Never-programmed and cleared KeyIDs use that
same cipher at the hardware level (the kernel refuses to map them; not the
table's business). The CPU generator is seeded with ``config.seed`` so that a
seeded machine makes the same keys every run.

Key material never leaves but through a machine snapshot: keys live inside
``XtsKey`` cipher contexts and, for ``export_state``, in entries that hide them
from repr; ``KeyProgram`` hides its key fields from repr; ``KeyState`` carries
the mode and algorithm only; no exception text or log names key bytes.
``export_state``/``import_state`` carry the whole table, the generator's state
included, so that a restored seeded machine makes the keys the original would.

Left out: the PCONFIG targets other than MKTME, per-package tables, and the
struct's 256-byte alignment (the caller hands over bytes, not an address).
Later SDM editions turn statuses 1, 3 and 4 into #GP; the sandbox follows the
MKTME specification's status table (Table 6-6), as Linux v5 does.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Literal

import numpy as np

from mktme_sandbox.errors import SandboxError, fail
from mktme_sandbox.hw.msr import TmeActivation
from mktme_sandbox.hw.xts import (
    ALGORITHMS,
    PLAINTEXT,
    Algorithm,
    LineCipher,
    TweakCache,
    XtsKey,
    algorithm_named,
)

__all__ = [
    "KEY_FIELD_SIZE",
    "READ_SIZE",
    "STRUCT_SIZE",
    "KeyMode",
    "KeyProgram",
    "KeyProgramCommand",
    "KeyState",
    "KeyTable",
    "PconfigFault",
    "PconfigStatus",
]


class KeyProgramCommand(IntEnum):
    SET_KEY_DIRECT = 0
    SET_KEY_RANDOM = 1
    CLEAR_KEY = 2
    NO_ENCRYPT = 3


class PconfigStatus(IntEnum):
    PROG_SUCCESS = 0
    INVALID_PROG_CMD = 1
    ENTROPY_ERROR = 2
    INVALID_KEYID = 3
    INVALID_ENC_ALG = 4
    DEVICE_BUSY = 5


INJECTABLE = (PconfigStatus.DEVICE_BUSY, PconfigStatus.ENTROPY_ERROR)
_COMMANDS = frozenset(KeyProgramCommand)


class PconfigFault(SandboxError):
    """PCONFIG took #GP(0): the struct itself is malformed (EINVAL)."""

    def __init__(self, reason: str) -> None:
        super().__init__(errno.EINVAL, f"PCONFIG: {reason}")


# MKTME_KEY_PROGRAM_STRUCT: KEYID u16, KEYID_CTRL u32, 58 reserved bytes,
# KEY_FIELD_1 [64], KEY_FIELD_2 [64]; little-endian. Linux pads it to 256 bytes
# (its alignment); PCONFIG reads the first 192.
_LAYOUT = struct.Struct("<HI58s64s64s")
READ_SIZE = _LAYOUT.size
STRUCT_SIZE = 256
KEY_FIELD_SIZE = 64
_LONGEST_KEY = max(a.key_bytes for a in ALGORITHMS)
CTRL_COMMAND_BITS = 8  # KEYID_CTRL bits 7:0 command, 23:8 algorithm, 31:24 reserved
CTRL_ALGORITHM_MASK = 0xFFFF
CTRL_RESERVED_SHIFT = 24


@dataclass(frozen=True)
class KeyProgram:
    """One MKTME_KEY_PROGRAM_STRUCT; ``algorithm`` is the raw one-hot 16-bit field."""

    keyid: int
    command: int
    algorithm: int
    key_field_1: bytes = field(default=b"", repr=False)
    key_field_2: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        _check_range("KEYID", self.keyid, 0xFFFF)
        _check_range("command", self.command, (1 << CTRL_COMMAND_BITS) - 1)
        _check_range("algorithm field", self.algorithm, CTRL_ALGORITHM_MASK)
        for name in ("key_field_1", "key_field_2"):
            value = bytes(getattr(self, name))
            if len(value) > KEY_FIELD_SIZE:
                fail(errno.EINVAL, f"{name} holds at most {KEY_FIELD_SIZE} bytes, not {len(value)}")
            object.__setattr__(self, name, value.ljust(KEY_FIELD_SIZE, b"\0"))

    @property
    def keyid_ctrl(self) -> int:
        return self.command | self.algorithm << CTRL_COMMAND_BITS

    def encode(self) -> bytes:
        """The 256 bytes Linux hands to PCONFIG (192 read, zero padding)."""
        packed = _LAYOUT.pack(
            self.keyid, self.keyid_ctrl, bytes(58), self.key_field_1, self.key_field_2
        )
        return packed.ljust(STRUCT_SIZE, b"\0")

    @classmethod
    def decode(cls, raw: bytes) -> KeyProgram:
        """The first 192 bytes -> the struct; ``PconfigFault`` (#GP) for a shorter
        buffer, reserved bits set or nonzero key-field tails."""
        if len(raw) < READ_SIZE:
            raise PconfigFault(f"PCONFIG reads {READ_SIZE} bytes, the buffer has {len(raw)}")
        keyid, ctrl, reserved, field_1, field_2 = _LAYOUT.unpack(bytes(raw[:READ_SIZE]))
        if ctrl >> CTRL_RESERVED_SHIFT:
            raise PconfigFault(f"KEYID_CTRL reserved bits 31:24 are set ({ctrl:#010x})")
        if any(reserved):
            raise PconfigFault("reserved bytes of MKTME_KEY_PROGRAM_STRUCT are not zero")
        _check_key_tails(ctrl >> CTRL_COMMAND_BITS & CTRL_ALGORITHM_MASK, field_1, field_2)
        return cls(
            keyid=keyid,
            command=ctrl & ((1 << CTRL_COMMAND_BITS) - 1),
            algorithm=ctrl >> CTRL_COMMAND_BITS & CTRL_ALGORITHM_MASK,
            key_field_1=field_1,
            key_field_2=field_2,
        )


KeyMode = Literal["unprogrammed", "direct", "random", "cleared", "no-encrypt", "tme", "tme-bypass"]


@dataclass(frozen=True)
class KeyState:
    """What may be said about a KeyID's key: how it was set, never what it is.

    ``mode`` is ``tme`` or ``tme-bypass`` for KeyID 0 and one of the others for
    KeyIDs 1..n; ``algorithm`` is None for KeyIDs never programmed (and KeyID 0
    under bypass).
    """

    keyid: int
    mode: KeyMode
    algorithm: str | None

    @property
    def programmed(self) -> bool:
        """Holds its own key or NO_ENCRYPT: what a mapping needs (not cleared, not never)."""
        return self.mode in ("direct", "random", "no-encrypt")


@dataclass(frozen=True)
class _Entry:
    mode: KeyMode
    algorithm: Algorithm | None
    cipher: LineCipher = field(repr=False)
    material: bytes = field(default=b"", repr=False)  # data key + tweak key, for snapshots


class KeyTable:
    """KeyID -> cipher, programmed only through ``pconfig``."""

    def __init__(
        self,
        activation: TmeActivation,
        seed: int | None,
        random_bytes: Callable[[int], bytes] | None = None,
        tables: TweakCache | None = None,
    ) -> None:
        self.nr_keyids = activation.nr_keyids
        self._tables = tables  # every key's tweak tables (the machine's tweak_cache)
        self._algorithms = activation.mktme_algorithms
        self._rng = np.random.default_rng(seed)
        self._random_bytes = random_bytes or self._rng.bytes
        self._set_tme(self._boot_tme_entry(activation))
        self._entries: dict[int, _Entry] = {}
        self._injected = PconfigStatus.PROG_SUCCESS
        self._injected_count = 0

    def __repr__(self) -> str:
        return f"<KeyTable {len(self._entries)} of {self.nr_keyids} KeyIDs programmed>"

    def cipher(self, keyid: int) -> LineCipher:
        """The cipher the engine uses for ``keyid`` right now."""
        return self._entry(keyid).cipher

    def key_state(self, keyid: int) -> KeyState:
        entry = self._entry(keyid)
        algorithm = entry.algorithm.name if entry.algorithm else None
        return KeyState(keyid, entry.mode, algorithm)

    def inject(self, status: PconfigStatus | int, count: int) -> None:
        """The next ``count`` PCONFIG calls answer ``status`` (busy or entropy error)."""
        if status not in INJECTABLE or count < 0:
            fail(
                errno.EINVAL,
                f"can inject DEVICE_BUSY or ENTROPY_ERROR a count >= 0 times, "
                f"not status {int(status)} x {count}",
            )
        self._injected, self._injected_count = PconfigStatus(status), count

    def pconfig(self, raw: bytes) -> PconfigStatus:
        """Execute MKTME_KEY_PROGRAM with the 256-byte struct ``raw``."""
        program = KeyProgram.decode(raw)
        if program.command not in _COMMANDS:
            return PconfigStatus.INVALID_PROG_CMD
        if not 0 < program.keyid <= self.nr_keyids:
            return PconfigStatus.INVALID_KEYID
        algorithm = _one_hot_algorithm(program.algorithm)
        if algorithm is None or algorithm not in self._algorithms:
            return PconfigStatus.INVALID_ENC_ALG
        if self._injected_count:  # KEY_TABLE_LOCK.ACQUIRE(WRITE) failed
            self._injected_count -= 1
            return self._injected
        return self._execute(program, algorithm)

    def _entry(self, keyid: int) -> _Entry:
        if keyid == 0:
            return self._tme
        if not 0 < keyid <= self.nr_keyids:
            fail(errno.EINVAL, f"KeyID {keyid} is not 0..{self.nr_keyids}")
        return self._entries.get(keyid, self._unprogrammed)

    def _set_tme(self, tme: _Entry) -> None:
        """KeyID 0's key; never-programmed KeyIDs use it too."""
        self._tme = tme
        self._unprogrammed = _Entry("unprogrammed", None, tme.cipher, tme.material)

    def _boot_tme_entry(self, activation: TmeActivation) -> _Entry:
        if activation.tme_bypass:
            return _Entry("tme-bypass", None, PLAINTEXT)
        size = activation.tme_algorithm.key_bytes
        while True:  # a fresh TME key every boot; equal halves are possible only in theory
            data_key, tweak_key = self._random_bytes(size), self._random_bytes(size)
            if data_key != tweak_key:
                return _keyed("tme", activation.tme_algorithm, data_key, tweak_key, self._tables)

    def _execute(self, program: KeyProgram, algorithm: Algorithm) -> PconfigStatus:
        command = KeyProgramCommand(program.command)
        size = algorithm.key_bytes
        data_key, tweak_key = program.key_field_1[:size], program.key_field_2[:size]
        if command is KeyProgramCommand.SET_KEY_DIRECT:
            entry = _keyed("direct", algorithm, data_key, tweak_key, self._tables)
        elif command is KeyProgramCommand.SET_KEY_RANDOM:
            data_key = _xor(self._random_bytes(size), data_key)
            tweak_key = _xor(self._random_bytes(size), tweak_key)
            entry = _keyed("random", algorithm, data_key, tweak_key, self._tables)
        elif command is KeyProgramCommand.CLEAR_KEY:
            entry = _Entry("cleared", algorithm, self._tme.cipher, self._tme.material)
        else:
            entry = _Entry("no-encrypt", algorithm, PLAINTEXT)
        self._entries[program.keyid] = entry
        return PconfigStatus.PROG_SUCCESS

    # --- snapshots ------------------------------------------------------------

    def export_state(self) -> dict[str, Any]:
        """The whole table, key material included: a snapshot holds secrets."""
        return {
            "tme": _entry_state(self._tme),
            "entries": [[k, _entry_state(e)] for k, e in self._entries.items()],
            "rng": self._rng.bit_generator.state,
            "injected": [int(self._injected), self._injected_count],
        }

    def import_state(self, state: dict[str, Any]) -> None:
        self._set_tme(_entry_of(state["tme"], PLAINTEXT, self._tables))
        self._entries = {}
        for keyid, entry in state["entries"]:
            if not 0 < keyid <= self.nr_keyids:
                fail(errno.EINVAL, f"snapshot: KeyID {keyid} is not 1..{self.nr_keyids}")
            self._entries[keyid] = _entry_of(entry, self._tme.cipher, self._tables)
        self._rng.bit_generator.state = state["rng"]
        status, count = state["injected"]
        self._injected, self._injected_count = PconfigStatus(status), count

    def power_on(self, activation: TmeActivation, rng_state: dict[str, Any] | None) -> None:
        """A cold boot: an empty table and a new TME key, drawn after ``rng_state``
        (None: from where the generator is)."""
        if rng_state is not None:
            self._rng.bit_generator.state = rng_state
        self._set_tme(self._boot_tme_entry(activation))
        self._entries = {}
        self._injected, self._injected_count = PconfigStatus.PROG_SUCCESS, 0


def _keyed(
    mode: KeyMode,
    algorithm: Algorithm,
    data_key: bytes,
    tweak_key: bytes,
    tables: TweakCache | None,
) -> _Entry:
    return _Entry(mode, algorithm, XtsKey(data_key, tweak_key, tables), data_key + tweak_key)


def _entry_state(entry: _Entry) -> dict[str, Any]:
    algorithm = entry.algorithm.name if entry.algorithm else None
    return {"mode": entry.mode, "algorithm": algorithm, "material": entry.material}


def _entry_of(state: dict[str, Any], tme: LineCipher, tables: TweakCache | None) -> _Entry:
    """An entry from ``_entry_state``; cleared KeyIDs share the TME cipher ``tme``."""
    mode, material = state["mode"], bytes(state["material"])
    algorithm = None if state["algorithm"] is None else algorithm_named(state["algorithm"])
    if mode in ("tme", "direct", "random"):
        if algorithm is None or len(material) != 2 * algorithm.key_bytes:
            fail(errno.EINVAL, f"snapshot: a {mode} key without its algorithm's key bytes")
        half = algorithm.key_bytes
        return _keyed(mode, algorithm, material[:half], material[half:], tables)
    if mode not in ("cleared", "no-encrypt", "tme-bypass", "unprogrammed"):
        fail(errno.EINVAL, f"snapshot: unknown key mode {mode!r}")
    cipher = tme if mode in ("cleared", "unprogrammed") else PLAINTEXT
    return _Entry(mode, algorithm, cipher, material)


def _one_hot_algorithm(field_value: int) -> Algorithm | None:
    """The algorithm whose bit is the only one set, or None."""
    for algorithm in ALGORITHMS:
        if field_value == algorithm.bit:
            return algorithm
    return None


def _check_key_tails(algorithm_field: int, *fields: bytes) -> None:
    """#GP for key-field bytes past the key of the algorithm the field names
    (past the longest key when it names none): checked before any status."""
    algorithm = _one_hot_algorithm(algorithm_field)
    length = algorithm.key_bytes if algorithm else _LONGEST_KEY
    for number, value in enumerate(fields, start=1):
        if any(value[length:]):
            raise PconfigFault(f"KEY_FIELD_{number} has nonzero bytes past byte {length - 1}")


def _check_range(name: str, value: int, maximum: int) -> None:
    if not 0 <= value <= maximum:
        fail(errno.EINVAL, f"MKTME_KEY_PROGRAM_STRUCT {name} {value} is not 0..{maximum:#x}")


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(len(a), "little")
