"""client: an mktme-sandbox mount, seen from Python's standard library only.

The one client of a mount: the tools (``mktme_sandbox.tools``: mktme-key,
mktme-map, mktme-peek, mktme-walk, mktme-find), the experiments
(``mktme_sandbox.examples``) and the pytest plugin's ``MountedSandbox`` all
use it. It uses nothing but the files of docs/spec.md section 4, with the formats
written there, so that everything built on it proves the mount is a complete
interface: it imports nothing but the standard library (no numpy, no
cryptography, no FUSE, no click), and ``import mktme_sandbox.client`` loads
none of them (tests/test_client_imports.py).

Its answers are ``Machine``'s for the same question (tests/test_client.py runs
both side by side): ``Mount.check()`` is ``Machine.check()``'s list of violated
invariants, ``Space.translate()`` the physical address and KeyID behind a
virtual address.

What it covers:
- ``Mount``: text and binary files (offsets are addresses), control commands
  (one write per command; a rejection becomes a ``MountError`` that carries the
  errno and the reason the sandbox logged to ``dmesg``), keys, switches, the
  cache, counters, the KeyID layout of the physical address.
- ``Space``: one address space (``spaces/NAME``): ctl, maps/smaps with KeyIDs,
  virtual memory, pagemap, CR3, the TLB.
- ``walk()``: the x86-64 4-level page-table walk done here, from CR3 and the
  table pages read through ``keyids/0/mem``.
- ``find_in()``: a byte pattern in ``dram`` or in a KeyID's view.
- ``fresh_sandbox()``: mount a new sandbox with the ``mktme-sandbox`` command
  and always unmount it (for ``mktme-sandbox examples run-all`` and the tests).

What it leaves out: anything the mount does not show (key material, the cache's
contents), and 5-level paging.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import os
import re
import secrets
import shutil
import struct
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mktme_sandbox.config import parse_size

__all__ = [
    "BLOCK",
    "LINE",
    "PAGE",
    "PAGE_OFFSET",
    "KeyStatus",
    "Kpf",
    "Layout",
    "Level",
    "MemoryPicture",
    "MemoryRun",
    "Mount",
    "MountError",
    "NoFreeKeyID",
    "NotAMount",
    "PagemapEntry",
    "Pte",
    "Space",
    "Translation",
    "UffdMsg",
    "Vma",
    "Walk",
    "errno_name",
    "find_in",
    "memory_picture",
    "mount_from",
    "parse_int",
    "parse_tme",
    "redacted",
    "user_va",
    "walk",
]

PAGE = 4096
LINE = 64  # the cache line and the engine's data unit
BLOCK = 16  # one AES block
PAGE_OFFSET = 0xFFFF888000000000
PAGEMAP_CHUNK = 1 << 16  # pagemap entries per read: 512 KiB
USER_TOP = 1 << 47


class Pte(enum.IntFlag):
    """x86-64 paging-structure entry bits (Intel SDM vol. 3, 4.5)."""

    P = 1 << 0  # present
    RW = 1 << 1  # writable
    US = 1 << 2  # user
    PWT = 1 << 3
    PCD = 1 << 4
    A = 1 << 5  # accessed
    D = 1 << 6  # dirty (leaf only)
    PS = 1 << 7  # page size: 1G in a PDPTE, 2M in a PDE (PAT in a PTE)
    G = 1 << 8  # global
    NX = 1 << 63


PTE_FLAG_MASK = 0xFFF | (0xFFF << 52)  # everything but the address field 51:12


class Kpf(enum.IntEnum):
    """The /proc/kpageflags bits the sandbox sets (include/uapi/linux/kernel-page-flags.h).

    A stdlib copy of ``mktme_sandbox.kernel.proc.KPF``; tests/test_client.py
    keeps the two equal.
    """

    REFERENCED = 2
    UPTODATE = 3
    DIRTY = 4
    LRU = 5
    BUDDY = 10
    MMAP = 11
    ANON = 12
    SWAPBACKED = 14
    COMPOUND_HEAD = 15
    COMPOUND_TAIL = 16
    HUGE = 17
    NOPAGE = 20
    KSM = 21
    THP = 22
    ZERO_PAGE = 24
    PGTABLE = 26
    RESERVED = 32  # PG_reserved: PFN 0 and the zero page
    MLOCKED = 33


PAGEMAP_PRESENT = 1 << 63
PAGEMAP_PFN_MASK = (1 << 55) - 1

MSR_TME_ACTIVATE = 0x982
_SECRET_FIELD = re.compile(r"(?<!\S)(key|tweak)=\S*", re.IGNORECASE)


def redacted(command: str) -> str:
    """``command`` with every ``key=HEX`` and ``tweak=HEX`` shown as ``key=<redacted>``.

    Key material never appears in a message (docs/spec.md section 2), not even a user's own
    rejected key: every error that echoes a command echoes it through here.
    """
    return _SECRET_FIELD.sub(r"\1=<redacted>", command)


class MountError(OSError):
    """A file of the mount answered with an errno.

    ``reason`` is the dmesg line the sandbox appended for it, when there is one.
    """

    def __init__(self, err: int, where: str, reason: str = "") -> None:
        super().__init__(err, os.strerror(err))
        self.where = where
        self.reason = reason

    def __str__(self) -> str:
        text = f"{self.where}: {errno_name(self.errno or 0)} ({self.strerror})"
        return f"{text}: {self.reason}" if self.reason else text


class NotAMount(MountError):
    """The directory is not an mktme-sandbox mount, or a stale one."""

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


class NoFreeKeyID(MountError):
    """Every KeyID is programmed."""


def errno_name(err: int) -> str:
    """``126`` -> ``"ENOKEY"``."""
    return errno.errorcode.get(err, str(err))


def parse_int(text: str) -> int:
    """``"0x1000"``, ``"4096"``, ``"4K"``, ``"16KiB"``, ``"1T"`` -> int (addresses and
    sizes): the grammar of a LEN in control files (docs/spec.md 4.4), ASCII only."""
    try:
        return parse_size(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a number (examples: 0x7f0000000000, 4096, 64K, 2M, 16KiB)"
        ) from None


def user_va(va: int) -> int:
    """``va`` if it is a user-space address (below 2**47), else ``ValueError``."""
    if not 0 <= va < USER_TOP:
        raise ValueError(f"{va:#x} is not a user-space virtual address (0..{USER_TOP - 1:#x})")
    return va


def parse_tme(text: str) -> dict[str, str]:
    """``hw/tme`` text, one ``name value`` per line -> ``{name: value}`` (names lowercased)."""
    out = {}
    for line in text.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2:
            out[parts[0].rstrip(":").lower()] = parts[1].strip()
    return out


def _fields(line: str) -> dict[str, str]:
    """``"keyid=3 state=programmed"`` -> ``{"keyid": "3", "state": "programmed"}``."""
    return dict(word.split("=", 1) for word in line.split() if "=" in word)


@dataclass(frozen=True)
class Layout:
    """Where the KeyID sits in a physical address (docs/spec.md section 2): the top
    ``keyid_bits`` of the ``maxphyaddr`` physical-address bits.

    A stdlib copy of the part of ``mktme_sandbox.kernel.pgtable_types.PteLayout`` a tool
    needs; tests/test_client.py keeps the two in agreement.
    """

    maxphyaddr: int
    keyid_bits: int

    @classmethod
    def from_tme(cls, tme: dict[str, str]) -> Layout:
        """The layout from ``hw/tme``'s ``maxphyaddr``, ``keyid_shift`` and
        ``keyid_mask`` lines; ``ValueError`` if they are missing or disagree."""
        try:
            maxphyaddr, shift, mask = (
                int(tme[name], 0) for name in ("maxphyaddr", "keyid_shift", "keyid_mask")
            )
        except (KeyError, ValueError):
            raise ValueError(
                "no maxphyaddr, keyid_shift and keyid_mask lines (a sandbox older than the tools?)"
            ) from None
        layout = cls(maxphyaddr, maxphyaddr - shift if mask else 0)  # mktme_disable(): 0 and 0
        if layout.keyid_mask != mask:
            raise ValueError(f"keyid_mask {mask:#x} is not bits {shift}..{maxphyaddr - 1}")
        return layout

    @property
    def keyid_shift(self) -> int:
        """0 without KeyID bits, as Linux's ``mktme_disable()`` leaves it."""
        return self.maxphyaddr - self.keyid_bits if self.keyid_bits else 0

    @property
    def address_mask(self) -> int:
        """The physical-address bits of an entry below the KeyID."""
        return (1 << (self.maxphyaddr - self.keyid_bits)) - 1

    @property
    def keyid_mask(self) -> int:
        return ((1 << self.keyid_bits) - 1) << self.keyid_shift

    def split(self, entry: int) -> tuple[int, int]:
        """A paging entry -> (physical address of its frame, KeyID in it)."""
        address = entry & ~PTE_FLAG_MASK & ((1 << self.maxphyaddr) - 1)
        return address & ~self.keyid_mask, (address & self.keyid_mask) >> self.keyid_shift

    def with_keyid(self, entry: int, keyid: int) -> int:
        """The same entry with its KeyID bits replaced."""
        return (entry & ~self.keyid_mask) | (keyid << self.keyid_shift)


@dataclass(frozen=True)
class KeyStatus:
    """One line of ``keys/N``."""

    keyid: int
    state: str
    fields: dict[str, str]
    line: str

    @property
    def programmed(self) -> bool:
        return self.state == "programmed"

    @property
    def type(self) -> str:
        return self.fields.get("type", "-")


@dataclass(frozen=True)
class Vma:
    """One VMA of ``smaps``: the maps line and the fields under it."""

    start: int
    end: int
    perms: str
    name: str
    keyid: int | None
    fields: dict[str, str] = field(default_factory=dict)

    def __contains__(self, va: object) -> bool:
        return isinstance(va, int) and self.start <= va < self.end

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class PagemapEntry:
    """One 64-bit pagemap entry."""

    va: int
    raw: int

    @property
    def present(self) -> bool:
        return bool(self.raw & PAGEMAP_PRESENT)

    @property
    def pfn(self) -> int:
        return self.raw & PAGEMAP_PFN_MASK

    @property
    def pa(self) -> int:
        return self.pfn * PAGE + self.va % PAGE


@dataclass(frozen=True)
class UffdMsg:
    """One line of ``spaces/NAME/uffd``: a missing fault waiting on the space's
    userfaultfd (``struct uffd_msg``, event ``UFFD_EVENT_PAGEFAULT`` = 0x12)."""

    event: int
    flags: int
    address: int

    @property
    def write(self) -> bool:
        """``UFFD_PAGEFAULT_FLAG_WRITE``: the access was a write."""
        return bool(self.flags & 1)

    @classmethod
    def parse(cls, line: str) -> UffdMsg:
        fields = dict(word.split("=", 1) for word in line.split())
        return cls(*(int(fields[name], 16) for name in ("event", "flags", "address")))


@dataclass(frozen=True)
class Translation(PagemapEntry):
    """A virtual address translated: its pagemap entry and its page's KeyID."""

    keyid: int | None = None


_MAPS_LINE = re.compile(r"^([0-9a-fA-F]+)-([0-9a-fA-F]+)\s+(\S{4})\s+\S+\s+\S+\s+\S+\s*(.*)$")


def parse_smaps(text: str) -> list[Vma]:
    """Parse /proc/PID/smaps (or maps) text; ``keyid`` from the ``KeyID:`` line."""
    vmas: list[Vma] = []
    header: re.Match[str] | None = None
    fields: dict[str, str] = {}

    def close() -> None:
        if header is not None:
            keyid = fields.get("KeyID")
            vmas.append(
                Vma(
                    start=int(header.group(1), 16),
                    end=int(header.group(2), 16),
                    perms=header.group(3),
                    name=header.group(4).strip(),
                    keyid=int(keyid.split()[0], 0) if keyid else None,
                    fields=dict(fields),
                )
            )

    for line in text.splitlines():
        m = _MAPS_LINE.match(line)
        if m:
            close()
            header, fields = m, {}
        elif ":" in line:
            name, value = line.split(":", 1)
            fields[name.strip()] = value.strip()
    close()
    return vmas


class Mount:
    """An mktme-sandbox mount (docs/spec.md section 4).

    ``NotAMount`` when ``root`` is not one; every refused file operation
    raises ``MountError`` with the errno and the reason the sandbox logged.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        _require_mount(self.root)
        self._layout: Layout | None = None

    # -- files ------------------------------------------------------------
    @property
    def path(self) -> Path:
        """The mount point."""
        return self.root

    def file(self, rel: str) -> Path:
        return self.root / rel

    def read_text(self, rel: str) -> str:
        try:
            return (self.root / rel).read_text()
        except OSError as e:
            raise self._error(e, rel) from None

    def write_ctl(self, rel: str, command: str) -> None:
        """One control command, one ``write(2)`` (like ``echo CMD > file``).

        A rejection raises ``MountError`` with the errno of docs/spec.md 7, the
        command (its ``key=`` and ``tweak=`` values redacted) and the dmesg line
        with the reason.
        """
        data = (command.rstrip("\n") + "\n").encode()
        try:
            fd = os.open(self.root / rel, os.O_WRONLY)
            try:
                written = os.write(fd, data)
            finally:
                os.close(fd)
        except OSError as e:
            raise self._error(e, rel, command) from None
        if written != len(data):
            raise MountError(errno.EIO, rel, f"short write ({written} of {len(data)} bytes)")

    def read_bytes(self, rel: str, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (an address); short only at the end of the file."""
        chunks = []
        with self._open(rel, os.O_RDONLY, offset) as fd:
            while length > 0:
                chunk = os.pread(fd, min(length, 1 << 20), offset)
                if not chunk:
                    break
                chunks.append(chunk)
                offset += len(chunk)
                length -= len(chunk)
        return b"".join(chunks)

    def write_bytes(self, rel: str, offset: int, data: bytes) -> None:
        """Write all of ``data`` at ``offset`` (an address) of a binary file."""
        with self._open(rel, os.O_WRONLY, offset) as fd:
            done = 0
            while done < len(data):
                done += os.pwrite(fd, data[done:], offset + done)

    @contextlib.contextmanager
    def _open(self, rel: str, flags: int, offset: int) -> Iterator[int]:
        """A descriptor of ``rel`` for I/O at ``offset``; its failures as ``MountError``,
        an offset beyond ``off_t`` as ``ValueError``."""
        try:
            fd = os.open(self.root / rel, flags)
            try:
                yield fd
            finally:
                os.close(fd)
        except OSError as e:
            raise self._error(e, f"{rel} @ {offset:#x}") from None
        except OverflowError:
            raise _beyond_offsets(rel, offset) from None

    def _error(self, e: OSError, where: str, command: str = "") -> MountError:
        """Turn an OSError into a MountError with the sandbox's dmesg reason."""
        err = e.errno or errno.EIO
        if err == errno.ENOTCONN:
            return _stale(self.root)
        label = f"{where}: {redacted(command.strip())!r} rejected" if command else where
        reason = self.dmesg_reason(where.split(" @ ")[0], err)
        if err == errno.ENOENT and not reason:
            reason = "no such file in the mount"
        return MountError(err, label, reason)

    def dmesg(self) -> str:
        """The kernel log."""
        return self.read_text("dmesg")

    def dmesg_reason(self, rel: str, err: int) -> str:
        """The last dmesg line "PATH: ERRNO: reason" for ``rel`` and ``err``.

        The sandbox logs one such line per rejection; a refusal by the kernel's
        own permission check (EACCES on the file mode) logs none.
        """
        try:
            lines = (self.root / "dmesg").read_text().splitlines()
        except OSError:
            return ""
        tag = f"{rel.strip('/')}: {errno_name(err)}"
        return next((ln.strip() for ln in reversed(lines[-200:]) if tag in ln), "")

    # -- machine facts ----------------------------------------------------
    @property
    def phys_mem(self) -> int:
        size = os.stat(self.root / "dram").st_size
        if size:
            return size
        return os.stat(self.root / "mm/page_keyid").st_size // 8 * PAGE

    def tme(self) -> dict[str, str]:
        """``hw/tme`` as ``{name: value}`` (names lowercased)."""
        return parse_tme(self.read_text("hw/tme"))

    def rdmsr(self, address: int) -> int:
        return int.from_bytes(self.read_bytes("hw/msr", address, 8), "little")

    @property
    def layout(self) -> Layout:
        """The KeyID layout, from ``hw/tme``'s ``maxphyaddr``, ``keyid_shift``
        and ``keyid_mask`` lines."""
        if self._layout is None:
            try:
                self._layout = Layout.from_tme(self.tme())
            except ValueError as e:
                raise MountError(errno.EIO, "hw/tme", str(e)) from None
        return self._layout

    def algorithms(self) -> list[str]:
        """Activated algorithms (IA32_TME_ACTIVATE bits 63:48), strongest last."""
        algs = self.rdmsr(MSR_TME_ACTIVATE) >> 48
        return [n for bit, n in ((0, "aes-xts-128"), (2, "aes-xts-256")) if algs >> bit & 1]

    # -- keys -------------------------------------------------------------
    def keyids(self) -> list[int]:
        """The MKTME KeyIDs of ``keys/`` (1..nr_keyids; empty when MKTME is off)."""
        return sorted(int(n) for n in self._listdir("keys") if n.isdigit())

    def key(self, keyid: int) -> KeyStatus:
        """``keys/N`` parsed; ``.line`` is ``Machine.key_status(N)`` without its newline."""
        line = self.read_text(f"keys/{keyid}").strip()
        f = _fields(line)
        return KeyStatus(keyid=keyid, state=f.get("state", "?"), fields=f, line=line)

    def key_table(self) -> list[KeyStatus]:
        return [self.key(k) for k in self.keyids()]

    def program_key(self, keyid: int, payload: str = "type=cpu algorithm=aes-xts-128") -> None:
        """Write a key command to ``keys/KEYID``."""
        self.write_ctl(f"keys/{keyid}", payload)

    def add_key(self, payload: str) -> int:
        """Program ``payload`` on the first free KeyID and return it.

        A KeyID taken by someone else between the read and the write answers
        EACCES or EBUSY; the next free one is tried.
        """
        last: MountError | None = None
        for status in self.key_table():
            if status.programmed:
                continue
            try:
                self.program_key(status.keyid, payload)
                return status.keyid
            except MountError as e:
                if (
                    e.errno not in (errno.EACCES, errno.EBUSY)
                    or not self.key(status.keyid).programmed
                ):
                    raise  # not taken by someone else meanwhile: the payload was refused
                last = e
        if last is not None:
            raise last
        raise NoFreeKeyID(errno.ENOKEY, "keys/", "no free KeyID")

    def clear_key(self, keyid: int) -> None:
        self.write_ctl(f"keys/{keyid}", "type=clear")

    # -- switches and counters -------------------------------------------
    def flag(self, rel: str) -> bool:
        return self.read_text(rel).strip() == "1"

    def set_flag(self, rel: str, on: bool) -> None:
        self.write_ctl(rel, "1" if on else "0")

    def mitigations(self) -> dict[str, bool]:
        names = sorted(self._listdir("mm/mitigations"))
        return {n: self.flag(f"mm/mitigations/{n}") for n in names}

    def vmstat(self) -> dict[str, int]:
        """``mm/vmstat`` as ``{counter: value}`` (``Machine.vmstat_counts()``)."""
        out = {}
        for line in self.read_text("mm/vmstat").splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].lstrip("-").isdigit():
                out[parts[0]] = int(parts[1])
        return out

    def check(self) -> list[str]:
        """``mm/check`` as ``Machine.check()`` gives it: the violated invariants,
        one string each; ``[]`` when every invariant holds."""
        lines = [ln for ln in self.read_text("mm/check").splitlines() if ln.strip()]
        return [] if lines == ["ok"] else lines

    # -- cache ------------------------------------------------------------
    def wbinvd(self) -> None:
        self.write_ctl("hw/cache", "wbinvd")

    def clflush(self, pa: int, length: int, keyid: int) -> None:
        """CLFLUSH every line of [pa, pa+length) tagged ``keyid``."""
        for line in range(pa - pa % LINE, pa + length, LINE):
            self.write_ctl("hw/cache", f"clflush {line:#x} keyid={keyid}")

    # -- physical memory --------------------------------------------------
    def dram(self, pa: int, length: int) -> bytes:
        return self.read_bytes("dram", pa, length)

    def phys(self, keyid: int, pa: int, length: int) -> bytes:
        return self.read_bytes(f"keyids/{keyid}/mem", pa, length)

    def page_keyid(self, pfn: int) -> int:
        return int.from_bytes(self.read_bytes("mm/page_keyid", pfn * 8, 8), "little")

    def page_keyids(self) -> list[int]:
        data = self.read_bytes("mm/page_keyid", 0, self.phys_mem // PAGE * 8)
        return [k for (k,) in struct.iter_unpack("<Q", data)]

    def kpageflags(self, pfn: int) -> int:
        return int.from_bytes(self.read_bytes("mm/kpageflags", pfn * 8, 8), "little")

    def keyid_map(self) -> MemoryPicture:
        """``mm/keyid_map.svg``, decoded: every run of pages of one KeyID and class."""
        return memory_picture(self.read_text("mm/keyid_map.svg"))

    # -- spaces -----------------------------------------------------------
    def spaces(self) -> list[Space]:
        return [Space(self, n) for n in sorted(self._listdir("spaces"))]

    def space(self, name: str) -> Space:
        if not (self.root / "spaces" / name).is_dir():
            raise MountError(errno.ENOENT, f"spaces/{name}", "no such address space")
        return Space(self, name)

    def create_space(self, name: str) -> Space:
        """``mkdir spaces/NAME``."""
        try:
            os.mkdir(self.root / "spaces" / name)
        except OSError as e:
            raise self._error(e, f"spaces/{name}") from None
        return Space(self, name)

    def new_space(self, prefix: str) -> Space:
        """``mkdir spaces/PREFIX-PID-RANDOM``: a name nobody else uses."""
        return self.create_space(f"{prefix}-{os.getpid()}-{secrets.token_hex(2)}")

    def map(
        self,
        space: str | Space | os.PathLike[str],
        addr: int | str,
        length: int | str,
        prot: str = "rw-",
        keyid: int | None = None,
        populate: bool = False,
    ) -> None:
        """``mmap ADDR LEN PROT [keyid=N] [populate]`` into ``spaces/SPACE/ctl``
        (``addr`` an int or hex text, ``length`` an int or text such as ``"2M"``)."""
        name = space.name if isinstance(space, Space) else Path(space).name
        Space(self, name).mmap(addr, length, prot, keyid, populate)

    def _listdir(self, rel: str) -> list[str]:
        try:
            return os.listdir(self.root / rel)
        except OSError as e:
            raise self._error(e, rel) from None


def _require_mount(root: Path) -> None:
    """``NotAMount`` unless ``keys/`` and ``dram`` are there and answer."""
    try:
        if (root / "keys").is_dir() and (root / "dram").exists():
            return
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise _stale(root) from None
    missing = not root.exists()
    raise NotAMount(
        errno.ENOENT,
        str(root),
        ("no such directory" if missing else "not an mktme-sandbox mount (no keys/ or dram)")
        + "; mount one with `mktme-sandbox mount DIR`",
    )


def _stale(root: Path) -> NotAMount:
    """The mount's daemon is gone: every access answers ENOTCONN."""
    return NotAMount(
        errno.ENOTCONN,
        str(root),
        f"a stale mount (its daemon is gone); clean it up with `mktme-sandbox umount {root}`",
    )


def _beyond_offsets(rel: str, offset: int) -> ValueError:
    """An offset no file offset can hold (``off_t`` is signed 64-bit)."""
    return ValueError(f"{rel}: address {offset:#x} is beyond the largest file offset (2**63-1)")


class Space:
    """``spaces/NAME``: one address space."""

    def __init__(self, mount: Mount, name: str) -> None:
        self.mount = mount
        self.name = name
        self.rel = f"spaces/{name}"

    def __repr__(self) -> str:
        return f"Space({self.name!r})"

    @property
    def path(self) -> Path:
        """The space's directory."""
        return self.mount.root / self.rel

    def ctl(self, command: str) -> None:
        self.mount.write_ctl(f"{self.rel}/ctl", command)

    def mmap(
        self,
        va: int | str,
        length: int | str,
        prot: str = "rw-",
        keyid: int | None = None,
        populate: bool = False,
    ) -> None:
        """``mmap VA LEN PROT [keyid=K] [populate]`` (``va`` an int or hex text,
        ``length`` an int or text such as ``64K``)."""
        cmd = (
            f"mmap {va:#x} {length} {prot}" if isinstance(va, int) else f"mmap {va} {length} {prot}"
        )
        if keyid is not None:
            cmd += f" keyid={keyid}"
        if populate:
            cmd += " populate"
        self.ctl(cmd)

    def munmap(self, va: int, length: int) -> None:
        self.ctl(f"munmap {va:#x} {length}")

    def fork(self, child: str) -> Space:
        """``fork CHILD``: a new space sharing this one's pages copy-on-write."""
        self.ctl(f"fork {child}")
        return Space(self.mount, child)

    def mremap(self, va: int, old_len: int, new_len: int, new_va: int | None = None) -> None:
        """``mremap OLD OLDLEN NEWLEN [NEWADDR]``."""
        self.ctl(
            f"mremap {va:#x} {old_len} {new_len}" + ("" if new_va is None else f" {new_va:#x}")
        )

    def mlock(self, va: int, length: int) -> None:
        self.ctl(f"mlock {va:#x} {length}")

    def munlock(self, va: int, length: int) -> None:
        self.ctl(f"munlock {va:#x} {length}")

    def uffd_register(self, va: int, length: int) -> None:
        """``uffd register ADDR LEN``: missing faults in the range wait for
        ``uffd_copy`` or ``uffd_zeropage`` (EAGAIN until then)."""
        self.ctl(f"uffd register {va:#x} {length}")

    def uffd_unregister(self, va: int, length: int) -> None:
        self.ctl(f"uffd unregister {va:#x} {length}")

    def uffd_copy(self, dst: int, src: int, length: int) -> None:
        """``uffd copy DST SRC LEN`` (UFFDIO_COPY): new pages of the VMA's KeyID."""
        self.ctl(f"uffd copy {dst:#x} {src:#x} {length}")

    def uffd_zeropage(self, dst: int, length: int) -> None:
        """``uffd zeropage DST LEN`` (UFFDIO_ZEROPAGE)."""
        self.ctl(f"uffd zeropage {dst:#x} {length}")

    def uffd_pending(self) -> list[UffdMsg]:
        """The missing faults ``spaces/NAME/uffd`` lists, by address."""
        text = self.mount.read_text(f"{self.rel}/uffd")
        return [UffdMsg.parse(line) for line in text.splitlines()]

    def smaps(self) -> list[Vma]:
        return parse_smaps(self.mount.read_text(f"{self.rel}/smaps"))

    def maps(self) -> list[Vma]:
        return parse_smaps(self.mount.read_text(f"{self.rel}/maps"))

    def vma(self, va: int) -> Vma | None:
        return next((v for v in self.smaps() if va in v), None)

    def read(self, va: int, length: int) -> bytes:
        return self.mount.read_bytes(f"{self.rel}/mem", va, length)

    def write(self, va: int, data: bytes) -> None:
        self.mount.write_bytes(f"{self.rel}/mem", va, data)

    def pagemap(self, va: int, pages: int = 1) -> list[PagemapEntry]:
        """The pagemap entries of ``pages`` pages from ``va``'s page on;
        ``ValueError`` for an address beyond user space."""
        user_va(va)
        first = va - va % PAGE
        data = self.mount.read_bytes(f"{self.rel}/pagemap", first // PAGE * 8, pages * 8)
        entries = [r for (r,) in struct.iter_unpack("<Q", data)]
        return [
            PagemapEntry(va if i == 0 else first + i * PAGE, raw) for i, raw in enumerate(entries)
        ]

    def present(self, start: int, end: int) -> Iterator[PagemapEntry]:
        """The pagemap entries of the present pages in [start, end), read in
        chunks of ``PAGEMAP_CHUNK`` entries; a chunk of only absent pages is
        skipped at C speed, so a huge, mostly untouched VMA costs little memory."""
        va = user_va(start) - start % PAGE
        while va < end:
            pages = min(PAGEMAP_CHUNK, -(-(end - va) // PAGE))
            data = self.mount.read_bytes(f"{self.rel}/pagemap", va // PAGE * 8, pages * 8)
            if data.count(0) != len(data):
                for i, (raw,) in enumerate(struct.iter_unpack("<Q", data)):
                    if raw & PAGEMAP_PRESENT:
                        yield PagemapEntry(va + i * PAGE, raw)
            va += pages * PAGE

    def translate(self, va: int) -> Translation:
        """Where ``va`` lives: its pagemap entry, the physical address (``.pa``)
        and the KeyID its page was allocated for (``mm/page_keyid``); ``keyid``
        is None when the page is not present. The PTE's own KeyID bits, which
        the MMU uses, come from ``walk()``."""
        (entry,) = self.pagemap(va)
        keyid = self.mount.page_keyid(entry.pfn) if entry.present else None
        return Translation(entry.va, entry.raw, keyid)

    def cr3(self) -> int:
        return int(self.mount.read_text(f"{self.rel}/cr3").split()[0], 16)

    def flush_tlb(self) -> None:
        self.mount.write_ctl(f"{self.rel}/tlb", "flush")

    def destroy(self) -> None:
        try:
            os.rmdir(self.mount.root / self.rel)
        except OSError as e:
            raise self.mount._error(e, self.rel) from None


# -- the page-table walk ----------------------------------------------------

LEVELS = (("PML4", 39), ("PDPT", 30), ("PD", 21), ("PT", 12))


@dataclass(frozen=True)
class Level:
    """One step of a walk: which entry was read and what it says."""

    name: str
    index: int
    table: int  # physical address of the table page
    entry: int
    frame: int  # physical address in the entry, KeyID bits removed
    keyid: int

    @property
    def entry_pa(self) -> int:
        return self.table + self.index * 8

    @property
    def present(self) -> bool:
        return bool(self.entry & Pte.P)

    @property
    def leaf(self) -> bool:
        return self.name == "PT" or (self.name in ("PDPT", "PD") and bool(self.entry & Pte.PS))

    def flags(self) -> list[str]:
        return [str(f.name) for f in Pte if self.entry & f]


@dataclass(frozen=True)
class Walk:
    """The levels read for one virtual address, and where they lead."""

    va: int
    cr3: int
    layout: Layout
    levels: list[Level]

    @property
    def leaf(self) -> Level | None:
        last = self.levels[-1] if self.levels else None
        return last if last is not None and last.present and last.leaf else None

    @property
    def page_size(self) -> int:
        return {"PT": 1 << 12, "PD": 1 << 21, "PDPT": 1 << 30}[self.levels[-1].name]

    @property
    def pa(self) -> int | None:
        leaf = self.leaf
        return None if leaf is None else leaf.frame + self.va % self.page_size

    @property
    def keyid(self) -> int | None:
        leaf = self.leaf
        return None if leaf is None else leaf.keyid


def walk(space: Space, va: int) -> Walk:
    """Walk the 4-level tables of ``space`` for ``va``, reading ``keyids/0/mem``;
    ``ValueError`` for an address beyond user space."""
    user_va(va)
    mount = space.mount
    layout = mount.layout
    cr3 = space.cr3()
    table = cr3 & ~0xFFF & layout.address_mask
    levels: list[Level] = []
    for name, shift in LEVELS:
        index = (va >> shift) & 0x1FF
        entry = int.from_bytes(mount.phys(0, table + index * 8, 8), "little")
        frame, keyid = layout.split(entry)
        level = Level(name, index, table, entry, frame, keyid)
        levels.append(level)
        if not level.present or level.leaf:
            break
        table = frame
    return Walk(va, cr3, layout, levels)


# -- searching --------------------------------------------------------------


def runs(pfns: Iterable[int]) -> Iterator[tuple[int, int]]:
    """Sorted PFNs -> (first pfn, count) runs of contiguous pages."""
    start = count = None
    for pfn in sorted(set(pfns)):
        if start is not None and count is not None and pfn == start + count:
            count += 1
            continue
        if start is not None and count is not None:
            yield start, count
        start, count = pfn, 1
    if start is not None and count is not None:
        yield start, count


@dataclass(frozen=True)
class MemoryRun:
    """``pages`` cells from ``pfn`` on, of one KeyID and one class (``used``,
    ``thp``, ``ksm``, ``zero``, ``pgtable``, ``free``): one ``<rect>``."""

    pfn: int
    pages: int
    keyid: int
    kind: str


@dataclass(frozen=True)
class MemoryPicture:
    """``mm/keyid_map.svg`` as data (docs/spec.md 4.3): its runs cover every PFN once."""

    pages: int
    pages_per_cell: int
    runs: tuple[MemoryRun, ...]

    def counts(self) -> dict[int, dict[str, int]]:
        """KeyID -> class -> pages (cells times pages per cell when aggregated)."""
        found: dict[int, dict[str, int]] = {}
        for run in self.runs:
            per_kind = found.setdefault(run.keyid, {})
            per_kind[run.kind] = per_kind.get(run.kind, 0) + run.pages
        return found


def memory_picture(svg: str) -> MemoryPicture:
    """Decode the picture of physical memory (stdlib ``xml.etree``)."""
    import xml.etree.ElementTree as ET

    ns = "{http://www.w3.org/2000/svg}"
    root = ET.fromstring(svg)
    group = root.find(f"{ns}g[@id='pages']")
    if group is None:
        raise ValueError("not a picture of physical memory: no <g id='pages'>")
    runs = []
    for rect in group.iter(f"{ns}rect"):
        keyid_word, kind = rect.attrib["class"].split()
        runs.append(
            MemoryRun(
                int(rect.attrib["data-pfn"]),
                int(rect.attrib["data-pages"]),
                int(keyid_word.removeprefix("keyid-")),
                kind,
            )
        )
    return MemoryPicture(
        int(root.attrib["data-pages"]), int(root.attrib["data-pages-per-cell"]), tuple(runs)
    )


def find_in(
    mount: Mount,
    rel: str,
    pattern: bytes,
    start: int,
    end: int,
    chunk: int = 1 << 20,
    progress: Callable[[int], None] | None = None,
) -> Iterator[int]:
    """Every address in [start, end) of binary file ``rel`` where ``pattern`` begins;
    ``progress(offset)`` after each chunk read, if given."""
    if not pattern:
        raise ValueError("empty pattern")
    overlap = len(pattern) - 1
    offset = start
    while offset < end:
        data = mount.read_bytes(rel, offset, min(chunk + overlap, end - offset))
        if not data:
            break
        limit = min(chunk, len(data))  # matches starting past it come with the next chunk
        hit = data.find(pattern)
        while 0 <= hit < limit:
            yield offset + hit
            hit = data.find(pattern, hit + 1)
        offset += chunk
        if progress is not None:
            progress(min(offset, end))


def mapped_pages(mount: Mount) -> dict[int, list[tuple[str, int, int | None]]]:
    """PFN -> [(space, virtual address, VMA KeyID)] for every present user page."""
    out: dict[int, list[tuple[str, int, int | None]]] = {}
    for space in mount.spaces():
        try:
            vmas = space.smaps()
        except MountError:
            continue  # destroyed meanwhile, or not ours
        for vma in vmas:
            if vma.fields.get("Rss", "").split()[:1] == ["0"]:
                continue  # nothing of it is in memory
            for entry in space.present(vma.start, vma.end):
                out.setdefault(entry.pfn, []).append((space.name, entry.va, vma.keyid))
    return out


def mount_from(value: str | None) -> Mount:
    """The mount named by ``-m`` or ``$MKTME_MNT``; ``NotAMount`` explains what is wrong."""
    root = value or os.environ.get("MKTME_MNT")
    if not root:
        raise NotAMount(errno.EINVAL, "no mountpoint", "give -m MNT or set MKTME_MNT")
    return Mount(root)


def sandbox_command() -> str:
    """``$MKTME_SANDBOX``, else the mktme-sandbox installed beside this Python
    (the same environment's scripts directory), else PATH's."""
    explicit = os.environ.get("MKTME_SANDBOX")
    if explicit:
        return explicit
    local = Path(sysconfig.get_path("scripts")) / "mktme-sandbox"
    if local.exists():
        return str(local)
    found = shutil.which("mktme-sandbox")
    if found is None:
        raise FileNotFoundError(
            "no mktme-sandbox command: set MKTME_SANDBOX or pip install mktme-sandbox"
        )
    return found


@contextlib.contextmanager
def fresh_sandbox(
    *options: str, parent: str | None = None, prefix: str = "mktme-sandbox-"
) -> Iterator[Mount]:
    """``mktme-sandbox mount DIR OPTIONS...`` in a new temporary directory; unmount
    it and remove the directory on the way out, whatever happened.

    The daemon's log goes into that directory too (``$XDG_RUNTIME_DIR`` of the
    mount command). ``mktme-sandbox umount`` removes it when the daemon exited
    cleanly; a log still there afterwards is kept, and said so on stderr.
    """
    cmd = sandbox_command()
    top = tempfile.mkdtemp(prefix=prefix, dir=parent)
    mnt = os.path.join(top, "mnt")
    os.mkdir(mnt)
    try:
        done = subprocess.run(
            [cmd, "mount", mnt, *options],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env={**os.environ, "XDG_RUNTIME_DIR": top},
            check=False,
        )
        if done.returncode != 0:
            raise MountError(errno.EIO, f"{cmd} mount {mnt}", (done.stderr or done.stdout).strip())
        yield Mount(mnt)
    finally:
        subprocess.run(
            [cmd, "umount", mnt], stdin=subprocess.DEVNULL, capture_output=True, check=False
        )
        _remove_unless_logs(top, mnt)


def _remove_unless_logs(top: str, mnt: str) -> None:
    """Remove ``mnt`` and ``top``; a daemon log left in ``top`` keeps it, and says so."""
    with contextlib.suppress(OSError):
        os.rmdir(mnt)
    kept = sorted(str(p) for p in Path(top).glob("*.log"))
    for log in kept:
        print(f"mktme_sandbox.client: the sandbox daemon's log is kept at {log}", file=sys.stderr)
    if not kept:
        with contextlib.suppress(OSError):
            os.rmdir(top)
