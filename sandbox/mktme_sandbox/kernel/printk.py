"""The kernel log ring behind ``dmesg``.

Lines carry the Linux timestamp prefix (``[    0.000123] ``: seconds since boot)
and are kept in a bounded ring like the kernel's log buffer. Nothing logged
here may contain key material: callers pass only what a user may see.

One call is one record, and a record is one line, whatever a user managed to
put in the message (a space name, a command): as ``/dev/kmsg`` does
(kernel/printk/printk.c, ``msg_print_ext_body``: "escape non-printable
characters ... as \\xNN"), every character that is not printable, a newline
included, and the backslash itself are written as ``\\xNN`` (``\\uNNNN`` beyond
Latin-1), so no message can forge a second line. A record is cut at
``LOG_LINE_MAX`` bytes (printk.c: ``#define LOG_LINE_MAX (1024 - PREFIX_MAX)``),
so one write can grow the ring by at most that much, and the ring holds at
most ``capacity`` records.
"""

from __future__ import annotations

import collections
import time
from typing import Any

__all__ = ["LOG_LINE_MAX", "KernelLog", "escape"]

PREFIX_MAX = 32
LOG_LINE_MAX = 1024 - PREFIX_MAX


def _escaped(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(message: str) -> str:
    """``message`` as one printable line: non-printables and ``\\`` as escapes."""
    if message.isprintable() and "\\" not in message:
        return message
    return "".join(ch if ch.isprintable() and ch != "\\" else _escaped(ch) for ch in message)


def _cut(line: str, limit: int = LOG_LINE_MAX) -> str:
    data = line.encode()
    if len(data) <= limit:
        return line
    return data[:limit].decode(errors="ignore")


class KernelLog:
    """A bounded ring of timestamped one-line records."""

    def __init__(self, capacity: int = 4096) -> None:
        self._boot = time.monotonic()
        self._lines: collections.deque[str] = collections.deque(maxlen=capacity)

    def printk(self, message: str) -> None:
        stamp = time.monotonic() - self._boot
        self._lines.append(f"[{stamp:12.6f}] {_cut(escape(message))}")

    def text(self) -> str:
        return "".join(line + "\n" for line in self._lines)

    def export_state(self) -> dict[str, Any]:
        return {"lines": list(self._lines), "uptime": time.monotonic() - self._boot}

    def import_state(self, state: dict[str, Any]) -> None:
        """The saved lines; later lines carry on from the saved uptime."""
        self._lines.clear()
        self._lines.extend(str(line) for line in state["lines"])
        self._boot = time.monotonic() - float(state["uptime"])
