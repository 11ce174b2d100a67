"""10. mprotect keeps the KeyID.

mprotect rewrites the protection bits of every PTE of the range
(pte_modify). The KeyID sits in the PTE's address bits, so a pte_modify that
keeps only the PFN's usual bits would drop it: the page would be accessed
through KeyID 0 and read as garbage. "x86/mm: Preserve KeyID on pte_modify()
and pgprot_modify()" widens the mask to keep it;
mm/mitigations/pte_modify_preserve_keyid switches that off. The PTE is read
with this folder's own page-table walk.
"""

from __future__ import annotations

from mktme_sandbox.client import walk
from mktme_sandbox.examples.lab import BASE, LINE, PAGE, Lab, main


def trial(lab: Lab, k: int, on: bool) -> tuple[int | None, bool]:
    """Returns (the PTE's KeyID after mprotect, the data still reads back)."""
    m = lab.m
    lab.mitigation("pte_modify_preserve_keyid", on)
    sp = lab.tenant_page("exp10", keyid=k).space
    data = b"data written before mprotect. ".ljust(LINE, b"~")
    sp.write(BASE, data)
    before = walk(sp, BASE).keyid
    sp.ctl(f"mprotect {BASE:#x} {PAGE} r--")
    sp.flush_tlb()  # as Linux's mprotect does; the walk does not need it
    after = walk(sp, BASE)
    vma = sp.vma(BASE)
    seen = sp.read(BASE, LINE)
    lab.step(f"pte_modify_preserve_keyid={int(on)}: KeyID-{k} page, rw- -> r--")
    lab.saw(
        f"PTE KeyID {before} -> {after.keyid}; VMA KeyID (smaps) {vma.keyid if vma else None}; "
        f"data reads back: {seen == data}"
    )
    if after.keyid not in (None, k) and after.pa is not None:
        pa, wrong = after.pa, after.keyid
        lab.later(
            "invalidate the line read through the wrong KeyID", lambda: m.clflush(pa, LINE, wrong)
        )
    lab.destroy(sp)
    return after.keyid, seen == data


def run(lab: Lab) -> None:
    k = lab.key("cpu")
    keyid_on, ok_on = trial(lab, k, True)
    keyid_off, ok_off = trial(lab, k, False)
    lab.expect(keyid_on == k and ok_on, f"switch on: the PTE keeps KeyID {k}, the data reads back")
    lab.expect(
        keyid_off != k and not ok_off, "switch off: the KeyID is lost, the data reads as garbage"
    )
    lab.conclude(
        f"after mprotect the PTE has KeyID {keyid_on} (on) / {keyid_off} (off); "
        f"data readable {ok_on} / {ok_off}"
    )


if __name__ == "__main__":
    main(run, "10. mprotect keeps the KeyID", __doc__)
