"""Four processes at once, each in its own space with its own KeyID.

Each worker maps a region, then writes random chunks at random offsets while
keeping a reference copy, reading back as it goes; at the end its region must
equal the reference, also after a WBINVD has pushed every dirty line through
the engine to DRAM and back.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Callable

import pytest

from mktme_sandbox.mounting import MountedSandbox

pytestmark = pytest.mark.mount

BASE = 0x10000000
REGION = 256 << 10
WORKERS = [("w0", 0), ("w1", 1), ("w2", 2), ("w3", 3)]

WORKER = r"""
import hashlib, os, random, sys
mem, base, size, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(seed)
reference = bytearray(size)
fd = os.open(mem, os.O_RDWR)
for step in range(1000):
    offset = rng.randrange(size)
    data = rng.randbytes(min(rng.choice([1, 64, 100, 4096, 9000]), size - offset))
    os.pwrite(fd, data, base + offset)
    reference[offset:offset + len(data)] = data
    if step % 10 == 0:
        start = rng.randrange(size - 4096)
        got = os.pread(fd, 4096, base + start)
        assert got == reference[start:start + 4096], f"step {step}: mismatch at {start:#x}"
whole = b"".join(os.pread(fd, 65536, base + o) for o in range(0, size, 65536))
assert whole == reference, "final contents differ from the reference"
print(hashlib.sha256(reference).hexdigest())
"""


@pytest.fixture(scope="module")
def sandbox(module_mount: Callable[..., MountedSandbox]) -> MountedSandbox:
    sandbox = module_mount(phys_mem="32M", keyid_bits=2, seed=5)
    for _name, keyid in WORKERS:
        if keyid:
            sandbox.program_key(keyid, f"type=cpu algorithm=aes-xts-{128 if keyid % 2 else 256}")
    for name, keyid in WORKERS:
        sandbox.create_space(name)
        sandbox.map(name, BASE, REGION, keyid=keyid)
    return sandbox


def test_four_processes_on_different_spaces_and_keyids_end_with_their_reference_contents(
    sandbox: MountedSandbox,
) -> None:
    procs = {
        name: subprocess.Popen(
            [
                sys.executable,
                "-c",
                WORKER,
                str(sandbox.path / "spaces" / name / "mem"),
                str(BASE),
                str(REGION),
                str(seed),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed, (name, _keyid) in enumerate(WORKERS)
    }
    digests = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"worker {name} failed: {err}"
        digests[name] = out.strip()
    sandbox.write_ctl("hw/cache", "wbinvd")
    for name, digest in digests.items():
        contents = sandbox.read_bytes(f"spaces/{name}/mem", BASE, REGION)
        assert hashlib.sha256(contents).hexdigest() == digest, f"{name} after wbinvd"
    assert sandbox.check() == []
