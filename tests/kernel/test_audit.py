"""The audit (``mm/check``) is the oracle of most tests: here every one of its
rules is shown to fire on exactly the corruption it guards.

Each test starts from a consistent machine (``check() == []``), corrupts one
thing the way a bug in the kernel would (or a user writing page tables
through ``keyids/0/mem``), and expects the line of that rule. A rule that
never fires could not catch a bug; these tests keep each one honest.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from mktme_sandbox import Machine, SandboxError
from mktme_sandbox.kernel.kernel import Kernel
from mktme_sandbox.kernel.page import PG
from mktme_sandbox.kernel.pgtable_types import PteFlags
from mktme_sandbox.kernel.vma import MmStruct, Vma

ENC = 0x10000000  # space "a": 4 pages with KeyID 1, populated
PLAIN = 0x20000000  # space "z": 2 KeyID-0 pages, read (the zero page)
USER_PTE = PteFlags.PRESENT | PteFlags.RW | PteFlags.USER


@dataclass
class Scene:
    m: Machine

    @property
    def k(self) -> Kernel:
        return self.m.kernel

    def mm(self, name: str) -> MmStruct:
        return self.k.space(name)

    def pfn(self, name: str, va: int) -> int:
        lookup = self.k.pt.get_pte(self.mm(name).pgd, va)
        assert lookup is not None
        return self.k.pte_layout.pte_pfn(lookup.pte)

    def set_pte(self, name: str, va: int, pfn: int, keyid: int) -> None:
        self.k.pt.set_pte(self.mm(name).pgd, va, self.k.pte_layout.make_pte(pfn, keyid, USER_PTE))

    def free_pfn(self) -> int:
        """A page on a free list (pools on: one freed from KeyID 1)."""
        pool = self.k.alloc.pools()[1]
        assert pool
        return pool[-1]


@pytest.fixture
def scene() -> Scene:
    m = Machine(phys_mem="16M", seed=1)
    for keyid in (1, 2):
        m.key_command(keyid, "type=cpu algorithm=aes-xts-128", uid=0)
    m.keyid_free_pools = True
    for name in ("a", "z", "scratch"):
        m.create_space(name, uid=0)
    m.space_command("a", f"mmap {ENC:#x} 16K rw- keyid=1 populate", uid=0)
    m.space_command("z", f"mmap {PLAIN:#x} 8K r--", uid=0)
    m.read_virt("z", PLAIN, 8192)  # read faults: the zero page
    m.space_command("scratch", f"mmap {ENC:#x} 8K rw- keyid=1 populate", uid=0)
    m.destroy_space("scratch", uid=0)  # two pages wait in KeyID 1's pool
    m.write_virt("a", ENC, b"in the TLB now")
    assert m.check() == []
    return Scene(m)


def fires(scene: Scene, where: str, invariant: str) -> None:
    lines = scene.m.check()
    assert any(line.startswith(f"{where}: {invariant}: ") for line in lines), lines


# --- VMAs -------------------------------------------------------------------------


def test_a_vma_not_page_aligned(scene: Scene) -> None:
    vma = scene.mm("a").vmas()[0]
    scene.mm("a").replace(vma, vma.with_(end=vma.end - 1))
    fires(scene, "space a", "VMA not page aligned")


def test_vmas_that_overlap(scene: Scene) -> None:
    vma = scene.mm("a").vmas()[0]
    scene.mm("a").insert(vma.with_(start=vma.start + 0x1000, end=vma.end + 0x1000))
    fires(scene, "space a", "VMAs overlap")


def test_a_vma_whose_keyid_has_no_key(scene: Scene) -> None:
    layout = scene.k.pte_layout
    prot = layout.keyid_prot(3) | (scene.mm("a").vmas()[0].vm_page_prot & ~layout.keyid_prot(1))
    scene.mm("a").insert(Vma(0x30000000, 0x30001000, scene.mm("a").vmas()[0].vm_flags, prot))
    fires(scene, "space a", "VMA uses a KeyID without a key")


# --- PTEs -------------------------------------------------------------------------


def test_a_pte_outside_any_vma(scene: Scene) -> None:
    scene.set_pte("a", 0x30000000, scene.pfn("a", ENC), 1)
    fires(scene, "space a", "PTE outside any VMA")


def test_a_pte_that_maps_a_free_page(scene: Scene) -> None:
    scene.set_pte("a", ENC + 0x1000, scene.free_pfn(), 1)
    fires(scene, "space a", "PTE maps a free or missing page")


def test_the_zero_page_in_an_encrypted_vma(scene: Scene) -> None:
    scene.set_pte("a", ENC + 0x1000, scene.k.zero_pfn, 0)
    fires(scene, "space a", "zero page mapped in an encrypted VMA")


def test_a_pte_keyid_that_differs_from_its_page(scene: Scene) -> None:
    scene.k.pages.set_page_keyid(scene.pfn("a", ENC), 2)
    fires(scene, "space a", "PTE KeyID differs from its page's page_ext KeyID")


def test_a_pte_keyid_that_differs_from_its_vma(scene: Scene) -> None:
    """The VMA moves to KeyID 2 while its PTEs and pages stay at KeyID 1."""
    layout, mm = scene.k.pte_layout, scene.mm("a")
    vma = mm.vmas()[0]
    prot = (vma.vm_page_prot & ~layout.keyid_prot(1)) | layout.keyid_prot(2)
    mm.replace(vma, vma.with_(vm_page_prot=prot))
    fires(scene, "space a", "PTE KeyID differs from its VMA's KeyID")


def test_a_tlb_entry_left_after_its_pte_changed(scene: Scene) -> None:
    other = scene.pfn("a", ENC + 0x1000)
    scene.set_pte("a", ENC, other, 1)  # no TLB flush, as a forgotten flush_tlb_range
    fires(scene, "space a", "TLB entry differs from the page tables (a missing TLB flush)")


# --- pages ------------------------------------------------------------------------


def test_a_map_count_that_differs_from_the_ptes(scene: Scene) -> None:
    scene.k.pages.get_page(scene.pfn("a", ENC))
    fires(scene, "pages", "map count differs from the PTEs mapping the page")


def test_a_per_keyid_count_that_differs_from_page_ext(scene: Scene) -> None:
    scene.k.alloc.allocated_by_keyid[1] += 1
    fires(scene, "pages", "per-KeyID page count differs from page_ext")


# --- free pools -------------------------------------------------------------------

Corrupt = Callable[[Scene, int], None]


def _twice(scene: Scene, pfn: int) -> None:
    scene.k.alloc._pools[1].append(pfn)


def _not_marked_free(scene: Scene, pfn: int) -> None:
    scene.k.pages.ClearPageBuddy(pfn)


def _on_no_list(scene: Scene, pfn: int) -> None:
    scene.k.alloc._pools[1].remove(pfn)


def _tagged_with_another_keyid(scene: Scene, pfn: int) -> None:
    scene.k.pages.set_page_keyid(pfn, 2)


@pytest.mark.parametrize(
    ("corrupt", "where", "invariant"),
    [
        (_twice, "free pools", "page on the free lists more than once"),
        (_not_marked_free, "free pools", "page on a free list is not marked free"),
        (_on_no_list, "free pools", "free page on no free list (leaked)"),
        (_tagged_with_another_keyid, "free pool 1", "free page tagged with another KeyID"),
    ],
    ids=["twice", "not-marked-free", "on-no-list", "other-keyid"],
)
def test_a_broken_free_pool(scene: Scene, corrupt: Corrupt, where: str, invariant: str) -> None:
    corrupt(scene, scene.free_pfn())
    fires(scene, where, invariant)


# --- page tables ------------------------------------------------------------------


def _pgd_entry(scene: Scene, name: str, va: int) -> tuple[int, int]:
    """(physical address, value) of the PGD entry of ``va`` in space ``name``."""
    pa = scene.mm(name).pgd + ((va >> 39) & 0x1FF) * 8
    return pa, int.from_bytes(scene.m.read_phys(0, pa, 8), "little")


def test_a_table_page_reachable_from_two_spaces(scene: Scene) -> None:
    """Space z's PGD gets a second link to space a's PUD, written through KeyID 0."""
    _, entry = _pgd_entry(scene, "a", ENC)
    z_pa, _ = _pgd_entry(scene, "z", 0x7F0000000000)
    scene.m.write_phys(0, z_pa, entry.to_bytes(8, "little"))
    fires(scene, "page tables", "table page reachable more than once")


@pytest.mark.parametrize(
    ("target", "where_to"),
    [
        ("data", "to a page that is no page table"),
        ("free", "to a free page"),
        ("beyond", "outside physical memory"),
    ],
)
def test_an_upper_level_entry_that_points_at_no_table(
    scene: Scene, target: str, where_to: str
) -> None:
    """Written through keyids/0/mem, as experiment 11 invites; the space's TLB
    still holds a translation, so the audit's hardware walk meets the forgery too."""
    pa, entry = _pgd_entry(scene, "a", ENC)
    pfn = {
        "data": scene.pfn("a", ENC + 0x2000),
        "free": scene.free_pfn(),
        "beyond": scene.k.alloc.nr_pages + 5,
    }[target]
    forged = (entry & ~scene.k.pte_layout.pfn_mask) | pfn << 12
    scene.m.write_phys(0, pa, forged.to_bytes(8, "little"))
    fires(scene, "space a", f"PGD entry points {where_to}")
    scene.m.flush_tlb("a")
    with pytest.raises(SandboxError) as raised:  # the walk stops there: EIO, as unmapped
        scene.m.read_virt("a", ENC, 8)
    assert raised.value.errno == errno.EIO
    scene.m.destroy_space("a", uid=0)  # still possible, and frees no page it does not own


def test_a_table_page_in_no_address_space(scene: Scene) -> None:
    scene.k.alloc.alloc_page(0, PG.PGTABLE)
    fires(scene, "page tables", "table page in no address space (leaked)")
