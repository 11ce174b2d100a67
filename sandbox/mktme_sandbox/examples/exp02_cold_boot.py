"""2. Cold boot: what DRAM gives away.

Two secrets are written, one in a page whose KeyID is programmed with
"type=no-encrypt" (plaintext in DRAM), one under a CPU-generated key. Their
lines are written back, as the cache would eventually do, and all of DRAM is
searched the way a cold-boot or bus attacker would read it: the first secret
is there in clear at its physical address, the second is nowhere.

Then, as root (``mm/snapshot`` is root only), the machine is rebooted with its
DRAM kept (``coldboot``: the chips survive, the key table does not): the same
ciphertext is still at the same address, the no-encrypt secret is still there
in clear, but the KeyID that held the CPU key is unprogrammed and reading the
page through it gives garbage, because the key that wrote it is gone. The
machine is then restored from a snapshot taken just before the reboot (a
convenience of the simulation, not of physics), so the experiment leaves it as
it found it.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from pathlib import Path

from mktme_sandbox.examples.lab import LINE, Lab, TenantPage, main

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
    rebooted = reboot_keeping_dram(lab, plain, cpu, clear, hidden)
    lab.conclude(
        f"dram scan finds the no-encrypt secret at {pa_clear:#x} and the "
        f"cpu-key secret {'nowhere' if not hits[hidden] else 'too'}"
        + ("; after a reboot DRAM is the same but the key is gone" if rebooted else "")
    )


def reboot_keeping_dram(
    lab: Lab, plain: TenantPage, cpu: TenantPage, clear: bytes, hidden: bytes
) -> bool:
    """Cold boot proper: reboot with DRAM kept, look again, restore. Root only."""
    if os.geteuid() != 0:
        lab.note("the reboot needs root (mm/snapshot is root only): skipped")
        return False
    m = lab.m
    ciphertext = m.dram(cpu.pa, LINE)
    top = tempfile.mkdtemp(prefix="mktme-exp2-")  # mode 0700: a snapshot holds every key
    try:
        before = Path(top) / "before-reboot.snapshot"
        m.write_ctl("mm/snapshot", f"save {before}")
        m.write_ctl("mm/snapshot", f"coldboot {before}")
        lab.step("saved the machine, then rebooted it keeping only DRAM (coldboot)")
        after = m.dram(cpu.pa, LINE)
        through_key = m.phys(cpu.keyid, cpu.pa, len(hidden))
        state = m.key(cpu.keyid).state
        lab.saw(f"KeyID {cpu.keyid} after the reboot: {state}")
        lab.saw(f"dram at {cpu.pa:#x} is {'the same' if after == ciphertext else 'changed'}")
        lab.saw(f"through KeyID {cpu.keyid} now: {through_key.hex()}")
        lab.expect(after == ciphertext, "DRAM kept the same ciphertext across the reboot")
        lab.expect(m.dram(plain.pa, len(clear)) == clear, "the no-encrypt secret survived in clear")
        lab.expect(state == "free", f"KeyID {cpu.keyid} lost its key")
        lab.expect(through_key != hidden, "without its key the page decrypts to garbage")
        m.write_ctl("mm/snapshot", f"restore {before}")
        lab.step("restored the machine from the snapshot taken before the reboot")
        lab.expect(
            cpu.space.read(cpu.va, len(hidden)) == hidden, "the restored tenant reads its secret"
        )
    finally:
        shutil.rmtree(top, ignore_errors=True)
    return True


if __name__ == "__main__":
    main(run, "2. cold boot: no-encrypt vs cpu key in DRAM", __doc__)
