"""Address spaces and VMAs: ``vma_keyid()`` and ``vma_merge()``.

Models "x86/mm: Implement vma_keyid()" and "mm: Do no merge VMAs with
different encryption KeyIDs". A VMA keeps its KeyID where Linux keeps it: in
the KeyID bits of ``vm_page_prot``, the pgprot every new PTE of the VMA is made
from. ``vm_flags`` does not hold the KeyID, which is why the series had to
teach ``vma_merge()`` to compare KeyIDs: two neighbours with equal flags but
different KeyIDs would otherwise merge and the second would lose its KeyID
(every later fault in it would use the first one's).

Rules kept: VMAs are page-aligned, sorted and never overlap; anonymous and
private only; merging needs adjacency, equal ``vm_flags``, equal
``vm_userfaultfd_ctx`` (``is_mergeable_vm_userfaultfd_ctx()``) and (with the
mitigation ``vma_merge_keyid_check`` on) equal KeyIDs.

Left out: file mappings, anon_vma compatibility (two neighbours merge here
even when both have faulted pages), stack growth, VMA names.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntFlag
from typing import Any

from mktme_sandbox.kernel.pgtable_types import PAGE_NONE, PteFlags, PteLayout

__all__ = ["MMAP_MIN_ADDR", "VM", "MmStruct", "Vma", "vm_get_page_prot"]

MMAP_MIN_ADDR = 0x10000


class VM(IntFlag):
    """vm_flags bits used here (values as in include/linux/mm.h)."""

    NONE = 0x0
    READ = 0x1
    WRITE = 0x2
    EXEC = 0x4
    UFFD_MISSING = 0x200  # userfaultfd register, missing mode (kernel/userfaultfd.py)
    LOCKED = 0x2000  # mlock(): the pages stay in memory (reclaim and swap skip the VMA)
    MERGEABLE = 0x80000000
    HUGEPAGE = 0x20000000
    NOHUGEPAGE = 0x40000000


_VM_ACCESS = VM.READ | VM.WRITE | VM.EXEC


def vm_get_page_prot(vm_flags: VM) -> int:
    """protection_map[] for private mappings: never RW (writes fault and COW)."""
    if not vm_flags & _VM_ACCESS:
        return int(PAGE_NONE)  # PROT_NONE: PROTNONE, not PRESENT
    prot = PteFlags.PRESENT | PteFlags.USER | PteFlags.ACCESSED
    if not vm_flags & VM.EXEC:
        prot |= PteFlags.NX
    return int(prot)


@dataclass(frozen=True, slots=True)
class Vma:
    """One VMA; replaced, never mutated."""

    start: int
    end: int
    vm_flags: VM
    vm_page_prot: int  # PTE bits with the KeyID in the address field
    vm_policy: int = 0  # MPOL_BIND node mask (bit N: node N); 0 the default policy
    vm_userfaultfd_ctx: int = 0  # the userfaultfd a registered VMA reports to; 0 none

    def __len__(self) -> int:
        return self.end - self.start

    def with_(self, **changes: object) -> Vma:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def perms(self) -> str:
        f = self.vm_flags
        return (
            "".join(
                (c if f & bit else "-")
                for c, bit in (("r", VM.READ), ("w", VM.WRITE), ("x", VM.EXEC))
            )
            + "p"
        )


def vma_policy_nodes(vma: Vma) -> tuple[int, ...] | None:
    """The nodes a VMA's ``MPOL_BIND`` policy allows; None for the default policy."""
    mask = vma.vm_policy
    if not mask:
        return None
    return tuple(nid for nid in range(mask.bit_length()) if mask >> nid & 1)


def vma_keyid(vma: Vma, layout: PteLayout) -> int:
    """The KeyID of a VMA: the KeyID bits of its vm_page_prot (``pte_keyid``
    written out: every fault asks it)."""
    return (vma.vm_page_prot & layout.keyid_mask) >> layout.keyid_shift


class MmStruct:
    """One address space: a sorted VMA list, a PGD, an ASID for the TLB."""

    def __init__(self, name: str, owner: int, pgd: int, asid: int) -> None:
        self.name = name
        self.owner = owner
        self.pgd = pgd
        self.asid = asid
        self._vmas: list[Vma] = []
        self._starts: list[int] = []
        self.uffd_pending: dict[int, int] = {}
        """Missing faults reported to the space's userfaultfd and not yet resolved:
        page address -> ``uffd_msg`` flags (kernel/userfaultfd.py)."""
        self.pmd_huge_pte: list[int] = []
        """Page tables deposited by 2M mappings (``mm->pmd_huge_pte``), one per
        huge PMD: allocated at the THP fault (or left by khugepaged's collapse),
        taken back by the split, freed with the mapping (kernel/memory.py)."""

    def export_state(self) -> dict[str, Any]:
        vmas = [
            [v.start, v.end, int(v.vm_flags), v.vm_page_prot, v.vm_policy, v.vm_userfaultfd_ctx]
            for v in self._vmas
        ]
        return {
            "name": self.name,
            "owner": self.owner,
            "pgd": self.pgd,
            "asid": self.asid,
            "vmas": vmas,
            "pmd_huge_pte": list(self.pmd_huge_pte),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> MmStruct:
        mm = cls(str(state["name"]), int(state["owner"]), int(state["pgd"]), int(state["asid"]))
        for start, end, vm_flags, prot, *rest in state["vmas"]:
            policy, ctx = (*map(int, rest), 0, 0)[:2]  # older snapshots have neither
            mm.insert(Vma(int(start), int(end), VM(vm_flags), int(prot), policy, ctx))
        mm.pmd_huge_pte = [int(pa) for pa in state.get("pmd_huge_pte", [])]  # older: none
        return mm

    # --- lookup -----------------------------------------------------------

    def vmas(self) -> list[Vma]:
        return list(self._vmas)

    @property
    def map_count(self) -> int:
        """How many VMAs the space has (``mm->map_count``)."""
        return len(self._vmas)

    def find_vma(self, addr: int) -> Vma | None:
        """The VMA containing ``addr``, or None."""
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and addr < self._vmas[i].end:
            return self._vmas[i]
        return None

    def overlapping(self, start: int, end: int) -> Iterator[Vma]:
        i = max(bisect.bisect_right(self._starts, start) - 1, 0)
        for vma in self._vmas[i:]:
            if vma.start >= end:
                break
            if vma.end > start:
                yield vma

    def covers(self, start: int, end: int) -> bool:
        """True when [start, end) is mapped without holes."""
        cursor = start
        for vma in self.overlapping(start, end):
            if vma.start > cursor:
                return False
            cursor = vma.end
        return cursor >= end

    # --- changes (callers keep the page tables in step) ---------------------

    def insert(self, vma: Vma) -> None:
        i = bisect.bisect_left(self._starts, vma.start)
        self._vmas.insert(i, vma)
        self._starts.insert(i, vma.start)

    def remove(self, vma: Vma) -> None:
        i = self._starts.index(vma.start)
        del self._vmas[i]
        del self._starts[i]

    def replace(self, old: Vma, new: Vma) -> None:
        self.remove(old)
        self.insert(new)

    def split(self, addr: int) -> None:
        """Split the VMA containing ``addr`` so that a VMA starts at ``addr``."""
        vma = self.find_vma(addr)
        if vma is None or vma.start == addr:
            return
        self.remove(vma)
        self.insert(vma.with_(end=addr))
        self.insert(vma.with_(start=addr))

    def wake_userfaults(self, start: int, end: int) -> None:
        """Forget the pending missing faults in [start, end): resolved
        (UFFDIO_COPY, UFFDIO_ZEROPAGE), unregistered or unmapped."""
        for addr in [a for a in self.uffd_pending if start <= a < end]:
            del self.uffd_pending[addr]

    def isolate(self, start: int, end: int) -> list[Vma]:
        """Split at both ends and return the VMAs inside [start, end)."""
        self.split(start)
        self.split(end)
        return list(self.overlapping(start, end))
