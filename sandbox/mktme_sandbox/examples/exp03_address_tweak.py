"""3. The address tweak.

AES-XTS mixes the line's physical address into the cipher (the tweak), so the
same plaintext at two addresses gives two unrelated ciphertexts, and a
ciphertext copied to another address decrypts to garbage there. An attacker
who can write DRAM cannot move encrypted data around; copied back to its own
address it decrypts again (that is experiment 4).
"""

from __future__ import annotations

from mktme_sandbox.examples.lab import BASE, LINE, Lab, blocks_differing, hexline, main


def run(lab: Lab) -> None:
    m = lab.m
    page = lab.tenant_page("exp3")
    k, sp, pa = page.keyid, page.space, page.pa
    plain = b"SAME PLAINTEXT, TWO ADDRESSES. ".ljust(LINE, b".")
    sp.write(BASE, plain)
    sp.write(BASE + LINE, plain)
    a, b = pa, pa + LINE
    lab.step(
        f"KeyID {k}: wrote the same 64 bytes at physical {a:#x} and {b:#x} and wrote them back"
    )
    m.clflush(pa, 2 * LINE, k)
    ca, cb = m.dram(a, LINE), m.dram(b, LINE)
    lab.saw(f"dram {a:#x} {hexline(ca)}")
    lab.saw(f"dram {b:#x} {hexline(cb)}")
    same_blocks = [i for i in range(0, LINE, 16) if ca[i : i + 16] == cb[i : i + 16]]
    lab.expect(ca != cb and not same_blocks, "the two ciphertexts share no 16-byte block")

    lab.step(f"copied the ciphertext of {a:#x} over {b:#x} in dram, then read {BASE + LINE:#x}")
    m.write_bytes("dram", b, ca)
    m.clflush(b, LINE, k)  # no stale clean line may answer for DRAM
    moved = sp.read(BASE + LINE, LINE)
    lab.saw(f"read at {BASE + LINE:#x}: {hexline(moved)}")
    bad = blocks_differing(moved, plain)
    lab.expect(len(bad) == 4, "the moved ciphertext decrypts to garbage in every block")

    lab.step(f"put the original ciphertext back at {b:#x}")
    m.write_bytes("dram", b, cb)
    m.clflush(b, LINE, k)
    back = sp.read(BASE + LINE, LINE)
    lab.expect(back == plain, "at its own address it decrypts again")
    lab.conclude(
        f"same plaintext -> different ciphertext at {a:#x} and {b:#x}; "
        f"moved, it decrypts to garbage ({len(bad)}/4 blocks)"
    )


if __name__ == "__main__":
    main(run, "3. the address tweak: same plaintext, two addresses; moved ciphertext", __doc__)
