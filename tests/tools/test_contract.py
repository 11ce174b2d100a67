"""What every tool promises alike: installed as a console script (and as a
launcher in mountpoint-tools/), --json tables that parse, and errors that are
one line on stderr with exit status 2, never a traceback, for a missing mount,
a directory that is not a mount, a stale mount, a malformed number and an
address no file offset or user space holds."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from mktme_sandbox import tools
from mktme_sandbox.client import Mount, Space
from mktme_sandbox.mounting import mounted
from tools_helpers import BIN, LAUNCHERS, TOOLS, VA, Run, Tenant

pytestmark = pytest.mark.mount

HUGE = "0x8000000000000000"  # 2**63: beyond any off_t


def run_bare(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def without_mnt() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "MKTME_MNT"}


def assert_one_line_usage_error(done: subprocess.CompletedProcess[str], tool: str) -> None:
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.splitlines()) == 1
    assert done.stderr.startswith(f"{tool}: ")


# A harmless command of each tool, that needs the mount.
READS = {
    "mktme-key": ["list"],
    "mktme-map": ["list"],
    "mktme-peek": ["--", "0x0"],
    "mktme-walk": ["-s", "nowhere", "0x0"],
    "mktme-find": ["-q", "--range", "0:0x1000", "--", "x"],
}


@pytest.mark.parametrize("tool", TOOLS)
def test_the_console_script_and_the_launcher_answer_help(tool: str) -> None:
    for program in (BIN / tool, LAUNCHERS / tool):
        done = run_bare([str(program), "--help"], without_mnt())
        assert done.returncode == 0, done.stderr
        assert "exit status" in done.stdout
        assert "-m MNT" in done.stdout + done.stderr


@pytest.mark.parametrize("tool", TOOLS)
def test_without_a_mountpoint_it_says_how_to_give_one_in_one_line(tool: str) -> None:
    done = run_bare([str(BIN / tool), *READS[tool]], without_mnt())
    assert_one_line_usage_error(done, tool)
    assert "give -m MNT or set MKTME_MNT" in done.stderr


@pytest.mark.parametrize("tool", TOOLS)
def test_a_directory_that_is_not_a_mount_is_one_line(tool: str, tmp_path: Path) -> None:
    done = run_bare([str(BIN / tool), "-m", str(tmp_path), *READS[tool]], without_mnt())
    assert_one_line_usage_error(done, tool)
    assert "not an mktme-sandbox mount" in done.stderr


def bad_arguments(space: str) -> list[tuple[str, list[str]]]:
    return [
        ("mktme-key", ["clear", "zz"]),
        ("mktme-key", ["clear", str(1 << 64)]),
        ("mktme-map", ["map", "contract", "0xzz", "4096"]),
        ("mktme-map", ["map", "contract", HUGE, "4096"]),
        ("mktme-map", ["map", "contract", hex(1 << 47), "4096"]),
        ("mktme-map", ["unmap", space, "0x1000", "12zz"]),
        ("mktme-peek", ["--", "0xzz"]),
        ("mktme-peek", ["--", HUGE]),
        ("mktme-peek", ["-s", space, "--", HUGE]),
        ("mktme-peek", ["-n", "-5", "--", "0x0"]),
        ("mktme-walk", ["-s", space, "--", "0xzz"]),
        ("mktme-walk", ["-s", space, "--", HUGE]),
        ("mktme-walk", ["-s", space, "--", hex(1 << 47)]),
        ("mktme-find", ["--range", "0xzz:0x1000", "--", "x"]),
        ("mktme-find", ["--range", f"{HUGE}:{HUGE}", "--", "x"]),
        ("mktme-find", ["-k", "nine", "--", "x"]),
    ]


def test_a_bad_number_or_address_is_one_line_and_exit_2(tool: Run, tenant: Tenant) -> None:
    for name, args in bad_arguments(tenant.space.name):
        assert_one_line_usage_error(tool(name, *args), name)


def test_every_table_has_json_that_parses(tool: Run, tenant: Tenant) -> None:
    space = tenant.space.name
    tenant.space.write(VA, b"json-needle")
    outputs = {
        "keys": tool("mktme-key", "list", "--json"),
        "spaces": tool("mktme-map", "list", "--json"),
        "vmas": tool("mktme-map", "show", space, "--json"),
        "walk": tool("mktme-walk", "--json", "-s", space, "--", hex(VA)),
        "peek": tool("mktme-peek", "--json", "-s", space, "--", hex(VA)),
        "find": tool("mktme-find", "--json", "-k", str(tenant.keyid), "--", "json-needle"),
    }
    for what, done in outputs.items():
        assert done.returncode == 0, f"{what}: {done.stderr}"
    parsed = {what: json.loads(done.stdout) for what, done in outputs.items()}
    assert space in [row["name"] for row in parsed["spaces"]]
    assert parsed["vmas"][0]["keyid"] == tenant.keyid
    assert parsed["vmas"][0]["start"] == VA
    assert isinstance(parsed["vmas"][0]["rss"], int)
    assert parsed["vmas"][0]["rss"] % 4096 == 0
    key = next(row for row in parsed["keys"] if row["keyid"] == tenant.keyid)
    assert key["state"] == "programmed"
    assert isinstance(key["pages"], int)
    assert key["owner"] == os.getuid()
    assert key["type"] == "cpu"
    assert parsed["walk"]["pa"] == tenant.pa
    assert parsed["walk"]["keyid"] == tenant.keyid
    assert parsed["peek"]["views"][0]["hex"].startswith(b"json-needle".hex())
    assert [hit["pa"] for hit in parsed["find"]["hits"]] == [tenant.pa]
    assert parsed["find"]["views"][f"keyid {tenant.keyid}"] == 1


def test_a_stale_mount_is_one_line_and_exit_2(tmp_path: Path) -> None:
    with mounted(tmp_path / "mnt", phys_mem="16M") as sandbox:
        os.kill(sandbox.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and Path(f"/proc/{sandbox.pid}/cmdline").read_bytes():
            time.sleep(0.05)
        for tool, args in READS.items():
            done = run_bare([str(BIN / tool), "-m", str(sandbox.path), *args], without_mnt())
            assert_one_line_usage_error(done, tool)
            assert "stale mount" in done.stderr


def test_a_keyid_the_machine_does_not_have_is_a_usage_error(tool: Run) -> None:
    """Before reading anything: exit 2 and the range, not a false "not found"."""
    for argv in (
        ["mktme-peek", "-k", "99", "0x8000"],
        ["mktme-peek", "-o", "1,99", "0x8000"],
        ["mktme-find", "-k", "99", "--", "x"],
    ):
        done = tool(*argv)
        assert done.returncode == 2, (argv, done.stdout, done.stderr)
        assert done.stderr.strip().endswith("no KeyID 99 on this machine (0..63)"), done.stderr
        assert "Traceback" not in done.stderr


@pytest.mark.parametrize("where", ["/nonexistent/x.svg", "/dev/full", "/"])
def test_an_output_file_that_cannot_be_written_is_one_line(tool: Run, where: str) -> None:
    done = tool("mktme-map", "memory", "-o", where)
    assert done.returncode == 1
    assert len(done.stderr.splitlines()) == 1
    assert done.stderr.startswith("mktme-map: ")
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(("length", "size"), [("16KiB", 16 << 10), ("0x4000", 0x4000)])
def test_the_tools_take_every_length_a_control_file_takes(
    tool: Run, mnt: Mount, length: str, size: int
) -> None:
    name = f"len-{os.getpid()}"
    done = tool("mktme-map", "map", name, "0x20000000", length, "-p", "none")
    try:
        assert done.returncode == 0, done.stderr
        (vma,) = Space(mnt, name).maps()
        assert vma.size == size
    finally:
        tool("mktme-map", "destroy", name)


def test_a_failed_map_leaves_no_space_behind(tool: Run, mnt: Mount) -> None:
    name = f"ghost-{os.getpid()}"
    done = tool("mktme-map", "map", name, "0x400000", "4K", "-k", "9")
    assert done.returncode == 1
    assert "ENOKEY" in done.stderr
    assert name not in {s.name for s in mnt.spaces()}


def test_a_reader_that_leaves_early_is_no_error(tool: Run, mnt: Mount) -> None:
    """``mktme-key list | head -1``: the tool stops quietly (no "Broken pipe")."""
    done = subprocess.run(
        f"{BIN / 'mktme-key'} -m {mnt.root} list | head -1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.stdout.count("\n") == 1
    assert done.stderr == ""


@pytest.mark.parametrize("tool_name", ["mktme-key", "mktme-map"])
def test_no_command_names_the_commands(tool: Run, tool_name: str) -> None:
    done = tool(tool_name)
    assert done.returncode == 2
    assert done.stderr.startswith(f"{tool_name}: a COMMAND is needed: ")
    assert "ARG" not in done.stderr


def test_a_file_error_in_a_grep_like_tool_is_not_found_nowhere(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """mktme-find's 1 means "found nowhere": any failed read or write is its 2."""

    def fails() -> int:
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/nowhere")

    assert tools.run("mktme-find", fails, rejected=2) == 2
    assert tools.run("mktme-map", fails) == 1
    assert capsys.readouterr().err.splitlines() == [
        "mktme-find: /nowhere: No such file or directory",
        "mktme-map: /nowhere: No such file or directory",
    ]
