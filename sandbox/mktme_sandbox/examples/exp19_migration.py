"""19. Page migration without the KeyID rule.

Moving a page to another NUMA node (``move_pages``, ``mbind``, NUMA
balancing) copies it into a new page. Patch 05 of the series ("mm/page_alloc:
Handle allocation for encrypted memory") makes mm/migrate.c allocate that page
for the source page's KeyID: "An encrypted page has to be migrated to the
same KeyID as the source page." The kernel copies through each page's own
KeyID and keeps the KeyID in the PTE, so the tenant reads its data on the new
node. mm/mitigations/migrate_keyid switches that rule off: the target comes
from KeyID 0 as before the series, the plaintext lands in it through KeyID 0,
the PTE still says KeyID N, and the tenant reads garbage (mm/check reports
it). Needs two NUMA nodes: on a mount with one it mounts a sandbox of its
own with ``--numa-nodes 2`` (run-all mounts its own that way too).
"""

from __future__ import annotations

import errno

from mktme_sandbox.client import MountError
from mktme_sandbox.examples.lab import PAGE, Lab, hexline, main, on_a_fresh_sandbox

SECRET = b"a page on the move keeps its key? "
PAGES = 4


def trial(lab: Lab, k: int, on: bool) -> tuple[bool, int]:
    """Returns (the tenant read its data back, the KeyID of the new page)."""
    lab.mitigation("migrate_keyid", on)
    tenant = lab.tenant_page("exp19", keyid=k, pages=PAGES)
    sp = tenant.space
    for i in range(PAGES):
        sp.write(tenant.va + i * PAGE, SECRET + bytes([i]))
    here = sp.path.joinpath("numa_maps").read_text()
    target = 1 if " N0=" in here else 0  # wherever the allocator put them, the other node
    try:
        sp.ctl(f"migrate {tenant.va:#x} {PAGES * PAGE} {target}")
    except MountError as e:
        if e.errno == errno.ENODEV:
            raise OneNode from None
        raise
    numa = sp.path.joinpath("numa_maps").read_text().splitlines()[0]
    keyid = lab.m.page_keyid(lab.physical(sp, tenant.va) // PAGE)
    data = sp.read(tenant.va, len(SECRET) + 1)
    lab.saw(f"migrate_keyid={int(on)}: numa_maps {numa!r}; the new page's KeyID {keyid}")
    lab.saw(f"the tenant reads {hexline(data)}")
    lab.destroy(sp)
    return data == SECRET + b"\0", keyid


class OneNode(Exception):
    """The mount's machine has one NUMA node."""


FRESH = ("--seed", "1", "--phys-mem", "64M", "--numa-nodes", "2")


def run(lab: Lab) -> None:
    try:
        observe(lab)
    except OneNode:
        lab.cleanup()  # what the first trial made on this mount
        on_a_fresh_sandbox(lab, "this mount has one NUMA node", FRESH, observe)


def observe(lab: Lab) -> None:
    k = lab.key("cpu")
    ok_on, keyid_on = trial(lab, k, True)
    ok_off, keyid_off = trial(lab, k, False)
    lab.expect(ok_on and keyid_on == k, f"rule on: the page moves with KeyID {k}, data intact")
    lab.expect(not ok_off and keyid_off == 0, "rule off: a KeyID-0 target, garbage read")
    lab.conclude(
        f"on: KeyID {keyid_on}, data intact={ok_on}; off: KeyID {keyid_off}, data intact={ok_off}"
    )


if __name__ == "__main__":
    main(run, "19. page migration without the KeyID rule", __doc__)
