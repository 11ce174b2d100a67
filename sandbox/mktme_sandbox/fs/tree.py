"""The tree of docs/spec.md section 4: every path, what it shows, who may touch it.

``Tree(machine).resolve("/keys/3")`` gives the node of a path, or None. Paths
that never change (README, dmesg, dram, mm/, hw/ ...) are built once; paths
named by a KeyID or an address space are matched when looked up, so a space
that has just been created or destroyed is seen at once.

Ownership follows docs/spec.md 8; the kernel enforces it because the fs is
mounted with ``default_permissions``:

- the daemon's user owns everything not listed below; control files of mm/
  and hw/ are 0600, read-only information 0444, directories 0555
  (``mm/snapshot`` also refuses every caller but root);
- ``dram`` is 0644 (world-readable: what an attacker on the memory bus sees);
  ``swap``, the disk, is 0400 (root and the daemon's user);
- ``keys/N`` is 0666 while KeyID N is free, then 0644 owned by its programmer;
- ``keyids/N/mem`` is 0600, owned by KeyID N's owner (N > 0) once programmed;
- ``spaces/`` is 1777 so anyone can create a space; ``spaces/NAME`` is 0700
  owned by its creator, as is ``pagetables/NAME`` (0400, like pagemap), and
  ``spaces/NAME/vmas/`` (0500) with one file per VMA (0600, like mem).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from mktme_sandbox.commands import SNAPSHOT_USAGE, expect_word, parse_switch
from mktme_sandbox.config import parse_decimal
from mktme_sandbox.fs.nodes import Access, BlobFile, Dir, Node, TextFile, access_of, fixed
from mktme_sandbox.fs.readme import README
from mktme_sandbox.kernel.pgtable_types import PAGE_SIZE, USER_END

if TYPE_CHECKING:
    from mktme_sandbox.machine import Machine

__all__ = ["MSR_SPACE", "PAGEMAP_SIZE", "USER_SPACE_END", "Tree"]

USER_SPACE_END = USER_END  # the x86-64 user address space (47 bits)
PAGEMAP_SIZE = 8 * (USER_SPACE_END // PAGE_SIZE)  # one u64 per user page
MSR_SPACE = 1 << 32  # hw/msr: offset = MSR address, as /dev/cpu/0/msr

INFO, CONTROL, DIRECTORY = 0o444, 0o600, 0o555

Command = Callable[[bytes, int], None]


def _on_word(word: bytes, action: Callable[[], object]) -> Command:
    """A control file that accepts exactly ``word`` (``flush``, ``1``)."""

    def run(text: bytes, uid: int) -> None:
        expect_word(text, word.decode(), "command")
        action()

    return run


def _flag(setter: Callable[[bool], object]) -> Command:
    """A 1/0 switch."""

    def run(text: bytes, uid: int) -> None:
        setter(parse_switch(text, "switch"))

    return run


def _lines(problems: list[str]) -> str:
    return "".join(f"{line}\n" for line in problems) or "ok\n"


class Tree:
    """Resolves mount-relative paths to nodes of one machine."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.uid: int = machine.owner_uid
        self.fixed = self._with_directories(self._fixed_nodes())

    def resolve(self, path: str) -> Node | None:
        parts = tuple(part for part in path.split("/") if part)
        node = self.fixed.get(parts)
        return node if node is not None else self._dynamic(parts)

    # -- paths that are always there -------------------------------------------------

    def _fixed_nodes(self) -> dict[tuple[str, ...], Node]:
        m, uid, info, control = (
            self.machine,
            self.uid,
            fixed(self.uid, INFO),
            fixed(self.uid, CONTROL),
        )
        nodes: dict[tuple[str, ...], Node] = {
            ("README",): TextFile(lambda: README, info, direct_io=False),
            ("dmesg",): TextFile(m.dmesg, info, follow=True),
            ("dram",): BlobFile(m.phys_mem, m.read_dram, fixed(uid, 0o644), m.write_dram),
            ("swap",): BlobFile(m.swap_size, m.read_swap, fixed(uid, 0o400)),
            ("keys",): Dir(partial(self._keyid_names, 1), fixed(uid, DIRECTORY)),
            ("keyids",): Dir(partial(self._keyid_names, 0), fixed(uid, DIRECTORY)),
            ("spaces",): Dir(m.space_names, fixed(uid, 0o1777), m.create_space, m.destroy_space),
            ("pagetables",): Dir(lambda: ["kernel", *m.space_names()], fixed(uid, DIRECTORY)),
            ("pagetables", "kernel"): TextFile(m.ptdump_kernel, info),
            ("mm", "vmstat"): TextFile(m.vmstat, info),
            ("mm", "meminfo"): TextFile(m.meminfo, info),
            ("mm", "free_pools"): TextFile(m.free_pools, info),
            ("mm", "swaps"): TextFile(m.swaps, info),
            ("mm", "swap_encryption"): TextFile(
                lambda: f"{int(m.swap_encryption)}\n", control, _flag(self._set_swap_encryption)
            ),
            ("mm", "keyid_free_pools"): TextFile(
                lambda: f"{int(m.keyid_free_pools)}\n", control, _flag(self._set_free_pools)
            ),
            ("mm", "ksm", "run"): TextFile(
                partial(self._sysfs_value, m.ksm_stats, "run"), control, _on_word(b"1", m.ksm_run)
            ),
            ("mm", "khugepaged", "scan"): TextFile(
                None, fixed(uid, 0o200), _on_word(b"1", m.khugepaged_scan)
            ),
            ("mm", "kpageflags"): BlobFile(8 * (m.phys_mem >> 12), m.kpageflags, info),
            ("mm", "kpagecount"): BlobFile(8 * (m.phys_mem >> 12), m.kpagecount, info),
            ("mm", "page_keyid"): BlobFile(8 * (m.phys_mem >> 12), m.page_keyid, info),
            ("mm", "check"): TextFile(lambda: _lines(m.check()), info),
            ("mm", "compact_memory"): TextFile(
                None, fixed(uid, 0o200), _on_word(b"1", m.compact_memory)
            ),
            ("mm", "keyid_map.svg"): TextFile(m.keyid_map_svg, info),
            ("mm", "snapshot"): TextFile(
                lambda: f"usage: {SNAPSHOT_USAGE}\n", control, m.snapshot_command
            ),
            ("hw", "msr"): BlobFile(MSR_SPACE, m.read_msr_file, info),
            ("hw", "tme"): TextFile(m.tme_text, info),
            ("hw", "cache"): TextFile(
                m.cache_stats, control, lambda text, uid: m.cache_command(text)
            ),
        }
        for folder, values in (("ksm", m.ksm_stats), ("khugepaged", m.khugepaged_stats)):
            for name in values():
                path = ("mm", folder, name)
                nodes.setdefault(path, TextFile(partial(self._sysfs_value, values, name), info))
        for name in m.MITIGATIONS:
            nodes[("mm", "mitigations", name)] = TextFile(
                partial(lambda n: f"{int(m.mitigation(n))}\n", name),
                control,
                _flag(partial(m.set_mitigation, name)),
            )
        return nodes

    def _with_directories(self, nodes: dict[tuple[str, ...], Node]) -> dict[tuple[str, ...], Node]:
        """Add every directory above the fixed paths (/, mm, mm/ksm, hw ...)."""
        listings: dict[tuple[str, ...], dict[str, None]] = {}
        for path in nodes:
            for depth in range(len(path)):
                listings.setdefault(path[:depth], {})[path[depth]] = None
        access = fixed(self.uid, DIRECTORY)
        dirs = {
            path: Dir(partial(tuple, names), access)
            for path, names in listings.items()
            if path not in nodes
        }
        return nodes | dirs

    @staticmethod
    def _sysfs_value(values: Callable[[], dict[str, int]], name: str) -> str:
        """One value of a sysfs folder (mm/ksm/, mm/khugepaged/), as its own file."""
        return f"{values()[name]}\n"

    def _set_free_pools(self, on: bool) -> None:
        self.machine.keyid_free_pools = on

    def _set_swap_encryption(self, on: bool) -> None:
        self.machine.swap_encryption = on

    # -- paths named by a KeyID or an address space ----------------------------------

    def _dynamic(self, parts: tuple[str, ...]) -> Node | None:
        match parts:
            case ("keys", n) if (keyid := self._keyid(n, first=1)) is not None:
                return self._key(keyid)
            case ("keyids", n) if self._keyid(n, first=0) is not None:
                return Dir(lambda: ("mem",), fixed(self.uid, DIRECTORY))
            case ("keyids", n, "mem") if (keyid := self._keyid(n, first=0)) is not None:
                return self._keyid_mem(keyid)
            case ("spaces", name) if self._is_space(name):
                return Dir(lambda: tuple(self._space_files(name)), self._space_access(name, 0o700))
            case ("spaces", name, leaf) if self._is_space(name):
                return self._space_files(name).get(leaf)
            case ("spaces", name, "vmas", leaf) if self._is_space(name):
                return self._vma_file(name, leaf)
            case ("pagetables", name) if self._is_space(name):
                m = self.machine
                return TextFile(partial(m.ptdump, name), self._space_access(name, 0o400))
        return None

    def _keyid_names(self, first: int) -> list[str]:
        return [str(keyid) for keyid in range(first, self.machine.nr_keyids + 1)]

    def _keyid(self, text: str, first: int) -> int | None:
        """``"3"`` -> 3 when KeyID 3 exists (ASCII digits, no leading zeros, no signs)."""
        keyid = parse_decimal(text)
        if keyid is None or text != str(keyid):
            return None
        return keyid if first <= keyid <= self.machine.nr_keyids else None

    def _key_access(self, keyid: int) -> Access:
        owner = self.machine.key_owner(keyid)
        return access_of(self.uid, 0o666) if owner is None else access_of(owner, 0o644)

    def _key(self, keyid: int) -> TextFile:
        m = self.machine
        return TextFile(
            partial(m.key_status, keyid),
            partial(self._key_access, keyid),
            partial(m.key_command, keyid),
        )

    def _keyid_mem_access(self, keyid: int) -> Access:
        owner = self.machine.key_owner(keyid) if keyid else None
        return access_of(self.uid if owner is None else owner, 0o600)

    def _keyid_mem(self, keyid: int) -> BlobFile:
        m = self.machine
        return BlobFile(
            m.phys_mem,
            partial(m.read_phys, keyid),
            partial(self._keyid_mem_access, keyid),
            partial(m.write_phys, keyid),
        )

    def _is_space(self, name: str) -> bool:
        return name in self.machine.space_names()

    def _space_access(self, name: str, mode: int, enclosed: bool = False) -> Callable[[], Access]:
        return lambda: access_of(self.machine.space_owner(name), mode, enclosed)

    def _space_files(self, name: str) -> dict[str, Node]:
        # Enclosed in spaces/NAME/ (0700): an fd opened while the name was the
        # caller's reads nothing once another user's space takes the name.
        m, access = self.machine, partial(self._space_access, name, enclosed=True)
        return {
            "ctl": TextFile(None, access(0o200), partial(m.space_command, name)),
            "maps": TextFile(partial(m.maps, name), access(INFO)),
            "smaps": TextFile(partial(m.smaps, name), access(INFO)),
            "smaps_rollup": TextFile(partial(m.smaps_rollup, name), access(INFO)),
            "status": TextFile(partial(m.status, name), access(INFO)),
            "numa_maps": TextFile(partial(m.numa_maps, name), access(INFO)),
            "uffd": TextFile(partial(m.uffd, name), access(INFO)),
            "mem": BlobFile(
                USER_SPACE_END,
                partial(m.read_virt, name),
                access(0o600),
                partial(m.write_virt, name),
            ),
            "pagemap": BlobFile(PAGEMAP_SIZE, partial(m.pagemap, name), access(0o400)),
            "cr3": TextFile(lambda: f"{m.cr3(name):#x}\n", access(INFO)),
            "tlb": TextFile(None, access(0o200), _on_word(b"flush", partial(m.flush_tlb, name))),
            "vmas": Dir(lambda: tuple(m.vmas(name)), access(0o500)),
        }

    def _vma_file(self, name: str, leaf: str) -> BlobFile | None:
        """``spaces/NAME/vmas/START-END``: the VMA's bytes, offset 0 = its start."""
        m = self.machine
        vma = m.vmas(name).get(leaf)
        if vma is None:
            return None
        access = self._space_access(name, 0o600, enclosed=True)
        return BlobFile(
            len(vma), partial(m.read_vma, name, vma), access, partial(m.write_vma, name, vma)
        )
