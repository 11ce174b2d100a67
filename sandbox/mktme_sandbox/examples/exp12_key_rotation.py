"""12. Key rotation: reprogramming a KeyID makes old data unreadable.

Freeing a page does not erase it: its ciphertext stays in DRAM and the old key
would still decrypt it. A KeyID cannot be reprogrammed while pages using it
are mapped (EBUSY); once they are unmapped, programming a new key into the
KeyID (PCONFIG with a fresh CPU key) turns that leftover ciphertext into
garbage: a crypto-erase. DRAM itself does not change.
"""

from __future__ import annotations

import errno

from mktme_sandbox.examples.lab import BASE, LINE, PAGE, Lab, MountError, hexline, main


def run(lab: Lab) -> None:
    m = lab.m
    page = lab.tenant_page("exp12")
    k, sp, pa = page.keyid, page.space, page.pa
    payload = f"type=cpu algorithm={lab.algorithm()}"
    secret = b"secret to be crypto-erased ".ljust(LINE, b"%")
    sp.write(BASE, secret)
    lab.step(f"KeyID {k}: wrote a secret at physical {pa:#x}")
    try:
        m.write_ctl(f"keys/{k}", payload)
        busy = False
    except MountError as e:
        busy = e.errno == errno.EBUSY
        lab.saw(f"reprogram while mapped: {e}")
    lab.expect(busy, "reprogramming a KeyID with mapped pages fails with EBUSY")
    m.clflush(pa, LINE, k)
    sp.munmap(BASE, PAGE)
    lab.step("wrote the line back and unmapped the page (freed, not erased)")
    cipher = m.dram(pa, LINE)
    leftover = m.phys(k, pa, LINE)
    lab.saw(f"keyids/{k}/mem at {pa:#x}: {hexline(leftover)}")
    lab.expect(leftover == secret, "the old key still decrypts the freed page")
    stat = m.vmstat().get("mktme_key_wbinvd")
    m.write_ctl(f"keys/{k}", payload)
    lab.step(f"reprogrammed KeyID {k} with a new CPU key ({payload})")
    after = m.phys(k, pa, LINE)
    lab.saw(f"keyids/{k}/mem at {pa:#x}: {hexline(after)}")
    if stat is not None:
        lab.note(
            f"mktme_key_wbinvd {stat} -> {m.vmstat().get('mktme_key_wbinvd')}: the kernel wrote the "
            "cache back before the new key, so no line of the old key survives"
        )
    lab.expect(after != secret and secret[:16] not in after, "the new key reads garbage")
    lab.expect(m.dram(pa, LINE) == cipher, "dram is unchanged: only the key changed")
    lab.conclude(
        f"EBUSY while mapped; after unmap the old key read the secret, "
        f"the rotated KeyID {k} reads garbage"
    )


if __name__ == "__main__":
    main(run, "12. key rotation makes old data unreadable", __doc__)
