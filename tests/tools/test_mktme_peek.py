"""mktme-peek: plaintext through the KeyID beside DRAM and the other KeyIDs."""

from __future__ import annotations

import pytest

from tools_helpers import VA, Run, Tenant

pytestmark = pytest.mark.mount

SECRET = b"peek at this secret, please!"


def test_help_teaches_with_examples_and_exit_status(tool: Run) -> None:
    done = tool("mktme-peek", "--help")
    assert done.returncode == 0
    assert "examples:" in done.stdout
    assert "exit status" in done.stdout
    assert "--flush" in done.stdout


def test_virtual_peek_shows_plaintext_beside_ciphertext_and_garbage(
    tool: Run, tenant: Tenant
) -> None:
    tenant.space.write(VA, SECRET)
    done = tool("mktme-peek", "-s", tenant.space.name, "--flush", "-n", "32", "--", hex(VA))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert f"keyid {tenant.keyid} (plaintext)" in out
    assert "dram (ciphertext)" in out
    assert "|peek at this sec|" in out
    assert SECRET[:4].hex() in out.splitlines()[2].split()[1]
    assert "dram: differs from the plaintext" in out
    assert "keyid 0: differs from the plaintext" in out


def test_flush_writes_the_dirty_line_back_so_dram_changes(tool: Run, tenant: Tenant) -> None:
    tenant.space.write(VA, SECRET)
    before = tenant.mount.dram(tenant.pa, 64)
    tool("mktme-peek", "-s", tenant.space.name, "--flush", "-o", "none", "--", hex(VA))
    assert tenant.mount.dram(tenant.pa, 64) != before


def test_physical_peek_with_an_explicit_keyid(tool: Run, tenant: Tenant) -> None:
    tenant.space.write(VA, SECRET)
    done = tool("mktme-peek", "-k", str(tenant.keyid), "-o", "0", "--", hex(tenant.pa))
    assert done.returncode == 0
    assert f"physical {tenant.pa:#x}" in done.stdout
    assert "|peek at this sec|" in done.stdout


def test_a_page_that_is_not_present_exits_3(tool: Run, tenant: Tenant) -> None:
    done = tool("mktme-peek", "-s", tenant.space.name, "--", hex(VA + 0x200000))
    assert done.returncode == 3
    assert "not present" in done.stderr


def test_a_bad_address_is_a_usage_error(tool: Run) -> None:
    done = tool("mktme-peek", "--", "0xzz")
    assert done.returncode == 2
    assert "not a number" in done.stderr
