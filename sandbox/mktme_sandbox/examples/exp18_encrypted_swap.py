"""18. Encrypted swap: the mitigation for experiment 17.

The answer users reach for when swap leaks encrypted memory is to encrypt the
swap device itself (dm-crypt, ``swap`` in /etc/crypttab with a random key).
``mm/swap_encryption`` set to 1 does that for the slots written from then on:
``aes-xts-plain64`` under the device's own key, one 512-byte sector at a
time. The same secret paged out is then ciphertext on the disk, and still
comes back intact. The key lives in the kernel, not in the MKTME engine: the
disk is protected, memory stays as MKTME leaves it.
"""

from __future__ import annotations

from mktme_sandbox.examples.exp17_swap_in_clear import swap_out
from mktme_sandbox.examples.lab import Lab, main


def run(lab: Lab) -> None:
    _, clear, _ = swap_out(lab, encrypt=False)
    _, encrypted, back = swap_out(lab, encrypt=True)
    lab.expect(clear, "without encryption the secret is in swap in clear")
    lab.expect(not encrypted, "with encryption the secret is not in swap")
    lab.expect(back, "the page comes back intact from an encrypted slot")
    lab.conclude(
        f"in clear without swap_encryption: {clear}; with it: {encrypted}; read back: {back}"
    )


if __name__ == "__main__":
    main(run, "18. encrypted swap", __doc__)
