"""The ``kernel`` bench suite at a tiny size: one run of all three parts, no timing."""

from __future__ import annotations

import importlib
import math

from mktme_sandbox.bench import SUITES, kernel
from mktme_sandbox.bench.kernel import TINY
from mktme_sandbox.bench.machines import CONFIGS


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
        "encrypted_faults_per_s": (20_000, True),
        "swap_out_keyid1_vs_keyid0_ratio": (0.9, True),
        "swap_in_keyid1_vs_keyid0_ratio": (0.9, True),
        "migrate_keyid1_vs_keyid0_ratio": (0.9, True),
    }
    for config in CONFIGS:
        assert f"trace_{config.label}_flush_per_1k" in names
        assert (f"trace_{config.label}_vs_off_ratio" in names) == config.mktme
    assert any(line.startswith("calibration") for line in lines)
    assert sum(line.startswith("MKTME") and "%" in line for line in lines) == len(CONFIGS)
