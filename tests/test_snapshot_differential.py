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

import collections
import re
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mktme_sandbox import Machine, SandboxError

BASE = 0x10000000
SPACES = ("a", "b")
KEY = "00112233445566778899aabbccddeeff"
TWEAK = "ffeeddccbbaa99887766554433221100"
# What holds no state of the machine, only speed or wall time: not compared.
NOT_STATE = {"_hints", "_boot", "_page_tweaks", "_pages_seen", "_mapping"}

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


def strip_times(text: str) -> str:
    return re.sub(r"^\[ *\d+\.\d+\] ", "", text, flags=re.MULTILINE)


def observables(m: Machine) -> dict[str, object]:
    """Everything the filesystem shows, keyed by the path that shows it."""
    seen: dict[str, object] = {
        "dram": m.read_dram(0, m.phys_mem),
        "dmesg": strip_times(m.dmesg()),
        "mm/vmstat": m.vmstat(),
        "mm/free_pools": m.free_pools(),
        "mm/keyid_free_pools": m.keyid_free_pools,
        "mm/check": m.check(),
        "mm/ksm/run": m.ksm_stats(),
        "mm/khugepaged/scan": m.khugepaged_stats(),
        "mm/kpageflags": m.kpageflags(0, 8 * (m.phys_mem >> 12)),
        "mm/page_keyid": m.page_keyid(0, 8 * (m.phys_mem >> 12)),
        "hw/cache": m.cache_stats(),
        "spaces": [(name, m.space_owner(name)) for name in m.space_names()],
    }
    for name in Machine.MITIGATIONS:
        seen[f"mm/mitigations/{name}"] = m.mitigation(name)
    for k in range(1, m.nr_keyids + 1):
        seen[f"keys/{k}"] = m.key_status(k)
    for name in m.space_names():
        seen[f"spaces/{name}/maps"] = m.maps(name)
        seen[f"spaces/{name}/smaps"] = m.smaps(name)
        seen[f"spaces/{name}/pagemap"] = m.pagemap(name, (BASE >> 12) * 8, 8 * 1024)
        seen[f"spaces/{name}/cr3"] = m.cr3(name)
        seen[f"pagetables/{name}"] = m.ptdump(name)
    for k in range(m.nr_keyids + 1):  # last: reading through the cache changes it
        seen[f"keyids/{k}/mem"] = m.read_phys(k, 0, m.phys_mem)
    return seen


def state_of(obj: Any, seen: set[int] | None = None) -> Any:
    """Every attribute reachable from ``obj``, as comparable values.

    Functions, bound methods and cipher contexts are behaviour, not state: left
    out (a key's material is compared where the key table keeps it). Slotted
    classes' and dataclasses' fields are included.
    """
    seen = set() if seen is None else seen
    if isinstance(obj, str):
        return strip_times(obj)  # a log line's time is wall time
    if isinstance(obj, bool | int | float | bytes | type(None)):
        return obj
    if isinstance(obj, np.ndarray):
        return (obj.dtype.str, obj.shape, obj.tobytes())
    if isinstance(obj, np.random.Generator):
        return obj.bit_generator.state
    if isinstance(obj, dict):
        return [(state_of(k, seen), state_of(v, seen)) for k, v in obj.items()]
    if isinstance(obj, list | tuple | collections.deque):
        return [type(obj).__name__, *(state_of(v, seen) for v in obj)]
    if not type(obj).__module__.startswith("mktme_sandbox"):
        return type(obj).__name__  # a cipher context, an mmap
    if id(obj) in seen:
        return "(seen)"
    seen.add(id(obj))
    names = set(getattr(obj, "__dict__", {})) | set(getattr(type(obj), "__slots__", ()))
    values = {name: getattr(obj, name) for name in sorted(names - NOT_STATE) if hasattr(obj, name)}
    return [(name, state_of(v, seen)) for name, v in values.items() if not callable(v)]


def machines_differ(a: Machine, b: Machine) -> list[str]:
    oa, ob = observables(a), observables(b)
    differ = [path for path in oa if oa[path] != ob.get(path)]
    for layer in ("platform", "kernel"):
        if state_of(getattr(a, layer)) != state_of(getattr(b, layer)):
            differ.append(f"state of Machine.{layer}")
    return differ


@pytest.mark.parametrize("cache_size", ["64K", "0"])
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(before=operations, after=operations)
def test_a_machine_restored_into_a_fresh_object_behaves_as_the_original(cache_size, before, after):
    config = {"phys_mem": "4M", "keyid_bits": 2, "cache_size": cache_size, "seed": 5}
    original, saved = Machine(**config), Machine(**config)
    for op in before:
        assert apply(original, op) == apply(saved, op)
    restored = Machine(**config)
    restored.restore(saved.snapshot())
    assert machines_differ(original, restored) == []
    for op in [*after, ("key_command", 3, "type=cpu algorithm=aes-xts-128", 0)]:
        assert apply(original, op) == apply(restored, op), op
    assert machines_differ(original, restored) == []
