"""The flush-cost model, calibrated on the cover letter's own ``perf stat``.

The v5 series flushes an encrypted page when it is allocated
(``prep_encrypted_page``) and again when it is freed (``arch_free_page``); a
flush is a CLFLUSH of each of the page's 64 lines. With all anonymous memory
encrypted, nearly every fault of the build allocates one page and later frees
it: 2 page flushes = 128 lines per fault. From the letter::

    MKTME=y, nothing encrypted:  16,919,270,913,026 cycles  104,964,084 faults
    MKTME=y, all anon KeyID 1:   21,025,639,251,627 cycles  104,970,021 faults
    extra cycles                  4,106,368,338,601
    per line   4.106368e12 / (104,970,021 faults x 128 lines) = 305.6 cycles

    base (tip- tree):            16,907,670,543,945 cycles  104,951,554 faults
    per fault  16.90767e12 / 104,951,554 = 161,100 cycles of the whole build

The second figure is the flush-free cost per fault of that workload (all of the
build's cycles over its faults), so a trace that flushes L lines over F faults
is modelled as ``L x 305.6 / (F x 161,100)`` more cycles. For 128 lines per
fault that is +24.3%, the letter's cycles figure (21.0256e12 / 16.9193e12 =
+24.3%; elapsed 196.07 s / 162.55 s = +20.6%, less because more CPUs were
busy). By construction the model reproduces the letter for the v5 behaviour;
what it adds is the same arithmetic for the sandbox's counters, i.e. for pools.
Lines are counted as the flush loop issues them (64 per flushed page), the unit
the calibration divides by.

Pure arithmetic on the letter's counters: this module boots no machine and
imports nothing of one, so any trace (``mktme_sandbox.bench.trace``, or a
recorded kernel build) can be priced with it.
"""

from __future__ import annotations

from dataclasses import dataclass

from mktme_sandbox.config import LINE_SIZE, PAGE_SIZE

__all__ = [
    "LETTER",
    "LINES_PER_PAGE",
    "MODEL",
    "V5_FLUSHES_PER_FAULT",
    "FlushModel",
    "Letter",
    "PerfStat",
    "calibration_line",
    "v5_line",
]

LINES_PER_PAGE = PAGE_SIZE // LINE_SIZE
V5_FLUSHES_PER_FAULT = 2  # prep_encrypted_page on allocation, arch_free_page on free


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


def calibration_line(letter: Letter = LETTER, model: FlushModel = MODEL) -> str:
    """How the model's two figures come from the letter, as one line of text."""
    extra = letter.encrypted.cycles - letter.mktme.cycles
    return (
        f"calibration (the letter's perf stat): line cost {extra:.4g} extra cycles / "
        f"({letter.encrypted.page_faults:,} faults x 128 lines) = {model.line_cycles:.1f} "
        f"cycles; flush-free cost {letter.base.cycles:.5g} cycles / "
        f"{letter.base.page_faults:,} faults = {model.fault_cycles:,.0f} cycles per fault"
    )


def v5_line(letter: Letter = LETTER, model: FlushModel = MODEL) -> str:
    """The model against the letter for the v5 behaviour, as the start of a line of text."""
    return (
        f"v5, a flush on every encrypted alloc and free (128 lines/fault): model "
        f"{model.v5_pct():+.1f}% cycles; letter {letter.cycles_pct():+.1f}% cycles, "
        f"{letter.elapsed_pct():+.1f}% elapsed"
    )
