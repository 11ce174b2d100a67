"""22. mremap into a neighbour of another KeyID.

``mremap(OLD, OLDLEN, NEWLEN, MREMAP_FIXED, NEWADDR)`` moves a VMA through
mm/mmap.c ``copy_vma()``, which first tries ``vma_merge()`` with the VMAs
around NEWADDR. Patch 01 of the series ("mm: Do no merge VMAs with different
encryption KeyIDs") passes ``vma_keyid(vma)`` there, so a KeyID-K1 mapping
moved right next to a KeyID-K2 mapping stays a VMA of its own: two lines in
maps, smaps ``KeyID: K2`` and ``KeyID: K1``. With
mm/mitigations/vma_merge_keyid_check off the moved VMA merges into its
neighbour: one VMA, smaps says KeyID K2 for all of it while the moved page's
PTE still holds K1 (mm/check reports the mismatch), and the next page the
tenant faults in its grown mapping is encrypted with the neighbour's key.
"""

from __future__ import annotations

from dataclasses import dataclass

from mktme_sandbox.examples.lab import BASE, PAGE, Lab, Space, hexline, main

SECRET = b"moved next door, still my key? "
NEIGHBOUR = BASE + 0x200000  # the KeyID-K2 mapping; the moved page lands right after it
MOVED = NEIGHBOUR + PAGE
GROWN = MOVED + PAGE  # the page the moved mapping grows into


@dataclass(frozen=True)
class Result:
    vmas: list[tuple[int, int, int | None]]  # (start, end, smaps KeyID) over the two mappings
    moved_keyid: int  # the KeyID of the moved page
    data_intact: bool  # the tenant reads its secret at the new address
    grown_keyid: int  # the KeyID of the page faulted after growing the moved mapping
    check: list[str]  # what mm/check reports about the space


def vmas_in(sp: Space, start: int, end: int) -> list[tuple[int, int, int | None]]:
    return [(v.start, v.end, v.keyid) for v in sp.smaps() if v.start < end and start < v.end]


def trial(lab: Lab, k1: int, k2: int, on: bool) -> Result:
    m = lab.m
    lab.mitigation("vma_merge_keyid_check", on)
    sp = lab.space("exp22")
    sp.mmap(BASE, PAGE, "rw-", keyid=k1, populate=True)
    sp.write(BASE, SECRET)
    sp.mmap(NEIGHBOUR, PAGE, "rw-", keyid=k2, populate=True)
    sp.mremap(BASE, PAGE, PAGE, MOVED)
    lab.step(
        f"vma_merge_keyid_check={int(on)}: a KeyID-{k1} page at {BASE:#x}, a KeyID-{k2} page "
        f"at {NEIGHBOUR:#x}; mremap {BASE:#x} {PAGE} {PAGE} {MOVED:#x} (right after it)"
    )
    vmas = vmas_in(sp, NEIGHBOUR, MOVED + PAGE)
    moved_keyid = m.page_keyid(lab.physical(sp, MOVED) // PAGE)
    data = sp.read(MOVED, len(SECRET))
    check = [line for line in m.check() if sp.name in line]
    lab.saw("VMAs: " + ", ".join(f"{s:x}-{e:x} smaps KeyID {k}" for s, e, k in vmas))
    lab.saw(f"the moved page has KeyID {moved_keyid} and reads {hexline(data)}")
    lab.saw(f"mm/check: {check or 'clean'}")
    sp.mremap(MOVED, PAGE, 2 * PAGE)
    sp.write(GROWN, b"more tenant data")
    grown_keyid = m.page_keyid(lab.physical(sp, GROWN) // PAGE)
    lab.step(f"mremap {MOVED:#x} {PAGE} {2 * PAGE} (grow in place), write at {GROWN:#x}")
    lab.saw(f"the new page at {GROWN:#x} got KeyID {grown_keyid}")
    lab.destroy(sp)
    return Result(vmas, moved_keyid, data == SECRET, grown_keyid, check)


def run(lab: Lab) -> None:
    k1, k2 = lab.key("cpu"), lab.key("cpu")
    on = trial(lab, k1, k2, True)
    off = trial(lab, k1, k2, False)
    lab.expect(
        [k for _, _, k in on.vmas] == [k2, k1] and not on.check,
        f"check on: two VMAs, smaps KeyID {k2} then {k1}, mm/check clean",
    )
    lab.expect(
        on.moved_keyid == k1 and on.data_intact and on.grown_keyid == k1,
        f"check on: the moved page keeps KeyID {k1} and its data; the grown page gets {k1}",
    )
    lab.expect(
        [k for _, _, k in off.vmas] == [k2] and len(off.check) == 1,
        f"check off: one merged VMA, smaps KeyID {k2}, mm/check reports the moved PTE",
    )
    lab.expect(
        off.moved_keyid == k1 and off.data_intact and off.grown_keyid == k2,
        f"check off: the moved page still KeyID {k1}, the grown page under the neighbour's {k2}",
    )
    lab.conclude(
        f"on: {len(on.vmas)} VMAs, grown page KeyID {on.grown_keyid}; "
        f"off: {len(off.vmas)} VMA (smaps KeyID {k2}), moved page KeyID {off.moved_keyid}, "
        f"grown page KeyID {off.grown_keyid} where {k1} was the tenant's"
    )


if __name__ == "__main__":
    main(run, "22. mremap into a neighbour of another KeyID", __doc__)
