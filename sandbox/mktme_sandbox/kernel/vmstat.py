"""Event counters of the simulated mm, rendered like ``/proc/vmstat``.

Every counter is declared once in ``VMSTAT_ITEMS`` with what it counts; the
mechanisms increment them by name. Names follow Linux where Linux has the
event (``pgfault``, ``pgalloc_normal``, ``thp_collapse_alloc``); the MKTME
ones are this sandbox's own and say what the series costs or saves.
"""

from __future__ import annotations

__all__ = ["VMSTAT_ITEMS", "VmStat"]

VMSTAT_ITEMS: dict[str, str] = {
    "pgfault": "page faults handled",
    "pgfault_read": "faults on a load",
    "pgfault_write": "faults on a store",
    "pgalloc": "pages allocated (all KeyIDs)",
    "pgalloc_encrypted": "pages allocated for a KeyID other than 0",
    "pgfree": "pages freed",
    "pgfree_encrypted": "pages freed while tagged with a KeyID other than 0",
    "pgtable_alloc": "page-table pages allocated",
    "pgtable_free": "page-table pages freed",
    "prep_encrypted_flush": "page flushes in prep_encrypted_page (allocation)",
    "arch_free_page_flush": "page flushes in arch_free_page (free)",
    "keyid_pool_flush": "page flushes when a page moves between KeyID pools",
    "flush_avoided_pool": "flushes skipped because the page came from its KeyID's pool",
    "flush_lines": "cache lines written back or invalidated by those flushes",
    "flush_skipped_mitigation_off": "flushes skipped because flush_on_keyid_change is off",
    "zero_page_map": "read faults that mapped the shared zero page",
    "zero_page_refused_encrypted": "zero-page mappings refused in encrypted VMAs",
    "cow_fault": "copy-on-write breaks",
    "vma_merge": "VMAs merged",
    "vma_merge_refused_keyid": "VMA merges refused because the KeyIDs differ",
    "ksm_pages_merged": "pages merged by KSM",
    "ksm_merge_refused_keyid": "KSM merges refused because the KeyIDs differ",
    "thp_collapse_alloc": "huge pages collapsed by khugepaged",
    "thp_collapse_refused_keyid": "collapses refused because a page's KeyID differs",
    "thp_collapse_alloc_failed": "collapses that found no free 2M page",
    "thp_split_pmd": "huge PMDs split into page tables",
    "tlb_flush": "TLB flushes",
    "pswpin": "pages read in from swap",
    "pswpout": "pages written out to swap",
    "allocstall": "allocations that found no free page and ran direct reclaim",
    "pgmigrate_success": "pages migrated (move_pages, compaction)",
    "pgmigrate_fail": "pages that could not be migrated",
    "compact_stall": "compaction runs (mm/compact_memory)",
    "compact_migrate_scanned": "pages the migrate scanner looked at",
    "compact_free_scanned": "pages the free scanner looked at",
    "compact_success": "nodes that compaction left with a free 2M block",
    "key_program": "PCONFIG key programming calls that succeeded",
    "key_program_retry": "PCONFIG calls retried after busy or entropy error",
    "key_wbinvd": "cache write-backs before a key was reprogrammed",
}


class VmStat:
    """Named counters; unknown names are a programming error."""

    def __init__(self) -> None:
        self._counts = dict.fromkeys(VMSTAT_ITEMS, 0)

    def inc(self, name: str, n: int = 1) -> None:
        self._counts[name] += n  # KeyError on a typo, on purpose

    def __getitem__(self, name: str) -> int:
        return self._counts[name]

    def snapshot(self) -> dict[str, int]:
        return dict(self._counts)

    def text(self) -> str:
        return "".join(f"{name} {value}\n" for name, value in self._counts.items())

    def import_state(self, counts: dict[str, int]) -> None:
        """Counts as ``snapshot()`` gave them (ValueError unless every counter is there)."""
        if set(counts) != set(self._counts):
            raise ValueError("vmstat counters differ from this kernel's")
        self._counts = {name: int(counts[name]) for name in VMSTAT_ITEMS}
