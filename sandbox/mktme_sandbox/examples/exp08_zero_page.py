"""8. The zero page in an encrypted VMA.

A read fault on untouched anonymous memory maps the shared zero page, a
KeyID-0 page. In an encrypted VMA the PTE would carry the VMA's KeyID, so the
CPU would decrypt the zero page's DRAM with the wrong key and the process
would read garbage instead of zeros. "mm: Do not use zero page in encrypted
pages" allocates a real page instead. mm/mitigations/no_zero_page_encrypted
switches that patch off.
"""

from __future__ import annotations

from mktme_sandbox.examples.lab import BASE, LINE, PAGE, Lab, hexline, main

ENC = BASE + 0x200000


def trial(lab: Lab, k: int, on: bool) -> tuple[bool, bool]:
    """Returns (the encrypted read mapped the zero page, it read zeros)."""
    m = lab.m
    lab.mitigation("no_zero_page_encrypted", on)
    sp = lab.space("exp8")
    sp.mmap(BASE, PAGE, "r--")
    sp.mmap(ENC, PAGE, "r--", keyid=k)
    sp.read(BASE, LINE)
    zero = sp.translate(BASE).pfn
    lab.step(
        f"no_zero_page_encrypted={int(on)}: read fault in a KeyID-0 VMA maps pfn {zero:#x} "
        "(the zero page); now a read fault in a KeyID-"
        f"{k} VMA"
    )
    data = sp.read(ENC, LINE)
    pfn = sp.translate(ENC).pfn
    keyid = m.page_keyid(pfn)
    lab.saw(f"encrypted VMA: pfn {pfn:#x} (page KeyID {keyid}), reads {hexline(data)}")
    if pfn == zero:
        # The zero page's line now sits in the cache under KeyID k: drop it.
        lab.later("invalidate the zero page's line", lambda: m.clflush(zero * PAGE, LINE, k))
    lab.destroy(sp)
    return pfn == zero, data == bytes(LINE)


def run(lab: Lab) -> None:
    k = lab.key("cpu")
    zp_on, zeros_on = trial(lab, k, True)
    zp_off, zeros_off = trial(lab, k, False)
    lab.expect(not zp_on and zeros_on, "switch on: a page of its own, reading zeros")
    lab.expect(zp_off and not zeros_off, "switch off: the zero page, reading garbage")
    lab.conclude(
        f"on: zero page={zp_on}, reads zeros={zeros_on}; "
        f"off: zero page={zp_off}, reads zeros={zeros_off}"
    )


if __name__ == "__main__":
    main(run, "8. the zero page in an encrypted VMA", __doc__)
