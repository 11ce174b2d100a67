"""Every file of docs/spec.md section 4, through the shell tools a user would use.

One mount for the module (16 MiB, seed 1). Each test drives the files with
cat, dd, xxd, cmp, echo, mkdir, rmdir, stat in bash and checks what a user
would see; state a test needs (a key, a space) is set up by that test under
names no other test uses.
"""

from __future__ import annotations

import os
import re
import shlex
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from mktme_sandbox.machine import Machine
from mktme_sandbox.mounting import MountedSandbox

pytestmark = pytest.mark.mount

PHYS_MEM = 16 << 20
BASE = 0x10000000
USER_SPACE_END = 0x800000000000


@pytest.fixture(scope="module")
def sandbox(module_mount: Callable[..., MountedSandbox]) -> MountedSandbox:
    return module_mount(phys_mem="16M", seed=1)


def nr_keyids(sandbox: MountedSandbox) -> int:
    return len(os.listdir(sandbox.path / "keys"))


def stat_line(bash: Callable[[str], str], path: str) -> str:
    return bash(f"stat -c '%a %u %s' -- {path}").strip()


def new_space(bash: Callable[[str], str], name: str, keyid: int, length: str = "16K") -> None:
    bash(
        f"mkdir spaces/{name} && echo 'mmap {BASE:#x} {length} rw- keyid={keyid} populate' > spaces/{name}/ctl"
    )


def pfn_of(bash: Callable[[str], str], space: str, addr: int) -> int:
    raw = bash(
        f"dd if=spaces/{space}/pagemap bs=8 count=1 skip={addr // 4096} status=none | xxd -p"
    )
    entry = int.from_bytes(bytes.fromhex(raw.strip()), "little")
    assert entry >> 63 == 1, "the page is not present"
    return entry & ((1 << 55) - 1)


# -- the root -------------------------------------------------------------------------


def test_root_lists_exactly_the_entries_of_the_spec(bash: Callable[[str], str]) -> None:
    assert bash("ls").split() == [
        "README",
        "dmesg",
        "dram",
        "hw",
        "keyids",
        "keys",
        "mm",
        "pagetables",
        "spaces",
        "swap",
    ]


def test_readme_is_a_guide_naming_every_top_level_entry(bash: Callable[[str], str]) -> None:
    readme = bash("cat README")
    for name in (
        "dmesg",
        "dram",
        "swap",
        "keys/N",
        "keyids/N/mem",
        "spaces/",
        "pagetables/",
        "mm/",
        "hw/",
    ):
        assert name in readme
    assert "umount" in readme


def test_the_readme_reports_its_real_size(bash: Callable[[str], str]) -> None:
    assert int(bash("stat -c %s README")) == int(bash("cat README | wc -c")) > 0


@pytest.mark.parametrize("path", ["dmesg", "keys/1", "mm/vmstat", "mm/check", "hw/tme"])
def test_generated_text_files_report_size_0_and_every_reader_reads_them_whole(
    bash: Callable[[str], str], path: str
) -> None:
    assert bash(f"stat -c %s {path}").strip() == "0", "as procfs: stat renders nothing"
    text = bash(f"cat {path}")
    assert text, "the file is not empty"
    assert text.endswith("\n"), "text files end with a newline"
    first = text.splitlines()[0]
    assert bash(f"grep -cxF -- {shlex.quote(first)} {path}").strip() != "0"
    assert bash(f"dd if={path} bs=7 status=none | sed -n 1p").rstrip("\n") == first
    python = f"import pathlib; print(pathlib.Path({path!r}).read_text().splitlines()[0])"
    assert bash(f"python3 -c {shlex.quote(python)}").rstrip("\n") == first
    assert bash(f"tail -c 1 {path} | xxd -p").strip() == "0a"


def test_a_text_file_read_in_small_chunks_is_one_snapshot(sandbox: MountedSandbox) -> None:
    """seq_file: rendered once at open, so the chunks of one pass never mix two texts."""
    before = (sandbox.path / "mm" / "vmstat").read_bytes()
    with open(sandbox.path / "mm" / "vmstat", "rb", buffering=0) as f:
        first = f.read(16)
        sandbox.create_space("chunks")  # allocates a PGD: the counters change meanwhile
        rest = b"".join(iter(lambda: f.read(16), b""))
    os.rmdir(sandbox.path / "spaces" / "chunks")
    assert first + rest == before
    assert (sandbox.path / "mm" / "vmstat").read_bytes() != before


def test_dmesg_starts_with_the_boot_lines_of_detect_tme(bash: Callable[[str], str]) -> None:
    dmesg = bash("cat dmesg")
    assert "x86/tme: enabled by BIOS" in dmesg
    assert "x86/mktme: 63 KeyIDs available" in dmesg


# -- physical memory ------------------------------------------------------------------


def test_dram_covers_physical_memory_and_is_world_readable(bash: Callable[[str], str]) -> None:
    assert stat_line(bash, "dram") == f"644 0 {PHYS_MEM}"
    assert bash("dd if=dram bs=4096 skip=1 count=2 status=none | wc -c").strip() == "8192"
    assert len(bash("xxd -s 0x1000 -l 64 dram").splitlines()) == 4


def test_reading_past_the_end_of_physical_memory_is_end_of_file(bash: Callable[[str], str]) -> None:
    for path in ("dram", "keyids/0/mem"):
        end = PHYS_MEM // 4096
        assert bash(f"dd if={path} bs=4096 skip={end} count=1 status=none | wc -c").strip() == "0"


def test_every_keyid_has_a_cpu_view_the_size_of_physical_memory(
    bash: Callable[[str], str], sandbox: MountedSandbox
) -> None:
    assert bash("ls keyids").split() == sorted(str(k) for k in range(nr_keyids(sandbox) + 1))
    assert stat_line(bash, "keyids/0/mem") == f"600 0 {PHYS_MEM}"
    assert stat_line(bash, "keyids/5/mem") == f"600 0 {PHYS_MEM}"


def test_a_page_written_through_a_keyid_view_is_the_cpu_view_of_that_page(
    bash: Callable[[str], str], tmp_path: Path
) -> None:
    bash("echo 'type=cpu algorithm=aes-xts-128' > keys/7")
    new_space(bash, "phys", keyid=7)
    pfn = pfn_of(bash, "phys", BASE)
    page = tmp_path / "page"
    page.write_bytes(os.urandom(4096))
    bash(f"dd if={page} of=keyids/7/mem bs=4096 seek={pfn} conv=notrunc status=none")
    bash(f"dd if=keyids/7/mem bs=4096 skip={pfn} count=1 status=none | cmp - {page}")
    bash(f"dd if=spaces/phys/mem bs=4096 skip={BASE // 4096} count=1 status=none | cmp - {page}")
    bash("echo wbinvd > hw/cache")
    in_dram = bash(f"dd if=dram bs=4096 skip={pfn} count=1 status=none | xxd -p | tr -d '\\n'")
    assert bytes.fromhex(in_dram) != page.read_bytes(), "DRAM holds ciphertext"
    bash("rmdir spaces/phys && echo type=clear > keys/7")


# -- keys -----------------------------------------------------------------------------


def test_keys_lists_every_keyid_and_a_free_one_is_writable_by_anyone(
    bash: Callable[[str], str], sandbox: MountedSandbox
) -> None:
    assert sorted(map(int, bash("ls keys").split())) == list(range(1, nr_keyids(sandbox) + 1))
    assert bash("cat keys/3").startswith("keyid=3 state=free")
    assert stat_line(bash, "keys/3").startswith("666 0 ")


def test_a_key_programmed_with_echo_belongs_to_its_writer(bash: Callable[[str], str]) -> None:
    bash("echo 'type=cpu algorithm=aes-xts-256' > keys/2")
    status = bash("cat keys/2")
    assert status.startswith("keyid=2 state=programmed type=cpu algorithm=aes-xts-256 owner=0")
    assert stat_line(bash, "keys/2").startswith("644 0 ")
    bash("echo type=clear > keys/2")
    assert "state=free" in bash("cat keys/2") or "state=cleared" in bash("cat keys/2")


# -- address spaces -------------------------------------------------------------------


def test_a_missing_fault_in_a_uffd_range_is_eagain_until_filled_and_waits_in_uffd(
    bash: Callable[[str], str],
) -> None:
    bash("mkdir spaces/uffd")
    bash("echo 'mmap 0x10000000 8K rw-' > spaces/uffd/ctl")
    bash("echo 'uffd register 0x10000000 8K' > spaces/uffd/ctl")
    read = "dd if=spaces/uffd/mem bs=4 count=1 skip=$((0x10001000)) iflag=skip_bytes status=none"
    assert "Resource temporarily unavailable" in bash(f"{read} 2>&1 || true")
    assert bash("cat spaces/uffd/uffd") == "event=0x12 flags=0x0 address=0x10001000\n"
    bash("echo 'uffd zeropage 0x10001000 4K' > spaces/uffd/ctl")
    assert bash("cat spaces/uffd/uffd") == ""
    assert bash(f"{read} | od -An -tx1").split() == ["00"] * 4
    bash("rmdir spaces/uffd")


def test_mkdir_creates_a_space_with_the_files_of_the_spec(bash: Callable[[str], str]) -> None:
    bash("mkdir spaces/files")
    assert bash("ls spaces/files").split() == [
        "cr3",
        "ctl",
        "maps",
        "mem",
        "numa_maps",
        "pagemap",
        "smaps",
        "smaps_rollup",
        "status",
        "tlb",
        "uffd",
        "vmas",
    ]
    assert stat_line(bash, "spaces/files").startswith("700 0")
    assert stat_line(bash, "spaces/files/mem") == f"600 0 {USER_SPACE_END}"
    assert stat_line(bash, "spaces/files/pagemap") == f"400 0 {8 * (USER_SPACE_END >> 12)}"
    assert stat_line(bash, "spaces").startswith("1777 0")
    bash("rmdir spaces/files")
    assert "files" not in bash("ls spaces").split()
    assert "files" not in bash("ls pagetables").split()


def test_a_shell_inside_a_removed_space_gets_estale_and_leaves_no_dmesg_line(
    bash: Callable[[str], str],
) -> None:
    before = bash("cat dmesg")
    output = bash(
        "top=$PWD && mkdir spaces/gone && cd spaces/gone\n"
        "rmdir $top/spaces/gone && mkdir $top/spaces/gone\n"
        "for f in maps ctl; do cat $f 2>&1 || true; done"
    )
    assert output.splitlines() == ["cat: maps: Stale file handle", "cat: ctl: Stale file handle"]
    assert bash("cat dmesg") == before
    bash("rmdir spaces/gone")


def test_an_mmap_written_to_ctl_shows_in_maps_and_smaps_with_its_keyid(
    bash: Callable[[str], str],
) -> None:
    bash("echo 'type=cpu algorithm=aes-xts-128' > keys/8")
    new_space(bash, "maps", keyid=8)
    assert bash("cat spaces/maps/maps").startswith("10000000-10004000 rw-p ")
    smaps = bash("cat spaces/maps/smaps")
    assert any(line.split() == ["KeyID:", "8"] for line in smaps.splitlines())
    assert "keyid=8" in bash("cat pagetables/maps")
    bash("rmdir spaces/maps && echo type=clear > keys/8")


def test_space_memory_round_trips_through_dd_and_cmp(
    bash: Callable[[str], str], tmp_path: Path
) -> None:
    new_space(bash, "rt", keyid=0, length="64K")
    data = tmp_path / "data"
    data.write_bytes(os.urandom(3 * 4096 + 100))
    bash(
        f"dd if={data} of=spaces/rt/mem bs=4096 seek=$(({BASE} + 4096)) oflag=seek_bytes conv=notrunc status=none"
    )
    size = data.stat().st_size
    bash(
        f"dd if=spaces/rt/mem bs={size} count=1 skip=$(({BASE} + 4096)) iflag=skip_bytes status=none | cmp - {data}"
    )
    line = bash(f"xxd -s $(({BASE} + 4096)) -l 16 -p spaces/rt/mem").strip()
    assert bytes.fromhex(line) == data.read_bytes()[:16]
    bash("rmdir spaces/rt")


def test_pagemap_gives_the_pfn_and_page_keyid_the_keyid_of_a_populated_page(
    bash: Callable[[str], str],
) -> None:
    bash("echo 'type=cpu algorithm=aes-xts-128' > keys/9")
    new_space(bash, "pm", keyid=9)
    pfn = pfn_of(bash, "pm", BASE)
    assert 0 < pfn < PHYS_MEM // 4096
    raw = bash(f"dd if=mm/page_keyid bs=8 skip={pfn} count=1 status=none | xxd -p")
    assert struct.unpack("<Q", bytes.fromhex(raw.strip())) == (9,)
    bash("rmdir spaces/pm && echo type=clear > keys/9")


def test_cr3_is_a_page_aligned_physical_address_and_tlb_takes_flush(
    bash: Callable[[str], str],
) -> None:
    bash("mkdir spaces/cr3")
    cr3 = bash("cat spaces/cr3/cr3").strip()
    assert cr3.startswith("0x")
    assert int(cr3, 16) % 4096 == 0
    assert int(cr3, 16) < PHYS_MEM
    bash("echo flush > spaces/cr3/tlb")
    bash("rmdir spaces/cr3")


def test_pagetables_kernel_has_one_direct_mapping_per_keyid(
    bash: Callable[[str], str], sandbox: MountedSandbox
) -> None:
    dump = bash("cat pagetables/kernel")
    regions = [line for line in dump.splitlines() if line.startswith("---[ Low Kernel Mapping")]
    assert len(regions) == nr_keyids(sandbox) + 1
    assert "keyid=0" in dump


# -- mm/ ------------------------------------------------------------------------------


def counter(text: str, name: str) -> int:
    values = dict(line.split()[:2] for line in text.splitlines() if line.strip())
    return int(values[name])


def test_vmstat_counts_the_page_faults_of_a_write(bash: Callable[[str], str]) -> None:
    before = counter(bash("cat mm/vmstat"), "pgfault")
    bash("mkdir spaces/vm && echo 'mmap 0x10000000 8K rw-' > spaces/vm/ctl")
    bash(f"printf x | dd of=spaces/vm/mem bs=1 seek={BASE} conv=notrunc status=none")
    assert counter(bash("cat mm/vmstat"), "pgfault") > before
    bash("rmdir spaces/vm")


def test_free_pools_lists_free_pages_per_keyid(bash: Callable[[str], str]) -> None:
    pools = bash("cat mm/free_pools").splitlines()
    assert pools[0].startswith("keyid=0 free=")
    assert all(re.fullmatch(r"keyid=\d+ free=\d+", line) for line in pools)


@pytest.mark.parametrize(
    "switch", ["keyid_free_pools", *(f"mitigations/{name}" for name in Machine.MITIGATIONS)]
)
def test_switches_read_1_or_0_and_toggle_with_echo(bash: Callable[[str], str], switch: str) -> None:
    path = f"mm/{switch}"
    initial = bash(f"cat {path}").strip()
    assert initial in ("0", "1")
    assert stat_line(bash, path).startswith("600 0")
    flipped = "0" if initial == "1" else "1"
    bash(f"echo {flipped} > {path}")
    assert bash(f"cat {path}").strip() == flipped
    bash(f"echo {initial} > {path}")
    assert bash(f"cat {path}").strip() == initial


def test_the_mitigations_directory_has_one_file_per_switch(bash: Callable[[str], str]) -> None:
    assert bash("ls mm/mitigations").split() == sorted(Machine.MITIGATIONS)


@pytest.mark.parametrize("folder", ["mm/ksm", "mm/khugepaged"])
def test_writing_1_runs_one_pass_and_full_scans_counts_it(
    bash: Callable[[str], str], folder: str
) -> None:
    control = "run" if folder == "mm/ksm" else "scan"
    before = int(bash(f"cat {folder}/full_scans"))
    bash(f"echo 1 > {folder}/{control}")
    assert int(bash(f"cat {folder}/full_scans")) == before + 1


def test_ksm_and_khugepaged_folders_hold_one_value_per_file_as_sysfs(
    bash: Callable[[str], str],
) -> None:
    """Documentation/admin-guide/mm/ksm.rst and transhuge.rst: one value per file,
    named as in /sys/kernel/mm/ksm/ and .../transparent_hugepage/khugepaged/."""
    for line in bash("grep -r . mm/ksm mm/khugepaged/full_scans").splitlines():
        _, value = line.split(":")
        assert value.isdigit(), line
    ksm = set(bash("ls mm/ksm").split())
    assert {"run", "pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
            "full_scans", "pages_to_scan", "sleep_millisecs"} <= ksm  # fmt: skip
    assert {"pages_to_scan", "pages_collapsed", "full_scans"} <= set(
        bash("ls mm/khugepaged").split()
    )


@pytest.mark.parametrize("path", ["mm/kpageflags", "mm/kpagecount", "mm/page_keyid"])
def test_pfn_tables_have_one_u64_per_page_frame(bash: Callable[[str], str], path: str) -> None:
    assert stat_line(bash, path) == f"444 0 {8 * (PHYS_MEM >> 12)}"
    assert bash(f"cat {path} | wc -c").strip() == str(8 * (PHYS_MEM >> 12))


def test_mm_check_reads_ok(bash: Callable[[str], str]) -> None:
    assert bash("cat mm/check") == "ok\n"


# -- hw/ ------------------------------------------------------------------------------


def rdmsr(bash: Callable[[str], str], addr: int) -> int:
    raw = bash(f"dd if=hw/msr bs=8 count=1 skip={addr} iflag=skip_bytes status=none | xxd -p")
    return int(struct.unpack("<Q", bytes.fromhex(raw.strip()))[0])


def test_msr_gives_the_tme_msrs_as_hw_tme_decodes_them(bash: Callable[[str], str]) -> None:
    tme = dict(line.split() for line in bash("cat hw/tme").splitlines())
    names = {
        0x981: "IA32_TME_CAPABILITY",
        0x982: "IA32_TME_ACTIVATE",
        0x983: "IA32_TME_EXCLUDE_MASK",
        0x984: "IA32_TME_EXCLUDE_BASE",
    }
    for addr, name in names.items():
        assert rdmsr(bash, addr) == int(tme[name], 16)
    assert rdmsr(bash, 0x982) & 1, "IA32_TME_ACTIVATE is locked"


def test_cache_counts_and_takes_wbinvd_and_clflush(bash: Callable[[str], str]) -> None:
    stats = bash("cat hw/cache")
    assert "hits" in stats
    assert "misses" in stats
    assert stat_line(bash, "hw/cache").startswith("600 0")
    bash("echo wbinvd > hw/cache")
    bash("echo 'clflush 0x1000 keyid=0' > hw/cache")


# -- what files refuse ----------------------------------------------------------------


def test_control_files_accept_the_truncation_of_a_shell_redirection(
    bash: Callable[[str], str], sandbox: MountedSandbox
) -> None:
    bash(": > mm/keyid_free_pools")  # open with O_TRUNC, no write
    os.truncate(sandbox.path / "mm" / "ksm" / "run", 0)
    bash("mkdir spaces/tr && : > spaces/tr/ctl && rmdir spaces/tr")


def test_read_only_files_refuse_writes_even_from_root(
    sandbox: MountedSandbox, sh: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    done = sh("echo 1 > mm/vmstat", sandbox.path)
    assert "Permission denied" in done.stderr
    assert "mm/vmstat: EACCES" in sandbox.dmesg().splitlines()[-1]


def test_files_cannot_be_created_and_directories_only_under_spaces(
    sandbox: MountedSandbox, sh: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    assert "Permission denied" in sh("touch new", sandbox.path).stderr
    assert "Operation not permitted" in sh("mkdir mm/new", sandbox.path).stderr
    assert "Operation not permitted" in sh("rmdir keys", sandbox.path).stderr
    assert "No such file or directory" in sh("cat keys/0", sandbox.path).stderr
