"""``mktme-sandbox trace record``: run a command under perf, keep its memory trace.

The command runs under ``perf record -e page-faults -c 1 -d`` (every page fault
a sample, with its address); ``perf script --show-task-events
--show-mmap-events`` then streams through ``mktme_sandbox.bench.perf_trace``
into the trace file (its format in docs/kbuild.md). perf's own data file is
temporary, next to the output (a kernel build's is a few GB).

perf is installed when missing and we are root (``apt-get install -y
linux-perf``, the Debian package of ``/usr/bin/perf``); otherwise, and when the
kernel refuses ``perf_event_open`` (``kernel.perf_event_paranoid``), the
recorder fails with a ``SandboxError`` that says what to do: ENOENT for a
missing perf, EACCES for a refused or failed recording.

Before perf runs, the arguments are checked: the output's directory must
exist (ENOENT, ENOTDIR; it is never created) and the command must be found
on PATH (ENOENT, which ``trace record`` turns into a shell's status 127).
"""

from __future__ import annotations

import errno
import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mktme_sandbox.bench.perf_trace import parse_perf_script, write_trace
from mktme_sandbox.errors import fail

__all__ = [
    "COMMAND_NOT_FOUND",
    "PERF_PACKAGE",
    "Recording",
    "check_output",
    "ensure_perf",
    "find_command",
    "record",
]

PERF_PACKAGE = "linux-perf"
RECORD = ("record", "-e", "page-faults", "-c", "1", "-d", "-m", "4096", "-q")
SCRIPT = ("script", "--show-task-events", "--show-mmap-events", "-F")
FIELDS = "comm,pid,tid,time,event,addr"
COMMAND_NOT_FOUND = 127  # a shell's exit status for a command it cannot find


@dataclass(frozen=True)
class Recording:
    """What ``record`` wrote: the command's exit status and the events of each kind."""

    returncode: int
    counts: dict[str, int]


def ensure_perf() -> str:
    """The path of ``perf``, installed with apt-get first when missing and we are root."""
    found = shutil.which("perf")
    if found:
        return found
    if os.geteuid() != 0:
        fail(errno.ENOENT, f"perf not found; install it (apt-get install {PERF_PACKAGE}) as root")
    subprocess.run(["apt-get", "install", "-y", PERF_PACKAGE], check=False)
    return shutil.which("perf") or fail(
        errno.ENOENT, f"perf not found after apt-get install {PERF_PACKAGE}"
    )


def find_command(command: Sequence[str]) -> str:
    """The path of ``command[0]`` as a shell finds it (PATH, or a path with a
    ``/``); ENOENT "command not found" otherwise."""
    found = shutil.which(command[0])
    if found is None:
        fail(errno.ENOENT, f"{command[0]}: command not found")
    return found


def check_output(output: Path) -> None:
    """The trace file's directory must exist: ENOTDIR where a file stands in
    its path, ENOENT where a directory is missing."""
    parent = output.parent
    if parent.is_dir():
        return
    if any(p.exists() and not p.is_dir() for p in (parent, *parent.parents)):
        fail(errno.ENOTDIR, f"{output}: {parent} is not a directory")
    fail(errno.ENOENT, f"{output}: no such directory {parent}")


def record(command: Sequence[str], output: Path) -> Recording:
    """Run ``command`` under perf and write its trace to ``output``."""
    check_output(output)
    find_command(command)
    perf = ensure_perf()
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".perf-") as tmp:
        data = str(Path(tmp) / "perf.data")
        done = subprocess.run([perf, *RECORD, "-o", data, "--", *command], check=False)
        if not Path(data).exists() or not Path(data).stat().st_size:
            fail(errno.EACCES, f"perf record wrote nothing; {_paranoid_hint()}")
        script = [perf, *SCRIPT, FIELDS, "-i", data]
        with subprocess.Popen(script, stdout=subprocess.PIPE, text=True) as proc:
            assert proc.stdout is not None
            counts = write_trace(output, parse_perf_script(proc.stdout), shlex.join(command))
        if proc.returncode:
            fail(errno.EIO, f"perf script failed with status {proc.returncode}")
    return Recording(done.returncode, counts)


def _paranoid_hint() -> str:
    try:
        level = Path("/proc/sys/kernel/perf_event_paranoid").read_text().strip()
    except OSError:
        level = "unknown"
    return (
        f"kernel.perf_event_paranoid is {level}: run as root or "
        "sysctl kernel.perf_event_paranoid=-1"
    )
