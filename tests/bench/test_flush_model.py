"""The flush-cost model: the cover letter's counters, and the arithmetic that prices a trace."""

from __future__ import annotations

import pytest

from mktme_sandbox.bench.flush_model import LETTER, MODEL


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
