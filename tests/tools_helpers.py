"""What the tools tests share besides fixtures: where the tools are, the address
tests map at, a tenant."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mktme_sandbox.client import Mount, Space

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the console scripts of the installed package
LAUNCHERS = ROOT / "mountpoint-tools"  # the same tools for a checkout without install
TOOLS = ("mktme-key", "mktme-map", "mktme-peek", "mktme-walk", "mktme-find")
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
