"""Event counters of the simulated mm, rendered like ``/proc/vmstat``.

Every counter is declared once in ``VMSTAT_ITEMS`` with what it counts; the
mechanisms increment them by name. A name without prefix is Linux's own
``vm_event_item`` text from mm/vmstat.c (``pgalloc_normal``: the sandbox has
one zone, ZONE_NORMAL; ``pgfree``, ``pgfault``, ``thp_collapse_alloc``,
``thp_collapse_alloc_failed``, ``thp_split_pmd``), counting what Linux counts.
Everything Linux has no counter for is this sandbox's own and starts with
``mktme_``. The gauges of ``/proc/vmstat`` (``nr_free_pages`` ...) are read
from the allocator when the file is rendered (kernel/proc.py).
"""

from __future__ import annotations

__all__ = ["VMSTAT_ITEMS", "VmStat"]

VMSTAT_ITEMS: dict[str, str] = {
    # Linux's vm_event_item names, in mm/vmstat.c vmstat_text order
    "pswpin": "pages read in from swap",
    "pswpout": "pages written out to swap",
    "pgalloc_normal": "pages allocated (ZONE_NORMAL, the only zone; all KeyIDs)",
    "allocstall_normal": "allocations that found no free page and ran direct reclaim",
    "pgfree": "pages freed",
    "pgfault": "page faults handled",
    "pgmigrate_success": "pages migrated (move_pages, compaction)",
    "pgmigrate_fail": "pages that could not be migrated",
    "compact_migrate_scanned": "pages the migrate scanner looked at",
    "compact_free_scanned": "pages the free scanner looked at",
    "compact_stall": "compaction runs (mm/compact_memory)",
    "compact_success": "nodes that compaction left with a free 2M block",
    "unevictable_pgs_mlocked": "pages marked mlocked",
    "unevictable_pgs_munlocked": "pages whose mlock was cleared",
    "thp_fault_alloc": "huge pages allocated by a fault in a hugepage VMA",
    "thp_fault_fallback": "faults in a hugepage VMA that fell back to 4K pages",
    "thp_collapse_alloc": "huge pages collapsed by khugepaged",
    "thp_collapse_alloc_failed": "collapses that found no free 2M page",
    "thp_split_pmd": "huge PMDs split into page tables",
    "thp_zero_page_alloc": "huge zero pages allocated",
    "thp_zero_page_alloc_failed": "huge zero page allocations that failed",
    # this sandbox's own, under the mktme_ prefix
    "mktme_pgfault_read": "faults on a load",
    "mktme_pgfault_write": "faults on a store",
    "mktme_pgalloc_encrypted": "pages allocated for a KeyID other than 0",
    "mktme_pgfree_encrypted": "pages freed while tagged with a KeyID other than 0",
    "mktme_pgtable_alloc": "page-table pages allocated",
    "mktme_pgtable_free": "page-table pages freed",
    "mktme_prep_encrypted_flush": "page flushes in prep_encrypted_page (allocation)",
    "mktme_arch_free_page_flush": "page flushes in arch_free_page (free)",
    "mktme_keyid_pool_flush": "page flushes when a page moves between KeyID pools",
    "mktme_flush_avoided_pool": "flushes skipped because the page came from its KeyID's pool",
    "mktme_flush_lines": "cache lines written back or invalidated by those flushes",
    "mktme_flush_skipped_mitigation_off": "flushes skipped because flush_on_keyid_change is off",
    "mktme_zero_page_map": "read faults that mapped the shared zero page",
    "mktme_zero_page_refused_encrypted": "zero-page mappings refused in encrypted VMAs",
    "mktme_cow_fault": "copy-on-write breaks",
    "mktme_vma_merge": "VMAs merged",
    "mktme_vma_merge_refused_keyid": "VMA merges refused because the KeyIDs differ",
    "mktme_ksm_pages_merged": "pages merged by KSM",
    "mktme_ksm_merge_refused_keyid": "KSM merges refused because the KeyIDs differ",
    "mktme_tlb_flush": "TLB flushes",
    "mktme_key_program": "PCONFIG key programming calls that succeeded",
    "mktme_key_program_retry": "PCONFIG calls retried after busy or entropy error",
    "mktme_key_wbinvd": "cache write-backs before a key was reprogrammed",
}


class VmStat:
    """Named counters; unknown names are a programming error."""

    def __init__(self) -> None:
        self._counts = dict.fromkeys(VMSTAT_ITEMS, 0)

    def inc(self, name: str, n: int = 1) -> None:
        self._counts[name] += n  # KeyError on a typo, on purpose

    def inc2(self, name: str, also: str, n: int = 1, n_also: int | None = None) -> None:
        """``inc`` of two counters in one call, ``also`` by ``n`` too unless
        ``n_also`` is given: a fault counts ``pgfault`` and its kind, an
        allocation ``pgalloc_normal`` and ``mktme_pgalloc_encrypted``, a flush
        its pages and its lines (``count_vm_events`` twice in Linux)."""
        counts = self._counts
        counts[name] += n
        counts[also] += n if n_also is None else n_also

    def __getitem__(self, name: str) -> int:
        return self._counts[name]

    def snapshot(self) -> dict[str, int]:
        return dict(self._counts)

    def import_state(self, counts: dict[str, int]) -> None:
        """Counts as ``snapshot()`` gave them (ValueError unless every counter is there)."""
        if set(counts) != set(self._counts):
            raise ValueError("vmstat counters differ from this kernel's")
        self._counts = {name: int(counts[name]) for name in VMSTAT_ITEMS}
