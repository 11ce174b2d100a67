"""2. Cold boot: what DRAM gives away.

Two secrets are written, one in a page whose KeyID is programmed with
"type=no-encrypt" (plaintext in DRAM), one under a CPU-generated key. Their
lines are written back, as the cache would eventually do, and all of DRAM is
searched the way a cold-boot or bus attacker would read it: the first secret
is there in clear at its physical address, the second is nowhere.
"""

from __future__ import annotations

import secrets

from mktme_sandbox.examples.lab import LINE, Lab, main

CHUNK = 1 << 20


def scan(lab: Lab, patterns: list[bytes]) -> dict[bytes, list[int]]:
    """Every address of dram where each pattern starts (one pass over memory)."""
    m = lab.m
    hits: dict[bytes, list[int]] = {p: [] for p in patterns}
    overlap = max(len(p) for p in patterns) - 1
    size = m.phys_mem
    for offset in range(0, size, CHUNK):
        data = m.dram(offset, min(CHUNK + overlap, size - offset))
        for p in patterns:
            at = data.find(p)
            while 0 <= at < CHUNK:
                hits[p].append(offset + at)
                at = data.find(p, at + 1)
    return hits


def run(lab: Lab) -> None:
    m = lab.m
    plain = lab.tenant_page("exp2-clear", kind="no-encrypt")
    cpu = lab.tenant_page("exp2-cipher", kind="cpu")
    plain_k, cpu_k, pa_clear, pa_hidden = plain.keyid, cpu.keyid, plain.pa, cpu.pa
    token = secrets.token_hex(8)
    clear = f"COLDBOOT-CLEAR-{token}".encode()
    hidden = f"COLDBOOT-CIPHER-{token}".encode()
    plain.space.write(plain.va, clear)
    cpu.space.write(cpu.va, hidden)
    lab.step(
        f"wrote {clear.decode()} under KeyID {plain_k} (physical {pa_clear:#x}) and "
        f"{hidden.decode()} under KeyID {cpu_k} (physical {pa_hidden:#x})"
    )
    m.clflush(pa_clear, LINE, plain_k)
    m.clflush(pa_hidden, LINE, cpu_k)
    lab.step(
        "wrote both lines back to DRAM (clflush), then searched all "
        f"{m.phys_mem >> 20} MiB of dram for both secrets"
    )
    hits = scan(lab, [clear, hidden])
    lab.saw(f"no-encrypt secret at: {', '.join(hex(a) for a in hits[clear]) or 'nowhere'}")
    lab.saw(f"cpu-key secret at:    {', '.join(hex(a) for a in hits[hidden]) or 'nowhere'}")
    lab.expect(pa_clear in hits[clear], "the no-encrypt secret is in dram at its physical address")
    lab.expect(not hits[hidden], "the cpu-key secret is nowhere in dram")
    lab.conclude(
        f"dram scan finds the no-encrypt secret at {pa_clear:#x} and the "
        f"cpu-key secret {'nowhere' if not hits[hidden] else 'too'}"
    )


if __name__ == "__main__":
    main(run, "2. cold boot: no-encrypt vs cpu key in DRAM", __doc__)
