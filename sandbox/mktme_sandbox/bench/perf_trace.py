"""A recorded memory trace: ``perf script`` text in, a compact trace file out.

``mktme-sandbox trace record`` (``mktme_sandbox.bench.recorder``) runs a
command under ``perf record -e page-faults -c 1 -d`` and feeds
``perf script --show-task-events --show-mmap-events -F comm,pid,tid,time,event,addr``
to ``parse_perf_script``. Pure Python, no machine: this module only reads text
and writes the format of docs/kbuild.md, one event a line, compressed:

    #mktme-sandbox-trace 1 COMMAND...      header: version, what was recorded
    F TIME PID PPID                          fork (a new process; PPID 0: its parent is unknown)
    E TIME PID COMM                          exec (the process gets a new, empty address space)
    X TIME PID                               exit
    M TIME PID START LENGTH a|f NAME         a mapping (hex START and LENGTH; a anonymous, f file)
    a TIME PID PAGE                          a fault on an anonymous page (hex page number)
    f TIME PID PAGE                          a fault on a file-backed page

TIME is in microseconds from the first event. Rules kept:

- A process is a thread group: forks that make a thread (child pid = parent
  pid) and exits of threads other than the leader are dropped.
- A fork copies its parent's mappings (the child's address space starts as
  the parent's); an exec forgets them.
- A fault is anonymous when the latest mapping that covers its address is
  anonymous (``//anon``, ``[stack]``, ``[heap]``, ``[anon:...]``) or when no
  recorded mapping covers it (brk heap and stack growth record none); file
  backed otherwise (files, ``[vdso]``, ``[vvar]``, writable private file
  mappings included: their COW copies are not counted as anonymous memory).

Left out: munmap and brk (perf records neither), so memory is known to be
freed only at exec and exit; read or write (perf's fault address does not say).
"""

from __future__ import annotations

import bisect
import gzip
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

__all__ = [
    "Event",
    "Mappings",
    "TraceWriter",
    "parse_perf_script",
    "read_trace",
    "write_trace",
]

MAGIC = "#mktme-sandbox-trace 1"
PAGE_SHIFT = 12
ANON_NAMES = ("//anon", "[stack", "[heap]", "[anon:")

_HEAD = re.compile(r"^\s*(?P<comm>.*?)\s+(?P<pid>-?\d+)/(?P<tid>-?\d+)\s+(?P<time>\d+\.\d+):\s+")
_FAULT = re.compile(r"(?:\d+\s+)?page-faults:\s+(?P<addr>[0-9a-f]+)")
_FORK_EXIT = re.compile(r"PERF_RECORD_(?P<kind>FORK|EXIT)\((\d+):(\d+)\):\((\d+):(\d+)\)")
_EXEC = re.compile(r"PERF_RECORD_COMM exec: (?P<comm>.*):(?P<pid>\d+)/(?P<tid>\d+)\s*$")
_MMAP = re.compile(
    r"PERF_RECORD_MMAP2? (?P<pid>-?\d+)/\d+: \[(?P<start>0x[0-9a-f]+)\((?P<len>0x[0-9a-f]+)\)"
    r"[^\]]*\]: \S+ (?P<name>.*?)\s*$"
)


@dataclass(frozen=True, slots=True)
class Event:
    """One line of a trace. ``kind``: F, E, X, M, a or f (module docstring)."""

    kind: str
    time: int  # microseconds from the first event
    pid: int
    value: int = 0  # PPID (F), PAGE (a, f), START (M)
    length: int = 0  # M only
    name: str = ""  # COMM (E), NAME (M)

    def line(self) -> str:
        if self.kind == "M":
            anon = "a" if is_anonymous_name(self.name) else "f"
            return f"M {self.time} {self.pid} {self.value:x} {self.length:x} {anon} {self.name}"
        if self.kind in "af":
            return f"{self.kind} {self.time} {self.pid} {self.value:x}"
        if self.kind == "F":
            return f"F {self.time} {self.pid} {self.value}"
        return f"{self.kind} {self.time} {self.pid}" + (f" {self.name}" if self.name else "")

    @classmethod
    def parse(cls, line: str) -> Event:
        kind, time, pid, *rest = line.rstrip("\n").split(" ", 6 if line[0] == "M" else 3)
        if kind in "af":
            return cls(kind, int(time), int(pid), int(rest[0], 16))
        if kind == "F":
            return cls(kind, int(time), int(pid), int(rest[0]))
        if kind == "M":
            return cls(kind, int(time), int(pid), int(rest[0], 16), int(rest[1], 16), rest[3])
        return cls(kind, int(time), int(pid), name=rest[0] if rest else "")


def is_anonymous_name(name: str) -> bool:
    return name.startswith(ANON_NAMES)


@dataclass
class Mappings:
    """One process's mappings, non-overlapping and sorted: a later one replaces what it covers."""

    starts: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    anon: list[bool] = field(default_factory=list)

    def add(self, start: int, end: int, anonymous: bool) -> None:
        first = bisect.bisect_right(self.ends, start)
        last = bisect.bisect_left(self.starts, end)
        kept: list[tuple[int, int, bool]] = []
        for i in range(first, last):  # the parts of overlapped mappings left outside [start, end)
            if self.starts[i] < start:
                kept.append((self.starts[i], start, self.anon[i]))
            if self.ends[i] > end:
                kept.append((end, self.ends[i], self.anon[i]))
        pieces = sorted([*kept, (start, end, anonymous)])
        self.starts[first:last] = [p[0] for p in pieces]
        self.ends[first:last] = [p[1] for p in pieces]
        self.anon[first:last] = [p[2] for p in pieces]

    def anonymous_at(self, addr: int) -> bool:
        """Anonymous where an anonymous mapping or no mapping covers ``addr``."""
        i = bisect.bisect_right(self.starts, addr) - 1
        return i < 0 or addr >= self.ends[i] or self.anon[i]

    def copy(self) -> Mappings:
        return Mappings(list(self.starts), list(self.ends), list(self.anon))


@dataclass
class _Parser:
    """The state of one pass over ``perf script`` text: processes alive, their mappings."""

    origin: float | None = None
    mappings: dict[int, Mappings] = field(default_factory=dict)

    def time(self, text: str) -> int:
        seconds = float(text)
        if self.origin is None:
            self.origin = seconds
        return round((seconds - self.origin) * 1e6)

    def known(self, pid: int, time: int) -> Iterator[Event]:
        """A fork line for a process first seen without one (the traced command itself)."""
        if pid not in self.mappings:
            self.mappings[pid] = Mappings()
            yield Event("F", time, pid, 0)

    def line(self, line: str) -> Iterator[Event]:
        head = _HEAD.match(line)
        if head is None or head["pid"] in ("0", "-1"):
            return
        pid, rest = int(head["pid"]), line[head.end() :]
        if fault := _FAULT.match(rest):
            time = self.time(head["time"])
            yield from self.known(pid, time)
            addr = int(fault["addr"], 16)
            kind = "a" if self.mappings[pid].anonymous_at(addr) else "f"
            yield Event(kind, time, pid, addr >> PAGE_SHIFT)
        elif rest.startswith("PERF_RECORD_"):
            yield from self.record(rest, self.time(head["time"]))

    def record(self, rest: str, time: int) -> Iterator[Event]:
        if task := _FORK_EXIT.match(rest):
            yield from self.fork_or_exit(task, time)
        elif exe := _EXEC.match(rest):
            pid = int(exe["pid"])
            yield from self.known(pid, time)
            self.mappings[pid] = Mappings()
            yield Event("E", time, pid, name=exe["comm"])
        elif (mmap := _MMAP.match(rest)) and int(mmap["pid"]) > 0:
            pid, start, length = int(mmap["pid"]), int(mmap["start"], 16), int(mmap["len"], 16)
            yield from self.known(pid, time)
            self.mappings[pid].add(start, start + length, is_anonymous_name(mmap["name"]))
            yield Event("M", time, pid, start, length, mmap["name"])

    def fork_or_exit(self, task: re.Match[str], time: int) -> Iterator[Event]:
        pid, tid, ppid = int(task[2]), int(task[3]), int(task[4])
        if task["kind"] == "FORK" and pid != ppid:
            parent = self.mappings.get(ppid)
            self.mappings[pid] = parent.copy() if parent else Mappings()
            yield Event("F", time, pid, ppid if parent else 0)
        elif task["kind"] == "EXIT" and pid == tid and self.mappings.pop(pid, None):
            yield Event("X", time, pid)


def parse_perf_script(lines: Iterable[str]) -> Iterator[Event]:
    """The trace's events, in order, from ``perf script`` text (see the module docstring)."""
    parser = _Parser()
    for line in lines:
        yield from parser.line(line)


def _open(path: Path, mode: str) -> IO[str]:
    if path.suffix == ".xz":
        import lzma

        return lzma.open(path, mode + "t", encoding="utf-8")  # type: ignore[return-value]
    return gzip.open(path, mode + "t", encoding="utf-8")  # type: ignore[return-value]


@dataclass
class TraceWriter:
    """Counts what it writes: the events of each kind."""

    counts: dict[str, int] = field(default_factory=dict)

    def write(self, out: IO[str], events: Iterable[Event]) -> None:
        for event in events:
            self.counts[event.kind] = self.counts.get(event.kind, 0) + 1
            out.write(event.line() + "\n")


def write_trace(path: Path, events: Iterable[Event], what: str) -> dict[str, int]:
    """Write a trace file (gzip, or xz for a ``.xz`` name); the number of events of each kind."""
    writer = TraceWriter()
    with _open(path, "w") as out:
        out.write(f"{MAGIC} {what}\n")
        writer.write(out, events)
    return writer.counts


def read_trace(path: Path) -> Iterator[Event]:
    """The events of a trace file, streamed (a full build's trace does not fit in a list)."""
    with _open(path, "r") as src:
        header = src.readline()
        if not header.startswith(MAGIC):
            raise ValueError(f"{path}: not a mktme-sandbox trace (first line {header[:40]!r})")
        for line in src:
            yield Event.parse(line)
