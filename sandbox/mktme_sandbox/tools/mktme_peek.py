"""mktme-peek: one range of memory, side by side, as each party sees it."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from mktme_sandbox.client import PAGE, Mount, MountError, parse_int
from mktme_sandbox.tools import ToolParser, existing_keyids, open_mount, print_json, run

PROG = "mktme-peek"
EXIT_NOT_PRESENT = 3

HELP = """\
Show one range of memory three ways, 16 bytes (one AES block) per row:
  - the plaintext, through the page's KeyID (keyids/K/mem): what the owner reads;
  - the ciphertext as stored in DRAM (dram): what a bus or cold-boot attacker reads;
  - what other KeyIDs see (keyids/N/mem): garbage, unless they share the key.
A '=' before a row of another view means it equals the plaintext row.
--json prints the views instead: for each, its name and the bytes in hex (or
the error that stopped its read), and whether they equal the plaintext.

The range is physical (ADDR is a physical address) or, with -s SPACE, virtual:
each page is then translated through spaces/SPACE/pagemap. The KeyID of the
plaintext view is -k, else the VMA's KeyID (smaps), else the page's (mm/page_keyid).

DRAM never holds dirty cache lines: use --flush to write the range's lines back
first (hw/cache "clflush PA keyid=K"), or dram may show older ciphertext. Lines
that the other KeyIDs' reads pulled into the cache are invalidated afterwards
(they are clean), so peeking leaves no stale lines behind; --keep-lines skips that.

examples:
  mktme-peek -m mnt -s demo --flush -- 0x7f0000000000
  MKTME_MNT=mnt mktme-peek -n 128 -o 0,5 -- 0x1234000

exit status: 0 shown; 1 the sandbox rejected a read (errno and reason shown);
2 usage error (a bad number, an address beyond physical memory or user
space), not a mount or a stale mount; 3 a virtual page of the range is not
present.
"""


@dataclass(frozen=True)
class Piece:
    """A stretch of the range inside one page: where it is virtually and physically."""

    addr: int  # the address the user gave (virtual or physical)
    pa: int
    length: int


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ToolParser(PROG, HELP, with_json=True)
    p.add_argument("-s", "--space", help="ADDR is virtual, in spaces/SPACE")
    p.add_argument("-k", "--keyid", type=int, help="KeyID of the plaintext view")
    p.add_argument("-n", "--length", default="64", help="bytes to show (default 64)")
    p.add_argument(
        "-o",
        "--others",
        default="auto",
        help="other KeyIDs to show: comma list, 'none', or 'auto' (0 and every "
        "programmed KeyID; the default)",
    )
    p.add_argument("--flush", action="store_true", help="write the range's dirty lines back first")
    p.add_argument(
        "--keep-lines",
        action="store_true",
        help="do not invalidate the lines other KeyIDs' reads pulled in",
    )
    p.add_argument("addr", metavar="ADDR", help="physical address, or virtual with -s")
    return p.parse_args(argv)


def pieces(mount: Mount, args: argparse.Namespace, start: int, length: int) -> list[Piece]:
    """Split the range at page boundaries and find each piece's physical address."""
    out = []
    addr, end = start, start + length
    space = mount.space(args.space) if args.space else None
    if space is None and end > mount.phys_mem:
        raise ValueError(f"{start:#x} +{length} is beyond physical memory ({mount.phys_mem:#x})")
    while addr < end:
        n = min(end, addr - addr % PAGE + PAGE) - addr
        if space is None:
            pa = addr
        else:
            entry = space.translate(addr)
            if not entry.present:
                raise LookupError(
                    f"spaces/{space.name}: virtual page {addr - addr % PAGE:#x} is not present "
                    "(touch it first, or map with populate)"
                )
            pa = entry.pa
        out.append(Piece(addr, pa, n))
        addr += n
    return out


def plaintext_keyid(mount: Mount, args: argparse.Namespace, first: Piece) -> int:
    if args.keyid is not None:
        return existing_keyids(mount, [int(args.keyid)])[0]
    if args.space:
        vma = mount.space(args.space).vma(first.addr)
        if vma is not None and vma.keyid is not None:
            return vma.keyid
    return mount.page_keyid(first.pa // PAGE)


def other_keyids(mount: Mount, spec: str, main: int) -> list[int]:
    if spec == "none":
        return []
    if spec == "auto":
        wanted = [0] + [k.keyid for k in mount.key_table() if k.programmed]
    else:
        wanted = existing_keyids(mount, [parse_int(x) for x in spec.split(",") if x.strip()])
    return [k for k in dict.fromkeys(wanted) if k != main]


def read_view(mount: Mount, rel: str, parts: list[Piece]) -> bytes | str:
    """The whole range through one file, or the errno that stopped it."""
    try:
        return b"".join(mount.read_bytes(rel, p.pa, p.length) for p in parts)
    except MountError as e:
        return f"({e.strerror}: {e.reason or rel})"


def invalidate(mount: Mount, parts: list[Piece], keyids: list[int]) -> None:
    """Drop the clean lines the foreign-KeyID reads pulled into the cache.

    Best effort: hw/cache belongs to the daemon's user; others get a note."""
    try:
        for k in keyids:
            for p in parts:
                mount.clflush(p.pa, p.length, k)
    except MountError as e:
        print(
            f"mktme-peek: note: could not invalidate the lines read through other KeyIDs "
            f"({e.strerror}); they stay in the cache, clean",
            file=sys.stderr,
        )


def hexcol(row: bytes, width: int) -> str:
    groups = [row[i : i + 4].hex() for i in range(0, width, 4)]
    return " ".join(groups).ljust(width * 2 + width // 4 - 1)


def ascii_of(row: bytes) -> str:
    return "".join(chr(b) if 32 <= b < 127 else "." for b in row)


def show(
    mount: Mount, args: argparse.Namespace, parts: list[Piece], main: int, others: list[int]
) -> None:
    plain = read_view(mount, f"keyids/{main}/mem", parts)
    views: list[tuple[str, bytes | str]] = [(f"keyid {main} (plaintext)", plain)]
    views.append(("dram (ciphertext)", read_view(mount, "dram", parts)))
    views += [(f"keyid {k}", read_view(mount, f"keyids/{k}/mem", parts)) for k in others]
    if not args.keep_lines:
        invalidate(mount, parts, others)
    if args.json:
        print_json(views_json(parts, views))
        return
    first = parts[0]
    total = sum(p.length for p in parts)
    page = f"pfn {first.pa // PAGE:#x}, page KeyID {mount.page_keyid(first.pa // PAGE)}"
    if args.space:
        print(
            f"spaces/{args.space} virtual {first.addr:#x}, {total} bytes: "
            f"physical {first.pa:#x} ({page})"
        )
    else:
        print(f"physical {first.pa:#x}, {total} bytes ({page})")
    width = 16
    col = width * 2 + width // 4 - 1
    heads = "  ".join(f" {name[:col]:<{col}}" for name, _ in views)
    print(f"{'address':<18} {heads}  plaintext")
    offsets = [(p, off) for p in parts for off in range(0, p.length, width)]
    pos = 0
    for piece, off in offsets:
        n = min(width, piece.length - off)
        cells = []
        for i, (_, data) in enumerate(views):
            if isinstance(data, str):
                cells.append(" " + (data if pos == 0 else "").ljust(col)[:col])
                continue
            row = data[pos : pos + n]
            same = i > 0 and isinstance(plain, bytes) and row == plain[pos : pos + n]
            cells.append(("=" if same else " ") + hexcol(row, width))
        text = ascii_of(plain[pos : pos + n]) if isinstance(plain, bytes) else ""
        print(f"{piece.addr + off:#018x} " + "  ".join(cells) + f"  |{text}|")
        pos += n
    summarize(views)
    if not args.flush:
        print(
            "note: dram shows only lines already written back; --flush writes this range back first"
        )


def views_json(parts: list[Piece], views: list[tuple[str, bytes | str]]) -> dict[str, object]:
    plain = views[0][1]
    return {
        "addr": parts[0].addr,
        "pa": parts[0].pa,
        "length": sum(p.length for p in parts),
        "views": [
            {"name": name, "error": data}
            if isinstance(data, str)
            else {"name": name, "hex": data.hex(), "same_as_plaintext": data == plain}
            for name, data in views
        ],
    }


def summarize(views: list[tuple[str, bytes | str]]) -> None:
    plain = views[0][1]
    if not isinstance(plain, bytes):
        return
    for name, data in views[1:]:
        if isinstance(data, str):
            verdict = f"unreadable {data}"
        elif data == plain:
            verdict = "the same bytes as the plaintext"
        else:
            same = sum(a == b for a, b in zip(data, plain, strict=True))
            verdict = f"differs from the plaintext in {len(plain) - same} of {len(plain)} bytes"
        print(f"{name.split(' (')[0]}: {verdict}")


def body(args: argparse.Namespace) -> int:
    mount = open_mount(args)
    start, length = parse_int(args.addr), parse_int(args.length)
    if length <= 0:
        raise ValueError("-n must be positive")
    parts = pieces(mount, args, start, length)
    main_keyid = plaintext_keyid(mount, args, parts[0])
    if args.flush:
        for p in parts:
            mount.clflush(p.pa, p.length, main_keyid)
    show(mount, args, parts, main_keyid, other_keyids(mount, args.others, main_keyid))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run(PROG, lambda: body(args), statuses={LookupError: EXIT_NOT_PRESENT})


if __name__ == "__main__":
    sys.exit(main())
