"""13. Per-KeyID free pools: the flushes the cover letter wants to avoid.

In v5 every allocation of an encrypted page flushes the page's lines for its
previous KeyID (prep_encrypted_page) and every free flushes them again
(arch_free_page): the cover letter measures ~20 % on a kernel build with all
anonymous memory encrypted and announces per-KeyID pools of free pages as the
fix. With mm/keyid_free_pools on, a freed encrypted page waits in its KeyID's
pool and is reused for that KeyID without a flush. The same workload (map,
touch and unmap encrypted pages, several rounds) runs with pools off and on;
the flush counters of mm/vmstat tell the difference.
"""

from __future__ import annotations

from mktme_sandbox.examples.lab import BASE, PAGE, Lab, main

PAGES, ROUNDS = 32, 4


def flush_counters(stats: dict[str, int]) -> dict[str, int]:
    """The page-flush counters: names ending in _flush, the TLB's excepted."""
    return {n: v for n, v in stats.items() if n.endswith("_flush") and "tlb" not in n}


def workload(lab: Lab, k: int, pools: bool) -> int:
    m = lab.m
    lab.switch("mm/keyid_free_pools", pools)
    sp = lab.space("exp13")
    before = flush_counters(m.vmstat())
    for _ in range(ROUNDS):
        sp.mmap(BASE, PAGES * PAGE, "rw-", keyid=k, populate=True)
        sp.munmap(BASE, PAGES * PAGE)
    after = flush_counters(m.vmstat())
    lab.destroy(sp)
    delta = {n: after[n] - before.get(n, 0) for n in after}
    total = sum(delta.values())
    lab.step(
        f"keyid_free_pools={int(pools)}: {ROUNDS} rounds of map+populate+unmap of "
        f"{PAGES} KeyID-{k} pages"
    )
    lab.saw("flushes: " + ", ".join(f"{n} +{v}" for n, v in delta.items()) + f" (total {total})")
    return total


def run(lab: Lab) -> None:
    k = lab.key("cpu")
    lab.mitigation("flush_on_keyid_change", True)
    if not flush_counters(lab.m.vmstat()):
        lab.note("mm/vmstat has no *_flush counters")
    off = workload(lab, k, False)
    on = workload(lab, k, True)
    pools = "; ".join(lab.m.read_text("mm/free_pools").splitlines())
    lab.saw(f"mm/free_pools after the run with pools: {pools}")
    lab.expect(off > 0, "without pools, encrypted pages are flushed")
    lab.expect(on < off, "with per-KeyID pools, fewer flushes")
    lab.conclude(f"page flushes for the same workload: {off} with pools off, {on} with pools on")


if __name__ == "__main__":
    main(run, "13. per-KeyID free pools and the flush counters", __doc__)
