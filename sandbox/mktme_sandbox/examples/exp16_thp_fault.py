"""16. THP at fault in an encrypted VMA never maps the huge zero page.

In a madvise(MADV_HUGEPAGE) range a read fault on an empty PMD maps the huge
zero page, a 2 MiB KeyID-0 page. The series' huge_memory.c hunk of "mm: Do not
use zero page in encrypted pages" allows that only when !vma_is_encrypted():
an encrypted VMA gets a 2 MiB page of its own KeyID, through the one
alloc_hugepage_vma() path. With mm/mitigations/no_zero_page_encrypted = 0
the huge zero page is mapped through the VMA's key and reads as garbage.
"""

from __future__ import annotations

from mktme_sandbox.examples.lab import LINE, Lab, hexline, main

HBASE = 0x40000000
HPAGE = 2 << 20
KPF_ZERO_PAGE = 24


def trial(lab: Lab, k: int, on: bool) -> tuple[bool, bool]:
    """Returns (the read mapped the huge zero page, it read zeros)."""
    m = lab.m
    lab.mitigation("no_zero_page_encrypted", on)
    sp = lab.space("exp16")
    sp.mmap(HBASE, HPAGE, "rw-", keyid=k)
    sp.ctl(f"madvise {HBASE:#x} {HPAGE} hugepage")
    data = sp.read(HBASE, LINE)
    pfn = sp.translate(HBASE).pfn
    zero = bool(m.kpageflags(pfn) >> KPF_ZERO_PAGE & 1)
    lab.step(
        f"no_zero_page_encrypted={int(on)}: read fault at {HBASE:#x} in a 2M hugepage "
        f"VMA of KeyID {k}"
    )
    lab.saw(f"pfn {pfn:#x} (zero page: {zero}), reads {hexline(data)}")
    if zero:  # the huge zero page's line now sits in the cache under KeyID k
        lab.later("invalidate the huge zero page's line", lambda: m.clflush(pfn * 4096, LINE, k))
    lab.destroy(sp)
    return zero, data == bytes(LINE)


def run(lab: Lab) -> None:
    k = lab.key("cpu")
    zero_on, zeros_on = trial(lab, k, True)
    zero_off, zeros_off = trial(lab, k, False)
    lab.expect(not zero_on and zeros_on, "switch on: a 2M page of its own KeyID, reading zeros")
    lab.expect(zero_off and not zeros_off, "switch off: the huge zero page, reading garbage")
    lab.conclude(
        f"on: huge zero page={zero_on}, reads zeros={zeros_on}; "
        f"off: huge zero page={zero_off}, reads zeros={zeros_off}"
    )


if __name__ == "__main__":
    main(run, "16. THP at fault in an encrypted VMA", __doc__)
