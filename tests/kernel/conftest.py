"""Fixtures shared by the kernel tests."""

from __future__ import annotations

import pytest

from kernel_helpers import two_keys
from mktme_sandbox import Machine


@pytest.fixture
def m() -> Machine:
    """KeyIDs 1 and 2 programmed, one address space "a"; modules may extend it."""
    return two_keys()[0]
