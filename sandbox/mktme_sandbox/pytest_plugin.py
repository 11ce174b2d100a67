"""MKTME machines as pytest fixtures, for this project's tests and everyone else's.

Registered through the ``pytest11`` entry point (SPEC section 6), so installing
``mktme-sandbox`` is all a project needs; no conftest. The fixtures:

``mktme_machine`` / ``mktme_machine_factory(**options)``
    an in-process ``sandbox.Machine``; no FUSE needed.
``mktme_mount`` / ``mktme_mount_factory(**options)``
    a real mount under ``tmp_path``: ``mktme-sandbox mount MNT --foreground`` in a
    subprocess, waited for until the mount answers, always unmounted (also when
    the test or the setup fails), its daemon log attached to the report of a
    failed test and searched for tracebacks and errors at teardown. Skipped,
    with the reason stated, where ``/dev/fuse`` or ``fusermount3`` is missing.
    A mount is a ``MountedSandbox``: the stdlib client's ``Mount``
    (``mktme_sandbox.client``) plus the daemon's pid and log.

Options are the ones of ``mktme-sandbox mount`` (SPEC section 5) in Python form:
``phys_mem="64M"`` (or an int), ``maxphyaddr``, ``keyid_bits``, ``max_keys``,
``algorithms``, ``tme_bypass``, ``cache_size``, ``seed``, and ``allow_other`` for
mounts. They come from, weakest first: the command line / ini defaults
(``--mktme-phys-mem``, ``--mktme-seed``), the ``@pytest.mark.mktme(...)``
markers of the test (closest wins), the keywords of a factory call. Options are
validated by ``MachineConfig`` before any daemon starts.

All fixtures use one mechanism, ``_Sandboxes``: one per test, an ``ExitStack``
that closes every machine and mount it made. Outside pytest, ``mounted()`` is
the same mount as a context manager; other tests of this project use it. The
daemon's argv, the wait for the mount and ``fusermount3 -u`` are
``mktme_sandbox.daemon``'s; this module adds the stop sequence (SIGTERM, unmount,
SIGKILL), the check of the log and the fixtures.

Left out: session-scoped mounts (each test gets fresh machines; a mount costs
about a second) and mounts on anything but Linux.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import pytest

from mktme_sandbox import daemon
from mktme_sandbox.client import Mount, redacted
from mktme_sandbox.config import MachineConfig, parse_size

if TYPE_CHECKING:
    from mktme_sandbox.machine import Machine

__all__ = [
    "MountError",
    "MountedSandbox",
    "fuse_unavailable_reason",
    "machine_config",
    "mounted",
    "redacted",
]

FUSE_DEVICE = "/dev/fuse"
FUSERMOUNT = daemon.FUSERMOUNT
DEFAULT_PHYS_MEM = "64M"
DEFAULT_MOUNT_TIMEOUT = 30.0
# What a healthy daemon never logs: a traceback, or an ERROR line.
DAEMON_TROUBLE = daemon.LOG_TROUBLE

_SIZE_OPTIONS = ("phys_mem", "cache_size")
_MACHINE_OPTIONS = tuple(f.name for f in fields(MachineConfig))
_MOUNT_OPTIONS = ("allow_other",)


class MountError(daemon.DaemonError):
    """The daemon did not come up, or it logged a traceback or an error; the text says which."""


# --- options -----------------------------------------------------------------


def machine_config(options: Mapping[str, Any]) -> MachineConfig:
    """``{"phys_mem": "64M", "algorithms": "aes-xts-128"}`` -> a validated ``MachineConfig``.

    Mount-only options (``allow_other``) are ignored; unknown names raise ``TypeError``.
    """
    unknown = sorted(set(options) - set(_MACHINE_OPTIONS) - set(_MOUNT_OPTIONS))
    if unknown:
        known = ", ".join(_MACHINE_OPTIONS + _MOUNT_OPTIONS)
        raise TypeError(f"unknown mktme option {', '.join(unknown)} (known: {known})")
    values = {name: _normalize(name, v) for name, v in options.items() if name in _MACHINE_OPTIONS}
    return MachineConfig(**values)


def _normalize(name: str, value: Any) -> Any:
    if name in _SIZE_OPTIONS and isinstance(value, str):
        return parse_size(value)
    if name == "algorithms":
        parts = value.split(",") if isinstance(value, str) else value
        return tuple(part.strip() for part in parts)
    return value


# --- FUSE availability and mount state ---------------------------------------


def fuse_unavailable_reason() -> str | None:
    """Why a mount cannot work here, as a skip reason; ``None`` when it can."""
    if not os.path.exists(FUSE_DEVICE):
        return f"FUSE is not available: {FUSE_DEVICE} does not exist"
    if not os.access(FUSE_DEVICE, os.R_OK | os.W_OK):
        who = f"uid {os.getuid()}"
        return f"FUSE is not available: {FUSE_DEVICE} is not readable and writable by {who}"
    if shutil.which(FUSERMOUNT) is None:
        return f"FUSE is not available: {FUSERMOUNT} is not on PATH (install fuse3)"
    return None


# --- one mount -----------------------------------------------------------------


class MountedSandbox(Mount):
    """A running ``mktme-sandbox`` mount: the client's ``Mount`` (every helper of
    ``mktme_sandbox.client``: ``program_key``, ``create_space``, ``map``,
    ``read_text``, ``read_bytes``, ``write_bytes``, ``write_ctl``, ``dmesg``,
    ``check`` ...) plus the daemon's ``pid``, its ``log_path`` and the
    ``options`` it was started with.

    Relative paths (``rel``) are inside the mount, as in SPEC section 4.
    """

    def __init__(
        self,
        path: os.PathLike[str] | str,
        pid: int,
        log_path: Path,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(path)
        self.pid = pid
        self.log_path = log_path
        self.options: Mapping[str, Any] = dict(options or {})

    def __repr__(self) -> str:  # short: pytest shows it in every failure of a test using it
        return f"MountedSandbox('{self.path}', pid={self.pid})"


@contextlib.contextmanager
def mounted(
    directory: os.PathLike[str] | str,
    *,
    log_path: os.PathLike[str] | str | None = None,
    timeout: float = DEFAULT_MOUNT_TIMEOUT,
    keep: bool = False,
    **options: Any,
) -> Iterator[MountedSandbox]:
    """Mount a sandbox at ``directory`` for the ``with`` block, then unmount it.

    ``options`` are those of ``mktme-sandbox mount`` (``phys_mem="64M"``,
    ``keyid_bits=3``, ``seed=1``, ``allow_other=True`` ...), validated before
    the daemon starts. The daemon's stdout and stderr go to ``log_path``
    (default: ``DIRECTORY.log`` beside it). Raises ``MountError`` with the log's
    tail if the daemon exits or does not answer within ``timeout`` seconds, and,
    after a clean ``with`` block, if the log shows a traceback or an ERROR line.
    ``keep=True`` leaves a mount that came up running (for debugging).
    """
    machine_config(options)
    mnt = Path(os.path.abspath(directory))
    log = Path(log_path) if log_path is not None else mnt.with_name(mnt.name + ".log")
    mnt.mkdir(parents=True, exist_ok=True)
    proc = _start(daemon.daemon_argv(mnt, **options), log)
    up = False
    try:
        _wait_until_up(proc, mnt, log, timeout)
        up = True
        yield MountedSandbox(mnt, proc.pid, log, dict(options))
    finally:
        if not (keep and up):
            _stop(proc, mnt)
    if not keep:
        _check_log(log, mnt)


def _start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop(daemon.LOG_ENV, None)  # the log is ours to keep, not a detached daemon's
    with open(log, "ab") as out:  # O_APPEND: the daemon's writes and ours never overlap
        out.write(("$ " + " ".join(argv) + "\n").encode())
        out.flush()
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # Ctrl-C reaches pytest, whose teardown stops the daemon
        )


def _wait_until_up(proc: subprocess.Popen[bytes], mnt: Path, log: Path, timeout: float) -> None:
    try:
        daemon.wait_until_mounted(mnt, proc, timeout, log)
    except daemon.DaemonError as err:
        raise MountError(f"mktme daemon (pid {proc.pid}, log {log}): {err}") from None


def _stop(proc: subprocess.Popen[bytes], mnt: Path, grace: float = 10.0) -> None:
    """SIGTERM (the daemon unmounts), wait; then fusermount3 -u / -uz; then SIGKILL."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    try:
        daemon.unmount(mnt, lazy_fallback=True)
    finally:
        try:
            proc.wait(2.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _check_log(log: Path, mnt: Path) -> None:
    """``MountError`` if the daemon logged a traceback or an error."""
    text = log.read_text(errors="replace") if log.exists() else ""
    trouble = DAEMON_TROUBLE.search(text)
    if trouble is not None:
        line = text[trouble.start() :].partition("\n")[0]
        tail = daemon.log_tail(log, 60)
        raise MountError(f"the mktme daemon of {mnt} logged: {line!r}; {log}:\n{tail}")


# --- pytest: options, marker, report ---------------------------------------------


@dataclass(frozen=True)
class _Settings:
    """The session's defaults, from the command line or else the ini file."""

    defaults: Mapping[str, Any]
    keep_mount: bool
    mount_timeout: float


_SETTINGS = pytest.StashKey[_Settings]()
_LOGS = pytest.StashKey[list[Path]]()
_LOGS_ATTACHED = pytest.StashKey[bool]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("mktme", "mktme-sandbox: emulated MKTME machines")
    group.addoption(
        "--mktme-phys-mem",
        metavar="SIZE",
        help=f"physical memory of each sandbox (ini mktme_phys_mem; default {DEFAULT_PHYS_MEM})",
    )
    group.addoption(
        "--mktme-seed",
        metavar="N",
        type=int,
        help="seed of every sandbox: reproducible keys (ini mktme_seed; default random)",
    )
    group.addoption(
        "--mktme-keep-mount",
        action="store_true",
        default=None,
        help="leave mounts running after each test, for debugging (ini mktme_keep_mount)",
    )
    group.addoption(
        "--mktme-mount-timeout",
        metavar="SECONDS",
        type=float,
        help="how long to wait for a daemon to mount (ini mktme_mount_timeout; "
        f"default {DEFAULT_MOUNT_TIMEOUT:g})",
    )
    parser.addini("mktme_phys_mem", "default phys_mem of mktme sandboxes", default=DEFAULT_PHYS_MEM)
    parser.addini("mktme_seed", "default seed of mktme sandboxes (empty: random)", default="")
    parser.addini("mktme_keep_mount", "leave mktme mounts running", type="bool", default=False)
    parser.addini(
        "mktme_mount_timeout", "seconds to wait for a mount", default=str(DEFAULT_MOUNT_TIMEOUT)
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "mktme(**options): options of the sandboxes of this test, as for mktme-sandbox mount "
        "(phys_mem='64M', keyid_bits=3, seed=1, ...)",
    )
    config.stash[_SETTINGS] = _settings(config)


def _option(config: pytest.Config, name: str) -> Any:
    value = config.getoption(f"mktme_{name}")
    return config.getini(f"mktme_{name}") if value is None else value


def _settings(config: pytest.Config) -> _Settings:
    phys_mem, seed = _option(config, "phys_mem"), _option(config, "seed")
    try:
        defaults = {"phys_mem": phys_mem, "seed": int(seed) if seed != "" else None}
        machine_config(defaults)
        timeout = float(_option(config, "mount_timeout"))
    except (TypeError, ValueError) as exc:
        raise pytest.UsageError(f"mktme-sandbox options: {exc}") from None
    return _Settings(defaults, bool(_option(config, "keep_mount")), timeout)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the daemon logs of this test's mounts to its first failed report."""
    report = yield
    logs = item.stash.get(_LOGS, [])
    if report.failed and logs and not item.stash.get(_LOGS_ATTACHED, False):
        item.stash[_LOGS_ATTACHED] = True
        for log in logs:
            report.sections.append((f"mktme daemon log {log}", daemon.log_tail(log, 200)))
    return report


# --- pytest: fixtures ----------------------------------------------------------------


def _marker_options(item: pytest.Item) -> dict[str, Any]:
    """The keywords of every ``mktme`` marker on the test, the closest one winning."""
    options: dict[str, Any] = {}
    for marker in item.iter_markers("mktme"):
        if marker.args:
            raise TypeError(f"@pytest.mark.mktme takes keyword options only, not {marker.args!r}")
        for name, value in marker.kwargs.items():
            options.setdefault(name, value)
    return options


class _Sandboxes:
    """Every machine and mount of one test, made from one set of options, all closed at the end."""

    def __init__(self, request: pytest.FixtureRequest, directory: Path) -> None:
        self._settings = request.config.stash[_SETTINGS]
        self._options = {**self._settings.defaults, **_marker_options(request.node)}
        self._node = request.node
        self._directory = directory
        self._mounts = 0
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()

    def machine(self, **options: Any) -> Machine:
        from mktme_sandbox.machine import Machine  # numpy and cryptography: only when asked for

        machine = Machine(machine_config({**self._options, **options}))
        close: Callable[[], None] | None = getattr(machine, "close", None)
        if close is not None:
            self._stack.callback(close)
        return machine

    def mount(self, **options: Any) -> MountedSandbox:
        merged = {**self._options, **options}
        machine_config(merged)  # a bad option fails here, before a daemon or a log exists
        mnt = self._directory / f"mktme{self._mounts}"
        log = mnt.with_name(mnt.name + ".log")
        self._mounts += 1
        self._node.stash.setdefault(_LOGS, []).append(log)
        keep, timeout = self._settings.keep_mount, self._settings.mount_timeout
        sandbox = self._stack.enter_context(
            mounted(mnt, log_path=log, timeout=timeout, keep=keep, **merged)
        )
        if keep:
            self._stack.callback(self._say_kept, sandbox)
        return sandbox

    def _say_kept(self, sandbox: MountedSandbox) -> None:
        self._node.warn(
            pytest.PytestWarning(
                f"mktme mount kept at {sandbox.path} (daemon pid {sandbox.pid}); "
                f"unmount with: mktme-sandbox umount {sandbox.path}"
            )
        )


@pytest.fixture
def _mktme_sandboxes(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[_Sandboxes]:
    with _Sandboxes(request, tmp_path) as sandboxes:
        yield sandboxes


@pytest.fixture
def mktme_machine_factory(_mktme_sandboxes: _Sandboxes) -> Callable[..., Machine]:
    """``factory(**options)`` -> a new in-process ``sandbox.Machine``."""
    return _mktme_sandboxes.machine


@pytest.fixture
def mktme_machine(mktme_machine_factory: Callable[..., Machine]) -> Machine:
    """An in-process ``sandbox.Machine`` with the options of the ``mktme`` marker."""
    return mktme_machine_factory()


@pytest.fixture
def mktme_mount_factory(_mktme_sandboxes: _Sandboxes) -> Callable[..., MountedSandbox]:
    """``factory(**options)`` -> a new ``MountedSandbox`` under ``tmp_path``; all unmounted."""
    reason = fuse_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    return _mktme_sandboxes.mount


@pytest.fixture
def mktme_mount(mktme_mount_factory: Callable[..., MountedSandbox]) -> MountedSandbox:
    """A ``MountedSandbox`` at ``tmp_path/mktme0`` with the options of the ``mktme`` marker."""
    return mktme_mount_factory()
