"""One body of tests over every kind of machine, as py65 runs one CPU suite
over every CPU variant: with and without a cache, with per-KeyID free pools
on and off, in a KeyID-0 VMA and an encrypted one, with TME bypass, and with
MKTME off altogether. What a process sees (its data, zeros where it never
wrote, its own pages only) must not depend on the variant; where DRAM must
differ (ciphertext or plaintext), the test says which and why.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field

import pytest

from mktme_sandbox import Machine

BASE = 0x10000000
PAGE = 4096
SECRET = b"the same secret in every variant"


@dataclass(frozen=True)
class Variant:
    name: str
    keyid: int = 1
    pools: bool = False
    algorithm: str = "aes-xts-128"
    options: dict[str, object] = field(default_factory=dict)

    @property
    def plaintext_in_dram(self) -> bool:
        """Only KeyID-0 memory under TME bypass is stored in clear."""
        return self.keyid == 0 and bool(self.options.get("tme_bypass"))

    def machine(self) -> Machine:
        m = Machine(phys_mem="16M", seed=3, **self.options)  # type: ignore[arg-type]
        if self.keyid:
            m.key_command(self.keyid, f"type=cpu algorithm={self.algorithm}", uid=0)
        m.keyid_free_pools = self.pools
        return m


VARIANTS = [
    Variant("encrypted"),
    Variant("encrypted-no-cache", options={"cache_size": 0}),
    Variant("encrypted-pools", pools=True),
    Variant("aes-xts-256-only", 2, algorithm="aes-xts-256", options={"algorithms": "aes-xts-256"}),
    Variant("keyid-0", keyid=0),
    Variant("keyid-0-no-cache", keyid=0, options={"cache_size": 0}),
    Variant("keyid-0-tme-bypass", keyid=0, options={"tme_bypass": True}),
    Variant("mktme-off", keyid=0, options={"keyid_bits": 0}),
]


@pytest.fixture(params=VARIANTS, ids=[v.name for v in VARIANTS])
def variant(request: pytest.FixtureRequest) -> Variant:
    v: Variant = request.param
    return v


@pytest.fixture
def m(variant: Variant) -> Machine:
    machine = variant.machine()
    machine.create_space("p", uid=0)
    machine.space_command("p", f"mmap {BASE:#x} 64K rw- keyid={variant.keyid}", uid=0)
    return machine


def free_pages(m: Machine) -> int:
    return sum(int(n) for n in re.findall(r"free=(\d+)", m.free_pools()))


def pfn_of(m: Machine, space: str, va: int) -> int:
    (entry,) = struct.unpack("<Q", m.pagemap(space, (va // PAGE) * 8, 8))
    assert entry >> 63, f"{va:#x} is not present"
    return int(entry & ((1 << 55) - 1))


class TestEveryVariant:
    def test_a_write_reads_back_through_the_mapping(self, m: Machine) -> None:
        m.write_virt("p", BASE + 100, SECRET)
        m.cache_command("wbinvd")
        assert m.read_virt("p", BASE + 100, len(SECRET)) == SECRET
        assert m.check() == []

    def test_memory_never_written_reads_as_zeros(self, m: Machine) -> None:
        assert m.read_virt("p", BASE, 3 * PAGE) == bytes(3 * PAGE)
        m.write_virt("p", BASE + PAGE, b"x")
        assert m.read_virt("p", BASE + 2 * PAGE, PAGE) == bytes(PAGE)
        assert m.check() == []

    def test_dram_holds_the_plaintext_only_where_nothing_encrypts_it(
        self, m: Machine, variant: Variant
    ) -> None:
        m.write_virt("p", BASE, SECRET)
        m.cache_command("wbinvd")
        in_dram = m.read_dram(pfn_of(m, "p", BASE) * PAGE, len(SECRET))
        assert (in_dram == SECRET) is variant.plaintext_in_dram

    def test_the_page_keyid_is_the_vmas(self, m: Machine, variant: Variant) -> None:
        m.write_virt("p", BASE, SECRET)
        pfn = pfn_of(m, "p", BASE)
        (keyid,) = struct.unpack("<Q", m.page_keyid(pfn * 8, 8))
        assert keyid == variant.keyid

    def test_the_physical_view_through_the_keyid_is_the_data(
        self, m: Machine, variant: Variant
    ) -> None:
        m.write_virt("p", BASE, SECRET)
        pa = pfn_of(m, "p", BASE) * PAGE
        assert m.read_phys(variant.keyid, pa, len(SECRET)) == SECRET

    def test_munmap_gives_every_page_back(self, m: Machine) -> None:
        before = free_pages(m)
        m.space_command("p", f"mmap {BASE + 0x100000:#x} 32K rw- populate", uid=0)
        m.write_virt("p", BASE, SECRET * 100)
        m.space_command("p", f"munmap {BASE:#x} {0x100000 + 0x8000}", uid=0)
        m.destroy_space("p", uid=0)
        assert free_pages(m) >= before  # the tables of "p" are freed too
        assert m.check() == []

    def test_two_spaces_never_share_a_written_page(self, m: Machine, variant: Variant) -> None:
        m.create_space("q", uid=0)
        m.space_command("q", f"mmap {BASE:#x} 64K rw- keyid={variant.keyid}", uid=0)
        m.write_virt("p", BASE, b"p's data")
        m.write_virt("q", BASE, b"q's data")
        assert pfn_of(m, "p", BASE) != pfn_of(m, "q", BASE)
        assert m.read_virt("p", BASE, 8) == b"p's data"
        assert m.read_virt("q", BASE, 8) == b"q's data"

    def test_dontneed_drops_the_data(self, m: Machine) -> None:
        m.write_virt("p", BASE, SECRET)
        m.space_command("p", f"madvise {BASE:#x} 4K dontneed", uid=0)
        assert m.read_virt("p", BASE, len(SECRET)) == bytes(len(SECRET))
        assert m.check() == []

    def test_mprotect_keeps_the_data_and_the_keyid(self, m: Machine, variant: Variant) -> None:
        m.write_virt("p", BASE, SECRET)
        m.space_command("p", f"mprotect {BASE:#x} 8K r--", uid=0)
        assert m.read_virt("p", BASE, len(SECRET)) == SECRET
        keyids = {int(k) for k in re.findall(r"^KeyID:\s+(\d+)$", m.smaps("p"), re.MULTILINE)}
        assert keyids == {variant.keyid}
        assert m.check() == []

    def test_a_freed_page_reused_by_another_space_reads_as_zeros(
        self, m: Machine, variant: Variant
    ) -> None:
        m.write_virt("p", BASE, SECRET)
        m.destroy_space("p", uid=0)
        m.create_space("q", uid=0)
        m.space_command("q", f"mmap {BASE:#x} 64K rw- keyid={variant.keyid} populate", uid=0)
        assert SECRET not in m.read_virt("q", BASE, 16 * PAGE)
        assert m.check() == []
