"""``mktme-sandbox examples``: the 22 experiments shipped in the package, listed,
run one by one or all together; every one PASSes on a fresh sandbox.

run-all is run as a user runs it, without $MKTME_MNT: it mounts a sandbox of
its own (``mktme-sandbox mount DIR --seed 1 --numa-nodes 2``), runs the 22 experiments on it
and unmounts it. Its temporary directory (and the daemon's log in it) goes
under the test's ``tmp_path`` ($TMPDIR). Each experiment also checks by itself
that it gave back what it took (keys, spaces, switches, free pages, mm/check).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mktme_sandbox.examples.run_all import Experiment, experiments, select
from mktme_sandbox.mounting import MountedSandbox

SANDBOX = Path(sys.executable).parent / "mktme-sandbox"
EXPERIMENTS = experiments()


def run(
    *argv: str, env: dict[str, str] | None = None, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*argv],
        env=without_mnt() if env is None else env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def without_mnt(**extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if k != "MKTME_MNT"}, **extra}


def mounts_under(top: Path) -> set[str]:
    """Mounts below ``top``: this test's run-all (TMPDIR=top) and no one else's,
    so a run-all of another test running meanwhile cannot disturb it."""
    with open("/proc/mounts") as f:
        return {line.split()[1] for line in f if line.split()[1].startswith(f"{top}/")}


def test_there_are_twenty_two_experiments_in_the_package() -> None:
    assert [e.number for e in EXPERIMENTS] == list(range(1, 23))
    assert EXPERIMENTS[0].stem == "01-wrong-key"
    assert EXPERIMENTS[0].module == "mktme_sandbox.examples.exp01_wrong_key"


def test_list_shows_number_name_and_title_of_each() -> None:
    done = run(str(SANDBOX), "examples", "list")
    assert done.returncode == 0, done.stderr
    rows = done.stdout.splitlines()
    assert len(rows) == 22
    assert rows[0].split()[:2] == ["1", "wrong-key"]
    assert "wrong key" in rows[0]


def test_an_experiment_is_found_by_number_name_or_file_name() -> None:
    same = {
        select(k) for k in ("3", "03", "address-tweak", "03-address-tweak", "exp03_address_tweak")
    }
    assert len(same) == 1
    with pytest.raises(LookupError, match="examples list"):
        select("quantum")


@pytest.mark.parametrize("experiment", EXPERIMENTS, ids=lambda e: e.stem)
def test_each_experiment_explains_itself_in_help(experiment: Experiment) -> None:
    done = run(sys.executable, "-m", experiment.module, "--help")
    assert done.returncode == 0
    assert "exit status" in done.stdout
    assert "-m MOUNT" in done.stdout


def test_an_experiment_without_a_mount_is_an_error_not_a_failure() -> None:
    done = run(sys.executable, "-m", EXPERIMENTS[0].module)
    assert done.returncode == 2
    assert done.stdout.splitlines()[-1].startswith("VERDICT: ERROR | no mount")


@pytest.mark.parametrize("command", [["run-all"], ["run", "1"], ["tour"]])
def test_a_mountpoint_that_is_not_a_mount_fails_once_in_one_line(
    command: list[str], tmp_path: Path
) -> None:
    done = run(str(SANDBOX), "examples", *command, "-m", str(tmp_path))
    assert done.returncode == 2
    reason = (
        "not an mktme-sandbox mount (no keys/ or dram); mount one with `mktme-sandbox mount DIR`"
    )
    assert done.stderr.splitlines() == [f"mktme-sandbox examples: {tmp_path}: {reason}"]
    assert "VERDICT" not in done.stdout


@pytest.mark.mount
def test_run_one_by_name_on_a_given_mount(mktme_mount: MountedSandbox) -> None:
    done = run(str(SANDBOX), "examples", "run", "replay", "-m", str(mktme_mount.path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "VERDICT: PASS" in done.stdout
    assert "04-replay  PASS" in done.stdout
    assert "run-all: [1/1] 04-replay" in done.stderr


@pytest.mark.mount
def test_experiments_that_need_more_than_a_default_mount_bring_their_own(
    mktme_mount: MountedSandbox,
) -> None:
    """A default mount has one NUMA node, no exclusion range, and a layout that
    earlier work may have scattered: 14, 19 and 20 mount a sandbox of their own
    (examples/lab.py on_a_fresh_sandbox) and PASS there, leaving no mount."""
    mnt = str(mktme_mount.path)
    done = run(str(SANDBOX), "examples", "run-all", "-m", mnt, "-k", "14", "-k", "19", "-k", "20")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr
    assert "3 PASS, 0 FAIL, 0 ERROR of 3" in done.stdout
    assert done.stdout.count(": mounting --seed 1") == 3


@pytest.mark.mount
def test_run_all_mounts_a_sandbox_runs_every_experiment_and_unmounts(tmp_path: Path) -> None:
    done = run(str(SANDBOX), "examples", "run-all", env=without_mnt(TMPDIR=str(tmp_path)))
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr
    summary = done.stdout[done.stdout.index("= summary =") :]
    rows = [line for line in summary.splitlines() if re.match(r"^\d\d-", line)]
    assert len(rows) == 22
    assert all(" PASS " in row for row in rows)
    assert "22 PASS, 0 FAIL, 0 ERROR of 22" in summary
    assert "run-all: unmounting" in done.stdout
    progress = [line for line in done.stderr.splitlines() if line.startswith("run-all: [")]
    assert len(progress) == 22
    assert progress[-1] == "run-all: [22/22] 22-mremap-keyid"
    assert f"run-all: mounted at {tmp_path}/mktme-run-all-" in done.stdout
    assert mounts_under(tmp_path) == set()


@pytest.mark.mount
def test_run_all_json_is_one_document_of_outcomes(mktme_mount: MountedSandbox) -> None:
    mnt = str(mktme_mount.path)
    done = run(str(SANDBOX), "examples", "run-all", "--json", "-k", "wrong", "-k", "ksm", "-m", mnt)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert [o["experiment"] for o in report["outcomes"]] == ["01-wrong-key", "07-ksm"]
    assert {o["verdict"] for o in report["outcomes"]} == {"PASS"}
    assert report["summary"] == "2 PASS, 0 FAIL, 0 ERROR of 2"
