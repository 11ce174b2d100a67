"""MKTME machines as pytest fixtures, for this project's tests and everyone else's.

Registered through the ``pytest11`` entry point (docs/spec.md section 6), so installing
``mktme-sandbox`` is all a project needs; no conftest. The fixtures:

``mktme_machine`` / ``mktme_machine_factory(**options)``
    an in-process ``mktme_sandbox.Machine``; no FUSE needed.
``mktme_shared_mount``
    a mount like ``mktme_mount``'s, but one daemon serves the whole session and
    its machine is restored from a snapshot before each test (root only;
    elsewhere it falls back to ``mktme_mount``).
``mktme_mount`` / ``mktme_mount_factory(**options)``
    a real mount under ``tmp_path``: ``mktme-sandbox mount MNT --foreground`` in a
    subprocess, waited for until the mount answers, always unmounted (also when
    the test or the setup fails), its daemon log attached to the report of a
    failed test and searched for tracebacks and errors at teardown. Skipped,
    with the reason stated, where ``/dev/fuse`` or ``fusermount3`` is missing.
    A mount is a ``MountedSandbox``: the stdlib client's ``Mount``
    (``mktme_sandbox.client``) plus the daemon's pid and log.

Options are the ones of ``mktme-sandbox mount`` (docs/spec.md section 5) in Python form:
``phys_mem="64M"`` (or an int), ``maxphyaddr``, ``keyid_bits``, ``max_keys``,
``algorithms``, ``tme_bypass``, ``cache_size``, ``seed``, and ``allow_other`` for
mounts. They come from, weakest first: the command line / ini defaults
(``--mktme-phys-mem``, ``--mktme-seed``), the ``@pytest.mark.mktme(...)``
markers of the test (closest wins), the keywords of a factory call. Options are
validated by ``MachineConfig`` before any daemon starts.

All fixtures use one mechanism, ``_Sandboxes``: one per test, an ``ExitStack``
that closes every machine and mount it made. A mount is
``mktme_sandbox.mounting.mounted()``, the same context manager anyone can use
outside pytest (that module imports nothing of pytest); this module adds the
options, the marker, the report sections and the fixtures.

Left out: mounts on anything but Linux.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import pytest

from mktme_sandbox import daemon
from mktme_sandbox.mounting import (
    DEFAULT_MOUNT_TIMEOUT,
    MountedSandbox,
    MountError,
    fuse_unavailable_reason,
    machine_config,
    mounted,
    redacted,
)

if TYPE_CHECKING:
    from mktme_sandbox.machine import Machine

DEFAULT_PHYS_MEM = "64M"

__all__ = [
    "MountError",
    "MountedSandbox",
    "fuse_unavailable_reason",
    "machine_config",
    "mounted",
    "redacted",
]

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
    """``factory(**options)`` -> a new in-process ``mktme_sandbox.Machine``."""
    return _mktme_sandboxes.machine


@pytest.fixture
def mktme_machine(mktme_machine_factory: Callable[..., Machine]) -> Machine:
    """An in-process ``mktme_sandbox.Machine`` with the options of the ``mktme`` marker."""
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


# --- a shared mount, restored from a snapshot before each test -----------------------


class _SharedMounts:
    """The session's shared mounts (per xdist worker): one per set of options,
    each saved to a snapshot (``mm/snapshot``) right after it came up."""

    def __init__(self, directory: Path, settings: _Settings) -> None:
        self._directory = directory
        self._settings = settings
        self._stack = contextlib.ExitStack()
        self._mounts: dict[str, tuple[MountedSandbox, Path]] = {}

    def get(self, options: Mapping[str, Any]) -> tuple[MountedSandbox, Path]:
        key = repr(sorted(options.items()))
        if key not in self._mounts:
            mnt = self._directory / f"shared{len(self._mounts)}"
            sandbox = self._stack.enter_context(
                mounted(mnt, timeout=self._settings.mount_timeout, **options)
            )
            snapshot = mnt.with_name(mnt.name + ".snapshot")
            sandbox.write_ctl("mm/snapshot", f"save {snapshot}")
            self._mounts[key] = (sandbox, snapshot)
        return self._mounts[key]

    def close(self) -> None:
        self._stack.close()


@pytest.fixture(scope="session")
def _mktme_shared_mounts(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[_SharedMounts]:
    shared = _SharedMounts(tmp_path_factory.mktemp("mktme-shared"), request.config.stash[_SETTINGS])
    with contextlib.closing(shared):
        yield shared


@pytest.fixture
def mktme_shared_mount(request: pytest.FixtureRequest) -> MountedSandbox:
    """A mount as fresh as ``mktme_mount``'s, for a fraction of the cost: one
    daemon per set of options for the whole session (per xdist worker), its
    machine restored before each test from the snapshot taken when it came up
    (``restore PATH`` written to ``mm/snapshot``: set-up and tear-down measured
    at 0.013 s per test against 0.315 s for a new mount). Restoring is for root only (a snapshot holds every
    key): where the tests do not run as root this is a mount of the test's own,
    as ``mktme_mount`` gives. ``--mktme-keep-mount`` does not apply.
    """
    reason = fuse_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    if os.getuid() != 0:
        sandbox: MountedSandbox = request.getfixturevalue("mktme_mount")
        return sandbox
    options = {**request.config.stash[_SETTINGS].defaults, **_marker_options(request.node)}
    machine_config(options)  # a bad option fails here, before a daemon or a log exists
    shared: _SharedMounts = request.getfixturevalue("_mktme_shared_mounts")
    sandbox, snapshot = shared.get(options)
    request.node.stash.setdefault(_LOGS, []).append(sandbox.log_path)
    sandbox.write_ctl("mm/snapshot", f"restore {snapshot}")
    return sandbox
