"""Suite ``kernel``: page-fault throughput and what the MKTME flushes cost.

Everything runs in-process through the ``Machine`` API, on seeded 256 MiB
machines, and every ratio is measured side by side in one run.

Fault throughput
    Four machines fault a 1 MiB mapping (``mmap ... populate``: one write fault
    per page, the page zeroed through its KeyID) in turn, round after round,
    the order reversed every round, after one warm-up round. A rate is the
    contender's best round; a ratio is the median over rounds of the two
    contenders' ratio in that round (``FaultSamples.ratio`` says why). Only the
    populate is timed, with garbage collection held off; the munmap after it
    is not, which is why this uses its own loop rather than
    ``mktme_sandbox.bench.interleaved`` (that times whole calls).

    - ``keyid0_on``: a KeyID-0 VMA with MKTME on; ``keyid0_off``: the same on a
      ``keyid_bits=0`` machine. Goal ``keyid0_on_vs_off_ratio >= 0.98``: the
      series' claim that non-encrypted allocation is unaffected.
    - ``encrypted``: a KeyID-1 VMA, pools off (the v5 behaviour; goal
      >= 20,000 faults/s); ``encrypted_pools``: the same with
      ``keyid_free_pools`` on.
    - ``..._4m``: KeyID 0 and encrypted again over 4 MiB, twice the cache, so
      that zeroing a page also evicts (and encrypts) dirty lines, as it does in
      any long run; no goal.

A kernel-build-like trace
    Short-lived address spaces (compiler processes), a few at a time: each maps
    a heap, a bss, a stack and some temporary buffers, faults them by touching
    them (8-byte writes; reads in the bss), unmaps the buffers and exits. The
    trace is generated once from a seed and replayed on five machines, as in
    the cover letter: MKTME off (no KeyIDs, so no pools distinction: one row),
    MKTME on with nothing encrypted, and all anonymous memory encrypted with
    KeyID 1; the last two with pools off and on. One cold pass from boot, then
    warm passes. The machines take turns every 200 ops, and a pass's time is
    the sum of each segment's best warm time. The counters reported are those
    of the warm passes (steady state, as in a long build);
    ``trace_enc_pools_cold_flush_per_1k`` is the pools' first pass from boot.

The flush-cost model, calibrated on the cover letter's own ``perf stat``
    The v5 series flushes an encrypted page when it is allocated
    (``prep_encrypted_page``) and again when it is freed (``arch_free_page``);
    a flush is a CLFLUSH of each of the page's 64 lines. With all anonymous
    memory encrypted, nearly every fault of the build allocates one page and
    later frees it: 2 page flushes = 128 lines per fault. From the letter::

        MKTME=y, nothing encrypted:  16,919,270,913,026 cycles  104,964,084 faults
        MKTME=y, all anon KeyID 1:   21,025,639,251,627 cycles  104,970,021 faults
        extra cycles                  4,106,368,338,601
        per line   4.106368e12 / (104,970,021 faults x 128 lines) = 305.6 cycles

        base (tip- tree):            16,907,670,543,945 cycles  104,951,554 faults
        per fault  16.90767e12 / 104,951,554 = 161,100 cycles of the whole build

    The second figure is the flush-free cost per fault of that workload (all of
    the build's cycles over its faults), so a trace that flushes L lines over F
    faults is modelled as ``L x 305.6 / (F x 161,100)`` more cycles. For 128
    lines per fault that is +24.3%, the letter's cycles figure (21.0256e12 /
    16.9193e12 = +24.3%; elapsed 196.07 s / 162.55 s = +20.6%, less because
    more CPUs were busy). By construction the model reproduces the letter for
    the v5 behaviour; what it adds is the same arithmetic for the sandbox's
    counters, i.e. for pools. Lines are counted as the flush loop issues them
    (64 per flushed page), the unit the calibration divides by;
    ``lines_in_cache`` is the sandbox's ``flush_lines`` counter, the lines the
    flushes actually found in the emulated cache, shown for comparison.

The full table is printed through ``progress`` (the framework shows progress
on stderr); the figures are also results, so ``--json`` has them.

Left out: the emulator's own time is no model of a real machine's, so the
trace's ``vs_off_ratio`` figures say what the sandbox costs, not what MKTME
costs; the model's percentages are the MKTME estimate. No THP, KSM or fork in
the trace.
"""

from __future__ import annotations

import contextlib
import gc
import random
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import astuple, dataclass, field, replace

from mktme_sandbox.bench import Goal, Result
from mktme_sandbox.config import LINE_SIZE, PAGE_SIZE, KiB, MiB
from mktme_sandbox.machine import Machine

__all__ = [
    "CONFIGS",
    "FAULT_CONTENDERS",
    "FULL",
    "LETTER",
    "MODEL",
    "TINY",
    "FaultContender",
    "FaultSamples",
    "FlushModel",
    "Op",
    "PerfStat",
    "Sizes",
    "TraceConfig",
    "TraceCounts",
    "TraceRun",
    "TraceShape",
    "boot",
    "build_trace",
    "fault_contenders",
    "fault_samples",
    "replay",
    "run",
    "run_trace",
    "trace_counts",
    "trace_table",
    "vmstat",
]

Progress = Callable[[str], None]
LINES_PER_PAGE = PAGE_SIZE // LINE_SIZE
V5_FLUSHES_PER_FAULT = 2  # prep_encrypted_page on allocation, arch_free_page on free
KEYID = 1  # the KeyID of "all anonymous memory encrypted"
BASE = 0x10000000  # where the fault-rate mapping goes


# --- the cover letter's counters and the model --------------------------------------


@dataclass(frozen=True)
class PerfStat:
    """One ``perf stat`` run of the cover letter (kernel build, mean of 5 runs)."""

    name: str
    page_faults: int
    cycles: int
    elapsed_s: float


@dataclass(frozen=True)
class Letter:
    base: PerfStat
    mktme: PerfStat
    encrypted: PerfStat

    def cycles_pct(self) -> float:
        """All anonymous memory encrypted over MKTME on with nothing encrypted."""
        return 100 * (self.encrypted.cycles / self.mktme.cycles - 1)

    def elapsed_pct(self) -> float:
        return 100 * (self.encrypted.elapsed_s / self.mktme.elapsed_s - 1)


LETTER = Letter(
    base=PerfStat("base (tip- tree)", 104_951_554, 16_907_670_543_945, 162.706797586),
    mktme=PerfStat("MKTME=y, no encrypted memory", 104_964_084, 16_919_270_913_026, 162.552503629),
    encrypted=PerfStat(
        "MKTME=y, all anonymous memory KeyID 1", 104_970_021, 21_025_639_251_627, 196.072361087
    ),
)


@dataclass(frozen=True)
class FlushModel:
    """Cycles per flushed line, and the flush-free cycles per fault of the build."""

    line_cycles: float
    fault_cycles: float

    @classmethod
    def from_letter(cls, letter: Letter) -> FlushModel:
        extra = letter.encrypted.cycles - letter.mktme.cycles
        lines = letter.encrypted.page_faults * V5_FLUSHES_PER_FAULT * LINES_PER_PAGE
        return cls(extra / lines, letter.base.cycles / letter.base.page_faults)

    def overhead_pct(self, lines: int, faults: int) -> float:
        """Modelled extra cycles, in percent of the flush-free cycles of ``faults`` faults."""
        return 100 * lines * self.line_cycles / (faults * self.fault_cycles) if faults else 0.0

    def v5_pct(self) -> float:
        """The model for a flush on every allocation and free (128 lines per fault)."""
        return self.overhead_pct(V5_FLUSHES_PER_FAULT * LINES_PER_PAGE, 1)


MODEL = FlushModel.from_letter(LETTER)


# --- machines -----------------------------------------------------------------------


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


def _mmap(addr: int, length: int, keyid: int, populate: bool = False) -> str:
    return (
        f"mmap {addr:#x} {length} rw-"
        + (f" keyid={keyid}" if keyid else "")
        + (" populate" if populate else "")
    )


# --- fault throughput -----------------------------------------------------------------


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
        with _timed() as watch:
            self.machine.space_command(self.space, _mmap(BASE, length, self.keyid, True), 0)
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


@dataclass
class Stopwatch:
    seconds: float = 0.0


@contextlib.contextmanager
def _timed(collect: bool = True) -> Iterator[Stopwatch]:
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


@dataclass(frozen=True)
class FaultSamples:
    """Seconds per fault of each contender in each round (the warm-up left out)."""

    seconds: dict[str, list[float]]

    def rate(self, name: str) -> float:
        """Faults per second in the contender's best round."""
        return 1 / min(self.seconds[name])

    def ratio(self, name: str, reference: str) -> float:
        """Throughput of ``name`` over ``reference``: the median of the per-round ratios.

        Each round's two figures were taken moments apart, so a ratio per round
        cancels the load of that moment; on a shared machine its median moves
        about half as much from run to run as the ratio of the two best rounds.
        """
        pairs = zip(self.seconds[reference], self.seconds[name], strict=True)
        return statistics.median(ref / own for ref, own in pairs)


def fault_samples(contenders: dict[str, FaultContender], rounds: int) -> FaultSamples:
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
        Result("encrypted_faults_per_s", warm.rate("encrypted"), "/s", Goal(20_000)),
        Result("encrypted_pools_faults_per_s", warm.rate("encrypted_pools"), "/s"),
        Result("encrypted_vs_keyid0_ratio", warm.ratio("encrypted", "keyid0_on"), "x"),
        Result("encrypted_pools_vs_keyid0_ratio", warm.ratio("encrypted_pools", "keyid0_on"), "x"),
        Result("keyid0_on_faults_per_s_4m", past_cache.rate("keyid0_on"), "/s"),
        Result("encrypted_faults_per_s_4m", past_cache.rate("encrypted"), "/s"),
        Result("encrypted_vs_keyid0_ratio_4m", past_cache.ratio("encrypted", "keyid0_on"), "x"),
    ]


# --- the trace ------------------------------------------------------------------------


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
            machine.space_command(op.space, _mmap(op.addr, op.length, keyid), 0)
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
            pgalloc=d["pgalloc"],
            pgalloc_encrypted=d["pgalloc_encrypted"],
            pages_flushed=d["prep_encrypted_flush"]
            + d["arch_free_page_flush"]
            + d["keyid_pool_flush"],
            flushes_avoided=d["flush_avoided_pool"],
            lines_in_cache=d["flush_lines"],
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
    with _timed() as watch:
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
            run.segment_s = [min(pair) for pair in zip(run.segment_s or seconds, seconds)]
    return runs


def _pass(runs: list[TraceRun], segments: list[Sequence[Op]]) -> list[list[float]]:
    """One pass of every machine, segment by segment; the seconds of each segment."""
    times: list[list[float]] = [[] for _ in runs]
    order = list(range(len(runs)))
    for segment in segments:
        for i in order:
            with _timed(collect=False) as watch:
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
    enc, pools = _run(runs, "enc"), _run(runs, "enc_pools")
    extra = LETTER.encrypted.cycles - LETTER.mktme.cycles
    line = (
        f"calibration (the letter's perf stat): line cost {extra:.4g} extra cycles / "
        f"({LETTER.encrypted.page_faults:,} faults x 128 lines) = {MODEL.line_cycles:.1f} "
        f"cycles; flush-free cost {LETTER.base.cycles:.5g} cycles / "
        f"{LETTER.base.page_faults:,} faults = {MODEL.fault_cycles:,.0f} cycles per fault"
    )
    v5 = (
        f"v5, a flush on every encrypted alloc and free (128 lines/fault): model "
        f"{MODEL.v5_pct():+.1f}% cycles; letter {LETTER.cycles_pct():+.1f}% cycles, "
        f"{LETTER.elapsed_pct():+.1f}% elapsed; this trace {enc.warm.flush_per_1k:.0f} "
        f"flushed/1k -> model {enc.warm.model_pct():+.1f}%"
    )
    saved = (
        f"pools: {pools.warm.flush_per_1k:.1f} flushed/1k warm -> model "
        f"{pools.warm.model_pct():+.2f}%; the cold pass from boot {pools.cold.flush_per_1k:.1f} "
        f"flushed/1k -> {pools.cold.model_pct():+.2f}%"
    )
    return [line, v5, saved]


# --- the suite ------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """How much the suite does: fault rounds, pages per round, trace passes and shape."""

    fault_pages: int = 256
    fault_rounds: int = 41
    past_cache_pages: int = 1024  # twice the 2 MiB cache: zeroing evicts dirty lines
    past_cache_rounds: int = 5
    trace: TraceShape = TraceShape()
    trace_passes: int = 3


FULL = Sizes()
TINY = Sizes(
    fault_pages=8,
    fault_rounds=1,
    past_cache_pages=8,
    past_cache_rounds=1,
    trace=replace(
        TraceShape(),
        processes=3,
        concurrency=2,
        heap_kib=(32, 64),
        bss_kib=(16, 32),
        buffer_kib=(16, 32),
    ),
    trace_passes=1,
)


def run(progress: Progress, sizes: Sizes = FULL) -> list[Result]:
    progress(f"kernel: fault throughput, {sizes.fault_rounds} rounds of {sizes.fault_pages} pages")
    warm = fault_samples(fault_contenders(sizes.fault_pages), sizes.fault_rounds)
    progress(
        f"kernel: the same past the cache, {sizes.past_cache_rounds} rounds of "
        f"{sizes.past_cache_pages} pages"
    )
    past_cache = fault_samples(
        fault_contenders(sizes.past_cache_pages, ("keyid0_on", "encrypted")),
        sizes.past_cache_rounds,
    )
    trace = build_trace(sizes.trace)
    runs = run_trace(trace, sizes.trace_passes, progress)
    for line in trace_table(runs, trace, sizes.trace_passes):
        progress(line)
    return fault_results(warm, past_cache) + trace_results(runs)
