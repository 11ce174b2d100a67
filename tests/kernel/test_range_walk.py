"""Range operations change each entry where their walk found it, as Linux's
do: the platform loads and stores of mprotect, fork, mremap, pageout,
migration and a KSM merge, counted against mm/; and populate faults only the
pages ``follow_page()`` does not find mapped as it needs (mm/gup.c)."""

from __future__ import annotations

from kernel_helpers import (
    HPAGE,
    PAGE,
    Accesses,
    U,
    ctl,
    leaf,
    pfn_of,
    space_tables,
    two_keys,
    vmstat,
)
from mktme_sandbox import Machine
from mktme_sandbox.kernel.mmap import mm_populate
from mktme_sandbox.kernel.pgtable_types import PteFlags

PAGES = 8
LENGTH = PAGES * PAGE


def populated(m: Machine, name: str = "a", prot: str = "rw-", keyid: int = 1) -> list[int]:
    """``PAGES`` pages mapped at ``U`` and populated; the physical address of each PTE."""
    ctl(m, name, f"mmap {U:#x} {LENGTH} {prot} keyid={keyid} populate")
    return pte_addresses(m, name, U)


def pte_addresses(m: Machine, name: str, start: int) -> list[int]:
    return [leaf(m, name, start + n * PAGE).entry_pa for n in range(PAGES)]


def entry_stores(seen: Accesses, tables: list[int]) -> list[int]:
    """Where the 8-byte stores into ``tables`` went, in order."""
    return [pa for pa, n in Accesses.within(seen.stores, tables) if n == 8]


def entry_loads(seen: Accesses, tables: list[int]) -> list[int]:
    """The entries of ``tables`` read on their own (a walk reads whole tables)."""
    return [pa for pa, n in Accesses.within(seen.loads, tables) if n == 8]


def over_the_range(
    m: Machine, seen: Accesses, command: str
) -> tuple[list[int], list[int], list[int]]:
    """``command`` on ``PAGES`` populated pages of "a": the PTE addresses, then
    the entry stores and the entry loads the command made in the space's tables."""
    ptes = populated(m)
    tables = space_tables(m)
    seen.clear()
    ctl(m, "a", command)
    return ptes, entry_stores(seen, tables), entry_loads(seen, tables)


def snapshot(seen: Accesses) -> Accesses:
    return Accesses(list(seen.loads), list(seen.stores))


def test_mprotect_stores_each_pte_once_where_its_walk_found_it(accesses: Accesses) -> None:
    """``change_pte_range()`` (mm/mprotect.c) steps one ``pte_t *`` through
    each PTE table::

        pte = pte_offset_map_lock(vma->vm_mm, pmd, addr, &ptl);
        do {
            oldpte = *pte;
            if (pte_present(oldpte)) {
                ptent = ptep_modify_prot_start(mm, addr, pte);
                ptent = pte_modify(ptent, newprot);
                ...
                ptep_modify_prot_commit(mm, addr, pte, ptent);
        } while (pte++, addr += PAGE_SIZE, addr != end);

    8 pages: 8 stores of 8 bytes, one at each PTE, and no entry read on its
    own but the 4 of the walk of the range's end, where a huge PMD would be
    split."""
    m, _ = two_keys()
    ptes, stores, ends_walk = over_the_range(m, accesses, f"mprotect {U:#x} {LENGTH} r--")
    assert stores == ptes
    # the loads: split_huge_pmds() at the range's end
    assert len(ends_walk) == 4
    assert not set(ends_walk) & set(ptes)
    assert not leaf(m, "a", U).pte & PteFlags.RW


def test_fork_stores_each_pte_once_per_side_and_walks_the_child_once_per_table(
    accesses: Accesses,
) -> None:
    """``copy_pte_range()`` (mm/memory.c) allocates the child's PTE table once
    and steps both pointers through the tables::

        dst_pte = pte_alloc_map_lock(dst_mm, dst_pmd, addr, &dst_ptl);
        src_pte = pte_offset_map(src_pmd, addr);
        do {
            entry.val = copy_one_pte(dst_mm, src_mm, dst_pte, src_pte, vma, addr, rss);
        } while (dst_pte++, src_pte++, addr += PAGE_SIZE, addr != end);

    and ``copy_one_pte()`` write-protects the parent's entry and stores the
    child's: ``ptep_set_wrprotect(src_mm, addr, src_pte)``, ``set_pte_at(dst_mm,
    addr, dst_pte, pte)``. The child's tables are read one entry per level,
    for the first page (``pud_alloc``, ``pmd_alloc``, ``pte_alloc``)."""
    m, _ = two_keys()
    parent_ptes = populated(m)
    parent = space_tables(m)
    accesses.clear()
    m.fork("a", "b", 0)
    seen = snapshot(accesses)
    child, child_ptes = space_tables(m, "b"), pte_addresses(m, "b", U)
    assert entry_stores(seen, parent) == parent_ptes
    assert not set(entry_loads(seen, parent)) & set(parent_ptes)
    assert entry_stores(seen, child)[-PAGES:] == child_ptes
    assert len(entry_stores(seen, child)) == 3 + PAGES  # the PUD, PMD and PTE tables linked
    assert len(entry_loads(seen, child)) == 4


def test_mremap_moves_each_pte_with_one_clear_and_one_store(accesses: Accesses) -> None:
    """``move_ptes()`` (mm/mremap.c) holds both tables' pointers::

        old_pte = pte_offset_map_lock(mm, old_pmd, old_addr, &old_ptl);
        new_pte = pte_offset_map(new_pmd, new_addr);
        for (; old_addr < old_end; old_pte++, old_addr += PAGE_SIZE,
                                   new_pte++, new_addr += PAGE_SIZE) {
            pte = ptep_get_and_clear(mm, old_addr, old_pte);
            ...
            set_pte_at(mm, new_addr, new_pte, pte);
        }

    Each old PTE is cleared once and each new one stored once; of the PTEs,
    only the first new one is read, as ``pte_alloc`` makes its table."""
    m, _ = two_keys()
    old_ptes = populated(m)
    new = U + 2 * HPAGE
    accesses.clear()
    ctl(m, "a", f"mremap {U:#x} {LENGTH} {LENGTH} {new:#x}")
    seen = snapshot(accesses)
    new_ptes = pte_addresses(m, "a", new)
    stores = [pa for pa, n in seen.stores if n == 8]
    assert [pa for pa in stores if pa in old_ptes] == old_ptes
    assert [pa for pa in stores if pa in new_ptes] == new_ptes
    loads = {pa for pa, n in seen.loads if n == 8}
    assert loads & {*old_ptes, *new_ptes} == {new_ptes[0]}


def test_pageout_stores_each_swap_entry_where_its_walk_found_the_pte(
    accesses: Accesses,
) -> None:
    """``try_to_unmap_one()`` (mm/rmap.c) replaces the PTE it holds::

        pteval = ptep_clear_flush(vma, address, pvmw.pte);
        ...
        swp_pte = swp_entry_to_pte(entry);
        set_pte_at(mm, address, pvmw.pte, swp_pte);

    8 pages swapped out: 8 stores, one at each PTE, no entry read on its own."""
    m, _ = two_keys()
    ptes, stores, loads = over_the_range(m, accesses, f"madvise {U:#x} {LENGTH} pageout")
    assert stores == ptes
    assert loads == []
    assert vmstat(m)["pswpout"] == PAGES


def test_migration_stores_each_new_pte_where_its_walk_found_the_old_one(
    accesses: Accesses,
) -> None:
    """``remove_migration_pte()`` (mm/migrate.c) writes through the walk's
    pointer: ``set_pte_at(vma->vm_mm, pvmw.address, pvmw.pte, pte)``; one
    store per page moved, no entry read on its own."""
    m, _ = two_keys(phys_mem="16M", numa_nodes=2)
    ptes = populated(m)
    tables = space_tables(m)
    node = 1 - m.kernel.alloc.pfn_to_nid(pfn_of(m, "a", U))
    accesses.clear()
    ctl(m, "a", f"migrate {U:#x} {LENGTH} {node}")
    assert entry_stores(accesses, tables) == ptes
    assert entry_loads(accesses, tables) == []
    assert vmstat(m)["pgmigrate_success"] == PAGES


def test_a_ksm_merge_stores_each_pte_where_the_scan_found_it(accesses: Accesses) -> None:
    """``replace_page()`` (mm/ksm.c) stores the KSM page's PTE through the
    pointer it looked up: ``set_pte_at_notify(mm, addr, ptep, newpte)``; the
    scan that found the pages found their PTEs, so no entry is read alone."""
    m, _ = two_keys()
    ptes = populated(m)  # 8 pages of zeros through KeyID 1: one content
    ctl(m, "a", f"madvise {U:#x} {LENGTH} mergeable")
    tables = space_tables(m)
    accesses.clear()
    assert m.ksm_run() == PAGES - 1
    assert entry_stores(accesses, tables) == ptes
    assert entry_loads(accesses, tables) == []


def test_a_second_populate_allocates_nothing_and_changes_no_pte(accesses: Accesses) -> None:
    """``populate_vma_page_range()`` -> ``__get_user_pages()`` (mm/gup.c)
    faults only where ``follow_page_mask()`` finds no page::

        page = follow_page_mask(vma, start, foll_flags, &ctx);
        if (!page) {
            ret = faultin_page(tsk, vma, start, &foll_flags, nonblocking);

    and ``follow_page_pte()`` finds none for a write where the PTE is not
    writable: ``if ((flags & FOLL_WRITE) && !can_follow_write_pte(pte,
    flags)) return NULL``. Populated pages are present and writable: nothing
    is allocated, faulted or stored."""
    m, _ = two_keys()
    populated(m)
    k, tables = m.kernel, space_tables(m)
    free, faults = k.alloc.free_pages_by_keyid(), vmstat(m)["pgfault"]
    accesses.clear()
    mm_populate(k, k.space("a"), U, U + LENGTH)
    assert entry_stores(accesses, tables) == []
    assert (k.alloc.free_pages_by_keyid(), vmstat(m)["pgfault"]) == (free, faults)


def test_a_write_populate_faults_the_pages_mapped_read_only(m: Machine) -> None:
    """``mlock`` populates for write (``FOLL_WRITE``): zero pages a read mapped
    are not writable, so each page is faulted and copied on write."""
    ctl(m, "a", f"mmap {U:#x} {LENGTH} rw-")
    m.read_virt("a", U, LENGTH)  # the zero page, read-only, at every address
    before = vmstat(m)
    ctl(m, "a", f"mlock {U:#x} {LENGTH}")
    after = vmstat(m)
    assert after["pgfault"] - before["pgfault"] == PAGES
    assert after["mktme_cow_fault"] - before["mktme_cow_fault"] == PAGES
    assert all(leaf(m, "a", U + n * PAGE).pte & PteFlags.RW for n in range(PAGES))


def test_a_populate_that_maps_a_huge_page_faults_once_per_2m(m: Machine) -> None:
    """A THP fault maps the whole 2M: ``__get_user_pages()`` skips the rest
    of it (``page_increm = 1 + (~(start >> PAGE_SHIFT) & ctx.page_mask)``)."""
    ctl(m, "a", f"mmap {U:#x} {2 * HPAGE} rw- keyid=1")
    ctl(m, "a", f"madvise {U:#x} {2 * HPAGE} hugepage")
    before = vmstat(m)
    ctl(m, "a", f"mlock {U:#x} {2 * HPAGE}")
    after = vmstat(m)
    assert after["pgfault"] - before["pgfault"] == 2
    assert after["thp_fault_alloc"] - before["thp_fault_alloc"] == 2
