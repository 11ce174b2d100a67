"""20. Compaction after fragmentation by several tenants.

Three tenants, each with its own KeyID, fault pages in turn, so their pages
interleave in physical memory over three 2 MiB blocks; then each frees three
pages of four. Those blocks are three quarters free, none wholly: no huge page
can be had there. Writing 1 to
``mm/compact_memory`` (``/proc/sys/vm/compact_memory``) moves the remaining
pages to the top of memory, each into a free page allocated for its own KeyID
(patch 05: mm/compaction.c), and frees whole 2 MiB blocks at the bottom.
Every tenant still reads its data; the free-block count comes from
``mm/kpageflags`` (BUDDY per page). With mm/mitigations/migrate_keyid off,
the moved pages come out as garbage. The experiment needs memory laid out
as a fresh machine lays it (earlier work leaves free pages scattered), so it
always mounts a sandbox of its own (``--seed 1 --phys-mem 64M``).
"""

from __future__ import annotations

import struct

from mktme_sandbox.examples.lab import PAGE, Lab, main, on_a_fresh_sandbox

TENANTS = 3
PAGES = 384  # per tenant: together more than two 2 MiB blocks
BLOCK = 512  # pages per 2 MiB
KPF_BUDDY = 1 << 10


def free_blocks(lab: Lab) -> int:
    """Wholly free 2 MiB blocks, from mm/kpageflags."""
    data = lab.m.read_bytes("mm/kpageflags", 0, lab.m.phys_mem // PAGE * 8)
    free = [flags & KPF_BUDDY != 0 for (flags,) in struct.iter_unpack("<Q", data)]
    return sum(all(free[i : i + BLOCK]) for i in range(0, len(free), BLOCK))


def trial(lab: Lab, on: bool) -> tuple[int, int, int, bool]:
    """Returns (free blocks after the tenants, after compaction, pages moved, data intact)."""
    lab.mitigation("migrate_keyid", on)
    tenants = []
    for _ in range(TENANTS):
        sp = lab.space("exp20")
        sp.mmap(0x10000000, PAGES * PAGE, "rw-", keyid=lab.key("cpu"))
        tenants.append(sp)
    pages = [(sp, 0x10000000 + i * PAGE) for i in range(PAGES) for sp in tenants]
    for n, (sp, va) in enumerate(pages):
        sp.write(va, f"{sp.name} page {n}".encode())
    for sp in tenants:  # each keeps one page of four
        for va in range(0x10000000 + PAGE, 0x10000000 + PAGES * PAGE, 4 * PAGE):
            sp.ctl(f"madvise {va:#x} {3 * PAGE} dontneed")
    before = free_blocks(lab)
    moved_before = lab.m.vmstat()["pgmigrate_success"]
    lab.m.write_ctl("mm/compact_memory", "1")
    moved = lab.m.vmstat()["pgmigrate_success"] - moved_before
    after = free_blocks(lab)
    intact = all(
        sp.read(va, 64).rstrip(b"\0") == f"{sp.name} page {n}".encode()
        for n, (sp, va) in enumerate(pages)
        if (va >> 12) % 4 == 0
    )
    lab.saw(
        f"migrate_keyid={int(on)}: free 2M blocks {before} -> {after}, "
        f"{moved} pages moved, every tenant reads its data: {intact}"
    )
    for sp in tenants:
        lab.destroy(sp)
    return before, after, moved, intact


FRESH = ("--seed", "1", "--phys-mem", "64M")


def run(lab: Lab) -> None:
    on_a_fresh_sandbox(lab, "compaction needs a fresh machine's layout", FRESH, observe)


def observe(lab: Lab) -> None:
    before, after, moved, intact = trial(lab, True)
    _, _, moved_off, intact_off = trial(lab, False)
    lab.expect(moved > 0 and after > before, "compaction moves pages and frees whole 2M blocks")
    lab.expect(intact, "rule on: every tenant reads its data after the move")
    lab.expect(moved_off == 0 or not intact_off, "rule off: a moved page reads as garbage")
    lab.conclude(
        f"free 2M blocks {before} -> {after}, {moved} pages moved, data intact: {intact}; "
        f"without the KeyID rule intact: {intact_off}"
    )


if __name__ == "__main__":
    main(run, "20. compaction after fragmentation by several tenants", __doc__)
