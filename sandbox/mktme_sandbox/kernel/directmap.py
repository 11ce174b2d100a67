"""One kernel direct mapping per KeyID ("x86/mm: Calculate direct mapping
size", "x86/mm: Implement sync_direct_mapping()", "x86/mm: Handle encrypted
memory in page_to_virt() and __pa()").

The direct mapping of KeyID k starts at ``PAGE_OFFSET + k *
direct_mapping_size``. The size is a power of two of at least 1 TiB and at
least the physical memory, so ``__pa()`` is a mask and ``page_to_virt()`` an
add. If the 64 TiB direct-map area cannot hold ``nr_keyids + 1`` copies (KeyID 0
and every MKTME KeyID), MKTME is disabled at boot, as the later reposts do
(docs/spec.md section 3).

Left out: the mappings are not built from page tables (64 copies of every
page's entry would cost memory for nothing); ``pagetables/kernel`` renders the
regions they would map, one per KeyID, from this arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

from mktme_sandbox.kernel.pgtable_types import PAGE_KERNEL_LARGE, Level
from mktme_sandbox.kernel.ptdump import Marker, Run

__all__ = ["DIRECT_MAP_AREA", "PAGE_OFFSET", "DirectMap", "direct_mapping_size"]

PAGE_OFFSET = 0xFFFF888000000000
DIRECT_MAP_AREA = 64 << 40  # 64 TiB between PAGE_OFFSET and the vmalloc area
_MIN_SIZE = 1 << 40


def direct_mapping_size(phys_mem: int) -> int:
    """The smallest power of two >= max(phys_mem, 1 TiB)."""
    return max(_MIN_SIZE, 1 << (phys_mem - 1).bit_length())


@dataclass(frozen=True)
class DirectMap:
    """The layout of the per-KeyID direct mappings of one kernel."""

    phys_mem: int
    copies: int  # KeyIDs mapped: 1 without MKTME, nr_keyids + 1 with it

    @property
    def size(self) -> int:
        return direct_mapping_size(self.phys_mem)

    @staticmethod
    def fits(phys_mem: int, nr_keyids: int) -> bool:
        return (nr_keyids + 1) * direct_mapping_size(phys_mem) <= DIRECT_MAP_AREA

    def page_to_virt(self, pfn: int, keyid: int) -> int:
        return PAGE_OFFSET + keyid * self.size + (pfn << 12)

    def pa(self, vaddr: int) -> int:
        """``__pa()``: a mask, because the size is a power of two (v5)."""
        return (vaddr - PAGE_OFFSET) & (self.size - 1)

    def keyid_of(self, vaddr: int) -> int:
        return (vaddr - PAGE_OFFSET) // self.size

    def regions(self) -> list[tuple[int, int, int]]:
        """(keyid, start, end) of each mapped region."""
        return [
            (k, PAGE_OFFSET + k * self.size, PAGE_OFFSET + k * self.size + self.phys_mem)
            for k in range(self.copies)
        ]

    def ptdump_items(self) -> list[Marker | Run]:
        """``pagetables/kernel``: one marker and one 2M-page run per KeyID,
        then the unmapped rest of that KeyID's slot."""
        items: list[Marker | Run] = []
        prot = int(PAGE_KERNEL_LARGE)
        for keyid, start, end in self.regions():
            items.append(Marker(f"Kernel Mapping KeyID {keyid}"))
            items.append(Run(start, end, prot, Level.PMD, keyid))
            items.append(Run(end, start + self.size, 0, Level.PUD))
        return items
