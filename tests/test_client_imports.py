"""The mount's client, its tools and its experiments import nothing but the
standard library: each is imported in a fresh interpreter and ``sys.modules``
must hold none of the package's heavy dependencies (nor its in-process machine)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import mktme_sandbox

HEAVY = ("numpy", "cryptography", "mfusepy", "fuse", "click", "psutil", "pytest")
PACKAGE = Path(mktme_sandbox.__file__).resolve().parent
EXAMPLES = [
    f"mktme_sandbox.examples.{p.stem}" for p in sorted((PACKAGE / "examples").glob("exp*.py"))
]
MODULES = [
    "mktme_sandbox.client",
    "mktme_sandbox.tools",
    "mktme_sandbox.tools.mktme_key",
    "mktme_sandbox.tools.mktme_map",
    "mktme_sandbox.tools.mktme_peek",
    "mktme_sandbox.tools.mktme_walk",
    "mktme_sandbox.tools.mktme_find",
    "mktme_sandbox.examples.lab",
    "mktme_sandbox.examples.run_all",
]

PROBE = "import importlib, json, sys; importlib.import_module(sys.argv[1]); "
PROBE += "print(json.dumps(sorted(sys.modules)))"


def modules_loaded_by(what: str) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, what], capture_output=True, text=True, check=True
    )
    return set(json.loads(done.stdout))


@pytest.mark.parametrize("what", MODULES + EXAMPLES)
def test_importing_loads_only_the_standard_library(what: str) -> None:
    loaded = modules_loaded_by(what)
    heavy = sorted(m for m in loaded if m.split(".")[0] in HEAVY)
    assert heavy == [], f"{what} pulls in {heavy}"
    assert "mktme_sandbox.machine" not in loaded
    assert "mktme_sandbox.kernel" not in loaded


def test_the_probe_does_see_a_heavy_import() -> None:
    assert "numpy" in modules_loaded_by("mktme_sandbox.machine")


def test_there_is_a_probe_for_each_of_the_twenty_two_experiments() -> None:
    assert len(EXAMPLES) == 22
