"""The ``kernel`` bench suite at a tiny size: one run of all its parts, no timing."""

from __future__ import annotations

import importlib
import math

import pytest

from mktme_sandbox.bench import SUITES, kernel
from mktme_sandbox.bench.kernel import TINY
from mktme_sandbox.bench.machines import CONFIGS
from mktme_sandbox.bench.scale import scale_rows_to


def test_the_suite_table_names_this_module() -> None:
    assert importlib.import_module(SUITES["kernel"]) is kernel


def test_run_reports_each_metric_once_with_the_issues_goals() -> None:
    lines: list[str] = []
    results = kernel.run(lines.append, TINY)
    names = [r.name for r in results]
    assert len(names) == len(set(names))
    assert all(math.isfinite(r.value) for r in results)
    goals = {r.name: (r.goal.bound, r.goal.at_least) for r in results if r.goal}
    assert goals == {
        "keyid0_on_vs_off_ratio": (0.98, True),
        "encrypted_faults_per_s": (50_000, True),
        "swap_out_keyid1_vs_keyid0_ratio": (0.9, True),
        "swap_in_keyid1_vs_keyid0_ratio": (0.9, True),
        "migrate_keyid1_vs_keyid0_ratio": (0.9, True),
        "fork_keyid1_vs_keyid0_ratio": (0.9, True),
        "cow_keyid1_vs_keyid0_ratio": (0.9, True),
    }
    for config in CONFIGS:
        assert f"trace_{config.label}_flush_per_1k" in names
        assert (f"trace_{config.label}_vs_off_ratio" in names) == config.mktme
    assert any(line.startswith("calibration") for line in lines)
    assert sum(line.startswith("MKTME") and "%" in line for line in lines) == len(CONFIGS)


def test_the_scale_table_has_each_reader_per_row() -> None:
    lines: list[str] = []
    names = {r.name for r in kernel.run(lines.append, TINY)}
    for figure in ("populate_pages_per_s", "smaps_s_per_gib", "rollup_s_per_gib"):
        assert f"scale_{figure}_1m" in names
    for figure in ("pagemap_s_per_gib", "ptdump_s_per_gib", "check_s_per_gib"):
        assert f"scale_{figure}_1m" in names
    assert any(line.split()[:2] == ["mapped", "populate/s"] for line in lines)


def test_scale_rows_stop_at_the_size_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MKTME_BENCH_SCALE_TO", "1G")
    assert scale_rows_to() == (64 << 20, 256 << 20, 1 << 30)
    monkeypatch.delenv("MKTME_BENCH_SCALE_TO")
    assert scale_rows_to() == (64 << 20, 256 << 20)
