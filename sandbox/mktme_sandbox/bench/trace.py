"""A kernel-build-like trace: generated once, replayed on the five machines, counted.

Short-lived address spaces (compiler processes), a few at a time: each maps a
heap, a bss, a stack and some temporary buffers, faults them by touching them
(8-byte writes; reads in the bss), unmaps the buffers and exits. The trace is
generated once from a seed and replayed on five machines, as in the cover
letter: MKTME off (no KeyIDs, so no pools distinction: one row), MKTME on with
nothing encrypted, and all anonymous memory encrypted with KeyID 1; the last
two with pools off and on. One cold pass from boot, then warm passes. The
machines take turns every 200 ops, and a pass's time is the sum of each
segment's best warm time. The counters reported are those of the warm passes
(steady state, as in a long build); ``trace_enc_pools_cold_flush_per_1k`` is
the pools' first pass from boot.

The counters are priced with ``mktme_sandbox.bench.flush_model``. Lines are
counted as the flush loop issues them (64 per flushed page), the unit the
model's calibration divides by; ``lines_in_cache`` is the sandbox's
``mktme_flush_lines`` counter, the lines the flushes actually found in the emulated
cache, shown for comparison. ``trace_table`` lays it all out as lines of text.

Left out: the emulator's own time is no model of a real machine's, so the
trace's ``vs_off_ratio`` figures say what the sandbox costs, not what MKTME
costs; the model's percentages are the MKTME estimate. No THP, KSM or fork in
the trace.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import astuple, dataclass, field

from mktme_sandbox.bench import Progress, Result
from mktme_sandbox.bench.flush_model import (
    LETTER,
    LINES_PER_PAGE,
    MODEL,
    FlushModel,
    calibration_line,
    v5_line,
)
from mktme_sandbox.bench.machines import CONFIGS, TraceConfig, boot, mmap_command, timed, vmstat
from mktme_sandbox.config import PAGE_SIZE, KiB, MiB
from mktme_sandbox.machine import Machine

__all__ = [
    "Op",
    "TraceCounts",
    "TraceRun",
    "TraceShape",
    "build_trace",
    "replay",
    "run_trace",
    "trace_counts",
    "trace_results",
    "trace_table",
]


@dataclass(frozen=True)
class Op:
    """One step of one process. ``kind``: spawn, mmap, write, read, munmap, exit."""

    kind: str
    space: str
    addr: int = 0
    length: int = 0


@dataclass(frozen=True)
class TraceShape:
    """How many processes, how many alive at once, and what each maps (KiB ranges)."""

    processes: int = 24
    concurrency: int = 4
    seed: int = 1
    heap_kib: tuple[int, int] = (256, 1536)
    heap_touched: tuple[float, float] = (0.4, 0.9)
    bss_kib: tuple[int, int] = (64, 256)
    bss_reads: tuple[int, int] = (2, 8)
    stack_kib: int = 128
    stack_touched: tuple[int, int] = (2, 8)
    buffers: tuple[int, int] = (0, 2)
    buffer_kib: tuple[int, int] = (64, 512)
    slice_ops: int = 8  # ops a process runs before the next one gets its turn


HEAP, BSS, BUFFERS = 0x10000000, 0x00600000, 0x40000000
STACK_TOP = 0x7FF000000000
PAYLOAD = b"compiled"


def _pages(rng: random.Random, kib: tuple[int, int]) -> int:
    return rng.randint(kib[0], kib[1]) * KiB // PAGE_SIZE


def _process(rng: random.Random, shape: TraceShape, name: str) -> list[Op]:
    """One compiler-like process from spawn to exit."""
    heap, bss = _pages(rng, shape.heap_kib), _pages(rng, shape.bss_kib)
    stack = shape.stack_kib * KiB // PAGE_SIZE
    regions = ((HEAP, heap), (BSS, bss), (STACK_TOP - stack * PAGE_SIZE, stack))
    ops = [Op("spawn", name), *(Op("mmap", name, a, n * PAGE_SIZE) for a, n in regions)]
    stack_touched = range(1, rng.randint(*shape.stack_touched) + 1)
    ops += [Op("write", name, STACK_TOP - i * PAGE_SIZE) for i in stack_touched]
    heap_touched = rng.sample(range(heap), max(1, int(heap * rng.uniform(*shape.heap_touched))))
    ops += [Op("write", name, HEAP + p * PAGE_SIZE) for p in heap_touched]
    bss_read = rng.sample(range(bss), min(bss, rng.randint(*shape.bss_reads)))
    ops += [Op("read", name, BSS + p * PAGE_SIZE) for p in bss_read]
    for i in range(rng.randint(*shape.buffers)):
        ops += _buffer(name, BUFFERS + i * 2 * MiB, _pages(rng, shape.buffer_kib))
    return ops + [Op("exit", name)]


def _buffer(name: str, addr: int, pages: int) -> list[Op]:
    """A temporary buffer: mapped, written all over, unmapped (a large malloc and free)."""
    writes = [Op("write", name, addr + p * PAGE_SIZE) for p in range(pages)]
    return [
        Op("mmap", name, addr, pages * PAGE_SIZE),
        *writes,
        Op("munmap", name, addr, pages * PAGE_SIZE),
    ]


def build_trace(shape: TraceShape) -> tuple[Op, ...]:
    """The whole trace: processes interleaved ``slice_ops`` at a time, ``concurrency`` alive."""
    rng = random.Random(shape.seed)
    waiting = [_process(rng, shape, f"cc{n:03d}") for n in range(shape.processes)]
    waiting.reverse()
    alive: list[Iterator[Op]] = []
    trace: list[Op] = []
    while waiting or alive:
        while waiting and len(alive) < shape.concurrency:
            alive.append(iter(waiting.pop()))
        for process in list(alive):
            chunk = [op for _, op in zip(range(shape.slice_ops), process, strict=False)]
            trace += chunk
            if not chunk or chunk[-1].kind == "exit":
                alive.remove(process)
    return tuple(trace)


def replay(machine: Machine, trace: Sequence[Op], keyid: int) -> None:
    """Run ``trace`` with all anonymous memory in ``keyid``."""
    for op in trace:
        if op.kind == "write":
            machine.write_virt(op.space, op.addr, PAYLOAD)
        elif op.kind == "read":
            machine.read_virt(op.space, op.addr, len(PAYLOAD))
        elif op.kind == "mmap":
            machine.space_command(op.space, mmap_command(op.addr, op.length, keyid), 0)
        elif op.kind == "munmap":
            machine.space_command(op.space, f"munmap {op.addr:#x} {op.length}", 0)
        elif op.kind == "spawn":
            machine.create_space(op.space, 0)
        else:
            machine.destroy_space(op.space, 0)


@dataclass(frozen=True)
class TraceCounts:
    """What one or more passes of the trace did, from the vmstat counters."""

    faults: int = 0
    pgalloc: int = 0
    pgalloc_encrypted: int = 0
    pages_flushed: int = 0  # prep_encrypted_flush + arch_free_page_flush + keyid_pool_flush
    flushes_avoided: int = 0  # flush_avoided_pool
    lines_in_cache: int = 0  # flush_lines: lines the flushes found in the cache

    @classmethod
    def between(cls, before: dict[str, int], after: dict[str, int]) -> TraceCounts:
        d = {name: after[name] - before[name] for name in after}
        return cls(
            faults=d["pgfault"],
            pgalloc=d["pgalloc_normal"],
            pgalloc_encrypted=d["mktme_pgalloc_encrypted"],
            pages_flushed=d["mktme_prep_encrypted_flush"]
            + d["mktme_arch_free_page_flush"]
            + d["mktme_keyid_pool_flush"],
            flushes_avoided=d["mktme_flush_avoided_pool"],
            lines_in_cache=d["mktme_flush_lines"],
        )

    def __add__(self, other: TraceCounts) -> TraceCounts:
        return TraceCounts(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))

    @property
    def lines_flushed(self) -> int:
        """Lines the flush loops issue: 64 per flushed page."""
        return self.pages_flushed * LINES_PER_PAGE

    @property
    def flush_per_1k(self) -> float:
        """Pages flushed per 1,000 faults."""
        return 1000 * self.pages_flushed / self.faults if self.faults else 0.0

    def model_pct(self, model: FlushModel = MODEL) -> float:
        return model.overhead_pct(self.lines_flushed, self.faults)


def trace_counts(machine: Machine, trace: Sequence[Op], keyid: int) -> tuple[TraceCounts, float]:
    """Replay once; the counters it moved and the seconds it took."""
    before = vmstat(machine)
    with timed() as watch:
        replay(machine, trace, keyid)
    return TraceCounts.between(before, vmstat(machine)), watch.seconds


@dataclass
class TraceRun:
    """One configuration's machine and what its passes measured."""

    config: TraceConfig
    machine: Machine
    cold: TraceCounts = field(default_factory=TraceCounts)
    warm: TraceCounts = field(default_factory=TraceCounts)
    segment_s: list[float] = field(default_factory=list)  # best warm time of each segment

    @property
    def best_s(self) -> float:
        return sum(self.segment_s)


def run_trace(
    trace: Sequence[Op], passes: int, progress: Progress, segment_ops: int = 200
) -> list[TraceRun]:
    """A cold pass on each machine, then ``passes`` warm ones, interleaved across them.

    The machines take turns every ``segment_ops`` ops (their states are
    independent, so any op is a fine place to switch), and the time of a pass is
    the sum over segments of each segment's best warm time: a burst of load
    from elsewhere spoils one segment of one pass, not a whole pass.
    """
    runs = [TraceRun(c, boot(c.mktme, bool(c.pools))) for c in CONFIGS]
    segments = [trace[i : i + segment_ops] for i in range(0, len(trace), segment_ops)]
    for n in range(passes + 1):
        progress(f"kernel: trace pass {n + 1} of {passes + 1}" + (" (cold)" if not n else ""))
        before = [vmstat(run.machine) for run in runs]
        times = _pass(runs, segments)
        for run, start, seconds in zip(runs, before, times, strict=True):
            counts = TraceCounts.between(start, vmstat(run.machine))
            if n == 0:
                run.cold = counts
                continue
            run.warm = run.warm + counts
            run.segment_s = [
                min(pair) for pair in zip(run.segment_s or seconds, seconds, strict=False)
            ]
    return runs


def _pass(runs: list[TraceRun], segments: list[Sequence[Op]]) -> list[list[float]]:
    """One pass of every machine, segment by segment; the seconds of each segment."""
    times: list[list[float]] = [[] for _ in runs]
    order = list(range(len(runs)))
    for segment in segments:
        for i in order:
            with timed(collect=False) as watch:
                replay(runs[i].machine, segment, runs[i].config.keyid)
            times[i].append(watch.seconds)
        order.reverse()
    return times


def trace_results(runs: list[TraceRun]) -> list[Result]:
    off = _run(runs, "off")
    results = []
    for run in runs:
        c, w = run.config.label, run.warm
        results += [
            Result(f"trace_{c}_faults", w.faults, "faults"),
            Result(f"trace_{c}_flush_per_1k", w.flush_per_1k, "pages"),
            Result(f"trace_{c}_lines_flushed", w.lines_flushed, "lines"),
            Result(f"trace_{c}_lines_in_cache", w.lines_in_cache, "lines"),
            Result(f"trace_{c}_model_pct", w.model_pct(), "%"),
        ]
        if run is not off:
            results.append(Result(f"trace_{c}_vs_off_ratio", off.best_s / run.best_s, "x"))
    enc, pools = _run(runs, "enc"), _run(runs, "enc_pools")
    saved = 1 - pools.warm.pages_flushed / enc.warm.pages_flushed if enc.warm.pages_flushed else 0
    return results + [
        Result("trace_enc_pools_cold_flush_per_1k", pools.cold.flush_per_1k, "pages"),
        Result("pools_flush_saved_pct", 100 * saved, "%"),
        Result("model_line_cycles", MODEL.line_cycles, "cycles"),
        Result("model_fault_cycles", MODEL.fault_cycles, "cycles"),
        Result("model_v5_cycles_pct", MODEL.v5_pct(), "%"),
        Result("letter_v5_cycles_pct", LETTER.cycles_pct(), "%"),
        Result("letter_v5_elapsed_pct", LETTER.elapsed_pct(), "%"),
    ]


_POOLS = {None: "n/a", False: "off", True: "on"}
_COLUMNS = (
    f"{'configuration':<28} {'pools':<5} {'faults':>7} {'pgalloc':>7} {'enc':>6} "
    f"{'flushed/1k':>10} {'lines':>8} {'cached':>7} {'model':>7} {'sandbox':>8}"
)
_LEGEND = (
    "pgalloc: pages allocated, page tables included; enc: of them for KeyID 1",
    (
        "flushed/1k: pages flushed per 1,000 faults; lines: 64 per flushed page (what the "
        "CLFLUSH loops issue); cached: lines the flushes found in the emulated cache"
    ),
    (
        "model: flushed lines x line cost / (faults x flush-free cost per fault); sandbox: "
        "the emulator's own extra time over MKTME off (not a model of hardware)"
    ),
    "MKTME off has no KeyIDs and so no pools to switch: one row",
)


def trace_table(runs: list[TraceRun], trace: Sequence[Op], passes: int) -> list[str]:
    """The trace's table, a legend and the model's calibration, as lines of text."""
    off = _run(runs, "off")
    spaces = sum(op.kind == "spawn" for op in trace)
    title = (
        f"kernel-build-like trace: {spaces} short-lived address spaces, {off.cold.faults} "
        f"faults a pass; counters of {passes} warm passes, sandbox time of the best segments"
    )
    rows = [_row(run, off) for run in runs]
    return ["", title, _COLUMNS, "-" * len(_COLUMNS), *rows, *_LEGEND, *_calibration(runs)]


def _row(run: TraceRun, off: TraceRun) -> str:
    w = run.warm
    return (
        f"{run.config.title:<28} {_POOLS[run.config.pools]:<5} {w.faults:>7} {w.pgalloc:>7} "
        f"{w.pgalloc_encrypted:>6} {w.flush_per_1k:>10.1f} {w.lines_flushed:>8} "
        f"{w.lines_in_cache:>7} {w.model_pct():>+6.1f}% {_pct(run.best_s / off.best_s):>8}"
    )


def _pct(ratio: float) -> str:
    return f"{100 * (ratio - 1):+.0f}%"


def _run(runs: list[TraceRun], label: str) -> TraceRun:
    return next(run for run in runs if run.config.label == label)


def _calibration(runs: list[TraceRun]) -> list[str]:
    """The model's calibration, then what it makes of this trace's v5 and pools counters."""
    enc, pools = _run(runs, "enc"), _run(runs, "enc_pools")
    v5 = (
        f"{v5_line()}; this trace {enc.warm.flush_per_1k:.0f} "
        f"flushed/1k -> model {enc.warm.model_pct():+.1f}%"
    )
    saved = (
        f"pools: {pools.warm.flush_per_1k:.1f} flushed/1k warm -> model "
        f"{pools.warm.model_pct():+.2f}%; the cold pass from boot {pools.cold.flush_per_1k:.1f} "
        f"flushed/1k -> {pools.cold.model_pct():+.2f}%"
    )
    return [calibration_line(), v5, saved]
