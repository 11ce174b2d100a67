"""The recorder's parser on a recorded ``perf script`` sample (sh running ls and cat)."""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from mktme_sandbox.bench.perf_trace import (
    Event,
    Mappings,
    parse_perf_script,
    read_trace,
    write_trace,
)
from mktme_sandbox.cli import cli

SAMPLE = Path(__file__).parent / "data" / "perf-script-sample.txt"
EVENTS = list(parse_perf_script(SAMPLE.read_text().splitlines()))


def test_the_sample_gives_every_process_its_fork_exec_and_exit() -> None:
    tree = [e.line() for e in EVENTS if e.kind in "FEX"]
    assert tree == [
        "F 0 1267 0", "E 0 1267 sh", "F 846 1273 1267", "E 4883 1273 ls", "X 7424 1273",
        "F 8095 1274 1267", "F 8268 1275 1267", "X 8413 1274", "E 8626 1275 cat",
        "X 11594 1275", "X 11832 1267",
    ]  # fmt: skip


def test_every_fault_of_the_sample_is_kept_and_classified() -> None:
    faults = sum("page-faults:" in line for line in SAMPLE.read_text().splitlines())
    kinds = Counter(e.kind for e in EVENTS)
    assert kinds["a"] + kinds["f"] == faults
    assert kinds == Counter({"f": 216, "M": 112, "a": 97, "F": 4, "X": 4, "E": 3})


def test_a_fault_in_the_stack_is_anonymous_and_one_in_libc_is_file_backed() -> None:
    first_sh_faults = [e for e in EVENTS if e.kind in "af" and e.pid == 1267][:3]
    assert [(e.kind, e.value) for e in first_sh_faults] == [
        ("f", 0x55A09A260),  # /usr/bin/dash
        ("f", 0x7FB53FE25),  # ld.so
        ("a", 0x7FFCB93E0),  # [stack]
    ]


def test_a_later_mapping_replaces_the_part_it_covers() -> None:
    mappings = Mappings()
    mappings.add(0x1000, 0x5000, anonymous=False)
    mappings.add(0x2000, 0x3000, anonymous=True)
    assert mappings.starts == [0x1000, 0x2000, 0x3000]
    assert [mappings.anonymous_at(a) for a in (0x1000, 0x2FFF, 0x3000, 0x9000)] == [
        False, True, False, True,
    ]  # fmt: skip


def test_a_thread_is_not_a_process() -> None:
    lines = [
        "sh 10/10 1.000000: PERF_RECORD_COMM exec: sh:10/10",
        "sh 10/10 1.000001: PERF_RECORD_FORK(10:11):(10:10)",
        "sh 10/11 1.000002: PERF_RECORD_EXIT(10:11):(10:10)",
        "sh 10/10 1.000003: PERF_RECORD_EXIT(10:10):(1:1)",
    ]
    assert [e.line() for e in parse_perf_script(lines)] == ["F 0 10 0", "E 0 10 sh", "X 3 10"]


def test_the_trace_file_reads_back_what_was_written(tmp_path: Path) -> None:
    counts = write_trace(tmp_path / "t.gz", EVENTS, "sh -c ...")
    assert list(read_trace(tmp_path / "t.gz")) == EVENTS
    assert sum(counts.values()) == len(EVENTS)
    assert all(Event.parse(e.line()) == e for e in EVENTS)


@pytest.mark.skipif(
    shutil.which("perf") is None or os.geteuid() != 0, reason="needs perf, run as root"
)
def test_trace_record_writes_the_trace_of_a_command_and_exits_with_its_status(
    tmp_path: Path,
) -> None:
    out = tmp_path / "t.gz"
    result = CliRunner().invoke(
        cli, ["trace", "record", "-o", str(out), "--", "sh", "-c", "exit 3"]
    )
    assert result.exit_code == 3, result.output
    events = list(read_trace(out))
    assert [e.line() for e in events if e.kind in "FEX"][:2] == [
        f"F 0 {events[0].pid} 0",
        f"E 0 {events[0].pid} sh",
    ]
    assert any(e.kind == "a" for e in events)


@pytest.mark.parametrize(
    ("output", "command", "status", "line"),
    [
        ("{tmp}/t.gz", "/nonexistent", 127, ("Error: [Errno 2] No such file or directory: "
         "/nonexistent: command not found")),
        ("{tmp}/no/t.gz", "true", 1, ("Error: [Errno 2] No such file or directory: "
         "{tmp}/no/t.gz: no such directory {tmp}/no")),
        ("{tmp}/file/t.gz", "true", 1, ("Error: [Errno 20] Not a directory: "
         "{tmp}/file/t.gz: {tmp}/file is not a directory")),
    ],
)  # fmt: skip
def test_trace_record_checks_its_command_and_output_in_one_line_before_perf(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    output: str,
    command: str,
    status: int,
    line: str,
) -> None:
    """A shell's 127 for a command not found; no directory is created."""
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setattr("shutil.which", _which_but_no_perf)
    out = output.format(tmp=tmp_path)
    result = CliRunner().invoke(cli, ["trace", "record", "-o", out, "--", command])
    assert (result.exit_code, result.output.splitlines()) == (status, [line.format(tmp=tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def _which_but_no_perf(name: str) -> str | None:
    """shutil.which, with perf missing: the checks must come before perf is looked for."""
    assert name != "perf", "perf was looked for before the arguments were checked"
    return _WHICH(name)


_WHICH = shutil.which
