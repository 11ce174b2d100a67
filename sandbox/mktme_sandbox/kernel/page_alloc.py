"""The page allocator with MKTME: page_ext KeyIDs and the cache flushes.

Models "mm/page_alloc: Handle allocation for encrypted memory", "x86/mm:
Implement page_keyid() using page_ext" and "x86/mm: Implement
prep_encrypted_page() and arch_free_page()" of the v5 series, plus the per-KeyID
free pools its cover letter announces as the next step.

Rules kept:
- Every physical page has a KeyID in page_ext (``page_keyid``), kept while the
  page is free so that the next allocation knows which cache lines may still
  be dirty under which KeyID.
- ``prep_encrypted_page``: when a page is allocated for a KeyID other than the
  one it last had, its lines are flushed for the old KeyID first; then the
  KeyID is set and the page is zeroed through the new KeyID's mapping.
- ``arch_free_page``: with ``keyid_free_pools`` off (the v5 behaviour) an
  encrypted page is flushed through its KeyID's mapping and reset to KeyID 0,
  so every encrypted allocation and every encrypted free pays a flush. With
  pools on, a freed page keeps its KeyID and waits in that KeyID's pool; it is
  reused for the same KeyID without a flush and changes pool only through one.
- KeyID-0 allocations of KeyID-0 pages never flush, whatever the setting: MKTME
  costs nothing for unencrypted memory.
- The mitigation ``flush_on_keyid_change`` off skips the flushes (and only
  them): dirty lines of the old KeyID stay in the cache and are written back
  later over the new owner's data.
- Which other KeyID's pool an allocation takes from when its own pool and
  KeyID 0's are empty (``pool_steal``): the fullest (the default), or the
  coldest, the KeyID that allocated least recently (a policy of the
  ``bench kbuild`` suite's multi-tenant replay; docs/kbuild.md).
- Every page is charged to the uid in ``charge_uid`` when it is allocated
  (the kernel sets it to the owner of the space it allocates for, as Linux
  charges the memcg of ``current``) and uncharged when it is freed, whoever
  frees it. ``page_limit`` caps what one uid holds, root and the daemon's
  user (``exempt``) excepted (docs/spec.md 8,
  ``max_pages_per_uid``): an allocation beyond it fails with ENOMEM before
  anything changes.

The page state itself (flags, map counts, page_ext KeyIDs) is ``MemMap`` of
``kernel/page.py``, which this allocator owns as ``pages`` and writes through
``prep_new_page``/``free_pages_prepare``/``set_page_keyid``.

Left out: buddy merging (a freed 2M page comes back as 512 single pages; a 2M
allocation takes never-used memory), watermarks, zones, per-CPU lists.
"""

from __future__ import annotations

import bisect
import errno
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from mktme_sandbox.config import PAGE_SIZE
from mktme_sandbox.errors import fail
from mktme_sandbox.kernel.page import PG, MemMap, set_pages
from mktme_sandbox.kernel.pgtable_types import HPAGE_NR, HPAGE_ORDER
from mktme_sandbox.kernel.vmstat import VmStat

__all__ = ["PageAllocator", "PhysicalMemory"]


class PhysicalMemory(Protocol):
    """What the allocator needs of the platform."""

    def fill(self, pa: int, length: int, byte: int, keyid: int = 0) -> None: ...
    def flush_range(self, pa: int, length: int, keyid: int) -> int: ...


class PageAllocator:
    """All physical pages, their page_ext KeyIDs, and the free pools."""

    def __init__(
        self,
        mem: PhysicalMemory,
        phys_mem: int,
        vmstat: VmStat,
        switches: Mapping[str, bool],
        page_limit: int | None = None,
        exempt: Collection[int] = (),
        numa_nodes: int = 1,
    ) -> None:
        self.mem = mem
        self.vmstat = vmstat
        self.nr_pages = phys_mem // PAGE_SIZE
        self._switches = switches
        """The kernel's mitigations: ``flush_on_keyid_change`` is read at every flush."""
        self.pages = MemMap(self.nr_pages, self.free_page)
        """struct page and page_ext of every PFN (``mem_map``)."""
        self.keyid_free_pools = False
        self._pools: dict[int, list[int]] = {0: []}
        self._fresh = 0  # PFNs >= _fresh were never allocated
        self.pool_steal = "fullest"  # or "coldest": see the module docstring
        self._last_alloc: dict[int, int] = {}  # KeyID -> tick of its last allocation
        self._ticks = 0
        self.allocated_by_keyid: dict[int, int] = {}
        self._page_limit = page_limit
        """Pages one uid may hold (None: no limit), fixed at boot; the uids in
        ``exempt`` (root, the daemon's user) have none."""
        self._exempt = exempt
        self.charge_uid: int | None = None
        """Whom the next allocations are charged to (None: the kernel, uncharged)."""
        self._charged = np.zeros(self.nr_pages, dtype=np.int64)  # uid + 1; 0 uncharged
        self.pages_by_uid: dict[int, int] = {}
        blocks = self.nr_pages // HPAGE_NR
        self.node_start = [i * blocks // numa_nodes * HPAGE_NR for i in range(numa_nodes)]
        """The first PFN of each NUMA node: equal ranges of whole 2M blocks."""
        self.reclaim: Callable[[], int] = lambda: 0
        """Direct reclaim: frees some pages, returns how many (0: none could be)."""

    # --- allocation -------------------------------------------------------

    def alloc_page(
        self,
        keyid: int,
        flags: PG = PG.ANON,
        zero: bool = True,
        nodes: Sequence[int] | None = None,
    ) -> int:
        """Allocate one page for ``keyid`` (ENOMEM when memory is exhausted or
        ``charge_uid`` holds its limit), from one of ``nodes`` when given
        (``__alloc_pages_nodemask``; no reclaim for a node-bound request)."""
        self.check_limit(1)
        pfn, old_keyid = self._take(keyid, nodes)
        self._prep(pfn, 0, old_keyid, keyid, flags, zero)
        return pfn

    def alloc_huge_page(
        self,
        keyid: int,
        zero: bool = True,
        flags: PG = PG.ANON,
        nodes: Sequence[int] | None = None,
    ) -> int | None:
        """A 2M-aligned order-9 page: a wholly free block of one KeyID below
        never-used memory (compaction makes them), else never-used memory; on
        one of ``nodes`` when given (an ``MPOL_BIND`` policy's nodemask); None
        when none has one (also when ``charge_uid`` would exceed its limit)."""
        left = self.pages_left()
        if left is not None and left < HPAGE_NR:
            return None
        spans = (
            [self.node_span(nid) for nid in nodes] if nodes is not None else [(0, self.nr_pages)]
        )
        block = self._free_block(spans)
        if block is not None:  # a free 2M block below never-used memory (compaction's)
            old_keyid = self.pages.page_keyid(block)
            self._isolate(range(block, block + HPAGE_NR))
            start = block
        else:
            fresh = self._fresh_block(spans)
            if fresh is None:
                return None
            self._release_fresh(fresh)
            self._fresh = fresh + HPAGE_NR
            start, old_keyid = fresh, 0
        self._prep(start, HPAGE_ORDER, old_keyid, keyid, flags, zero)
        self.pages.prep_compound_page(start, HPAGE_ORDER)
        return start

    def _free_block(self, spans: list[tuple[int, int]]) -> int | None:
        """The first 2M-aligned block below ``never_used`` and inside one of
        ``spans`` whose pages are all free and tagged with one KeyID, or None."""
        blocks = self._fresh // HPAGE_NR
        if not blocks or sum(map(len, self._pools.values())) < HPAGE_NR:
            return None  # every free page below never_used is on one pool (mm/check)
        free = self.free_mask(0, blocks * HPAGE_NR).reshape(blocks, HPAGE_NR).all(axis=1)
        keyids = self.pages.keyids_of(0, blocks * HPAGE_NR).reshape(blocks, HPAGE_NR)
        uniform = (keyids == keyids[:, :1]).all(axis=1)
        starts = np.arange(blocks) * HPAGE_NR
        inside = np.zeros(blocks, dtype=bool)
        for lo, hi in spans:  # nodes are whole 2M blocks: a block lies in one
            inside |= (starts >= lo) & (starts + HPAGE_NR <= hi)
        found = np.flatnonzero(free & uniform & inside)
        return int(found[0]) * HPAGE_NR if len(found) else None

    def _fresh_block(self, spans: list[tuple[int, int]]) -> int | None:
        """The first 2M-aligned block of never-used memory inside one of ``spans``."""
        for lo, hi in spans:
            start = -(-max(self._fresh, lo) // HPAGE_NR) * HPAGE_NR
            if start + HPAGE_NR <= hi:
                return start
        return None

    def _release_fresh(self, start: int) -> None:
        """Never-used PFNs below ``start`` become ordinary free pages of pool 0."""
        if start > self._fresh:
            self._pools[0].extend(range(self._fresh, start))
            self.pages.free_pages_prepare(self._fresh, start - self._fresh)

    def _isolate(self, pfns: range | list[int]) -> None:
        """Take the free pages ``pfns`` (all below ``never_used``) off their free lists."""
        taken = set(pfns)
        for keyid in {self.pages.page_keyid(pfn) for pfn in taken}:
            pool = self._pools.get(keyid, [])
            self._pools[keyid] = [pfn for pfn in pool if pfn not in taken]

    def alloc_page_at(self, pfn: int, keyid: int, flags: PG = PG.ANON) -> None:
        """Allocate the free page ``pfn`` for ``keyid``, prepared as any
        allocation but not zeroed: compaction's free scanner
        (``isolate_freepages`` + ``compaction_alloc``). Never-used pages below
        it become ordinary free pages of pool 0."""
        if pfn >= self._fresh:
            self._release_fresh(pfn)
            self._fresh = pfn + 1
            old_keyid = 0
        else:
            old_keyid = self.pages.page_keyid(pfn)
            self._isolate([pfn])
        self._prep(pfn, 0, old_keyid, keyid, flags, zero=False)

    def migrate_charge(self, old: int, new: int) -> None:
        """``mem_cgroup_migrate()``: ``new`` is charged to whom ``old`` is."""
        self._charge(new, 1, self.charged_uid(old))

    # --- NUMA nodes ---------------------------------------------------------------

    @property
    def numa_nodes(self) -> int:
        return len(self.node_start)

    def node_span(self, nid: int) -> tuple[int, int]:
        """The PFNs ``[first, end)`` of node ``nid``."""
        end = self.node_start[nid + 1] if nid + 1 < self.numa_nodes else self.nr_pages
        return self.node_start[nid], end

    def pfn_to_nid(self, pfn: int) -> int:
        return bisect.bisect_right(self.node_start, pfn) - 1

    def pages_left(self) -> int | None:
        """Pages ``charge_uid`` may still take; None when it has no limit."""
        uid = self.charge_uid
        if uid is None:
            return None
        limit = self._page_limit
        if limit is None or uid in self._exempt:
            return None
        return limit - self.pages_by_uid.get(uid, 0)

    def check_limit(self, nr: int, op: str = "page allocation") -> None:
        """ENOMEM, naming the limit, when ``charge_uid`` may not take ``nr`` pages."""
        left = self.pages_left()
        if left is not None and nr > left:
            uid = self.charge_uid
            fail(
                errno.ENOMEM,
                f"{op}: uid {uid} would exceed max_pages_per_uid ({left} of its pages left, "
                f"{nr} needed)",
            )

    def _take(self, keyid: int, nodes: Sequence[int] | None = None) -> tuple[int, int]:
        """Pick a free page: own pool, then KeyID 0's, then the fullest (or
        coldest, ``pool_steal``) other; when none is left, reclaim some (swap)
        and try again, then ENOMEM."""
        if self.pool_steal == "coldest":  # the default keeps no history (nor do snapshots)
            self._ticks += 1
            self._last_alloc[keyid] = self._ticks
        if nodes is not None:
            found = self._take_on_nodes(keyid, nodes)
            if found is None:
                names = ",".join(map(str, nodes))
                fail(errno.ENOMEM, f"no free page left on node {names}")
            return found
        while True:
            found = self._take_free(keyid)
            if found is not None:
                return found
            if not self.reclaim():
                fail(errno.ENOMEM, "physical memory exhausted: no free page left")

    def _take_on_nodes(self, keyid: int, nodes: Sequence[int]) -> tuple[int, int] | None:
        """``_take_free`` within the nodes' PFNs (lowest node first): the same
        order, the node's never-used memory with KeyID 0's pool."""
        for nid in nodes:
            lo, hi = self.node_span(nid)
            for pool_keyid in self._pool_order(keyid):
                found = self._take_from(pool_keyid, lo, hi)
                if found is not None:
                    return found
        return None

    def _take_free(self, keyid: int) -> tuple[int, int] | None:
        """``_pool_order``, written out for the fault path: the own pool with no call."""
        own = self._pools.get(keyid)
        if own:  # the common cases first, with no call: the own pool ...
            return own.pop(), keyid
        found = self._take_from(0)  # ... then KeyID 0's and never-used memory
        if found is not None:
            return found
        for pool_keyid in self._other_pools(keyid):
            found = self._take_from(pool_keyid)
            if found is not None:
                return found
        return None

    def _take_from(
        self, pool_keyid: int, lo: int = 0, hi: int | None = None
    ) -> tuple[int, int] | None:
        """A page of one pool with a PFN in ``[lo, hi)`` (default: all), the last
        freed first; for KeyID 0's, then never-used memory; or None."""
        hi = self.nr_pages if hi is None else hi
        pool = self._pools.get(pool_keyid, [])
        for i in range(len(pool) - 1, -1, -1):
            if lo <= pool[i] < hi:
                return pool.pop(i), pool_keyid
        if pool_keyid == 0 and self._fresh < hi:
            pfn = max(self._fresh, lo)
            self._release_fresh(pfn)
            self._fresh = pfn + 1
            return pfn, 0
        return None

    def _pool_order(self, keyid: int) -> Iterator[int]:
        """The pools to take from, in order: own, KeyID 0's, then the others
        (fullest or coldest first), sorted only when the first two had nothing."""
        yield keyid
        if keyid:
            yield 0
        yield from self._other_pools(keyid)

    def _other_pools(self, keyid: int) -> list[int]:
        """The pools neither ``keyid``'s nor KeyID 0's, fullest (or coldest) first."""
        return sorted(
            (k for k in self._pools if k not in (keyid, 0)),
            key=lambda k: (
                self._last_alloc.get(k, -1)
                if self.pool_steal == "coldest"
                else -len(self._pools[k])
            ),
        )

    def _prep(
        self, pfn: int, order: int, old_keyid: int, keyid: int, flags: PG, zero: bool
    ) -> None:
        nr = 1 << order
        if keyid != old_keyid:
            self.prep_encrypted_page(pfn, order, old_keyid, keyid)
        elif keyid != 0:
            self.vmstat.inc("mktme_flush_avoided_pool", nr)
        self.pages.prep_new_page(pfn, nr, flags)
        self.allocated_by_keyid[keyid] = self.allocated_by_keyid.get(keyid, 0) + nr
        self._charge(pfn, nr, self.charge_uid)
        if keyid:
            self.vmstat.inc2("pgalloc_normal", "mktme_pgalloc_encrypted", nr)
        else:
            self.vmstat.inc("pgalloc_normal", nr)
        if zero:
            self.mem.fill(pfn * PAGE_SIZE, nr * PAGE_SIZE, 0, keyid)

    def _charge(self, pfn: int, nr: int, uid: int | None) -> None:
        """Charge ``nr`` pages from ``pfn`` to ``uid``; None uncharges them."""
        old = self._charged.item(pfn) - 1
        if old >= 0:
            self.pages_by_uid[old] -= nr
            if not self.pages_by_uid[old]:
                del self.pages_by_uid[old]  # a uid holds pages or is not listed
        if uid is not None:
            self.pages_by_uid[uid] = self.pages_by_uid.get(uid, 0) + nr
        set_pages(self._charged, pfn, nr, 0 if uid is None else uid + 1)

    def charged_uid(self, pfn: int) -> int | None:
        """The uid page ``pfn`` is charged to, or None."""
        uid = int(self._charged[pfn]) - 1
        return None if uid < 0 else uid

    def prep_encrypted_page(self, pfn: int, order: int, old_keyid: int, keyid: int) -> None:
        """Flush the old KeyID's lines, then give the page its new KeyID."""
        counter = "mktme_prep_encrypted_flush" if old_keyid == 0 else "mktme_keyid_pool_flush"
        self._flush(pfn, order, old_keyid, counter)
        self.pages.set_page_keyid(pfn, keyid, 1 << order)

    # --- free -------------------------------------------------------------

    def free_page(self, pfn: int) -> None:
        """Return one page (a compound head frees all of it)."""
        order = self.pages.compound_order(pfn)
        nr = 1 << order
        keyid = self.pages.page_keyid(pfn)
        self.arch_free_page(pfn, order, keyid)
        pool = self._pools.setdefault(self.pages.page_keyid(pfn), [])
        pool.extend(range(pfn + nr - 1, pfn - 1, -1))
        self.pages.free_pages_prepare(pfn, nr)
        self._charge(pfn, nr, None)
        self.allocated_by_keyid[keyid] -= nr
        if keyid:
            self.vmstat.inc2("pgfree", "mktme_pgfree_encrypted", nr)
        else:
            self.vmstat.inc("pgfree", nr)

    def arch_free_page(self, pfn: int, order: int, keyid: int) -> None:
        """v5: flush an encrypted page and reset its KeyID; pools: keep both."""
        if keyid == 0 or self.keyid_free_pools:
            return
        self._flush(pfn, order, keyid, "mktme_arch_free_page_flush")
        self.pages.set_page_keyid(pfn, 0, 1 << order)

    def _flush(self, pfn: int, order: int, keyid: int, counter: str) -> None:
        nr = 1 << order
        if not self._switches["flush_on_keyid_change"]:
            self.vmstat.inc("mktme_flush_skipped_mitigation_off", nr)
            return
        lines = self.mem.flush_range(pfn * PAGE_SIZE, nr * PAGE_SIZE, keyid)
        self.vmstat.inc2(counter, "mktme_flush_lines", nr, lines)

    # --- pools --------------------------------------------------------------

    def set_keyid_free_pools(self, on: bool) -> None:
        """Switch pools; turning them off drains every pool through a flush."""
        if not on and self.keyid_free_pools:
            for keyid in [k for k in self._pools if k]:
                for pfn in self._pools.pop(keyid):
                    self._flush(pfn, 0, keyid, "mktme_keyid_pool_flush")
                    self.pages.set_page_keyid(pfn, 0)
                    self._pools[0].append(pfn)
        self.keyid_free_pools = on

    def free_pages_by_keyid(self) -> dict[int, int]:
        counts = {k: len(v) for k, v in self._pools.items() if v or k == 0}
        counts[0] += self.nr_pages - self._fresh
        return dict(sorted(counts.items()))

    def pools(self) -> dict[int, list[int]]:
        """The free pools (never-used memory not included), for the audit."""
        return {keyid: list(pfns) for keyid, pfns in self._pools.items()}

    @property
    def never_used(self) -> int:
        """PFNs from here up were never allocated (they are free)."""
        return self._fresh

    def free_mask(self, first: int = 0, last: int | None = None) -> np.ndarray:
        """``is_free`` for the PFNs ``first..last``, as one boolean array."""
        last = self.nr_pages if last is None else last
        buddy = (self.pages.flags_of(first, last) & PG.BUDDY) != 0
        free: np.ndarray = buddy | (np.arange(first, last) >= self._fresh)
        return free

    def is_free(self, pfn: int) -> bool:
        return pfn >= self._fresh or self.pages.PageBuddy(pfn)

    # --- snapshots ------------------------------------------------------------

    def export_state(self) -> dict[str, Any]:
        """Pages from ``never_used`` up are all zeros in every array: left out."""
        used = slice(0, self._fresh)
        return {
            **self.pages.export_state(self._fresh),
            "keyid_free_pools": self.keyid_free_pools,
            "pools": [[k, np.array(pfns, dtype=np.int64)] for k, pfns in self._pools.items()],
            "fresh": self._fresh,
            "allocated_by_keyid": [[k, n] for k, n in self.allocated_by_keyid.items()],
            "charged": self._charged[used].copy(),
            "pages_by_uid": [[uid, n] for uid, n in self.pages_by_uid.items()],
        }

    def import_state(self, state: dict[str, Any]) -> None:
        fresh = int(state["fresh"])
        if not 0 <= fresh <= self.nr_pages:
            raise ValueError(f"allocator state of {fresh} pages, this machine has {self.nr_pages}")
        self.pages.import_state(state, fresh)
        self.keyid_free_pools = bool(state["keyid_free_pools"])
        self._pools = {int(k): [int(p) for p in pfns] for k, pfns in state["pools"]}
        self._fresh = fresh
        self.allocated_by_keyid = {int(k): int(n) for k, n in state["allocated_by_keyid"]}
        self._charged[:] = 0
        self._charged[:fresh] = state["charged"]
        uids, counts = np.unique(self._charged[self._charged > 0], return_counts=True)
        derived = {int(u) - 1: int(n) for u, n in zip(uids, counts, strict=True)}
        saved = {int(u): int(n) for u, n in state["pages_by_uid"]}  # in the order it grew
        if saved != derived:
            raise ValueError("the pages charged per uid differ from the pages' charges")
        self.pages_by_uid = saved
