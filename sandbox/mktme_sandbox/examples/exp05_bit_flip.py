"""5. One DRAM bit flip garbles exactly one 16-byte block.

XTS encrypts each 16-byte block of a line on its own (its tweak is the line's
address times alpha^j). Flipping one bit of ciphertext in DRAM (a Rowhammer
flip, a bus attacker) therefore turns one plaintext block into random-looking
bytes and leaves every other block intact: the damage is not detected (no
integrity) and is not confined to one bit either.
"""

from __future__ import annotations

from mktme_sandbox.examples.lab import BASE, BLOCK, LINE, Lab, blocks_differing, hexline, main

LENGTH = 4 * LINE  # 16 blocks
FLIP_OFFSET, FLIP_BIT = LINE + 37, 3  # line 1, block 2 of that line


def run(lab: Lab) -> None:
    m = lab.m
    page = lab.tenant_page("exp5")
    k, sp, pa = page.keyid, page.space, page.pa
    data = bytes(range(LENGTH))
    sp.write(BASE, data)
    m.clflush(pa, LENGTH, k)
    lab.step(
        f"KeyID {k}: wrote {LENGTH} known bytes (16 blocks) at physical {pa:#x}, wrote them back"
    )
    target = pa + FLIP_OFFSET
    byte = m.dram(target, 1)[0]
    m.write_bytes("dram", target, bytes([byte ^ 1 << FLIP_BIT]))
    m.clflush(pa, LENGTH, k)
    lab.step(f"flipped bit {FLIP_BIT} of dram byte {target:#x} (block {FLIP_OFFSET // BLOCK})")
    seen = sp.read(BASE, LENGTH)
    bad = blocks_differing(seen, data)
    lab.saw(f"blocks that differ: {bad}")
    for i in bad:
        lab.saw(
            f"block {i}: {hexline(seen[i * BLOCK : (i + 1) * BLOCK])} (was {data[i * BLOCK : (i + 1) * BLOCK].hex(' ')})"
        )
    lab.expect(bad == [FLIP_OFFSET // BLOCK], f"exactly block {FLIP_OFFSET // BLOCK} is garbled")
    changed = sum(
        a != b
        for a, b in zip(
            seen[FLIP_OFFSET // BLOCK * BLOCK :][:BLOCK],
            data[FLIP_OFFSET // BLOCK * BLOCK :][:BLOCK],
            strict=False,
        )
    )
    lab.expect(changed > 1, "the whole block is garbled, not one bit")
    lab.conclude(
        f"one flipped bit garbled block {bad} ({changed}/16 bytes changed), "
        f"the other {LENGTH // BLOCK - len(bad)} blocks intact"
    )


if __name__ == "__main__":
    main(run, "5. one DRAM bit flip garbles exactly one 16-byte block", __doc__)
