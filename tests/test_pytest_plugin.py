"""The pytest plugin, used the way another project uses it (issue 6, docs/spec.md section 6).

Each test writes a test file into a temporary project (``pytester``) that has no
conftest and runs pytest on it, so the plugin arrives through the ``pytest11``
entry point exactly as it does after ``pip install mktme-sandbox``. After every
run, nothing may be left: no mount under the project, no daemon whose command
line names it. The ``project`` fixture removes whatever a broken plugin leaves
behind, so a failure here never leaks mounts into the machine.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mktme_sandbox import mounting
from mktme_sandbox.daemon import is_mounted
from mktme_sandbox.mounting import FUSERMOUNT

pytest_plugins = ["pytester"]

RUN_TIMEOUT = 120  # seconds for one inner pytest run; they take a few


# --- what a run may leave behind ---------------------------------------------------


def _mounts_under(root: Path) -> list[str]:
    """Mount points under ``root`` (our paths need no unescaping of mountinfo's \\ooo)."""
    with open("/proc/self/mountinfo", encoding="utf-8") as info:
        points = [line.split()[4] for line in info]
    return [point for point in points if point.startswith(f"{root}/")]


def _is_running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _daemons_under(root: Path) -> list[int]:
    """Running processes with ``mount`` and a path under ``root`` in their command line."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        named = any(arg.startswith(f"{root}/".encode()) for arg in argv)
        if proc.name.isdigit() and b"mount" in argv and named and _is_running(int(proc.name)):
            pids.append(int(proc.name))
    return pids


def _clean_up(root: Path) -> None:
    for pid in _daemons_under(root):
        os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):  # our child after an in-process run
            os.waitpid(pid, 0)
    for point in _mounts_under(root):
        subprocess.run([FUSERMOUNT, "-u", "-z", point], capture_output=True, check=False)


def assert_nothing_left(root: Path) -> None:
    assert _mounts_under(root) == []
    assert _daemons_under(root) == []


@pytest.fixture
def project(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> Iterator[pytest.Pytester]:
    """A temporary project with no conftest; this test's xdist worker does not leak into it."""
    for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_ADDOPTS"):
        monkeypatch.delenv(name, raising=False)
    try:
        yield pytester
    finally:
        _clean_up(pytester.path)


def run(project: pytest.Pytester, *args: str) -> pytest.RunResult:
    """pytest in a new process, as a user runs it."""
    return project.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=RUN_TIMEOUT)


def run_in_process(project: pytest.Pytester, *args: str) -> pytest.RunResult:
    """pytest in this process: it sees monkeypatches, and its daemons are our children."""
    basetemp = f"--basetemp={project.path / 'basetemp'}"
    return project.runpytest_inprocess("-p", "no:cacheprovider", basetemp, *args)


# --- every fixture, in a project that only installed the package ----------------------

EVERY_FIXTURE = """
import errno
import re

import pytest


def test_machine_has_the_plugin_default_of_64M(mktme_machine):
    assert mktme_machine.phys_mem == 64 << 20
    assert mktme_machine.nr_keyids == 63


@pytest.mark.mktme(keyid_bits=3, seed=1)
def test_machine_takes_options_from_the_marker(mktme_machine):
    assert mktme_machine.nr_keyids == 7
    assert mktme_machine.config.seed == 1


def test_machine_factory_makes_machines_with_other_options(mktme_machine_factory):
    small = mktme_machine_factory(phys_mem="32M", keyid_bits=2)
    other = mktme_machine_factory()
    assert (small.phys_mem, small.nr_keyids) == (32 << 20, 3)
    assert other is not small and other.phys_mem == 64 << 20


def test_mount_is_a_sandbox_under_tmp_path(mktme_mount, tmp_path):
    assert mktme_mount.path.parent == tmp_path
    assert "mktme" in mktme_mount.dmesg()
    mktme_mount.program_key(1)
    assert "state=programmed" in mktme_mount.read_text("keys/1")
    mktme_mount.create_space("victim")
    mktme_mount.map("victim", 0x10000, 4096, keyid=1, populate=True)
    mktme_mount.write_bytes("spaces/victim/mem", 0x10000, b"secret")
    assert mktme_mount.read_bytes("spaces/victim/mem", 0x10000, 6) == b"secret"
    assert re.search(r"KeyID:\\s+1\\b", mktme_mount.read_text("spaces/victim/smaps"))
    assert mktme_mount.check() == []


def test_mount_rejects_a_command_with_its_errno(mktme_mount):
    mktme_mount.create_space("s")
    with pytest.raises(OSError) as rejected:
        mktme_mount.write_ctl("spaces/s/ctl", "mmap 0x10001 4096 rw-")
    assert rejected.value.errno == errno.EINVAL
    assert "spaces/s/ctl" in str(rejected.value)


@pytest.mark.mktme(keyid_bits=3)
def test_mount_takes_options_from_the_marker(mktme_mount):
    keys = sorted(int(path.name) for path in (mktme_mount.path / "keys").iterdir())
    assert keys == list(range(1, 8))


def test_mount_factory_mounts_several_sandboxes(mktme_mount_factory):
    first = mktme_mount_factory()
    second = mktme_mount_factory(keyid_bits=2, seed=3)
    assert first.path != second.path and first.pid != second.pid
    assert len(list((second.path / "keys").iterdir())) == 3
    assert first.check() == second.check() == []
"""


@pytest.mark.mount
def test_every_fixture_works_in_a_project_without_conftest(project: pytest.Pytester) -> None:
    project.makepyfile(test_user=EVERY_FIXTURE)
    result = run(project, "--strict-markers")
    result.assert_outcomes(passed=7)
    assert_nothing_left(project.path)


# --- the example of docs/pytest-plugin.md, verbatim -------------------------------------

DOCS = Path(__file__).parent.parent / "docs" / "pytest-plugin.md"


def _documented_example() -> str:
    """The last ```python block of the guide: another project's whole test file."""
    blocks: list[str] = re.findall(
        r"^```python\n(.*?)^```$", DOCS.read_text(), re.MULTILINE | re.DOTALL
    )
    return blocks[-1]


@pytest.mark.mount
def test_the_documented_example_passes_as_it_is_written(project: pytest.Pytester) -> None:
    project.makepyfile(test_mktme_isolation=_documented_example())
    result = run(project, "-n", "2")
    result.assert_outcomes(passed=4)
    assert_nothing_left(project.path)


# --- failures: the mount is cleaned up, the log is attached ---------------------------

FAILING = """
def test_fails_in_its_body(mktme_mount):
    mktme_mount.program_key(1)
    assert mktme_mount.read_text("keys/1") == "not what the sandbox says"


def test_fails_setting_up_its_second_sandbox(mktme_mount_factory):
    mktme_mount_factory()
    mktme_mount_factory(phys_mem="3M")


def test_daemon_traceback_fails_the_test(mktme_mount):
    with open(mktme_mount.log_path, "a") as log:
        log.write("Traceback (most recent call last):\\n  planted\\nRuntimeError: planted\\n")


def test_daemon_error_line_fails_the_test(mktme_mount):
    with open(mktme_mount.log_path, "a") as log:
        log.write("2026-01-01 mktme-sandbox[1] ERROR internal error in write: KeyError\\n")
"""


@pytest.mark.mount
def test_failing_tests_still_unmount_and_show_the_daemon_log(project: pytest.Pytester) -> None:
    project.makepyfile(test_user=FAILING)
    result = run(project)
    result.assert_outcomes(failed=2, passed=2, errors=2)
    result.stdout.fnmatch_lines(
        [
            "*_ test_fails_in_its_body _*",
            "*- mktme daemon log */test_fails_in_its_body0/mktme0.log -*",
            "$ *mktme_sandbox.cli mount --foreground --phys-mem 64M */test_fails_in_its_body0/mktme0",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*_ test_fails_setting_up_its_second_sandbox _*",
            "*ValueError: phys_mem must be a multiple of 2M between 4M and 64G, not 3M",
            "*- mktme daemon log */mktme0.log -*",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*_ ERROR at teardown of test_daemon_traceback_fails_the_test _*",
            "*MountError: the mktme daemon of * logged: 'Traceback (most recent call last):'*",
            "*RuntimeError: planted",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*_ ERROR at teardown of test_daemon_error_line_fails_the_test _*",
            "*MountError: * logged: '2026-01-01 mktme-sandbox[[]1] ERROR internal error in write:*",
        ]
    )
    assert_nothing_left(project.path)


@pytest.mark.mount
def test_a_daemon_that_never_comes_up_is_stopped_and_reported(project: pytest.Pytester) -> None:
    project.makepyfile(test_user="def test_never_runs(mktme_mount):\n    raise AssertionError\n")
    result = run(project, "--mktme-mount-timeout=0")  # stopped while it starts
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "*MountError: mktme daemon (log */mktme0.log): * did not answer within 0 s",
            "*- mktme daemon log */mktme0.log -*",
        ]
    )
    assert_nothing_left(project.path)


# --- no FUSE: skipped with the reason; the in-process machine still works --------------

MOUNTS = """
def test_mount(mktme_mount):
    raise AssertionError("never runs without FUSE")


def test_mount_factory(mktme_mount_factory):
    raise AssertionError("never runs without FUSE")
"""
MACHINE = """
def test_machine_needs_no_fuse(mktme_machine):
    assert mktme_machine.nr_keyids == 63
"""


def test_without_fusermount3_mounts_are_skipped_with_the_reason(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = project.mkdir("empty-path")
    monkeypatch.setenv("PATH", str(empty))  # the inner pytest finds no fusermount3
    project.makepyfile(test_user=MOUNTS + MACHINE)
    result = run(project, "-rs")
    result.assert_outcomes(passed=1, skipped=2)
    reason = "FUSE is not available: fusermount3 is not on PATH (install fuse3)"
    result.stdout.fnmatch_lines([f"SKIPPED * {reason}"] * 2)


def test_without_dev_fuse_mounts_are_skipped_with_the_reason(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = project.path / "no" / "fuse"
    monkeypatch.setattr(mounting, "FUSE_DEVICE", str(missing))
    project.makepyfile(test_user=MOUNTS)
    result = run_in_process(project, "-rs")
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines([f"SKIPPED * FUSE is not available: {missing} does not exist"] * 2)


# --- options: command line, ini, marker ---------------------------------------------

OPTIONS = """
import pytest


def test_defaults_come_from_command_line_and_ini(mktme_machine):
    assert mktme_machine.phys_mem == 32 << 20
    assert mktme_machine.config.seed == 7


@pytest.mark.mktme(phys_mem="16M")
class TestMarkers:
    @pytest.mark.mktme(phys_mem=8 << 20, keyid_bits=1)
    def test_the_closest_marker_wins(self, mktme_machine):
        assert mktme_machine.phys_mem == 8 << 20
        assert mktme_machine.nr_keyids == 1

    def test_a_class_marker_beats_the_defaults(self, mktme_machine):
        assert mktme_machine.phys_mem == 16 << 20
        assert mktme_machine.config.seed == 7

    def test_a_factory_keyword_beats_the_marker(self, mktme_machine_factory):
        assert mktme_machine_factory(phys_mem="4M").phys_mem == 4 << 20


@pytest.mark.mktme(colour="red")
def test_an_unknown_option_is_an_error(mktme_machine):
    raise AssertionError("never runs")
"""


def test_options_come_from_command_line_ini_marker_and_factory(project: pytest.Pytester) -> None:
    project.makeini("[pytest]\nmktme_seed = 7\nmktme_phys_mem = 128M\n")
    project.makepyfile(test_user=OPTIONS)
    result = run(project, "--strict-markers", "--mktme-phys-mem=32M")
    result.assert_outcomes(passed=4, errors=1)
    result.stdout.fnmatch_lines(["*TypeError: unknown option colour (known: phys_mem,*"])


def test_a_bad_default_is_a_usage_error(project: pytest.Pytester) -> None:
    project.makepyfile(test_user="def test_nothing():\n    pass\n")
    result = run(project, "--mktme-phys-mem=lots")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*mktme-sandbox options: 'lots' is not a size*"])


# --- debugging: --mktme-keep-mount ----------------------------------------------------


@pytest.mark.mount
def test_keep_mount_leaves_the_mount_running_and_says_how_to_remove_it(
    project: pytest.Pytester,
) -> None:
    project.makepyfile(test_user="def test_keeps(mktme_mount):\n    mktme_mount.program_key(2)\n")
    result = run_in_process(project, "--mktme-keep-mount")
    result.assert_outcomes(passed=1)
    kept = re.search(
        r"mktme mount kept at (\S+) \(daemon pid (\d+)\); unmount with: mktme-sandbox umount \1",
        result.stdout.str(),
    )
    assert kept is not None, result.stdout.str()
    path, pid = Path(kept.group(1)), int(kept.group(2))
    try:
        assert is_mounted(path)
        assert _is_running(pid)
        assert "state=programmed" in (path / "keys" / "2").read_text()
    finally:
        os.kill(pid, signal.SIGTERM)
        _reap(pid)
    assert_nothing_left(project.path)


def _reap(pid: int, timeout: float = 10.0) -> None:
    """Wait for our child ``pid`` to exit (subprocess may already have reaped it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG) != (0, 0):
                return
        except ChildProcessError:
            if not _is_running(pid):
                return
        time.sleep(0.05)
    raise AssertionError(f"daemon {pid} did not exit on SIGTERM")


# --- pytest-xdist: every worker its own mounts -------------------------------------------

XDIST = """
import os
from pathlib import Path

import pytest

SEEN = Path(__file__).parent / "seen"


@pytest.mark.parametrize("n", range(4))
def test_each_worker_mounts_its_own(mktme_mount, n):
    SEEN.mkdir(exist_ok=True)
    (SEEN / str(n)).write_text(f"{os.environ['PYTEST_XDIST_WORKER']} {mktme_mount.path}")
    mktme_mount.program_key(1)
    assert mktme_mount.check() == []
"""


@pytest.mark.mount
def test_under_xdist_each_worker_mounts_its_own(project: pytest.Pytester) -> None:
    project.makepyfile(test_user=XDIST)
    result = run(project, "-n", "2")
    result.assert_outcomes(passed=4)
    seen = [line.split() for line in map(Path.read_text, (project.path / "seen").iterdir())]
    workers, paths = {worker for worker, _ in seen}, {path for _, path in seen}
    assert workers == {"gw0", "gw1"}
    assert len(paths) == 4
    assert_nothing_left(project.path)


# --- mounted(): the same mount without the fixtures -----------------------------------


@pytest.mark.mount
def test_mounted_mounts_for_the_with_block_only(tmp_path: Path) -> None:
    try:
        with mounting.mounted(tmp_path / "mnt", seed=1, keyid_bits=2) as sandbox:
            assert is_mounted(sandbox.path)
            assert _is_running(sandbox.pid)
            assert sorted(os.listdir(sandbox.path / "keys")) == ["1", "2", "3"]
            assert sandbox.log_path == tmp_path / "mnt.log"
        assert not is_mounted(sandbox.path)
        assert not _is_running(sandbox.pid)
        command = sandbox.log_path.read_text().partition("\n")[0]
        assert "--keyid-bits 2" in command
        assert "--seed" not in command
    finally:
        _clean_up(tmp_path)


KEY = "a1b2c3d4e5f60718293a4b5c6d7e8f90"


@pytest.mark.mount
def test_a_rejected_user_key_is_redacted_in_the_exception(tmp_path: Path) -> None:
    payload = f"type=user algorithm=aes-xts-128 key={KEY} tweak={KEY}"  # equal: EINVAL
    try:
        with (
            mounting.mounted(tmp_path / "mnt", phys_mem="16M", keyid_bits=2) as sandbox,
            pytest.raises(OSError, match="EINVAL") as rejected,
        ):
            sandbox.program_key(1, payload)
    finally:
        _clean_up(tmp_path)
    text = f"{rejected.value} {rejected.value!r} {rejected.value.args}"
    assert KEY not in text
    assert "'type=user algorithm=aes-xts-128 key=<redacted> tweak=<redacted>' rejected" in text
    assert "keys/1: EINVAL" in text  # the dmesg reason is still there


# --- the shared mount: one daemon, restored before each test ---------------------------

SHARED = """
import os

import pytest

SEEN = {}


@pytest.mark.parametrize("n", range(4))
def test_every_test_starts_from_the_fresh_machine(mktme_shared_mount, n):
    m = mktme_shared_mount
    SEEN.setdefault("pid", m.pid)
    assert m.pid == SEEN["pid"]  # one daemon for every test
    assert os.listdir(m.path / "spaces") == []
    assert all("state=free" in line for line in m.read_text("keys/1").splitlines())
    assert m.check() == []
    m.program_key(1)
    m.create_space(f"left-by-{n}")
    m.map(f"left-by-{n}", 0x10000000, 0x4000, keyid=1)


@pytest.mark.mktme(keyid_bits=2)
def test_other_options_get_their_own_shared_mount(mktme_shared_mount):
    assert sorted(os.listdir(mktme_shared_mount.path / "keys")) == ["1", "2", "3"]
    assert os.listdir(mktme_shared_mount.path / "spaces") == []
"""


@pytest.mark.mount
def test_the_shared_mount_is_one_daemon_restored_before_each_test(
    project: pytest.Pytester,
) -> None:
    if os.getuid() != 0:
        pytest.skip("restoring a snapshot is for root only; elsewhere it is mktme_mount")
    project.makepyfile(test_user=SHARED)
    result = run(project)
    result.assert_outcomes(passed=5)
    assert_nothing_left(project.path)
