"""Two unprivileged users for the mount tests of docs/spec.md 8, acted as through setpriv."""

from __future__ import annotations

import os
import shutil

import pytest

NOBODY, OTHER = 65534, 65533

AS_OTHER_USERS = [
    pytest.mark.mount,
    pytest.mark.skipif(os.geteuid() != 0, reason="acting as other users needs root (setpriv)"),
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is missing"),
]
"""The marks of a module whose tests act as NOBODY and OTHER."""
