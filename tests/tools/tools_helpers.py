"""What the mountpoint-tools tests share besides fixtures (conftest.py puts this
folder and mountpoint-tools/ on sys.path): where the tools are, the address
tests map at, a tenant."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / "mountpoint-tools"
sys.path.insert(0, str(TOOLS))

from mktmefs import Mount, Space

VA = 0x7F0000000000

Run = Callable[..., subprocess.CompletedProcess[str]]


@dataclass(frozen=True)
class Tenant:
    """A KeyID with a CPU key and a space with one populated page at VA under it."""

    mount: Mount
    keyid: int
    space: Space
    va: int

    @property
    def pa(self) -> int:
        return self.space.translate(self.va).pa
