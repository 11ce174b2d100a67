"""9. VMA merging across KeyIDs.

The kernel merges adjacent anonymous VMAs with the same flags into one. The
KeyID lives in the VMA's protection bits, so a merge across KeyIDs would put
one range under the other range's KeyID: the tenant's pages there would be
encrypted with a key it never chose. "mm: Do no merge VMAs with different
encryption KeyIDs" refuses such merges; mm/mitigations/vma_merge_keyid_check
switches it off. Two adjacent mappings with the same KeyID merge either way
(the control).
"""

from __future__ import annotations

from dataclasses import dataclass

from mktme_sandbox.examples.lab import BASE, PAGE, Lab, Space, main

CONTROL = BASE + 0x200000


def vmas_in(sp: Space, start: int, end: int) -> list[tuple[int, int, int | None]]:
    return [(v.start, v.end, v.keyid) for v in sp.smaps() if v.start < end and start < v.end]


@dataclass(frozen=True)
class Result:
    pair: list[tuple[int, int, int | None]]  # the VMAs over the two mappings
    control: int  # VMAs over the two same-KeyID mappings
    page_keyid: int  # the KeyID the second mapping's page got


def trial(lab: Lab, k1: int, k2: int, on: bool) -> Result:
    m = lab.m
    lab.mitigation("vma_merge_keyid_check", on)
    sp = lab.space("exp9")
    sp.mmap(BASE, PAGE, "rw-", keyid=k1)
    sp.mmap(BASE + PAGE, PAGE, "rw-", keyid=k2)
    sp.mmap(CONTROL, PAGE, "rw-", keyid=k1)
    sp.mmap(CONTROL + PAGE, PAGE, "rw-", keyid=k1)
    lab.step(
        f"vma_merge_keyid_check={int(on)}: mapped {BASE:#x} (KeyID {k1}) and {BASE + PAGE:#x} "
        f"(KeyID {k2}) side by side; control: two KeyID-{k1} pages at {CONTROL:#x}"
    )
    pair = vmas_in(sp, BASE, BASE + 2 * PAGE)
    control = vmas_in(sp, CONTROL, CONTROL + 2 * PAGE)
    sp.write(BASE + PAGE, b"tenant data meant for the second key")
    page_keyid = m.page_keyid(sp.translate(BASE + PAGE).pfn)
    lab.saw(
        "VMAs: "
        + ", ".join(f"{s:x}-{e:x} KeyID {k}" for s, e, k in pair)
        + f"; control: {len(control)} VMA(s)"
    )
    lab.saw(f"the page written at {BASE + PAGE:#x} got KeyID {page_keyid}")
    lab.destroy(sp)
    return Result(pair, len(control), page_keyid)


def run(lab: Lab) -> None:
    k1, k2 = lab.key("cpu"), lab.key("cpu")
    on = trial(lab, k1, k2, True)
    off = trial(lab, k1, k2, False)
    lab.expect(on.control == 1 and off.control == 1, "same-KeyID neighbours merge")
    lab.expect(
        len(on.pair) == 2 and on.page_keyid == k2,
        f"check on: two VMAs, the second page under KeyID {k2}",
    )
    lab.expect(
        len(off.pair) == 1 and off.page_keyid != k2,
        f"check off: one merged VMA, the second page not under KeyID {k2}",
    )
    lab.conclude(
        f"on: {len(on.pair)} VMAs, page KeyID {on.page_keyid}; "
        f"off: {len(off.pair)} VMA(s), page KeyID {off.page_keyid} where {k2} was asked"
    )


if __name__ == "__main__":
    main(run, "9. VMA merging across KeyIDs", __doc__)
