"""14. The TME exclusion range.

BIOS may exclude one physical range from TME (IA32_TME_EXCLUDE_MASK/BASE,
Intel's MKTME spec, Tables 4-5 and 4-6), "for KeyID=0 only". A secret written
through KeyID 0 into a page inside the range reaches DRAM as plaintext; a
secret written through an MKTME KeyID into a page inside the same range is
still ciphertext in DRAM. The range is read from ``hw/tme``; a mount without
one (the default) is left alone and a fresh sandbox with ``--tme-exclude-base
0 --tme-exclude-size 8M`` is mounted for the experiment and unmounted after it.
"""

from __future__ import annotations

import secrets

from mktme_sandbox.client import Mount
from mktme_sandbox.examples.lab import (
    LINE,
    CannotRun,
    Lab,
    TenantPage,
    hexline,
    main,
    on_a_fresh_sandbox,
)

FRESH = ("--seed", "1", "--phys-mem", "16M", "--tme-exclude-base", "0", "--tme-exclude-size", "8M")


def exclusion(m: Mount) -> tuple[int, int] | None:
    """(mask, base) of the exclusion range ``hw/tme`` shows, or None when it is off."""
    tme = m.tme()
    if tme.get("exclude_enable") != "1":
        return None
    return int(tme["exclude_mask"]) << 12, int(tme["exclude_base"]) << 12


def run(lab: Lab) -> None:
    if exclusion(lab.m) is not None:
        observe(lab)
        return
    on_a_fresh_sandbox(lab, "this mount has no TME exclusion range", FRESH, observe)


def observe(lab: Lab) -> None:
    m = lab.m
    found = exclusion(m)
    assert found is not None
    mask, base = found
    lab.saw(f"hw/tme: exclusion range mask {mask:#x} base {base:#x}")
    tme = lab.tenant_page("exp14-tme", keyid=0)
    mktme = lab.tenant_page("exp14-mktme", kind="cpu")
    for page in (tme, mktme):
        if page.pa & mask != base & mask:
            raise CannotRun(f"page {page.pa:#x} of KeyID {page.keyid} is outside the range")
    token = secrets.token_hex(8)
    clear = f"EXCLUDED-KEYID-0-{token} ".encode().ljust(LINE, b"#")
    hidden = f"EXCLUDED-KEYID-{mktme.keyid}-{token} ".encode().ljust(LINE, b"#")
    for page, secret in ((tme, clear), (mktme, hidden)):
        page.space.write(page.va, secret)
        m.clflush(page.pa, LINE, page.keyid)
    lab.step("wrote a secret through each KeyID and wrote both lines back (clflush)")
    shown = [look(lab, tme, clear), look(lab, mktme, hidden)]
    lab.expect(shown[0], "KeyID 0 inside the exclusion range is plaintext in dram")
    lab.expect(not shown[1], f"KeyID {mktme.keyid} inside the range is ciphertext in dram")
    through = m.phys(mktme.keyid, mktme.pa, LINE)
    lab.expect(through == hidden, f"keyids/{mktme.keyid}/mem still decrypts it")
    lab.conclude(
        f"inside the exclusion range dram shows KeyID 0's secret in clear at {tme.pa:#x} "
        f"and KeyID {mktme.keyid}'s only as ciphertext at {mktme.pa:#x}"
    )


def look(lab: Lab, page: TenantPage, secret: bytes) -> bool:
    """Whether ``dram`` holds ``secret`` in clear at the page; narrated."""
    stored = lab.m.dram(page.pa, LINE)
    lab.saw(f"dram {page.pa:#x} (KeyID {page.keyid})  {hexline(stored)}")
    return stored == secret


if __name__ == "__main__":
    main(run, "14. The TME exclusion range", __doc__)
