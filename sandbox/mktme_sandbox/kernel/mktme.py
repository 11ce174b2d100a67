"""MKTME enumeration at boot: ``detect_tme()`` and the KeyID layout.

Models ``detect_tme()`` of arch/x86/kernel/cpu/intel.c as the v5 series uses it
("x86/mm: Detect MKTME early", "x86/mm: Introduce variables to store number,
shift and mask of KeyIDs"): read IA32_TME_ACTIVATE, log what the BIOS enabled
in the same words Linux does, and derive ``mktme_nr_keyids`` and the KeyID
bits taken from the physical address. ``mktme_keyid_shift`` and
``mktme_keyid_mask`` follow from those; ``pgtable_types.PteLayout`` computes them,
once, for the page tables and everything else.

As in v5, ``nr_keyids`` is ``2**keyid_bits - 1``: detect_tme() never reads
MK_TME_MAX_KEYS. The hardware limit stays in IA32_TME_CAPABILITY (the
``mk_tme_max_keys`` line of ``hw/tme``), and PCONFIG answers INVALID_KEYID for
a KeyID above it. When MKTME is not used (not enabled by BIOS, no known
algorithm, no KeyID bits, or disabled later at boot) ``mktme_disable()`` leaves
a layout without KeyID bits: mask and shift 0, the full physical mask.

Difference, from docs/spec.md section 2: AES-XTS-256 is a known policy and a
known algorithm (Linux v5 knew only AES-XTS-128). Only one CPU exists, so the
"inconsistent between CPUs" path cannot happen.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mktme_sandbox.hw.msr import Msr, decode

__all__ = ["KeyIdLayout", "detect_tme", "mktme_disable"]

_KNOWN_POLICIES = {0: "AES-XTS-128", 2: "AES-XTS-256"}


def _fields(rdmsr: Callable[[int], int], msr: Msr) -> dict[str, int]:
    """The MSR's fields by name, from the one table in hw/msr.py."""
    return dict(decode(msr, rdmsr(msr)))


@dataclass(frozen=True)
class KeyIdLayout:
    """Where the KeyID sits in a physical address, as the kernel sees it.

    ``keyid_bits`` counts the KeyID bits the kernel uses: those the BIOS took
    from MAXPHYADDR while MKTME is enabled, 0 once ``mktme_disable()`` ran.
    """

    enabled: bool
    maxphyaddr: int
    keyid_bits: int
    nr_keyids: int

    def valid_keyid(self, keyid: int) -> bool:
        """The one range check of a KeyID: 0 (no encryption) or 1..nr_keyids."""
        return 0 <= keyid <= self.nr_keyids


def detect_tme(
    rdmsr: Callable[[int], int], maxphyaddr: int, printk: Callable[[str], None]
) -> KeyIdLayout:
    """Parse the TME MSRs as Linux does and return the KeyID layout."""
    act = _fields(rdmsr, Msr.IA32_TME_ACTIVATE)
    if not (act["lock"] and act["tme_enable"]):
        printk("x86/tme: not enabled by BIOS")
        return mktme_disable(maxphyaddr)
    printk("x86/tme: enabled by BIOS")
    usable = True
    if act["tme_policy"] not in _KNOWN_POLICIES:
        printk(f"x86/tme: Unknown policy is active: {_c_hex(act['tme_policy'])}")
    algs = [name for name, on in act.items() if name.startswith("mk_tme_crypto_") and on]
    if not algs:
        printk(
            f"x86/mktme: No known encryption algorithm is supported: "
            f"{_c_hex(rdmsr(Msr.IA32_TME_ACTIVATE) >> 48)}"
        )
        usable = False
    keyid_bits = act["mk_tme_keyid_bits"]
    nr_keyids = (1 << keyid_bits) - 1  # v5: MK_TME_MAX_KEYS is not read
    if not nr_keyids:
        printk("x86/mktme: disabled by BIOS")
        return mktme_disable(maxphyaddr)
    printk("x86/mktme: enabled by BIOS")
    printk(f"x86/mktme: {nr_keyids} KeyIDs available")
    if not usable:
        return mktme_disable(maxphyaddr)
    return KeyIdLayout(True, maxphyaddr, keyid_bits, nr_keyids)


def _c_hex(value: int) -> str:
    """C's ``%#llx``: the ``0x`` prefix for a nonzero value only (0 prints as ``0``)."""
    return f"{value:#x}" if value else "0"


def mktme_disable(maxphyaddr: int) -> KeyIdLayout:
    """ "x86/mm: Allow to disable MKTME after enumeration" (v5 patch 14): no
    KeyIDs, ``mktme_keyid_mask`` and ``mktme_keyid_shift`` 0 and the full
    physical mask, which ``PteLayout(maxphyaddr, 0)`` derives."""
    return KeyIdLayout(False, maxphyaddr, 0, 0)
