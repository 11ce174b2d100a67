"""Small helpers shared by the kernel tests: a machine, a key, a space."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from mktme_sandbox import Machine
from mktme_sandbox.kernel.pgtable import Lookup

U = 0x10000000  # a user address, 2M aligned
PAGE = 4096
HPAGE = 2 << 20


def machine(**options: object) -> Machine:
    options.setdefault("phys_mem", "64M")
    options.setdefault("seed", 1)
    return Machine(None, **options)


def cpu_key(m: Machine, keyid: int, uid: int = 0) -> None:
    m.key_command(keyid, "type=cpu algorithm=aes-xts-128", uid=uid)


def space(m: Machine, name: str = "a", uid: int = 0) -> str:
    m.create_space(name, uid)
    return name


def two_keys(**options: object) -> tuple[Machine, str]:
    """A machine with KeyIDs 1 and 2 programmed and one address space, "a"."""
    m = machine(**options)
    cpu_key(m, 1)
    cpu_key(m, 2)
    return m, space(m)


def ctl(m: Machine, name: str, command: str, uid: int = 0) -> None:
    m.space_command(name, command, uid=uid)


def pfn_of(m: Machine, name: str, addr: int) -> int:
    """The PFN pagemap gives for ``addr`` (asserts present)."""
    (entry,) = struct.unpack("<Q", m.pagemap(name, (addr >> 12) * 8, 8))
    assert entry >> 63, f"{addr:#x} is not present"
    return int(entry) & ((1 << 55) - 1)


def page_keyid(m: Machine, pfn: int) -> int:
    (keyid,) = struct.unpack("<Q", m.page_keyid(pfn * 8, 8))
    return int(keyid)


def smaps_keyids(m: Machine, name: str) -> list[int]:
    return [
        int(line.split()[1]) for line in m.smaps(name).splitlines() if line.startswith("KeyID:")
    ]


def vmstat(m: Machine) -> dict[str, int]:
    return m.vmstat_counts()


def leaf(m: Machine, name: str, va: int) -> Lookup:
    """The page-table entry that maps ``va`` in space ``name`` (asserts there is one)."""
    found = m.kernel.pt.get_pte(m.cr3(name), va)
    assert found is not None, f"{va:#x} is not mapped in {name}"
    return found


def space_tables(m: Machine, name: str = "a") -> list[int]:
    """The physical address of every table page of space ``name``."""
    return list(m.kernel.pt.iter_tables(m.cr3(name)))


@dataclass
class Accesses:
    """The platform loads and stores seen, as (physical address, bytes)
    (the kernel tests' ``accesses`` fixture fills one)."""

    loads: list[tuple[int, int]] = field(default_factory=list)
    stores: list[tuple[int, int]] = field(default_factory=list)

    def clear(self) -> None:
        self.loads.clear()
        self.stores.clear()

    @staticmethod
    def within(seen: list[tuple[int, int]], pages: list[int]) -> list[tuple[int, int]]:
        """The accesses that fall in the 4 KiB pages at ``pages``."""
        starts = set(pages)
        return [(pa, n) for pa, n in seen if pa & ~(PAGE - 1) in starts]
