"""21. The gap in v5: UFFDIO_ZEROPAGE maps the zero page in an encrypted VMA.

"mm: Do not use zero page in encrypted pages" (patch 02) changes the two
places a fault maps the zero page, do_anonymous_page() and
do_huge_pmd_anonymous_page(). A third place maps it too: userfaultfd's
mfill_zeropage_pte() builds pte_mkspecial(pfn_pte(my_zero_pfn(dst_addr),
dst_vma->vm_page_prot)) and v5 leaves it alone. A monitor that resolves a
missing fault with UFFDIO_ZEROPAGE in an encrypted VMA therefore maps the
KeyID-0 zero page through key N, and the process reads garbage where it
expects zeros. The sandbox models v5 as posted, so the switch for the later
fix, mm/mitigations/uffd_zeropage_encrypted_check, is OFF by default; on, the
VMA gets a zeroed page of its own KeyID, as a read fault would.
"""

from __future__ import annotations

import errno

from mktme_sandbox.client import MountError
from mktme_sandbox.examples.lab import LINE, Lab, hexline, main

BASE = 0x50000000
PAGE = 4096
KPF_ZERO_PAGE = 24


def trial(lab: Lab, k: int, on: bool) -> tuple[bool, bool, bool]:
    """Returns (the fault waited with EAGAIN, the zero page got mapped, it read zeros)."""
    m = lab.m
    lab.mitigation("uffd_zeropage_encrypted_check", on)
    sp = lab.space("exp21")
    sp.mmap(BASE, PAGE, "rw-", keyid=k)
    sp.uffd_register(BASE, PAGE)
    try:
        sp.read(BASE, LINE)
        waited = False
    except MountError as err:
        waited = err.errno == errno.EAGAIN
    pending = sp.uffd_pending()
    lab.step(
        f"uffd_zeropage_encrypted_check={int(on)}: read of {BASE:#x} in a registered VMA "
        f"of KeyID {k}"
    )
    lab.saw(f"EAGAIN: {waited}; spaces/exp21/uffd: {[hex(msg.address) for msg in pending]}")
    sp.uffd_zeropage(BASE, PAGE)
    data = sp.read(BASE, LINE)
    pfn = sp.translate(BASE).pfn
    zero = bool(m.kpageflags(pfn) >> KPF_ZERO_PAGE & 1)
    lab.saw(f"after UFFDIO_ZEROPAGE: pfn {pfn:#x} (zero page: {zero}), reads {hexline(data)}")
    if zero:  # the zero page's line now sits in the cache under KeyID k
        lab.later("invalidate the zero page's line", lambda: m.clflush(pfn * PAGE, LINE, k))
    lab.destroy(sp)
    return waited and [msg.address for msg in pending] == [BASE], zero, data == bytes(LINE)


def run(lab: Lab) -> None:
    k = lab.key("cpu")
    waited_v5, zero_v5, zeros_v5 = trial(lab, k, False)
    waited_fix, zero_fix, zeros_fix = trial(lab, k, True)
    lab.expect(waited_v5 and waited_fix, "a missing fault waits (EAGAIN) and is listed in uffd")
    lab.expect(zero_v5 and not zeros_v5, "v5 as posted: the zero page, read through key N: garbage")
    lab.expect(
        not zero_fix and zeros_fix, "the later fix: a page of the VMA's KeyID, reading zeros"
    )
    lab.conclude(
        f"v5: zero page={zero_v5}, reads zeros={zeros_v5}; "
        f"fixed: zero page={zero_fix}, reads zeros={zeros_fix}"
    )


if __name__ == "__main__":
    main(run, "21. The gap in v5: UFFDIO_ZEROPAGE in an encrypted VMA", __doc__)
