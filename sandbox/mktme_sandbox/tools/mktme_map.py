"""mktme-map: address spaces and their mappings, with the KeyID of each."""

from __future__ import annotations

import argparse
import re
import sys

from mktme_sandbox.client import (
    Mount,
    MountError,
    Space,
    Vma,
    memory_picture,
    parse_int,
    user_va,
)
from mktme_sandbox.tools import EXIT_USAGE, ToolError, ToolParser, open_mount, print_json, run

PROG = "mktme-map"
EXIT_NO_SPACE = 3
NAME = re.compile(r"[A-Za-z0-9._-]+")

HELP = """\
usage: mktme-map [-m MNT] map SPACE ADDR LEN [-k KEYID] [-p PROT] [--populate]
       mktme-map [-m MNT] unmap SPACE ADDR LEN
       mktme-map [-m MNT] show SPACE [--json]
       mktme-map [-m MNT] list [--json]
       mktme-map [-m MNT] destroy SPACE
       mktme-map [-m MNT] memory [-o FILE.svg] [--json]

An address space is a directory spaces/SPACE (a process, in Linux terms).

  map      create SPACE if it does not exist (mkdir spaces/SPACE), then write
           "mmap ADDR LEN PROT [keyid=K] [populate]" to its ctl: an anonymous
           private mapping encrypted with KeyID K (default: KeyID 0, the TME
           key). ADDR is hex (0x...), page aligned, below 0x800000000000; LEN is
           decimal or hex with an optional K/M/G/T suffix (16KiB too); PROT is ---,
           r--, rw-, r-x or rwx, or none, r, rw, rx (default rw-). --populate
           faults every page in now.
  unmap    write "munmap ADDR LEN".
  show     the VMAs of SPACE with their KeyIDs and resident sizes (from smaps);
           --json: the same rows as a JSON list.
  list     the spaces of the mount and their CR3; --json: as a JSON list.
  destroy  rmdir spaces/SPACE: unmaps everything and frees its page tables.
  memory   physical memory by KeyID, from the picture mm/keyid_map.svg: pages
           in use and free per KeyID and per class (used, thp, ksm, zero,
           pgtable, free); -o FILE.svg saves the picture itself (open it in a
           browser); --json: {pages, pages_per_cell, keyids: {K: {CLASS: N}}}.

The mountpoint is -m MNT, else $MKTME_MNT. KeyIDs come from mktme-key.

examples:
  k=$(mktme-key -m mnt add cpu)
  mktme-map -m mnt map demo 0x7f0000000000 64K -k "$k" --populate
  mktme-map -m mnt show demo
  mktme-map -m mnt unmap demo 0x7f0000000000 4096
  mktme-map -m mnt destroy demo
  mktme-map -m mnt memory -o memory.svg

exit status: 0 done; 1 the sandbox rejected the command (the errno and the
reason from dmesg are printed: ENOKEY for a KeyID that is not programmed,
EINVAL for a malformed or overlapping request, ...); 2 usage error (a bad
number, an address beyond user space), not a mount or a stale mount; 3 no
such space.
"""

USAGES = {
    "map": ("SPACE ADDR LEN [-k KEYID] [-p PROT] [--populate]", 3),
    "unmap": ("SPACE ADDR LEN", 3),
    "show": ("SPACE", 1),
    "list": ("", 0),
    "destroy": ("SPACE", 1),
    "memory": ("[-o FILE.svg]", 0),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ToolParser(PROG, HELP, with_json=True)
    p.usage = argparse.SUPPRESS
    p.add_argument("-k", "--keyid", help="the KeyID of the mapping (default 0)")
    p.add_argument("-p", "--prot", default="rw-", help="protection (default rw-)")
    p.add_argument("--populate", action="store_true", help="fault every page in now")
    p.add_argument("-o", "--output", metavar="FILE", help="memory: save the SVG picture to FILE")
    p.add_argument("command", nargs="?", metavar="COMMAND", help=", ".join(USAGES))
    p.add_argument("args", nargs="*", metavar="ARG")
    return p.parse_args(argv)


def checked_name(name: str) -> str:
    if NAME.fullmatch(name) is None:
        raise ToolError(EXIT_USAGE, f"bad space name '{name}' (letters, digits, . _ -)")
    return name


def existing(mount: Mount, name: str) -> Space:
    if not (mount.root / "spaces" / checked_name(name)).is_dir():
        raise ToolError(EXIT_NO_SPACE, f"no space '{name}' (mktme-map list shows them)")
    return Space(mount, name)


def range_of(addr: str, length: str) -> tuple[int, int]:
    """ADDR and LEN as numbers: a user-space address and a positive size."""
    va, size = user_va(parse_int(addr)), parse_int(length)
    if size >= 1 << 63:
        raise ValueError(f"{length!r} is larger than any mapping")
    return va, size


def cmd_map(mount: Mount, args: argparse.Namespace, name: str, addr: str, length: str) -> int:
    va, size = range_of(addr, length)
    keyid = None if args.keyid is None else int(args.keyid)
    created = not (mount.root / "spaces" / checked_name(name)).is_dir()
    space = mount.create_space(name) if created else Space(mount, name)
    try:
        space.mmap(va, size, args.prot, keyid, args.populate)
    except MountError:
        if created:  # nothing half-done: the space made for this mapping goes too
            space.destroy()
        raise
    if created:
        print(f"created space {name}", file=sys.stderr)
    print(f"mapped {addr} +{length} {args.prot} KeyID {keyid or 0} in {name}")
    return 0


def cmd_unmap(mount: Mount, name: str, addr: str, length: str) -> int:
    va, size = range_of(addr, length)
    existing(mount, name).munmap(va, size)
    print(f"unmapped {addr} +{length} in {name}")
    return 0


def kib_to_bytes(field_value: str | None) -> int | None:
    """An smaps field such as ``"64 kB"`` in bytes (None when absent)."""
    return None if field_value is None else int(field_value.split()[0]) * 1024


def vma_row(vma: Vma) -> dict[str, object]:
    return {
        "start": vma.start,
        "end": vma.end,
        "size": vma.size,
        "perms": vma.perms,
        "keyid": vma.keyid,
        "rss": kib_to_bytes(vma.fields.get("Rss")),
        "name": vma.name,
    }


def cmd_show(mount: Mount, name: str, as_json: bool) -> int:
    vmas = existing(mount, name).smaps()
    if as_json:
        print_json([vma_row(v) for v in vmas])
        return 0
    print(f"{'RANGE':<27} {'SIZE':>10} {'PERMS':<5} {'KEYID':>5} {'RSS':>10}")
    for v in vmas:
        keyid = "-" if v.keyid is None else str(v.keyid)
        rss = v.fields.get("Rss", "-").replace(" ", "")
        span = f"{v.start:x}-{v.end:x}"
        print(f"{span:<27} {v.size // 1024:7d} KiB {v.perms:<5} {keyid:>5} {rss:>10}")
    if not vmas:
        print("(no mappings)")
    return 0


def cmd_list(mount: Mount, as_json: bool) -> int:
    spaces = mount.spaces()
    if as_json:
        print_json([{"name": s.name, "cr3": s.cr3()} for s in spaces])
        return 0
    for s in spaces:
        print(f"{s.name}  cr3 {mount.read_text(f'{s.rel}/cr3').strip()}")
    if not spaces:
        print("(no spaces)")
    return 0


def cmd_memory(mount: Mount, output: str | None, as_json: bool) -> int:
    svg = mount.read_text("mm/keyid_map.svg")
    picture = memory_picture(svg)
    if output is not None:
        with open(output, "w", encoding="utf-8") as out:
            out.write(svg)
        print(f"saved the picture of {picture.pages} pages to {output}", file=sys.stderr)
    counts = picture.counts()
    if as_json:
        print_json(
            {
                "pages": picture.pages,
                "pages_per_cell": picture.pages_per_cell,
                "keyids": {str(k): counts[k] for k in sorted(counts)},
            }
        )
        return 0
    kinds = [k for k in MEMORY_KINDS if any(k in c for c in counts.values())]
    print(f"{'KEYID':>5} " + " ".join(f"{k:>8}" for k in kinds))
    for keyid in sorted(counts):
        print(f"{keyid:>5} " + " ".join(f"{counts[keyid].get(k, 0):>8}" for k in kinds))
    if picture.pages_per_cell > 1:
        print(f"(a cell is {picture.pages_per_cell} pages, counted by its majority class)")
    return 0


MEMORY_KINDS = ("used", "thp", "ksm", "zero", "pgtable", "free")


def cmd_destroy(mount: Mount, name: str) -> int:
    existing(mount, name).destroy()
    print(f"destroyed space {name}")
    return 0


def body(args: argparse.Namespace) -> int:
    if args.command is None:
        raise ToolError(EXIT_USAGE, f"a COMMAND is needed: {', '.join(USAGES)} (see --help)")
    if args.command not in USAGES:
        raise ToolError(EXIT_USAGE, f"unknown command '{args.command}' ({', '.join(USAGES)})")
    usage, count = USAGES[args.command]
    if len(args.args) != count:
        raise ToolError(EXIT_USAGE, f"usage: {args.command} {usage}".rstrip())
    if args.output is not None and args.command != "memory":
        raise ToolError(EXIT_USAGE, "-o is for the memory command only")
    if args.keyid is not None and not re.fullmatch("[0-9]+", args.keyid):
        raise ToolError(EXIT_USAGE, f"-k must be a number, not '{args.keyid}'")
    mount = open_mount(args)
    a = args.args
    if args.command == "map":
        return cmd_map(mount, args, a[0], a[1], a[2])
    if args.command == "unmap":
        return cmd_unmap(mount, a[0], a[1], a[2])
    if args.command == "show":
        return cmd_show(mount, a[0], args.json)
    if args.command == "list":
        return cmd_list(mount, args.json)
    if args.command == "memory":
        return cmd_memory(mount, args.output, args.json)
    return cmd_destroy(mount, a[0])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run(PROG, lambda: body(args))


if __name__ == "__main__":
    sys.exit(main())
