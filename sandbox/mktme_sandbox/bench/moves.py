"""Pages that move: swap-out, swap-in and migration throughput, KeyID 0 against KeyID 1.

Three seeded 64 MiB machines with two NUMA nodes take turns, the order
reversed every round: ``keyid0`` maps its pages with KeyID 0, ``keyid1`` with
KeyID 1 (pools off, the v5 behaviour: every encrypted free flushes the page),
``keyid1_pools`` with KeyID 1 and ``keyid_free_pools`` on. Per round each maps ``pages`` pages with
``populate`` and times:

- swap-out: ``madvise ... pageout`` of the whole range (each page read through
  its KeyID's direct mapping, written to the swap device, freed and flushed);
- swap-in: one ``read_virt`` over the range (a fault per page: a page
  allocated and prepared for the VMA's KeyID, the slot read into it);
- migration: ``migrate`` of the whole range to the node its pages are not on
  (a target allocated for the page's KeyID and flushed, the copy through both
  KeyIDs, the source freed), timed per page actually moved (swap-in may have
  put the pages on either node; a step that moves nothing is an error, not a
  fast figure).

A rate is a contender's best round in pages per second; a ratio is the median
over rounds of an encrypted contender's rate over ``keyid0``'s in that round
(goal >= 0.9 for ``keyid1``: moving encrypted memory costs at most a tenth
more than moving plain memory; ``keyid1_pools`` shows what the pools save).
Measured on a quiet 2-core machine: swap-out and migration of KeyID 1 with
pools off run at 0.4-0.5 of KeyID 0 (the v5 flush of every freed encrypted
page, the cost the cover letter measures), with pools at 1.0; swap-in at
0.92-1.04.
"""

from __future__ import annotations

from collections.abc import Callable

from mktme_sandbox.bench import Goal, Result, median_ratio
from mktme_sandbox.bench.machines import KEYID, boot, mmap_command, timed
from mktme_sandbox.config import PAGE_SIZE
from mktme_sandbox.machine import Machine

__all__ = ["MOVES", "move_results"]

BASE = 0x10000000
MOVES = ("swap_out", "swap_in", "migrate")


CONTENDERS = {"keyid0": (0, False), "keyid1": (KEYID, False), "keyid1_pools": (KEYID, True)}


def _machine(pools: bool) -> Machine:
    machine = Machine(boot(True, phys_mem="64M").config.replace(numa_nodes=2))
    machine.key_command(KEYID, "type=cpu algorithm=aes-xts-128", uid=0)
    machine.keyid_free_pools = pools
    machine.create_space("moves", 0)
    return machine


def _round(machine: Machine, keyid: int, pages: int) -> dict[str, float]:
    """Seconds per page of each move, for one round."""
    length = pages * PAGE_SIZE
    machine.space_command("moves", mmap_command(BASE, length, keyid, populate=True), uid=0)
    steps: dict[str, Callable[[], object]] = {
        "swap_out": lambda: machine.space_command(
            "moves", f"madvise {BASE:#x} {length} pageout", uid=0
        ),
        "swap_in": lambda: machine.read_virt("moves", BASE, length),
        "migrate": lambda: machine.space_command(
            "moves", f"migrate {BASE:#x} {length} {_other_node(machine)}", uid=0
        ),
    }
    seconds = {}
    for name, step in steps.items():
        moved = machine.vmstat_counts()["pgmigrate_success"]
        with timed() as watch:
            step()
        done = pages
        if name == "migrate":  # per page really moved: a page already there costs nothing
            done = machine.vmstat_counts()["pgmigrate_success"] - moved
            assert done > 0, "migrate moved no page: the figure would time a no-op"
        seconds[name] = watch.seconds / done
    machine.space_command("moves", f"munmap {BASE:#x} {length}", uid=0)
    return seconds


def _other_node(machine: Machine) -> int:
    """The node none of the space's pages is on (swap-in may have put them on
    either): node 1 when numa_maps shows pages on node 0, else node 0."""
    return 1 if " N0=" in machine.numa_maps("moves") else 0


def move_results(pages: int, rounds: int) -> list[Result]:
    machines = {label: _machine(pools) for label, (_, pools) in CONTENDERS.items()}
    samples: dict[str, list[dict[str, float]]] = {label: [] for label in CONTENDERS}
    for r in range(rounds + 1):  # round 0 warms up
        order = list(CONTENDERS) if r % 2 else list(reversed(CONTENDERS))
        for label in order:
            seconds = _round(machines[label], CONTENDERS[label][0], pages)
            if r:
                samples[label].append(seconds)
    results = []
    for move in MOVES:
        plain = [s[move] for s in samples["keyid0"]]
        results.append(Result(f"{move}_keyid0_pages_per_s", 1 / min(plain), "pages/s"))
        for label in ("keyid1", "keyid1_pools"):
            times = [s[move] for s in samples[label]]
            ratio = median_ratio(times, plain)
            results += [
                Result(f"{move}_{label}_pages_per_s", 1 / min(times), "pages/s"),
                Result(
                    f"{move}_{label}_vs_keyid0_ratio",
                    ratio,
                    "x",
                    Goal(0.9) if label == "keyid1" else None,
                ),
            ]
    return results
