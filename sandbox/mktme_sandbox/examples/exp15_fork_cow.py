"""15. Copy-on-write across fork keeps each side's data under its KeyID.

fork shares every page of an encrypted mapping between parent and child,
write-protected on both sides. The first write copies the page: wp_page_copy()
takes the new page from alloc_page_vma(), which the series ("mm/page_alloc:
Handle allocation for encrypted memory") makes allocate with the VMA's KeyID,
and copies the plaintext through each page's own KeyID. Without that rule
(mm/mitigations/alloc_page_vma_keyid = 0) the copy is a KeyID-0 page read
through the VMA's key: the writer's untouched bytes come back as garbage.
"""

from __future__ import annotations

from mktme_sandbox.examples.lab import BASE, PAGE, Lab, hexline, main

SECRET = b"attack at dawn!!" * 4


def trial(lab: Lab, k: int, on: bool) -> tuple[bool, bool]:
    """Returns (the parent still reads its secret, the child reads the secret
    past the bytes it wrote)."""
    lab.mitigation("alloc_page_vma_keyid", on)
    parent = lab.space("exp15")
    parent.mmap(BASE, PAGE, "rw-", keyid=k, populate=True)
    parent.write(BASE, SECRET)
    child = parent.fork(parent.name + "-child")
    lab.later(f"destroy spaces/{child.name}", child.destroy)
    shared = parent.translate(BASE).pfn
    lab.step(
        f"alloc_page_vma_keyid={int(on)}: forked spaces/{parent.name} (KeyID {k}) into "
        f"spaces/{child.name}; both map pfn {shared:#x}; the child writes 4 bytes"
    )
    child.write(BASE, b"kid!")
    copy = child.translate(BASE).pfn
    got = child.read(BASE, len(SECRET))
    lab.saw(f"child: pfn {copy:#x} (page KeyID {lab.m.page_keyid(copy)}), reads {hexline(got[4:])}")
    parent_ok = parent.read(BASE, len(SECRET)) == SECRET
    return parent_ok, got[4:] == SECRET[4:]


def run(lab: Lab) -> None:
    k = lab.key("cpu")
    parent_on, child_on = trial(lab, k, True)
    parent_off, child_off = trial(lab, k, False)
    lab.expect(parent_on and child_on, "switch on: both sides keep their data")
    lab.expect(parent_off and not child_off, "switch off: the child's copy reads as garbage")
    lab.conclude(
        f"on: parent ok={parent_on}, child ok={child_on}; "
        f"off: parent ok={parent_off}, child ok={child_off}"
    )


if __name__ == "__main__":
    main(run, "15. copy-on-write across fork", __doc__)
