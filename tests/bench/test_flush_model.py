"""The flush-cost model: the cover letter's counters, and the arithmetic that prices a trace."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mktme_sandbox.bench import flush_model
from mktme_sandbox.bench.flush_model import LETTER, MODEL, FlushModel, Letter, PerfStat


def test_model_is_calibrated_on_the_cover_letters_counters() -> None:
    assert MODEL.line_cycles == pytest.approx(305.6, abs=0.1)
    assert MODEL.fault_cycles == pytest.approx(161_100, rel=1e-4)
    assert MODEL.v5_pct() == pytest.approx(24.3, abs=0.05)
    assert LETTER.cycles_pct() == pytest.approx(24.3, abs=0.05)
    assert LETTER.elapsed_pct() == pytest.approx(20.6, abs=0.05)


def test_model_scales_with_lines_per_fault() -> None:
    assert MODEL.overhead_pct(64, 1) == pytest.approx(MODEL.v5_pct() / 2)
    assert MODEL.overhead_pct(0, 1000) == 0
    assert MODEL.overhead_pct(0, 0) == 0


def test_the_docstrings_figures_price_128_lines_per_fault_at_the_letters_24_3_percent() -> None:
    """From the module docstring: ``per line ... = 305.6 cycles``, ``per fault ... =
    161,100 cycles of the whole build``, and "for 128 lines per fault that is +24.3%"."""
    model = FlushModel(line_cycles=305.6, fault_cycles=161_100)
    assert model.overhead_pct(128, 1) == pytest.approx(24.3, abs=0.05)  # 128 x 305.6 / 161,100
    assert model.overhead_pct(128 * 1000, 1000) == pytest.approx(model.overhead_pct(128, 1))
    assert model.overhead_pct(64, 1) == pytest.approx(12.1, abs=0.05)  # one page flushed per fault
    assert model.overhead_pct(0, 1000) == 0


def test_a_hand_sized_letter_gives_round_figures() -> None:
    letter = Letter(
        base=PerfStat("base", 10, 1_600_000, 1.0),
        mktme=PerfStat("MKTME on", 10, 1_600_000, 1.0),
        encrypted=PerfStat("all anon KeyID 1", 10, 1_984_000, 1.2),
    )
    model = FlushModel.from_letter(letter)
    # 384,000 extra cycles / (10 faults x 128 lines); 1,600,000 cycles / 10 faults
    assert model == FlushModel(line_cycles=300, fault_cycles=160_000)
    assert model.v5_pct() == 24  # 128 x 300 / 160,000
    assert letter.cycles_pct() == pytest.approx(model.v5_pct())  # by construction
    assert letter.elapsed_pct() == pytest.approx(20)


def test_the_docstring_quotes_the_letters_counters_and_the_models_figures() -> None:
    doc = flush_model.__doc__ or ""
    for stat in (LETTER.base, LETTER.mktme, LETTER.encrypted):
        assert f"{stat.cycles:,} cycles  {stat.page_faults:,} faults" in doc
    assert f"{LETTER.encrypted.cycles - LETTER.mktme.cycles:,}" in doc
    assert f"= {MODEL.line_cycles:.1f} cycles" in doc
    assert f"= {MODEL.fault_cycles:,.0f} cycles" in doc
    assert f"+{MODEL.v5_pct():.1f}%" in doc
    assert f"+{LETTER.elapsed_pct():.1f}%" in doc


def test_the_model_imports_nothing_of_the_machine() -> None:
    code = (
        "import sys, mktme_sandbox.bench.flush_model\n"
        "loaded = [m for m in sys.modules if m.startswith('mktme_sandbox.')]\n"
        "print(' '.join(sorted(loaded)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert set(done.stdout.split()) == {
        "mktme_sandbox.bench",
        "mktme_sandbox.bench.flush_model",
        "mktme_sandbox.config",
        "mktme_sandbox.errors",
    }
