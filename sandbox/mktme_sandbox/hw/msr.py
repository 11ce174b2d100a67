"""The TME MSRs: IA32_TME_CAPABILITY, _ACTIVATE, _EXCLUDE_MASK and _EXCLUDE_BASE.

What it models: the enumeration and activation registers that "BIOS" sets up
before the kernel boots (docs/spec.md 2.2; bit layout in
MKTME-FACTS). One field table, ``FIELDS``, declares every field once (name,
MSR, bit range, meaning); the same table builds the boot values from a
``MachineConfig``, decodes any value into named fields, and renders the
``hw/tme`` text. Algorithm bits come from the ``Algorithm`` table in ``xts``.

Rules it keeps:
- CAPABILITY: both algorithms and TME bypass supported; MK_TME_MAX_KEYID_BITS
  is ``config.keyid_bits`` and MK_TME_MAX_KEYS ``config.max_keys`` (both 0 when
  ``keyid_bits`` is 0: a part without MKTME).
- ACTIVATE: locked and enabled; TME policy AES-XTS-128 when that algorithm is
  configured, else AES-XTS-256; the bypass bit from ``tme_bypass``;
  MK_TME_KEYID_BITS ``config.keyid_bits``; MK_TME_CRYPTO_ALGS one bit per
  configured algorithm (none when MKTME is off).
- EXCLUDE_MASK/BASE (Intel MKTME spec, Tables 4-5 and 4-6): from
  ``config.tme_exclude_base``/``tme_exclude_size``; enable is bit 11, TMEEMASK
  and TMEEBASE are bits MAXPHYADDR-1:12 (bits from MAXPHYADDR up are reserved
  and decode as ``reserved``). An address is in the range when ``pa & mask ==
  base & mask``; ``TmeExclusion`` holds the decoded range.
- Faults: ``rdmsr``/``wrmsr`` of an MSR that does not exist, and every
  ``wrmsr`` (CAPABILITY is read-only; ACTIVATE is locked at boot and the
  exclusion registers lock with it) raise ``MsrFault``. Its errno is EIO, what
  Linux's ``/dev/cpu/N/msr`` returns when the instruction takes #GP, so the
  ``hw/msr`` file can pass it through unchanged.

Left out: key select and save-for-standby (always 0: a fresh key every boot),
the integrity algorithms (CAPABILITY bits 1 and 3), and per-CPU copies (one
package, so "inconsistent between CPUs" never happens).
"""

from __future__ import annotations

import errno
from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import IntEnum
from typing import NamedTuple

from mktme_sandbox.config import MachineConfig
from mktme_sandbox.errors import SandboxError, fail
from mktme_sandbox.hw.xts import AES_XTS_128, AES_XTS_256, ALGORITHMS, Algorithm, algorithm_named

__all__ = [
    "FIELDS",
    "FieldValue",
    "Msr",
    "MsrFault",
    "MsrField",
    "TmeActivation",
    "TmeExclusion",
    "TmeMsrs",
    "boot_values",
    "decode",
    "encode",
    "render",
]


class Msr(IntEnum):
    IA32_TME_CAPABILITY = 0x981
    IA32_TME_ACTIVATE = 0x982
    IA32_TME_EXCLUDE_MASK = 0x983
    IA32_TME_EXCLUDE_BASE = 0x984


class MsrFault(SandboxError):
    """RDMSR/WRMSR took #GP: an unknown MSR, a read-only or a locked one (EIO)."""

    def __init__(self, reason: str) -> None:
        super().__init__(errno.EIO, reason)


@dataclass(frozen=True)
class MsrField:
    """Bits ``high:low`` of one MSR."""

    name: str
    msr: Msr
    low: int
    high: int
    meaning: str

    @property
    def mask(self) -> int:
        return ((1 << (self.high - self.low + 1)) - 1) << self.low

    def get(self, value: int) -> int:
        return (value & self.mask) >> self.low

    def put(self, field_value: int) -> int:
        if field_value < 0 or field_value << self.low & ~self.mask:
            fail(
                errno.EINVAL, f"{self.name} {field_value} does not fit bits {self.high}:{self.low}"
            )
        return field_value << self.low


def _bit(name: str, msr: Msr, bit: int, meaning: str) -> MsrField:
    return MsrField(name, msr, bit, bit, meaning)


def _algorithm_field_name(prefix: str, algorithm: Algorithm, suffix: str = "") -> str:
    return prefix + algorithm.name.replace("-", "_") + suffix


_CAP, _ACT = Msr.IA32_TME_CAPABILITY, Msr.IA32_TME_ACTIVATE
CRYPTO_ALGS_LOW = 48  # IA32_TME_ACTIVATE bits 63:48, one bit per algorithm code

FIELDS: tuple[MsrField, ...] = (
    *(
        _bit(_algorithm_field_name("", a, "_supported"), _CAP, a.code, f"{a.name} supported")
        for a in ALGORITHMS
    ),
    _bit("tme_bypass_supported", _CAP, 31, "TME bypass supported"),
    MsrField("mk_tme_max_keyid_bits", _CAP, 32, 35, "KeyID bits the part can take"),
    MsrField("mk_tme_max_keys", _CAP, 36, 50, "MKTME KeyIDs the part has, KeyID 0 not counted"),
    _bit("lock", _ACT, 0, "activation locked until reset"),
    _bit("tme_enable", _ACT, 1, "TME enabled"),
    _bit("key_select", _ACT, 2, "0: new TME key at boot, 1: restore the saved one"),
    _bit("save_key_for_standby", _ACT, 3, "save the TME key for standby"),
    MsrField("tme_policy", _ACT, 4, 7, "TME algorithm: 0 AES-XTS-128, 2 AES-XTS-256"),
    _bit("tme_bypass_enable", _ACT, 31, "KeyID 0 is not encrypted"),
    MsrField("mk_tme_keyid_bits", _ACT, 32, 35, "physical-address bits used for KeyIDs"),
    *(
        _bit(
            _algorithm_field_name("mk_tme_crypto_", a),
            _ACT,
            CRYPTO_ALGS_LOW + a.code,
            f"{a.name} allowed for MKTME KeyIDs",
        )
        for a in ALGORITHMS
    ),
    _bit("exclude_enable", Msr.IA32_TME_EXCLUDE_MASK, 11, "exclusion range enabled"),
    MsrField("exclude_mask", Msr.IA32_TME_EXCLUDE_MASK, 12, 51, "exclusion range mask, bits 51:12"),
    MsrField("exclude_base", Msr.IA32_TME_EXCLUDE_BASE, 12, 51, "exclusion range base, bits 51:12"),
)

_BY_NAME = {f.name: f for f in FIELDS}
_ADDRESS_FIELDS = ("exclude_mask", "exclude_base")  # bits MAXPHYADDR-1:12


class FieldValue(NamedTuple):
    name: str
    value: int


def encode(msr: Msr, values: Mapping[str, int]) -> int:
    """Field values by name -> the MSR value; EINVAL for a field of another MSR."""
    result = 0
    for name, value in values.items():
        f = _BY_NAME.get(name)
        if f is None or f.msr != msr:
            fail(errno.EINVAL, f"{msr.name} has no field {name!r}")
        result |= f.put(value)
    return result


def decode(msr: int, value: int, maxphyaddr: int = 52) -> list[FieldValue]:
    """An MSR value -> its fields in bit order, plus ``reserved`` when reserved bits are set.

    The exclusion fields end at bit ``maxphyaddr - 1``; bits above are reserved."""
    fields = _fields_of(_msr(msr), maxphyaddr)
    pairs = [FieldValue(f.name, f.get(value)) for f in fields]
    reserved = value & ~sum(f.mask for f in fields)
    if reserved:
        pairs.append(FieldValue("reserved", reserved))
    return pairs


def render(values: Mapping[Msr, int], maxphyaddr: int = 52) -> str:
    """The ``hw/tme`` text: per MSR one ``NAME 0x...`` line, then ``field value`` lines."""
    lines = []
    for msr, value in sorted(values.items()):
        lines.append(f"{msr.name} {value:#018x}")
        lines.extend(f"{name} {field}" for name, field in decode(msr, value, maxphyaddr))
    return "\n".join(lines) + "\n"


def boot_values(config: MachineConfig) -> dict[Msr, int]:
    """The four MSRs as "BIOS" leaves them for ``config``."""
    mktme = config.keyid_bits > 0
    capability = {_algorithm_field_name("", a, "_supported"): 1 for a in ALGORITHMS}
    capability |= {
        "tme_bypass_supported": 1,
        "mk_tme_max_keyid_bits": config.keyid_bits,
        "mk_tme_max_keys": config.max_keys if mktme else 0,
    }
    tme = AES_XTS_128 if AES_XTS_128.name in config.algorithms else AES_XTS_256
    activate = {
        "lock": 1,
        "tme_enable": 1,
        "tme_policy": tme.code,
        "tme_bypass_enable": int(config.tme_bypass),
        "mk_tme_keyid_bits": config.keyid_bits,
    }
    if mktme:
        activate |= {
            _algorithm_field_name("mk_tme_crypto_", algorithm_named(name)): 1
            for name in config.algorithms
        }
    return {
        Msr.IA32_TME_CAPABILITY: encode(Msr.IA32_TME_CAPABILITY, capability),
        Msr.IA32_TME_ACTIVATE: encode(Msr.IA32_TME_ACTIVATE, activate),
        **_exclusion_values(config),
    }


def _exclusion_values(config: MachineConfig) -> dict[Msr, int]:
    size = config.tme_exclude_size
    if not size:
        return {Msr.IA32_TME_EXCLUDE_MASK: 0, Msr.IA32_TME_EXCLUDE_BASE: 0}
    mask = ((1 << config.maxphyaddr) - 1) & ~(size - 1)
    return {
        Msr.IA32_TME_EXCLUDE_MASK: encode(
            Msr.IA32_TME_EXCLUDE_MASK, {"exclude_enable": 1, "exclude_mask": mask >> 12}
        ),
        Msr.IA32_TME_EXCLUDE_BASE: encode(
            Msr.IA32_TME_EXCLUDE_BASE, {"exclude_base": config.tme_exclude_base >> 12}
        ),
    }


@dataclass(frozen=True)
class TmeExclusion:
    """The TME exclusion range: ``pa`` is in it when ``pa & mask == base & mask``."""

    enabled: bool
    mask: int
    base: int

    @classmethod
    def from_msrs(cls, mask_msr: int, base_msr: int, maxphyaddr: int) -> TmeExclusion:
        mask = dict(decode(Msr.IA32_TME_EXCLUDE_MASK, mask_msr, maxphyaddr))
        base = dict(decode(Msr.IA32_TME_EXCLUDE_BASE, base_msr, maxphyaddr))
        return cls(
            bool(mask["exclude_enable"]), mask["exclude_mask"] << 12, base["exclude_base"] << 12
        )


@dataclass(frozen=True)
class TmeActivation:
    """What the activated MSRs tell the rest of the platform."""

    tme_algorithm: Algorithm
    tme_bypass: bool
    keyid_bits: int
    max_keys: int
    mktme_algorithms: tuple[Algorithm, ...]

    @property
    def nr_keyids(self) -> int:
        """MKTME KeyIDs 1..n: limited by the KeyID bits and by the part's key count."""
        if self.keyid_bits == 0:
            return 0
        return min((1 << self.keyid_bits) - 1, self.max_keys)

    @classmethod
    def from_msrs(cls, capability: int, activate: int) -> TmeActivation:
        cap = dict(decode(Msr.IA32_TME_CAPABILITY, capability))
        act = dict(decode(Msr.IA32_TME_ACTIVATE, activate))
        return cls(
            tme_algorithm=_policy_algorithm(act["tme_policy"]),
            tme_bypass=bool(act["tme_bypass_enable"]),
            keyid_bits=act["mk_tme_keyid_bits"],
            max_keys=cap["mk_tme_max_keys"],
            mktme_algorithms=tuple(
                a for a in ALGORITHMS if act[_algorithm_field_name("mk_tme_crypto_", a)]
            ),
        )


class TmeMsrs:
    """The four MSRs of one package, locked at boot."""

    def __init__(self, config: MachineConfig) -> None:
        self._values = boot_values(config)
        self._maxphyaddr = config.maxphyaddr

    def rdmsr(self, addr: int) -> int:
        if addr not in self._values:
            raise MsrFault(f"rdmsr {addr:#x}: no such MSR")
        return self._values[Msr(addr)]

    def wrmsr(self, addr: int, value: int) -> None:
        if addr not in self._values:
            raise MsrFault(f"wrmsr {addr:#x}: no such MSR")
        if addr == Msr.IA32_TME_CAPABILITY:
            raise MsrFault(f"wrmsr {addr:#x}: IA32_TME_CAPABILITY is read-only")
        raise MsrFault(f"wrmsr {addr:#x}: {Msr(addr).name} is locked (IA32_TME_ACTIVATE.lock)")

    def activation(self) -> TmeActivation:
        return TmeActivation.from_msrs(
            self._values[Msr.IA32_TME_CAPABILITY], self._values[Msr.IA32_TME_ACTIVATE]
        )

    def exclusion(self) -> TmeExclusion:
        return TmeExclusion.from_msrs(
            self._values[Msr.IA32_TME_EXCLUDE_MASK],
            self._values[Msr.IA32_TME_EXCLUDE_BASE],
            self._maxphyaddr,
        )

    def text(self) -> str:
        return render(self._values, self._maxphyaddr)


def _msr(addr: int) -> Msr:
    try:
        return Msr(addr)
    except ValueError:
        raise MsrFault(f"MSR {addr:#x} is not a TME MSR") from None


def _fields_of(msr: Msr, maxphyaddr: int = 52) -> tuple[MsrField, ...]:
    """The MSR's fields; the exclusion address fields end at bit ``maxphyaddr - 1``."""
    return tuple(
        replace(f, high=maxphyaddr - 1) if f.name in _ADDRESS_FIELDS else f
        for f in FIELDS
        if f.msr == msr
    )


def _policy_algorithm(policy: int) -> Algorithm:
    for algorithm in ALGORITHMS:
        if algorithm.code == policy:
            return algorithm
    fail(errno.EINVAL, f"unknown TME policy {policy}")
