"""Machine: one emulated platform plus one simulated kernel, the public API.

Everything the filesystem of docs/spec.md section 4 shows is one method here, so that the FUSE
layer stays a table of paths. Every public method takes the machine's lock
for its whole duration: calls from any thread (the daemon serves FUSE with
one) are serialized, and a command either happens entirely or raises
``SandboxError`` having changed nothing. ``uid`` arguments are the caller's
(0 is root and may do anything); ``owner_uid`` is the daemon's, and the
default of the write methods' optional ``uid``: the daemon's user writes any
memory, others only their own (docs/spec.md 8).

Example::

    from mktme_sandbox import Machine
    m = Machine(phys_mem="64M", seed=1)
    m.key_command(1, "type=cpu algorithm=aes-xts-128", uid=0)
    m.create_space("demo", uid=0)
    m.space_command("demo", "mmap 0x10000000 64K rw- keyid=1", uid=0)
    m.write_virt("demo", 0x10000000, b"secret")
"""

from __future__ import annotations

import errno
import functools
import os
import threading
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar, assert_never

from mktme_sandbox import snapshot as snapshots
from mktme_sandbox.commands import (
    EncryptMprotect,
    Fork,
    Madvise,
    Mbind,
    Migrate,
    Mlock,
    Mmap,
    Mprotect,
    Mremap,
    Munlock,
    Munmap,
    SpaceCommand,
    UffdCopy,
    UffdRegister,
    UffdUnregister,
    UffdZeropage,
    Wbinvd,
    decode_command,
    parse_cache_command,
    parse_snapshot_command,
    parse_space_command,
)
from mktme_sandbox.config import MachineConfig
from mktme_sandbox.errors import SandboxError, errno_name, fail
from mktme_sandbox.hw.platform import Platform
from mktme_sandbox.kernel import (
    check,
    fork,
    keyid_map,
    khugepaged,
    ksm,
    memory,
    migrate,
    mlock,
    mmap,
    mremap,
    proc,
    rmap,
    userfaultfd,
)
from mktme_sandbox.kernel.kernel import MITIGATIONS, Kernel
from mktme_sandbox.kernel.ptdump import ptdump_kernel, ptdump_mm
from mktme_sandbox.kernel.vma import MmStruct, Vma

__all__ = ["Machine"]

P = ParamSpec("P")
R = TypeVar("R")


def _locked(method: Callable[P, R]) -> Callable[P, R]:
    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with args[0]._lock:  # type: ignore[attr-defined]
            return method(*args, **kwargs)

    return wrapper


class Machine:
    """One MKTME machine. ``Machine(phys_mem="64M", seed=1)`` or ``Machine(config)``."""

    MITIGATIONS = tuple(MITIGATIONS)

    def __init__(self, config: MachineConfig | None = None, **options: Any) -> None:
        self.config = MachineConfig.from_options(config, **options)
        self.owner_uid = os.getuid()
        self._lock = threading.RLock()
        self.platform = Platform(self.config)
        self.kernel = Kernel(self.platform, self.config, self.owner_uid)

    def __repr__(self) -> str:
        c = self.config
        return (
            f"Machine(phys_mem={c.phys_mem:#x}, keyid_bits={c.keyid_bits}, "
            f"nr_keyids={self.nr_keyids}, spaces={self.kernel.space_names()})"
        )

    @property
    def phys_mem(self) -> int:
        return self.config.phys_mem

    @property
    def nr_keyids(self) -> int:
        return self.kernel.nr_keyids

    # --- log ----------------------------------------------------------------

    @_locked
    def dmesg(self) -> str:
        return self.kernel.dmesg()

    @_locked
    def reject(self, path: str, err: SandboxError) -> None:
        """Log one rejected operation: file, errno name, reason."""
        self.kernel.printk(f"{path}: {errno_name(err.errno or 0)}: {err.reason}")

    # --- physical memory -------------------------------------------------------

    @_locked
    def read_dram(self, pa: int, length: int) -> bytes:
        return self.platform.dram_read(pa, self._clip(pa, length))

    @_locked
    def write_dram(self, pa: int, data: bytes, uid: int | None = None) -> None:
        """``dram``: only root and the daemon's user write DRAM (EACCES)."""
        if not self._privileged(uid):
            fail(errno.EACCES, f"dram: only root and uid {self.owner_uid} write DRAM, not {uid}")
        self._check_phys(pa, len(data))
        self.platform.dram_write(pa, bytes(data))

    @_locked
    def read_phys(self, keyid: int, pa: int, length: int, uid: int | None = None) -> bytes:
        """``keyids/N/mem``: the owner of KeyID N (N > 0), root or the daemon's user."""
        self._check_keyid(keyid)
        if not self._privileged(uid):
            self._own_keyid(keyid, uid)
        return self.platform.load(pa, self._clip(pa, length), keyid)

    @_locked
    def write_phys(self, keyid: int, pa: int, data: bytes, uid: int | None = None) -> None:
        """``keyids/N/mem``: root and the daemon's user write anywhere; the owner
        of KeyID N only pages that are its own memory (``rmap``), else EACCES
        and nothing is written."""
        self._check_keyid(keyid)
        self._check_phys(pa, len(data))
        if not self._privileged(uid):
            assert uid is not None
            self._check_own_memory(keyid, pa, len(data), uid)
        self.platform.store(pa, bytes(data), keyid)

    def _privileged(self, uid: int | None) -> bool:
        """Root, the daemon's user, or the API's default caller (None, the daemon's user)."""
        return uid is None or uid in (0, self.owner_uid)

    def _own_keyid(self, keyid: int, uid: int | None) -> None:
        """EACCES unless ``uid`` owns KeyID ``keyid`` (KeyID 0: the daemon's user)."""
        owner = self.kernel.key_owner(keyid) if keyid else self.owner_uid
        if owner != uid:
            fail(errno.EACCES, f"KeyID {keyid} belongs to uid {owner}, not {uid}")

    def _check_own_memory(self, keyid: int, pa: int, length: int, uid: int) -> None:
        self._own_keyid(keyid, uid)
        if not length:
            return
        first, last = pa >> 12, ((pa + length - 1) >> 12) + 1
        foreign = rmap.first_foreign_page(self.kernel, uid, first, last, keyid)
        if foreign is not None:
            fail(
                errno.EACCES,
                f"pfn {foreign:#x} is not memory of uid {uid} alone under KeyID {keyid}: only "
                "anonymous pages mapped by its own spaces, through their own KeyID, may be written",
            )

    def _clip(self, pa: int, length: int) -> int:
        if pa < 0:
            fail(errno.EINVAL, f"physical address {pa:#x} is negative")
        return max(0, min(length, self.config.phys_mem - pa))

    def _check_phys(self, pa: int, length: int) -> None:
        if pa < 0 or pa + length > self.phys_mem:
            fail(
                errno.ENOSPC if pa >= 0 else errno.EINVAL,
                f"{pa:#x}+{length:#x} is beyond physical memory ({self.phys_mem:#x})",
            )

    def _check_keyid(self, keyid: int) -> None:
        if not self.kernel.valid_keyid(keyid):
            fail(errno.EINVAL, f"KeyID {keyid} does not exist (this machine has {self.nr_keyids})")

    # --- keys ---------------------------------------------------------------

    @_locked
    def key_status(self, keyid: int) -> str:
        return self.kernel.key_status(keyid)

    @_locked
    def key_command(self, keyid: int, payload: str | bytes, uid: int) -> None:
        self.kernel.key_program(keyid, decode_command(payload, "key"), uid)

    @_locked
    def key_owner(self, keyid: int) -> int | None:
        return self.kernel.key_owner(keyid)

    @_locked
    def inject_pconfig_faults(self, status: int, count: int) -> None:
        """Make the next ``count`` PCONFIG calls answer ``status`` (2 or 5)."""
        self.platform.inject_pconfig_faults(status, count)

    # --- address spaces ---------------------------------------------------------

    @_locked
    def create_space(self, name: str, uid: int) -> None:
        self.kernel.create_space(name, uid)

    @_locked
    def destroy_space(self, name: str, uid: int) -> None:
        self._own_space(name, uid)
        self.kernel.destroy_space(name)

    @_locked
    def fork(self, name: str, child: str, uid: int) -> None:
        """``fork CHILD`` in ``spaces/NAME/ctl``: CHILD, owned by ``uid``, shares
        NAME's pages copy-on-write (EACCES unless ``uid`` owns NAME or is root)."""
        self.space_command(name, f"fork {child}", uid)

    @_locked
    def space_names(self) -> list[str]:
        return self.kernel.space_names()

    @_locked
    def space_owner(self, name: str) -> int:
        return self.kernel.space(name).owner

    def _own_space(self, name: str, uid: int) -> MmStruct:
        mm = self.kernel.space(name)
        if uid not in (0, mm.owner):
            fail(errno.EACCES, f"space {name!r} belongs to uid {mm.owner}")
        return mm

    @_locked
    def space_command(self, name: str, command: str | bytes, uid: int) -> None:
        mm = self._own_space(name, uid)
        cmd = parse_space_command(decode_command(command, "ctl"))
        k = self.kernel
        self._check_map_count(mm, cmd, uid)
        match cmd:
            case Mmap():
                mmap.do_mmap(k, mm, cmd.addr, cmd.length, cmd.prot, cmd.keyid, cmd.populate, uid)
            case Munmap():
                mmap.do_munmap(k, mm, cmd.addr, cmd.length)
            case Mprotect():
                mmap.do_mprotect(k, mm, cmd.addr, cmd.length, cmd.prot)
            case EncryptMprotect():
                mmap.do_encrypt_mprotect(k, mm, cmd.addr, cmd.length, cmd.prot, cmd.keyid, uid)
            case Madvise():
                mmap.do_madvise(k, mm, cmd.addr, cmd.length, cmd.advice)
            case Mlock():
                mlock.do_mlock(k, mm, cmd.addr, cmd.length)
            case Munlock():
                mlock.do_munlock(k, mm, cmd.addr, cmd.length)
            case Mremap():
                mremap.do_mremap(k, mm, cmd.addr, cmd.old_len, cmd.new_len, cmd.new_addr)
            case Fork():
                fork.dup_mm(k, mm, cmd.child, uid)
            case Mbind():
                nodes = migrate.parse_nodelist(k, "mbind", cmd.nodes)
                if not mmap.nothing_to_do(cmd.addr, cmd.length):  # do_mbind: end == start
                    end = mmap.check_mapped_range("mbind", mm, cmd.addr, cmd.length)
                    migrate.do_mbind(k, mm, cmd.addr, end, nodes)
            case Migrate():
                migrate.parse_nodelist(k, "migrate", str(cmd.node))
                if not mmap.nothing_to_do(cmd.addr, cmd.length):  # move_pages of no page
                    end = mmap.check_mapped_range("migrate", mm, cmd.addr, cmd.length)
                    migrate.do_move_pages(k, mm, cmd.addr, end, cmd.node)
            case UffdRegister():
                userfaultfd.userfaultfd_register(k, mm, cmd.addr, cmd.length)
            case UffdUnregister():
                userfaultfd.userfaultfd_unregister(k, mm, cmd.addr, cmd.length)
            case UffdCopy():
                userfaultfd.mcopy_atomic(k, mm, cmd.dst, cmd.src, cmd.length)
            case UffdZeropage():
                userfaultfd.mfill_zeropage(k, mm, cmd.dst, cmd.length)
            case _:
                assert_never(cmd)

    def _check_map_count(self, mm: MmStruct, cmd: SpaceCommand, uid: int) -> None:
        """ENOMEM before ``cmd`` changes anything when it could take ``mm`` past
        ``vm.max_map_count``, or the spaces of a user without privileges past
        as many VMAs together (a ``fork`` copies all of its parent's): the
        daemon's memory for VMAs stays bounded per user, as the page limit
        bounds pages."""
        added = _vmas_added(mm, cmd)
        mmap.check_map_count(cmd.op, mm, added)
        owner = mm.owner
        if isinstance(cmd, Fork):  # the child, the caller's, gets every VMA
            owner, added = uid, mm.map_count
        if not added or self._privileged(owner):
            return
        total = sum(
            space.map_count for space in self.kernel.spaces.values() if space.owner == owner
        )
        if total + added > mmap.MAX_MAP_COUNT:
            fail(
                errno.ENOMEM,
                f"{cmd.op}: uid {owner}'s spaces have {total} mappings, and {added} more "
                f"would pass vm.max_map_count ({mmap.MAX_MAP_COUNT}) for a user's spaces together",
            )

    def _space_for(self, name: str, uid: int | None) -> MmStruct:
        """The space ``name`` if ``uid`` may see it: its owner, root or the daemon's
        user (``None``, the API's default caller, is the daemon's user)."""
        mm = self.kernel.space(name)
        if not self._privileged(uid) and uid != mm.owner:
            fail(errno.EACCES, f"space {name!r} belongs to uid {mm.owner}")
        return mm

    @_locked
    def maps(self, name: str, uid: int | None = None) -> str:
        return proc.maps(self._space_for(name, uid))

    @_locked
    def smaps(self, name: str, uid: int | None = None) -> str:
        return proc.smaps(self.kernel, self._space_for(name, uid))

    @_locked
    def smaps_rollup(self, name: str, uid: int | None = None) -> str:
        return proc.smaps_rollup(self.kernel, self._space_for(name, uid))

    @_locked
    def status(self, name: str, uid: int | None = None) -> str:
        """``spaces/NAME/status``: ``Name:`` and the Vm* and Rss* lines of /proc/PID/status."""
        return proc.status(self.kernel, self._space_for(name, uid))

    @_locked
    def uffd(self, name: str, uid: int | None = None) -> str:
        """``spaces/NAME/uffd``: one ``struct uffd_msg`` per pending missing fault,
        ``event=0x12 flags=F address=0xADDR`` (F 0x1 for a write), by address."""
        mm = self._space_for(name, uid)
        return "".join(msg.line() + "\n" for msg in userfaultfd.pending_messages(mm))

    @_locked
    def read_virt(self, name: str, addr: int, length: int, uid: int | None = None) -> bytes:
        mm = self._space_for(name, uid)
        return memory.access_vm(self.kernel, mm, addr, length, None)

    @_locked
    def write_virt(self, name: str, addr: int, data: bytes, uid: int | None = None) -> None:
        """``mem``: the space's owner, root or the daemon's user (EACCES otherwise)."""
        mm = self._space_for(name, uid)
        memory.access_vm(self.kernel, mm, addr, len(data), bytes(data))

    @_locked
    def vmas(self, name: str, uid: int | None = None) -> dict[str, Vma]:
        """The space's VMAs by the ``START-END`` that begins their maps line."""
        return {proc.vma_name(vma): vma for vma in self._space_for(name, uid).vmas()}

    @_locked
    def read_vma(
        self, name: str, vma: Vma, offset: int, length: int, uid: int | None = None
    ) -> bytes:
        """``spaces/NAME/vmas/START-END``: ``read_virt`` at ``vma.start + offset``,
        cut at the VMA's end."""
        length = max(0, min(length, len(vma) - offset))
        return self.read_virt(name, vma.start + offset, length, uid)

    @_locked
    def write_vma(
        self, name: str, vma: Vma, offset: int, data: bytes, uid: int | None = None
    ) -> None:
        """``write_virt`` at ``vma.start + offset``; ENOSPC past the VMA's end."""
        if offset + len(data) > len(vma):
            fail(
                errno.ENOSPC,
                f"{vma.start + offset:#x}+{len(data):#x} reaches past the end of the VMA "
                f"{proc.vma_name(vma)}",
            )
        self.write_virt(name, vma.start + offset, data, uid)

    @_locked
    def pagemap(self, name: str, offset: int, length: int, uid: int | None = None) -> bytes:
        return proc.pagemap(self.kernel, self._space_for(name, uid), offset, length)

    @_locked
    def cr3(self, name: str, uid: int | None = None) -> int:
        return self._space_for(name, uid).pgd

    @_locked
    def flush_tlb(self, name: str, uid: int | None = None) -> None:
        memory.flush_tlb_mm(self.kernel, self._space_for(name, uid))

    @_locked
    def ptdump(self, name: str, uid: int | None = None) -> str:
        return ptdump_mm(self.kernel, self._space_for(name, uid))

    @_locked
    def ptdump_kernel(self) -> str:
        return ptdump_kernel(self.kernel)

    # --- mm/ ----------------------------------------------------------------

    @_locked
    def vmstat(self) -> str:
        return proc.vmstat_text(self.kernel)

    @_locked
    def vmstat_counts(self) -> dict[str, int]:
        """``mm/vmstat`` as numbers (gauges and counters), for scripts and benchmarks."""
        return proc.vmstat(self.kernel)

    @_locked
    def meminfo(self) -> str:
        """``mm/meminfo``, in the format of /proc/meminfo."""
        return proc.meminfo(self.kernel)

    @_locked
    def free_pools(self) -> str:
        return self.kernel.free_pools()

    @property
    def keyid_free_pools(self) -> bool:
        return self.kernel.keyid_free_pools()

    @keyid_free_pools.setter
    def keyid_free_pools(self, on: bool) -> None:
        with self._lock:
            self.kernel.set_keyid_free_pools(bool(on))

    @_locked
    def mitigation(self, name: str) -> bool:
        return self.kernel.mitigation(name)

    @_locked
    def set_mitigation(self, name: str, on: bool) -> None:
        self.kernel.set_mitigation(name, bool(on))

    @_locked
    def ksm_run(self) -> int:
        return ksm.ksm_do_scan(self.kernel)

    @_locked
    def ksm_stats(self) -> dict[str, int]:
        """The files of ``mm/ksm/`` and their values."""
        return ksm.ksm_sysfs(self.kernel)

    @_locked
    def khugepaged_scan(self) -> int:
        return khugepaged.khugepaged_scan(self.kernel)

    @_locked
    def khugepaged_stats(self) -> dict[str, int]:
        """The files of ``mm/khugepaged/`` and their values."""
        return khugepaged.khugepaged_sysfs(self.kernel)

    @_locked
    def kpageflags(self, offset: int, length: int) -> bytes:
        return proc.kpageflags(self.kernel, offset, length)

    @_locked
    def kpagecount(self, offset: int, length: int) -> bytes:
        return proc.kpagecount(self.kernel, offset, length)

    @_locked
    def page_keyid(self, offset: int, length: int) -> bytes:
        return proc.page_keyid(self.kernel, offset, length)

    @_locked
    def numa_maps(self, name: str, uid: int | None = None) -> str:
        return proc.numa_maps(self.kernel, self._space_for(name, uid))

    @_locked
    def compact_memory(self) -> int:
        """``mm/compact_memory``: compact every node; the pages moved."""
        return migrate.compact_memory(self.kernel)

    @_locked
    def read_swap(self, offset: int, length: int) -> bytes:
        """``swap``: the swap partition's bytes, header page first (a disk, like ``dram``)."""
        if offset < 0:
            fail(errno.EINVAL, f"swap offset {offset:#x} is negative")
        return self.kernel.swap.read(offset, length)

    @property
    def swap_size(self) -> int:
        return self.kernel.swap.size

    @_locked
    def swaps(self) -> str:
        return proc.swaps(self.kernel)

    @property
    def swap_encryption(self) -> bool:
        """Encrypted swap (dm-crypt ``aes-xts-plain64``, the device's own key) for
        the slots written from now on."""
        return self.kernel.swap.swap_encryption

    @swap_encryption.setter
    def swap_encryption(self, on: bool) -> None:
        with self._lock:
            self.kernel.swap.swap_encryption = bool(on)
            self.kernel.log.printk(f"swap: encryption {'on' if on else 'off'} for new slots")

    @_locked
    def check(self) -> list[str]:
        return check.check(self.kernel)

    @_locked
    def keyid_map_svg(self) -> str:
        """``mm/keyid_map.svg``: every physical page as a cell coloured by its KeyID."""
        return keyid_map.render_svg(keyid_map.keyid_map(self.kernel))

    # --- hw/ ----------------------------------------------------------------

    @_locked
    def rdmsr(self, addr: int) -> int:
        return self.platform.rdmsr(addr)

    @_locked
    def read_msr_file(self, addr: int, size: int) -> bytes:
        """``hw/msr`` as /dev/cpu/0/msr: 8-byte reads at offset = MSR number."""
        if size % 8:
            fail(errno.EINVAL, "MSRs are read 8 bytes at a time")
        return self.platform.rdmsr(addr).to_bytes(8, "little") * (size // 8)

    @_locked
    def tme_text(self) -> str:
        """The MSRs decoded, then the address layout the kernel derived from them."""
        return self.kernel.tme_text()

    @_locked
    def cache_stats(self) -> str:
        return self.platform.cache_stats()

    @_locked
    def cache_command(self, command: str | bytes) -> None:
        cmd = parse_cache_command(decode_command(command, "cache"))
        if isinstance(cmd, Wbinvd):
            self.platform.wbinvd()
            return
        self._check_keyid(cmd.keyid)
        if cmd.pa >= self.phys_mem:
            fail(
                errno.EINVAL, f"clflush: {cmd.pa:#x} is beyond physical memory ({self.phys_mem:#x})"
            )
        self.platform.clflush(cmd.pa, cmd.keyid)

    # --- snapshots ------------------------------------------------------------

    @_locked
    def snapshot(self, path: str | os.PathLike[str] | None = None) -> bytes:
        """The whole machine as a snapshot (docs/api.md "Snapshots"), also written to
        ``path`` (mode 0600) when given. It holds every key: keep it secret."""
        data = snapshots.encode(self.config, snapshots.capture(self.platform, self.kernel))
        if path is not None:
            snapshots.write_file(path, data)
        return data

    @_locked
    def restore(self, source: bytes | str | os.PathLike[str], coldboot: bool = False) -> None:
        """Become the machine of a snapshot (bytes, or a file's path); ``coldboot``:
        keep only its DRAM and boot afresh. EINVAL, changing nothing, for anything
        but a snapshot of a machine configured like this one."""
        data = source if isinstance(source, bytes) else snapshots.read_file(source, self.config)
        self.platform, self.kernel = snapshots.boot(
            self.config, snapshots.decode(data), coldboot, self.owner_uid
        )

    @_locked
    def snapshot_command(self, command: str | bytes, uid: int) -> None:
        """``mm/snapshot``: ``save PATH``, ``restore PATH``, ``coldboot PATH`` (root only)."""
        if uid != 0:
            fail(
                errno.EACCES, f"snapshot: only root may save or restore the machine, not uid {uid}"
            )
        cmd = parse_snapshot_command(decode_command(command, "snapshot"))
        if cmd.op == "save":
            self.snapshot(cmd.path)
        else:
            self.restore(cmd.path, coldboot=cmd.op == "coldboot")


def _vmas_added(mm: MmStruct, cmd: SpaceCommand) -> int:
    """The most VMAs ``cmd`` can add to ``mm``, counted as Linux counts them
    against ``vm.max_map_count``: the VMAs a change splits, the hole a munmap
    cuts, the VMA an mmap makes, a moving mremap's room for 3."""
    match cmd:
        case Mmap():
            return 1 + mmap.vmas_holed(mm, cmd.addr, cmd.addr + cmd.length)
        case Munmap():
            return mmap.vmas_holed(mm, cmd.addr, cmd.addr + cmd.length)
        case Mremap() if cmd.new_addr is not None:
            return 3
        case Mremap() if cmd.new_len < cmd.old_len:  # unmaps the tail: a hole inside?
            return mmap.vmas_holed(mm, cmd.addr + cmd.new_len, cmd.addr + cmd.old_len)
        case (
            Mprotect() | EncryptMprotect() | Madvise() | Mlock() | Munlock() | Mbind()
            | UffdRegister() | UffdUnregister()
        ):  # fmt: skip
            return mmap.vmas_cut(mm, cmd.addr, cmd.addr + cmd.length)
    return 0
