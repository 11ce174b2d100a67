"""``mktme-sandbox examples tour``: the guided tour (bash, package data) runs
non-interactively and cleans up after itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mktme_sandbox.examples.run_all import tour_path
from mktme_sandbox.mounting import MountedSandbox

SANDBOX = Path(sys.executable).parent / "mktme-sandbox"


@pytest.mark.mount
def test_tour_shows_plaintext_ciphertext_and_the_pte_keyid_then_cleans_up(
    mktme_mount: MountedSandbox,
) -> None:
    mnt = mktme_mount.path
    done = subprocess.run(
        [str(SANDBOX), "examples", "tour", "-m", str(mnt)],
        env={k: v for k, v in os.environ.items() if k != "MKTME_MNT"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for step in ("Program a key", "Map an encrypted region", "three ways", "Walk the page tables"):
        assert step in out
    assert "dram: differs from the plaintext" in out
    assert "pagemap: pfn" in out
    assert "agrees" in out
    assert "visible in keyid 1: 1 hit; not in: dram, keyid 0" in out
    assert "\033[" not in out, "no colours when stdout is not a terminal"
    assert os.listdir(mnt / "spaces") == []
    programmed = [
        k for k in os.listdir(mnt / "keys") if "state=programmed" in (mnt / "keys" / k).read_text()
    ]
    assert programmed == []
    assert mktme_mount.check() == []
    assert "Next: mktme-sandbox examples run-all" in out


def test_the_tour_without_a_mount_says_so_and_exits_2() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MKTME_MNT"}
    done = subprocess.run(
        ["bash", str(tour_path())],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert "MKTME_MNT" in done.stderr
