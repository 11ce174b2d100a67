"""The FUSE entry points: path -> node -> one call into the machine.

``SandboxFS`` holds no logic of its own. Each operation resolves its path with
``Tree.resolve`` (``_node`` turns a missing node into ENOENT) and calls the
node; ``open`` keeps the node as an ``OpenFile`` under the handle it returns,
which ``read`` and ``write`` then use. ``_reported`` is the one place where a
refusal becomes an errno:

- ``SandboxError(errno, reason)`` -> ``machine.reject(path, err)`` appends the
  dmesg line, the caller gets ``errno``;
- any other exception -> EIO, a dmesg line and a daemon-log line naming only
  the exception's *type* (its text might carry data), and the daemon goes on.

``serve()`` mounts with mfusepy on libfuse 3: the single-threaded loop (every
Machine call takes the machine's one lock, so worker threads could only queue
on it; they cost a Python thread state per request, and mfusepy's call of the
pre-3.12 ``fuse_main_real`` makes libfuse 3.14's multithreaded loop log
"Ignoring invalid max threads value" in every daemon log), nanosecond times, ``default_permissions`` so the kernel enforces the owners and
modes of ``mktme_sandbox.fs.tree``, no attribute caching (owners change when keys are
programmed), and ``direct_io`` on every file except README so that readers see
memory and counters as they are now.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import mfusepy

from mktme_sandbox.errors import SandboxError
from mktme_sandbox.fs.nodes import BlobFile, Dir, Node, OpenFile, TextFile, stat_of
from mktme_sandbox.fs.tree import Tree

if TYPE_CHECKING:
    from mktme_sandbox.machine import Machine

__all__ = [
    "FUSE_STOPPED_BY_SIGNAL",
    "OPEN_FILES_PER_UID",
    "TEXT_BYTES_PER_UID",
    "SandboxFS",
    "fuse_options",
    "serve",
]

log = logging.getLogger("mktme_sandbox.fs")

# fuse_main_real() returns 8 when its loop ended with an error, which is how
# libfuse 3 reports SIGTERM/SIGINT/SIGHUP; mfusepy raises RuntimeError(8).
FUSE_STOPPED_BY_SIGNAL = 8

F = TypeVar("F", bound=Callable[..., Any])

_FIXED = "the sandbox's {what} are fixed: nothing here can change them"

OPEN_FILES_PER_UID = 1024
"""Files of the mount one user (but root and the daemon's) keeps open at once:
each costs the daemon an ``OpenFile``; one more open is EMFILE."""
TEXT_BYTES_PER_UID = 64 << 20
"""Bytes of rendered text those files hold at once (an open text file keeps
its rendering, 4.1; ``smaps`` of a space with many VMAs is megabytes): an
open or read that would render beyond is ENOMEM."""


@dataclass
class _Holding:
    """What one user's open files cost the daemon."""

    files: int = 0
    text: int = 0


def _overrides(handler: F) -> F:
    """Declare a FUSE handler: a name mfusepy does not call fails at import
    (as ratarmount marks each handler with an override decorator), instead of
    leaving the operation to mfusepy's default."""
    if not callable(getattr(mfusepy.Operations, handler.__name__, None)):
        raise TypeError(f"{handler.__name__} is not a FUSE operation of mfusepy.Operations")
    return handler


def _reported(operation: F) -> F:
    """Declare a FUSE handler (``_overrides``) and turn what it raises into the
    errno its caller sees."""
    _overrides(operation)

    @functools.wraps(operation)
    def run(self: SandboxFS, path: str | None, *args: Any) -> Any:
        try:
            return operation(self, path, *args)
        except SandboxError as err:
            self.machine.reject(_where(path), err)
            raise mfusepy.FuseOSError(err.errno or errno.EIO) from None
        except mfusepy.FuseOSError:
            raise
        except Exception as exc:  # noqa: BLE001 - the daemon keeps serving whatever went wrong
            name = type(exc).__name__
            log.error("internal error in %s: %s", operation.__name__, name)
            self.machine.reject(_where(path), SandboxError(errno.EIO, f"internal error ({name})"))
            raise mfusepy.FuseOSError(errno.EIO) from None

    return run  # type: ignore[return-value]


def _where(path: str | None) -> str:
    """The file a dmesg line names, relative to the mount (``/`` for its root);
    FUSE passes no path for a file whose name is gone (rmdir of its space)."""
    return "(deleted)" if path is None else path.lstrip("/") or "/"


def _caller_uid() -> int:
    uid: int = mfusepy.fuse_get_context()[0]
    return uid


class SandboxFS(mfusepy.Operations):  # type: ignore[misc]  # mfusepy ships no types
    """The machine as a filesystem; see ``mktme_sandbox.fs.tree`` for the paths."""

    use_ns = True

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.tree = Tree(machine)
        self.gid = os.getgid()
        self.mounted_ns = time.time_ns()
        self.open_files: dict[int, OpenFile] = {}  # by the fh that open() hands out
        self.openers: dict[int, int] = {}  # the uid that opened each fh
        self.holdings: dict[int, _Holding] = {}  # by uid, while it has files open
        self._unlimited = frozenset((0, machine.owner_uid))
        self._handles = itertools.count(1)

    def _node(self, path: str) -> Node:
        node = self.tree.resolve(path)
        if node is None:
            raise mfusepy.FuseOSError(errno.ENOENT)
        return node

    def _dir(self, path: str) -> Dir:
        node = self._node(path)
        if not isinstance(node, Dir):
            raise mfusepy.FuseOSError(errno.ENOTDIR)
        return node

    def _file(self, path: str) -> TextFile | BlobFile:
        node = self._node(path)
        if isinstance(node, Dir):
            raise mfusepy.FuseOSError(errno.EISDIR)
        return node

    @_reported
    def getattr(self, path: str, fh: Any = None) -> dict[str, int]:
        return stat_of(self._node(path), self.gid, self.mounted_ns)

    @_reported
    def readdir(self, path: str, fh: Any) -> list[str]:
        return [".", "..", *self._dir(path).entries()]

    @_reported
    def open(self, path: str, fi: Any) -> int:
        node = self._file(path)
        mode = fi.flags & os.O_ACCMODE
        if mode != os.O_WRONLY and not node.readable:
            raise SandboxError(errno.EACCES, "this file can only be written")
        if mode != os.O_RDONLY and not node.writable:
            raise SandboxError(errno.EACCES, "this file can only be read")
        uid = _caller_uid()
        holding = self._holding(uid)
        if uid not in self._unlimited and holding.files >= OPEN_FILES_PER_UID:
            raise SandboxError(
                errno.EMFILE, f"uid {uid} has {holding.files} files of the mount open: "
                f"OPEN_FILES_PER_UID is {OPEN_FILES_PER_UID}; close some",
            )  # fmt: skip
        open_file = OpenFile.opened(node, reading=mode != os.O_WRONLY)
        self._charge(uid, open_file, 0)
        fi.fh = next(self._handles)
        fi.direct_io = int(node.direct_io)
        self.open_files[fi.fh], self.openers[fi.fh] = open_file, uid
        holding.files += 1
        return 0

    @_reported
    def read(self, path: str, size: int, offset: int, fi: Any) -> bytes:
        open_file = self.open_files[fi.fh]
        _still_permitted(open_file, _caller_uid(), 4)
        held = open_file.held()
        data = open_file.read(offset, size)
        self._charge(self.openers[fi.fh], open_file, held)
        return data

    @_reported
    def write(self, path: str, data: bytes, offset: int, fi: Any) -> int:
        open_file, uid = self.open_files[fi.fh], _caller_uid()
        _still_permitted(open_file, uid, 2)
        held = open_file.held()
        try:
            return open_file.write(data, offset, uid)
        finally:
            self._charge(self.openers[fi.fh], open_file, held)  # less: never refused

    @_overrides
    def release(self, path: str, fi: Any) -> int:
        open_file, uid = self.open_files.pop(fi.fh, None), self.openers.pop(fi.fh, None)
        if open_file is not None and uid is not None:
            holding = self._holding(uid)
            holding.files -= 1
            holding.text -= open_file.held()
            if not holding.files:
                del self.holdings[uid]
        return 0

    def _holding(self, uid: int) -> _Holding:
        return self.holdings.setdefault(uid, _Holding())

    def _charge(self, uid: int, open_file: OpenFile, held: int) -> None:
        """Count the text ``open_file`` holds now (it held ``held`` bytes before)
        to ``uid``; beyond TEXT_BYTES_PER_UID it forgets the text: ENOMEM."""
        holding = self._holding(uid)
        more = open_file.held() - held
        if more > 0 and uid not in self._unlimited and holding.text + more > TEXT_BYTES_PER_UID:
            open_file.forget()
            holding.text -= held
            if not holding.files:
                del self.holdings[uid]
            raise SandboxError(
                errno.ENOMEM, f"uid {uid}'s open files would hold {holding.text + more} bytes "
                f"of text: TEXT_BYTES_PER_UID is {TEXT_BYTES_PER_UID}; close some",
            )  # fmt: skip
        holding.text += more

    @_reported
    def truncate(self, path: str, length: int, fh: Any = None) -> int:
        # `echo CMD > file` and `dd of=file` truncate first: writable files
        # accept it and stay as they are (their size is the range they cover).
        if not self._file(path).writable:
            raise SandboxError(errno.EACCES, "this file can only be read")
        return 0

    @_reported
    def create(self, path: str, mode: int, fi: Any = None) -> int:
        raise SandboxError(errno.EACCES, "files cannot be created here (mkdir spaces/NAME)")

    # Names, modes and owners are the machine's (docs/spec.md section 8): what
    # would change them is refused with EPERM and a dmesg line, as procfs does.

    @_reported
    def chmod(self, path: str, mode: int) -> int:
        raise SandboxError(errno.EPERM, _FIXED.format(what="modes"))

    @_reported
    def chown(self, path: str, uid: int, gid: int) -> int:
        raise SandboxError(errno.EPERM, _FIXED.format(what="owners"))

    @_reported
    def utimens(self, path: str, times: Any = None) -> int:
        raise SandboxError(errno.EPERM, _FIXED.format(what="times"))

    @_reported
    def rename(self, old: str, new: str) -> int:
        raise SandboxError(errno.EPERM, _FIXED.format(what="names"))

    @_reported
    def unlink(self, path: str) -> int:
        raise SandboxError(errno.EPERM, "files cannot be removed (rmdir spaces/NAME)")

    @_reported
    def symlink(self, target: str, source: str) -> int:
        raise SandboxError(errno.EPERM, "links cannot be made here")

    @_reported
    def link(self, target: str, source: str) -> int:
        raise SandboxError(errno.EPERM, "links cannot be made here")

    @_reported
    def mknod(self, path: str, mode: int, dev: int) -> int:
        raise SandboxError(errno.EPERM, "files cannot be created here (mkdir spaces/NAME)")

    @_reported
    def mkdir(self, path: str, mode: int) -> int:
        parent, name = os.path.split(path)
        self._dir(parent).make(name, _caller_uid())
        return 0

    @_reported
    def rmdir(self, path: str) -> int:
        parent, name = os.path.split(path)
        self._dir(parent).remove(name, _caller_uid())
        return 0

    @_overrides
    def statfs(self, path: str) -> dict[str, int]:
        pages = self.machine.phys_mem // 4096
        return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": pages, "f_namemax": 255}


def _still_permitted(open_file: OpenFile, uid: int, want: int) -> None:
    """The kernel checks modes only at open; here owners change under open
    files (a key cleared and programmed by another user, a space destroyed and
    made again by another), so every read and write checks them again."""
    if not open_file.node.access().permits(uid, want):
        raise SandboxError(errno.EACCES, "the file changed owner since it was opened")


def fuse_options(allow_other: bool = False, fsname: str = "mktme-sandbox") -> dict[str, Any]:
    """The mount options, shared with the benchmark's null filesystem."""
    return {
        "foreground": True,  # the daemon is detached by `mktme-sandbox mount` itself
        "nothreads": True,  # see the module docstring: the machine lock serializes anyway
        "raw_fi": True,  # open() sets direct_io per file
        "default_permissions": True,
        "allow_other": allow_other,
        "attr_timeout": 0,
        "entry_timeout": 0,
        "negative_timeout": 0,
        "fsname": fsname,
        "subtype": "mktme-sandbox",
    }


def serve(operations: mfusepy.Operations, mountpoint: str, allow_other: bool = False) -> bool:
    """Mount and serve until unmounted (True) or stopped by a signal (False).

    Blocks. libfuse installs its own SIGTERM/SIGINT/SIGHUP handlers for the
    duration and unmounts before returning either way.
    """
    try:
        mfusepy.FUSE(operations, mountpoint, **fuse_options(allow_other))
    except RuntimeError as err:
        if err.args != (FUSE_STOPPED_BY_SIGNAL,):
            raise
        return False
    return True
