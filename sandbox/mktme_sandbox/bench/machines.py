"""The machines of the ``kernel`` suite, shared by the fault harness and the trace.

Every machine is seeded and runs in-process through the ``Machine`` API (256
MiB unless told). ``CONFIGS`` are the cover letter's five ways to run: MKTME
off (no KeyIDs, so no pools to switch), MKTME on with nothing encrypted, and
all anonymous memory encrypted with KeyID 1; the last two with
``keyid_free_pools`` off and on. ``timed`` is the stopwatch both time with:
garbage collection is held off inside it, so that a collection triggered by
one contender is not charged to another.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Iterator
from dataclasses import dataclass

from mktme_sandbox.machine import Machine

__all__ = [
    "CONFIGS",
    "KEYID",
    "Stopwatch",
    "TraceConfig",
    "boot",
    "mmap_command",
    "timed",
    "vmstat",
]

KEYID = 1  # the KeyID of "all anonymous memory encrypted"


@dataclass(frozen=True)
class TraceConfig:
    """One way to run the trace: MKTME on or off, the KeyID of anonymous memory, pools."""

    label: str  # the metric infix
    title: str
    mktme: bool
    keyid: int
    pools: bool | None  # None: MKTME off has no pools to switch


CONFIGS = (
    TraceConfig("off", "MKTME off", False, 0, None),
    TraceConfig("plain", "MKTME on, nothing encrypted", True, 0, False),
    TraceConfig("plain_pools", "MKTME on, nothing encrypted", True, 0, True),
    TraceConfig("enc", "MKTME on, all anon KeyID 1", True, KEYID, False),
    TraceConfig("enc_pools", "MKTME on, all anon KeyID 1", True, KEYID, True),
)


def boot(mktme: bool, pools: bool = False, phys_mem: str = "256M") -> Machine:
    """A seeded machine; with MKTME, KeyID 1 holds a CPU-generated AES-XTS-128 key."""
    machine = Machine(phys_mem=phys_mem, seed=1, keyid_bits=6 if mktme else 0)
    if mktme:
        machine.key_command(KEYID, "type=cpu algorithm=aes-xts-128", uid=0)
        machine.keyid_free_pools = pools
    return machine


def vmstat(machine: Machine) -> dict[str, int]:
    return machine.vmstat_counts()


def mmap_command(addr: int, length: int, keyid: int, populate: bool = False) -> str:
    """The ``spaces/NAME/ctl`` command that maps ``length`` bytes rw- at ``addr``."""
    return (
        f"mmap {addr:#x} {length} rw-"
        + (f" keyid={keyid}" if keyid else "")
        + (" populate" if populate else "")
    )


@dataclass
class Stopwatch:
    seconds: float = 0.0


@contextlib.contextmanager
def timed(collect: bool = True) -> Iterator[Stopwatch]:
    """Time the ``with`` body, with no garbage collection inside it."""
    if collect:
        gc.collect()
    gc.disable()
    watch = Stopwatch()
    start = time.perf_counter()
    try:
        yield watch
    finally:
        watch.seconds = time.perf_counter() - start
        gc.enable()
