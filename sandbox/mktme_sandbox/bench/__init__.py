"""``mktme-sandbox bench``: the project's benchmarks, one suite per layer.

A suite is a module ``mktme_sandbox.bench.NAME`` with a function
``run(progress) -> list[Result] | dict[str, float]``; ``progress`` takes one
line of text and shows it while the suite runs. A suite that returns a plain
dict names its goals in a module-level ``GOALS = {metric: least acceptable
value}``. Suites are imported only when run, by module name (``SUITES``), so a
suite whose module (or one of its imports) is missing is skipped with a
message, and the others still run.

Every comparison is measured side by side in one run (``interleaved``:
repetitions alternate between the contenders, best of several rounds; ratios
that must hold on a loaded machine take the median of the per-round ratios,
``median_ratio``); no figure is ever compared to a number from elsewhere. Ratios carry ``ratio`` in
their names (``xts_vs_ecb_ratio_64k``) and, where the project set one, a goal
shown as PASS or MISS.
"""

from __future__ import annotations

import importlib
import json
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO

__all__ = [
    "SUITES",
    "Goal",
    "Result",
    "SuiteReport",
    "interleaved",
    "interleaved_rounds",
    "median_ratio",
    "register",
    "run",
    "run_suite",
]

Progress = Callable[[str], None]

# suite name -> module; imported lazily by run_suite()
SUITES: dict[str, str] = {
    "engine": "mktme_sandbox.bench.engine",
    "kernel": "mktme_sandbox.bench.kernel",
    "kbuild": "mktme_sandbox.bench.kbuild",
    "fs": "mktme_sandbox.bench.fs",
}


def register(name: str, module: str) -> None:
    """Add (or move) suite ``name``, found in ``module`` when it runs."""
    SUITES[name] = module


@dataclass(frozen=True)
class Goal:
    """``value >= bound`` (``at_least``) or ``value <= bound``."""

    bound: float
    at_least: bool = True

    def met(self, value: float) -> bool:
        return value >= self.bound if self.at_least else value <= self.bound

    def __str__(self) -> str:
        return f"{'>=' if self.at_least else '<='} {self.bound:g}"


@dataclass(frozen=True)
class Result:
    name: str
    value: float
    unit: str = ""
    goal: Goal | None = None

    @property
    def verdict(self) -> str:
        """PASS, MISS, or empty where there is no goal."""
        if self.goal is None:
            return ""
        return "PASS" if self.goal.met(self.value) else "MISS"


@dataclass(frozen=True)
class SuiteReport:
    name: str
    results: tuple[Result, ...] = ()
    skipped: str = ""  # why the suite did not run


def interleaved(
    contenders: Mapping[str, Callable[[], object]], rounds: int = 7, round_time: float = 0.02
) -> dict[str, float]:
    """Best seconds per call of each contender, rounds alternating between them.

    Each contender is first calibrated to about ``round_time`` seconds of calls
    per round, so slow and fast contenders see the same machine load.
    """
    seconds = interleaved_rounds(contenders, rounds, round_time)
    return {name: min(samples) for name, samples in seconds.items()}


def interleaved_rounds(
    contenders: Mapping[str, Callable[[], object]], rounds: int = 7, round_time: float = 0.02
) -> dict[str, list[float]]:
    """``interleaved``'s seconds per call of every round, not only the best."""
    repeats = {name: _calibrate(call, round_time) for name, call in contenders.items()}
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, call in contenders.items():
            start = time.perf_counter()
            for _ in range(repeats[name]):
                call()
            seconds[name].append((time.perf_counter() - start) / repeats[name])
    return seconds


def median_ratio(ours: Sequence[float], reference: Sequence[float]) -> float:
    """Throughput of ``ours`` over ``reference``: the median of the per-round ratios.

    Each round's two figures (seconds per unit of work) were taken moments
    apart, so a ratio per round cancels the load of that moment; on a shared
    machine its median moves much less from run to run than the ratio of the
    two best rounds, which can come from two different moments.
    """
    return statistics.median(ref / own for ref, own in zip(reference, ours, strict=True))


def run_suite(name: str, progress: Progress) -> SuiteReport:
    """Import and run one suite; a missing module gives a skipped report."""
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r} (suites: {', '.join(SUITES)})")
    try:
        module = importlib.import_module(SUITES[name])
    except ModuleNotFoundError as missing:
        reason = f"module {missing.name} not found"
        progress(f"{name}: skipped, {reason}")
        return SuiteReport(name, skipped=reason)
    progress(f"{name}: running")
    returned = module.run(progress)
    if isinstance(returned, Mapping):
        returned = _from_mapping(returned, getattr(module, "GOALS", {}))
    return SuiteReport(name, tuple(returned))


def run(
    suites: list[str] | None = None,
    as_json: bool = False,
    out: IO[str] = sys.stdout,
    progress: IO[str] = sys.stderr,
) -> bool:
    """Run ``suites`` (default: all), print a table or JSON to ``out``; True if every goal is met."""

    def say(line: str) -> None:
        print(line, file=progress, flush=True)

    reports = [run_suite(name, say) for name in (suites or list(SUITES))]
    out.write(_json(reports) if as_json else _table(reports))
    return all(r.verdict != "MISS" for report in reports for r in report.results)


def _calibrate(call: Callable[[], object], round_time: float) -> int:
    call()  # warm up
    repeats = 1
    while True:
        start = time.perf_counter()
        for _ in range(repeats):
            call()
        elapsed = time.perf_counter() - start
        if elapsed >= round_time / 4 or repeats >= 1 << 20:
            return max(1, int(repeats * round_time / max(elapsed, 1e-9)))
        repeats *= 4


def _from_mapping(values: Mapping[str, float], goals: Mapping[str, float]) -> list[Result]:
    return [
        Result(name, float(value), goal=Goal(goals[name]) if name in goals else None)
        for name, value in values.items()
    ]


def _table(reports: list[SuiteReport]) -> str:
    lines = [f"{'suite':<8} {'metric':<34} {'value':>12} {'unit':<6} {'goal':<9} verdict"]
    for report in reports:
        if report.skipped:
            lines.append(f"{report.name:<8} skipped: {report.skipped}")
        for r in report.results:
            goal = str(r.goal) if r.goal else ""
            lines.append(
                f"{report.name:<8} {r.name:<34} {r.value:>12.4g} {r.unit:<6} {goal:<9} {r.verdict}"
            )
    return "\n".join(lines) + "\n"


def _json(reports: list[SuiteReport]) -> str:
    document: dict[str, object] = {
        "suites": {rep.name: {r.name: r.value for r in rep.results} for rep in reports},
        "units": {rep.name: {r.name: r.unit for r in rep.results if r.unit} for rep in reports},
        "goals": {
            rep.name: {
                r.name: {"goal": str(r.goal), "pass": r.verdict == "PASS"}
                for r in rep.results
                if r.goal
            }
            for rep in reports
        },
        "skipped": {rep.name: rep.skipped for rep in reports if rep.skipped},
    }
    return json.dumps(document, indent=2) + "\n"
