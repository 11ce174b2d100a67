"""A real mount for a ``with`` block: ``mounted()`` and ``MountedSandbox``.

The mount fixtures of the pytest plugin (``mktme_sandbox.pytest_plugin``) are
built on this module, and so is anyone's script outside pytest: it imports
nothing of pytest. ``mounted(directory, **options)`` starts a daemon the way
``mktme-sandbox mount`` does (``daemon.start_daemon``: the mountpoint's lock,
a stale mount cleaned, the daemon in its own session) with its output in a log
file, waits until the mount answers, yields a ``MountedSandbox`` (the stdlib
client's ``Mount`` plus the daemon's pid and log) and at the end stops the
daemon the way ``mktme-sandbox umount`` does (``Daemon.stop``: unmount, wait,
SIGTERM and SIGKILL as a last resort) and fails if the log shows anything but
the daemon's own records (``daemon.LOG_TROUBLE``). The log is created
``0600``; the seed reaches the daemon in its environment
(``daemon.daemon_command``), never in its argv.

Starting and stopping are ``mktme_sandbox.daemon``'s, one path for the CLI,
this module and the plugin; this module adds the check of the log.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mktme_sandbox import daemon
from mktme_sandbox.client import Mount, redacted
from mktme_sandbox.config import MachineConfig

__all__ = [
    "DEFAULT_MOUNT_TIMEOUT",
    "FUSERMOUNT",
    "MOUNT_OPTIONS",
    "MountError",
    "MountedSandbox",
    "fuse_unavailable_reason",
    "machine_config",
    "mounted",
    "redacted",
]

FUSE_DEVICE = daemon.FUSE_DEVICE  # here so that tests can point it elsewhere
FUSERMOUNT = daemon.FUSERMOUNT
DEFAULT_MOUNT_TIMEOUT = 30.0

MOUNT_OPTIONS = ("allow_other",)  # options of the mount, not of the machine


class MountError(daemon.DaemonError):
    """The daemon did not come up, or it logged a traceback or an error; the text says which."""


# --- options -----------------------------------------------------------------


def machine_config(options: Mapping[str, Any]) -> MachineConfig:
    """``{"phys_mem": "64M", "algorithms": "aes-xts-128"}`` -> a validated ``MachineConfig``.

    Mount-only options (``allow_other``) are set aside; the rest go through
    ``MachineConfig.from_options``, the one place options become a config
    (an unknown name is a ``TypeError``, a bad value a ``ValueError``).
    """
    machine = {name: value for name, value in options.items() if name not in MOUNT_OPTIONS}
    return MachineConfig.from_options(None, **machine)


# --- FUSE availability and mount state ---------------------------------------


def fuse_unavailable_reason() -> str | None:
    """Why a mount cannot work here, as a skip reason; ``None`` when it can."""
    return daemon.fuse_unavailable_reason(FUSE_DEVICE)


# --- one mount -----------------------------------------------------------------


class MountedSandbox(Mount):
    """A running ``mktme-sandbox`` mount: the client's ``Mount`` (every helper of
    ``mktme_sandbox.client``: ``program_key``, ``create_space``, ``map``,
    ``read_text``, ``read_bytes``, ``write_bytes``, ``write_ctl``, ``dmesg``,
    ``check`` ...) plus the daemon's ``pid``, its ``log_path`` and the
    ``options`` it was started with.

    Relative paths (``rel``) are inside the mount, as in docs/spec.md section 4.
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
    try:
        started = daemon.start_daemon(mnt, log_path=log, timeout=timeout, **options)
    except daemon.DaemonError as err:
        raise MountError(f"mktme daemon (log {log}): {err}") from None
    try:
        yield MountedSandbox(mnt, started.pid, log, dict(options))
    finally:
        if not keep:
            started.stop()
    if not keep:
        _check_log(log, mnt)


def _check_log(log: Path, mnt: Path) -> None:
    """``MountError`` if the daemon logged a traceback or an error."""
    text = log.read_text(errors="replace") if log.exists() else ""
    trouble = daemon.LOG_TROUBLE.search(text)
    if trouble is not None:
        line = text[trouble.start() :].partition("\n")[0]
        tail = daemon.log_tail(log, 60)
        raise MountError(f"the mktme daemon of {mnt} logged: {line!r}; {log}:\n{tail}")
