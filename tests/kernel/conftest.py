"""Fixtures shared by the kernel tests."""

from __future__ import annotations

import pytest

from kernel_helpers import Accesses, two_keys
from mktme_sandbox import Machine
from mktme_sandbox.hw.platform import Platform


@pytest.fixture
def m() -> Machine:
    """KeyIDs 1 and 2 programmed, one address space "a"; modules may extend it."""
    return two_keys()[0]


@pytest.fixture
def accesses(monkeypatch: pytest.MonkeyPatch) -> Accesses:
    """Every CPU-view load and store of machines made from here on."""
    seen = Accesses()
    load, load_u64, store = Platform.load, Platform.load_u64, Platform.store

    def counted_load(self: Platform, pa: int, length: int, keyid: int = 0) -> bytes:
        seen.loads.append((pa, length))
        return load(self, pa, length, keyid)

    def counted_load_u64(self: Platform, pa: int, keyid: int = 0) -> int:
        seen.loads.append((pa, 8))
        return load_u64(self, pa, keyid)

    def counted_store(self: Platform, pa: int, data: bytes, keyid: int = 0) -> None:
        seen.stores.append((pa, len(data)))
        store(self, pa, data, keyid)

    monkeypatch.setattr(Platform, "load", counted_load)
    monkeypatch.setattr(Platform, "load_u64", counted_load_u64)
    monkeypatch.setattr(Platform, "store", counted_store)
    return seen
