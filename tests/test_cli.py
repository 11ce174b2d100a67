"""The ``mktme-sandbox`` command line (docs/spec.md section 5), as a user runs it.

Option validation runs in-process with click's runner (no daemon starts); the
mount, list and umount tests run the installed command in subprocesses.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

import mktme_sandbox.bench
from mktme_sandbox import daemon
from mktme_sandbox.cli import cli

SCRIPT = Path(sys.executable).with_name("mktme-sandbox")
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "mktme_sandbox.cli"]


def mktme(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMAND, *args], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.fixture
def mountpoint(tmp_path: Path, runtime_dir: Path) -> Iterator[Path]:
    """A mountpoint that is unmounted, and its daemon gone, after the test.

    The daemons started meanwhile log to ``runtime_dir`` (their $XDG_RUNTIME_DIR);
    no log may show a traceback.
    """
    mnt = tmp_path / "mnt"
    yield mnt
    pids = [d.pid for d in daemon.find_daemons() if d.mountpoint == str(mnt)]
    daemon.unmount(mnt)
    assert daemon.wait_for_exit(pids, timeout=10)
    for log in runtime_dir.iterdir():
        assert "Traceback" not in log.read_text(), log.read_text()


# -- validation -----------------------------------------------------------------------

BAD_OPTIONS = {
    "phys-mem not a size": (["--phys-mem", "lots"], "is not a size"),
    "phys-mem too small": (["--phys-mem", "2M"], "phys_mem must be a multiple of 2M between 4M"),
    "phys-mem not 2M-aligned": (["--phys-mem", "5M"], "phys_mem must be a multiple of 2M"),
    "maxphyaddr": (["--maxphyaddr", "60"], "maxphyaddr must be 32..52"),
    "keyid-bits": (["--keyid-bits", "16"], "keyid_bits must be 0..15"),
    "max-keys": (["--max-keys", "2"], "max_keys must be 3..32767"),
    "algorithms": (["--algorithms", "aes-xts-512"], "algorithms must be a non-empty subset"),
    "cache-size": (
        ["--cache-size", "100K"],
        "cache_size must be 0 (no cache) or a multiple of 64K",
    ),
    "seed": (["--seed", "-1"], "expected an integer >= 0"),
    "seed not a number": (["--seed", "x"], "expected an integer >= 0"),
    "phys-mem over the keyid bits": (
        ["--phys-mem", "64G", "--maxphyaddr", "36"],
        "does not fit below the KeyID bits",
    ),
}


@pytest.mark.parametrize(("args", "message"), BAD_OPTIONS.values(), ids=list(BAD_OPTIONS))
def test_a_bad_mount_option_is_refused_with_a_clear_message_and_no_daemon(
    tmp_path: Path, args: list[str], message: str
) -> None:
    result = CliRunner().invoke(cli, ["mount", str(tmp_path / "mnt"), *args])
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "mnt").exists()


def test_help_names_every_command() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for command in ("mount", "umount", "list", "bench"):
        assert command in result.output


def test_version_is_the_package_version() -> None:
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert result.output == f"mktme-sandbox, version {mktme_sandbox.__version__}\n"


def test_bench_help_names_every_suite() -> None:
    result = CliRunner().invoke(cli, ["bench", "--help"])
    assert result.exit_code == 0
    for suite in mktme_sandbox.bench.SUITES:
        assert f"  {suite}  " in result.output


def test_mount_help_states_the_rule_of_every_sized_option() -> None:
    """The rules are those ``MachineConfig.validate`` enforces."""
    text = " ".join(CliRunner().invoke(cli, ["mount", "--help"]).output.split())
    for rule in ("multiple of 2M from 4M to 64G", "32..52", "0..15", "3..32767", "multiple of 64K"):
        assert rule in text


def test_bench_passes_the_named_suites_to_sandbox_bench_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = []
    monkeypatch.setattr(
        mktme_sandbox.bench, "run", lambda *args, **kwargs: calls.append((args, kwargs))
    )
    result = CliRunner().invoke(cli, ["bench", "fs", "--json"])
    assert result.exit_code == 0, result.output
    assert calls
    assert calls[0][0] == (["fs"],)
    assert calls[0][1]["as_json"] is True


def test_bench_refuses_an_unknown_suite() -> None:
    result = CliRunner().invoke(cli, ["bench", "nosuch"])
    assert result.exit_code == 2
    assert "unknown suite nosuch" in result.output


def test_umount_of_a_directory_that_is_not_mounted_says_so_and_succeeds(tmp_path: Path) -> None:
    done = mktme("umount", str(tmp_path))
    assert done.returncode == 0
    assert "is not mounted" in done.stdout


# -- mount, list, umount --------------------------------------------------------------


@pytest.mark.mount
def test_mount_prints_the_pid_then_list_shows_it_and_umount_ends_it(
    mountpoint: Path, runtime_dir: Path
) -> None:
    done = mktme("mount", str(mountpoint), "--phys-mem", "8M", "--seed", "1")
    assert done.returncode == 0, done.stderr
    pid = int(done.stdout.strip())
    log = Path(done.stderr.split("daemon log:")[1].strip())
    assert log.parent == runtime_dir
    assert (mountpoint / "README").read_text()
    listed = mktme("list").stdout
    row = next(line for line in listed.splitlines() if line.split()[0] == str(pid))
    assert row.split()[1] == "8M"
    assert row.split()[-1] == str(mountpoint)
    entry = next(d for d in json.loads(mktme("list", "--json").stdout) if d["pid"] == pid)
    assert entry["phys_mem"] == 8 << 20
    assert entry["mountpoint"] == str(mountpoint)
    assert entry["rss"] > 0
    assert entry["uptime"] >= 0
    assert entry["log"] == str(log)
    done = mktme("umount", str(mountpoint))
    assert done.returncode == 0
    assert "unmounted" in done.stdout
    assert daemon.wait_for_exit([pid], timeout=0)
    assert not daemon.is_mounted(mountpoint)
    said = (
        Path(done.stderr.split("daemon log:")[-1].strip()) if "daemon log:" in done.stderr else None
    )
    assert said is None or "Traceback" not in said.read_text()


@pytest.mark.mount
def test_mount_creates_a_missing_mountpoint_and_refuses_a_second_mount_there(
    mountpoint: Path,
) -> None:
    assert not mountpoint.exists()
    assert mktme("mount", str(mountpoint), "--phys-mem", "8M").returncode == 0
    again = mktme("mount", str(mountpoint), "--phys-mem", "8M")
    assert again.returncode == 1
    assert "already serves a sandbox" in again.stderr


@pytest.mark.mount
def test_after_kill_9_umount_recovers_the_stale_mount(mountpoint: Path) -> None:
    pid = int(mktme("mount", str(mountpoint), "--phys-mem", "8M").stdout)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: daemon.is_stale(mountpoint))
    done = mktme("umount", str(mountpoint))
    assert done.returncode == 0, done.stderr
    assert not daemon.is_mounted(mountpoint)


@pytest.mark.mount
def test_after_kill_9_a_new_mount_at_the_same_place_recovers(mountpoint: Path) -> None:
    pid = int(mktme("mount", str(mountpoint), "--phys-mem", "8M").stdout)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: daemon.is_stale(mountpoint))
    done = mktme("mount", str(mountpoint), "--phys-mem", "8M")
    assert done.returncode == 0, done.stderr
    assert (mountpoint / "README").read_text()


@pytest.mark.mount
def test_umount_removes_the_log_of_a_daemon_that_exited_cleanly(
    mountpoint: Path, runtime_dir: Path
) -> None:
    done = mktme("mount", str(mountpoint), "--phys-mem", "8M")
    assert done.returncode == 0, done.stderr
    log = Path(done.stderr.split("daemon log:")[1].strip())
    assert log.exists()
    assert mktme("umount", str(mountpoint)).returncode == 0
    assert not log.exists()
    assert list(runtime_dir.iterdir()) == []


@pytest.mark.mount
def test_a_daemon_that_cannot_mount_fails_the_command_with_its_log_tail(mountpoint: Path) -> None:
    blocker = mountpoint.with_name("not-a-dir")
    blocker.write_text("")
    done = mktme("mount", str(blocker), "--phys-mem", "8M")
    assert done.returncode != 0
    assert "not-a-dir" in done.stderr


def wait_for(condition: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


@pytest.mark.parametrize(
    ("args", "env", "stdin"),
    [
        (["--seed", "secret42x"], {}, None),
        ([], {"MKTME_SEED": "\u00b9secret42x"}, None),
        (["--seed-file", "-"], {}, "secret42x\n"),
    ],
    ids=["option", "environment", "file"],
)
def test_a_bad_seed_is_refused_without_showing_it(
    tmp_path: Path, args: list[str], env: dict[str, str], stdin: str | None
) -> None:
    """The seed is a secret (docs/spec.md 8): a refusal never repeats it."""
    result = CliRunner().invoke(cli, ["mount", str(tmp_path / "m"), *args], env=env, input=stdin)
    assert result.exit_code == 2
    assert "secret42x" not in result.output
    assert "integer >= 0" in result.output
