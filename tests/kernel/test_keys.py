"""The key service: payload syntax, states, owners, busy KeyIDs, PCONFIG
retries, and key material that never shows."""

from __future__ import annotations

import errno

import pytest

from kernel_helpers import U, cpu_key, ctl, leaf, machine, space
from mktme_sandbox import Machine, SandboxError

USER_KEY = "00112233445566778899aabbccddeeff"
USER_TWEAK = "ffeeddccbbaa99887766554433221100"


def key_error(m: Machine, keyid: int, payload: str, uid: int = 0) -> SandboxError:
    before = m.key_status(keyid)
    with pytest.raises(SandboxError) as info:
        m.key_command(keyid, payload, uid=uid)
    assert m.key_status(keyid) == before, "half-applied"
    return info.value


def test_a_fresh_keyid_is_free() -> None:
    assert machine().key_status(3) == "keyid=3 state=free type=- algorithm=- owner=- pages=0\n"


@pytest.mark.parametrize(
    ("payload", "shown"),
    [
        ("type=cpu algorithm=aes-xts-128", "type=cpu algorithm=aes-xts-128"),
        ("type=cpu algorithm=aes-xts-256 key=" + "ab" * 32, "type=cpu algorithm=aes-xts-256"),
        (
            f"type=user algorithm=aes-xts-128 key={USER_KEY} tweak={USER_TWEAK}",
            "type=user algorithm=aes-xts-128",
        ),
        ("type=no-encrypt", "type=no-encrypt algorithm=-"),
    ],
)
def test_programming_a_key_shows_its_type_and_owner(payload: str, shown: str) -> None:
    m = machine()
    m.key_command(3, payload, uid=1000)
    assert m.key_status(3) == f"keyid=3 state=programmed {shown} owner=1000 pages=0\n"


def test_pages_count_the_memory_of_a_keyid() -> None:
    m = machine()
    cpu_key(m, 2)
    a = space(m)
    ctl(m, a, f"mmap {U:#x} 12K rw- keyid=2 populate")
    assert m.key_status(2).endswith("pages=3\n")


def test_clearing_a_key_frees_the_keyid_for_anyone() -> None:
    m = machine()
    cpu_key(m, 2, uid=1000)
    m.key_command(2, "type=clear", uid=1000)
    assert "state=cleared" in m.key_status(2)
    assert "owner=-" in m.key_status(2)
    cpu_key(m, 2, uid=2000)
    assert "owner=2000" in m.key_status(2)


@pytest.mark.parametrize(
    "payload",
    [
        "",
        "type=gpu algorithm=aes-xts-128",
        "type=cpu",
        "type=cpu algorithm=aes-xts-512",
        "type=cpu algorithm=aes-xts-128 colour=blue",
        "type=cpu type=cpu algorithm=aes-xts-128",
        "type=cpu algorithm",
        "type=cpu algorithm=aes-xts-128 key=abc",
        "type=cpu algorithm=aes-xts-128 key=" + "zz" * 16,
        f"type=user algorithm=aes-xts-128 key={USER_KEY}",
        f"type=user algorithm=aes-xts-256 key={USER_KEY} tweak={USER_TWEAK}",
        f"type=user algorithm=aes-xts-128 key={USER_KEY} tweak={USER_KEY}",  # XTS forbids
        f"type=no-encrypt key={USER_KEY}",
        "type=clear algorithm=aes-xts-128",
    ],
)
def test_bad_payloads_are_einval(payload: str) -> None:
    assert key_error(machine(), 1, payload).errno == errno.EINVAL


def test_an_algorithm_not_activated_is_einval() -> None:
    m = machine(algorithms="aes-xts-128")
    assert key_error(m, 1, "type=cpu algorithm=aes-xts-256").errno == errno.EINVAL


def test_a_keyid_beyond_the_machine_is_einval() -> None:
    machine(max_keys=4).key_command(4, "type=no-encrypt", uid=0)
    with pytest.raises(SandboxError) as info:
        machine(max_keys=4).key_command(5, "type=no-encrypt", uid=0)
    assert info.value.errno == errno.EINVAL


def test_another_users_key_is_eacces_and_root_may_reprogram_it() -> None:
    m = machine()
    cpu_key(m, 1, uid=1000)
    assert key_error(m, 1, "type=clear", uid=2000).errno == errno.EACCES
    m.key_command(1, "type=clear", uid=0)


def test_a_keyid_still_mapped_is_ebusy() -> None:
    m = machine()
    cpu_key(m, 1)
    a = space(m)
    ctl(m, a, f"mmap {U:#x} 4K rw- keyid=1")
    assert key_error(m, 1, "type=clear").errno == errno.EBUSY
    assert key_error(m, 1, "type=cpu algorithm=aes-xts-128").errno == errno.EBUSY
    ctl(m, a, f"munmap {U:#x} 4K")
    m.key_command(1, "type=clear", uid=0)


@pytest.mark.parametrize("status", [2, 5])
def test_pconfig_busy_or_entropy_errors_are_retried(status: int) -> None:
    m = machine()
    m.inject_pconfig_faults(status, 9)
    cpu_key(m, 1)
    assert "state=programmed" in m.key_status(1)
    assert "mktme_key_program_retry 9" in m.vmstat()


@pytest.mark.parametrize("status", [2, 5])
def test_pconfig_answering_busy_ten_times_is_eagain(status: int) -> None:
    m = machine()
    m.inject_pconfig_faults(status, 10)
    assert key_error(m, 1, "type=cpu algorithm=aes-xts-128").errno == errno.EAGAIN


def test_reprogramming_a_key_makes_old_ciphertext_unreadable() -> None:
    m = machine()
    cpu_key(m, 1)
    a = space(m)
    ctl(m, a, f"mmap {U:#x} 4K rw- keyid=1 populate")
    m.write_virt(a, U, b"old secret")
    pa = leaf(m, a, U).pte & m.kernel.pte_layout.pfn_mask
    m.cache_command("wbinvd")
    ctl(m, a, f"munmap {U:#x} 4K")
    cpu_key(m, 1)  # a new random key for KeyID 1
    assert m.read_phys(1, pa, 10) != b"old secret"


LEAKY_PAYLOADS = [
    f"type=user algorithm=aes-xts-128 key={USER_KEY} {USER_TWEAK}",  # forgot tweak=
    f"type=user algorithm=aes-xts-128 {USER_KEY}=1 tweak={USER_TWEAK}",
    f"type=user algorithm={USER_KEY} key={USER_KEY} tweak={USER_TWEAK}",
    f"type={USER_KEY} key={USER_KEY}",
    f"type=user algorithm=aes-xts-128 key={USER_KEY} tweak={USER_TWEAK} key={USER_KEY}",
    f"type=user algorithm=aes-xts-128 key={USER_KEY}0 tweak={USER_TWEAK}",
    f"type=cpu algorithm=aes-xts-128 key={USER_KEY[:-2]}zz",
]


@pytest.mark.parametrize("payload", LEAKY_PAYLOADS)
def test_a_rejected_payload_never_echoes_key_material(payload: str) -> None:
    m = machine()
    with pytest.raises(SandboxError) as info:
        m.key_command(1, payload, uid=0)
    m.reject("keys/1", info.value)  # what the filesystem logs for the rejection
    for text in (m.dmesg(), str(info.value), repr(info.value)):
        for secret in (USER_KEY, USER_TWEAK, USER_KEY[:-2]):
            assert secret not in text


def test_key_material_appears_in_no_log_status_or_error() -> None:
    m = machine()
    m.key_command(1, f"type=user algorithm=aes-xts-128 key={USER_KEY} tweak={USER_TWEAK}", uid=0)
    with pytest.raises(SandboxError) as info:
        m.key_command(2, f"type=user algorithm=aes-xts-128 key={USER_KEY} tweak={USER_KEY}", uid=0)
    texts = [
        m.dmesg(),
        m.key_status(1),
        str(info.value),
        repr(info.value),
        repr(m),
        repr(m.platform),
        m.tme_text(),
    ]
    for text in texts:
        for secret in (USER_KEY, USER_TWEAK, USER_KEY.upper()):
            assert secret not in text
        assert bytes.fromhex(USER_KEY).decode("latin-1") not in text


def test_reprogramming_a_keyid_writes_back_its_dirty_lines_with_the_old_key_first() -> None:
    """docs/spec.md 3.7: "Before every programming the cache is written back
    (WBINVD), so no dirty line of the old key is later written with the new
    one" (the mktme key service calls wbinvd before PCONFIG). A line still
    cached under KeyID 1 would otherwise come back in clear after the
    reprogramming, and reach DRAM encrypted with the new, here known, key."""
    m = machine()
    cpu_key(m, 1)
    pa = 32 << 20  # a free page, written through keyids/1/mem: the line stays dirty
    m.write_phys(1, pa, b"old tenant data")
    before = m.vmstat_counts()["mktme_key_wbinvd"]
    m.key_command(1, f"type=user algorithm=aes-xts-128 key={USER_KEY} tweak={USER_TWEAK}", uid=0)
    assert m.vmstat_counts()["mktme_key_wbinvd"] == before + 1
    assert m.read_phys(1, pa, 15) != b"old tenant data"


def test_ten_busy_answers_are_one_try_and_nine_retries_then_eagain() -> None:
    """docs/spec.md 3.7: "ENTROPY_ERROR and DEVICE_BUSY are retried, ten tries
    in all, then EAGAIN"; ``mktme_key_program_retry`` counts "PCONFIG calls
    retried after busy or entropy error": the nine after the first, and the
    tenth answer is not retried."""
    m = machine()
    m.inject_pconfig_faults(5, 10)
    assert key_error(m, 1, "type=cpu algorithm=aes-xts-128").errno == errno.EAGAIN
    stats = m.vmstat_counts()
    assert (stats["mktme_key_program_retry"], stats["mktme_key_program"]) == (9, 0)


def test_another_users_keyid_may_be_mapped_by_root_but_not_by_a_third_user() -> None:
    """docs/spec.md 3.7: "only that user (or root) may reprogram or clear it, or
    map it" (key_task_permission(): the owner, or CAP_SYS_ADMIN)."""
    m = machine()
    cpu_key(m, 1, uid=1000)
    space(m, "root", uid=0)
    ctl(m, "root", f"mmap {U:#x} 4K rw- keyid=1", uid=0)
    space(m, "other", uid=2000)
    with pytest.raises(SandboxError) as info:
        ctl(m, "other", f"mmap {U:#x} 4K rw- keyid=1", uid=2000)
    assert info.value.errno == errno.EACCES
