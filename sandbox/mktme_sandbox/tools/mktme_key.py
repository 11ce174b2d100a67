"""mktme-key: list the KeyIDs, program a key on the first free one, clear one."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mktme_sandbox.client import KeyStatus, Mount, NoFreeKeyID
from mktme_sandbox.config import parse_decimal
from mktme_sandbox.tools import EXIT_USAGE, ToolError, ToolParser, open_mount, print_json, run

PROG = "mktme-key"
EXIT_NO_FREE = 3
TYPES = ("cpu", "user", "no-encrypt")
KEY_BYTES = {"aes-xts-128": 16, "aes-xts-256": 32}

HELP = """\
usage: mktme-key [-m MNT] list [--json]
       mktme-key [-m MNT] add cpu|user|no-encrypt [-a ALGORITHM] [-k FILE|-]
       mktme-key [-m MNT] clear KEYID

Manage MKTME keys through keys/N (the payload syntax of Linux's "mktme" key
type). A KeyID is a hardware slot 1..nr_keyids; KeyID 0 is the TME key and is
not listed.

  list    one line per KeyID: its state, type, algorithm, owner and the pages
          that use it (the text of keys/N); --json: the same as a JSON list.
  add     program the first free KeyID and print its number on stdout:
            cpu         the CPU generates the data and tweak keys (PCONFIG
                        SET_KEY_RANDOM); -k, if given, is entropy XORed in
            user        your keys (SET_KEY_DIRECT) from -k; without -k random
                        ones are drawn from /dev/urandom
            no-encrypt  the KeyID stores plaintext in DRAM (NO_ENCRYPT)
          -a: aes-xts-128 or aes-xts-256 (default: the first one activated in
          IA32_TME_ACTIVATE).
          -k FILE, or -k - for stdin: the key and the tweak, two hex words
          separated by whitespace ("KEY TWEAK"), 16 bytes each for aes-xts-128,
          32 for aes-xts-256, and different (as `keyctl padd` reads its payload
          from stdin). Key material is never taken on the command line, where
          ps and the shell history would show it.
  clear   write "type=clear": the KeyID falls back to the TME key and is free
          again. Fails with EBUSY while pages with this KeyID are mapped.

The mountpoint is -m MNT, else $MKTME_MNT.

examples:
  mktme-key -m mnt list
  k=$(mktme-key -m mnt add cpu) && echo "programmed KeyID $k"
  printf '%s %s\\n' 000102030405060708090a0b0c0d0e0f f0e0d0c0b0a090807060504030201000 |
      MKTME_MNT=mnt mktme-key add user -a aes-xts-128 -k -
  mktme-key -m mnt add user -k ~/.keys/tenant1     # a file holding "KEY TWEAK"
  mktme-key -m mnt clear 3

exit status: 0 done; 1 the sandbox rejected the command (the errno and the
reason from dmesg are printed); 2 usage error, not a mount or a stale mount;
3 no free KeyID.
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ToolParser(PROG, HELP, with_json=True)
    p.usage = argparse.SUPPRESS
    p.add_argument("-a", "--algorithm", choices=tuple(KEY_BYTES), help="the cipher")
    p.add_argument("-k", "--key", metavar="FILE", help='"KEY TWEAK" in hex, from FILE or - (stdin)')
    p.add_argument("-t", "--tweak", nargs="?", const="", help=argparse.SUPPRESS)
    p.add_argument("command", nargs="?", metavar="COMMAND", help="list, add or clear")
    p.add_argument("args", nargs="*", metavar="ARG")
    return p.parse_args(argv)


def key_material(source: str) -> tuple[str, str]:
    """``KEY TWEAK`` from a file or stdin (``-``); never echoed in a message."""
    if source == "-":
        text = sys.stdin.read()
    else:
        try:
            text = Path(source).read_text()
        except OSError as e:
            raise ToolError(
                EXIT_USAGE,
                f"-k: cannot read the key file: {e.strerror} "
                "(-k takes a FILE or - for stdin holding KEY TWEAK in hex, never the key itself)",
            ) from None
    words = text.split()
    if len(words) != 2:
        where = "stdin" if source == "-" else "the key file"
        raise ToolError(EXIT_USAGE, f"{where} must hold two hex words, KEY TWEAK")
    return words[0], words[1]


def payload_of(mount: Mount, kind: str, algorithm: str | None, source: str | None) -> str:
    alg = algorithm or next(iter(mount.algorithms()), "aes-xts-128")
    if kind == "no-encrypt":
        return "type=no-encrypt"
    if source is not None:
        key, tweak = key_material(source)
    elif kind == "user":
        key, tweak = (os.urandom(KEY_BYTES[alg]).hex() for _ in range(2))
    else:
        return f"type=cpu algorithm={alg}"
    return f"type={kind} algorithm={alg} key={key} tweak={tweak}"


def key_row(k: KeyStatus) -> dict[str, object]:
    """One KeyID as JSON: ``keys/N``'s fields, numbers as numbers, ``-`` as null."""
    row: dict[str, object] = {}
    for name, value in k.fields.items():
        row[name] = None if value == "-" else int(value) if value.isdigit() else value
    return {**row, "keyid": k.keyid, "state": k.state}


def cmd_list(mount: Mount, as_json: bool) -> int:
    table = mount.key_table()
    if as_json:
        print_json([key_row(k) for k in table])
        return 0
    if not table:
        print("no MKTME KeyIDs: MKTME is disabled on this machine (see dmesg)")
    for k in table:
        print(k.line)
    return 0


def cmd_add(mount: Mount, args: argparse.Namespace) -> int:
    kind = one_arg(args, "add cpu|user|no-encrypt")
    if kind not in TYPES:
        raise ToolError(EXIT_USAGE, f"unknown key type '{kind}' (cpu, user or no-encrypt)")
    payload = payload_of(mount, kind, args.algorithm, args.key)
    try:
        print(mount.add_key(payload))
    except NoFreeKeyID:
        count = len(mount.keyids())
        if not count:
            raise ToolError(
                EXIT_NO_FREE, "MKTME is disabled on this machine: it has no KeyIDs (see dmesg)"
            ) from None
        raise ToolError(
            EXIT_NO_FREE, f"no free KeyID among {count} (mktme-key list shows who holds them)"
        ) from None
    return 0


def cmd_clear(mount: Mount, args: argparse.Namespace) -> int:
    text = one_arg(args, "clear KEYID")
    keyid = parse_decimal(text)
    if keyid is None:
        raise ToolError(EXIT_USAGE, f"KEYID must be a number, not '{text}'")
    keyids = mount.keyids()
    if keyid not in keyids:
        raise ToolError(EXIT_USAGE, f"no keys/{text}: KeyIDs are 1..{len(keyids)}")
    mount.clear_key(keyid)
    print(f"cleared KeyID {keyid}")
    return 0


def one_arg(args: argparse.Namespace, usage: str) -> str:
    if len(args.args) != 1:
        raise ToolError(EXIT_USAGE, f"usage: {usage}")
    return str(args.args[0])


def body(args: argparse.Namespace) -> int:
    if args.tweak is not None:
        raise ToolError(
            EXIT_USAGE,
            "-t was removed: give the key and the tweak with -k FILE or -k - (stdin), "
            "as two hex words KEY TWEAK",
        )
    if args.command is None:
        raise ToolError(EXIT_USAGE, "a COMMAND is needed: list, add or clear (see --help)")
    if args.command not in ("list", "add", "clear"):
        raise ToolError(EXIT_USAGE, f"unknown command '{args.command}' (list, add or clear)")
    mount = open_mount(args)
    if args.command == "list":
        if args.args:
            raise ToolError(EXIT_USAGE, "list takes no argument")
        return cmd_list(mount, args.json)
    return cmd_add(mount, args) if args.command == "add" else cmd_clear(mount, args)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run(PROG, lambda: body(args))


if __name__ == "__main__":
    sys.exit(main())
