"""The mount's command-line tools: mktme-key, mktme-map, mktme-peek, mktme-walk, mktme-find.

Each tool is a module here with a ``main()``, installed as a console script
(``[project.scripts]`` of pyproject.toml); ``mountpoint-tools/mktme-*`` are
launchers of the same ``main()`` for a checkout that is not installed. The
tools use the mount and nothing else: the standard library and
``mktme_sandbox.client`` (tests/test_client_imports.py holds them to it).

What they share, from here:
- the mountpoint: ``-m MNT``, else ``$MKTME_MNT``;
- ``--json`` wherever a tool prints a table: the same rows as a JSON document
  on stdout;
- messages and exit statuses: every error is one line ``TOOL: message`` on
  stderr, never a traceback. 0 done; 1 the sandbox rejected a command or a
  read (its errno and the reason from dmesg are printed); 2 usage error: a bad
  option or number, an address beyond what the files hold, no mountpoint, a
  directory that is not a mount or a stale mount; 3 and up: what each tool's
  ``--help`` says (mktme-find follows grep: 1 found nowhere, 2 any error).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NoReturn

from mktme_sandbox.client import Mount, MountError, NotAMount, mount_from

__all__ = [
    "EXIT_REJECTED",
    "EXIT_USAGE",
    "ToolError",
    "ToolParser",
    "existing_keyids",
    "print_json",
    "run",
]

EXIT_REJECTED, EXIT_USAGE = 1, 2

MOUNT_HELP = "the mountpoint (default: $MKTME_MNT)"


class ToolError(Exception):
    """A tool's own refusal: its message and its exit status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ToolParser(argparse.ArgumentParser):
    """argparse with the tools' conventions: ``-m MNT``, optional ``--json``,
    the help text as written, and a usage error as one line and exit 2."""

    def __init__(self, prog: str, description: str, *, with_json: bool = False) -> None:
        super().__init__(
            prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        self.add_argument("-m", "--mount", metavar="MNT", help=MOUNT_HELP)
        if with_json:
            self.add_argument("--json", action="store_true", help="print the table as JSON")

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see --help)\n")


def run(
    prog: str,
    body: Callable[[], int],
    *,
    rejected: int = EXIT_REJECTED,
    statuses: Mapping[type[Exception], int] | None = None,
) -> int:
    """Run a tool's body and turn every failure into one line on stderr and its status.

    ``rejected`` is the status of a failed read or write, the sandbox's
    ``MountError`` or a file of the user's (mktme-find, grep-like, makes it 2
    so that 1 keeps meaning "found nowhere");
    ``statuses`` adds a tool's own exception types.
    """
    extra = dict(statuses or {})
    try:
        return body()
    except ToolError as e:
        return _fail(prog, str(e), e.status)
    except NotAMount as e:
        return _fail(prog, str(e), EXIT_USAGE)
    except MountError as e:
        return _fail(prog, str(e), rejected)
    except BrokenPipeError:  # `tool | head`: the reader left; nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return rejected
    except OSError as e:  # a file of the user's (-o FILE, -k FILE): one line, no traceback
        where = f"{e.filename}: " if e.filename else ""
        return _fail(prog, f"{where}{e.strerror or e}", rejected)
    except (ValueError, OverflowError) as e:
        return _fail(prog, str(e), EXIT_USAGE)
    except KeyboardInterrupt:
        return _fail(prog, "interrupted", 130)
    except tuple(extra) as e:
        return _fail(prog, str(e), next(s for t, s in extra.items() if isinstance(e, t)))


def _fail(prog: str, message: str, status: int) -> int:
    print(f"{prog}: {message}", file=sys.stderr)
    return status


def open_mount(args: argparse.Namespace) -> Mount:
    """The mount of ``-m`` or ``$MKTME_MNT``; ``NotAMount`` says what is wrong."""
    return mount_from(args.mount)


def existing_keyids(mount: Mount, keyids: Iterable[int]) -> list[int]:
    """``keyids`` if each is 0 or one of the machine's KeyIDs, else a usage error
    (exit 2) naming the range, before anything is read."""
    known = {0, *mount.keyids()}
    for keyid in keyids:
        if keyid not in known:
            top = max(known)
            raise ToolError(EXIT_USAGE, f"no KeyID {keyid} on this machine (0..{top})")
    return list(keyids)


def print_json(value: Any) -> None:
    """One JSON document on stdout."""
    json.dump(value, sys.stdout, indent=2)
    sys.stdout.write("\n")
