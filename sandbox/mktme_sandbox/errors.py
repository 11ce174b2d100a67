"""One error type for everything the sandbox rejects.

A ``SandboxError`` carries the errno that docs/spec.md 7 assigns to the
situation and a reason a person can act on. Its text reads like the OS's own
(``[Errno 22] Invalid argument: mmap: address 0x1001 is not page aligned``).
The FUSE layer turns it into ``FuseOSError(errno)`` plus one dmesg line; the
Python API raises it as it is. Reasons never contain key material.
"""

from __future__ import annotations

import errno as _errno
import os
from typing import NoReturn

__all__ = ["SandboxError", "errno_name", "fail"]


class SandboxError(OSError):
    """A rejected operation: ``errno`` from docs/spec.md 7 and a reason."""

    def __init__(self, err: int, reason: str) -> None:
        super().__init__(err, os.strerror(err))
        self.reason = reason

    def __str__(self) -> str:
        return f"[Errno {self.errno}] {self.strerror}: {self.reason}"

    def __repr__(self) -> str:
        return f"SandboxError({errno_name(self.errno or 0)}, {self.reason!r})"


def errno_name(err: int) -> str:
    """``22`` -> ``"EINVAL"``."""
    return _errno.errorcode.get(err, str(err))


def fail(err: int, reason: str) -> NoReturn:
    """Raise ``SandboxError(err, reason)``; reads well at the call site."""
    raise SandboxError(err, reason)
