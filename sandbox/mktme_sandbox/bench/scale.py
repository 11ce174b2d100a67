"""Cost per page as the mapped memory grows: the ``scale_...`` figures of ``bench kernel``.

One space of a 4 GiB machine (8 GiB for a 4 GiB row) with MKTME on is
populated in steps, 64 MiB, 256 MiB, 1 GiB, 4 GiB mapped in all, up to
``MKTME_BENCH_SCALE_TO`` (default 256M: the larger rows take minutes). After
each step it times what reads the whole space: ``smaps``, ``smaps_rollup``,
``pagemap`` of the whole mapping, ``pagetables/NAME`` (ptdump) and
``mm/check``, each as seconds per GiB mapped, and the step's populate as pages
per second. A flat row-to-row figure is the goal: no cost grows with the work.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from mktme_sandbox.bench import Progress, Result
from mktme_sandbox.config import GiB, MiB, parse_size, size_text
from mktme_sandbox.machine import Machine

__all__ = ["ROWS", "scale_results", "scale_rows_to"]

ROWS = (64 * MiB, 256 * MiB, GiB, 4 * GiB)
"""The mapped sizes of the table's rows."""
BASE = 0x10000000  # where the space's mapping starts
ENV = "MKTME_BENCH_SCALE_TO"


def scale_rows_to(default: str = "256M") -> tuple[int, ...]:
    """The rows up to ``$MKTME_BENCH_SCALE_TO`` (``default`` when unset)."""
    largest = parse_size(os.environ.get(ENV, default))
    return tuple(size for size in ROWS if size <= largest)


def _seconds(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def _command_seconds(machine: Machine, command: str) -> float:
    return _seconds(lambda: machine.space_command("a", command, 0))


def _read_seconds(read: Callable[[Machine, int], object], machine: Machine, mapped: int) -> float:
    return _seconds(lambda: read(machine, mapped))


def scale_results(rows: tuple[int, ...], progress: Progress) -> list[Result]:
    """Populate one space row by row; the figures of each row, and the table."""
    if not rows:
        return []
    machine = Machine(phys_mem=size_text(max(4 * GiB, 2 * rows[-1])), seed=1, keyid_bits=6)
    machine.create_space("a", uid=0)
    results: list[Result] = []
    table = [f"{'mapped':>8} {'populate/s':>11}" + "".join(f"{n:>10}" for n in _READERS)]
    mapped = 0
    for size in rows:
        step = f"mmap {BASE + mapped:#x} {size - mapped} rw- populate"
        populate = (size - mapped) // 4096 / _command_seconds(machine, step)
        mapped = size
        label = size_text(size).lower()
        results.append(Result(f"scale_populate_pages_per_s_{label}", populate, "pages/s"))
        row = f"{size_text(size):>8} {populate:>11.0f}"
        for name, read in _READERS.items():
            per_gib = _read_seconds(read, machine, mapped) * GiB / size
            results.append(Result(f"scale_{name}_s_per_gib_{label}", per_gib, "s/GiB"))
            row += f"{per_gib:>10.3f}"
        table.append(row)
    progress("kernel: cost per page as the mapping grows (reads in s/GiB mapped)")
    for line in table:
        progress(line)
    return results


_READERS: dict[str, Callable[[Machine, int], object]] = {
    "smaps": lambda m, n: m.smaps("a"),
    "rollup": lambda m, n: m.smaps_rollup("a"),
    "pagemap": lambda m, n: m.pagemap("a", BASE >> 12 << 3, n >> 12 << 3),
    "ptdump": lambda m, n: m.ptdump("a"),
    "check": lambda m, n: m.check(),
}
"""What reads the whole space, each timed once per row."""
