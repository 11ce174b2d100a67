"""The kernel log ring behind ``dmesg``.

Lines carry the Linux timestamp prefix (``[    0.000123] ``: seconds since boot)
and are kept in a bounded ring like the kernel's log buffer. Nothing logged
here may contain key material: callers pass only what a user may see.
"""

from __future__ import annotations

import collections
import time

__all__ = ["KernelLog"]


class KernelLog:
    """A bounded ring of timestamped lines."""

    def __init__(self, capacity: int = 4096) -> None:
        self._boot = time.monotonic()
        self._lines: collections.deque[str] = collections.deque(maxlen=capacity)

    def printk(self, message: str) -> None:
        stamp = time.monotonic() - self._boot
        for line in message.splitlines() or [""]:
            self._lines.append(f"[{stamp:12.6f}] {line}")

    def text(self) -> str:
        return "".join(line + "\n" for line in self._lines)
