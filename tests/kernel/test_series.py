"""One test per patch of the MKTME v5 series: the protected behaviour, and
with the patch's mitigation switched off, the failure it prevents (seen in the
data and reported by the audit)."""

from __future__ import annotations

import pytest

from kernel_helpers import (
    HPAGE,
    PAGE,
    U,
    cpu_key,
    ctl,
    leaf,
    machine,
    page_keyid,
    pfn_of,
    smaps_keyids,
    space,
    two_keys,
    vmstat,
)
from mktme_sandbox import Machine
from mktme_sandbox.hw.msr import Msr, encode
from mktme_sandbox.kernel.directmap import PAGE_OFFSET
from mktme_sandbox.kernel.mktme import detect_tme

SECRET = b"attack at dawn!!" * 4


# --- 01 mm: Do no merge VMAs with different encryption KeyIDs ------------------


def test_neighbour_vmas_with_different_keyids_stay_apart() -> None:
    m, a = two_keys()
    ctl(m, a, f"mmap {U:#x} 4K rw- keyid=1")
    ctl(m, a, f"mmap {U + PAGE:#x} 4K rw- keyid=2")
    assert len(m.maps(a).splitlines()) == 2
    assert smaps_keyids(m, a) == [1, 2]
    assert vmstat(m)["mktme_vma_merge_refused_keyid"] >= 1


def test_neighbour_vmas_with_equal_keyids_merge() -> None:
    m, a = two_keys()
    ctl(m, a, f"mmap {U:#x} 4K rw- keyid=1")
    ctl(m, a, f"mmap {U + PAGE:#x} 4K rw- keyid=1")
    assert m.maps(a) == f"{U:08x}-{U + 2 * PAGE:08x} rw-p 00000000 00:00 0 \n"


def test_without_the_merge_check_the_second_vma_loses_its_keyid() -> None:
    m, a = two_keys()
    m.set_mitigation("vma_merge_keyid_check", False)
    ctl(m, a, f"mmap {U:#x} 4K rw- keyid=1 populate")
    ctl(m, a, f"mmap {U + PAGE:#x} 4K rw- keyid=2 populate")
    assert smaps_keyids(m, a) == [1]  # one VMA, KeyID 2 gone
    assert any("differs from its VMA's KeyID" in line for line in m.check())


# --- 02 mm: Do not use zero page in encrypted pages -----------------------------


def test_read_fault_on_keyid0_vma_maps_the_zero_page() -> None:
    m, a = two_keys()
    ctl(m, a, f"mmap {U:#x} 8K r--")
    assert m.read_virt(a, U, 2 * PAGE) == bytes(2 * PAGE)
    assert pfn_of(m, a, U) == pfn_of(m, a, U + PAGE) == m.kernel.zero_pfn


def test_read_fault_on_encrypted_vma_never_maps_zero_page() -> None:
    m, a = two_keys()
    ctl(m, a, f"mmap {U:#x} 4K r-- keyid=1")
    assert m.read_virt(a, U, PAGE) == bytes(PAGE)
    assert pfn_of(m, a, U) != m.kernel.zero_pfn
    assert page_keyid(m, pfn_of(m, a, U)) == 1
    assert vmstat(m)["mktme_zero_page_refused_encrypted"] == 1
    assert m.check() == []


def test_without_the_check_an_encrypted_vma_reads_the_zero_page_as_garbage() -> None:
    m, a = two_keys()
    m.set_mitigation("no_zero_page_encrypted", False)
    ctl(m, a, f"mmap {U:#x} 4K r-- keyid=1")
    assert m.read_virt(a, U, 64) != bytes(64)
    assert any("zero page mapped in an encrypted VMA" in line for line in m.check())


# --- 03 mm/ksm: Do not merge pages with different KeyIDs -------------------------


def tenants(keyid_a: int, keyid_b: int, **options: object) -> tuple[Machine, str, str]:
    m, a = two_keys(**options)
    b = space(m, "b")
    for name, keyid in ((a, keyid_a), (b, keyid_b)):
        ctl(m, name, f"mmap {U:#x} 4K rw- keyid={keyid}")
        m.write_virt(name, U, SECRET)
        ctl(m, name, f"madvise {U:#x} 4K mergeable")
    return m, a, b


def test_ksm_merges_identical_pages_of_one_keyid() -> None:
    m, a, b = tenants(1, 1)
    assert m.ksm_run() == 1
    assert pfn_of(m, a, U) == pfn_of(m, b, U)
    assert m.read_virt(b, U, len(SECRET)) == SECRET
    assert m.check() == []


def test_each_ksm_pass_counts_one_full_scan() -> None:
    """mm/ksm.c scan_get_next_rmap_item(): ``ksm_scan.seqnr++`` once the scan
    has been round every mm, shown as /sys/kernel/mm/ksm/full_scans."""
    m, _, _ = tenants(1, 1)
    before = int(m.ksm_stats()["full_scans"])
    m.ksm_run()
    m.ksm_run()
    assert int(m.ksm_stats()["full_scans"]) == before + 2


def test_ksm_never_merges_pages_with_different_keyids() -> None:
    m, a, b = tenants(1, 2)
    assert m.ksm_run() == 0
    assert pfn_of(m, a, U) != pfn_of(m, b, U)
    assert m.ksm_stats()["mktme_merge_refused_keyid"] == 1
    assert m.check() == []


def test_without_the_ksm_check_a_tenant_reads_garbage() -> None:
    m, a, b = tenants(1, 2)
    m.set_mitigation("ksm_keyid_check", False)
    assert m.ksm_run() == 1
    seen = {m.read_virt(a, U, len(SECRET)), m.read_virt(b, U, len(SECRET))}
    assert SECRET in seen
    assert len(seen) == 2
    assert any("page_ext KeyID" in line for line in m.check())


def test_writing_to_a_ksm_page_breaks_copy_on_write() -> None:
    m, a, b = tenants(1, 1)
    m.ksm_run()
    m.write_virt(b, U, b"mine")
    assert m.read_virt(a, U, len(SECRET)) == SECRET
    assert m.read_virt(b, U, 4) == b"mine"
    assert pfn_of(m, a, U) != pfn_of(m, b, U)
    assert m.check() == []


# --- 04/05 page allocation for encrypted memory, 06 khugepaged ---------------------


def hugepage_region(keyid: int, **options: object) -> tuple[Machine, str, bytes]:
    m, a = two_keys(**options)
    ctl(m, a, f"mmap {U:#x} 2M rw- keyid={keyid} populate")
    ctl(m, a, f"madvise {U:#x} 2M hugepage")
    pattern = bytes(range(256)) * (HPAGE // 256)
    m.write_virt(a, U, pattern)
    return m, a, pattern


def test_khugepaged_collapses_into_a_huge_page_of_the_vmas_keyid() -> None:
    m, a, pattern = hugepage_region(1)
    assert m.khugepaged_scan() == 1
    assert "AnonHugePages:      2048 kB" in m.smaps(a)
    assert page_keyid(m, pfn_of(m, a, U)) == 1
    assert m.read_virt(a, U, HPAGE) == pattern
    assert m.check() == []


def test_khugepaged_copies_a_small_page_of_another_keyid_through_its_own_keyid() -> None:
    """[PATCHv5 06/19] mm/khugepaged: Handle encrypted pages: the huge page is
    prepared "for KeyID we need, based on vma_keyid()"; each small page is read
    through its own KeyID (page_to_virt(), patch 18). v5 does not refuse a
    range because a small page's KeyID differs from the VMA's."""
    m, a, pattern = hugepage_region(1)
    m.set_mitigation("pte_modify_preserve_keyid", False)
    ctl(m, a, f"mprotect {U:#x} 2M rw-")  # the VMA and its PTEs lose KeyID 1, the pages keep it
    m.set_mitigation("pte_modify_preserve_keyid", True)
    assert page_keyid(m, pfn_of(m, a, U)) == 1
    assert m.khugepaged_scan() == 1
    assert page_keyid(m, pfn_of(m, a, U)) == 0  # the VMA's KeyID now
    assert m.read_virt(a, U, HPAGE) == pattern


def test_without_the_khugepaged_check_the_collapsed_page_reads_as_garbage() -> None:
    m, a, pattern = hugepage_region(1)
    m.set_mitigation("khugepaged_keyid_check", False)
    assert m.khugepaged_scan() == 1
    assert m.read_virt(a, U, 256) != pattern[:256]
    assert any("page_ext KeyID" in line for line in m.check())


def test_split_of_a_huge_page_keeps_data_and_keyid() -> None:
    m, a, pattern = hugepage_region(2)
    m.khugepaged_scan()
    ctl(m, a, f"munmap {U + HPAGE // 2:#x} 4K")
    assert m.read_virt(a, U, PAGE) == pattern[:PAGE]
    assert page_keyid(m, pfn_of(m, a, U)) == 2
    assert m.check() == []


# --- 07 Mask out KeyID bits from page table entry pfn; 10 page_keyid; 11 vma_keyid --


def test_pte_holds_keyid_in_upper_pfn_bits_and_pagemap_masks_them() -> None:
    m, a = two_keys()
    ctl(m, a, f"mmap {U:#x} 4K rw- keyid=2 populate")
    pte = leaf(m, a, U).pte
    shift = m.kernel.pte_layout.keyid_shift  # 46 - 6 = 40
    assert shift == 40
    assert (pte >> shift) & 0x3F == 2
    assert pfn_of(m, a, U) == (pte & ((1 << shift) - 1)) >> 12
    assert page_keyid(m, pfn_of(m, a, U)) == 2
    assert smaps_keyids(m, a) == [2]
    assert "keyid=2" in m.ptdump(a)


# --- 09 Preserve KeyID on pte_modify() and pgprot_modify() --------------------------


def test_mprotect_keeps_the_keyid() -> None:
    m, a = two_keys()
    ctl(m, a, f"mmap {U:#x} 4K rw- keyid=1")
    m.write_virt(a, U, SECRET)
    ctl(m, a, f"mprotect {U:#x} 4K r--")
    assert m.read_virt(a, U, len(SECRET)) == SECRET
    assert smaps_keyids(m, a) == [1]
    assert m.check() == []


def test_without_pte_modify_preserving_the_keyid_mprotect_drops_it() -> None:
    m, a = two_keys()
    m.set_mitigation("pte_modify_preserve_keyid", False)
    ctl(m, a, f"mmap {U:#x} 4K rw- keyid=1")
    m.write_virt(a, U, SECRET)
    ctl(m, a, f"mprotect {U:#x} 4K r--")
    assert smaps_keyids(m, a) == [0]
    assert m.read_virt(a, U, len(SECRET)) != SECRET
    assert any("page_ext KeyID" in line for line in m.check())


# --- 12 prep_encrypted_page() and arch_free_page() ----------------------------------


def reuse_across_keyids(m: Machine, a: str) -> bytes:
    """Tenant 1 writes and frees a page; tenant 2 gets it and writes."""
    ctl(m, a, f"mmap {U + PAGE:#x} 4K rw- populate")  # keeps the page tables
    ctl(m, a, f"mmap {U:#x} 4K rw- keyid=1")
    m.write_virt(a, U, SECRET)
    pfn = pfn_of(m, a, U)
    ctl(m, a, f"munmap {U:#x} 4K")
    ctl(m, a, f"mmap {U:#x} 4K rw- keyid=2")
    m.write_virt(a, U, b"tenant two")
    assert pfn_of(m, a, U) == pfn  # the freed page came straight back
    m.cache_command(f"clflush {pfn * PAGE:#x} keyid=2")
    m.cache_command("wbinvd")  # whatever the cache still holds goes to DRAM
    return m.read_virt(a, U, 10)


def test_a_page_reused_for_another_keyid_is_flushed_and_keeps_its_data() -> None:
    m, a = two_keys()
    assert reuse_across_keyids(m, a) == b"tenant two"
    stats = vmstat(m)
    assert stats["mktme_arch_free_page_flush"] == 1
    assert stats["mktme_prep_encrypted_flush"] == 2


def test_without_flushes_a_stale_line_of_the_old_keyid_corrupts_the_new_owner() -> None:
    m, a = two_keys()
    m.set_mitigation("flush_on_keyid_change", False)
    assert reuse_across_keyids(m, a) != b"tenant two"
    assert vmstat(m)["mktme_flush_skipped_mitigation_off"] >= 1


def test_encrypted_pages_come_out_of_the_allocator_zeroed() -> None:
    m, a = two_keys()
    ctl(m, a, f"mmap {U:#x} 4K rw- keyid=1")
    m.write_virt(a, U, SECRET)
    ctl(m, a, f"munmap {U:#x} 4K")
    ctl(m, a, f"mmap {U:#x} 4K rw- keyid=1")
    assert m.read_virt(a, U, PAGE) == bytes(PAGE)


# --- 08/14/15/16/17/18/19 enumeration and direct mappings ----------------------------


def test_boot_logs_detect_tme_lines() -> None:
    log = machine().dmesg()
    for line in (
        "x86/tme: enabled by BIOS",
        "x86/mktme: enabled by BIOS",
        "x86/mktme: 63 KeyIDs available",
    ):
        assert line in log


def test_keyid_bits_zero_gives_a_machine_without_mktme() -> None:
    m = machine(keyid_bits=0)
    assert m.nr_keyids == 0
    assert "x86/mktme: disabled by BIOS" in m.dmesg()
    a = space(m)
    ctl(m, a, f"mmap {U:#x} 4K rw-")
    m.write_virt(a, U, SECRET)
    assert m.read_virt(a, U, len(SECRET)) == SECRET
    with pytest.raises(OSError, match="KeyID 1 does not exist"):
        ctl(m, a, f"mmap {U + PAGE:#x} 4K rw- keyid=1")


def test_too_many_keyids_for_the_direct_map_area_disable_mktme_at_boot() -> None:
    m = machine(keyid_bits=7, max_keys=127)  # 128 copies of 1 TiB > 64 TiB
    assert m.nr_keyids == 0
    assert "x86/mktme: Disabled. Not enough virtual address space" in m.dmesg()
    assert m.kernel.directmap.copies == 1


def test_a_direct_map_that_does_not_fit_logs_the_two_lines_of_patch_16() -> None:
    """[PATCHv5 16/19] x86/mm: Calculate direct mapping size, calculate_direct_mapping_size():
    ``if (direct_mapping_size > available_va / (mktme_nr_keyids + 1)) {
    pr_err("x86/mktme: Disabled. Not enough virtual address space\\n");
    pr_err("x86/mktme: Consider switching to 5-level paging\\n"); mktme_disable();``"""
    m = machine(keyid_bits=7, max_keys=127)
    lines = [line.split("] ", 1)[-1] for line in m.dmesg().splitlines()]
    at = lines.index("x86/mktme: Disabled. Not enough virtual address space")
    assert lines[at + 1] == "x86/mktme: Consider switching to 5-level paging"
    assert lines[at - 1] == "x86/mktme: 127 KeyIDs available"


def test_nr_keyids_plus_one_copies_that_fill_the_area_exactly_still_fit() -> None:
    m = machine(keyid_bits=6)  # 64 copies of 1 TiB = 64 TiB
    assert m.nr_keyids == 63
    assert m.kernel.directmap.copies == 64


def test_disabling_mktme_after_enumeration_restores_the_full_physical_mask() -> None:
    """[PATCHv5 14/19] x86/mm: Allow to disable MKTME after enumeration:
    ``mktme_disable()`` sets ``physical_mask = (1ULL << __PHYSICAL_MASK_SHIFT) - 1``,
    ``mktme_keyid_mask = 0``, ``mktme_keyid_shift = 0``, ``mktme_nr_keyids = 0``."""
    m = machine(keyid_bits=7, max_keys=127)  # enumerated, then too big for the direct map
    pte = m.kernel.pte_layout
    assert (pte.keyid_mask, pte.keyid_shift, m.nr_keyids) == (0, 0, 0)
    assert pte.physical_mask == (1 << 52) - 1
    assert "keyid_shift 0\nkeyid_mask 0x0000000000000000\nnr_keyids 0\n" in m.tme_text()
    a = space(m)
    ctl(m, a, f"mmap {U:#x} 4K rw-")
    m.write_virt(a, U, SECRET)
    assert m.read_virt(a, U, len(SECRET)) == SECRET


def test_detect_tme_prints_a_zero_crypto_algs_field_as_c_prints_it() -> None:
    """v5 detect_tme(): ``pr_err("x86/mktme: No known encryption algorithm is
    supported: %#llx\\n", tme_crypto_algs);`` C's ``#`` flag prefixes 0x to a
    nonzero value only, so an empty MK_TME_CRYPTO_ALGS field prints as ``0``."""
    activate = encode(Msr.IA32_TME_ACTIVATE, {"lock": 1, "tme_enable": 1, "mk_tme_keyid_bits": 6})
    log: list[str] = []
    layout = detect_tme(lambda msr: activate, 46, log.append)
    assert "x86/mktme: No known encryption algorithm is supported: 0" in log
    assert not layout.enabled


def test_the_kernel_maps_every_keyid_the_bits_allow() -> None:
    """[PATCHv5 17/19] maps one direct mapping per KeyID 0..mktme_nr_keyids, and
    v5's detect_tme() makes that ``(1UL << keyid_bits) - 1``: MK_TME_MAX_KEYS
    is not read, so a part with 3 keys still gets 64 mappings."""
    assert machine(max_keys=3).ptdump_kernel().count("---[ Low Kernel Mapping") == 64


def test_detect_tme_does_not_cap_the_keyids_by_max_keys() -> None:
    """v5 detect_tme(): ``nr_keyids = (1UL << keyid_bits) - 1;`` then
    ``pr_info_once("x86/mktme: %d KeyIDs available\\n", nr_keyids)``; the
    hardware limit stays in IA32_TME_CAPABILITY (``mk_tme_max_keys`` in hw/tme)."""
    m = machine(max_keys=5)
    assert m.nr_keyids == 63
    assert "x86/mktme: 63 KeyIDs available" in m.dmesg()
    text = m.tme_text()
    assert "mk_tme_max_keys 5\n" in text
    assert "nr_keyids 63\n" in text


def test_direct_mapping_is_one_power_of_two_region_per_keyid() -> None:
    m = machine(keyid_bits=3)
    dm = m.kernel.directmap
    assert dm.size == 1 << 40
    assert dm.copies == 8
    va = dm.page_to_virt(0x1234, 5)
    assert va == PAGE_OFFSET + 5 * (1 << 40) + 0x1234000
    assert dm.pa(va) == 0x1234000
    assert dm.keyid_of(va) == 5
    dump = m.ptdump_kernel()
    assert dump.count("---[ Low Kernel Mapping") == 8
    assert f"0x{PAGE_OFFSET + 3 * (1 << 40):016x}" in dump
    assert "keyid=7" in dump


def test_hw_tme_names_the_keyid_layout_for_tools() -> None:
    text = machine(keyid_bits=3, maxphyaddr=39).tme_text()
    assert "mk_tme_keyid_bits 3\n" in text
    assert "maxphyaddr 39\nkeyid_shift 36\nkeyid_mask 0x0000007000000000\nnr_keyids 7\n" in text


def test_a_write_to_a_read_only_exclusive_huge_page_reuses_it_and_keeps_the_data() -> None:
    """do_huge_pmd_wp_page(): a THP mapped once is reused (maybe_pmd_mkwrite), not split."""
    m, a, pattern = hugepage_region(1)
    m.khugepaged_scan()
    m.write_virt(a, U + HPAGE - 4, b"mine")  # keep the last page dirty: it gets RW back
    ctl(m, a, f"mprotect {U:#x} 2M r--")
    ctl(m, a, f"mprotect {U:#x} 2M rw-")
    m.kernel.pt.set_pte(m.cr3(a), U, leaf(m, a, U).pte & ~2, HPAGE)  # RW off
    m.flush_tlb(a)
    m.write_virt(a, U, b"new!")
    assert m.read_virt(a, U, 8) == b"new!" + pattern[4:8]
    assert "AnonHugePages:      2048 kB" in m.smaps(a)
    assert m.check() == []


# --- 05 mm/page_alloc: Handle allocation for encrypted memory (migration) -------


def two_nodes_with_a_secret() -> tuple[Machine, str]:
    """KeyID 1 pages on node 0 of a two-node machine, holding SECRET."""
    m, a = two_keys(phys_mem="16M", numa_nodes=2)
    ctl(m, a, f"mmap {U:#x} 16K rw- keyid=1")
    for va in range(U, U + 4 * PAGE, PAGE):
        m.write_virt(a, va, SECRET)
    return m, a


def test_a_migrated_page_keeps_its_keyid_and_its_data() -> None:
    """Patch 05: "An encrypted page has to be migrated to the same KeyID as the
    source page." move_pages() allocates the target for page_keyid() of the
    source, copies through that KeyID and keeps the KeyID in the PTE."""
    m, a = two_nodes_with_a_secret()
    before = pfn_of(m, a, U)
    ctl(m, a, f"migrate {U:#x} 16K 1")
    after = pfn_of(m, a, U)
    assert m.kernel.alloc.pfn_to_nid(after) == 1
    assert after != before
    assert page_keyid(m, after) == 1
    assert m.read_virt(a, U, len(SECRET)) == SECRET
    assert vmstat(m)["pgmigrate_success"] == 4
    assert m.check() == []


def test_without_the_keyid_rule_a_migrated_page_reads_as_garbage() -> None:
    """Before patch 05 the target came from KeyID 0 (alloc_pages_node): the
    copy lands through KeyID 0, the PTE still names KeyID 1."""
    m, a = two_nodes_with_a_secret()
    m.set_mitigation("migrate_keyid", False)
    ctl(m, a, f"migrate {U:#x} 16K 1")
    assert page_keyid(m, pfn_of(m, a, U)) == 0
    assert m.read_virt(a, U, len(SECRET)) != SECRET
    assert any("PTE KeyID differs from its page's page_ext KeyID" in p for p in m.check())


def fragmented(switch_on: bool) -> tuple[Machine, list[tuple[str, int, bytes]]]:
    """Three tenants (KeyIDs 1-3) whose faults interleave over 7 MiB of an 8
    MiB machine, then each frees three pages of four: every 2 MiB block is
    fragmented. Returns the machine and the pages left, (space, va, data)."""
    m = machine(phys_mem="8M")
    m.set_mitigation("migrate_keyid", switch_on)
    for keyid in (1, 2, 3):
        cpu_key(m, keyid)
        space(m, f"t{keyid}")
        ctl(m, f"t{keyid}", f"mmap {U:#x} 4M rw- keyid={keyid}")
    pages = [(f"t{i % 3 + 1}", U + (i // 3) * PAGE, SECRET + bytes([i % 256])) for i in range(1800)]
    for name, va, data in pages:
        m.write_virt(name, va, data)
    for name, va, _ in pages[1::4] + pages[2::4] + pages[3::4]:
        ctl(m, name, f"madvise {va:#x} 4K dontneed")
    kept = pages[::4]
    return m, kept


def test_compaction_moves_pages_with_their_keyids() -> None:
    """mm/compaction.c: the free page compaction_alloc() hands out is
    prepared for the KeyID of the page that moves into it (patch 05)."""
    m, kept = fragmented(switch_on=True)
    assert m.compact_memory() > 0
    assert vmstat(m)["compact_success"] == 1
    assert all(m.read_virt(name, va, len(data)) == data for name, va, data in kept)
    assert m.check() == []


def test_without_the_keyid_rule_compaction_garbles_the_pages_it_moves() -> None:
    m, kept = fragmented(switch_on=False)
    assert m.compact_memory() > 0
    assert any(m.read_virt(name, va, len(data)) != data for name, va, data in kept)
    assert any("page_ext KeyID" in line for line in m.check())
