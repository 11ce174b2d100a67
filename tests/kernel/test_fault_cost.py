"""What one anonymous fault does besides its page-table and memory accesses
(issue 16): the counters it moves, the charge it leaves as it found it, and
the Python calls it makes in the kernel, which are most of its own cost."""

from __future__ import annotations

import cProfile
import errno
import pstats
from pathlib import Path

import pytest

from kernel_helpers import PAGE, U, ctl, space, two_keys, vmstat
from mktme_sandbox import Machine
from mktme_sandbox.errors import SandboxError
from mktme_sandbox.kernel.memory import handle_mm_fault

KERNEL_CALLS_PER_FAULT = 48
"""The calls into ``mktme_sandbox.kernel`` one encrypted write fault whose
tables exist may make, the space and VMA lookups of ``fault`` included: 44
when issue 16's work on them ended, 62 before it."""


def fault(m: Machine, va: int, write: bool = True, name: str = "a") -> None:
    """One fault of space ``name`` at ``va``, as populate makes it."""
    mm = m.kernel.space(name)
    vma = mm.find_vma(va)
    assert vma is not None
    handle_mm_fault(m.kernel, mm, vma, va, write)


def moved(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {name: after[name] - before[name] for name in after if after[name] != before[name]}


def test_an_encrypted_write_fault_counts_the_fault_the_allocation_and_the_flush() -> None:
    m, _ = two_keys()
    ctl(m, "a", f"mmap {U:#x} 8K rw- keyid=1")
    fault(m, U)  # the tables are made
    before = vmstat(m)
    fault(m, U + PAGE)
    assert moved(before, vmstat(m)) == {
        "nr_free_pages": -1,
        "nr_anon_pages": 1,
        "pgfault": 1,
        "mktme_pgfault_write": 1,
        "pgalloc_normal": 1,
        "mktme_pgalloc_encrypted": 1,
        "mktme_prep_encrypted_flush": 1,
    }  # a never-used page: its flush writes back no line


def test_freeing_an_encrypted_page_counts_the_free_and_the_lines_its_flush_wrote() -> None:
    m, _ = two_keys()
    ctl(m, "a", f"mmap {U:#x} 4K rw- keyid=1 populate")
    before = vmstat(m)
    ctl(m, "a", f"munmap {U:#x} 4K")
    counts = moved(before, vmstat(m))
    assert counts["pgfree"] == 4  # the page, then its PTE, PMD and PUD tables
    assert counts["mktme_pgfree_encrypted"] == 1
    assert counts["mktme_arch_free_page_flush"] == 1
    assert counts["mktme_flush_lines"] == PAGE // 64  # the zeroed page's dirty lines


def test_a_fault_that_fails_leaves_the_charge_as_it_found_it() -> None:
    m, _ = two_keys(max_pages_per_uid=1)
    space(m, "user", uid=1000)  # its PGD is the one page it may take
    ctl(m, "user", f"mmap {U:#x} 4K rw-", uid=1000)
    with pytest.raises(SandboxError) as failed:
        fault(m, U, name="user")
    assert failed.value.errno == errno.ENOMEM
    assert m.kernel.alloc.charge_uid is None


def test_a_fault_makes_no_more_python_calls_in_the_kernel_than_issue_16_left() -> None:
    m, _ = two_keys()
    ctl(m, "a", f"mmap {U:#x} 8K rw- keyid=1")
    fault(m, U)  # the tables are made
    profile = cProfile.Profile()
    profile.runcall(fault, m, U + PAGE)
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    calls = sum(
        primitive
        for (path, _, _), (primitive, *_) in stats.items()
        if Path(path).parent.name == "kernel" and Path(path).parent.parent.name == "mktme_sandbox"
    )
    assert calls <= KERNEL_CALLS_PER_FAULT, calls
