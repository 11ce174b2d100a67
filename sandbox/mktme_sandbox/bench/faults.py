"""Page-fault throughput with and without MKTME, encrypted, with and without pools.

Four machines fault a 1 MiB mapping (``mmap ... populate``: one write fault per
page, the page zeroed through its KeyID) in turn, round after round, the order
reversed every round, after one warm-up round. A rate is the contender's best
round; a ratio is the median over rounds of the two contenders' ratio in that
round (``FaultSamples.ratio`` says why). Only the populate is timed, with
garbage collection held off; the munmap after it is not, which is why this
uses its own loop rather than ``mktme_sandbox.bench.interleaved`` (that times
whole calls).

- ``keyid0_on``: a KeyID-0 VMA with MKTME on; ``keyid0_off``: the same on a
  ``keyid_bits=0`` machine. Goal ``keyid0_on_vs_off_ratio >= 0.98``: the
  series' claim that non-encrypted allocation is unaffected.
- ``encrypted``: a KeyID-1 VMA, pools off (the v5 behaviour; goal >= 50,000
  faults/s); ``encrypted_pools``: the same with ``keyid_free_pools`` on.
- ``..._4m``: KeyID 0 and encrypted again over 4 MiB, twice the cache, so that
  zeroing a page also evicts (and encrypts) dirty lines, as it does in any long
  run; no goal.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from mktme_sandbox.bench import Goal, Result, median_ratio
from mktme_sandbox.bench.machines import CONFIGS, boot, mmap_command, timed
from mktme_sandbox.config import PAGE_SIZE
from mktme_sandbox.machine import Machine

__all__ = [
    "FAULT_CONTENDERS",
    "Contender",
    "FaultContender",
    "FaultSamples",
    "fault_contenders",
    "fault_results",
    "fault_samples",
]

BASE = 0x10000000  # where the fault-rate mapping goes


class Contender(Protocol):
    """Anything timed in rounds: ``round()`` is seconds per unit of work."""

    def round(self) -> float: ...


@dataclass
class FaultContender:
    """One machine faulting ``pages`` pages of a ``keyid`` VMA per round."""

    machine: Machine
    keyid: int
    pages: int
    space: str = "faults"

    def __post_init__(self) -> None:
        self.machine.create_space(self.space, 0)

    def round(self) -> float:
        """Seconds per fault of one populate; the munmap after it is not timed."""
        length = self.pages * PAGE_SIZE
        with timed() as watch:
            self.machine.space_command(self.space, mmap_command(BASE, length, self.keyid, True), 0)
        self.machine.space_command(self.space, f"munmap {BASE:#x} {length}", 0)
        return watch.seconds / self.pages


# fault-rate contender -> the configuration (of CONFIGS) it runs in
FAULT_CONTENDERS = {
    "keyid0_on": "plain",
    "keyid0_off": "off",
    "encrypted": "enc",
    "encrypted_pools": "enc_pools",
}


def fault_contenders(
    pages: int, names: Sequence[str] = tuple(FAULT_CONTENDERS)
) -> dict[str, FaultContender]:
    """One fresh machine per contender, each with its space ready."""
    configs = {config.label: config for config in CONFIGS}
    contenders = {}
    for name in names:
        config = configs[FAULT_CONTENDERS[name]]
        contenders[name] = FaultContender(
            boot(config.mktme, bool(config.pools)), config.keyid, pages
        )
    return contenders


@dataclass(frozen=True)
class FaultSamples:
    """Seconds per fault of each contender in each round (the warm-up left out)."""

    seconds: dict[str, list[float]]

    def rate(self, name: str) -> float:
        """Faults per second in the contender's best round."""
        return 1 / min(self.seconds[name])

    def ratio(self, name: str, reference: str) -> float:
        """Throughput of ``name`` over ``reference``: the median of the per-round
        ratios (``mktme_sandbox.bench.median_ratio``)."""
        return median_ratio(self.seconds[name], self.seconds[reference])


def fault_samples(contenders: Mapping[str, Contender], rounds: int) -> FaultSamples:
    """One warm-up round, then ``rounds`` rounds of every contender in turn.

    The order of the contenders is reversed every round, so that none always
    follows the same neighbour.
    """
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    order = list(contenders)
    for n in range(rounds + 1):
        for name in order:
            elapsed = contenders[name].round()
            if n:
                seconds[name].append(elapsed)
        order.reverse()
    return FaultSamples(seconds)


def fault_results(warm: FaultSamples, past_cache: FaultSamples) -> list[Result]:
    return [
        Result("keyid0_on_faults_per_s", warm.rate("keyid0_on"), "/s"),
        Result("keyid0_off_faults_per_s", warm.rate("keyid0_off"), "/s"),
        Result("keyid0_on_vs_off_ratio", warm.ratio("keyid0_on", "keyid0_off"), "x", Goal(0.98)),
        Result(
            "encrypted_faults_per_s", warm.rate("encrypted"), "/s", Goal(50_000)
        ),  # issue 16: >= 50k in-process
        Result("encrypted_pools_faults_per_s", warm.rate("encrypted_pools"), "/s"),
        Result("encrypted_vs_keyid0_ratio", warm.ratio("encrypted", "keyid0_on"), "x"),
        Result("encrypted_pools_vs_keyid0_ratio", warm.ratio("encrypted_pools", "keyid0_on"), "x"),
        Result("keyid0_on_faults_per_s_4m", past_cache.rate("keyid0_on"), "/s"),
        Result("encrypted_faults_per_s_4m", past_cache.rate("encrypted"), "/s"),
        Result("encrypted_vs_keyid0_ratio_4m", past_cache.ratio("encrypted", "keyid0_on"), "x"),
    ]
