"""1. Plaintext vs ciphertext vs the wrong key.

A tenant writes a secret into a page encrypted with its own KeyID. Through
that KeyID (its mapping, or keyids/K/mem) it reads the secret; DRAM holds only
ciphertext once the dirty line is written back; through any other KeyID
(KeyID 0's TME key, another tenant's key) the same physical line decrypts to
garbage. The KeyID in the page-table entry, not the page, selects the key.
"""

from __future__ import annotations

import secrets

from mktme_sandbox.examples.lab import BASE, LINE, CannotRun, Lab, hexline, main


def run(lab: Lab) -> None:
    m = lab.m
    page = lab.tenant_page("exp1")
    k, sp, pa = page.keyid, page.space, page.pa
    try:
        other = lab.key("cpu")
        lab.step(f"programmed KeyID {other} for a second tenant")
    except CannotRun:
        other = None
        lab.note("no second free KeyID: the wrong key is KeyID 0 only")
    secret = f"TOP SECRET {secrets.token_hex(8)} ".encode().ljust(LINE, b"#")
    sp.write(BASE, secret)
    lab.step(f"wrote a 64-byte secret at {BASE:#x}")

    mine = sp.read(BASE, LINE)
    lab.saw(f"spaces/{sp.name}/mem   {hexline(mine)}")
    lab.expect(mine == secret, "the process reads its secret")
    view = m.phys(k, pa, LINE)
    lab.saw(f"keyids/{k}/mem      {hexline(view)}")
    lab.expect(view == secret, f"keyids/{k}/mem reads the same plaintext")

    before = m.dram(pa, LINE)
    m.clflush(pa, LINE, k)
    lab.step(f"clflush {pa:#x} keyid={k}: the dirty line is encrypted and written back")
    cipher = m.dram(pa, LINE)
    lab.saw(f"dram before write-back {hexline(before)}")
    lab.saw(f"dram after write-back  {hexline(cipher)}")
    if before == cipher:
        lab.note("dram did not change at write-back: this machine has no cache (--cache-size 0)")
    lab.expect(
        secret[:16] not in cipher and cipher != secret, "dram holds ciphertext, not the secret"
    )

    wrong = {0: lab.read_foreign(0, pa, LINE)}
    if other is not None:
        wrong[other] = lab.read_foreign(other, pa, LINE)
    for keyid, data in wrong.items():
        lab.saw(f"keyids/{keyid}/mem      {hexline(data)}")
        lab.expect(
            data != secret and secret[:16] not in data,
            f"KeyID {keyid} (the wrong key) reads garbage",
        )
    again = sp.read(BASE, LINE)
    lab.expect(again == secret, "the owner still reads its secret (other views changed nothing)")
    wrong_ids = " and ".join(f"KeyID {x}" for x in wrong)
    lab.conclude(f"KeyID {k} reads the secret; dram holds ciphertext; {wrong_ids} read garbage")


if __name__ == "__main__":
    main(run, "1. plaintext vs ciphertext vs the wrong key", __doc__)
