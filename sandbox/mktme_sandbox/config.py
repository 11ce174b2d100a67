"""The configuration of one machine, shared by every layer.

``MachineConfig`` holds the options of docs/spec.md section 2 and section 5
(``mktme-sandbox mount``): the platform's physical-address layout, the MKTME
enumeration (KeyID bits, key count, algorithms), TME bypass, the cache size and
the random seed. It is a leaf module: ``hw``, ``kernel``, ``machine`` and the CLI
all import it, it imports nothing of theirs.

``parse_size`` reads the sizes a user types (``256M``, ``0x1000``, ``4k``).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

__all__ = [
    "ALGORITHMS",
    "LINE_SIZE",
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "GiB",
    "KiB",
    "MachineConfig",
    "MiB",
    "TiB",
    "parse_decimal",
    "parse_hex",
    "parse_size",
    "size_text",
]

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
LINE_SIZE = 64
ALGORITHMS = ("aes-xts-128", "aes-xts-256")

# Numbers a user types are ASCII only: Python's int() and \\d would also take
# other scripts' digits ("١٢"), superscripts fail later, and "1_000" passes.
_DECIMAL = re.compile(r"[0-9]+")
_HEX = re.compile(r"0[xX][0-9a-fA-F]+")
_SIZE = re.compile(r"[ \t]*(0[xX][0-9a-fA-F]+|[0-9]+)[ \t]*([kKmMgGtT]?)(?:[iI]?[bB])?[ \t]*")
_SUFFIX = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": TiB}


def size_text(size: int) -> str:
    """``3145728`` -> ``"3M"``: a size as a user would type it (``parse_size``'s inverse)."""
    for suffix, unit in (("T", TiB), ("G", GiB), ("M", MiB), ("K", KiB)):
        if size and size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)


def parse_decimal(text: str) -> int | None:
    """``"42"`` -> 42: ASCII digits only (no sign, underscore or other script); else None."""
    return int(text, 10) if _DECIMAL.fullmatch(text) else None


def parse_hex(text: str) -> int | None:
    """``"0x1f"`` -> 31: ``0x`` then ASCII hex digits (no underscore); else None."""
    return int(text, 16) if _HEX.fullmatch(text) else None


def parse_size(text: str) -> int:
    """``"256M"`` -> 268435456; decimal or ``0x`` hex, optional K/M/G/T suffix.

    ASCII digits only. Raises ``ValueError`` with a message fit for a user.
    """
    m = _SIZE.fullmatch(text)
    if m is None:
        raise ValueError(f"{text!r} is not a size (examples: 4096, 0x1000, 64K, 256M, 2G)")
    number, suffix = m.groups()
    value = parse_hex(number)
    return (int(number, 10) if value is None else value) * _SUFFIX[suffix.lower()]


@dataclass(frozen=True)
class MachineConfig:
    """Options of one machine; ``validate()`` says what is wrong, if anything."""

    phys_mem: int = 256 * MiB
    maxphyaddr: int = 46
    keyid_bits: int = 6
    max_keys: int = 63
    algorithms: tuple[str, ...] = ALGORITHMS
    tme_bypass: bool = False
    tme_exclude_base: int = 0
    """Physical base of the TME exclusion range (IA32_TME_EXCLUDE_BASE)."""
    tme_exclude_size: int = 0
    """Its size, a power of two >= 4K; 0: no exclusion range."""
    cache_size: int = 2 * MiB
    seed: int | None = None
    max_keyids_per_uid: int | None = None
    """KeyIDs one unprivileged uid may own; None: half of ``nr_keyids``, rounded up."""
    max_pages_per_uid: int | None = None
    """Pages one unprivileged uid may hold; None: half of physical memory."""
    swap: int = 16 * MiB
    """The swap partition's size (0: no swap), its first page the header."""
    numa_nodes: int = 1
    """NUMA nodes physical memory is split into, equal ranges of whole 2 MiB blocks."""
    tweak_cache: int = 16 * MiB
    """Host memory for the engine's tables of XTS tweaks (4 KiB a page); 0: none."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad option."""
        for problem in self._problems():
            raise ValueError(problem)

    def _problems(self) -> list[str]:
        problems = []
        if not 32 <= self.maxphyaddr <= 52:
            problems.append(f"maxphyaddr must be 32..52, not {self.maxphyaddr}")
        if not 0 <= self.keyid_bits <= 15:
            problems.append(f"keyid_bits must be 0..15, not {self.keyid_bits}")
        if not 3 <= self.max_keys <= 32767:
            problems.append(f"max_keys must be 3..32767, not {self.max_keys}")
        if self.phys_mem % (2 * MiB) or not 4 * MiB <= self.phys_mem <= 64 * GiB:
            problems.append(
                f"phys_mem must be a multiple of 2M between 4M and 64G, not {size_text(self.phys_mem)}"
            )
        fits = 0 <= self.keyid_bits <= 15 and 32 <= self.maxphyaddr <= 52
        if fits and self.keyid_bits and self.phys_mem > 1 << (self.maxphyaddr - self.keyid_bits):
            problems.append(
                f"phys_mem {self.phys_mem:#x} does not fit below the KeyID bits "
                f"(maxphyaddr {self.maxphyaddr} - keyid_bits {self.keyid_bits})"
            )
        unknown = [a for a in self.algorithms if a not in ALGORITHMS]
        if unknown or not self.algorithms:
            problems.append(
                f"algorithms must be a non-empty subset of {','.join(ALGORITHMS)}, "
                f"not {','.join(self.algorithms) or 'nothing'}"
            )
        if self.cache_size and (self.cache_size % (64 * KiB) or self.cache_size > 1 * GiB):
            problems.append(
                f"cache_size must be 0 (no cache) or a multiple of 64K up to 1G, "
                f"not {size_text(self.cache_size)}"
            )
        problems += self._exclusion_problems()
        if self.tweak_cache % (4 * KiB) or not 0 <= self.tweak_cache <= 1 * GiB:
            problems.append(
                f"tweak_cache must be 0 (none) or a multiple of 4K up to 1G, "
                f"not {size_text(self.tweak_cache)}"
            )
        if self.seed is not None and self.seed < 0:
            problems.append(f"seed must be >= 0, not {self.seed}")
        if self.swap % PAGE_SIZE or not (self.swap == 0 or 2 * PAGE_SIZE <= self.swap <= 64 * GiB):
            problems.append(
                f"swap must be 0 (no swap) or whole pages from 8K to 64G, not {size_text(self.swap)}"
            )
        blocks = self.phys_mem // (2 * MiB)
        if not 1 <= self.numa_nodes <= min(64, max(blocks, 1)):
            problems.append(
                f"numa_nodes must be 1..64 and at most one per 2M of phys_mem, not {self.numa_nodes}"
            )
        for name in ("max_keyids_per_uid", "max_pages_per_uid"):
            value = getattr(self, name)
            if value is not None and value < 0:
                problems.append(f"{name} must be >= 0, not {value}")
        return problems

    def _exclusion_problems(self) -> list[str]:
        base, size = self.tme_exclude_base, self.tme_exclude_size
        limit = 1 << max(self.maxphyaddr - self.keyid_bits, 0)
        if size == 0:
            return [] if base == 0 else ["tme_exclude_base needs a tme_exclude_size"]
        if size < PAGE_SIZE or size & (size - 1) or base < 0 or base % size:
            shape = f"{size_text(size)} at {base:#x}"
            return [
                f"the TME exclusion range must be a power of two >= 4K at its alignment: {shape}"
            ]
        if base + size > limit:
            return [f"the TME exclusion range ends above the physical addresses ({limit:#x})"]
        return []

    @property
    def nr_keyids(self) -> int:
        """MKTME KeyIDs the hardware offers (1..n); 0 when MKTME is off."""
        if self.keyid_bits == 0:
            return 0
        return min((1 << self.keyid_bits) - 1, self.max_keys)

    @property
    def keyid_limit(self) -> int:
        """``max_keyids_per_uid``, its default resolved."""
        if self.max_keyids_per_uid is not None:
            return self.max_keyids_per_uid
        return (self.nr_keyids + 1) // 2

    @property
    def page_limit(self) -> int:
        """``max_pages_per_uid``, its default resolved."""
        if self.max_pages_per_uid is not None:
            return self.max_pages_per_uid
        return self.phys_mem // PAGE_SIZE // 2

    def replace(self, **changes: object) -> MachineConfig:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def from_options(cls, base: MachineConfig | None = None, **options: object) -> MachineConfig:
        """Options as a person or a command line gives them -> a checked config.

        Sizes may be strings (``phys_mem="64M"``), ``algorithms`` a
        comma-separated string; ``seed=None`` means random. An unknown option
        is a ``TypeError`` naming the known ones; a bad value a ``ValueError``.
        """
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise TypeError(f"unknown option {', '.join(unknown)} (known: {', '.join(known)})")
        values = {name: _normalize(name, value) for name, value in options.items()}
        return (base or cls()).replace(**values)


def _normalize(name: str, value: object) -> object:
    sizes = (
        "phys_mem",
        "cache_size",
        "tme_exclude_base",
        "tme_exclude_size",
        "swap",
        "tweak_cache",
    )
    if name in sizes and isinstance(value, str):
        return parse_size(value)
    if name == "algorithms" and isinstance(value, str | tuple | list):
        parts = value.split(",") if isinstance(value, str) else value
        return tuple(str(part).strip() for part in parts)
    return value
