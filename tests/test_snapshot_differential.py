"""A restored machine is the machine that was saved: a differential test.

Two machines of one config run the same random operations. Midway one of them
is saved and restored into a *fresh* ``Machine`` object; then both run the same
second half. Every result of the second half, every observable at the end
(DRAM, each KeyID's view, dmesg, vmstat, maps, smaps, pagemap, ptdump, the
audit, keys, cache, KSM, khugepaged, kpageflags, page_keyid) and every
attribute of every object under ``Machine.platform`` and ``Machine.kernel``
must be equal: a field the snapshot forgets shows up as a difference, also one
added to the model later. The second half also draws CPU keys, so the random
generator is shown to continue as it would have.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mktme_sandbox import Machine, SandboxError
from snapshot_helpers import BASE, machines_differ

SPACES = ("a", "b")
KEY = "00112233445566778899aabbccddeeff"
TWEAK = "ffeeddccbbaa99887766554433221100"

space = st.sampled_from(SPACES)
addr = st.integers(0, 15).map(lambda page: BASE + page * 4096)
length = st.sampled_from(["4K", "8K", "16K", "2M"])
prot = st.sampled_from(["---", "r--", "rw-"])
keyid = st.integers(0, 3)
key_payload = st.sampled_from(
    [
        "type=cpu algorithm=aes-xts-128",
        "type=cpu algorithm=aes-xts-256",
        f"type=user algorithm=aes-xts-128 key={KEY} tweak={TWEAK}",
        "type=no-encrypt",
        "type=clear",
    ]
)
data = st.binary(min_size=1, max_size=300)

operation = st.one_of(
    st.tuples(st.just("key_command"), st.integers(1, 3), key_payload, st.just(0)),
    st.tuples(st.just("create_space"), space, st.sampled_from([0, 1000])),
    st.tuples(st.just("destroy_space"), space, st.just(0)),
    st.tuples(
        st.just("space_command"),
        space,
        st.builds(
            "mmap {} {} {} keyid={}{}".format,
            addr.map(hex),
            length,
            prot,
            keyid,
            st.sampled_from(["", " populate"]),
        ),
        st.just(0),
    ),
    st.tuples(
        st.just("space_command"),
        space,
        st.one_of(
            st.builds("munmap {} {}".format, addr.map(hex), length),
            st.builds("mprotect {} {} {}".format, addr.map(hex), length, prot),
            st.builds(
                "encrypt_mprotect {} {} {} keyid={}".format, addr.map(hex), length, prot, keyid
            ),
            st.builds(
                "madvise {} {} {}".format,
                addr.map(hex),
                length,
                st.sampled_from(["mergeable", "unmergeable", "hugepage", "dontneed"]),
            ),
        ),
        st.just(0),
    ),
    st.tuples(st.just("write_virt"), space, addr, data),
    st.tuples(st.just("read_virt"), space, addr, st.integers(1, 300)),
    st.tuples(st.just("write_phys"), keyid, st.integers(0, 1023).map(lambda n: n * 4096), data),
    st.tuples(st.just("write_dram"), st.integers(0, (4 << 20) - 300), data),
    st.tuples(st.just("cache_command"), st.sampled_from(["wbinvd", "clflush 0x3000 keyid=1"])),
    st.tuples(st.just("ksm_run")),
    st.tuples(st.just("khugepaged_scan")),
    st.tuples(st.just("flush_tlb"), space),
    st.tuples(st.just("set_mitigation"), st.sampled_from(Machine.MITIGATIONS), st.booleans()),
    st.tuples(st.just("set_free_pools"), st.booleans()),
    st.tuples(st.just("inject_pconfig_faults"), st.sampled_from([2, 5]), st.integers(0, 12)),
)
operations = st.lists(operation, max_size=25)


def apply(m: Machine, op: tuple[Any, ...]) -> object:
    """Run one operation: its result, or the errno it was refused with."""
    name, *args = op
    try:
        if name == "set_free_pools":
            m.keyid_free_pools = args[0]
            return None
        return getattr(m, name)(*args)
    except SandboxError as err:
        return err.errno


@pytest.mark.parametrize("cache_size", ["64K", "0"])
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(before=operations, after=operations)
def test_a_machine_restored_into_a_fresh_object_behaves_as_the_original(
    cache_size: str, before: list[tuple[Any, ...]], after: list[tuple[Any, ...]]
) -> None:
    config: dict[str, object] = {
        "phys_mem": "4M",
        "keyid_bits": 2,
        "cache_size": cache_size,
        "seed": 5,
    }
    original, saved = Machine(None, **config), Machine(None, **config)
    for op in before:
        assert apply(original, op) == apply(saved, op)
    restored = Machine(None, **config)
    restored.restore(saved.snapshot())
    assert machines_differ(original, restored) == []
    for op in [*after, ("key_command", 3, "type=cpu algorithm=aes-xts-128", 0)]:
        assert apply(original, op) == apply(restored, op), op
    assert machines_differ(original, restored) == []
