"""The simulated kernel: boots on a Platform and owns every mm mechanism.

Boot follows the series' order: ``detect_tme()`` reads the MSRs early, the
direct-mapping size is computed and MKTME is disabled when nr_keyids + 1
copies do not fit the 64 TiB direct-map area, then the page allocator, the
zero page and the key service come up. The mechanisms live one per module
(page, page_alloc, pgtable, vma, mmap, memory, ksm, khugepaged, keys, check, proc);
this class holds their shared state and names the address spaces.

The mitigation switches (docs/spec.md section 3) are plain booleans read by the
mechanisms at the point where the patch they stand for acts.

The methods under "what the Machine asks" are the facade's way in: each
public method of ``Machine`` makes one call into the kernel (one of them, or
one function of a mechanism's module given this kernel), so the facade holds
locks and checks callers while every computation stays here.

``export_state``/``import_state`` carry everything a booted kernel changes
(log, counters, switches, allocator, page-table count, TLB, spaces and their
VMAs, key owners, KSM and khugepaged counters) for machine snapshots; what
boot derives from the config (KeyID layout, direct map, zero page) is not saved.
The page tables themselves live in emulated memory and come back with it.
"""

from __future__ import annotations

import dataclasses
import errno
import re
from typing import Any

from mktme_sandbox.config import PAGE_SIZE, MachineConfig
from mktme_sandbox.errors import fail
from mktme_sandbox.hw.platform import Platform
from mktme_sandbox.kernel.directmap import DirectMap, DirectMapping
from mktme_sandbox.kernel.keys import KeyService
from mktme_sandbox.kernel.khugepaged import KhugepagedStats
from mktme_sandbox.kernel.ksm import KsmStats
from mktme_sandbox.kernel.memory import zap_page_range
from mktme_sandbox.kernel.mktme import detect_tme, mktme_disable
from mktme_sandbox.kernel.page import PG
from mktme_sandbox.kernel.page_alloc import PageAllocator
from mktme_sandbox.kernel.pgtable import TREE_END, PageTables
from mktme_sandbox.kernel.pgtable_types import USER_END, PteLayout
from mktme_sandbox.kernel.printk import KernelLog
from mktme_sandbox.kernel.swapfile import SwapDevice
from mktme_sandbox.kernel.tlb import Tlb
from mktme_sandbox.kernel.vma import MmStruct, vma_keyid
from mktme_sandbox.kernel.vmstat import VmStat

__all__ = ["LATER_FIXES", "MITIGATIONS", "Kernel"]

MITIGATIONS: dict[str, str] = {
    "vma_merge_keyid_check": "mm: Do no merge VMAs with different encryption KeyIDs",
    "no_zero_page_encrypted": "mm: Do not use zero page in encrypted pages",
    "ksm_keyid_check": "mm/ksm: Do not merge pages with different KeyIDs",
    "khugepaged_keyid_check": "mm/khugepaged: Handle encrypted pages",
    "pte_modify_preserve_keyid": "x86/mm: Preserve KeyID on pte_modify() and pgprot_modify()",
    "flush_on_keyid_change": "x86/mm: Implement prep_encrypted_page() and arch_free_page()",
    "alloc_page_vma_keyid": "mm/page_alloc: Handle allocation for encrypted memory",
    "migrate_keyid": "mm/page_alloc: Handle allocation for encrypted memory",
    "uffd_zeropage_encrypted_check": "later fix: no zero page in encrypted VMAs for UFFDIO_ZEROPAGE",
}
LATER_FIXES = frozenset({"uffd_zeropage_encrypted_check"})
"""Switches for a rule v5 lacks: off by default, so the machine is v5 as posted."""
RESERVED_SPACE_NAMES = ("kernel",)  # pagetables/kernel shows the direct mappings
_SPACE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class Charging:
    """``Kernel.charging``: a plain context manager, not a contextlib
    generator (a generator costs more than the bookkeeping it wraps). The
    fault path sets ``charge_uid`` itself (``handle_mm_fault``)."""

    __slots__ = ("_alloc", "_saved", "_uid")

    def __init__(self, alloc: PageAllocator, uid: int | None) -> None:
        self._alloc, self._uid = alloc, uid
        self._saved: int | None = None

    def __enter__(self) -> None:
        self._saved = self._alloc.charge_uid
        self._alloc.charge_uid = self._uid

    def __exit__(self, *exc: object) -> None:
        self._alloc.charge_uid = self._saved


class Kernel:
    """One booted kernel on one platform."""

    def __init__(self, platform: Platform, config: MachineConfig, owner_uid: int = 0) -> None:
        self.platform = platform
        self.config = config
        self.owner_uid = owner_uid
        """The daemon's user: like root, exempt from the per-uid limits."""
        self.exempt_uids = (0, owner_uid)
        """Root and the daemon's user: the uids no per-uid limit applies to."""
        self.log = KernelLog()
        self.vmstat = VmStat()
        self.log.printk("Linux version 4.18.0-mktme-v5 (mktme-sandbox) #1 SMP")
        layout = detect_tme(platform.rdmsr, config.maxphyaddr, self.log.printk)
        if layout.enabled and not DirectMap.fits(config.phys_mem, layout.nr_keyids):
            # v5 patch 16, calculate_direct_mapping_size(): its two pr_err() lines
            self.log.printk("x86/mktme: Disabled. Not enough virtual address space")
            self.log.printk("x86/mktme: Consider switching to 5-level paging")
            layout = mktme_disable(config.maxphyaddr)
        self.layout = layout
        self.pte_layout = PteLayout(config.maxphyaddr, layout.keyid_bits)
        self.mitigations = {name: name not in LATER_FIXES for name in MITIGATIONS}
        self.alloc = PageAllocator(
            platform,
            config.phys_mem,
            self.vmstat,
            self.mitigations,
            config.page_limit,
            self.exempt_uids,
            config.numa_nodes,
        )
        self.pages = self.alloc.pages
        self.swap = SwapDevice(config.swap, config.seed, self._swap_limit)
        """The swap partition (``swap``), its slots and its dm-crypt key."""
        self.pinned: set[int] = set()
        """PFNs a ``get_user_pages()`` in progress holds: reclaim leaves them."""
        self.alloc.reclaim = self._reclaim
        """struct page and page_ext of every PFN: the only way to a page's state."""
        self.alloc.alloc_page(0, PG.RESERVED, zero=False)  # PFN 0, as on a PC
        self.directmap = self._init_memory_mapping(config.phys_mem, layout.nr_keyids + 1)
        """The direct mappings: page tables in memory, the path of every kernel copy."""
        self.zero_pfn = self.alloc.alloc_page(0, PG.ZERO | PG.RESERVED)
        self.huge_zero_pfn: int | None = None
        """The huge zero page, allocated at its first use (``mm_get_huge_zero_page``)."""
        self.huge_zero_refs = 0
        """The PMDs that map the huge zero page; the last one to go frees it."""
        self.pt = PageTables(
            platform, self.pte_layout, self._alloc_table, self._free_table, self.pages.page_table_at
        )
        self.tlb = Tlb()
        self.spaces: dict[str, MmStruct] = {}
        self._next_asid = 1
        self.keys = KeyService(
            platform.pconfig, platform.key_state, platform.wbinvd, layout, config.algorithms,
            self.log, self.vmstat, self.keyid_in_use,
            lambda uid: None if self.unlimited(uid) else config.keyid_limit,
        )  # fmt: skip
        self.ksm = KsmStats()
        self.khugepaged = KhugepagedStats()
        self.log.printk(
            f"Memory: {config.phys_mem >> 10}K available, direct mapping size "
            f"{self.directmap.size >> 40} TiB x {self.directmap.copies}"
        )

    # --- page-table pages -------------------------------------------------------

    def _init_memory_mapping(self, phys_mem: int, copies: int) -> DirectMapping:
        """KeyID 0's direct mapping (``init_memory_mapping``), then the
        allocator zeroes and flushes through it, then every KeyID's copy
        (``sync_direct_mapping``)."""
        tables = PageTables(
            self.platform, self.pte_layout, self._alloc_kernel_table, self._free_table,
            self.pages.page_table_at, va_end=TREE_END,
        )  # fmt: skip
        directmap = DirectMapping(DirectMap(phys_mem, copies), self.platform, self.pages, tables)
        self.alloc.mem = directmap
        directmap.sync_direct_mapping()
        return directmap

    def _alloc_kernel_table(self) -> int:
        """A page of the kernel's own tables: reserved, charged to no one (memblock's)."""
        return self.alloc.alloc_page(0, PG.PGTABLE | PG.RESERVED) * PAGE_SIZE

    def _alloc_table(self) -> int:
        self.vmstat.inc("mktme_pgtable_alloc")
        return self.alloc.alloc_page(0, PG.PGTABLE) * PAGE_SIZE

    def _free_table(self, pa: int) -> None:
        self.vmstat.inc("mktme_pgtable_free")
        self.alloc.free_page(pa // PAGE_SIZE)

    def _reclaim(self) -> int:
        from mktme_sandbox.kernel.vmscan import try_to_free_pages

        return try_to_free_pages(self)

    # --- per-uid limits -----------------------------------------------------------

    def _swap_limit(self, uid: int) -> int | None:
        """Swap slots ``uid`` may hold: half the device (docs/spec.md 8: no user
        takes every page, on disk either); root and the daemon's user: no limit."""
        return None if self.unlimited(uid) else self.swap.total // 2

    def unlimited(self, uid: int) -> bool:
        """Root and the daemon's user pass every per-uid limit."""
        return uid in self.exempt_uids

    def charging(self, uid: int | None) -> Charging:
        """Charge the pages allocated inside to ``uid``, the owner of the space
        they are for (Linux charges the memcg of ``current``, the task whose
        fault or call allocates); None: to no one (the kernel's own pages)."""
        return Charging(self.alloc, uid)

    # --- address spaces -----------------------------------------------------------

    def space(self, name: str) -> MmStruct:
        mm = self.spaces.get(name)
        if mm is None:
            fail(errno.ENOENT, f"no address space named {name!r}")
        return mm

    def create_space(self, name: str, uid: int) -> MmStruct:
        if not _SPACE_NAME.fullmatch(name):
            fail(errno.EINVAL, f"space name {name!r}: use 1-64 of A-Z a-z 0-9 . _ -")
        if name in self.spaces:
            fail(errno.EEXIST, f"space {name!r} exists")
        if name in RESERVED_SPACE_NAMES:
            fail(errno.EINVAL, f"space name {name!r} is taken by pagetables/{name}")
        with self.charging(uid):
            pgd = self.pt.create()
        mm = MmStruct(name, uid, pgd, self._next_asid)
        self._next_asid += 1
        self.spaces[name] = mm
        return mm

    def destroy_space(self, name: str) -> None:
        """exit_mmap(): unmap everything, free the tables, forget the ASID."""
        mm = self.space(name)
        zap_page_range(self, mm, 0, USER_END)
        for table in mm.pmd_huge_pte:  # left by a huge PMD overwritten through keyids/0/mem
            self.pt.pte_free(table)
        self.pt.destroy(mm.pgd)
        self.tlb.flush_all(mm.asid)
        del self.spaces[name]

    # --- snapshots ------------------------------------------------------------

    def export_state(self) -> dict[str, Any]:
        return {
            "log": self.log.export_state(),
            "vmstat": self.vmstat.snapshot(),
            "mitigations": dict(self.mitigations),
            "alloc": self.alloc.export_state(),
            "table_pages": self.pt.table_pages,
            "tlb": self.tlb.export_state(),
            "spaces": [mm.export_state() for mm in self.spaces.values()],
            "next_asid": self._next_asid,
            "key_owners": list(self.keys.owners().items()),
            "ksm": dataclasses.asdict(self.ksm),
            "khugepaged": dataclasses.asdict(self.khugepaged),
            "huge_zero_pfn": self.huge_zero_pfn,
            "huge_zero_refs": self.huge_zero_refs,
            "swap": self.swap.export_state(),
            "directmap": self.directmap.export_state(),
        }

    def import_state(self, state: dict[str, Any]) -> None:
        """Become the kernel of ``state``; ValueError/KeyError/TypeError when it does
        not fit this kernel (the caller then drops this kernel)."""
        if set(state["mitigations"]) != set(MITIGATIONS):
            raise ValueError("the mitigation switches differ from this kernel's")
        self.log.import_state(state["log"])
        self.vmstat.import_state(state["vmstat"])
        self.mitigations.update({name: bool(state["mitigations"][name]) for name in MITIGATIONS})
        self.alloc.import_state(state["alloc"])
        self.pt.table_pages = int(state["table_pages"])
        self.tlb.import_state(state["tlb"])
        spaces = [MmStruct.from_state(space) for space in state["spaces"]]
        self.spaces = {mm.name: mm for mm in spaces}
        self._next_asid = int(state["next_asid"])
        self.keys.set_owners({int(k): int(uid) for k, uid in state["key_owners"]})
        self.ksm = KsmStats(**state["ksm"])
        self.khugepaged = KhugepagedStats(**state["khugepaged"])
        if "directmap" in state:  # the tables came back with memory, their cache here
            self.directmap.import_state(state["directmap"])
        huge_zero = state.get("huge_zero_pfn")
        self.huge_zero_pfn = None if huge_zero is None else int(huge_zero)
        self.huge_zero_refs = int(state.get("huge_zero_refs", 0))
        if "swap" in state:  # a snapshot taken before swap existed has none in use
            self.swap.import_state(state["swap"])

    # --- KeyIDs ---------------------------------------------------------------

    def keyid_in_use(self, keyid: int) -> bool:
        """Referenced by a VMA or by an allocated page."""
        if self.alloc.allocated_by_keyid.get(keyid, 0):
            return True
        return any(
            vma_keyid(vma, self.pte_layout) == keyid
            for mm in self.spaces.values()
            for vma in mm.vmas()
        )

    def pages_of(self, keyid: int) -> int:
        return self.alloc.allocated_by_keyid.get(keyid, 0)

    def mitigation(self, name: str) -> bool:
        if name not in MITIGATIONS:
            fail(errno.ENOENT, f"no mitigation named {name!r}")
        return self.mitigations[name]

    def set_mitigation(self, name: str, on: bool) -> None:
        self.mitigation(name)  # ENOENT for an unknown name
        self.mitigations[name] = on
        self.log.printk(f"mktme: mitigation {name} {'on' if on else 'OFF'} ({MITIGATIONS[name]})")

    # --- what the Machine asks --------------------------------------------------

    @property
    def nr_keyids(self) -> int:
        return self.layout.nr_keyids

    def valid_keyid(self, keyid: int) -> bool:
        return self.layout.valid_keyid(keyid)

    def dmesg(self) -> str:
        return self.log.text()

    def printk(self, line: str) -> None:
        self.log.printk(line)

    def space_names(self) -> list[str]:
        return sorted(self.spaces)

    def key_status(self, keyid: int) -> str:
        """``keys/N``: the slot's state and the pages it encrypts."""
        self.keys.check_exists(keyid, f"keys/{keyid}")
        return self.keys.status_line(keyid, self.pages_of(keyid))

    def key_program(self, keyid: int, payload: str, uid: int) -> None:
        self.keys.program(keyid, payload, uid)

    def key_owner(self, keyid: int) -> int | None:
        return self.keys.owner(keyid)

    def free_pools(self) -> str:
        """``mm/free_pools``: the free pages of each KeyID's pool."""
        counts = self.alloc.free_pages_by_keyid()
        return "".join(f"keyid={k} free={n}\n" for k, n in counts.items())

    def keyid_free_pools(self) -> bool:
        return self.alloc.keyid_free_pools

    def set_keyid_free_pools(self, on: bool) -> None:
        self.alloc.set_keyid_free_pools(on)

    def tme_text(self) -> str:
        """``hw/tme``: the MSRs decoded, then the address layout this kernel
        derived from them and from CPUID's MAXPHYADDR (what a tool needs to
        find the KeyID bits in a PTE)."""
        pte = self.pte_layout  # the shift and mask, derived once
        return self.platform.tme_text() + (
            f"maxphyaddr {pte.maxphyaddr}\n"
            f"keyid_shift {pte.keyid_shift}\n"
            f"keyid_mask {pte.keyid_mask:#018x}\n"
            f"nr_keyids {self.nr_keyids}\n"
        )
