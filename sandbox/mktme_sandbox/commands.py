"""The text commands written to control files, parsed into typed calls.

Grammar (docs/spec.md 4.4): ``mmap ADDR LEN PROT [keyid=N] [populate]``,
``munmap ADDR LEN``, ``mprotect ADDR LEN PROT``,
``encrypt_mprotect ADDR LEN PROT keyid=N``,
``madvise ADDR LEN mergeable|unmergeable|hugepage|dontneed|pageout``,
``mlock ADDR LEN``, ``munlock ADDR LEN``, ``mremap OLD OLDLEN NEWLEN [NEWADDR]``,
``fork CHILD``, ``mbind ADDR LEN NODES``, ``migrate ADDR LEN NODE``,
``uffd register|unregister ADDR LEN``, ``uffd copy DST SRC LEN``,
``uffd zeropage DST LEN``; for ``mm/snapshot``
``save|restore|coldboot /ABSOLUTE/PATH``. ADDR is hex
(``0x...``), LEN decimal or hex with an optional K/M/G suffix, PROT one of
``--- r-- rw- r-x rwx`` (or ``none r rw rx rwx``). Anything else is EINVAL
with a reason that shows the expected form.
"""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass
from typing import ClassVar

from mktme_sandbox.config import parse_decimal, parse_hex, parse_size
from mktme_sandbox.errors import fail
from mktme_sandbox.kernel.mmap import ADVICE, PROTS
from mktme_sandbox.kernel.vma import VM

__all__ = [
    "COMMAND_MAX",
    "USAGE",
    "EncryptMprotect",
    "Fork",
    "Madvise",
    "Mbind",
    "Migrate",
    "Mlock",
    "Mmap",
    "Mprotect",
    "Mremap",
    "Munlock",
    "Munmap",
    "SpaceCommand",
    "UffdCopy",
    "UffdRegister",
    "UffdUnregister",
    "UffdZeropage",
    "decode_command",
    "parse_space_command",
]

USAGE = {
    "mmap": "mmap ADDR LEN PROT [keyid=N] [populate]",
    "munmap": "munmap ADDR LEN",
    "mprotect": "mprotect ADDR LEN PROT",
    "encrypt_mprotect": "encrypt_mprotect ADDR LEN PROT keyid=N",
    "madvise": f"madvise ADDR LEN {'|'.join(ADVICE)}",
    "mlock": "mlock ADDR LEN",
    "munlock": "munlock ADDR LEN",
    "mremap": "mremap OLD OLDLEN NEWLEN [NEWADDR]",
    "fork": "fork CHILD",
    "mbind": "mbind ADDR LEN NODES",
    "migrate": "migrate ADDR LEN NODE",
    "uffd": "uffd register ADDR LEN | uffd unregister ADDR LEN | uffd copy DST SRC LEN"
    " | uffd zeropage DST LEN",
}


@dataclass(frozen=True)
class Mmap:
    addr: int
    length: int
    prot: VM
    keyid: int = 0
    populate: bool = False
    op: ClassVar[str] = "mmap"


@dataclass(frozen=True)
class Munmap:
    addr: int
    length: int
    op: ClassVar[str] = "munmap"


@dataclass(frozen=True)
class Mprotect:
    addr: int
    length: int
    prot: VM
    op: ClassVar[str] = "mprotect"


@dataclass(frozen=True)
class EncryptMprotect:
    addr: int
    length: int
    prot: VM
    keyid: int
    op: ClassVar[str] = "encrypt_mprotect"


@dataclass(frozen=True)
class Madvise:
    addr: int
    length: int
    advice: str
    op: ClassVar[str] = "madvise"


@dataclass(frozen=True)
class Mlock:
    addr: int
    length: int
    op: ClassVar[str] = "mlock"


@dataclass(frozen=True)
class Munlock:
    addr: int
    length: int
    op: ClassVar[str] = "munlock"


@dataclass(frozen=True)
class Mremap:
    addr: int
    old_len: int
    new_len: int
    new_addr: int | None = None  # MREMAP_MAYMOVE | MREMAP_FIXED when given
    op: ClassVar[str] = "mremap"


@dataclass(frozen=True)
class Fork:
    child: str
    op: ClassVar[str] = "fork"


@dataclass(frozen=True)
class Mbind:
    addr: int
    length: int
    nodes: str  # a nodelist: N, N,M or N-M (checked against the machine's nodes)
    op: ClassVar[str] = "mbind"


@dataclass(frozen=True)
class Migrate:
    addr: int
    length: int
    node: int
    op: ClassVar[str] = "migrate"


@dataclass(frozen=True)
class UffdRegister:
    addr: int
    length: int
    op: ClassVar[str] = "uffd"  # register: UFFDIO_REGISTER, UFFDIO_REGISTER_MODE_MISSING


@dataclass(frozen=True)
class UffdUnregister:
    addr: int
    length: int
    op: ClassVar[str] = "uffd"  # unregister: UFFDIO_UNREGISTER


@dataclass(frozen=True)
class UffdCopy:
    dst: int
    src: int
    length: int
    op: ClassVar[str] = "uffd"  # copy: UFFDIO_COPY


@dataclass(frozen=True)
class UffdZeropage:
    dst: int
    length: int
    op: ClassVar[str] = "uffd"  # zeropage: UFFDIO_ZEROPAGE


# One dataclass per command of spaces/NAME/ctl; Machine.space_command matches
# on them exhaustively (assert_never), so a new one cannot fall into another.
SpaceCommand = (
    Mmap
    | Munmap
    | Mprotect
    | EncryptMprotect
    | Madvise
    | Mlock
    | Munlock
    | Mremap
    | Fork
    | Mbind
    | Migrate
    | UffdRegister
    | UffdUnregister
    | UffdCopy
    | UffdZeropage
)


_NODELIST = re.compile(r"[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*")
COMMAND_MAX = 4096  # one page, as a sysfs or procfs store takes at most PAGE_SIZE


def decode_command(command: str | bytes, what: str) -> str:
    """Bytes from a write -> one stripped line (EINVAL for non-UTF-8 or several).

    A write longer than ``COMMAND_MAX`` bytes is refused whole: the kernel
    splits a long write into several requests, and each must not become a
    command of its own (``type=clear`` then another key in one ``write``).
    """
    size = len(command) if isinstance(command, bytes) else len(command.encode())
    if size > COMMAND_MAX:
        fail(errno.EINVAL, f"{what}: a command is at most {COMMAND_MAX} bytes, not {size}")
    if isinstance(command, bytes):
        try:
            command = command.decode()
        except UnicodeDecodeError:
            fail(errno.EINVAL, f"{what}: the command is not UTF-8 text")
    text = command.strip()
    if "\n" in text or "\0" in text:
        fail(errno.EINVAL, f"{what}: one command per write")
    if not text:
        fail(errno.EINVAL, f"{what}: empty command")
    return text


_RANGE_COMMANDS: dict[str, type[Munmap | Mlock | Munlock]] = {
    "munmap": Munmap,
    "mlock": Mlock,
    "munlock": Munlock,
}


def parse_space_command(text: str) -> SpaceCommand:
    words = text.split()
    op, args = words[0], words[1:]
    if op not in USAGE:
        fail(errno.EINVAL, f"unknown command {op!r} (one of {', '.join(USAGE)})")
    if op == "fork":
        if len(args) != 1:
            fail(errno.EINVAL, f"fork: usage: {USAGE[op]}")
        return Fork(args[0])
    if op == "uffd":
        return _uffd(args)
    if len(args) < 2:
        fail(errno.EINVAL, f"{op}: usage: {USAGE[op]}")
    addr, length = _addr(op, args[0]), _length(op, args[1])
    rest = args[2:]
    if op in _RANGE_COMMANDS:
        _no_more(op, rest)
        return _RANGE_COMMANDS[op](addr, length)
    if op == "mremap":
        if not 1 <= len(rest) <= 2:
            fail(errno.EINVAL, f"mremap: usage: {USAGE[op]}")
        new_addr = _addr(op, rest[1]) if len(rest) == 2 else None
        return Mremap(addr, length, _length(op, rest[0]), new_addr)
    if op == "madvise":
        if len(rest) != 1 or rest[0] not in ADVICE:
            fail(errno.EINVAL, f"madvise: usage: {USAGE[op]}")
        return Madvise(addr, length, rest[0])
    if op == "mbind":
        if len(rest) != 1 or not _NODELIST.fullmatch(rest[0]):
            fail(errno.EINVAL, f"mbind: usage: {USAGE[op]} (NODES: N, N,M or N-M)")
        return Mbind(addr, length, rest[0])
    if op == "migrate":
        node = parse_decimal(rest[0]) if len(rest) == 1 else None
        if node is None:
            fail(errno.EINVAL, f"migrate: usage: {USAGE[op]} (NODE: one node number, 0, 1, ...)")
        return Migrate(addr, length, node)
    if not rest:
        fail(errno.EINVAL, f"{op}: usage: {USAGE[op]}")
    prot = _prot(op, rest[0])
    return _with_options(op, addr, length, prot, rest[1:])


_UFFD_RANGES: dict[str, type[UffdRegister | UffdUnregister | UffdZeropage]] = {
    "register": UffdRegister,
    "unregister": UffdUnregister,
    "zeropage": UffdZeropage,
}


def _uffd(args: list[str]) -> SpaceCommand:
    """``uffd register|unregister|zeropage ADDR LEN`` or ``uffd copy DST SRC LEN``."""
    sub = args[0] if args else ""
    wanted = 3 if sub == "copy" else 2
    if (sub != "copy" and sub not in _UFFD_RANGES) or len(args) != wanted + 1:
        fail(errno.EINVAL, f"uffd: usage: {USAGE['uffd']}")
    op = f"uffd {sub}"
    addr, length = _addr(op, args[1]), _length(op, args[-1])
    if sub == "copy":
        return UffdCopy(addr, _addr(op, args[2]), length)
    return _UFFD_RANGES[sub](addr, length)


def _with_options(op: str, addr: int, length: int, prot: VM, words: list[str]) -> SpaceCommand:
    allowed = {"mmap": {"keyid", "populate"}, "encrypt_mprotect": {"keyid"}}.get(op, set())
    keyid, populate, seen = 0, False, set()
    for word in words:
        name, eq, value = word.partition("=")
        if name not in allowed or name in seen or (name == "keyid") != bool(eq):
            fail(errno.EINVAL, f"{op}: unexpected {word!r}; usage: {USAGE[op]}")
        seen.add(name)
        if name == "keyid":
            keyid = _keyid(op, value)
        else:
            populate = True
    if op == "mmap":
        return Mmap(addr, length, prot, keyid, populate)
    if op == "mprotect":
        return Mprotect(addr, length, prot)
    if "keyid" not in seen:
        fail(errno.EINVAL, f"encrypt_mprotect: keyid=N is required; usage: {USAGE[op]}")
    return EncryptMprotect(addr, length, prot, keyid)


@dataclass(frozen=True)
class Wbinvd:
    op: ClassVar[str] = "wbinvd"


@dataclass(frozen=True)
class Clflush:
    pa: int
    keyid: int = 0
    op: ClassVar[str] = "clflush"


CacheCommand = Wbinvd | Clflush


CACHE_USAGE = "wbinvd | clflush PA [keyid=N]"


def parse_cache_command(text: str) -> CacheCommand:
    """``hw/cache``: ``wbinvd`` or ``clflush PA [keyid=N]`` (PA ``0x`` hex)."""
    words = text.split()
    if words == ["wbinvd"]:
        return Wbinvd()
    if words[0] != "clflush" or not 2 <= len(words) <= 3:
        fail(errno.EINVAL, f"cache: usage: {CACHE_USAGE}")
    pa = _hex("clflush", "PA", words[1], "0x3000")
    keyid = 0
    if len(words) == 3:
        name, _, value = words[2].partition("=")
        if name != "keyid":
            fail(errno.EINVAL, f"clflush: expected keyid=N, not {words[2]!r}")
        keyid = _keyid("clflush", value)
    return Clflush(pa, keyid)


@dataclass(frozen=True)
class SnapshotCommand:
    op: str  # "save", "restore" or "coldboot"
    path: str


SNAPSHOT_USAGE = "save PATH | restore PATH | coldboot PATH (PATH absolute)"


def parse_snapshot_command(text: str) -> SnapshotCommand:
    """``mm/snapshot``: ``save|restore|coldboot /absolute/path`` (no spaces in PATH)."""
    words = text.split()
    if len(words) != 2 or words[0] not in ("save", "restore", "coldboot"):
        fail(errno.EINVAL, f"snapshot: usage: {SNAPSHOT_USAGE}")
    if not words[1].startswith("/"):
        fail(errno.EINVAL, f"snapshot: PATH must be absolute, not {words[1]!r}")
    return SnapshotCommand(words[0], words[1])


def expect_word(text: str | bytes, word: str, what: str) -> None:
    """A control file that takes one word (``flush``, ``1``): anything else is EINVAL."""
    if decode_command(text, what) != word:
        fail(errno.EINVAL, f"{what}: the only command is {word!r}")


def parse_switch(text: str | bytes, what: str) -> bool:
    """A 1/0 switch file: ``1`` on, ``0`` off."""
    word = decode_command(text, what)
    if word not in ("0", "1"):
        fail(errno.EINVAL, f"{what}: write 1 (on) or 0 (off)")
    return word == "1"


def _hex(op: str, what: str, word: str, example: str) -> int:
    value = parse_hex(word)
    if value is None:
        fail(errno.EINVAL, f"{op}: {what} must be 0x and hex digits like {example}, not {word!r}")
    return value


def _addr(op: str, word: str) -> int:
    return _hex(op, "ADDR", word, "0x7f0000000000")


def _length(op: str, word: str) -> int:
    try:
        return parse_size(word)
    except ValueError:
        fail(errno.EINVAL, f"{op}: LEN {word!r} is not a length (4096, 0x1000, 64K, 2M)")


def _prot(op: str, word: str) -> VM:
    if word not in PROTS:
        fail(errno.EINVAL, f"{op}: PROT {word!r} is not one of {' '.join(PROTS)}")
    return PROTS[word]


def _keyid(op: str, value: str) -> int:
    keyid = parse_decimal(value)
    if keyid is None:
        fail(errno.EINVAL, f"{op}: keyid={value!r} is not a decimal number")
    return keyid


def _no_more(op: str, rest: list[str]) -> None:
    if rest:
        fail(errno.EINVAL, f"{op}: unexpected {' '.join(rest)!r}; usage: {USAGE[op]}")
