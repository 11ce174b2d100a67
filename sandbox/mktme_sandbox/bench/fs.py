"""Suite ``fs``: what the FUSE layer costs, against a null filesystem.

A sandbox and a *null* filesystem are mounted side by side, each served by its
own daemon process with the same mfusepy binding and the same mount options
(``mktme_sandbox.fs.fuse_options``: single-threaded loop, ``default_permissions``,
``direct_io``, no attribute cache). The null filesystem has one file, ``zero``,
that reads as zeros and does nothing else, so the ratio sandbox/null isolates
what the sandbox adds: path resolution, the machine's lock, the cache and the
AES-XTS engine.

The benchmark process and both daemons run on one CPU (``_one_cpu``), so that
every request of either filesystem pays the same context switches.
Measured in one run with ``mktme_sandbox.bench.interleaved_rounds`` (rounds
alternate between sandbox and null so that both see the same load): a rate is
a contender's best round, a ratio the median of the per-round ratios
(``median_ratio``: it moves much less with the machine's load than the ratio
of two best rounds):

- ``keyid_mem``: ``keyids/1/mem`` of a programmed CPU key;
- ``space_mem``: ``spaces/bench/mem`` over a populated encrypted region;
- ``dram``: the raw DRAM view;

each as 1 MiB sequential reads over 8 MiB (MB/s; four times the 2 MiB cache,
so every line is cold; goal ratio >= 0.20, the stretch goal 0.25) and 64-byte
random reads within those 8 MiB (op/s, goal ratio >= 0.5); then
``keyid_mem_cold``: 64-byte reads of ``keyids/1/mem`` at random over the whole
256 MiB machine, where nearly every line misses the cache and is decrypted
from DRAM (goal ratio >= 0.8); and the mount-to-ready time of both (the
sandbox's includes booting the machine). The null file is as large as the
machine; the null filesystem also has a README, because readiness is
"README answers" for both.

Run ``python -m mktme_sandbox.bench.fs --null MNT SIZE`` to serve the null
filesystem alone (that is how the suite starts it).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import random
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mfusepy

from mktme_sandbox import daemon
from mktme_sandbox.bench import Goal, Result, interleaved_rounds, median_ratio

__all__ = ["NullFS", "run"]

REGION = 8 << 20  # bytes covered by the reads of each file
MACHINE = 256 << 20  # the sandbox's phys_mem, and the size of the null file
SPACE_BASE = 0x10000000
SEQ_BLOCK = 1 << 20
RANDOM_READ = 64
ROUNDS = 5
SEQ_ROUND, RANDOM_ROUND = 0.25, 0.1  # seconds of calls per contender and round
SEQ_GOAL, RANDOM_GOAL, COLD_GOAL = 0.20, 0.5, 0.8  # least acceptable sandbox / null ratios
COLD_OFFSETS = 1 << 16  # random offsets cycled through by the cold reads
NULL_README = b"null filesystem of the mktme-sandbox fs benchmark\n"


class NullFS(mfusepy.Operations):  # type: ignore[misc]  # mfusepy ships no types
    """README and one file of ``size`` zero bytes; nothing else."""

    use_ns = True

    def __init__(self, size: int) -> None:
        self.size = size

    def getattr(self, path: str, fh: Any = None) -> dict[str, int]:
        if path == "/":
            return {"st_mode": stat.S_IFDIR | 0o555, "st_nlink": 2}
        sizes = {"/zero": self.size, "/README": len(NULL_README)}
        if path not in sizes:
            raise mfusepy.FuseOSError(errno.ENOENT)
        return {"st_mode": stat.S_IFREG | 0o444, "st_nlink": 1, "st_size": sizes[path]}

    def readdir(self, path: str, fh: Any) -> list[str]:
        return [".", "..", "README", "zero"]

    def open(self, path: str, fi: Any) -> int:
        fi.direct_io = int(path == "/zero")
        return 0

    def read(self, path: str, size: int, offset: int, fi: Any) -> bytes:
        if path == "/README":
            return NULL_README[offset : offset + size]
        return bytes(max(0, min(size, self.size - offset)))


# -- measuring ------------------------------------------------------------------------


class Reader:
    """An open file read in ``[base, base + region)``: 1 MiB in turn, or 64 B at random
    (``offsets`` of them, cycled)."""

    def __init__(self, path: Path, base: int, region: int = REGION, offsets: int = 4096) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        self.base, self.next = base, 0
        rng = random.Random(1)
        self.offsets = [
            base + rng.randrange(region // RANDOM_READ) * RANDOM_READ for _ in range(offsets)
        ]

    def sequential(self) -> None:
        os.pread(self.fd, SEQ_BLOCK, self.base + self.next)
        self.next = (self.next + SEQ_BLOCK) % REGION

    def random(self) -> None:
        self.next = (self.next + 1) % len(self.offsets)
        os.pread(self.fd, RANDOM_READ, self.offsets[self.next])

    def close(self) -> None:
        os.close(self.fd)


def _compare(name: str, ours: Reader, null: Reader) -> list[Result]:
    """Sequential and random reads of ``ours`` against the null fs, interleaved."""
    seq = interleaved_rounds({"ours": ours.sequential, "null": null.sequential}, ROUNDS, SEQ_ROUND)
    rand = interleaved_rounds({"ours": ours.random, "null": null.random}, ROUNDS, RANDOM_ROUND)
    return [
        Result(f"{name}_seq_1m", SEQ_BLOCK / min(seq["ours"]) / 1e6, "MB/s"),
        Result(f"{name}_seq_1m_null", SEQ_BLOCK / min(seq["null"]) / 1e6, "MB/s"),
        Result(f"{name}_seq_1m_ratio", _ratio(seq), "", Goal(SEQ_GOAL)),
        Result(f"{name}_rand_64b", 1 / min(rand["ours"]), "op/s"),
        Result(f"{name}_rand_64b_null", 1 / min(rand["null"]), "op/s"),
        Result(f"{name}_rand_64b_ratio", _ratio(rand), "", Goal(RANDOM_GOAL)),
    ]


def _compare_cold(ours: Reader, null: Reader) -> list[Result]:
    """64-byte reads at random over the whole machine against the null fs, interleaved."""
    rand = interleaved_rounds({"ours": ours.random, "null": null.random}, ROUNDS, RANDOM_ROUND)
    return [
        Result("keyid_mem_cold_rand_64b", 1 / min(rand["ours"]), "op/s"),
        Result("keyid_mem_cold_rand_64b_null", 1 / min(rand["null"]), "op/s"),
        Result("keyid_mem_cold_rand_64b_ratio", _ratio(rand), "", Goal(COLD_GOAL)),
    ]


def _ratio(seconds: dict[str, list[float]]) -> float:
    """Ours over the null file: the median of the per-round ratios."""
    return median_ratio(seconds["ours"], seconds["null"])


# -- the two mounts -------------------------------------------------------------------


def _timed(start: Callable[[], Any]) -> tuple[Any, float]:
    began = time.perf_counter()
    result = start()
    return result, time.perf_counter() - began


def _start_null(mnt: Path) -> int:
    mnt.mkdir()
    log = mnt.with_name("null.log")
    argv = [sys.executable, "-m", "mktme_sandbox.bench.fs", "--null", str(mnt), str(MACHINE)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
        )
    daemon.wait_until_mounted(mnt, proc, log_path=log)
    return proc.pid


def _stop(mnt: Path, pid: int) -> None:
    daemon.unmount(mnt)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def _prepare_sandbox(mnt: Path) -> dict[str, tuple[Path, int]]:
    """Program KeyID 1, map and fill an encrypted region; the three targets."""
    (mnt / "keys" / "1").write_text("type=cpu algorithm=aes-xts-128\n")
    (mnt / "spaces" / "bench").mkdir()
    (mnt / "spaces" / "bench" / "ctl").write_text(
        f"mmap {SPACE_BASE:#x} {REGION} rw- keyid=1 populate\n"
    )
    fd = os.open(mnt / "spaces" / "bench" / "mem", os.O_WRONLY)
    try:
        os.pwrite(fd, os.urandom(REGION), SPACE_BASE)
    finally:
        os.close(fd)
    return {
        "keyid_mem": (mnt / "keyids" / "1" / "mem", 0),
        "space_mem": (mnt / "spaces" / "bench" / "mem", SPACE_BASE),
        "dram": (mnt / "dram", 0),
    }


@contextlib.contextmanager
def _mounts(workdir: Path) -> Iterator[tuple[Path, Path, dict[str, float]]]:
    """Both mounts, timed from start to ready; always unmounted."""
    sandbox_mnt, null_mnt = workdir / "sandbox", workdir / "null"
    started: list[tuple[Path, int]] = []
    try:
        null_pid, null_ready = _timed(lambda: _start_null(null_mnt))
        started.append((null_mnt, null_pid))
        sandbox, ready = _timed(  # its log is removed with the work directory
            lambda: daemon.start_daemon(
                sandbox_mnt, log_path=workdir / "sandbox.log", phys_mem=str(MACHINE), seed=1
            )
        )
        started.append((sandbox_mnt, sandbox.pid))
        yield sandbox_mnt, null_mnt, {"mount_ready_s": ready, "null_mount_ready_s": null_ready}
    finally:
        for mnt, pid in started:
            _stop(mnt, pid)


def run(progress: Callable[[str], None] = lambda line: None) -> list[Result]:
    """Mount both, measure every target against the null fs; unmount both."""
    with (
        _one_cpu(progress),
        tempfile.TemporaryDirectory(prefix="mktme-bench-fs-") as tmp,
        _mounts(Path(tmp)) as mounts,
    ):
        sandbox_mnt, null_mnt, ready = mounts
        results = [Result(name, seconds, "s") for name, seconds in ready.items()]
        progress("fs: programming KeyID 1, populating an encrypted region")
        for name, (path, base) in _prepare_sandbox(sandbox_mnt).items():
            progress(f"fs: {name} against the null filesystem")
            with _readers(path, null_mnt / "zero", base, REGION, 4096) as (ours, null):
                results += _compare(name, ours, null)
        progress("fs: cold 64-byte reads over the whole machine against the null filesystem")
        mem = sandbox_mnt / "keyids" / "1" / "mem"
        with _readers(mem, null_mnt / "zero", 0, MACHINE, COLD_OFFSETS) as (ours, null):
            results += _compare_cold(ours, null)
    return results


@contextlib.contextmanager
def _one_cpu(progress: Callable[[str], None]) -> Iterator[None]:
    """This process, and the daemons it starts (they inherit it), on one CPU.

    A 64-byte read through FUSE costs a few microseconds of work and a wake-up
    of the daemon; where the scheduler happens to put the two daemons decided
    the ratio (0.24 to 2.5 between runs on a 2-core VM: a wake-up across CPUs
    costs more than the work). On one CPU every request of either filesystem
    pays the same two context switches, and runs agree within a few percent.
    """
    if not hasattr(os, "sched_setaffinity"):
        yield
        return
    allowed = os.sched_getaffinity(0)
    cpu = min(allowed)
    os.sched_setaffinity(0, {cpu})
    progress(f"fs: this process and both daemons on CPU {cpu}")
    try:
        yield
    finally:
        os.sched_setaffinity(0, allowed)


@contextlib.contextmanager
def _readers(
    ours: Path, null: Path, base: int, region: int, offsets: int
) -> Iterator[tuple[Reader, Reader]]:
    """A reader of ``ours`` from ``base`` and one of the null file from 0; always closed."""
    readers = [Reader(ours, base, region, offsets)]
    try:
        readers.append(Reader(null, 0, region, offsets))
        yield readers[0], readers[1]
    finally:
        for reader in readers:
            reader.close()


def _serve_null(argv: list[str]) -> int:
    from mktme_sandbox.fs import serve

    parser = argparse.ArgumentParser(description="serve the benchmark's null filesystem")
    parser.add_argument("--null", metavar="MNT", required=True)
    parser.add_argument("size", type=int)
    args = parser.parse_args(argv)
    daemon.raise_malloc_thresholds()  # as the sandbox's daemon: the same binding, the same heap
    serve(NullFS(args.size), args.null)
    return 0


if __name__ == "__main__":
    sys.exit(_serve_null(sys.argv[1:]))
