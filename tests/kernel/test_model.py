"""Random sequences of every control command against a plain dict of the
virtual memory: mmap, munmap, mprotect, encrypt_mprotect, every madvise
(dontneed, mergeable, unmergeable, hugepage), reads and writes, KSM passes,
khugepaged scans of a 2 MiB region, TLB flushes, WBINVD, key clears and
reprogramming, free pools on and off, spaces that exit and come back. After
every step the audit (``check``) must be clean; every read must equal the
model; a command the model says must fail must fail with its errno."""

from __future__ import annotations

import errno
from dataclasses import dataclass

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kernel_helpers import HPAGE, PAGE, U, cpu_key, machine
from mktme_sandbox import SandboxError

SLOTS = 16  # pages in the region the test plays in
SPACES = ("a", "b")
PROTS = {"---": "", "r--": "r", "rw-": "rw"}
HUGE = U + 16 * HPAGE  # a 2 MiB-aligned region outside the slots, for khugepaged

slot = st.integers(0, SLOTS - 1)
npages = st.integers(1, 4)
prot = st.sampled_from(sorted(PROTS))
keyid = st.sampled_from([0, 1, 2])
space_name = st.sampled_from(SPACES)


@dataclass
class Page:
    """What the model knows of one page: its permissions, its KeyID, its bytes."""

    perms: str
    keyid: int
    data: bytearray


class VirtualMemory(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.m = machine(phys_mem="16M", cache_size="256K")
        for k in (1, 2):
            cpu_key(self.m, k)
        self.model: dict[str, dict[int, Page]] = {}  # per space: page index -> Page
        self.huge: dict[str, tuple[int, bytearray]] = {}  # space -> (KeyID, 2 MiB of data)
        for name in SPACES:
            self.m.create_space(name, 0)
            self.model[name] = {}

    # --- helpers ----------------------------------------------------------

    def run(self, name: str, command: str, ok: bool, err: int | None = None) -> bool:
        try:
            self.m.space_command(name, command, uid=0)
        except SandboxError as e:
            assert not ok, f"{command}: unexpected {e}"
            if err is not None:
                assert e.errno == err, f"{command}: {e}"
            return False
        assert ok, f"{command} should have failed"
        return True

    def pages(self, start: int, n: int) -> range:
        return range(start, min(start + n, SLOTS))

    # --- rules -----------------------------------------------------------

    @rule(name=space_name, start=slot, n=npages, p=prot, k=keyid, populate=st.booleans())
    def mmap(self, name: str, start: int, n: int, p: str, k: int, populate: bool) -> None:
        pages = self.pages(start, n)
        ok = not any(i in self.model[name] for i in pages)
        extra = " populate" if populate else ""
        cmd = f"mmap {U + start * PAGE:#x} {len(pages) * PAGE} {p} keyid={k}{extra}"
        if self.run(name, cmd, ok, errno.EINVAL):
            for i in pages:
                self.model[name][i] = Page(PROTS[p], k, bytearray(PAGE))

    @rule(name=space_name, start=slot, n=npages)
    def munmap(self, name: str, start: int, n: int) -> None:
        pages = self.pages(start, n)
        self.run(name, f"munmap {U + start * PAGE:#x} {len(pages) * PAGE}", True)
        for i in pages:
            self.model[name].pop(i, None)

    @rule(name=space_name, start=slot, n=npages, p=prot)
    def mprotect(self, name: str, start: int, n: int, p: str) -> None:
        pages = self.pages(start, n)
        ok = all(i in self.model[name] for i in pages)
        if self.run(
            name, f"mprotect {U + start * PAGE:#x} {len(pages) * PAGE} {p}", ok, errno.ENOMEM
        ):
            for i in pages:
                self.model[name][i].perms = PROTS[p]

    @rule(name=space_name, start=slot, n=npages, p=prot, k=keyid)
    def encrypt_mprotect(self, name: str, start: int, n: int, p: str, k: int) -> None:
        pages = self.pages(start, n)
        ok = all(i in self.model[name] for i in pages)
        cmd = f"encrypt_mprotect {U + start * PAGE:#x} {len(pages) * PAGE} {p} keyid={k}"
        if self.run(name, cmd, ok, errno.ENOMEM):
            for i in pages:
                self.model[name][i] = Page(PROTS[p], k, bytearray(PAGE))

    @rule(
        name=space_name,
        start=slot,
        n=npages,
        advice=st.sampled_from(["dontneed", "mergeable", "unmergeable", "hugepage"]),
    )
    def madvise(self, name: str, start: int, n: int, advice: str) -> None:
        pages = self.pages(start, n)
        ok = all(i in self.model[name] for i in pages)
        cmd = f"madvise {U + start * PAGE:#x} {len(pages) * PAGE} {advice}"
        if self.run(name, cmd, ok, errno.ENOMEM) and advice == "dontneed":
            for i in pages:
                self.model[name][i].data[:] = bytes(PAGE)

    @rule(
        name=space_name,
        start=slot,
        offset=st.integers(0, PAGE - 1),
        data=st.binary(min_size=1, max_size=2 * PAGE),
    )
    def write(self, name: str, start: int, offset: int, data: bytes) -> None:
        addr = U + start * PAGE + offset
        end = addr + len(data)
        pages = range(start, (end - U - 1) // PAGE + 1)
        ok = all(i in self.model[name] and "w" in self.model[name][i].perms for i in pages)
        try:
            self.m.write_virt(name, addr, data)
        except SandboxError as e:
            assert not ok, e
            assert e.errno == errno.EIO, e
            return
        assert ok
        for i in pages:
            lo, hi = max(addr, U + i * PAGE), min(end, U + (i + 1) * PAGE)
            self.model[name][i].data[lo - U - i * PAGE : hi - U - i * PAGE] = data[
                lo - addr : hi - addr
            ]

    @precondition(lambda self: any(self.model.values()))
    @rule()
    def ksm(self) -> None:
        self.m.ksm_run()

    @rule(name=space_name, k=keyid, seed=st.integers(0, 255))
    def map_a_huge_candidate(self, name: str, k: int, seed: int) -> None:
        """2 MiB, populated, advised hugepage: what khugepaged may collapse."""
        ok = name not in self.huge
        if not self.run(name, f"mmap {HUGE:#x} 2M rw- keyid={k} populate", ok, errno.EINVAL):
            return
        data = bytearray((seed + i) % 251 for i in range(HPAGE))
        self.m.write_virt(name, HUGE, bytes(data))
        self.run(name, f"madvise {HUGE:#x} 2M hugepage", True)
        self.huge[name] = (k, data)

    @precondition(lambda self: bool(self.huge))
    @rule(name=space_name)
    def unmap_the_huge_candidate(self, name: str) -> None:
        self.run(name, f"munmap {HUGE:#x} 2M", True)
        self.huge.pop(name, None)

    @rule()
    def khugepaged(self) -> None:
        self.m.khugepaged_scan()

    @rule(name=space_name)
    def flush_the_tlb(self, name: str) -> None:
        self.m.flush_tlb(name)

    @rule()
    def flush_everything(self) -> None:
        self.m.cache_command("wbinvd")

    @rule(k=st.sampled_from([1, 2]), algorithm=st.sampled_from(["aes-xts-128", "aes-xts-256"]))
    def clear_and_reprogram(self, k: int, algorithm: str) -> None:
        """EBUSY while a VMA of any space uses KeyID k; otherwise a new key."""
        in_use = any(page.keyid == k for pages in self.model.values() for page in pages.values())
        in_use = in_use or any(hk == k for hk, _ in self.huge.values())
        try:
            self.m.key_command(k, "type=clear", uid=0)
        except SandboxError as e:
            assert in_use, e
            assert e.errno == errno.EBUSY, e
            return
        assert not in_use, f"KeyID {k} cleared while in use"
        self.m.key_command(k, f"type=cpu algorithm={algorithm}", uid=0)

    @rule(name=space_name)
    def exit_and_respawn(self, name: str) -> None:
        self.m.destroy_space(name, uid=0)
        self.m.create_space(name, 0)
        self.model[name] = {}
        self.huge.pop(name, None)

    @rule(on=st.booleans())
    def keyid_free_pools(self, on: bool) -> None:
        self.m.keyid_free_pools = on

    # --- invariants ------------------------------------------------------------

    @invariant()
    def audit_is_clean(self) -> None:
        assert self.m.check() == []

    @invariant()
    def the_huge_candidates_keep_their_data(self) -> None:
        for name, (_, data) in self.huge.items():
            assert self.m.read_virt(name, HUGE, HPAGE) == bytes(data), name

    @invariant()
    def readable_memory_equals_the_model(self) -> None:
        for name, pages in self.model.items():
            for i, page in pages.items():
                if "r" in page.perms:
                    assert self.m.read_virt(name, U + i * PAGE, PAGE) == bytes(page.data), (name, i)
                else:
                    try:
                        self.m.read_virt(name, U + i * PAGE, 1)
                    except SandboxError as e:
                        assert e.errno == errno.EIO
                    else:
                        raise AssertionError("read of a PROT_NONE page succeeded")


VirtualMemory.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_virtual_memory_matches_a_dict_model = VirtualMemory.TestCase
