"""What a machine shows and holds, for comparing two machines (snapshot tests)."""

from __future__ import annotations

import collections
import re
from typing import Any

import numpy as np

from mktme_sandbox import Machine

BASE = 0x10000000
# What holds no state of the machine, only speed or wall time: not compared.
NOT_STATE = {
    "_hints",
    "_boot",
    "_tables",
    "_serial",
    "_mapping",
}  # caches and identities, not state


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
        "mm/meminfo": m.meminfo(),
        "mm/ksm/": m.ksm_stats(),
        "mm/khugepaged/": m.khugepaged_stats(),
        "mm/kpageflags": m.kpageflags(0, 8 * (m.phys_mem >> 12)),
        "mm/kpagecount": m.kpagecount(0, 8 * (m.phys_mem >> 12)),
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
        seen[f"spaces/{name}/smaps_rollup"] = m.smaps_rollup(name)
        seen[f"spaces/{name}/status"] = m.status(name)
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
