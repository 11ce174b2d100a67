"""Suite ``kbuild``: the cover letter's table from a real kernel build's trace.

A recorded ``make tinyconfig && make -j2`` of Linux 6.1 (``mktme-sandbox trace
record``; docs/kbuild.md says how it was made and how to make it again) is
replayed through ``mktme_sandbox.bench.replay`` on the letter's three machines
plus pools: MKTME off, MKTME on with nothing encrypted, all anonymous memory in
KeyID 1 (v5: a flush on every encrypted allocation and free), and the same
with ``keyid_free_pools``. Every ``EVERY``-th process of the trace is
replayed (``MKTME_KBUILD_EVERY`` to change it; whole processes, so each one's
memory is allocated and freed): the emulator spends milliseconds on a fault,
and the default must finish in minutes on two cores. The counters are those
of a second, warm pass (a long build's steady state).

The flushed lines are priced two ways (``mktme_sandbox.bench.flush_model``):

(a) the letter's calibration (305.6 cycles a line, 161,100 flush-free cycles
    a fault, both derived from the letter's own ``perf stat``): a restatement
    of the letter, applied to this trace's counters;
(b) independent ground: the line cost measured here by a CLFLUSHOPT
    microbenchmark (``mktme_sandbox.bench.flush_cost``), over the flush-free
    CPU time per fault of the same build, measured here (``BUILD``: user plus
    system time of the recording, over its page faults).

Then N tenants (1, 2, 4, 8), each building with its own KeyID, tenant k
started k/N of a build later, share one machine whose memory is just the
peak the N builds need at once (less than the sum of their peaks): pools off
(v5), pools on (a page taken from another KeyID's pool is flushed once; the
fullest pool first), and pools stealing from the coldest KeyID first
(``PageAllocator.pool_steal``). The flushes each saves over v5, per N.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from mktme_sandbox.bench import Progress, Result
from mktme_sandbox.bench.flush_cost import FlushCost, measure_flush
from mktme_sandbox.bench.flush_model import LETTER, MODEL, FlushModel
from mktme_sandbox.bench.machines import CONFIGS, TraceConfig, vmstat
from mktme_sandbox.bench.perf_trace import Event, read_trace
from mktme_sandbox.bench.replay import (
    Replayer,
    TraceStats,
    TraceTally,
    merge_tenants,
    subsample,
)
from mktme_sandbox.bench.trace import TraceCounts
from mktme_sandbox.config import PAGE_SIZE, MiB
from mktme_sandbox.machine import Machine

__all__ = [
    "BUILD",
    "EVERY",
    "TENANTS",
    "TRACE",
    "BuildStat",
    "ConfigRow",
    "TenantRow",
    "config_rows",
    "run",
    "tenant_rows",
]

TRACE = Path(__file__).parent / "data" / "kbuild-tinyconfig.trace.xz"
TRACE_ENV = "MKTME_KBUILD_TRACE"  # another trace file instead
EVERY = 100  # every EVERY-th process of the file is replayed (the default's run time)
EVERY_ENV = "MKTME_KBUILD_EVERY"  # a larger sample: a smaller factor
TENANTS = (1, 2, 4, 8)
TABLE_CONFIGS = ("off", "plain", "enc", "enc_pools")
POLICIES = (("v5", False, "fullest"), ("pools", True, "fullest"), ("coldest", True, "coldest"))
BIG = "2G"  # memory of the single-build machines and of the sizing pass


@dataclass(frozen=True)
class BuildStat:
    """CPU time, page faults and elapsed time of the recorded build, on the recording machine.

    The CPU time includes perf's (one sample written per fault), so the flush-free
    cost per fault is overstated a little and model (b) understated as much."""

    task_clock_ms: float
    page_faults: int
    elapsed_s: float

    @property
    def ns_per_fault(self) -> float:
        return self.task_clock_ms * 1e6 / self.page_faults


# the recorded build itself: `time perf record ... -- make -j2` (user 140.9 s, sys 37.2 s)
BUILD = BuildStat(task_clock_ms=178_097.0, page_faults=7_768_892, elapsed_s=358.2)


@dataclass(frozen=True)
class ConfigRow:
    config: TraceConfig
    counts: TraceCounts  # faults: the trace's (anonymous and file-backed), as perf counts them


@dataclass(frozen=True)
class TenantRow:
    tenants: int
    phys_mib: int  # the machine: the N builds' peak together, in 2 MiB granules
    peak_pages: int  # that peak, exactly
    flushed: dict[str, int]  # policy -> pages flushed
    stolen: dict[str, int]  # policy -> pages taken from another KeyID's pool (one flush each)
    faults: int

    def saved_pct(self, policy: str) -> float:
        v5 = self.flushed["v5"]
        return 100 * (1 - self.flushed[policy] / v5) if v5 else 0.0


def boot(mktme: bool, pools: bool, phys_mem: str | int, keyids: int = 1) -> Machine:
    machine = Machine(phys_mem=phys_mem, seed=1, keyid_bits=6 if mktme else 0)
    for keyid in range(1, keyids + 1) if mktme else ():
        machine.key_command(keyid, "type=cpu algorithm=aes-xts-128", uid=0)
    if mktme:
        machine.keyid_free_pools = pools
    return machine


def load(path: Path | None = None, every: int | None = None) -> tuple[list[Event], TraceStats]:
    """The replayed events (every ``every``-th process) and the whole trace's stats."""
    every = every or int(os.environ.get(EVERY_ENV, EVERY))
    whole = TraceTally()
    events = list(
        subsample(whole.tally(read_trace(path or Path(os.environ.get(TRACE_ENV, TRACE)))), every)
    )
    return events, whole.stats()


def config_rows(events: Sequence[Event], phys_mem: str | int = BIG) -> list[ConfigRow]:
    """The letter's configurations plus pools, each a cold pass then a counted warm one."""
    rows = []
    for config in (c for c in CONFIGS if c.label in TABLE_CONFIGS):
        machine = boot(config.mktme, bool(config.pools), phys_mem)
        Replayer(machine, config.keyid).run(events)
        before = vmstat(machine)
        done = Replayer(machine, config.keyid).run(events)
        counts = TraceCounts.between(before, vmstat(machine))
        rows.append(ConfigRow(config, replace(counts, faults=done.anon_faults + done.file_faults)))
    return rows


def tenant_rows(events: Sequence[Event], tenants: Sequence[int] = TENANTS) -> list[TenantRow]:
    return [_tenants(events, n) for n in tenants]


def _tenants(events: Sequence[Event], n: int) -> TenantRow:
    """v5 on a big machine gives the peak; the pools run on exactly that much memory."""
    sizing = boot(True, False, BIG, n)
    flushed, stolen = {}, {}
    flushed["v5"], stolen["v5"] = _replay_tenants(sizing, events, n)
    peak = sizing.kernel.alloc.never_used  # v5 reuses freed pages first
    phys = max(4 * MiB, -(-peak * PAGE_SIZE // (2 * MiB)) * 2 * MiB)  # 2 MiB granules
    for policy, pools, steal in POLICIES[1:]:
        machine = boot(True, pools, phys, n)
        machine.kernel.alloc.pool_steal = steal
        flushed[policy], stolen[policy] = _replay_tenants(machine, events, n)
    faults = n * sum(e.kind in "af" for e in events)
    return TenantRow(n, phys // MiB, peak, flushed, stolen, faults)


def _replay_tenants(machine: Machine, events: Sequence[Event], n: int) -> tuple[int, int]:
    """Pages flushed, and pages taken from another KeyID's pool, while ``n``
    staggered tenants replay ``events``."""
    replayers = [Replayer(machine, k + 1, f"t{k}-") for k in range(n)]
    spread = events[-1].time if events else 0
    start = vmstat(machine)
    for k, event in merge_tenants(events, n, spread):
        replayers[k].apply(event)
    for replayer in replayers:
        replayer.finish()
    end = vmstat(machine)
    stolen = end["mktme_keyid_pool_flush"] - start["mktme_keyid_pool_flush"]
    return TraceCounts.between(start, end).pages_flushed, stolen


def models(flush: FlushCost | None) -> tuple[FlushModel, FlushModel | None]:
    """(a) the letter's calibration; (b) the line measured here over this build's fault."""
    measured = FlushModel(flush.line_ns, BUILD.ns_per_fault) if flush else None
    return MODEL, measured


def results(
    rows: list[ConfigRow], tenants: list[TenantRow], whole: TraceStats, flush: FlushCost | None
) -> list[Result]:
    by = {row.config.label: row.counts for row in rows}
    _, measured = models(flush)
    out = [
        Result("trace_faults", whole.faults, "faults"),
        Result("trace_processes", whole.processes, "procs"),
        Result("trace_anon_faults", whole.anon_faults, "faults"),
        Result("replayed_faults", by["enc"].faults, "faults"),
    ]
    for label, counts in by.items():
        out += [
            Result(f"{label}_pgalloc_encrypted", counts.pgalloc_encrypted, "pages"),
            Result(f"{label}_flush_per_1k", counts.flush_per_1k, "pages"),
            Result(f"{label}_lines_per_1k", 1000 * counts.lines_flushed / counts.faults, "lines"),
        ]
    out += [
        Result("flush_per_1k_v5", by["enc"].flush_per_1k, "pages"),
        Result("flush_per_1k_pools", by["enc_pools"].flush_per_1k, "pages"),
        Result("model_pct_letter_calibration", by["enc"].model_pct(MODEL), "%"),
        Result("model_pct_letter_calibration_pools", by["enc_pools"].model_pct(MODEL), "%"),
    ]
    if measured and flush:
        out += [
            Result("model_pct_measured_flush", by["enc"].model_pct(measured), "%"),
            Result("model_pct_measured_flush_pools", by["enc_pools"].model_pct(measured), "%"),
            Result("flush_line_ns", flush.line_ns, "ns"),
            Result("build_ns_per_fault", BUILD.ns_per_fault, "ns"),
        ]
    for row in tenants:
        for policy in ("pools", "coldest"):
            name = f"tenants_{row.tenants}_{policy}"
            out.append(Result(f"{name}_saved_pct", row.saved_pct(policy), "%"))
            out.append(Result(f"{name}_stolen", row.stolen[policy], "pages"))
    return out  # tenants_4_pools_saved_pct among them


def table(
    rows: list[ConfigRow], tenants: list[TenantRow], whole: TraceStats, flush: FlushCost | None
) -> list[str]:
    """The table, the two models' assumptions and the tenants, as lines of text."""
    _, measured = models(flush)
    head = (
        f"{'configuration':<28} {'pools':<5} {'faults':>8} {'enc alloc':>9} "
        f"{'flushed/1k':>10} {'lines/1k':>9} {'(a) letter':>10} {'(b) here':>9}"
    )
    title = (
        f"kernel build trace: {whole.processes} processes, {whole.faults} faults "
        f"({whole.anon_faults} anonymous); replayed: {rows[0].counts.faults} faults of whole "
        "processes (a sample), the counters of a warm second pass"
    )
    lines = [
        "",
        title,
        head,
        "-" * len(head),
    ]
    for row in rows:
        c = row.counts
        b = f"{c.model_pct(measured):+8.2f}%" if measured else "     n/a"
        lines.append(
            f"{row.config.title:<28} {_pools(row.config):<5} {c.faults:>8} "
            f"{c.pgalloc_encrypted:>9} {c.flush_per_1k:>10.1f} "
            f"{1000 * c.lines_flushed / c.faults:>9.0f} {c.model_pct(MODEL):>+9.2f}% {b}"
        )
    return lines + _assumptions(flush) + _tenant_table(tenants)


def _pools(config: TraceConfig) -> str:
    return {None: "n/a", False: "off", True: "on"}[config.pools]


def _assumptions(flush: FlushCost | None) -> list[str]:
    letter = (
        f"(a) the letter's calibration (not independent): {MODEL.line_cycles:.1f} cycles a line "
        f"over {MODEL.fault_cycles:,.0f} cycles a fault; the letter: "
        f"{LETTER.cycles_pct():+.1f}% cycles, {LETTER.elapsed_pct():+.1f}% elapsed"
    )
    if flush is None:
        return [letter, "(b) n/a: no C compiler here for the CLFLUSH microbenchmark"]
    here = (
        f"(b) measured here: {flush.instruction} {flush.dirty_ns:.2f} ns a dirty line, "
        f"{flush.clean_ns:.2f} ns a clean one (mean {flush.line_ns:.2f}), over "
        f"{BUILD.ns_per_fault:,.0f} ns of CPU a fault (the recorded build: "
        f"{BUILD.task_clock_ms / 1000:.0f} CPU s, {BUILD.page_faults:,} faults)"
    )
    return [letter, here]


def _tenant_table(tenants: list[TenantRow]) -> list[str]:
    head = (
        f"{'tenants':>7} {'memory':>8} {'N x 1 peak':>10} {'v5 flushed/1k':>13} "
        f"{'pools saved':>11} {'stolen':>7} {'coldest saved':>13} {'stolen':>7}"
    )
    lines = ["", "N builds at once, own KeyID each, memory = their peak together", head]
    solo = next((row.peak_pages for row in tenants if row.tenants == 1), 0)
    for row in tenants:
        lines.append(
            f"{row.tenants:>7} {row.phys_mib:>6}Mi {row.tenants * solo * PAGE_SIZE / MiB:>8.1f}Mi "
            f"{1000 * row.flushed['v5'] / row.faults:>13.1f} {row.saved_pct('pools'):>10.1f}% "
            f"{row.stolen['pools']:>7} {row.saved_pct('coldest'):>12.1f}% {row.stolen['coldest']:>7}"
        )
    legend = "stolen: pages taken from another KeyID's pool (one flush each, v5 pays two)"
    return [*lines, legend]


def run(
    progress: Progress, path: Path | None = None, tenants: Sequence[int] = TENANTS
) -> list[Result]:
    progress("kbuild: reading the trace")
    events, whole = load(path)
    progress(f"kbuild: {len(events)} events replayed on the letter's machines plus pools")
    rows = config_rows(events)
    progress(f"kbuild: tenants {', '.join(map(str, tenants))}")
    shared = tenant_rows(events, tenants)
    flush = measure_flush()
    for line in table(rows, shared, whole, flush):
        progress(line)
    return results(rows, shared, whole, flush)
