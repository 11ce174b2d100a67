"""mmap, munmap, mprotect, encrypt_mprotect, madvise: what they do, and every
rejection with its errno, leaving the address space exactly as it was."""

from __future__ import annotations

import errno

import pytest

from kernel_helpers import PAGE, U, cpu_key, ctl, machine, pfn_of, smaps_keyids, space, vmstat
from mktme_sandbox import Machine, SandboxError


def rejects(m: Machine, command: str, err: int, uid: int = 0) -> SandboxError:
    before = (m.maps("a"), m.smaps("a"), m.vmstat())
    with pytest.raises(SandboxError) as info:
        ctl(m, "a", command, uid=uid)
    assert info.value.errno == err, info.value
    assert (m.maps("a"), m.smaps("a")) == before[:2], "half-applied"
    assert m.check() == []
    return info.value


# --- what the calls do -----------------------------------------------------------


def test_mmap_shows_in_maps_in_the_proc_format(m: Machine) -> None:
    ctl(m, "a", f"mmap {U:#x} 8K rw- keyid=1")
    assert m.maps("a") == f"{U:08x}-{U + 2 * PAGE:08x} rw-p 00000000 00:00 0 \n"


def test_mmap_populate_faults_every_page_for_write(m: Machine) -> None:
    ctl(m, "a", f"mmap {U:#x} 16K rw- keyid=1 populate")
    assert vmstat(m)["mktme_pgfault_write"] == 4
    assert "Rss:                  16 kB" in m.smaps("a")


def test_munmap_of_the_middle_splits_the_vma_and_frees_its_page(m: Machine) -> None:
    ctl(m, "a", f"mmap {U:#x} 12K rw- keyid=1 populate")
    freed = vmstat(m)["pgfree"]
    ctl(m, "a", f"munmap {U + PAGE:#x} 4K")
    assert len(m.maps("a").splitlines()) == 2
    assert vmstat(m)["pgfree"] == freed + 1
    with pytest.raises(SandboxError) as info:
        m.read_virt("a", U + PAGE, 1)
    assert info.value.errno == errno.EIO


def test_mprotect_of_part_of_a_vma_splits_it_and_merges_back(m: Machine) -> None:
    ctl(m, "a", f"mmap {U:#x} 12K rw- keyid=1")
    ctl(m, "a", f"mprotect {U + PAGE:#x} 4K r--")
    assert [line.split()[1] for line in m.maps("a").splitlines()] == ["rw-p", "r--p", "rw-p"]
    ctl(m, "a", f"mprotect {U + PAGE:#x} 4K rw-")
    assert len(m.maps("a").splitlines()) == 1


def test_write_to_a_read_only_mapping_is_eio_and_read_works(m: Machine) -> None:
    ctl(m, "a", f"mmap {U:#x} 4K r-- keyid=1")
    assert m.read_virt("a", U, 4) == bytes(4)
    with pytest.raises(SandboxError) as info:
        m.write_virt("a", U, b"x")
    assert info.value.errno == errno.EIO


def test_prot_none_refuses_reads_and_keeps_the_data_for_later(m: Machine) -> None:
    ctl(m, "a", f"mmap {U:#x} 4K rw- keyid=1")
    m.write_virt("a", U, b"kept")
    ctl(m, "a", f"mprotect {U:#x} 4K ---")
    with pytest.raises(SandboxError):
        m.read_virt("a", U, 4)
    ctl(m, "a", f"mprotect {U:#x} 4K rw-")
    assert m.read_virt("a", U, 4) == b"kept"
    assert m.check() == []


def test_encrypt_mprotect_changes_the_keyid_and_discards_the_data(m: Machine) -> None:
    ctl(m, "a", f"mmap {U:#x} 8K rw- keyid=1")
    m.write_virt("a", U, b"old data")
    ctl(m, "a", f"encrypt_mprotect {U:#x} 4K rw- keyid=2")
    assert smaps_keyids(m, "a") == [2, 1]
    assert m.read_virt("a", U, 8) == bytes(8)
    assert m.check() == []


def test_madvise_dontneed_drops_the_pages_and_the_next_read_sees_zeros(m: Machine) -> None:
    ctl(m, "a", f"mmap {U:#x} 4K rw- keyid=1")
    m.write_virt("a", U, b"gone")
    ctl(m, "a", f"madvise {U:#x} 4K dontneed")
    assert m.read_virt("a", U, 4) == bytes(4)


def test_madvise_mergeable_and_hugepage_show_in_vmflags(m: Machine) -> None:
    ctl(m, "a", f"mmap {U:#x} 2M rw-")
    ctl(m, "a", f"madvise {U:#x} 2M mergeable")
    ctl(m, "a", f"madvise {U:#x} 2M hugepage")
    assert "VmFlags: rd wr mr mw me ac hg mg \n" in m.smaps("a")
    ctl(m, "a", f"madvise {U:#x} 2M unmergeable")
    assert "VmFlags: rd wr mr mw me ac hg \n" in m.smaps("a")


def test_reads_and_writes_cross_pages_and_vmas(m: Machine) -> None:
    ctl(m, "a", f"mmap {U:#x} 4K rw- keyid=1")
    ctl(m, "a", f"mmap {U + PAGE:#x} 4K rw- keyid=2")
    data = bytes(range(256)) * 20
    m.write_virt("a", U + 100, data)
    assert m.read_virt("a", U + 100, len(data)) == data


def test_destroying_a_space_frees_every_page_and_table(m: Machine) -> None:
    base = vmstat(m)
    ctl(m, "a", f"mmap {U:#x} 64K rw- keyid=1 populate")
    m.destroy_space("a", uid=0)
    after = vmstat(m)
    pgd = 1  # allocated with the space, before `base`
    assert (
        after["pgfree"] - base["pgfree"] == after["pgalloc_normal"] - base["pgalloc_normal"] + pgd
    )
    assert m.kernel.pages_of(1) == 0


def test_physical_memory_exhaustion_is_enomem_and_undoes_the_mmap() -> None:
    m = machine(phys_mem="4M")
    space(m)
    with pytest.raises(SandboxError) as info:
        ctl(m, "a", f"mmap {U:#x} 8M rw- populate")
    assert info.value.errno == errno.ENOMEM
    assert m.maps("a") == ""
    assert m.check() == []


# --- rejections --------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        "",
        "mmap",
        "mmap 0x10000000",
        "mmap 10000000 4K rw-",  # ADDR must be hex
        "mmap 0x1000000g 4K rw-",
        "mmap 0x10000001 4K rw-",  # unaligned
        "mmap 0x10000000 0 rw-",
        "mmap 0x10000000 4K rwz",
        "mmap 0x10000000 4K rw- keyid=x",
        "mmap 0x10000000 4K rw- colour=red",
        "mmap 0x10000000 4K rw- populate populate",
        "mmap 0x10000000 4Q rw-",
        "munmap 0x10000000 4K extra",
        "mprotect 0x10000000 4K rw- keyid=1",
        "encrypt_mprotect 0x10000000 4K rw-",
        "madvise 0x10000000 4K sometimes",
        "frobnicate 0x10000000 4K",
        "mmap 0x10000000 4K rw-\nmunmap 0x10000000 4K",
    ],
)
def test_malformed_commands_are_einval(m: Machine, command: str) -> None:
    ctl(m, "a", f"mmap {U:#x} 4K rw- keyid=1")
    with pytest.raises(SandboxError) as info:
        m.space_command("a", command, uid=0)
    assert info.value.errno == errno.EINVAL
    assert info.value.reason


@pytest.mark.parametrize(
    "command",
    [
        f"mremap {U:#x} 4K 8K {U + 0x100000:#x} extra",  # one word past NEWADDR
        f"mmap {U + PAGE:#x} 4K rw- populate=1",  # populate takes no value
        f"mmap {U + PAGE:#x} 4K rw- populate populate",  # repeated
        f"mmap {U + PAGE:#x} 4K rw- keyid=1 keyid=1",  # repeated, however alike
        f"mbind {U:#x} 4K 0-",  # a range without its end
        f"migrate {U:#x} 4K 0 1",  # NODE is one node
        "fork b c",  # one CHILD
    ],
)
def test_a_word_too_many_or_an_option_misspelt_is_einval_and_changes_nothing(
    m: Machine, command: str
) -> None:
    """docs/spec.md 7: "a malformed command: unknown word, missing or repeated
    argument, bad number ... EINVAL", against the usage lines of 4.4
    (``mremap OLD OLDLEN NEWLEN [NEWADDR]``, ``mmap ADDR LEN PROT [keyid=N]
    [populate]``, ``mbind ADDR LEN NODES`` with NODES ``N, N,M or N-M``,
    ``migrate ADDR LEN NODE``, ``fork CHILD``): a word left over is not ignored."""
    ctl(m, "a", f"mmap {U:#x} 4K rw- keyid=1")
    rejects(m, command, errno.EINVAL)
    assert m.space_names() == ["a"]


def test_mmap_over_an_existing_mapping_is_einval(m: Machine) -> None:
    ctl(m, "a", f"mmap {U:#x} 8K rw-")
    rejects(m, f"mmap {U + PAGE:#x} 8K rw-", errno.EINVAL)


def test_mmap_outside_the_user_address_space_is_enomem(m: Machine) -> None:
    rejects(m, "mmap 0x7ffffffff000 8K rw-", errno.ENOMEM)
    rejects(m, "mmap 0x1000 4K rw-", errno.ENOMEM)  # below mmap_min_addr


def test_mmap_with_an_unprogrammed_keyid_is_enokey(m: Machine) -> None:
    rejects(m, f"mmap {U:#x} 4K rw- keyid=3", errno.ENOKEY)


def test_mmap_with_a_keyid_the_machine_lacks_is_einval(m: Machine) -> None:
    rejects(m, f"mmap {U:#x} 4K rw- keyid=64", errno.EINVAL)


def test_mmap_with_a_cleared_keyid_is_enokey(m: Machine) -> None:
    m.key_command(2, "type=clear", uid=0)
    rejects(m, f"mmap {U:#x} 4K rw- keyid=2", errno.ENOKEY)


def test_mprotect_and_madvise_over_a_hole_are_enomem_and_change_nothing(m: Machine) -> None:
    ctl(m, "a", f"mmap {U:#x} 4K rw-")
    ctl(m, "a", f"mmap {U + 2 * PAGE:#x} 4K rw-")
    rejects(m, f"mprotect {U:#x} 12K r--", errno.ENOMEM)
    rejects(m, f"madvise {U:#x} 12K dontneed", errno.ENOMEM)
    rejects(m, f"encrypt_mprotect {U:#x} 12K rw- keyid=1", errno.ENOMEM)


def test_encrypt_mprotect_with_an_unprogrammed_keyid_is_enokey_and_keeps_data(m: Machine) -> None:
    ctl(m, "a", f"mmap {U:#x} 4K rw- keyid=1")
    m.write_virt("a", U, b"still here")
    rejects(m, f"encrypt_mprotect {U:#x} 4K rw- keyid=5", errno.ENOKEY)
    assert m.read_virt("a", U, 10) == b"still here"


def test_a_zero_length_encrypt_mprotect_still_checks_its_keyid(m: Machine) -> None:
    """The encrypt_mprotect() system call of the MKTME key-service series looks
    its key up (``lookup_user_key()``) before ``do_mprotect_ext()`` sees the
    length: an aligned zero length does nothing, but only with a KeyID the
    caller may use (docs/spec.md 3.7: ENOKEY for one never programmed)."""
    ctl(m, "a", f"encrypt_mprotect {U:#x} 0 rw- keyid=1")
    rejects(m, f"encrypt_mprotect {U:#x} 0 rw- keyid=5", errno.ENOKEY)
    m.key_command(5, "type=cpu algorithm=aes-xts-128", uid=1000)  # another user's KeyID
    m.create_space("mine", 2000)
    with pytest.raises(SandboxError) as info:
        ctl(m, "mine", f"encrypt_mprotect {U:#x} 0 rw- keyid=5", uid=2000)
    assert info.value.errno == errno.EACCES


def test_encrypt_mprotect_sets_the_new_protection_not_the_union(m: Machine) -> None:
    """docs/spec.md 3.3: "``encrypt_mprotect`` changes protection and KeyID
    together" (do_mprotect_ext(): ``newflags = calc_vm_prot_bits(prot) |
    (vma->vm_flags & ~mask)``, the old access bits cleared first)."""
    ctl(m, "a", f"mmap {U:#x} 4K rw- keyid=1")
    ctl(m, "a", f"encrypt_mprotect {U:#x} 4K r-- keyid=2")
    assert " r--p " in m.maps("a")
    with pytest.raises(SandboxError) as info:
        m.write_virt("a", U, b"x")
    assert info.value.errno == errno.EIO


def test_another_users_space_is_eacces(m: Machine) -> None:
    rejects(m, f"mmap {U:#x} 4K rw-", errno.EACCES, uid=1000)
    with pytest.raises(SandboxError) as info:
        m.destroy_space("a", uid=1000)
    assert info.value.errno == errno.EACCES


def test_access_outside_any_mapping_is_eio(m: Machine) -> None:
    with pytest.raises(SandboxError) as info:
        m.read_virt("a", U, 1)
    assert info.value.errno == errno.EIO


def test_a_write_that_runs_into_a_hole_writes_nothing(m: Machine) -> None:
    ctl(m, "a", f"mmap {U:#x} 4K rw-")
    with pytest.raises(SandboxError):
        m.write_virt("a", U + PAGE - 2, b"abcd")
    assert m.read_virt("a", U + PAGE - 2, 2) == bytes(2)


def test_space_names_are_checked_and_unique(m: Machine) -> None:
    for bad in ("", "a/b", ".hidden", "x" * 65, "sp ace"):
        with pytest.raises(SandboxError) as info:
            m.create_space(bad, uid=0)
        assert info.value.errno == errno.EINVAL
    with pytest.raises(SandboxError) as info:
        m.create_space("a", uid=0)
    assert info.value.errno == errno.EEXIST


def test_pages_of_different_keyids_never_share_a_frame(m: Machine) -> None:
    ctl(m, "a", f"mmap {U:#x} 4K rw- keyid=1 populate")
    ctl(m, "a", f"mmap {U + PAGE:#x} 4K rw- keyid=2 populate")
    assert pfn_of(m, "a", U) != pfn_of(m, "a", U + PAGE)


def test_a_read_stops_short_at_a_hole_like_proc_pid_mem(m: Machine) -> None:
    ctl(m, "a", f"mmap {U:#x} 4K rw-")
    m.write_virt("a", U + PAGE - 3, b"end")
    assert m.read_virt("a", U + PAGE - 3, 100) == b"end"


def test_mapping_another_users_key_is_eacces(m: Machine) -> None:
    cpu_key(m, 3, uid=1000)
    m.create_space("b", uid=2000)
    for command in (f"mmap {U:#x} 4K rw- keyid=3",):
        with pytest.raises(SandboxError) as info:
            ctl(m, "b", command, uid=2000)
        assert info.value.errno == errno.EACCES
    ctl(m, "b", f"mmap {U:#x} 4K rw-", uid=2000)
    with pytest.raises(SandboxError) as info:
        ctl(m, "b", f"encrypt_mprotect {U:#x} 4K rw- keyid=3", uid=2000)
    assert info.value.errno == errno.EACCES
    m.create_space("c", uid=1000)
    ctl(m, "c", f"mmap {U:#x} 4K rw- keyid=3", uid=1000)


def test_the_name_kernel_is_reserved_for_the_direct_mappings(m: Machine) -> None:
    with pytest.raises(SandboxError) as info:
        m.create_space("kernel", uid=0)
    assert info.value.errno == errno.EINVAL


def test_a_populate_larger_than_memory_is_refused_before_any_fault(m: Machine) -> None:
    faults = vmstat(m)["pgfault"]
    with pytest.raises(SandboxError) as info:
        ctl(m, "a", "mmap 0x100000000000 0x100000000000 r-- populate")  # 16 TiB
    assert info.value.errno == errno.ENOMEM
    assert vmstat(m)["pgfault"] == faults
    assert m.maps("a") == ""


def test_zero_length_mprotect_and_madvise_succeed_doing_nothing_as_in_linux(m: Machine) -> None:
    before = m.maps("a")
    ctl(m, "a", f"mprotect {U:#x} 0 r--")
    ctl(m, "a", f"madvise {U:#x} 0 dontneed")
    assert m.maps("a") == before
    with pytest.raises(SandboxError) as info:
        ctl(m, "a", f"mmap {U:#x} 0 rw-")  # but a zero-length mmap is EINVAL
    assert info.value.errno == errno.EINVAL


def test_unmerging_beyond_the_owners_page_limit_is_enomem_and_breaks_no_ksm_page() -> None:
    """mm/ksm.c unmerge_ksm_pages() breaks each KSM page with a charged
    copy (``break_ksm()`` -> ``do_wp_page()``): when the owner's limit cannot
    cover them all, ENOMEM before the first one, never half unmerged."""
    m = machine(max_pages_per_uid=64)
    space(m, "u", uid=1000)
    ctl(m, "u", f"mmap {U:#x} 64K rw-", uid=1000)
    for page in range(U, U + (64 << 10), PAGE):
        m.write_virt("u", page, b"same", uid=1000)
    ctl(m, "u", f"madvise {U:#x} 64K mergeable", uid=1000)
    assert m.ksm_run() == 15
    ctl(m, "u", f"mmap {2 * U:#x} 1M rw-", uid=1000)
    with pytest.raises(SandboxError):
        m.write_virt("u", 2 * U, bytes(1 << 20), uid=1000)  # up to the limit
    ctl(m, "u", f"munmap {2 * U:#x} 16K", uid=1000)  # 4 pages back: fewer than 15
    with pytest.raises(SandboxError) as refused:
        ctl(m, "u", f"madvise {U:#x} 64K unmergeable", uid=1000)
    assert refused.value.errno == errno.ENOMEM
    assert m.ksm_stats()["pages_sharing"] == 15
    assert m.check() == []


@pytest.fixture
def map_count_of_8(monkeypatch: pytest.MonkeyPatch) -> None:
    from mktme_sandbox.kernel import mmap

    monkeypatch.setattr(mmap, "MAX_MAP_COUNT", 8)


def mappings_to_the_limit(m: Machine, a: str) -> None:
    """Eight 12K mappings that cannot merge (their protections alternate)."""
    for i in range(8):
        ctl(m, a, f"mmap {U + 3 * i * PAGE:#x} 12K {'rw-' if i % 2 else 'r--'}")
    assert len(m.maps(a).splitlines()) == 8


def test_the_map_count_limit_is_linuxs_default() -> None:
    """include/linux/mm.h: ``#define MAPCOUNT_ELF_CORE_MARGIN (5)``,
    ``#define DEFAULT_MAX_MAP_COUNT (USHRT_MAX - MAPCOUNT_ELF_CORE_MARGIN)``:
    what /proc/sys/vm/max_map_count reads on a fresh Linux."""
    from mktme_sandbox.kernel import mmap

    assert mmap.MAX_MAP_COUNT == 65535 - 5


@pytest.mark.usefixtures("map_count_of_8")
@pytest.mark.parametrize(
    "command",
    [
        f"mmap {U + 64 * PAGE:#x} 4K rw-",  # do_mmap(): "Too many mappings?"
        f"munmap {U + 4 * PAGE:#x} 4K",  # do_munmap(): a hole inside one VMA
        f"mremap {U + 3 * PAGE:#x} 8K 4K",  # the tail it unmaps is a hole in the VMA
        f"mprotect {U + 3 * PAGE:#x} 4K r--",  # split_vma()
        f"madvise {U + PAGE:#x} 4K hugepage",  # split twice
        f"mremap {U + 21 * PAGE:#x} 12K 12K {U + 128 * PAGE:#x}",  # move_vma(): room for 3
    ],
)
def test_a_command_past_the_map_count_is_enomem_and_changes_nothing(command: str) -> None:
    """mm/mmap.c: do_mmap() ``if (mm->map_count > sysctl_max_map_count)
    return -ENOMEM;``, __split_vma() ``if (mm->map_count >=
    sysctl_max_map_count) return -ENOMEM;`` (do_munmap() and mprotect split
    through it), mm/mremap.c move_vma() ``if (mm->map_count >=
    sysctl_max_map_count - 3) return -ENOMEM;``. A space cannot grow its
    VMA list, the daemon's memory, without bound."""
    m = machine()
    a = space(m)
    mappings_to_the_limit(m, a)
    maps = m.maps(a)
    with pytest.raises(SandboxError, match="max_map_count") as refused:
        ctl(m, a, command)
    assert refused.value.errno == errno.ENOMEM
    assert m.maps(a) == maps
    assert m.check() == []


@pytest.mark.usefixtures("map_count_of_8")
def test_an_unaligned_command_at_the_map_count_is_einval_as_before() -> None:
    """The count is checked after the address checks (do_munmap():
    ``if ((offset_in_page(start)) ...) return -EINVAL;`` comes first)."""
    m = machine()
    a = space(m)
    mappings_to_the_limit(m, a)
    with pytest.raises(SandboxError) as refused:
        ctl(m, a, f"munmap {U + PAGE + 1024:#x} 4K")
    assert refused.value.errno == errno.EINVAL


@pytest.mark.usefixtures("map_count_of_8")
def test_a_space_at_the_map_count_can_still_unmap_whole_mappings() -> None:
    """do_munmap() checks the count only when it cuts a hole in one VMA:
    unmapping whole VMAs, or the head or tail of one, goes on at the limit
    (``let map_count go just above its limit temporarily, to help free
    resources as expected``), after which a mapping may be added."""
    m = machine()
    a = space(m)
    mappings_to_the_limit(m, a)
    ctl(m, a, f"munmap {U + 3 * PAGE:#x} 4K")  # VMA 1's head
    ctl(m, a, f"mremap {U + 4 * PAGE:#x} 8K 4K")  # VMA 1's tail
    ctl(m, a, f"munmap {U:#x} 12K")  # VMA 0 whole
    ctl(m, a, f"mmap {U + 64 * PAGE:#x} 4K rw-")
    assert len(m.maps(a).splitlines()) == 8
    assert m.check() == []


@pytest.mark.usefixtures("map_count_of_8")
def test_a_users_spaces_together_hold_at_most_the_map_count() -> None:
    """docs/spec.md 8: the limit binds a user's spaces together (else a user
    could grow the daemon's VMA lists without bound, one space after another,
    each of them charged one page only), and ``fork`` copies every VMA of its
    parent; root and the daemon's user are bounded per space only."""
    m = machine()
    for name in ("one", "two", "three"):
        m.create_space(name, 1000)
    for i in range(5):
        ctl(m, "one", f"mmap {U + 2 * i * PAGE:#x} 4K r--", uid=1000)
    for i in range(3):
        ctl(m, "two", f"mmap {U + 2 * i * PAGE:#x} 4K r--", uid=1000)
    maps = m.maps("two")
    with pytest.raises(SandboxError, match="max_map_count") as refused:
        ctl(m, "two", f"mmap {U + 64 * PAGE:#x} 4K r--", uid=1000)
    assert refused.value.errno == errno.ENOMEM
    assert m.maps("two") == maps
    with pytest.raises(SandboxError, match="max_map_count") as refused:
        ctl(m, "two", "fork child", uid=1000)
    assert refused.value.errno == errno.ENOMEM
    assert "child" not in m.space_names()
    ctl(m, "one", f"munmap {U:#x} 4K", uid=1000)  # one VMA fewer: room for one
    ctl(m, "three", f"mmap {U:#x} 4K r--", uid=1000)
    for name in ("root1", "root2"):  # root: 8 a space, as many spaces as it likes
        m.create_space(name, 0)
        for i in range(8):
            ctl(m, name, f"mmap {U + 2 * i * PAGE:#x} 4K r--")
    assert m.check() == []


@pytest.mark.parametrize(
    ("command", "reason"),
    [
        (f"mmap {U:#x} 4K rw-".ljust(4097), "at most 4096 bytes"),  # one byte too many
        (f"mmap {U:#x} 4K rw-\nmunmap {U:#x} 4K", "one command per write"),
        (f"mmap {U:#x} 4K rw-\0", "one command per write"),
    ],
)
def test_a_write_is_one_command_of_at_most_4096_bytes(command: str, reason: str) -> None:
    """docs/spec.md 4.4: "One write is one command of at most 4096 bytes";
    a longer one is refused whole, as are two lines in one write (the kernel
    splits a long write into requests, and none may become a command of its
    own)."""
    m = machine()
    a = space(m)
    with pytest.raises(SandboxError, match=reason) as refused:
        ctl(m, a, command)
    assert refused.value.errno == errno.EINVAL
    assert m.maps(a) == ""
    ctl(m, a, f"mmap {U:#x} 4K rw-".ljust(4096))  # 4096 bytes: one command
    assert m.maps(a) != ""


def test_a_vma_file_write_stops_at_the_vmas_end_even_with_a_neighbour_behind() -> None:
    """docs/spec.md 4.3, ``spaces/NAME/vmas/START-END``: a write past the
    VMA's end is ENOSPC, also by one byte, and also when the next VMA begins
    right there (its memory would take the byte): nothing is written."""
    m = machine()
    a = space(m)
    ctl(m, a, f"mmap {U:#x} 4K rw-")
    ctl(m, a, f"mmap {U + PAGE:#x} 4K rw- keyid=0")
    cpu_key(m, 1)
    ctl(m, a, f"encrypt_mprotect {U + PAGE:#x} 4K rw- keyid=1")  # a neighbour that never merges
    first = m.vmas(a)[f"{U:08x}-{U + PAGE:08x}"]
    m.write_vma(a, first, 0, b"a" * PAGE)  # to the end: fine
    with pytest.raises(SandboxError) as refused:
        m.write_vma(a, first, 0, b"b" * (PAGE + 1))
    assert refused.value.errno == errno.ENOSPC
    assert m.read_virt(a, U, PAGE) == b"a" * PAGE
    assert m.read_virt(a, U + PAGE, 1) == b"\0"


def test_a_populate_one_page_beyond_free_memory_is_refused_before_any_fault() -> None:
    """``check_populate`` (docs/spec.md 3.3): ENOMEM up front when the pages
    and tables a populate may need (one table per 2 MiB, plus two) are more
    than the free pages, by one page too; exactly as many goes ahead."""
    m = machine(phys_mem="16M", swap=0)
    a = space(m)
    free = sum(m.kernel.alloc.free_pages_by_keyid().values())

    def wanted(n: int) -> int:
        return n + -(-n // 512) + 2

    over = next(n for n in range(free, 0, -1) if wanted(n) == free + 1)
    faults = vmstat(m)["pgfault"]
    with pytest.raises(SandboxError, match="populate needs") as refused:
        ctl(m, a, f"mmap {U:#x} {over * PAGE} rw- populate")
    assert refused.value.errno == errno.ENOMEM
    assert vmstat(m)["pgfault"] == faults
    assert m.maps(a) == ""
    fits = next(n for n in range(free, 0, -1) if wanted(n) == free)
    ctl(m, a, f"mmap {U:#x} {fits * PAGE} rw- populate")
    assert m.check() == []
