"""mktme-find: where is a byte pattern visible: in DRAM, through which KeyID?"""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Callable
from dataclasses import dataclass

from mktme_sandbox.client import PAGE, Mount, MountError, find_in, mapped_pages, parse_int, runs
from mktme_sandbox.tools import EXIT_USAGE, ToolParser, existing_keyids, open_mount, print_json, run

PROG = "mktme-find"
EXIT_FOUND, EXIT_NOT_FOUND, EXIT_ERROR = 0, 1, EXIT_USAGE
PROGRESS_STEP = 16 << 20  # a progress line every 16 MiB searched, when stderr is a terminal

HELP = """\
Search for PATTERN in two kinds of view and say where it is visible:
  - dram: the raw memory, as an attacker on the bus or after a cold boot sees
    it (every physical address, or --range);
  - keyids/K/mem: the CPU's view through KeyID K, i.e. what K's key decrypts.
    Decrypting all of memory is slow, so a KeyID view covers the pages that
    belong to K: the pages mapped in some space (smaps KeyID, via pagemap)
    and, for K > 0, the pages mm/page_keyid tags with K; --range scans a
    physical range instead.
Each hit names the physical address, the page's KeyID, and the spaces and
virtual addresses that map the page. DRAM never holds dirty cache lines: write
"wbinvd" to hw/cache first to see what the memory would hold after write-back.
--json prints the hits and the count per view as one JSON document. When
stderr is a terminal, a long search shows its progress there.

examples:
  mktme-find -m mnt 'TOP SECRET'            # dram, KeyID 0 and every programmed KeyID
  mktme-find -m mnt -k 3 -x 544f5020        # dram and KeyID 3, hex pattern
  mktme-find -m mnt --no-dram --range 0x100000:0x200000 -k 0 -- -dash-pattern

exit status (like grep): 0 found somewhere; 1 found nowhere; 2 usage error (a
bad number, a range beyond physical memory), not a mount or a stale mount, the
sandbox rejected a read, or no view was readable. A view this
user may not read (keyids/N/mem of another owner) is skipped with a note.
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ToolParser(PROG, HELP, with_json=True)
    p.add_argument("-x", "--hex", action="store_true", help="PATTERN is hex bytes")
    p.add_argument(
        "-k",
        "--keyid",
        type=int,
        action="append",
        help="a KeyID view to search (repeatable; default 0 and every programmed KeyID)",
    )
    p.add_argument("--no-dram", action="store_true", help="do not search dram")
    p.add_argument("--range", help="physical range START:END to search (default: all memory)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the summary")
    p.add_argument("pattern", metavar="PATTERN", help="text (UTF-8), or hex with -x")
    return p.parse_args(argv)


def pattern_of(args: argparse.Namespace) -> bytes:
    if args.hex:
        try:
            data = bytes.fromhex(args.pattern.replace(" ", ""))
        except ValueError:
            raise ValueError(f"{args.pattern!r} is not hex") from None
    else:
        data = args.pattern.encode()
    if not data:
        raise ValueError("the pattern is empty")
    return data


@dataclass(frozen=True)
class Hit:
    """Where the pattern begins in one view, and who maps that page."""

    view: str
    pa: int
    page_keyid: int
    mapped_at: list[tuple[str, int]]

    def line(self) -> str:
        where = ", ".join(f"spaces/{s} {va:#x}" for s, va in self.mapped_at)
        return (
            f"{self.view:<9} {self.pa:#014x}  pfn {self.pa // PAGE:#x}  page KeyID "
            f"{self.page_keyid}  {'mapped at ' + where if where else 'not mapped'}"
        )


class Finder:
    """One search: the pattern, the mount, who maps what, the hits so far."""

    def __init__(self, mount: Mount, pattern: bytes, args: argparse.Namespace) -> None:
        self.mount = mount
        self.pattern = pattern
        self.show_hits = not (args.quiet or args.json)
        self.progress = sys.stderr.isatty()
        self.mapped = mapped_pages(mount)
        self.hits: list[Hit] = []

    def report(self, view: str, pa: int) -> None:
        pfn = pa // PAGE
        users = [(s, va - va % PAGE + pa % PAGE) for s, va, _ in self.mapped.get(pfn, [])]
        hit = Hit(view, pa, self.mount.page_keyid(pfn), users)
        self.hits.append(hit)
        if self.show_hits:
            print(hit.line(), flush=self.progress)

    def search(self, view: str, rel: str, ranges: list[tuple[int, int]]) -> int:
        hits, base = 0, 0
        total = sum(end - start for start, end in ranges)
        meter = Progress(view, total) if self.progress and total >= PROGRESS_STEP else None
        for start, end in ranges:
            tick = None if meter is None else meter.at(base - start)
            for pa in find_in(self.mount, rel, self.pattern, start, end, progress=tick):
                self.report(view, pa)
                hits += 1
            base += end - start
        if meter is not None:
            meter.finish()
        return hits

    def keyid_ranges(self, keyid: int, page_keyids: list[int]) -> list[tuple[int, int]]:
        pfns = {pfn for pfn, users in self.mapped.items() if any(k == keyid for _, _, k in users)}
        if keyid > 0:
            pfns |= {pfn for pfn, k in enumerate(page_keyids) if k == keyid}
        return [(first * PAGE, (first + n) * PAGE) for first, n in runs(pfns)]


@dataclass
class Progress:
    """``mktme-find: VIEW: N of M MiB`` on stderr (a terminal), rewritten in place."""

    view: str
    total: int
    shown: int = -PROGRESS_STEP

    def at(self, shift: int) -> Callable[[int], None]:
        """A ``find_in`` progress callback for a range ``shift`` bytes into the view."""
        return lambda offset: self.show(offset + shift)

    def show(self, done: int) -> None:
        if done - self.shown >= PROGRESS_STEP:
            self.shown = done
            line = f"\r{PROG}: {self.view}: {done >> 20} of {self.total >> 20} MiB"
            print(line, end="", file=sys.stderr, flush=True)

    def finish(self) -> None:
        print(f"\r{PROG}: {self.view}: searched {self.total >> 20} MiB", file=sys.stderr)


View = tuple[str, str, list[tuple[int, int]]]


def physical_range(mount: Mount, text: str) -> list[tuple[int, int]]:
    """``START:END`` within physical memory; all of it without ``--range``."""
    if not text:
        return [(0, mount.phys_mem)]
    first, _, last = text.partition(":")
    start, end = parse_int(first), parse_int(last)
    if not start <= end <= mount.phys_mem:
        raise ValueError(f"--range {text}: not START:END within 0..{mount.phys_mem:#x}")
    return [(start, end)]


def views_of(mount: Mount, finder: Finder, args: argparse.Namespace) -> list[View]:
    whole = physical_range(mount, args.range)
    keyids = args.keyid if args.keyid is None else existing_keyids(mount, args.keyid)
    if keyids is None:
        keyids = [0] + [k.keyid for k in mount.key_table() if k.programmed]
    views: list[View] = [] if args.no_dram else [("dram", "dram", whole)]
    page_keyids = mount.page_keyids() if not args.range else []
    for k in dict.fromkeys(keyids):
        ranges = whole if args.range else finder.keyid_ranges(k, page_keyids)
        views.append((f"keyid {k}", f"keyids/{k}/mem", ranges))
    return views


def body(args: argparse.Namespace) -> int:
    pattern = pattern_of(args)
    mount = open_mount(args)
    finder = Finder(mount, pattern, args)
    views = views_of(mount, finder, args)
    summary = [(view, search_view(finder, view, rel, ranges)) for view, rel, ranges in views]
    if args.json:
        print_json(
            {
                "pattern": pattern.hex(),
                "hits": [
                    {
                        "view": h.view,
                        "pa": h.pa,
                        "page_keyid": h.page_keyid,
                        "mapped_at": h.mapped_at,
                    }
                    for h in finder.hits
                ],
                "views": {view: n for view, n in summary},
            }
        )
    else:
        print(summary_line(pattern, summary))
    if all(n is None for _, n in summary):
        return EXIT_ERROR
    return EXIT_FOUND if any(n for _, n in summary) else EXIT_NOT_FOUND


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run(PROG, lambda: body(args), rejected=EXIT_ERROR)


def search_view(finder: Finder, view: str, rel: str, ranges: list[tuple[int, int]]) -> int | None:
    """Hits in one view, or None when this user may not read it (a note says so)."""
    try:
        return finder.search(view, rel, ranges)
    except MountError as e:
        if e.errno != errno.EACCES:
            raise
        print(f"{PROG}: {view}: not searched: {e.strerror}", file=sys.stderr)
        return None


def shown(pattern: bytes) -> str:
    """The pattern as the user typed it: quoted text, or hex when it is not text."""
    try:
        text = pattern.decode()
    except UnicodeDecodeError:
        return pattern.hex()
    return f"'{text}'" if text.isprintable() else pattern.hex()


def summary_line(pattern: bytes, summary: list[tuple[str, int | None]]) -> str:
    found = [f"{view}: {n} hit{'s' if n != 1 else ''}" for view, n in summary if n]
    missing = [view for view, n in summary if n == 0]
    line = f"{shown(pattern)} visible in " + ("; ".join(found) if found else "no view")
    return line + (f"; not in: {', '.join(missing)}" if missing else "")


if __name__ == "__main__":
    sys.exit(main())
