"""``mktme-sandbox shell``: unmodified Linux tools on the emulated machine, the LXCFS way.

LXCFS serves ``/proc/meminfo`` and friends from FUSE and bind-mounts them over
``/proc`` so that the tools of a container report the container. This does the
same for a sandbox: a command runs in private mount and PID namespaces
(``unshare --mount --pid --fork --mount-proc``) in which

- ``MNT/mm/meminfo``, ``mm/vmstat``, ``mm/kpageflags``, ``mm/kpagecount``
  stand over ``/proc/meminfo``, ``/proc/vmstat``, ``/proc/kpageflags``,
  ``/proc/kpagecount`` (``free``, ``vmstat -s``, ``page-types``);
- ``MNT/mm/ksm/`` stands over ``/sys/kernel/mm/ksm/`` and
  ``MNT/mm/khugepaged/`` over ``/sys/kernel/mm/transparent_hugepage/khugepaged/``
  where the host has them (``grep -r . /sys/kernel/mm/ksm``);
- with a space, a helper process (``sleep``) stands for it: the space's
  ``maps``, ``smaps``, ``smaps_rollup`` and ``status`` are bound over the
  helper's ``/proc/PID/`` files and its pid is in ``$MKTME_SPACE_PID``
  (``pmap -X $MKTME_SPACE_PID``). The helper ends with the command: it lives
  in the command's PID namespace, whose first process the command is.

The binds vanish with the namespace; the host's ``/proc`` is never touched.
Needs root (creating a mount namespace and bind mounts); the FUSE mount must
be readable by root (a root daemon, or ``--allow-other``).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

__all__ = ["PROC_FILES", "SPACE_FILES", "SYSFS_DIRS", "ShellError", "shell_argv"]

PROC_FILES = ("meminfo", "vmstat", "kpageflags", "kpagecount")  # MNT/mm/X over /proc/X
SYSFS_DIRS = {
    "ksm": "/sys/kernel/mm/ksm",
    "khugepaged": "/sys/kernel/mm/transparent_hugepage/khugepaged",
}
SPACE_FILES = ("maps", "smaps", "smaps_rollup", "status")  # spaces/NAME/X over /proc/PID/X
SPACE_PID_ENV = "MKTME_SPACE_PID"


class ShellError(Exception):
    """Why the shell cannot start (one line)."""


def shell_argv(mnt: str, space: str | None, command: list[str]) -> list[str]:
    """The argv that runs ``command`` with the sandbox at ``mnt`` over /proc
    (ShellError when this user or machine cannot, or ``mnt`` is no sandbox)."""
    root = Path(mnt).absolute()
    _check_can_unshare()
    _check_sandbox(root, space)
    script = "set -e\n" + "".join(f"{line}\n" for line in _bind_lines(root, space))
    script += 'exec "$@"\n'
    unshare = ["unshare", "--mount", "--pid", "--fork", "--mount-proc", "--propagation", "private"]
    return [*unshare, "sh", "-c", script, "mktme-shell", *(command or [_default_shell()])]


def _bind_lines(root: Path, space: str | None) -> list[str]:
    lines = [_bind(root / "mm" / name, f"/proc/{name}") for name in PROC_FILES]
    lines += [
        _bind(root / "mm" / name, dir) for name, dir in SYSFS_DIRS.items() if Path(dir).is_dir()
    ]
    if space is not None:
        lines += ["sleep 2147483647 &", f"export {SPACE_PID_ENV}=$!"]
        pid_dir = f"/proc/${SPACE_PID_ENV}"  # expanded by sh; space names need no quoting
        lines += [
            _bind(root / "spaces" / space / name, f"{pid_dir}/{name}") for name in SPACE_FILES
        ]
    return lines


def _bind(source: Path, target: str) -> str:
    return f'mount --bind {shlex.quote(str(source))} "{target}"'


def _check_can_unshare() -> None:
    if shutil.which("unshare") is None:
        raise ShellError("shell needs unshare(1) (util-linux) on PATH")
    if os.geteuid() != 0:
        raise ShellError("shell needs root: it creates a mount namespace and bind mounts")
    probe = subprocess.run(
        ["unshare", "--mount", "true"], check=False, capture_output=True, text=True
    )
    if probe.returncode != 0:
        reason = probe.stderr.strip() or f"exit status {probe.returncode}"
        raise ShellError(f"cannot create a mount namespace here: {reason}")


def _check_sandbox(root: Path, space: str | None) -> None:
    try:
        (root / "mm" / "meminfo").read_bytes()
    except OSError as err:
        raise ShellError(f"{root} serves no sandbox readable here: {err.strerror}") from None
    if space is not None and not (root / "spaces" / space).is_dir():
        raise ShellError(f"{root} has no space {space!r}")


def _default_shell() -> str:
    return os.environ.get("SHELL") or "/bin/sh"
