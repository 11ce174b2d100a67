"""4. Replay: MKTME has no integrity.

A tenant stores "balance=1000000", the line reaches DRAM, and an attacker with
access to DRAM keeps a copy of that ciphertext. The tenant then stores
"balance=0000000". The attacker writes the old ciphertext back: it is valid
ciphertext for that address and key, so the tenant reads the old balance,
and nothing reports an error. (Integrity and replay protection came only with
later TME-MK variants and TDX.)
"""

from __future__ import annotations

from mktme_sandbox.examples.lab import BASE, LINE, Lab, hexline, main


def run(lab: Lab) -> None:
    m = lab.m
    page = lab.tenant_page("exp4")
    k, sp, pa = page.keyid, page.space, page.pa
    old, new = b"balance=1000000;" * 4, b"balance=0000000;" * 4
    sp.write(BASE, old)
    m.clflush(pa, LINE, k)
    recorded = m.dram(pa, LINE)
    lab.step(
        f"KeyID {k}: the tenant stored {old[:16]!r} at physical {pa:#x}; "
        "the attacker recorded the ciphertext"
    )
    lab.saw(f"recorded {hexline(recorded)}")
    sp.write(BASE, new)
    m.clflush(pa, LINE, k)
    current = m.dram(pa, LINE)
    lab.step(f"the tenant stored {new[:16]!r}")
    lab.saw(f"dram now {hexline(current)}")
    lab.expect(current != recorded, "the new value has a new ciphertext")
    m.write_bytes("dram", pa, recorded)
    m.clflush(pa, LINE, k)
    lab.step("the attacker wrote the recorded ciphertext back into dram")
    seen = sp.read(BASE, LINE)
    lab.saw(f"the tenant reads {hexline(seen)}")
    lab.expect(seen == old, "the tenant reads the old value, without any error")
    lab.conclude(
        f"replayed ciphertext decrypts to the old value {seen[:15].decode(errors='replace')!r}; "
        "no integrity check"
    )


if __name__ == "__main__":
    main(run, "4. replay: old ciphertext decrypts to the old plaintext", __doc__)
