"""11. PTE tampering: the KeyID bits select the key.

The page tables live in ordinary KeyID-0 memory. Whoever can write them (the
kernel, or an attacker with a kernel write primitive) can change the KeyID
bits of a PTE: the process then reaches the same physical page through another
key and reads garbage. The TLB keeps the old translation until it is flushed,
as on hardware. This is why MKTME does not protect tenants from the kernel
(TDX later does). The PTE is found with this folder's own page-table walk and
rewritten through keyids/0/mem; the original is put back at the end.
"""

from __future__ import annotations

from mktme_sandbox.client import walk
from mktme_sandbox.examples.lab import BASE, LINE, CannotRun, Lab, hexline, main


def run(lab: Lab) -> None:
    m = lab.m
    page = lab.tenant_page("exp11")
    k, sp = page.keyid, page.space
    try:
        other = lab.key("cpu")
    except CannotRun:
        other = 0
    data = b"the tenant's data, under its own key ".ljust(LINE, b"*")
    sp.write(BASE, data)
    lab.expect(sp.read(BASE, LINE) == data, "the tenant reads its data")
    w = walk(sp, BASE)
    leaf = w.leaf
    if leaf is None or w.pa is None:
        raise CannotRun("the walk found no PTE for a populated page")
    lab.step(
        f"walked to the PTE at physical {leaf.entry_pa:#x}: {leaf.entry:#018x} (KeyID {leaf.keyid})"
    )
    lab.expect(leaf.keyid == k, f"the PTE carries KeyID {k}")
    tampered = m.layout.with_keyid(leaf.entry, other)

    def put(entry: int) -> None:
        m.write_bytes("keyids/0/mem", leaf.entry_pa, entry.to_bytes(8, "little"))
        sp.flush_tlb()

    lab.later("put the original PTE back", lambda: put(leaf.entry))
    m.write_bytes("keyids/0/mem", leaf.entry_pa, tampered.to_bytes(8, "little"))
    lab.step(f"wrote {tampered:#018x} (KeyID {other}) into the PTE through keyids/0/mem")
    stale = sp.read(BASE, LINE)
    lab.saw(f"before a TLB flush the tenant reads {hexline(stale)}")
    lab.note(
        "the TLB still held the old translation"
        if stale == data
        else "no cached translation: the new PTE took effect at once"
    )
    lab.expect(walk(sp, BASE).keyid == other, f"a fresh walk now finds KeyID {other}")
    sp.flush_tlb()
    lab.later(f"invalidate KeyID-{other} lines", lambda: m.clflush(w.pa or 0, LINE, other))
    now = sp.read(BASE, LINE)
    lab.saw(f"after spaces/{sp.name}/tlb flush it reads {hexline(now)}")
    lab.expect(now != data, "the tenant reads garbage")
    audit = m.check()
    lab.saw("mm/check: " + ("; ".join(audit) if audit else "ok (the audit does not see it)"))
    put(leaf.entry)
    lab.expect(sp.read(BASE, LINE) == data, "with the original PTE back, the data reads again")
    lab.conclude(
        f"KeyID bits {k} -> {other} in the PTE: after a TLB flush the tenant reads garbage; "
        "restored, its data is intact"
    )


if __name__ == "__main__":
    main(run, "11. PTE tampering through keyids/0/mem", __doc__)
