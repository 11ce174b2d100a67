"""The kernel log ring behind ``dmesg``.

Lines carry the Linux timestamp prefix (``[    0.000123] ``: seconds since boot)
and are kept in a bounded ring like the kernel's log buffer. Nothing logged
here may contain key material: callers pass only what a user may see.
"""

from __future__ import annotations

import collections
import time
from typing import Any

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

    def export_state(self) -> dict[str, Any]:
        return {"lines": list(self._lines), "uptime": time.monotonic() - self._boot}

    def import_state(self, state: dict[str, Any]) -> None:
        """The saved lines; later lines carry on from the saved uptime."""
        self._lines.clear()
        self._lines.extend(str(line) for line in state["lines"])
        self._boot = time.monotonic() - float(state["uptime"])
