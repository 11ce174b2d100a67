"""A fault walks the page tables once, as Linux's does: the platform loads and
stores one anonymous fault makes, counted against mm/memory.c; and a zap
clears each PTE through the walk that found it."""

from __future__ import annotations

import pytest

from kernel_helpers import PAGE, Accesses, U, ctl, leaf, space_tables, two_keys
from mktme_sandbox import Machine
from mktme_sandbox.kernel.memory import handle_mm_fault

LINUX_ENTRY_LOADS = 4
"""The entries Linux 4.18's anonymous fault reads, one per level (mm/memory.c)::

    pgd = pgd_offset(mm, address);
    p4d = p4d_alloc(mm, pgd, address);            /* folded: reads nothing */
    vmf.pud = pud_alloc(mm, p4d, address);        /* *pgd: 1 */
    if (pud_none(*vmf.pud) && ...)                /* *pud: 2 */
    vmf.pmd = pmd_alloc(mm, vmf.pud, address);
    if (pmd_none(*vmf.pmd) && ...)                /* *pmd: 3 */
    ...
    vmf->pte = pte_offset_map(vmf->pmd, vmf->address);
    vmf->orig_pte = *vmf->pte;                    /* *pte: 4 (handle_pte_fault) */
    ...
    if (pte_alloc(vma->vm_mm, vmf->pmd, vmf->address))   /* do_anonymous_page */
    ...
    vmf->pte = pte_offset_map_lock(vma->vm_mm, vmf->pmd, vmf->address, &vmf->ptl);
    if (!pte_none(*vmf->pte))                     /* the same entry, under the lock */
    ...
    set_pte_at(vma->vm_mm, vmf->address, vmf->pte, entry);   /* the one store */

A missing table is allocated on the way (``__pud_alloc``, ``__pmd_alloc``,
``__pte_alloc`` store the pointer to the new table in the entry above) and the
walk goes on into it, reading the entry there as it would in an old table: 4
entry loads either way. Re-reads of an entry already read count once.
"""


def fault(m: Machine, va: int, write: bool = True) -> None:
    """One fault of space "a" at ``va``, as populate makes it (no access after)."""
    mm = m.kernel.space("a")
    vma = mm.find_vma(va)
    assert vma is not None
    handle_mm_fault(m.kernel, mm, vma, va, write)


@pytest.mark.parametrize("keyid", [0, 1])
def test_a_fault_whose_tables_exist_reads_one_entry_per_level_and_stores_the_pte_once(
    accesses: Accesses, keyid: int
) -> None:
    m, _ = two_keys()
    ctl(m, "a", f"mmap {U:#x} 8K rw- keyid={keyid}")
    fault(m, U)  # the tables are made
    tables = space_tables(m)
    accesses.clear()
    fault(m, U + PAGE)
    loads = Accesses.within(accesses.loads, tables)
    assert [n for _, n in loads] == [8] * LINUX_ENTRY_LOADS
    assert len({pa & ~(PAGE - 1) for pa, _ in loads}) == LINUX_ENTRY_LOADS  # one per level
    stores = Accesses.within(accesses.stores, tables)
    assert stores == [(leaf(m, "a", U + PAGE).entry_pa, 8)]


def test_a_fault_that_allocates_every_table_still_reads_one_entry_per_level(
    accesses: Accesses,
) -> None:
    m, _ = two_keys()
    ctl(m, "a", f"mmap {U:#x} 4K rw- keyid=1")
    before = set(space_tables(m))
    accesses.clear()
    fault(m, U)
    seen = Accesses(list(accesses.loads), list(accesses.stores))
    tables = space_tables(m)
    assert len(set(tables) - before) == 3  # PUD, PMD and PTE tables
    loads = Accesses.within(seen.loads, tables)
    assert [n for _, n in loads] == [8] * LINUX_ENTRY_LOADS
    stores = Accesses.within(seen.stores, tables)
    assert [n for _, n in stores] == [8] * 4  # three table pointers, then the PTE


def test_an_encrypted_fault_reads_the_direct_map_once_to_flush_and_once_to_zero(
    accesses: Accesses,
) -> None:
    """``prep_encrypted_page`` of a KeyID-0 page for KeyID 1: the flush goes
    through KeyID 0's direct mapping, the zeroing through KeyID 1's, each
    translated with one 8-byte load of its leaf (a rewritten leaf misdirects
    the kernel at once: kernel/directmap.py)."""
    m, _ = two_keys()
    ctl(m, "a", f"mmap {U:#x} 8K rw- keyid=1")
    fault(m, U)
    kernel_tables = m.kernel.directmap.table_pages()
    accesses.clear()
    fault(m, U + PAGE)
    loads = Accesses.within(accesses.loads, kernel_tables)
    assert [n for _, n in loads] == [8, 8]


def test_munmap_clears_each_pte_with_one_store_and_reads_no_entry_alone(
    accesses: Accesses,
) -> None:
    """``zap_pte_range()`` walks each PTE table once and clears every entry
    through its pointer (``ptep_get_and_clear_full``): 8 pages, 8 stores of 8
    bytes, and no PTE read on its own (the 8-byte loads are the walk of the
    range's end, where a huge PMD would be split)."""
    m, _ = two_keys()
    ctl(m, "a", f"mmap {U:#x} 32K rw- keyid=1 populate")
    ptes = [leaf(m, "a", U + n * PAGE).entry_pa for n in range(8)]
    tables = space_tables(m)
    accesses.clear()
    ctl(m, "a", f"munmap {U:#x} 32K")
    assert [pa for pa, _ in Accesses.within(accesses.stores, tables)][:8] == ptes
    entry_loads = {pa for pa, n in Accesses.within(accesses.loads, tables) if n == 8}
    assert not entry_loads & set(ptes)
