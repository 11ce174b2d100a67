"""mktme-walk: the 4-level walk from CR3, checked against pagemap and smaps."""

from __future__ import annotations

import pytest

from mktme_sandbox.client import walk
from tools_helpers import VA, Run, Tenant

pytestmark = pytest.mark.mount


def test_help_teaches_with_examples_and_exit_status(tool: Run) -> None:
    done = tool("mktme-walk", "--help")
    assert done.returncode == 0
    assert "examples:" in done.stdout
    assert "exit status" in done.stdout
    assert "keyids/0/mem" in done.stdout


def test_walk_of_an_encrypted_page_finds_its_keyid_and_agrees_with_pagemap(
    tool: Run, tenant: Tenant
) -> None:
    done = tool("mktme-walk", "-s", tenant.space.name, "--", hex(VA))
    assert done.returncode == 0, done.stdout + done.stderr
    levels = [line.split()[0] for line in done.stdout.splitlines()[3:7]]
    assert levels == ["PML4", "PDPT", "PD", "PT"]
    pt = done.stdout.splitlines()[6].split()
    assert int(pt[4]) == tenant.keyid
    assert "NX" in pt
    assert f"physical {tenant.pa:#x}" in done.stdout
    assert "pagemap: pfn" in done.stdout
    assert "agrees" in done.stdout


def test_an_unmapped_address_exits_4_with_pagemap_agreeing(tool: Run, tenant: Tenant) -> None:
    done = tool("mktme-walk", "-s", tenant.space.name, "--", hex(VA + 0x100000))
    assert done.returncode == 4
    assert "not mapped" in done.stdout
    assert "not present: agrees" in done.stdout


def test_a_tampered_pte_keyid_differs_from_the_vma_and_exits_5(tool: Run, tenant: Tenant) -> None:
    mount = tenant.mount
    leaf = walk(tenant.space, VA).leaf
    assert leaf is not None
    mount.write_bytes(
        "keyids/0/mem", leaf.entry_pa, mount.layout.with_keyid(leaf.entry, 0).to_bytes(8, "little")
    )
    try:
        done = tool("mktme-walk", "-s", tenant.space.name, "--", hex(VA))
        assert done.returncode == 5
        assert "DIFFERS" in done.stdout
    finally:
        mount.write_bytes("keyids/0/mem", leaf.entry_pa, leaf.entry.to_bytes(8, "little"))
        tenant.space.flush_tlb()


def test_a_missing_space_is_rejected(tool: Run) -> None:
    done = tool("mktme-walk", "-s", "no-such-space", "0x1000")
    assert done.returncode == 1
    assert "no such address space" in done.stderr


def test_a_page_inside_a_vma_not_yet_touched_is_not_present_not_unmapped(
    tool: Run, tenant: Tenant
) -> None:
    tenant.space.mmap(VA + 0x100000, 0x4000, "r--")
    done = tool("mktme-walk", "-s", tenant.space.name, f"{VA + 0x101000:#x}")
    assert done.returncode == 4
    assert f"is not present: inside VMA {VA + 0x100000:x}-{VA + 0x104000:x} r--p" in done.stdout
    tenant.space.munmap(VA + 0x100000, 0x4000)
