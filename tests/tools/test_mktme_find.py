"""mktme-find: where a pattern is visible, in DRAM and through which KeyID."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from mktme_sandbox.client import Mount
from tools_helpers import VA, Run, Tenant

pytestmark = pytest.mark.mount

BIN = Path(sys.executable).parent


def test_help_teaches_with_examples_and_exit_status(tool: Run) -> None:
    done = tool("mktme-find", "--help")
    assert done.returncode == 0
    assert "examples:" in done.stdout
    assert "exit status" in done.stdout


def test_an_encrypted_secret_is_visible_through_its_keyid_only(tool: Run, tenant: Tenant) -> None:
    secret = f"find-me-{os.urandom(6).hex()}"
    tenant.space.write(VA + 100, secret.encode())
    tenant.mount.wbinvd()
    done = tool("mktme-find", "--", secret)
    assert done.returncode == 0, done.stderr
    hit = next(
        line for line in done.stdout.splitlines() if line.startswith(f"keyid {tenant.keyid}")
    )
    assert f"{tenant.pa + 100:#014x}" in hit
    assert f"spaces/{tenant.space.name} {VA + 100:#x}" in hit
    assert "not in: dram, keyid 0" in done.stdout


def test_a_no_encrypt_secret_is_in_dram_once_written_back(tool: Run, mnt: Mount) -> None:
    keyid = mnt.add_key("type=no-encrypt")
    space = mnt.new_space("findtest")
    try:
        space.mmap(VA, 4096, "rw-", keyid=keyid, populate=True)
        secret = os.urandom(12)
        space.write(VA, secret)
        mnt.clflush(space.translate(VA).pa, 64, keyid)
        done = tool("mktme-find", "-x", "-k", str(keyid), "--", secret.hex())
        assert done.returncode == 0
        assert done.stdout.startswith("dram ")
        assert "dram: 1 hit" in done.stdout
    finally:
        space.destroy()
        mnt.clear_key(keyid)


def test_a_pattern_found_nowhere_exits_1(tool: Run) -> None:
    done = tool("mktme-find", "-q", "--range", "0:0x100000", "--", f"absent-{os.urandom(8).hex()}")
    assert done.returncode == 1
    assert "visible in no view" in done.stdout


def test_bad_hex_is_a_usage_error(tool: Run) -> None:
    done = tool("mktme-find", "-x", "--", "xyz")
    assert done.returncode == 2
    assert "not hex" in done.stderr


def test_a_huge_sparse_mapping_costs_no_memory(mnt: Mount) -> None:
    """A 1 TiB VMA that holds nothing and a 64 GiB one that holds one page: the
    page is found and named, within 1 GiB of address space (the whole pagemap of
    the terabyte would be 2 GiB)."""
    space = mnt.new_space("sparse")
    secret = f"sparse-{os.urandom(6).hex()}"
    try:
        space.mmap(0x100000000000, 1 << 40, "rw-")
        space.mmap(0x200000000000, 64 << 30, "rw-")
        space.write(0x200000000000 + (5 << 30), secret.encode())
        mnt.wbinvd()

        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

        done = subprocess.run(
            [str(BIN / "mktme-find"), "-m", str(mnt.root), "--no-dram", "-k", "0", "--", secret],
            preexec_fn=limit,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert f"spaces/{space.name} {0x200000000000 + (5 << 30):#x}" in done.stdout
    finally:
        space.destroy()


def test_the_summary_names_the_pattern_as_typed(tool: Run) -> None:
    text = tool("mktme-find", "-q", "--range", "0:0x1000", "--", "needle in text")
    assert text.stdout.startswith("'needle in text' visible in ")
    binary = tool("mktme-find", "-q", "-x", "--range", "0:0x1000", "--", "00ff13")
    assert binary.stdout.startswith("00ff13 visible in ")
