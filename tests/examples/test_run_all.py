"""examples/run-all and the experiments: every one PASSes on a fresh sandbox.

run-all is run as a user runs it, without $MKTME_MNT: it mounts a sandbox of
its own (``mktme-sandbox mount DIR --seed 1``), runs the 13 experiments on it
and unmounts it. Its temporary directory (and the daemon's log in it) goes
under the test's ``tmp_path`` ($TMPDIR). Each experiment also checks by itself that it gave back what
it took (keys, spaces, switches, free pages, mm/check).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
EXPERIMENTS = sorted(EXAMPLES.glob("[0-9][0-9]-*.py"))


def run(
    *argv: str, env: dict[str, str] | None = None, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*argv],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def without_mnt(**extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if k != "MKTME_MNT"}, **extra}


def run_all_mounts() -> set[str]:
    """Mounts that run-all made (its temporary directories are mktme-run-all-*)."""
    with open("/proc/mounts") as f:
        return {line.split()[1] for line in f if "/mktme-run-all-" in line.split()[1]}


def test_there_are_thirteen_experiments() -> None:
    assert [p.name[:2] for p in EXPERIMENTS] == [f"{n:02d}" for n in range(1, 14)]


@pytest.mark.parametrize("script", EXPERIMENTS, ids=lambda p: p.stem)
def test_each_experiment_explains_itself_in_help(script: Path) -> None:
    done = run(sys.executable, str(script), "--help")
    assert done.returncode == 0
    assert "exit status" in done.stdout and "-m MOUNT" in done.stdout


def test_an_experiment_without_a_mount_is_an_error_not_a_failure() -> None:
    done = run(sys.executable, str(EXPERIMENTS[0]), env=without_mnt())
    assert done.returncode == 2
    assert done.stdout.splitlines()[-1].startswith("VERDICT: ERROR | no mount")


def test_run_all_against_a_directory_that_is_not_a_mount_exits_2(tmp_path: Path) -> None:
    done = run(str(EXAMPLES / "run-all"), "-m", str(tmp_path), "-k", "01")
    assert done.returncode == 2
    assert re.search(r"^1\. .*ERROR", done.stdout, re.MULTILINE)


@pytest.mark.mount
def test_run_all_mounts_a_sandbox_runs_every_experiment_and_unmounts(tmp_path: Path) -> None:
    before = run_all_mounts()
    done = run(str(EXAMPLES / "run-all"), env=without_mnt(TMPDIR=str(tmp_path)))
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr
    summary = done.stdout[done.stdout.index("= summary =") :]
    rows = [line for line in summary.splitlines() if re.match(r"^\d+\. ", line)]
    assert len(rows) == 13 and all(" PASS " in row for row in rows)
    assert "13 PASS, 0 FAIL, 0 ERROR of 13" in summary
    assert "run-all: unmounting" in done.stdout
    assert run_all_mounts() == before
