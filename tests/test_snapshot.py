"""Machine snapshots through the API: the file, its refusals, sparseness, cold boot.

The differential test of completeness is ``test_snapshot_differential.py``.
"""

from __future__ import annotations

import errno
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mktme_sandbox import Machine, SandboxError
from mktme_sandbox.snapshot import MAGIC
from snapshot_helpers import BASE, machines_differ, observables, state_of

SECRET = b"the launch codes are 0000" * 4


def machine(**options: object) -> Machine:
    return Machine(None, **({"phys_mem": "16M", "keyid_bits": 2, "seed": 7} | options))


def with_secrets(m: Machine) -> Machine:
    """KeyID 1 a CPU key, KeyID 2 no-encrypt; space ``cpu`` (uid 1000) and ``plain``
    each hold SECRET at BASE, written back to DRAM."""
    m.key_command(1, "type=cpu algorithm=aes-xts-128", uid=1000)
    m.key_command(2, "type=no-encrypt", uid=0)
    for name, keyid, uid in (("cpu", 1, 1000), ("plain", 2, 0)):
        m.create_space(name, uid=uid)
        m.space_command(name, f"mmap {BASE:#x} 8K rw- keyid={keyid} populate", uid=uid)
        m.write_virt(name, BASE, SECRET)
    m.cache_command("wbinvd")
    return m


def pa_of(m: Machine, space: str) -> int:
    entry = int.from_bytes(m.pagemap(space, (BASE >> 12) * 8, 8), "little")
    return (entry & ((1 << 55) - 1)) << 12


def held(m: Machine) -> object:
    """Every attribute of the machine's layers (reading the files would change the cache)."""
    return state_of(m.platform), state_of(m.kernel)


# -- the file ----------------------------------------------------------------------


def test_a_snapshot_file_is_mode_0600_and_begins_with_its_magic_and_format(tmp_path: Path) -> None:
    path = tmp_path / "machine.snap"
    data = with_secrets(machine()).snapshot(path)
    assert path.stat().st_mode & 0o777 == 0o600, "it holds every key"
    assert path.read_bytes() == data
    magic, version, header = data.split(b"\n", 3)[:3]
    assert (magic, version) == (MAGIC, b"format 1")
    assert json.loads(header)["config"]["phys_mem"] == 16 << 20


def test_saving_over_a_world_readable_file_leaves_it_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "machine.snap"
    path.write_text("old")
    path.chmod(0o644)
    machine().snapshot(path)
    assert path.stat().st_mode & 0o777 == 0o600


def test_a_restore_drops_the_spaces_made_since_and_brings_back_the_saved_ones_with_owners() -> None:
    m = with_secrets(machine())
    saved = m.snapshot()
    m.destroy_space("cpu", uid=1000)
    m.create_space("later", uid=0)
    m.restore(saved)
    assert m.space_names() == ["cpu", "plain"]
    assert m.space_owner("cpu") == 1000
    assert m.key_owner(1) == 1000
    assert m.read_virt("cpu", BASE, len(SECRET)) == SECRET
    assert m.check() == []


def test_a_restored_seeded_machine_draws_the_next_cpu_key_the_original_would() -> None:
    original = machine()
    restored = machine(seed=99)  # the generator's state comes from the snapshot
    restored.restore(original.snapshot())
    for m in (original, restored):
        m.key_command(3, "type=cpu algorithm=aes-xts-256", uid=0)
        m.write_phys(3, 0x5000, SECRET)
        m.cache_command("wbinvd")
    assert original.read_dram(0x5000, 64) == restored.read_dram(0x5000, 64)


def test_a_restore_into_the_same_machine_resets_it_to_the_moment_of_the_snapshot() -> None:
    m = with_secrets(machine())
    saved = m.snapshot()
    before = observables(m)  # reading through the cache changes it: after the snapshot
    m.write_virt("cpu", BASE, b"changed")
    m.ksm_run()
    m.restore(saved)
    assert observables(m) == before


def test_a_sparse_4g_machine_saves_only_the_pages_it_touched() -> None:
    m = machine(phys_mem="4G", keyid_bits=6)
    m.write_dram((4 << 30) - 4096, b"the last page")
    data = m.snapshot()
    assert len(data) < 8 << 20, f"{len(data)} bytes for a machine that touched a few pages"
    fresh = machine(phys_mem="4G", keyid_bits=6)
    fresh.restore(data)
    assert fresh.read_dram((4 << 30) - 4096, 13) == b"the last page"


# -- refusals: EINVAL, and the machine as it was ------------------------------------


def other_format(data: bytes) -> bytes:
    return data.replace(b"format 1\n", b"format 2\n", 1)


def truncated(data: bytes) -> bytes:
    return data[:-1000]


def corrupted(data: bytes) -> bytes:
    flipped = bytearray(data)
    flipped[-5000] ^= 0x01
    return bytes(flipped)


def not_a_snapshot(data: bytes) -> bytes:
    return b"PK\x03\x04" + data


def header_not_json(data: bytes) -> bytes:
    magic, version, _, payload = data.split(b"\n", 3)
    return b"\n".join([magic, version, b"{not json", payload])


@pytest.mark.parametrize(
    ("spoil", "reason"),
    [
        (other_format, "is not format 1"),
        (truncated, "truncated"),
        (corrupted, "corrupted"),
        (not_a_snapshot, "not a snapshot"),
        (header_not_json, "not JSON"),
    ],
)
def test_a_spoiled_snapshot_is_refused_with_einval_and_changes_nothing(
    spoil: Callable[[bytes], bytes], reason: str
) -> None:
    m = with_secrets(machine())
    data = spoil(m.snapshot())
    m.create_space("after", uid=0)
    before = held(m)
    with pytest.raises(SandboxError) as refused:
        m.restore(data)
    assert refused.value.errno == errno.EINVAL
    assert reason in refused.value.reason
    assert held(m) == before


@pytest.mark.parametrize("option", [{"phys_mem": "32M"}, {"keyid_bits": 3}, {"cache_size": 0}])
def test_a_snapshot_of_a_machine_configured_otherwise_is_refused(option: dict[str, object]) -> None:
    other = machine(**option)
    m = with_secrets(machine())
    before = held(m)
    with pytest.raises(SandboxError) as refused:
        m.restore(other.snapshot())
    assert refused.value.errno == errno.EINVAL
    assert "taken on another machine" in refused.value.reason
    assert next(iter(option)) in refused.value.reason
    assert held(m) == before


def test_a_snapshot_restores_on_a_machine_with_another_tweak_cache() -> None:
    m = with_secrets(machine())
    other = machine(tweak_cache=0)
    other.restore(m.snapshot())
    assert observables(other) == observables(m)


def test_a_missing_file_is_enoent(tmp_path: Path) -> None:
    with pytest.raises(SandboxError) as refused:
        machine().restore(tmp_path / "nothing.snap")
    assert refused.value.errno == errno.ENOENT


# -- cold boot: DRAM survives, keys do not ----------------------------------------------


def test_after_a_cold_boot_dram_holds_the_same_ciphertext_but_the_keyid_no_longer_decrypts_it() -> (
    None
):
    m = with_secrets(machine())
    cpu, plain = pa_of(m, "cpu"), pa_of(m, "plain")
    ciphertext = m.read_dram(cpu, len(SECRET))
    assert ciphertext != SECRET
    saved = m.snapshot()
    m.restore(saved, coldboot=True)
    assert m.read_dram(cpu, len(SECRET)) == ciphertext
    assert m.read_phys(1, cpu, len(SECRET)) != SECRET
    assert m.read_dram(plain, len(SECRET)) == SECRET, "no-encrypt data was plaintext in DRAM"
    assert m.space_names() == []
    assert "state=free" in m.key_status(1)
    assert "state=free" in m.key_status(2)


def test_a_cold_boot_makes_a_new_tme_key_unless_tme_is_bypassed() -> None:
    for bypass, survives in ((False, False), (True, True)):
        m = machine(tme_bypass=bypass)
        m.write_phys(0, 0x40000, SECRET)
        m.cache_command("wbinvd")
        m.restore(m.snapshot(), coldboot=True)
        assert (m.read_phys(0, 0x40000, len(SECRET)) == SECRET) is survives


def test_a_cold_boot_of_a_seeded_machine_is_reproducible() -> None:
    first, second = machine(), machine()
    data = with_secrets(machine()).snapshot()
    first.restore(data, coldboot=True)
    second.restore(data, coldboot=True)
    assert machines_differ(first, second) == []


# Changes the header's fields (parsed JSON) in place; gives a new payload, or None to drop it.
Change = Callable[[dict[str, Any], bytes], bytes | None]


def _with_header(data: bytes, change: Change) -> bytes:
    magic, version, header, payload = data.split(b"\n", 3)
    fields = json.loads(header)
    changed = change(fields, payload)
    fields["payload_size"] = fields["payload_size"] if changed is None else len(changed)
    if changed is not None:
        fields["payload_sha256"] = hashlib.sha256(changed).hexdigest()
    return b"\n".join([magic, version, json.dumps(fields).encode(), changed or b""])


def _empty_payload(fields: dict[str, Any], payload: bytes) -> bytes:
    return b""


def _config_not_a_dict(fields: dict[str, Any], payload: bytes) -> None:
    fields["config"] = []


def _array_name_not_a_string(fields: dict[str, Any], payload: bytes) -> None:
    fields["state"]["kernel"]["alloc"]["flags"] = {"$array": ["x"]}


def _state_that_does_not_fit(fields: dict[str, Any], payload: bytes) -> None:
    del fields["state"]["kernel"]["alloc"]


def _number_out_of_range(fields: dict[str, Any], payload: bytes) -> bytes:
    fields["state"]["platform"]["keys"]["rng"]["state"]["state"] = -1
    return payload


@pytest.mark.parametrize(
    "change",
    [
        _empty_payload,
        _config_not_a_dict,
        _array_name_not_a_string,
        _state_that_does_not_fit,
        _number_out_of_range,
    ],
    ids=lambda c: c.__name__,
)
def test_a_malformed_header_payload_or_state_is_einval_and_changes_nothing(change: Change) -> None:
    """The empty payload, the config that is no dict, the array name that is
    no string and a negative generator state were found by review: EOFError,
    AttributeError, TypeError, OverflowError (EIO)."""
    m = machine()
    spoiled = _with_header(m.snapshot(), change)
    m.create_space("after", uid=0)
    with pytest.raises(SandboxError) as refused:
        m.restore(spoiled)
    assert refused.value.errno == errno.EINVAL
    assert m.space_names() == ["after"]


def test_a_host_that_swaps_scans_every_page_and_finds_the_same(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """mincore(2) reports pages resident in RAM: with swap in use a page of ours
    may be out of RAM, so every page is looked at instead (found by review)."""
    from mktme_sandbox.hw import dram

    m = with_secrets(machine())
    dram_of = m.platform._dram
    resident = dram_of.touched_pages()
    monkeypatch.setattr(dram, "_host_swaps", lambda: True)
    assert dram._resident_pages(dram_of.bytes) is None
    assert dram_of.touched_pages().tolist() == resident.tolist()
