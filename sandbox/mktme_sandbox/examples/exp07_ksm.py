"""7. KSM across tenants.

KSM merges identical anonymous pages into one read-only page. Two tenants with
identical pages under two different keys must not share one physical page:
the shared page is encrypted with one key and the other tenant's PTE carries
the other KeyID. "mm/ksm: Do not merge pages with different KeyIDs" keeps
them apart. With mm/mitigations/ksm_keyid_check off, KSM merges them and a
tenant ends up reading garbage. Two identical pages under the same KeyID are
merged in both cases (the control).
"""

from __future__ import annotations

import os

from mktme_sandbox.examples.lab import BASE, PAGE, Lab, main

PASSES = 4


def trial(lab: Lab, k1: int, k2: int, check: bool) -> dict[str, bool]:
    m = lab.m
    lab.mitigation("ksm_keyid_check", check)
    lab.step(f"ksm_keyid_check={int(check)}")
    a = lab.tenant_page("exp7-a", keyid=k1, pages=2).space
    b = lab.tenant_page("exp7-b", keyid=k2).space
    content = (b"identical page " + os.urandom(16).hex().encode()).ljust(PAGE, b"=")
    for sp, va in ((a, BASE), (a, BASE + PAGE), (b, BASE)):
        sp.write(va, content)
    a.ctl(f"madvise {BASE:#x} {2 * PAGE} mergeable")
    b.ctl(f"madvise {BASE:#x} {PAGE} mergeable")
    lab.step(
        f"tenant A: two identical pages under KeyID {k1}; tenant B: the same page under "
        f"KeyID {k2}; all madvise(MERGEABLE)"
    )
    for n in range(1, PASSES + 1):  # noqa: B007 - n counts the passes for the report below
        m.write_ctl("mm/ksm/run", "1")
        a0, a1 = (e.pfn for e in a.pagemap(BASE, 2))
        b0 = b.translate(BASE).pfn
        if a0 == a1 and (b0 == a0 or check):
            break
    lab.saw(f"after {n} KSM pass(es): A pages pfn {a0:#x} {a1:#x}, B page pfn {b0:#x}")
    reads = {
        "A": a.read(BASE, PAGE) == content and a.read(BASE + PAGE, PAGE) == content,
        "B": b.read(BASE, PAGE) == content,
    }
    lab.saw(f"A reads its content: {reads['A']}; B reads its content: {reads['B']}")
    stats = " ".join(
        f"{n}={m.read_text(f'mm/ksm/{n}').strip()}"
        for n in ("pages_shared", "pages_sharing", "full_scans")
    )
    lab.saw(f"mm/ksm/: {stats}")
    lab.destroy(b)
    lab.destroy(a)
    return {"control": a0 == a1, "cross": b0 in (a0, a1), "garbage": not all(reads.values())}


def run(lab: Lab) -> None:
    k1, k2 = lab.key("cpu"), lab.key("cpu")
    on = trial(lab, k1, k2, check=True)
    off = trial(lab, k1, k2, check=False)
    lab.expect(on["control"] and off["control"], "identical pages under one KeyID are merged")
    lab.expect(
        not on["cross"] and not on["garbage"],
        "with the check, pages under different KeyIDs stay apart and both read fine",
    )
    lab.expect(
        off["cross"] and off["garbage"],
        "without the check, they are merged and a tenant reads garbage",
    )
    lab.conclude(
        f"check on: cross-KeyID merge={on['cross']}; check off: merge={off['cross']}, "
        f"a tenant reads garbage={off['garbage']}"
    )


if __name__ == "__main__":
    main(run, "7. KSM across tenants with different KeyIDs", __doc__)
