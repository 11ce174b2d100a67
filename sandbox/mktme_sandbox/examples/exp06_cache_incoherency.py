"""6. Cache incoherency across KeyIDs, and the flush that fixes it.

The CPU keeps no coherency between the same physical line cached under two
KeyIDs. Tenant A (KeyID K1) writes secrets into pages and frees them; tenant B
(KeyID K2) gets the same physical pages and writes its own data. Then cache
pressure evicts B's lines first and A's forgotten dirty lines last: A's line is
encrypted with K1 and lands on top of B's data, which B now reads as garbage.

The series flushes a page's lines for its old KeyID when the page changes
KeyID (prep_encrypted_page, arch_free_page). With mm/mitigations/
flush_on_keyid_change off those flushes are skipped and B reads garbage; on,
A's lines are gone before B gets the page and B reads its data. Per-KeyID
free pools are switched off here so that pages do move between KeyIDs.
"""

from __future__ import annotations

from mktme_sandbox.examples.lab import BASE, LINE, PAGE, CannotRun, Lab, main

PAGES = 8
FLUSH = "mm/mitigations/flush_on_keyid_change"


def trial(lab: Lab, k1: int, k2: int, flush: bool) -> tuple[int, int]:
    """One round; returns (pages B got from A, pages on which B reads garbage)."""
    m = lab.m
    lab.switch(FLUSH, flush)
    lab.step(f"flush_on_keyid_change={int(flush)}")
    a, b = lab.space("exp6-a"), lab.space("exp6-b")
    # B's page tables first, so that freeing A's pages hands them to B's data.
    b.mmap(BASE + 0x100000, PAGE, "rw-", populate=True)
    a.mmap(BASE, PAGES * PAGE, "rw-", keyid=k1, populate=True)
    pas_a = [e.pa for e in a.pagemap(BASE, PAGES)]
    before = m.dram(pas_a[0], LINE)
    for i in range(PAGES):
        a.write(BASE + i * PAGE, f"tenant A secret, page {i} ".encode().ljust(LINE, b"A"))
    if m.dram(pas_a[0], LINE) != before:
        raise CannotRun(
            "stores reach DRAM at once: this machine has no write-back cache "
            "(--cache-size 0), so no line can be left behind to be incoherent"
        )
    a.munmap(BASE, PAGES * PAGE)
    lab.step(f"tenant A (KeyID {k1}) wrote {PAGES} pages and freed them")
    b.mmap(BASE, PAGES * PAGE, "rw-", keyid=k2, populate=True)
    pas_b = [e.pa for e in b.pagemap(BASE, PAGES)]
    mine = [f"tenant B data, page {i} ".encode().ljust(LINE, b"B") for i in range(PAGES)]
    for i in range(PAGES):
        b.write(BASE + i * PAGE, mine[i])
    reused = [i for i, pa in enumerate(pas_b) if pa in pas_a]
    lab.step(
        f"tenant B (KeyID {k2}) mapped {PAGES} pages: {len(reused)} were A's; B wrote its data"
    )
    for i in reused:
        m.clflush(pas_b[i], LINE, k2)
    for pa in pas_a:
        m.clflush(pa, LINE, k1)
    lab.step(
        f"cache pressure: B's lines evicted (clflush keyid={k2}), then A's (clflush keyid={k1})"
    )
    garbage = [i for i in reused if b.read(BASE + i * PAGE, LINE) != mine[i]]
    lab.saw(f"B reads garbage on {len(garbage)} of the {len(reused)} reused pages")
    # What the kernel forgot, the experiment cleans: A's other dirty lines.
    for pa in pas_a:
        m.clflush(pa, PAGE, k1)
    lab.switch(FLUSH, True)
    lab.destroy(b)
    lab.destroy(a)
    return len(reused), len(garbage)


def run(lab: Lab) -> None:
    k1, k2 = lab.key("cpu"), lab.key("cpu")
    lab.switch("mm/keyid_free_pools", False)
    reused_off, garbage_off = trial(lab, k1, k2, flush=False)
    reused_on, garbage_on = trial(lab, k1, k2, flush=True)
    if not reused_off or not reused_on:
        raise CannotRun("the allocator did not hand A's freed pages to B")
    lab.expect(
        garbage_off > 0, "without the flush, B reads garbage where A's lines were written back"
    )
    lab.expect(garbage_on == 0, "with the flush, B reads its own data")
    lab.conclude(
        f"flush off: B read garbage on {garbage_off}/{reused_off} reused pages; "
        f"flush on: {garbage_on}/{reused_on}"
    )


if __name__ == "__main__":
    main(run, "6. cache incoherency: reusing a page across KeyIDs", __doc__)
