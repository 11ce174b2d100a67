"""Cost that stays flat: every vectorized scan equals the per-page loop it replaced.

Each fast path (smaps accounting and status over arrays, ...) is run against its simple
per-page reference, kept here, on random address spaces: VMAs of several
KeyIDs, THP, the zero page, KSM-merged pages, a forked child sharing pages,
mlocked and swapped-out pages, PROT_NONE. The outputs must be byte-equal.
"""

from __future__ import annotations

import random

import pytest

from kernel_helpers import HPAGE, PAGE, U, ctl, two_keys
from mktme_sandbox import Machine
from mktme_sandbox.config import PAGE_SIZE
from mktme_sandbox.kernel import proc, ptdump
from mktme_sandbox.kernel.kernel import Kernel
from mktme_sandbox.kernel.memory import pte_page
from mktme_sandbox.kernel.pgtable_types import PteFlags
from mktme_sandbox.kernel.swapfile import is_swap_pte, swp_offset
from mktme_sandbox.kernel.vma import VM, MmStruct, Vma

SEEDS = range(8)


def random_world(seed: int) -> Machine:
    """A machine whose spaces hold a bit of everything the scans account."""
    rng = random.Random(seed)
    m, a = two_keys(swap="4M")
    written = []
    for i in range(rng.randint(2, 5)):
        addr = U + i * 0x2000000 + rng.randrange(0, 8) * HPAGE
        pages = rng.randint(1, 1500)
        keyid = rng.choice([0, 0, 1, 2])
        ctl(m, a, f"mmap {addr:#x} {pages * PAGE} rw-" + (f" keyid={keyid}" if keyid else ""))
        if pages >= 1024 and rng.random() < 0.6:
            ctl(m, a, f"madvise {addr:#x} {pages * PAGE} hugepage")
        if rng.random() < 0.5:
            ctl(m, a, f"madvise {addr:#x} {pages * PAGE} mergeable")
        for page in rng.sample(range(pages), min(pages, rng.randint(1, 400))):
            va = addr + page * PAGE
            if rng.random() < 0.2:
                m.read_virt(a, va, 8)  # the zero page where allowed
            else:
                m.write_virt(a, va, bytes([rng.choice([1, 2, page & 0xFF])]) * 16)
                written += [va] if page else []
        if rng.random() < 0.4:
            ctl(m, a, f"madvise {addr:#x} {min(pages, 64) * PAGE} pageout")
        if pages > 64 and rng.random() < 0.4:
            first = rng.randrange(64, pages)
            ctl(m, a, f"mlock {addr + first * PAGE:#x} {(pages - first) * PAGE}")
        if rng.random() < 0.3:
            ctl(m, a, f"mprotect {addr:#x} {PAGE} ---")
    m.ksm_run()
    if rng.random() < 0.7:
        m.fork(a, "b", uid=0)
        if written and rng.random() < 0.5:
            m.write_virt("b", rng.choice(written), b"child")
    return m


def account_vma_per_page(k: Kernel, mm: MmStruct, vma: Vma, mss: proc.MemSizeStats) -> None:
    """The reference: smaps_pte_entry() / smaps_account() one leaf at a time."""
    for _, size, pte in k.pt.iter_present(mm.pgd, vma.start, vma.end):
        if is_swap_pte(pte):
            mss.swap += PAGE_SIZE
            slot_users = max(k.swap.swap_count(swp_offset(pte)), 1)
            mss.swap_pss += (PAGE_SIZE << proc.PSS_SHIFT) // slot_users
            continue
        pfn = pte_page(k, pte, size)
        if pfn is None or k.pages.is_zero_pfn(pfn):
            continue
        ksm = k.pages.PageKsm(pfn)
        count = max(k.pages.page_mapcount(pfn), 1)
        dirty = bool(pte & PteFlags.DIRTY) or ksm
        pss = (size << proc.PSS_SHIFT) // count
        mss.resident += size
        mss.pss += pss
        mss.pss_dirty += pss if dirty else 0
        kind = f"{'shared' if count > 1 else 'private'}_{'dirty' if dirty else 'clean'}"
        setattr(mss, kind, getattr(mss, kind) + size)
        mss.anonymous += size if k.pages.PageAnon(pfn) else 0
        mss.ksm += size if ksm else 0
        mss.locked += pss if vma.vm_flags & VM.LOCKED else 0
        mss.anonymous_thp += size if size != PAGE_SIZE else 0


def rss_and_swap_per_page(k: Kernel, mm: MmStruct) -> tuple[int, int]:
    """The reference: MM_ANONPAGES and MM_SWAPENTS counted one leaf at a time."""
    rss = swapped = 0
    for _, size, pte in k.pt.iter_present(mm.pgd):
        if is_swap_pte(pte):
            swapped += PAGE_SIZE
            continue
        pfn = pte_page(k, pte, size)
        rss += size if pfn is not None and not k.pages.is_zero_pfn(pfn) else 0
    return rss, swapped


def smaps_files(m: Machine) -> list[str]:
    return [f(name) for name in m.space_names() for f in (m.smaps, m.smaps_rollup)]


@pytest.mark.parametrize("seed", SEEDS)
def test_smaps_over_arrays_equals_smaps_page_by_page(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = random_world(seed)
    fast = smaps_files(m)
    monkeypatch.setattr(proc, "_account_vma", account_vma_per_page)
    assert fast == smaps_files(m)


@pytest.mark.parametrize("seed", SEEDS)
def test_status_over_arrays_equals_status_page_by_page(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = random_world(seed)
    fast = [m.status(name) for name in m.space_names()]
    monkeypatch.setattr(proc, "_rss_and_swap", rss_and_swap_per_page)
    assert fast == [m.status(name) for name in m.space_names()]


@pytest.mark.parametrize("seed", SEEDS)
def test_ptdump_over_table_runs_equals_ptdump_span_by_span(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = random_world(seed)
    fast = [m.ptdump(name) for name in m.space_names()]
    monkeypatch.setattr(
        ptdump, "table_spans", lambda pt, cr3, start, end: list(pt.iter_spans(cr3, start, end))
    )
    assert fast == [m.ptdump(name) for name in m.space_names()]
