"""``mktme-sandbox shell``: unmodified procps tools and grep read the sandbox
through /proc and /sys, and report the sandbox's own figures (the LXCFS way)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from mktme_sandbox.mounting import MountedSandbox
from mktme_sandbox.procshell import ShellError, shell_argv

U = 0x10000000


def can_unshare() -> str | None:
    """Why the shell cannot run here, or None."""
    if os.geteuid() != 0:
        return "mktme-sandbox shell needs root (mount namespace and bind mounts)"
    if shutil.which("unshare") is None:
        return "unshare(1) is not installed"
    if subprocess.run(["unshare", "--mount", "true"], check=False).returncode != 0:
        return "this host does not permit unshare --mount"
    return None


pytestmark = pytest.mark.skipif(can_unshare() is not None, reason=str(can_unshare()))


@pytest.fixture(scope="module")
def mnt(module_mount: Callable[..., MountedSandbox]) -> Path:
    sandbox = module_mount(phys_mem="64M", seed=1)
    (sandbox.path / "spaces" / "demo").mkdir()
    ctl = sandbox.path / "spaces" / "demo" / "ctl"
    for command in (f"mmap {U:#x} 2M rw- populate", f"madvise {U:#x} 2M mergeable"):
        ctl.write_text(command)
    (sandbox.path / "mm" / "ksm" / "run").write_text("1")
    return sandbox.path


def tool(mnt: Path, script: str, space: str | None = None) -> str:
    if shutil.which(script.split()[0]) is None:
        pytest.skip(f"{script.split()[0]} is not installed (apt-get install procps)")
    space_args = ["--space", space] if space else []
    argv = [sys.executable, "-m", "mktme_sandbox.cli", "shell", str(mnt), *space_args]
    done = subprocess.run(
        [*argv, "--", "sh", "-c", script], check=False, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def meminfo_kb(mnt: Path, name: str) -> int:
    line = next(
        ln for ln in (mnt / "mm" / "meminfo").read_text().splitlines() if ln.startswith(name)
    )
    return int(line.split()[1])


def test_free_reports_the_sandboxs_memory(mnt: Path) -> None:
    """procps free: total = MemTotal, free = MemFree (KiB, -k)."""
    mem = tool(mnt, "free -k").splitlines()[1].split()
    assert mem[0] == "Mem:"
    assert int(mem[1]) == meminfo_kb(mnt, "MemTotal:")
    assert int(mem[3]) == meminfo_kb(mnt, "MemFree:")


def test_vmstat_s_reports_the_sandboxs_memory(mnt: Path) -> None:
    out = tool(mnt, "vmstat -s")
    assert re.search(rf"^\s*{meminfo_kb(mnt, 'MemTotal:')} K total memory$", out, re.MULTILINE)
    assert re.search(rf"^\s*{meminfo_kb(mnt, 'MemFree:')} K free memory$", out, re.MULTILINE)


def test_grep_of_sys_kernel_mm_ksm_shows_the_sandboxs_ksm(mnt: Path) -> None:
    lines = tool(mnt, "grep -r . /sys/kernel/mm/ksm").splitlines()
    seen = {ln.split(":")[0].rsplit("/", 1)[1]: ln.split(":")[1] for ln in lines}
    assert seen["pages_shared"] == (mnt / "mm" / "ksm" / "pages_shared").read_text().strip()
    assert seen["pages_sharing"] == "511"  # 512 zeroed pages merged into one


def test_pmap_x_shows_the_space_as_a_process(mnt: Path) -> None:
    """pmap -X reads /proc/PID/smaps: the helper process shows the space's VMA,
    with its Rss, Pss and KSM figures and the sandbox's KeyID column."""
    out = tool(mnt, "pmap -X $MKTME_SPACE_PID", space="demo")
    header, row = out.splitlines()[1:3]
    fields = dict(zip(header.split(), row.split(), strict=False))
    assert fields["Address"] == f"{U:x}"
    assert (fields["Size"], fields["Rss"], fields["KSM"]) == ("2048", "2048", "2048")
    assert fields["Pss"] == "4"  # one page mapped 512 times: 512 x 4096 / 512 bytes
    assert "KeyID" in header


def test_the_hosts_proc_is_untouched_outside_the_shell(mnt: Path) -> None:
    tool(mnt, "true")
    host = Path("/proc/meminfo").read_text()
    assert host.splitlines()[0] != (mnt / "mm" / "meminfo").read_text().splitlines()[0]


def test_a_path_that_serves_no_sandbox_is_refused_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(ShellError, match="serves no sandbox"):
        shell_argv(str(tmp_path), None, [])


def test_an_unknown_space_is_refused(mnt: Path) -> None:
    with pytest.raises(ShellError, match="has no space 'nope'"):
        shell_argv(str(mnt), "nope", [])
