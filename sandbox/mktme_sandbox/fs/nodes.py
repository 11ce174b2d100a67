"""The kinds of node in the mounted tree, before any FUSE call touches them.

A path resolves (``mktme_sandbox.fs.tree``) to one of three small frozen dataclasses:

- ``TextFile``: rendered by the machine when it is opened for reading (and
  again on a read from offset 0 after the first); ``stat`` reports size 0,
  as procfs does, so that a ``stat`` or ``ls -l`` never pays for an expensive
  file such as ``mm/check`` (readers read until end of file; the README, the
  one page-cached file, reports its size). A writable one takes one command
  per write, passed whole (the machine strips ``echo``'s newline after it
  has counted the write against the one-page limit).
- ``BlobFile``: a fixed-size window onto a machine address range (DRAM, a
  KeyID's CPU view, a virtual address space, a table indexed by PFN); the
  offset is the address, reads past the end are end-of-file; a write passes
  the caller's uid (``store(addr, data, uid)``), so that the machine can
  check whose memory it is.
- ``Dir``: its entries, and for ``spaces/`` the mkdir/rmdir that create and
  destroy address spaces.

Each node carries an ``access`` callable that gives its owner and mode at the
moment of the ``stat``: ownership of keys and KeyID views changes when a key is
programmed or cleared. Refusals made here (writing a read-only file, mkdir
outside ``spaces/``) raise ``SandboxError`` like the machine's own, so they are
reported through the same single place (``mktme_sandbox.fs.operations``).

Left out: symlinks, hard links, renames, chmod/chown, xattrs, file creation.
"""

from __future__ import annotations

import errno
import functools
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from mktme_sandbox.errors import SandboxError

__all__ = [
    "Access",
    "BlobFile",
    "Dir",
    "Node",
    "OpenFile",
    "TextFile",
    "access_of",
    "fixed",
    "stat_of",
]


@dataclass(frozen=True)
class Access:
    """Who owns a node and its permission bits (the kernel enforces them).

    ``enclosed``: the node lies in a directory only its owner may enter
    (``spaces/NAME/``, 0700), so nobody else reaches it whatever its own
    mode; ``stat`` still shows the mode (``maps`` is 0444, as in /proc).
    """

    uid: int
    mode: int
    enclosed: bool = False

    def permits(self, uid: int, want: int) -> bool:
        """The check ``default_permissions`` makes at open, path included:
        ``want`` 4 read, 2 write.

        Group bits equal other bits on every node, so the caller's groups do
        not matter.
        """
        if uid == 0:
            return True
        if uid != self.uid and self.enclosed:
            return False
        bits = self.mode >> 6 if uid == self.uid else self.mode
        return bool(bits & want)


@functools.lru_cache(maxsize=1024)
def access_of(uid: int, mode: int, enclosed: bool = False) -> Access:
    """``Access(uid, mode, enclosed)``, made once: every read and write asks for one again."""
    return Access(uid, mode, enclosed)


def fixed(uid: int, mode: int) -> Callable[[], Access]:
    """An ``access`` callable for a node whose owner and mode never change."""
    access = access_of(uid, mode)
    return lambda: access


def _refuse(what: str) -> SandboxError:
    return SandboxError(errno.EACCES, f"this file cannot be {what}")


@dataclass(frozen=True)
class TextFile:
    """Text rendered on demand; optionally a control file taking commands.

    ``render`` is None for write-only control files; ``command(text, uid)``
    is None for read-only ones.
    """

    render: Callable[[], str] | None
    access: Callable[[], Access]
    command: Callable[[bytes, int], None] | None = None
    direct_io: bool = True
    follow: bool = False
    """Render again on a read past the end (``dmesg``: ``tail -f`` sees new lines)."""

    @property
    def readable(self) -> bool:
        return self.render is not None

    @property
    def writable(self) -> bool:
        return self.command is not None

    def size(self) -> int:
        """0, as for a procfs file, but for page-cached text (``direct_io`` off),
        which the kernel reads only up to its size."""
        return 0 if self.direct_io or self.render is None else len(self.content())

    def content(self) -> bytes:
        if self.render is None:
            raise _refuse("read")
        return self.render().encode()

    def read(self, offset: int, size: int) -> bytes:
        return self.content()[offset : offset + size]

    def write(self, data: bytes, offset: int, uid: int) -> int:
        if self.command is None:
            raise _refuse("written")
        self.command(data, uid)  # whole: the page limit counts its newline too
        return len(data)


@dataclass(frozen=True)
class BlobFile:
    """Binary data at addresses ``0..size``: ``load(addr, n)``, ``store(addr, data, uid)``."""

    length: int
    load: Callable[[int, int], bytes]
    access: Callable[[], Access]
    store: Callable[[int, bytes, int], None] | None = None
    direct_io: bool = True

    @property
    def readable(self) -> bool:
        return True

    @property
    def writable(self) -> bool:
        return self.store is not None

    def size(self) -> int:
        return self.length

    def read(self, offset: int, size: int) -> bytes:
        n = min(size, self.length - offset)
        return self.load(offset, n) if n > 0 else b""

    def write(self, data: bytes, offset: int, uid: int) -> int:
        if self.store is None:
            raise _refuse("written")
        self.store(offset, data, uid)
        return len(data)


@dataclass(frozen=True)
class Dir:
    """A directory: ``entries()``; ``mkdir``/``rmdir(name, uid)`` where allowed."""

    entries: Callable[[], Iterable[str]]
    access: Callable[[], Access]
    mkdir: Callable[[str, int], None] | None = None
    rmdir: Callable[[str, int], None] | None = None

    def make(self, name: str, uid: int) -> None:
        if self.mkdir is None:
            raise SandboxError(errno.EPERM, "directories can be created only in spaces/")
        self.mkdir(name, uid)

    def remove(self, name: str, uid: int) -> None:
        if self.rmdir is None:
            raise SandboxError(errno.EPERM, "only spaces/NAME directories can be removed")
        self.rmdir(name, uid)


Node = TextFile | BlobFile | Dir


@dataclass
class OpenFile:
    """One ``open()`` of a file, until its ``release()``.

    Text is read the way Linux seq_file reads /proc files: rendered once when
    the file is opened for reading (``OpenFile.opened``), then served from that
    snapshot, so one pass of ``cat``, in as many chunks as it likes, sees one
    consistent text even while the machine changes (dmesg is a ring that drops
    old lines), and an expensive file (``mm/check``) is rendered once per
    pass. A read from offset 0 after an earlier read renders again (a reader
    that rewinds sees the machine now); so does a read past the end of
    ``follow`` text (``dmesg``), so that ``tail -f dmesg`` sees new lines.
    """

    node: TextFile | BlobFile
    snapshot: bytes | None = None
    served: bool = False

    @classmethod
    def opened(cls, node: TextFile | BlobFile, reading: bool) -> OpenFile:
        """The open file of ``node``; text opened for reading is rendered now."""
        if reading and isinstance(node, TextFile) and node.readable:
            return cls(node, node.content())
        return cls(node)

    def read(self, offset: int, size: int) -> bytes:
        if isinstance(self.node, BlobFile):
            return self.node.read(offset, size)
        again = (offset == 0 and self.served) or (
            self.node.follow and offset >= len(self.snapshot or b"")
        )
        if self.snapshot is None or again:
            self.snapshot = self.node.content()
        self.served = True
        return self.snapshot[offset : offset + size]

    def write(self, data: bytes, offset: int, uid: int) -> int:
        self.forget()
        return self.node.write(data, offset, uid)

    def held(self) -> int:
        """The bytes of rendered text this open file keeps in the daemon."""
        return len(self.snapshot or b"")

    def forget(self) -> None:
        """Drop the rendered text: the next read renders it again."""
        self.snapshot, self.served = None, False


def stat_of(node: Node, gid: int, time_ns: int) -> dict[str, int]:
    """The ``stat`` of a node as mfusepy wants it (times in nanoseconds)."""
    access = node.access()
    kind = stat.S_IFDIR if isinstance(node, Dir) else stat.S_IFREG
    return {
        "st_mode": kind | access.mode,
        "st_nlink": 2 if isinstance(node, Dir) else 1,
        "st_uid": access.uid,
        "st_gid": gid,
        "st_size": 0 if isinstance(node, Dir) else node.size(),
        "st_blksize": 4096,
        "st_atime": time_ns,
        "st_mtime": time_ns,
        "st_ctime": time_ns,
    }
