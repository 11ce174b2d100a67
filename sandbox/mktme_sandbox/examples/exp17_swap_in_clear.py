"""17. Swap holds encrypted memory in clear.

MKTME encrypts memory, not the disk. When a page of an encrypted VMA is
swapped out (``madvise ... pageout`` here, reclaim under memory pressure
alike), mm/page_io.c swap_writepage() reads it through the kernel's mapping
of the page, which the series makes the direct mapping of the page's own
KeyID (patch 18): the swap device receives the plaintext. Whoever reads the
disk (the file ``swap``, a partition as stored) finds the secret that
``dram`` only ever showed as ciphertext. The next access swaps the page back
in, into a page allocated for the VMA's KeyID.
"""

from __future__ import annotations

from mktme_sandbox.examples.lab import PAGE, CannotRun, Lab, main

SECRET = b"the swap device keeps secrets in clear "


def swap_out(lab: Lab, encrypt: bool) -> tuple[bool, bool, bool]:
    """A tenant's secret paged out; returns (found in dram, found in swap, read back)."""
    m = lab.m
    if m.file("swap").stat().st_size == 0:
        raise CannotRun("this mount has no swap (mount with --swap SIZE)")
    lab.switch("mm/swap_encryption", encrypt)
    tenant = lab.tenant_page("exp17")
    secret = SECRET + tenant.space.name.encode()
    tenant.space.write(tenant.va, secret)
    in_dram = secret in m.file("dram").read_bytes()
    tenant.space.ctl(f"madvise {tenant.va:#x} {PAGE} pageout")
    entry = tenant.space.pagemap(tenant.va)[0]
    lab.saw(f"swap_encryption={int(encrypt)}: pagemap entry {entry.raw:#018x} (bit 62: swapped)")
    in_swap = secret in m.file("swap").read_bytes()
    back = tenant.space.read(tenant.va, len(secret)) == secret
    lab.saw(f"secret in dram: {in_dram}; in swap: {in_swap}; read back after swap-in: {back}")
    lab.destroy(tenant.space)
    return in_dram, in_swap, back


def run(lab: Lab) -> None:
    in_dram, in_swap, back = swap_out(lab, encrypt=False)
    lab.expect(not in_dram, "dram holds the secret only as ciphertext")
    lab.expect(in_swap, "swap holds the secret in clear")
    lab.expect(back, "the page comes back intact")
    lab.conclude(f"secret in dram: {in_dram}, in swap: {in_swap}, read back: {back}")


if __name__ == "__main__":
    main(run, "17. swap holds encrypted memory in clear", __doc__)
