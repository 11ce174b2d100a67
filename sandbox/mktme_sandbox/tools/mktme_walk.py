"""mktme-walk: the 4-level page-table walk of one virtual address, done here."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from mktme_sandbox.client import PagemapEntry, Space, Vma, Walk, parse_int, walk
from mktme_sandbox.tools import ToolParser, open_mount, print_json, run

PROG = "mktme-walk"
EXIT_PAGEMAP, EXIT_NOT_MAPPED, EXIT_KEYID = 3, 4, 5

HELP = """\
Translate a virtual address of spaces/SPACE the way the MMU does, without
asking the sandbox to: CR3 comes from spaces/SPACE/cr3, and each table page is
read from keyids/0/mem (page tables live in KeyID-0 pages). For each level it
prints the index, where the entry sits, the entry, its flags, the KeyID bits
and the physical address in it. The KeyID takes the top KEYID_BITS of the
MAXPHYADDR-bit address field (hw/tme's maxphyaddr, keyid_shift and keyid_mask
lines); the frame is the address with those bits removed.

The result is checked against spaces/SPACE/pagemap (PFN without KeyID bits,
present bit 63) and the leaf's KeyID against the VMA's "KeyID:" in smaps. The
walk reads memory, not the TLB: after a PTE is changed it shows the new entry at
once, while the process keeps the old translation until spaces/SPACE/tlb is
flushed. Reading keyids/0/mem needs the daemon's user (or root). --json prints
the levels, the result and the verdicts as one JSON document.

examples:
  mktme-walk -m mnt -s demo -- 0x7f0000000000
  MKTME_MNT=mnt mktme-walk -s demo 0x7f0000001234

exit status: 0 translated, and pagemap and smaps agree; 1 the sandbox rejected
a read; 2 usage error (a bad number, an address beyond user space), not a
mount or a stale mount; 3 the walk and pagemap disagree;
4 the address is not mapped or its page not present yet (pagemap agrees); 5 the leaf's KeyID differs from
the VMA's KeyID.
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ToolParser(PROG, HELP, with_json=True)
    p.add_argument("-s", "--space", required=True, help="the address space (spaces/SPACE)")
    p.add_argument("va", metavar="VA", help="virtual address, hex (0x...) or decimal")
    return p.parse_args(argv)


def print_walk(w: Walk, space: Space) -> None:
    lay = w.layout
    hi = lay.maxphyaddr - 1
    print(f"spaces/{space.name}  va {w.va:#x}  cr3 {w.cr3:#x}")
    print(
        f"layout (hw/tme): MAXPHYADDR {lay.maxphyaddr}, KeyID bits {lay.keyid_bits} "
        f"(address bits {hi}:{lay.keyid_shift}), physical bits {lay.keyid_shift}"
    )
    print(
        f"{'level':<5} {'index':>5}  {'entry at (pa)':<18} {'entry':<18}  {'keyid':>5}  "
        f"{'address':<14} flags"
    )
    for lv in w.levels:
        what = "not present" if not lv.present else ("page" if lv.leaf else "table")
        print(
            f"{lv.name:<5} {lv.index:>5}  {lv.entry_pa:#018x} {lv.entry:#018x}  "
            f"{lv.keyid:>5}  {lv.frame:#014x} {' '.join(lv.flags()) or '-'}  -> {what}"
        )


@dataclass(frozen=True)
class Verdict:
    """The walk compared with pagemap and smaps."""

    entry: PagemapEntry
    vma: Vma | None
    status: int

    @property
    def vma_keyid(self) -> int | None:
        return self.vma.keyid if self.vma is not None else None


def verdict(w: Walk, space: Space) -> Verdict:
    """Compare the walk with pagemap and smaps: the exit status says how they agree."""
    entry, vma = space.translate(w.va), space.vma(w.va)
    if w.pa is None:
        return Verdict(entry, vma, EXIT_PAGEMAP if entry.present else EXIT_NOT_MAPPED)
    agrees = entry.present and entry.pfn == w.pa >> 12
    same_keyid = vma is None or vma.keyid == w.keyid
    return Verdict(
        entry, vma, 0 if agrees and same_keyid else EXIT_KEYID if agrees else EXIT_PAGEMAP
    )


def print_verdict(w: Walk, v: Verdict) -> None:
    entry, vma = v.entry, v.vma
    if w.pa is None:
        if vma is None:
            print(f"=> {w.va:#x} is not mapped: the walk stops at {w.levels[-1].name}")
        else:
            where = f"{vma.start:x}-{vma.end:x} {vma.perms} KeyID {vma.keyid}"
            print(
                f"=> {w.va:#x} is not present: inside VMA {where}, not faulted in yet "
                f"(the walk stops at {w.levels[-1].name})"
            )
        if entry.present:
            print(f"pagemap: present, pfn {entry.pfn:#x}: DISAGREES with the walk")
        else:
            print("pagemap: not present: agrees")
        return
    keyid = w.keyid
    tagged = w.pa | (keyid or 0) << w.layout.keyid_shift
    print(
        f"=> physical {w.pa:#x} (pfn {w.pa >> 12:#x}), KeyID {keyid}, "
        f"KeyID-tagged address {tagged:#x}, {w.page_size >> 10} KiB page"
    )
    leaf = w.levels[-1]
    flags = leaf.entry & ~(leaf.frame | w.layout.keyid_mask)
    print(
        f"   {leaf.name} entry {leaf.entry:#018x} = flags {flags:#x} | KeyID {keyid} << "
        f"{w.layout.keyid_shift} ({(keyid or 0) << w.layout.keyid_shift:#x}) | frame {leaf.frame:#x}"
    )
    if entry.present and entry.pfn == w.pa >> 12:
        print(f"pagemap: pfn {entry.pfn:#x} present: agrees")
    else:
        state = f"pfn {entry.pfn:#x} present" if entry.present else "not present"
        print(f"pagemap: {state}: DISAGREES with the walk")
    if vma is None:
        print("smaps: no VMA covers this address")
    elif vma.keyid == keyid:
        print(f"smaps: VMA {vma.start:x}-{vma.end:x} {vma.perms} KeyID {vma.keyid}: agrees")
    else:
        print(
            f"smaps: VMA {vma.start:x}-{vma.end:x} {vma.perms} KeyID {vma.keyid}: "
            f"the PTE says KeyID {keyid}: DIFFERS"
        )


def walk_json(w: Walk, space: Space, v: Verdict) -> dict[str, object]:
    return {
        "space": space.name,
        "va": w.va,
        "cr3": w.cr3,
        "layout": {"maxphyaddr": w.layout.maxphyaddr, "keyid_bits": w.layout.keyid_bits},
        "levels": [
            {
                "level": lv.name,
                "index": lv.index,
                "entry_pa": lv.entry_pa,
                "entry": lv.entry,
                "keyid": lv.keyid,
                "frame": lv.frame,
                "flags": lv.flags(),
            }
            for lv in w.levels
        ],
        "pa": w.pa,
        "keyid": w.keyid,
        "page_size": w.page_size if w.pa is not None else None,
        "pagemap": {"present": v.entry.present, "pfn": v.entry.pfn},
        "vma_keyid": v.vma_keyid,
        "status": v.status,
    }


def body(args: argparse.Namespace) -> int:
    mount = open_mount(args)
    va = parse_int(args.va)
    space = mount.space(args.space)
    w = walk(space, va)
    v = verdict(w, space)
    if args.json:
        print_json(walk_json(w, space, v))
    else:
        print_walk(w, space)
        print_verdict(w, v)
    return v.status


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run(PROG, lambda: body(args))


if __name__ == "__main__":
    sys.exit(main())
